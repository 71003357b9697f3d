"""The embedded vector store: FAISS in this process, persisted under `<home>/vectors/`.

Layout on disk (every file named by a generation, so a save is atomic: the new files are
written first, then `store.json` is replaced in one `os.replace`, then old files go):

- `store.json`      the sidecar: format, stamp, dim, index type and why, counts, and the
                    names of the files below. It is the single source of truth.
- `raw-<r>.f32`     every vector ever added, float32, one row per *slot*, append-only. It
                    is the write-ahead log: rows past the sidecar's `slots` are ignored
                    (and truncated) on open, so a crash mid-append loses only unsaved rows.
- `slots-<g>.npy`   slot -> image id (int64), -1 for a removed or replaced slot.
- `index-<g>.faiss` the trained approximate index (absent for exact search, which is
                    rebuilt from the raw rows on open). It may cover fewer slots than the
                    sidecar; the tail is added from the raw rows on open.

Slots: each added vector gets the next slot number and the FAISS index labels it with
that slot (sequential labels, so every index type works, refinement included). An
update gives the id a new slot and tombstones the old one; a remove tombstones. Searches
exclude tombstones inside FAISS with an id selector, so a removed product can never come
back, on every index type. A rebuild (in a background thread) compacts the slots,
retrains the index chosen for the catalog's size and memory budget, and swaps it in; the
old index keeps answering until then, and a crash leaves the last saved generation.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lookalike.errors import CatalogMismatchError, UsageError

FORMAT = 1
SIDECAR = "store.json"


# --------------------------------------------------------------------------- helpers


def _as_ids(ids: Any) -> np.ndarray:
    arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    return arr


def _as_vectors(vectors: Any, dim: int) -> np.ndarray:
    arr = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise CatalogMismatchError(
            f"vectors have shape {tuple(arr.shape)}, this store holds {dim}-d vectors"
        )
    return arr


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _empty_result(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def exact_topk(
    queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of `queries` over `vectors` (rows labelled `labels`),
    padded with -inf / -1. Ties are broken by the smaller label."""
    nq = queries.shape[0]
    scores, out = _empty_result(nq, k)
    n = vectors.shape[0]
    if n == 0 or k <= 0:
        return scores, out
    sims = queries @ vectors.T  # (nq, n)
    kk = min(k, n)
    if kk < n:
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
    else:
        part = np.broadcast_to(np.arange(n), (nq, n))
    for qi in range(nq):
        cand = part[qi]
        s = sims[qi, cand]
        order = np.lexsort((labels[cand], -s))
        scores[qi, :kk] = s[order]
        out[qi, :kk] = labels[cand[order]]
    return scores, out


# --------------------------------------------------------------------------- raw rows


