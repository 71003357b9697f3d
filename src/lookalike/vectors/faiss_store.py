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
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lookalike.errors import CatalogMismatchError, UsageError
from lookalike.vectors.faiss_index import (
    DISK_RERANKED,
    EXACT_WORK,
    LOG_RESCORED,
    IndexPlan,
    choose_index,
    new_index,
    search_parameters,
    training_size,
    tune_nprobe,
)

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
    padded with -inf / -1. FAISS's own kernels (not NumPy's BLAS, whose thread pool
    spin-waits badly on a busy machine)."""
    nq = queries.shape[0]
    scores, out = _empty_result(nq, k)
    n = vectors.shape[0]
    if n == 0 or k <= 0:
        return scores, out
    kk = min(k, n)
    d, i = faiss.knn(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        kk,
        metric=faiss.METRIC_INNER_PRODUCT,
    )
    ok = i >= 0
    scores[:, :kk] = np.where(ok, d, -np.inf)
    out[:, :kk] = np.where(ok, np.asarray(labels, dtype=np.int64)[np.maximum(i, 0)], -1)
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
        # Rows past `rows` were appended after the last save (a crash, or another process
        # writing right now): they are ignored here, and cut off only when this process
        # appends itself (one writer at a time; a reader never touches the file).
        self._truncate_first = size > rows * self.row_bytes
        self.rows = rows
        self._map: np.ndarray | None = None
        self._mapped_rows = 0
        self._fh = open(path, "r+b")  # kept open for appends
        self._lock = threading.Lock()  # appends (owner thread) vs reads (rebuild thread)

    def append(self, vectors: np.ndarray) -> int:
        """Append rows; returns the first new slot."""
        with self._lock:
            start = self.rows
            if self._truncate_first:
                self._fh.truncate(start * self.row_bytes)
                self._truncate_first = False
            self._fh.seek(start * self.row_bytes)
            self._fh.write(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
            self.rows += vectors.shape[0]
            return start

    def flush(self) -> None:
        with self._lock:
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def _mapped(self) -> np.ndarray:
        with self._lock:
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


# --------------------------------------------------------------------------- the store

SELECTIVE_FRACTION = 0.05  # filters passing <= 5% of the catalog are searched exactly
SELECTIVE_WORK = 4 * EXACT_WORK  # ... and so are filters passing <= 50k 1280-d vectors
COMPACT_FRACTION = 0.25  # rebuild (compact) when a quarter of the slots are tombstones
RETRAIN_GROWTH = 2.0  # retrain (and re-tune) an approximate index when the catalog doubled
INDEX_FILE_TAIL = 0.2  # rewrite the index file when 20% of slots are only in the log
TUNE_QUERIES = 200


def build_threads() -> int:
    """OpenMP threads for batch work: LOOKALIKE_THREADS, else the idle cores (at least 1).
    FAISS's OpenMP loops spin-wait: on a machine already busy, 2 threads on 2 cores
    measured 6-10x slower than 1 (docs/scale.md)."""
    env = os.environ.get("LOOKALIKE_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def _set_threads(nq: int) -> None:
    """One OpenMP thread for a few queries, the idle cores for batches. OpenMP keeps
    this setting per calling thread."""
    faiss.omp_set_num_threads(1 if nq < 8 else build_threads())


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
        background: bool = True,
        exact_limit: int | None = None,
    ) -> None:
        """Open or create the store in `directory`. `background=False` runs rebuilds in
        the calling thread (benchmarks, tests); otherwise they run in a worker thread.
        `exact_limit` overrides how many vectors are searched exactly (tests, tuning)."""
        self.directory = Path(directory)
        self.dim = int(dim)
        self.stamp = str(stamp)
        self.memory_budget_bytes = memory_budget_bytes
        self.background = background
        self.exact_limit = exact_limit
        self._lock = threading.RLock()
        self._closed = False
        self._rebuild_thread: threading.Thread | None = None
        self._last_rebuild: dict | None = None
        self._rebuild_hook = None  # tests: called inside the worker between stages
        self._live_bits: np.ndarray | None = None  # bitmap of live slots, cached
        self._dirty = True  # changed since the last save (cleared by save, set on load)
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
        self._plan = self._choose(0)
        self._index = new_index(self._plan, self.dim)
        self._index_file: str | None = None
        self._index_file_slots = 0
        self._built_at = time.time()
        self.save()

    def _choose(self, n: int, current: IndexPlan | None = None) -> IndexPlan:
        return choose_index(n, self.dim, self.memory_budget_bytes, current, self.exact_limit)

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
        self._last_rebuild = meta.get("last_rebuild")
        self._index_file = meta.get("index_file")
        if self._index_file:
            self._index = faiss.read_index(str(self.directory / self._index_file))
            self._index_file_slots = int(meta["index_slots"])
        else:
            self._index = new_index(self._plan, self.dim)
            self._index_file_slots = 0
        if self._index.ntotal != self._index_file_slots:
            raise CatalogMismatchError("the saved index does not match its sidecar")
        self._add_rows(self._index, self._raw, self._index_file_slots, slots)
        self._dirty = False

    @staticmethod
    def _add_rows(
        index: faiss.Index, raw: RawVectors, start: int, stop: int, chunk: int = 50_000
    ) -> None:
        """Add raw rows [start, stop) to `index` in slot order (labels = slots)."""
        for lo in range(start, stop, chunk):
            index.add(raw.read_range(lo, min(stop, lo + chunk)))

    def _rebuild_key_map(self) -> None:
        live = np.flatnonzero(self._slot_ids >= 0)
        ids = self._slot_ids[live]
        order = np.argsort(ids, kind="stable")
        self._keys = ids[order]
        self._key_slots = live[order].astype(np.int64)

    def save(self) -> None:
        """Persist atomically: new generation files first, then the sidecar, then cleanup.
        Cheap: the vectors are already in the append-only log; the approximate index file
        is rewritten only when much of the log is not in it yet. A store nothing was
        changed in writes nothing (so a read-only process never overwrites a writer's
        newer save)."""
        with self._lock:
            if not self._dirty:
                return
            self._raw.flush()
            gen = self._generation + 1
            slots_name = f"slots-{gen}.npy"
            tmp = self.directory / (slots_name + ".tmp")
            with open(tmp, "wb") as fh:
                np.save(fh, self._slot_ids)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.directory / slots_name)
            n_slots = int(self._slot_ids.shape[0])
            if self._plan.exact:
                self._index_file, self._index_file_slots = None, 0
            elif (
                self._index_file is None
                or n_slots - self._index_file_slots > INDEX_FILE_TAIL * n_slots
            ):
                self._index_file = self._write_index_file(self._index, gen)
                self._index_file_slots = int(self._index.ntotal)
            self._write_sidecar(gen, slots_name)

    def _write_index_file(self, index: faiss.Index, gen: int | str) -> str:
        name = f"index-{gen}.faiss"
        tmp = self.directory / (name + ".tmp")
        faiss.write_index(index, str(tmp))
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.directory / name)
        return name

    def _write_sidecar(self, gen: int, slots_name: str) -> None:
        meta = {
            "format": FORMAT,
            "backend": "faiss",
            "stamp": self.stamp,
            "dim": self.dim,
            "generation": gen,
            "raw_generation": self._raw_gen,
            "raw_file": self._raw.path.name,
            "slots_file": slots_name,
            "index_file": self._index_file,
            "index_slots": self._index_file_slots,
            "slots": int(self._slot_ids.shape[0]),
            "count": int(self._keys.shape[0]),
            "index_type": self._plan.kind,
            "plan": self._plan.to_json(),
            "built_at": self._built_at,
            "last_rebuild": self._last_rebuild,
            "saved_at": time.time(),
        }
        _write_atomic(self.directory / SIDECAR, json.dumps(meta, indent=1).encode())
        _fsync_dir(self.directory)
        self._generation = gen
        self._dirty = False
        self._cleanup(meta)

    def _cleanup(self, meta: dict) -> None:
        keep = {SIDECAR, meta["raw_file"], meta["slots_file"]}
        if meta["index_file"]:
            keep.add(meta["index_file"])
        building = self._rebuild_thread is not None and self._rebuild_thread.is_alive()
        for child in self.directory.iterdir():
            if child.name in keep or child.is_dir():
                continue
            if building and child.name.startswith(("raw-", "index-")):
                continue  # the rebuild worker's files in progress
            try:
                child.unlink()
            except OSError:
                pass

    def close(self) -> None:
        """Finish a running rebuild, save, release files."""
        self.wait_for_rebuild()
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

    def add(self, ids: np.ndarray, vectors: np.ndarray, payload: Any = None) -> None:
        """Insert or replace: int64 ids (N,), float32 vectors (N, dim). `payload` is
        accepted for symmetry with the Milvus store and ignored: FAISS filters through
        the allowed ids the catalog computes."""
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
            _set_threads(len(ids) if len(ids) > 256 else 1)
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

    # ---------------------------------------------------------------- rebuilds

    def rebuild_reason(self) -> str | None:
        """Why the live index should be rebuilt now, or None."""
        with self._lock:
            n = int(self._keys.shape[0])
            slots = int(self._slot_ids.shape[0])
            want = self._choose(n, self._plan)
            if want.kind != self._plan.kind:
                return f"catalog now {n:,} vectors: {want.kind} ({want.reason})"
            if not want.exact:
                trained = int(self._plan.params.get("trained_for", 0))
                if n > RETRAIN_GROWTH * max(trained, 1):
                    return f"catalog grew from {trained:,} to {n:,} vectors since training"
            dead = slots - n
            if dead > max(1000, COMPACT_FRACTION * slots):
                return f"compaction: {dead:,} of {slots:,} slots are removed or replaced"
            return None

    def _after_mutation(self) -> None:
        self._live_bits = None
        self._dirty = True
        if self._rebuild_thread is not None and self._rebuild_thread.is_alive():
            return
        reason = self.rebuild_reason()
        if reason is not None:
            self.rebuild(reason=reason, wait=not self.background)

    def rebuild(self, reason: str = "requested", wait: bool = True) -> None:
        """Compact the slots and rebuild the index the catalog's size and budget call for.
        With wait=False it runs in a worker thread; searches and updates keep using the
        live index, and the new one is swapped in only when complete."""
        with self._lock:
            if self._rebuild_thread is not None and self._rebuild_thread.is_alive():
                running = self._rebuild_thread
            elif wait:  # in this thread (the lock is re-entrant)
                self._rebuild_worker(reason)
                return
            else:
                running = threading.Thread(
                    target=self._rebuild_worker, args=(reason,), name="faiss-rebuild", daemon=True
                )
                self._rebuild_thread = running
                running.start()
        if wait:
            running.join()

    def wait_for_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running rebuild; True when none is running any more."""
        thread = self._rebuild_thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def rebuilding(self) -> bool:
        return self._rebuild_thread is not None and self._rebuild_thread.is_alive()

    def _hook(self, stage: str) -> None:
        if self._rebuild_hook is not None:
            self._rebuild_hook(stage)

    def _rebuild_worker(self, reason: str) -> None:
        t0 = time.time()
        faiss.omp_set_num_threads(build_threads())
        record: dict = {"reason": reason, "started_at": t0}
        new_raw: RawVectors | None = None
        try:
            with self._lock:  # snapshot: live slots up to the high-water mark
                hwm = int(self._slot_ids.shape[0])
                live = np.flatnonzero(self._slot_ids[:hwm] >= 0)
                snap_ids = self._slot_ids[live].copy()
                raw_gen = self._raw_gen + 1
                plan = self._choose(len(live), self._plan)
            self._hook("snapshot")
            # 1. compact the log into a new raw file (live rows only, in slot order)
            new_raw = RawVectors(self._raw_path(raw_gen), self.dim, 0)
            for lo in range(0, len(live), 50_000):
                new_raw.append(self._raw.read(live[lo : lo + 50_000]))
            new_raw.flush()
            n = len(live)
            # 2. train on a sample, add everything, tune nprobe on catalog queries
            index = new_index(plan, self.dim)
            rng = np.random.default_rng(n)
            if not plan.exact:
                sample = np.sort(rng.choice(n, min(n, training_size(plan)), replace=False))
                index.train(new_raw.read(sample))
            self._hook("trained")
            self._add_rows(index, new_raw, 0, n)
            if not plan.exact:
                plan = self._tune(index, plan, new_raw, n, rng)
                plan = plan.with_params(trained_for=n)
            self._hook("built")
            index_name = None
            if not plan.exact:
                index_name = self._write_index_file(index, f"r{raw_gen}")
            # 3. catch up with changes made meanwhile, then swap (under the lock)
            with self._lock:
                new_slot_ids = snap_ids.copy()
                new_slot_ids[self._slot_ids[live] != snap_ids] = -1  # removed or replaced
                tail = np.arange(hwm, int(self._slot_ids.shape[0]))
                tail = tail[self._slot_ids[tail] >= 0]
                if len(tail):
                    rows = self._raw.read(tail)
                    new_raw.append(rows)
                    index.add(rows)
                    new_slot_ids = np.concatenate([new_slot_ids, self._slot_ids[tail]])
                old_raw = self._raw
                self._raw, self._raw_gen = new_raw, raw_gen
                self._index, self._plan = index, plan
                self._slot_ids = new_slot_ids
                self._live_bits = None
                self._rebuild_key_map()
                self._index_file, self._index_file_slots = index_name, n
                self._built_at = time.time()
                record.update(
                    ok=True,
                    seconds=round(time.time() - t0, 1),
                    vectors=int(self._keys.shape[0]),
                    index_type=plan.kind,
                )
                self._last_rebuild = record
                new_raw = None
                self._dirty = True
                self.save()
                old_raw.close()
        except Exception as exc:  # the live index stays; the error is shown in info
            record.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._last_rebuild = record
            if new_raw is not None:  # drop the unfinished rebuild's files
                new_raw.close()
                for stray in (new_raw.path, self.directory / f"index-r{raw_gen}.faiss"):
                    stray.unlink(missing_ok=True)

    def _tune(self, index: faiss.Index, plan: IndexPlan, raw: RawVectors, n: int, rng) -> IndexPlan:
        """nprobe from Recall@10 of TUNE_QUERIES catalog vectors against exact search."""
        qslots = np.sort(rng.choice(n, min(n, TUNE_QUERIES), replace=False))
        queries = raw.read(qslots)
        best_s = np.full((len(qslots), 11), -np.inf, dtype=np.float32)
        best_l = np.full((len(qslots), 11), -1, dtype=np.int64)
        for lo in range(0, n, 50_000):
            rows = raw.read_range(lo, min(n, lo + 50_000))
            s, lab = exact_topk(queries, rows, np.arange(lo, lo + len(rows)), 11)
            all_s = np.concatenate([best_s, s], axis=1)
            alll = np.concatenate([best_l, lab], axis=1)
            order = np.argsort(-all_s, axis=1, kind="stable")[:, :11]
            best_s = np.take_along_axis(all_s, order, 1)
            best_l = np.take_along_axis(alll, order, 1)
        return tune_nprobe(
            index,
            plan,
            queries,
            best_l,
            10,
            exclude=qslots,
            rescore=lambda qs, cand, k: self._rescore_from_log(qs, cand, k, raw)[1],
        )

    # ---------------------------------------------------------------- reads

    def ids(self) -> np.ndarray:
        with self._lock:
            return self._keys.copy()

    def __len__(self) -> int:
        return int(self._keys.shape[0])

    def __contains__(self, image_id: object) -> bool:
        with self._lock:
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
        """Top-k by inner product; see VectorStore.search. A filter that passes few
        vectors (<= 5% of the catalog or a few ms of exact work) is searched exactly over
        those vectors; a broader one inside the index with an id selector."""
        q = _as_vectors(queries, self.dim)
        k = int(k)
        if k <= 0:
            raise UsageError("k must be positive")
        _set_threads(q.shape[0])
        with self._lock:
            if allowed_ids is not None:
                allowed = np.unique(_as_ids(allowed_ids))
                _, slots = self._live_slots_of(allowed)
                return self._search_subset(q, k, np.sort(slots))
            return self._search_all(q, k)

    def _search_all(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._keys.shape[0] == 0:
            return _empty_result(q.shape[0], k)
        sel = None
        bitmap = None
        if self._keys.shape[0] != self._slot_ids.shape[0]:  # tombstones: exclude them
            if self._live_bits is None:
                self._live_bits = np.packbits(self._slot_ids >= 0, bitorder="little")
            bitmap = self._live_bits
            sel = faiss.IDSelectorBitmap(bitmap.shape[0], faiss.swig_ptr(bitmap))
        params = search_parameters(self._plan, sel)
        scores, labels = self._search_index(q, k, params)
        del bitmap
        return self._labels_to_ids(scores, labels)

    def _search_index(
        self, q: np.ndarray, k: int, params: faiss.SearchParameters | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The live index's top-k slots; kinds without an in-RAM re-rank copy fetch
        k_factor x k candidates and re-score them exactly from the log, and LOG_RESCORED
        kinds re-score their re-ranked best few the same way."""
        if self._plan.kind in LOG_RESCORED:
            _, cand = self._index.search(q, k * LOG_RESCORED[self._plan.kind], params=params)
            return self._rescore_from_log(q, cand, k, self._raw)
        if self._plan.kind not in DISK_RERANKED:
            return self._index.search(q, k, params=params)
        depth = k * int(self._plan.params.get("k_factor", 10))
        _, cand = self._index.search(q, depth, params=params)
        return self._rescore_from_log(q, cand, k, self._raw)

    @staticmethod
    def _rescore_from_log(
        q: np.ndarray, cand: np.ndarray, k: int, raw: RawVectors
    ) -> tuple[np.ndarray, np.ndarray]:
        scores, out = _empty_result(q.shape[0], k)
        for qi in range(q.shape[0]):
            c = np.unique(cand[qi][cand[qi] >= 0])
            s, lab = exact_topk(q[qi : qi + 1], raw.read(c), c, k)
            scores[qi], out[qi] = s[0], lab[0]
        return scores, out

    def _search_subset(
        self, q: np.ndarray, k: int, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n_allowed = slots.shape[0]
        if n_allowed == 0:
            return _empty_result(q.shape[0], k)
        selective = (
            self._plan.exact
            or n_allowed <= SELECTIVE_FRACTION * self._keys.shape[0]
            or n_allowed * self.dim <= SELECTIVE_WORK
        )
        bitmap = np.zeros(self._slot_ids.shape[0], dtype=bool)
        bitmap[slots] = True
        bits = np.packbits(bitmap, bitorder="little")
        sel = faiss.IDSelectorBitmap(bits.shape[0], faiss.swig_ptr(bits))
        if selective:
            return self._search_selective(q, k, slots, sel)
        # fewer candidates pass in each probed list: probe more lists
        frac = n_allowed / max(1, self._keys.shape[0])
        params = search_parameters(self._plan, sel, nprobe_scale=min(4.0, 1 / np.sqrt(frac)))
        scores, labels = self._search_index(q, k, params)
        del bits
        return self._labels_to_ids(scores, labels)

    def _search_selective(
        self, q: np.ndarray, k: int, slots: np.ndarray, sel: faiss.IDSelector
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over the allowed slots. Exact index: its float32 vectors. Refined
        indexes: the in-RAM scalar-quantised copy scans only the allowed vectors (no
        list routing, so nothing is missed), then the best candidates are re-scored
        exactly from the log. Otherwise: all allowed vectors from the log."""
        if self._plan.exact:
            return self._labels_to_ids(
                *exact_topk(q, self._index.reconstruct_batch(slots), slots, k)
            )
        if not isinstance(self._index, faiss.IndexRefine):
            return self._labels_to_ids(*exact_topk(q, self._raw.read(slots), slots, k))
        refine = faiss.downcast_index(self._index.refine_index)
        depth = min(len(slots), max(4 * k, k + 32))
        params = faiss.SearchParameters()
        params.sel = sel
        _, cand = refine.search(q, depth, params=params)
        scores, out = _empty_result(q.shape[0], k)
        for qi in range(q.shape[0]):
            c = cand[qi][cand[qi] >= 0]
            s, lab = exact_topk(q[qi : qi + 1], self._raw.read(np.sort(c)), np.sort(c), k)
            scores[qi], out[qi] = s[0], lab[0]
        return self._labels_to_ids(scores, out)

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

    def _current_reason(self, n: int) -> str:
        """Why the live index fits the catalog as it is now (the plan's own reason was
        written when it was built); plus the tuning measured at build time."""
        now = self._choose(n, self._plan)
        reason = now.reason if now.kind == self._plan.kind else self._plan.reason
        p = self._plan.params
        if "nprobe" in p:
            reason += (
                f"; built for {p.get('trained_for', 0):,} vectors, nprobe {p['nprobe']} of "
                f"{p['nlist']} lists (re-rank {p.get('k_factor', 1)}x) measured Recall@10 "
                f"{p.get('tuned_recall_at_10', 0):.3f} against exact search on "
                f"{p.get('tuned_queries', 0)} catalog queries"
            )
        return reason

    def describe(self) -> dict:
        with self._lock:
            n = int(self._keys.shape[0])
            slots = int(self._slot_ids.shape[0])
            bpv = float(self._plan.params.get("bytes_per_vector", self.dim * 4))
            return {
                "backend": "faiss",
                "path": str(self.directory),
                "dim": self.dim,
                "stamp": self.stamp,
                "vectors": n,
                "tombstones": slots - n,
                "index_type": self._plan.kind,
                "index_reason": self._current_reason(n),
                "index_params": dict(self._plan.params),
                "index_memory_bytes": int(slots * bpv),
                "memory_budget_bytes": self.memory_budget_bytes,
                "rebuilding": self.rebuilding,
                "pending_rebuild": None if self.rebuilding else self.rebuild_reason(),
                "last_rebuild": self._last_rebuild,
            }
