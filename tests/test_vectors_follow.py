"""The FAISS store seen by two processes (two store objects on one folder): one follows
the other's saves in place (new rows, removals, replacements; a rebuild there means a
full reload), and a store never saves over a save it has not seen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import CatalogMismatchError
from lookalike.vectors import FaissStore


def unit(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_a_store_follows_another_ones_saves(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first = unit(rng, 100)
    writer = FaissStore(tmp_path, 32, "s", background=False)
    writer.add(np.arange(100), first)
    writer.save()
    reader = FaissStore(tmp_path, 32, "s", background=False)
    assert len(reader) == 100 and not reader.stale()

    more = unit(rng, 20)
    writer.add(np.arange(100, 120), more)  # new rows
    writer.add(np.array([5]), more[:1])  # a replacement
    writer.remove(np.array([7, 8]))
    writer.save()
    assert reader.stale()
    raw_before = reader._raw.path
    assert reader.refresh() is True and not reader.stale()
    assert reader._raw.path == raw_before  # followed in place: the new rows only
    assert len(reader) == 100 + 20 - 2
    assert not np.isin([7, 8], reader.ids()).any()
    np.testing.assert_array_equal(reader.get(np.array([5])), more[:1])
    _, top = reader.search(more, 1)
    assert top[1:, 0].tolist() == list(range(101, 120))
    _, top = reader.search(first[7:9], 3)
    assert not np.isin(top, [7, 8]).any()

    writer.rebuild("test")  # compaction: a new log file, a full reload for the reader
    writer.add(np.array([500]), more[3:4])
    writer.save()
    assert reader.refresh() is True
    np.testing.assert_array_equal(np.sort(reader.ids()), np.sort(writer.ids()))
    _, top = reader.search(more[3:4], 1)
    assert top[0, 0] in (103, 500)
    assert reader.refresh() is False  # nothing new
    writer.remove(np.array([9]))
    writer.save()
    with pytest.raises(CatalogMismatchError):  # never a save over one it has not seen
        reader.add(np.array([999]), more[:1])
        reader.save()
    assert reader.refresh() is True
    assert 999 not in reader and 9 not in reader  # its unsaved change is dropped (the
    # engine re-adds it from the catalog under the lock)
    reader.add(np.array([600]), more[4:5])  # caught up: its own save goes through
    reader.save()
    assert writer.stale() and writer.refresh() and 600 in writer