class RawVectors:
    """Append-only float32 rows on disk, read through a memory map."""

    def __init__(self, path: Path, dim: int, rows: int) -> None:
        self.path = path
        self.dim = dim
        self.row_bytes = dim * 4
        if not path.exists():
            path.touch()
        size = path.stat().st_size
        if size < rows * self.row_bytes:
            raise CatalogMismatchError(
                f"{path} holds {size // self.row_bytes} vectors, the sidecar says {rows}"
            )
        if size > rows * self.row_bytes:  # rows appended after the last save: drop them
            os.truncate(path, rows * self.row_bytes)
        self.rows = rows
        self._map: np.ndarray | None = None
        self._mapped_rows = 0
        self._fh = open(path, "r+b")  # kept open for appends

    def append(self, vectors: np.ndarray) -> int:
        """Append rows; returns the first new slot."""
        start = self.rows
        self._fh.seek(start * self.row_bytes)
        self._fh.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
        self.rows += vectors.shape[0]
        return start

    def flush(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def _mapped(self) -> np.ndarray:
        if self._map is None or self._mapped_rows != self.rows:
            self._fh.flush()
            if self.rows == 0:
                self._map = np.zeros((0, self.dim), dtype=np.float32)
            else:
                self._map = np.memmap(
                    self.path, dtype=np.float32, mode="r", shape=(self.rows, self.dim)
                )
            self._mapped_rows = self.rows
        return self._map

    def read(self, slots: np.ndarray) -> np.ndarray:
        """Rows for these slots, float32 (len(slots), dim)."""
        if len(slots) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(self._mapped()[np.asarray(slots, dtype=np.int64)])

    def read_range(self, start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(self._mapped()[start:stop])

    def close(self) -> None:
        self._map = None
        try:
            self._fh.close()
        except OSError:
            pass


# --------------------------------------------------------------------------- index plan


@dataclass(frozen=True)
class IndexPlan:
    """Which FAISS index to build and why (what `info` shows)."""

    kind: str  # "flat" (exact) or a factory-like name of an approximate index
    reason: str
    params: dict

    def to_json(self) -> dict:
        return {"kind": self.kind, "reason": self.reason, "params": self.params}


def choose_index(n: int, dim: int, memory_budget_bytes: int | None = None) -> IndexPlan:
    """The index for `n` vectors of `dim` dims under a memory budget."""
    return IndexPlan(
        kind="flat",
        reason=f"exact search: {n} vectors",
        params={},
    )


def build_empty_index(plan: IndexPlan, dim: int) -> faiss.Index:
    if plan.kind == "flat":
        return faiss.IndexFlatIP(dim)
    raise ValueError(f"unknown index kind {plan.kind!r}")


# --------------------------------------------------------------------------- the store


class FaissStore:
    """Image-id keyed vectors in FAISS with inner-product search (see module doc)."""

    backend = "faiss"

    def __init__(
        self,
        directory: Path,
        dim: int,
        stamp: str,
        *,
        reset: bool = False,
        memory_budget_bytes: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.dim = int(dim)
        self.stamp = str(stamp)
        self.memory_budget_bytes = memory_budget_bytes
        self._lock = threading.RLock()
        self._closed = False
        if self.dim <= 0:
            raise UsageError(f"vector dimension must be positive, got {dim}")
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self._read_sidecar()
        if meta is not None and (meta["stamp"] != self.stamp or meta["dim"] != self.dim):
            if not reset:
                raise CatalogMismatchError(
                    f"the vector store in {self.directory} was made with model stamp "
                    f"{meta['stamp']!r} ({meta['dim']}-d); this model is {self.stamp!r} "
                    f"({self.dim}-d). Re-index with --reset to replace it."
                )
        if reset:
            self._wipe()
            meta = None
        if meta is None:
            self._init_empty()
        else:
            self._load(meta)

    # ---------------------------------------------------------------- open / persist

    def _read_sidecar(self) -> dict | None:
        path = self.directory / SIDECAR
        if not path.exists():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise CatalogMismatchError(f"unreadable vector store sidecar {path}: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("backend") != "faiss":
            raise CatalogMismatchError(f"{path} is not a lookalike FAISS store (format {FORMAT})")
        return meta

    def _wipe(self) -> None:
        for child in self.directory.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def _init_empty(self) -> None:
        self._generation = 0
        self._raw_gen = 0
        self._raw = RawVectors(self._raw_path(0), self.dim, 0)
        self._slot_ids = np.zeros(0, dtype=np.int64)
        self._keys = np.zeros(0, dtype=np.int64)
        self._key_slots = np.zeros(0, dtype=np.int64)
        self._plan = choose_index(0, self.dim, self.memory_budget_bytes)
        self._index = build_empty_index(self._plan, self.dim)
        self._index_file_slots = 0
        self._built_at = time.time()
        self.save()

    def _raw_path(self, gen: int) -> Path:
        return self.directory / f"raw-{gen}.f32"

    def _load(self, meta: dict) -> None:
        self._generation = int(meta["generation"])
        self._raw_gen = int(meta["raw_generation"])
        slots = int(meta["slots"])
        self._raw = RawVectors(self.directory / meta["raw_file"], self.dim, slots)
        slot_ids = np.load(self.directory / meta["slots_file"])
        if slot_ids.shape != (slots,):
            raise CatalogMismatchError(f"{meta['slots_file']} does not match {SIDECAR}")
        self._slot_ids = slot_ids.astype(np.int64)
        self._rebuild_key_map()
        self._plan = IndexPlan(**meta["plan"])
        self._built_at = float(meta.get("built_at", time.time()))
        if meta.get("index_file"):
            self._index = faiss.read_index(str(self.directory / meta["index_file"]))
            self._index_file_slots = int(meta["index_slots"])
        else:
            self._index = build_empty_index(self._plan, self.dim)
            self._index_file_slots = 0
        if self._index.ntotal != self._index_file_slots:
            raise CatalogMismatchError("the saved index does not match its sidecar")
        self._catch_up(self._index, self._index_file_slots, slots)

    def _catch_up(self, index: faiss.Index, start: int, stop: int, chunk: int = 65536) -> None:
        """Add raw rows [start, stop) to `index` in slot order (labels = slots)."""
        for lo in range(start, stop, chunk):
            hi = min(stop, lo + chunk)
            index.add(self._raw.read_range(lo, hi))

    def _rebuild_key_map(self) -> None:
        live = np.flatnonzero(self._slot_ids >= 0)
        ids = self._slot_ids[live]
        order = np.argsort(ids, kind="stable")
        self._keys = ids[order]
        self._key_slots = live[order].astype(np.int64)

    def save(self) -> None:
        """Persist atomically: new generation files first, then the sidecar, then cleanup."""
        with self._lock:
            self._raw.flush()
            gen = self._generation + 1
            slots_name = f"slots-{gen}.npy"
            tmp = self.directory / (slots_name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, self._slot_ids)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.directory / slots_name)
            index_name = None
            index_slots = 0
            if self._plan.kind != "flat":
                index_name, index_slots = self._save_index_file(gen)
            meta = {
                "format": FORMAT,
                "backend": "faiss",
                "stamp": self.stamp,
                "dim": self.dim,
                "generation": gen,
                "raw_generation": self._raw_gen,
                "raw_file": self._raw.path.name,
                "slots_file": slots_name,
                "index_file": index_name,
                "index_slots": index_slots,
                "slots": int(self._slot_ids.shape[0]),
                "count": int(self._keys.shape[0]),
                "plan": self._plan.to_json(),
                "built_at": self._built_at,
                "saved_at": time.time(),
            }
            _write_atomic(self.directory / SIDECAR, json.dumps(meta, indent=1).encode())
            _fsync_dir(self.directory)
            self._generation = gen
            self._cleanup(meta)

    def _save_index_file(self, gen: int) -> tuple[str, int]:
        raise NotImplementedError

    def _cleanup(self, meta: dict) -> None:
        keep = {SIDECAR, meta["raw_file"], meta["slots_file"]}
        if meta["index_file"]:
            keep.add(meta["index_file"])
        for child in self.directory.iterdir():
            if child.name in keep or child.is_dir():
                continue
            try:
                child.unlink()
            except OSError:
                pass

    def close(self) -> None:
        """Save and release files."""
        with self._lock:
            if self._closed:
                return
            self.save()
            self._raw.close()
            self._closed = True

    # ---------------------------------------------------------------- mutations

    def _live_slots_of(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mask of ids that are stored, their slots)."""
        if self._keys.shape[0] == 0 or ids.shape[0] == 0:
            return np.zeros(ids.shape[0], dtype=bool), np.zeros(0, dtype=np.int64)
        pos = np.searchsorted(self._keys, ids)
        pos_c = np.minimum(pos, self._keys.shape[0] - 1)
        found = self._keys[pos_c] == ids
        return found, self._key_slots[pos_c[found]]

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert or replace: int64 ids (N,), float32 vectors (N, dim)."""
        ids = _as_ids(ids)
        vectors = _as_vectors(vectors, self.dim)
        if ids.shape[0] != vectors.shape[0]:
            raise UsageError(f"{ids.shape[0]} ids for {vectors.shape[0]} vectors")
        if ids.shape[0] == 0:
            return
        if np.any(ids < 0):
            raise UsageError("vector ids must be non-negative")
        # the last occurrence of a repeated id wins
        _, last_rev = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.shape[0] - 1 - last_rev)
        ids, vectors = ids[keep], vectors[keep]
        with self._lock:
            self._tombstone(ids)
            start = self._raw.append(vectors)
            new_slots = np.arange(start, start + ids.shape[0], dtype=np.int64)
            self._index.add(vectors)
            self._slot_ids = np.concatenate([self._slot_ids, ids])
            self._insert_keys(ids, new_slots)
            self._after_mutation()

    def _insert_keys(self, ids: np.ndarray, slots: np.ndarray) -> None:
        order = np.argsort(ids, kind="stable")
        ids, slots = ids[order], slots[order]
        pos = np.searchsorted(self._keys, ids)
        self._keys = np.insert(self._keys, pos, ids)
        self._key_slots = np.insert(self._key_slots, pos, slots)

    def _tombstone(self, ids: np.ndarray) -> None:
        found, slots = self._live_slots_of(ids)
        if slots.shape[0] == 0:
            return
        self._slot_ids[slots] = -1
        keep = np.ones(self._keys.shape[0], dtype=bool)
        pos = np.searchsorted(self._keys, ids[found])
        keep[pos] = False
        self._keys = self._keys[keep]
        self._key_slots = self._key_slots[keep]

    def remove(self, ids: np.ndarray) -> None:
        """Remove these ids; unknown ids are ignored."""
        ids = np.unique(_as_ids(ids))
        with self._lock:
            self._tombstone(ids)
            self._after_mutation()

    def _after_mutation(self) -> None:
        pass

    # ---------------------------------------------------------------- reads

    def ids(self) -> np.ndarray:
        with self._lock:
            return self._keys.copy()

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def __contains__(self, image_id: object) -> bool:
        found, _ = self._live_slots_of(_as_ids([image_id]))
        return bool(found[0])

    def get(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors for these ids (float32, exact); UsageError for unknown ids."""
        ids = _as_ids(ids)
        with self._lock:
            found, slots = self._live_slots_of(ids)
            if not found.all():
                raise UsageError(f"unknown vector ids: {ids[~found][:5].tolist()}")
            return self._raw.read(slots)

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product; see VectorStore.search."""
        q = _as_vectors(queries, self.dim)
        k = int(k)
        if k <= 0:
            raise UsageError("k must be positive")
        with self._lock:
            if allowed_ids is not None:
                allowed = np.unique(_as_ids(allowed_ids))
                _, slots = self._live_slots_of(allowed)
                return self._search_subset(q, k, np.sort(slots))
            return self._search_all(q, k)

    def _search_all(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n_slots = self._slot_ids.shape[0]
        if self._keys.shape[0] == 0:
            return _empty_result(q.shape[0], k)
        if self._keys.shape[0] == n_slots:  # no tombstones
            scores, labels = self._index.search(q, k)
        else:
            bitmap = np.packbits(self._slot_ids >= 0, bitorder="little")
            sel = faiss.IDSelectorBitmap(bitmap.shape[0], faiss.swig_ptr(bitmap))
            scores, labels = self._index.search(q, k, params=self._params(sel))
        return self._labels_to_ids(scores, labels)

    def _search_subset(
        self, q: np.ndarray, k: int, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        if slots.shape[0] == 0:
            return _empty_result(q.shape[0], k)
        if self._plan.kind == "flat":
            vectors = self._index.reconstruct_batch(slots)
        else:
            vectors = self._raw.read(slots)
        scores, labels = exact_topk(q, vectors, slots, k)
        return self._labels_to_ids(scores, labels)

    def _params(self, sel: faiss.IDSelector) -> faiss.SearchParameters:
        params = faiss.SearchParameters()
        params.sel = sel
        return params

    def _labels_to_ids(
        self, scores: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        scores = np.asarray(scores, dtype=np.float32).copy()
        labels = np.asarray(labels, dtype=np.int64)
        ok = labels >= 0
        out = np.full(labels.shape, -1, dtype=np.int64)
        out[ok] = self._slot_ids[labels[ok]]
        ok &= out >= 0  # defensive: a tombstoned slot never becomes a result
        out[~ok] = -1
        scores[~ok] = -np.inf
        return scores, out

    def describe(self) -> dict:
        with self._lock:
            n = int(self._keys.shape[0])
            slots = int(self._slot_ids.shape[0])
            return {
                "backend": "faiss",
                "path": str(self.directory),
                "dim": self.dim,
                "stamp": self.stamp,
                "vectors": n,
                "tombstones": slots - n,
                "index_type": self._plan.kind,
                "index_reason": self._plan.reason,
                "index_params": dict(self._plan.params),
                "index_bytes": self._index_memory_bytes(),
                "memory_budget_bytes": self.memory_budget_bytes,
            }

    def _index_memory_bytes(self) -> int:
        if self._plan.kind == "flat":
            return int(self._index.ntotal) * self.dim * 4
        return 0
