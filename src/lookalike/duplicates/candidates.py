"""Stage 1: candidate pairs from the stored vectors, never an n x n matrix.

The vectors are streamed in batches into a small in-memory FAISS index over their first
PROJECTED_DIM principal components (an orthonormal projection only shrinks distances,
so a pair within cosine `min_similarity` in full space is within the same radius
there); each image's k nearest neighbours inside that radius are re-scored exactly with
the full vectors. Memory: PROJECTED_DIM floats an image (twice: the queries and the
index) plus one batch of full vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import faiss
import numpy as np

from ..catalog import Catalog
from ..errors import UsageError

MIN_SIMILARITY = 0.75
"""Embedding cosine a candidate pair needs (stage 1); measured in docs/duplicates.md."""
NEIGHBOURS = 24  # nearest neighbours looked at per image

PROJECTED_DIM = 128
SAMPLE = 20_000  # vectors the projection is fitted on
BATCH = 8192
EXACT_LIMIT = 20_000  # up to this many images the projected search is exact (flat)

Progress = Callable[[str, int, int], None]
"""progress(stage, done, total): called as each batch finishes."""


# ------------------------------------------------------------------ stage 1: candidates


class VectorSource(Protocol):
    """Where stored vectors come from: the catalog, a FaissStore (`get`), or a file."""

    def ids(self) -> np.ndarray: ...

    def get(self, ids: np.ndarray) -> np.ndarray: ...


class CatalogVectors:
    """The catalog's stored vectors for one encoder stamp (works for every store backend)."""

    def __init__(self, catalog: Catalog, stamp: str):
        self.catalog = catalog
        self.stamp = stamp

    def ids(self) -> np.ndarray:
        return np.sort(self.catalog.embedded_ids(self.stamp))

    def get(self, ids: np.ndarray) -> np.ndarray:
        return self.catalog.vectors([int(i) for i in ids])


@dataclass
class Candidates:
    a: np.ndarray  # int64 image ids, a < b
    b: np.ndarray
    similarity: np.ndarray  # float32 cosine of the full vectors

    def __len__(self) -> int:
        return int(self.a.shape[0])


def _batches(n: int, size: int) -> Iterable[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


class Projection:
    """x -> (x - mean) @ rows.T with orthonormal rows: distances can only shrink."""

    def __init__(self, mean: np.ndarray, rows: np.ndarray):
        self.mean = mean.astype(np.float32)
        self.rows_t = np.ascontiguousarray(rows.T, dtype=np.float32)
        self.d_out = rows.shape[0]

    def apply(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray((x - self.mean) @ self.rows_t)


def _fit_projection(source: VectorSource, ids: np.ndarray, dim: int) -> Projection | None:
    """The top PROJECTED_DIM principal directions of a sample of the vectors (randomised
    SVD, two power iterations); None when that would not shrink the vectors."""
    if ids.size <= PROJECTED_DIM * 4 or dim <= PROJECTED_DIM:
        return None
    rng = np.random.default_rng(0)
    take = np.sort(rng.choice(ids, size=min(ids.size, SAMPLE), replace=False))
    x = np.asarray(source.get(take), dtype=np.float32)
    mean = x.mean(axis=0)
    x -= mean
    y = x @ rng.standard_normal((dim, PROJECTED_DIM + 16)).astype(np.float32)
    for _ in range(2):
        y, _ = np.linalg.qr(x @ (x.T @ y))
    _, _, vt = np.linalg.svd(y.T @ x, full_matrices=False)
    return Projection(mean, vt[:PROJECTED_DIM])


def near_pairs(
    source: VectorSource,
    min_similarity: float = MIN_SIMILARITY,
    k: int = NEIGHBOURS,
    batch: int = BATCH,
    progress: Progress | None = None,
    nprobe: int | None = None,
    exact_limit: int = EXACT_LIMIT,
) -> Candidates:
    """Pairs of stored vectors with cosine >= min_similarity, each image's k nearest
    looked at (see the module docstring: a projected index, then exact re-scoring)."""
    if not -1.0 <= min_similarity <= 1.0:
        raise UsageError("min_similarity must be between -1 and 1")
    ids = np.asarray(source.ids(), dtype=np.int64)
    n = int(ids.size)
    empty = Candidates(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if n < 2:
        return empty
    first = np.ascontiguousarray(source.get(ids[:1]), dtype=np.float32)
    dim = first.shape[1]
    pca = _fit_projection(source, ids, dim)
    pdim = pca.d_out if pca is not None else dim
    if n <= exact_limit:
        index: faiss.Index = faiss.IndexFlatL2(pdim)
    else:
        nlist = int(min(16384, max(64, 2 ** round(np.log2(4 * np.sqrt(n))))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(pdim), pdim, nlist)
    projected = np.zeros((n, pdim), dtype=np.float32)  # what the index holds, kept once
    for start, stop in _batches(n, batch):
        vec = np.ascontiguousarray(source.get(ids[start:stop]), dtype=np.float32)
        projected[start:stop] = pca.apply(vec) if pca is not None else vec
        if progress:
            progress("read", stop, n)
    if isinstance(index, faiss.IndexIVFFlat):
        rng = np.random.default_rng(1)
        index.train(projected[np.sort(rng.choice(n, size=min(n, index.nlist * 40), replace=False))])
        index.nprobe = nprobe or max(8, index.nlist // 256)  # 8 at 100k, 16 at 1M
    index.add(projected)
    radius = 2.0 - 2.0 * min_similarity + 1e-4  # squared L2 of unit vectors at that cosine
    kk = min(k + 1, n)
    found_a: list[np.ndarray] = []
    found_b: list[np.ndarray] = []
    for start, stop in _batches(n, batch):
        dist, rows = index.search(projected[start:stop], kk)
        me = np.arange(start, stop)[:, None]
        keep = (rows >= 0) & (rows != me) & (dist <= radius)  # found from either end
        qi, col = np.nonzero(keep)
        found_a.append(np.minimum(qi + start, rows[qi, col]))
        found_b.append(np.maximum(qi + start, rows[qi, col]))
        if progress:
            progress("search", stop, n)
    del projected, index
    rows_a = np.concatenate(found_a) if found_a else np.zeros(0, np.int64)
    rows_b = np.concatenate(found_b) if found_b else np.zeros(0, np.int64)
    if rows_a.size == 0:
        return empty
    pairs = np.unique(np.stack([rows_a, rows_b], 1).astype(np.int64), axis=0)
    sims = _exact_similarities(source, ids, pairs, batch)
    keep = sims >= min_similarity
    a, b = ids[pairs[keep, 0]], ids[pairs[keep, 1]]
    return Candidates(np.minimum(a, b), np.maximum(a, b), sims[keep])


def _exact_similarities(
    source: VectorSource, ids: np.ndarray, pairs: np.ndarray, batch: int
) -> np.ndarray:
    """Full-vector cosine of row pairs, reading the vectors a block of rows at a time."""
    order = np.argsort(pairs[:, 0], kind="stable")
    pairs = pairs[order]
    sims = np.empty(pairs.shape[0], dtype=np.float32)
    for start, stop in _batches(pairs.shape[0], batch):
        chunk = pairs[start:stop]
        rows = np.unique(chunk)
        vec = np.asarray(source.get(ids[rows]), dtype=np.float32)
        pos = np.searchsorted(rows, chunk)
        sims[start:stop] = np.einsum("ij,ij->i", vec[pos[:, 0]], vec[pos[:, 1]])
    out = np.empty_like(sims)
    out[order] = sims
    return out
