"""The embedded FAISS vector store: upsert, remove, filtered search, persistence."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import CatalogMismatchError, UsageError
from lookalike.vectors import FaissStore, VectorStore, open_store, parse_memory_budget
from lookalike.vectors.faiss_index import exact_topk

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
VGG = DATA / "footwear300/models/feature_vector_store.p"


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.fixture(scope="session")
def real_vectors() -> np.ndarray:
    """300 real 512-d image embeddings (VGG16 GAP of the footwear300 catalog)."""
    if not VGG.exists():
        pytest.skip(f"real data not found at {DATA}")
    with open(VGG, "rb") as fh:
        return unit(np.asarray(pickle.load(fh)))


def brute(q: np.ndarray, vecs: np.ndarray, ids: np.ndarray, k: int):
    return exact_topk(unit(q), vecs, ids, k)


def test_open_store_default_is_faiss_and_follows_protocol(tmp_path: Path) -> None:
    store = open_store(None, tmp_path, 8, "s1")
    assert isinstance(store, FaissStore)
    assert isinstance(store, VectorStore)
    assert (tmp_path / "vectors" / "store.json").exists()
    assert len(store) == 0
    scores, ids = store.search(unit(np.ones((2, 8))), 3)
    assert ids.shape == (2, 3) and (ids == -1).all() and np.isneginf(scores).all()


def test_search_matches_brute_force_on_real_embeddings(tmp_path: Path, real_vectors) -> None:
    ids = np.arange(1000, 1300, dtype=np.int64)
    store = open_store("faiss", tmp_path, 512, "vgg")
    store.add(ids, real_vectors)
    assert len(store) == 300
    q = real_vectors[[0, 17, 250]]
    scores, got = store.search(q, 10)
    want_s, want_ids = brute(q, real_vectors, ids, 10)
    np.testing.assert_array_equal(got[:, 0], [1000, 1017, 1250])  # itself first
    np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
    assert [set(r) for r in got] == [set(r) for r in want_ids]


def test_upsert_replaces_and_remove_never_returns(tmp_path: Path, real_vectors) -> None:
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(np.arange(300), real_vectors)
    # replace id 5 with the vector of id 200: a query for 200's vector finds both
    store.add(np.array([5]), real_vectors[200:201])
    assert len(store) == 300
    _, got = store.search(real_vectors[200:201], 2)
    assert set(got[0]) == {5, 200}
    # and the old vector of 5 is gone: its best match is no longer 5
    _, got = store.search(real_vectors[5:6], 300)
    assert (got[0] == 5).sum() == 1  # one entry for id 5, not two
    s5 = store.search(real_vectors[5:6], 1)[0][0, 0]
    assert s5 < 0.999
    # remove: gone from plain and filtered search, ids() and len
    store.remove(np.array([200, 5, 999_999]))
    assert len(store) == 298 and 5 not in store.ids() and 200 not in store.ids()
    _, got = store.search(real_vectors, 300)
    assert not np.isin(got, [5, 200]).any()
    assert (got[:, :298] >= 0).all() and (got[:, 298:] == -1).all()
    _, got = store.search(real_vectors[:3], 5, allowed_ids=np.array([5, 200, 7]))
    assert set(got[0]) == {7, -1}


def test_duplicate_ids_in_one_batch_last_wins(tmp_path: Path, real_vectors) -> None:
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(np.array([1, 2, 1]), real_vectors[:3])
    assert len(store) == 2
    np.testing.assert_allclose(store.get(np.array([1]))[0], real_vectors[2])


def test_filter_never_loses_results(tmp_path: Path, real_vectors) -> None:
    ids = np.arange(300, dtype=np.int64) * 7
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(ids, real_vectors)
    rng = np.random.default_rng(0)
    allowed = rng.choice(ids, 40, replace=False)
    q = real_vectors[rng.choice(300, 5, replace=False)]
    scores, got = store.search(q, 10, allowed_ids=allowed)
    mask = np.isin(ids, allowed)
    want_s, want = brute(q, real_vectors[mask], ids[mask], 10)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, want_s, rtol=1e-5, atol=1e-5)
    # fewer allowed than k: padded
    scores, got = store.search(q[:1], 10, allowed_ids=allowed[:3])
    assert set(got[0, :3]) == set(allowed[:3]) and (got[0, 3:] == -1).all()
    assert np.isneginf(scores[0, 3:]).all()
    # unknown allowed ids are ignored, empty filter returns nothing
    _, got = store.search(q[:1], 4, allowed_ids=np.array([1, 2, 3]))
    assert (got == -1).all()


def test_persists_across_reopen(tmp_path: Path, real_vectors) -> None:
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(np.arange(300), real_vectors)
    store.remove(np.array([10, 11]))
    store.add(np.array([12]), real_vectors[0:1])
    store.save()
    before = store.search(real_vectors[:20], 10)
    store.close()
    again = open_store(None, tmp_path, 512, "vgg")
    assert len(again) == 298
    after = again.search(real_vectors[:20], 10)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], rtol=1e-6)
    assert not np.isin(after[1], [10, 11]).any()


def test_unsaved_changes_are_dropped_and_crash_leaves_last_save(
    tmp_path: Path, real_vectors
) -> None:
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(np.arange(100), real_vectors[:100])
    store.save()
    # more rows appended to the raw log but never saved (a crash before save)
    store.add(np.arange(100, 200), real_vectors[100:200])
    store.remove(np.array([0]))
    # simulate a crash in the middle of the next save: a half-written temp sidecar
    (tmp_path / "vectors" / "store.json.tmp").write_text("{ half")
    again = FaissStore(tmp_path / "vectors", 512, "vgg")
    assert len(again) == 100 and 0 in again.ids()
    _, got = again.search(real_vectors[150:151], 1)
    assert got[0, 0] < 100
    # the store keeps working after the recovery
    again.add(np.array([500]), real_vectors[150:151])
    again.save()
    third = FaissStore(tmp_path / "vectors", 512, "vgg")
    assert len(third) == 101 and third.search(real_vectors[150:151], 1)[1][0, 0] == 500


def test_save_replaces_files_atomically(tmp_path: Path, real_vectors) -> None:
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(np.arange(50), real_vectors[:50])
    store.save()
    meta = json.loads((tmp_path / "vectors" / "store.json").read_text())
    assert meta["count"] == 50 and meta["dim"] == 512 and meta["stamp"] == "vgg"
    assert meta["plan"]["kind"] == "flat"
    files = {p.name for p in (tmp_path / "vectors").iterdir()}
    assert not any(name.endswith(".tmp") for name in files)
    # only the files the sidecar names remain (old generations are cleaned up)
    named = {"store.json", meta["raw_file"], meta["slots_file"]}
    assert files == named


def test_stamp_or_dim_mismatch_raises_unless_reset(tmp_path: Path, real_vectors) -> None:
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(np.arange(10), real_vectors[:10])
    store.close()
    with pytest.raises(CatalogMismatchError, match="stamp"):
        open_store(None, tmp_path, 512, "other-model")
    with pytest.raises(CatalogMismatchError):
        open_store(None, tmp_path, 256, "vgg")
    fresh = open_store(None, tmp_path, 256, "other-model", reset=True)
    assert len(fresh) == 0 and fresh.dim == 256
    fresh.close()
    assert open_store(None, tmp_path, 256, "other-model").describe()["vectors"] == 0


def test_bad_input_raises_typed_errors(tmp_path: Path) -> None:
    store = open_store(None, tmp_path, 4, "s")
    with pytest.raises(CatalogMismatchError):
        store.add(np.array([1]), np.ones((1, 5), dtype=np.float32))
    with pytest.raises(UsageError):
        store.add(np.array([1, 2]), np.ones((1, 4), dtype=np.float32))
    with pytest.raises(UsageError):
        store.search(np.ones((1, 4), dtype=np.float32), 0)
    with pytest.raises(UsageError):
        open_store("redis://x", tmp_path, 4, "s")


def test_describe_says_which_index_and_why(tmp_path: Path, real_vectors) -> None:
    store = open_store(None, tmp_path, 512, "vgg")
    store.add(np.arange(300), real_vectors)
    info = store.describe()
    assert info["backend"] == "faiss" and info["vectors"] == 300
    assert info["index_type"] == "flat" and "exact" in info["index_reason"]


def test_parse_memory_budget() -> None:
    assert parse_memory_budget("4G") == 4 << 30
    assert parse_memory_budget("512MiB") == 512 << 20
    assert parse_memory_budget("1.5g") == int(1.5 * (1 << 30))
    assert parse_memory_budget(None) is None and parse_memory_budget("auto") is None
    with pytest.raises(UsageError):
        parse_memory_budget("lots")


def test_reader_never_overwrites_a_writers_save(tmp_path: Path, real_vectors) -> None:
    writer = open_store(None, tmp_path, 512, "vgg")
    writer.add(np.arange(100), real_vectors[:100])
    writer.save()
    reader = open_store(None, tmp_path, 512, "vgg")  # e.g. a `serve` process
    assert len(reader.search(real_vectors[:1], 3)[1][0]) == 3
    writer.add(np.arange(100, 200), real_vectors[100:200])  # e.g. `index` meanwhile
    writer.close()
    sidecar = (tmp_path / "vectors" / "store.json").read_text()
    reader.close()  # nothing changed in the reader: it writes nothing
    assert (tmp_path / "vectors" / "store.json").read_text() == sidecar
    assert len(open_store(None, tmp_path, 512, "vgg")) == 200


def test_opening_while_a_writer_appends_does_not_cut_its_rows(tmp_path: Path, real_vectors) -> None:
    writer = open_store(None, tmp_path, 512, "vgg")
    writer.add(np.arange(50), real_vectors[:50])
    writer.save()
    writer.add(np.arange(50, 120), real_vectors[50:120])  # appended, not yet saved
    reader = open_store(None, tmp_path, 512, "vgg")
    assert len(reader) == 50  # sees the last save only
    writer.add(np.arange(120, 150), real_vectors[120:150])
    writer.close()
    again = open_store(None, tmp_path, 512, "vgg")
    assert len(again) == 150
    np.testing.assert_array_equal(again.get(np.array([60, 130])), real_vectors[[60, 130]])
