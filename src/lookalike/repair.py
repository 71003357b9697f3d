"""Bring a vector store in line with the catalog, which is the truth: the same image ids,
and (`verify`) the same vector for each of them.

Ids alone miss the dangerous case: a vector stored under the right id that belongs to
another image (a write lost between two processes, a save over another's). So after a
writer that did not finish (the engine's clean mark is not the store's signature), every
stored vector is compared with the catalog's and the ones that differ are replaced.
"""

from __future__ import annotations

import numpy as np

from .catalog import Catalog
from .vectors.base import VectorStore

CHUNK = 4096
TOLERANCE = 1e-5  # float32 vectors copied byte for byte: any real difference is far larger


def sync_store(catalog: Catalog, store: VectorStore, stamp: str, verify: bool = False) -> dict:
    """Add the catalog's vectors the store misses, drop the ids the catalog no longer has
    and, with `verify`, replace every stored vector that is not the catalog's. Returns
    {"added", "removed", "replaced"}; saves the store when anything changed."""
    want = catalog.embedded_ids(stamp)
    have = store.ids()
    missing = np.setdiff1d(want, have, assume_unique=True)
    extra = np.setdiff1d(have, want, assume_unique=True)
    if extra.size:
        store.remove(extra)
    for start in range(0, missing.size, CHUNK):
        chunk = missing[start : start + CHUNK]
        store.add(chunk, catalog.vectors(chunk.tolist()))
    replaced = 0
    if verify:
        common = np.intersect1d(want, have, assume_unique=True)
        for start in range(0, common.size, CHUNK):
            chunk = common[start : start + CHUNK]
            truth = catalog.vectors(chunk.tolist())
            stored = store.get(chunk)
            wrong = np.max(np.abs(stored - truth), axis=1) > TOLERANCE
            if wrong.any():
                store.add(chunk[wrong], truth[wrong])
                replaced += int(wrong.sum())
    if missing.size or extra.size or replaced:
        store.save()
    return {"added": int(missing.size), "removed": int(extra.size), "replaced": replaced}
