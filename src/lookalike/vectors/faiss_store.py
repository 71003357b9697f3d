"""The embedded vector store: FAISS in this process, persisted under `<home>/vectors/`.

The files and how each is written safely: store_files.py. Which index, and why:
planning.py; building, tuning and searching it: faiss_index.py.

Slots: each added vector gets the next slot number and the FAISS index labels it with
that slot (sequential labels, so every index type works, refinement included). An
update gives the id a new slot and tombstones the old one; a remove tombstones. Searches
exclude tombstones inside FAISS with an id selector, so a removed product can never come
back, on every index type. A rebuild (in a background thread) compacts the slots,
retrains the index chosen for the catalog's size and memory budget, and swaps it in; the
old index keeps answering until then, and a crash leaves the last saved generation.

Several processes: the files are written only under `guard` (the home's writer lock,
given by the engine), and a store never saves over a save it has not seen (`stale`,
from the sidecar's signature): it `refresh`es first, following another process's saves
in place (the log's new rows are added to the live index; a rebuild there means a full
reload). A background rebuild whose base another process changed meanwhile is dropped.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lookalike.errors import CatalogMismatchError, UsageError
from lookalike.vectors.faiss_index import (
    ROW_CHUNK,
    add_rows,
    build_threads,
    empty_result,
    new_index,
    search_index,
    search_parameters,
    search_rows_exactly,
    set_threads,
    train_index,
    tune_on_catalog,
)
from lookalike.vectors.planning import EXACT_WORK, IndexPlan, choose_index
from lookalike.vectors.store_files import (
    FORMAT,
    RawVectors,
    index_path,
    raw_path,
    read_sidecar_signed,
    read_slots,
    remove_stale,
    sidecar_signature,
    wipe,
    write_index_file,
    write_sidecar,
    write_slots,
)

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


# --------------------------------------------------------------------------- the store

SELECTIVE_FRACTION = 0.05  # filters passing <= 5% of the catalog are searched exactly
SELECTIVE_WORK = 4 * EXACT_WORK  # ... and so are filters passing <= 50k 1280-d vectors
COMPACT_FRACTION = 0.25  # rebuild (compact) when a quarter of the slots are tombstones
RETRAIN_GROWTH = 2.0  # retrain (and re-tune) an approximate index when the catalog doubled
INDEX_FILE_TAIL = 0.2  # rewrite the index file when 20% of slots are only in the log


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
        guard: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        """Open or create the store in `directory`. `background=False` runs rebuilds in
        the calling thread (benchmarks, tests); otherwise they run in a worker thread.
        `exact_limit` overrides how many vectors are searched exactly (tests, tuning).
        `guard()` is held around every write of the store's files (the home's lock)."""
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
        self._guard = guard or contextlib.nullcontext
        self._sig: str | None = None  # the sidecar's signature as this store last saw it
        self._epoch = 0  # full reloads from another process's save (a rebuild checks it)
        if self.dim <= 0:
            raise UsageError(f"vector dimension must be positive, got {dim}")
        self.directory.mkdir(parents=True, exist_ok=True)
        meta, self._sig = read_sidecar_signed(self.directory)
        if meta is not None and (meta["stamp"] != self.stamp or meta["dim"] != self.dim):
            if not reset:
                raise CatalogMismatchError(
                    f"the vector store in {self.directory} was made with model stamp "
                    f"{meta['stamp']!r} ({meta['dim']}-d); this model is {self.stamp!r} "
                    f"({self.dim}-d). Re-index with --reset to replace it."
                )
        if reset:
            with self._guard():
                wipe(self.directory)
            meta, self._sig = None, None
        if meta is None:
            self._init_empty()
        else:
            self._load(meta)

    # ---------------------------------------------------------------- open / persist

    def _init_empty(self) -> None:
        self._generation = 0
        self._raw_gen = 0
        self._raw = RawVectors(raw_path(self.directory, 0), self.dim, 0)
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

    def _load(self, meta: dict) -> None:
        self._generation = int(meta["generation"])
        self._raw_gen = int(meta["raw_generation"])
        slots = int(meta["slots"])
        self._raw = RawVectors(self.directory / meta["raw_file"], self.dim, slots)
        self._slot_ids = read_slots(self.directory, meta)
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
        add_rows(self._index, self._raw, self._index_file_slots, slots)
        self._dirty = False

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
        if not self._dirty:
            return  # without the guard: a read-only process never waits for the lock
        with self._guard(), self._lock:
            if not self._dirty:
                return
            if self.stale():
                raise CatalogMismatchError(
                    f"the vector store in {self.directory} was saved by another process "
                    "since this one read it: refresh() before writing"
                )
            self._raw.flush()
            gen = self._generation + 1
            slots_name = write_slots(self.directory, gen, self._slot_ids)
            n_slots = int(self._slot_ids.shape[0])
            if self._plan.exact:
                self._index_file, self._index_file_slots = None, 0
            elif (
                self._index_file is None
                or n_slots - self._index_file_slots > INDEX_FILE_TAIL * n_slots
            ):
                self._index_file = write_index_file(self.directory, self._index, gen)
                self._index_file_slots = int(self._index.ntotal)
            self._write_sidecar(gen, slots_name)

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
        write_sidecar(self.directory, meta)
        self._sig = sidecar_signature(self.directory)
        self._generation = gen
        self._dirty = False
        remove_stale(self.directory, meta, self.rebuilding)

    # ---------------------------------------------------------------- other processes

    @property
    def dirty(self) -> bool:
        """Whether this store holds changes it has not saved."""
        return self._dirty

    @property
    def signature(self) -> str | None:
        """The signature of the save this store holds (None before its first save)."""
        return self._sig

    def stale(self) -> bool:
        """Whether another process saved the store since this one read or saved it."""
        return self._sig is not None and sidecar_signature(self.directory) != self._sig

    def refresh(self) -> bool:
        """Follow another process's save: its new log rows are added to the live index
        (its tombstones and replacements come with its slot map); a rebuild there, or a
        different index file, means a full reload. Unsaved changes here are dropped (the
        catalog has them: the engine syncs after this). True when anything changed."""
        if not self.stale():
            return False
        # no waiting for a rebuild of ours here (its swap needs the lock our caller holds):
        # a full reload below makes it drop its work (the epoch changes)
        with self._lock:
            meta, sig = read_sidecar_signed(self.directory)
            if meta is None or sig == self._sig:
                return False
            if meta["stamp"] != self.stamp or meta["dim"] != self.dim:
                raise CatalogMismatchError(
                    f"the vector store in {self.directory} now holds model stamp "
                    f"{meta['stamp']!r}; this process uses {self.stamp!r}"
                )
            old = int(self._slot_ids.shape[0])
            slots = int(meta["slots"])
            same_base = (
                not self._dirty
                and meta["raw_file"] == self._raw.path.name
                and meta.get("index_file") == self._index_file
                and meta["plan"] == json.loads(json.dumps(self._plan.to_json()))
                and slots >= old
            )
            if same_base:
                self._raw.follow(slots)
                add_rows(self._index, self._raw, old, slots)
                self._slot_ids = read_slots(self.directory, meta)
                self._rebuild_key_map()
                self._generation = int(meta["generation"])
                self._last_rebuild = meta.get("last_rebuild")
            else:
                self._raw.close()
                self._load(meta)
                self._epoch += 1
            self._live_bits = None
            self._sig = sig
            self._dirty = False
            return True

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
            set_threads(len(ids) if len(ids) > 256 else 1)
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
                epoch = self._epoch
                hwm = int(self._slot_ids.shape[0])
                live = np.flatnonzero(self._slot_ids[:hwm] >= 0)
                snap_ids = self._slot_ids[live].copy()
                raw_gen = self._raw_gen + 1
                plan = self._choose(len(live), self._plan)
            self._hook("snapshot")
            # 1. compact the log into a new raw file (live rows only, in slot order)
            new_raw = RawVectors(raw_path(self.directory, raw_gen), self.dim, 0)
            for lo in range(0, len(live), ROW_CHUNK):
                new_raw.append(self._raw.read(live[lo : lo + ROW_CHUNK]))
            new_raw.flush()
            n = len(live)
            # 2. train on a sample, add everything, tune nprobe on catalog queries
            rng = np.random.default_rng(n)
            index = train_index(plan, self.dim, new_raw, n, rng)
            self._hook("trained")
            add_rows(index, new_raw, 0, n)
            if not plan.exact:
                plan = tune_on_catalog(index, plan, new_raw, n, rng)
                plan = plan.with_params(trained_for=n)
            self._hook("built")
            index_name = None
            if not plan.exact:
                index_name = write_index_file(self.directory, index, f"r{raw_gen}")
            # 3. catch up with changes made meanwhile, then swap (under the lock)
            with self._guard(), self._lock:
                if self.stale() or self._epoch != epoch:
                    raise CatalogMismatchError(
                        "another process saved the store during the rebuild: dropped"
                    )
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
                for stray in (new_raw.path, index_path(self.directory, f"r{raw_gen}")):
                    stray.unlink(missing_ok=True)

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
        set_threads(q.shape[0])
        with self._lock:
            if allowed_ids is not None:
                allowed = np.unique(_as_ids(allowed_ids))
                _, slots = self._live_slots_of(allowed)
                return self._search_subset(q, k, np.sort(slots))
            return self._search_all(q, k)

    def _search_all(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._keys.shape[0] == 0:
            return empty_result(q.shape[0], k)
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
        return search_index(self._index, self._plan, self._raw, q, k, params)

    def _search_subset(
        self, q: np.ndarray, k: int, slots: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        n_allowed = slots.shape[0]
        if n_allowed == 0:
            return empty_result(q.shape[0], k)
        selective = (
            self._plan.exact
            or n_allowed <= SELECTIVE_FRACTION * self._keys.shape[0]
            or n_allowed * self.dim <= SELECTIVE_WORK
        )
        bitmap = np.zeros(self._slot_ids.shape[0], dtype=bool)
        bitmap[slots] = True
        bits = np.packbits(bitmap, bitorder="little")
        sel = faiss.IDSelectorBitmap(bits.shape[0], faiss.swig_ptr(bits))
        if selective:  # exact over the allowed vectors
            found = search_rows_exactly(self._index, self._plan, self._raw, q, k, slots, sel)
            return self._labels_to_ids(*found)
        # fewer candidates pass in each probed list: probe more lists
        frac = n_allowed / max(1, self._keys.shape[0])
        params = search_parameters(self._plan, sel, nprobe_scale=min(4.0, 1 / np.sqrt(frac)))
        scores, labels = self._search_index(q, k, params)
        del bits
        return self._labels_to_ids(scores, labels)

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
