"""The VectorStore protocol every backend implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class VectorStore(Protocol):
    """Image-id keyed vectors with inner-product (cosine on normalised vectors) search."""

    dim: int
    stamp: str  # the encoder stamp the vectors were made with

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace: int64 ids (N,), float32 vectors (N, dim)."""

    def remove(self, ids: np.ndarray) -> None:
        """Remove these ids; unknown ids are ignored."""

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product for each query row: (scores (Q, k) float32, ids (Q, k)
        int64), padded with -inf / -1 when fewer than k vectors qualify. When
        `allowed_ids` is given only those ids may be returned, and every allowed id that
        ranks in the top k must come back (a filter never loses results)."""

    def ids(self) -> np.ndarray:
        """All stored ids, int64."""

    def __len__(self) -> int: ...

    def save(self) -> None:
        """Persist atomically (a crash leaves the previous saved state)."""

    def describe(self) -> dict:
        """What `lookalike info` shows: backend, index type and why, sizes."""
