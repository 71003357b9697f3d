"""One home shared by several processes: how an Engine writes under the home's writer
lock and follows what other processes wrote (a mixin of `lookalike.engine.Engine`).

Every write holds the home's writer lock (`writing`), in which the store first catches
up with other processes' saves and is saved before the lock goes, the catalog's clean
mark (CLEAN_KEY) set to the store's signature. A clean mark that is not the store's (a
writer died mid-write, or the store was changed behind the catalog's back) makes the
next opener compare every stored vector with the catalog's and repair it. A reader
(`serve`) follows other processes' writes at its next search, at most FOLLOW_EVERY
seconds late, and never waits for a writer to do so.

Lock order, everywhere: the home's lock, then the engine's `_lock`, then the store's and
the catalog's own.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import CatalogMismatchError, LookalikeError, StorageError
from .repair import sync_store
from .vectors.base import VectorStore

CLEAN_KEY = "store_clean"  # the store's signature after the last finished write; "" in one
FOLLOW_EVERY = 1.0  # seconds between looks for other processes' writes (serve)


class SharedHome:
    """The multi-process half of an Engine. Expects from it: home_lock (a HomeLock),
    _lock, _store, _write_depth, _entry_mark, _next_follow, catalog, encoder,
    vector_store_uri, _open_store(), _check_model_matches(), _refresh_payload()."""

    home_lock: Any
    _store: Any

    def _open_checked(self) -> None:
        with self._lock:
            if self._store is not None:
                return
            self._check_model_matches()
            try:
                store = self._open_store()
            except CatalogMismatchError:
                store = None  # rebuilt from the catalog below, under the lock
            if store is not None and self._agrees(store):
                self._store = store
                return
        # a repair writes: the home's lock first, then ours (the lock order). A reader
        # does not wait for a writer at work: it reads that writer's last save, and
        # follows the rest (_follow_other_writers).
        with contextlib.ExitStack() as held:
            if store is None:
                held.enter_context(self.home_lock.hold())  # a store to rebuild: wait
            elif self.home_lock.acquire(timeout=0):
                held.callback(self.home_lock.release)
            else:
                with self._lock:
                    if self._store is None:
                        self._store = store
                return
            with self._lock:
                if self._store is not None:
                    return
                if store is None:
                    # the store lags behind the catalog (e.g. killed during a model
                    # switch): the catalog is the truth, rebuild the store from it
                    store = self._open_store(reset=True)
                elif hasattr(store, "refresh"):
                    store.refresh()
                self._store = store
                self._repair()

    def _token(self, store: VectorStore) -> str:
        """What the clean mark holds for this store: the FAISS sidecar's signature; for
        Milvus, which keeps its own files, the store's URI."""
        signature = getattr(store, "signature", None)
        if isinstance(signature, str):
            return signature
        return f"{getattr(store, 'backend', 'store')}:{self.vector_store_uri}"

    def _is_clean(self, store: VectorStore) -> bool:
        """Whether the last finished write left this store (inside a write of ours: as
        the mark was when it began, since the write itself clears it)."""
        mark = self._entry_mark if self._write_depth else self.catalog.get_meta(CLEAN_KEY)
        return mark == self._token(store)

    def _agrees(self, store: VectorStore) -> bool:
        """Whether a freshly opened store needs no repair: the last writer finished, the
        ids are the catalog's, no filter payload is pending."""
        if not self._is_clean(store) or self.catalog.get_meta("payload_dirty"):
            return False
        want = self.catalog.embedded_ids(self.encoder.stamp)
        return np.array_equal(np.sort(store.ids()), np.sort(want))

    def _repair(self) -> dict[str, int]:
        """Under the home lock: make the store the catalog's (every vector compared when
        the last writer did not finish), then mark it clean."""
        store = self._store
        report = sync_store(
            self.catalog, store, self.encoder.stamp, verify=not self._is_clean(store)
        )
        if self.catalog.get_meta("payload_dirty"):
            self._refresh_payload()
        store.save()
        self._entry_mark = self._token(store)
        if not self._write_depth:
            self.catalog.set_meta(CLEAN_KEY, self._entry_mark)
        return report

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the home's writer lock around a write (waiting for another process's
        write to finish, BusyError after the lock's timeout). Inside it the store has
        caught up with other processes' saves; it is saved before the lock goes."""
        with self.home_lock.hold(), self._lock:
            outer = self._write_depth == 0
            self._write_depth += 1
            try:
                if outer:
                    self._entry_mark = self.catalog.get_meta(CLEAN_KEY)
                    store = self._store
                    if store is not None:
                        if hasattr(store, "refresh"):
                            store.refresh()
                        if not self._is_clean(store):
                            self._repair()
                    self.catalog.set_meta(CLEAN_KEY, "")
                try:
                    yield
                except LookalikeError as exc:
                    # a refused write (unknown id, existing product) changed nothing: the
                    # mark goes back, so the next opener does not check every vector
                    store = self._store
                    if outer and store is not None and not isinstance(exc, StorageError):
                        if not getattr(store, "dirty", True):
                            self.catalog.set_meta(CLEAN_KEY, self._token(store))
                    raise
                if outer and self._store is not None:
                    if hasattr(self._store, "refresh"):  # FAISS: its files, under the lock
                        self._store.save()  # (Milvus persists by itself; flushed at the end)
                    self.catalog.set_meta(CLEAN_KEY, self._token(self._store))
            finally:
                self._write_depth -= 1

    def _follow_other_writers(self) -> None:
        """A reader (`serve`) picks up what other processes wrote: at most every
        FOLLOW_EVERY seconds, when the store on disk is newer than the one in memory or
        the last writer did not finish, and only when no one is writing right now (a
        writer holds the lock for one batch at a time)."""
        store = self._store
        now = time.monotonic()
        if store is None or now < self._next_follow or self._write_depth:
            return
        self._next_follow = now + FOLLOW_EVERY
        stale = hasattr(store, "stale") and store.stale()
        if not stale and self._is_clean(store):
            return
        if not self.home_lock.acquire(timeout=0):
            return  # a writer is at work: look again next time
        try:
            with self._lock:
                if self._store is store:
                    if hasattr(store, "refresh"):
                        store.refresh()
                    if not self._is_clean(store):
                        self._repair()
        except (CatalogMismatchError, OSError):
            pass  # a model switch under way (followed by _follow_catalog_model) or a file
            # that went with a newer save: the search goes on with what is loaded
        finally:
            self.home_lock.release()
