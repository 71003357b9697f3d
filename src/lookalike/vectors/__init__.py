"""Vector stores: ids (int64 image ids) and float32 vectors, nothing about products.

Contract (`VectorStore` in base.py): add (upsert), remove, search with an optional
set of allowed ids (exact when few ids are allowed), ids, len, save. `open_store(uri,
home, dim, stamp)` picks the implementation from a URI: "faiss" (default, persisted under
the home folder), a Milvus Lite ".db" path, or "milvus://HOST:PORT".
"""

from __future__ import annotations

from pathlib import Path

from lookalike.errors import UsageError
from lookalike.vectors.base import VectorStore
from lookalike.vectors.faiss_store import FaissStore

__all__ = ["FaissStore", "VectorStore", "open_store", "parse_memory_budget"]


def parse_memory_budget(text: str | int | None) -> int | None:
    """'4G', '512M', '1.5GiB', '2000000000' -> bytes; None/''/'auto' -> None (the default)."""
    if text is None:
        return None
    if isinstance(text, int):
        return text
    s = text.strip().lower().replace("ib", "").replace("b", "")
    if s in ("", "auto"):
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    mult = 1
    if s[-1] in units:
        mult = units[s[-1]]
        s = s[:-1]
    try:
        value = float(s)
    except ValueError:
        raise UsageError(f"bad memory budget {text!r}: use e.g. 512M, 4G") from None
    if value <= 0:
        raise UsageError(f"memory budget must be positive, got {text!r}")
    return int(value * mult)


def open_store(
    uri: str | None,
    home: Path,
    dim: int,
    stamp: str,
    *,
    reset: bool = False,
    memory_budget_bytes: int | None = None,
) -> VectorStore:
    """Open (or create) the vector store `uri` names for a catalog in `home`.

    - None, "" or "faiss": the embedded FAISS store in `<home>/vectors/`.
    - "milvus://HOST:PORT" (or "http(s)://HOST:PORT"): a Milvus server.
    - a path ending in ".db": Milvus Lite in that file (relative paths are relative to home).
    `reset=True` discards stored vectors made with another stamp/dim instead of raising
    CatalogMismatchError. `memory_budget_bytes` bounds the FAISS index's RAM (None: the
    documented default, see docs/scale.md).
    """
    home = Path(home)
    spec = (uri or "faiss").strip()
    if spec in ("faiss", "faiss://"):
        return FaissStore(
            home / "vectors", dim, stamp, reset=reset, memory_budget_bytes=memory_budget_bytes
        )
    if spec.startswith(("milvus://", "http://", "https://", "tcp://")) or spec.endswith(".db"):
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
