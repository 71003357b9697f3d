"""Vector stores: ids (int64 image ids) and float32 vectors, nothing about products.

Contract (`VectorStore` in base.py): add (upsert), remove, search with an optional
set of allowed ids (exact when few ids are allowed), ids, len, save. `open_store(uri,
home, dim, stamp)` picks the implementation from a URI: "faiss" (default, persisted under
the home folder), a Milvus Lite ".db" path, or "milvus://HOST:PORT".
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from lookalike.errors import UsageError
from lookalike.vectors.base import VectorStore
from lookalike.vectors.faiss_store import FaissStore
from lookalike.vectors.planning import parse_memory_budget

__all__ = ["FaissStore", "VectorStore", "check_store_uri", "open_store", "parse_memory_budget"]

MILVUS_SCHEMES = ("milvus://", "milvus+https://", "http://", "https://", "tcp://")


def check_store_uri(uri: str | None) -> None:
    """UsageError unless `uri` names a store `open_store` knows (nothing is opened)."""
    spec = (uri or "faiss").strip()
    if spec in ("faiss", "faiss://") or (spec.endswith(".db") and "://" not in spec):
        return
    if spec.startswith(MILVUS_SCHEMES):
        from lookalike.vectors.milvus_store import parse_uri

        parse_uri(spec)
        return
    raise UsageError(
        f"unknown vector store {uri!r}: use 'faiss', 'milvus://HOST:PORT' or a Milvus Lite "
        "'.db' file"
    )


def open_store(
    uri: str | None,
    home: Path,
    dim: int,
    stamp: str,
    *,
    reset: bool = False,
    memory_budget_bytes: int | None = None,
    guard: Callable[[], AbstractContextManager] | None = None,
) -> VectorStore:
    """Open (or create) the vector store `uri` names for a catalog in `home`.

    - None, "" or "faiss": the embedded FAISS store in `<home>/vectors/`.
    - "milvus://HOST:PORT" (or "http(s)://HOST:PORT"): a Milvus server.
    - a path ending in ".db": Milvus Lite in that file (relative paths are relative to home).
    `reset=True` discards stored vectors made with another stamp/dim instead of raising
    CatalogMismatchError. `memory_budget_bytes` bounds the FAISS index's RAM (None: the
    documented default, see docs/scale.md). `guard()` is held around every write of the
    FAISS store's files (the home's writer lock; Milvus keeps its own files).
    """
    home = Path(home)
    spec = (uri or "faiss").strip()
    if spec in ("faiss", "faiss://"):
        return FaissStore(
            home / "vectors",
            dim,
            stamp,
            reset=reset,
            memory_budget_bytes=memory_budget_bytes,
            guard=guard,
        )
    if spec.startswith(MILVUS_SCHEMES) or spec.endswith(".db"):
        from lookalike.vectors.milvus_store import MilvusStore

        if spec.endswith(".db") and "://" not in spec:
            path = Path(spec).expanduser()
            if not path.is_absolute():
                path = home / path
            spec = str(path)
        return MilvusStore(spec, dim, stamp, reset=reset)
    raise UsageError(
        f"unknown vector store {uri!r}: use 'faiss', 'milvus://HOST:PORT' or a Milvus Lite "
        "'.db' file"
    )
