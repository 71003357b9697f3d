"""The FAISS store's files under `<home>/vectors/` and how each is written safely.

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

What goes in them, and when, is the store's business (faiss_store.py).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import faiss
import numpy as np

from lookalike.errors import CatalogMismatchError

FORMAT = 1
SIDECAR = "store.json"


# --------------------------------------------------------------------------- writing safely


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


# --------------------------------------------------------------------------- the files


def raw_path(directory: Path, gen: int) -> Path:
    return directory / f"raw-{gen}.f32"


def index_path(directory: Path, gen: int | str) -> Path:
    return directory / f"index-{gen}.faiss"


def read_sidecar(directory: Path) -> dict | None:
    """The sidecar's contents, or None when the directory holds no store yet."""
    path = directory / SIDECAR
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CatalogMismatchError(f"unreadable vector store sidecar {path}: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("backend") != "faiss":
        raise CatalogMismatchError(f"{path} is not a lookalike FAISS store (format {FORMAT})")
    return meta


def read_sidecar_signed(directory: Path) -> tuple[dict | None, str | None]:
    """The sidecar and its signature (inode, mtime, size: every save replaces the file,
    so another process's save changes it), read from one open file; (None, None) when
    there is no store yet."""
    path = directory / SIDECAR
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        return None, None
    with fh:
        st = os.fstat(fh.fileno())
        text = fh.read()
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise CatalogMismatchError(f"unreadable vector store sidecar {path}: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("backend") != "faiss":
        raise CatalogMismatchError(f"{path} is not a lookalike FAISS store (format {FORMAT})")
    return meta, f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def sidecar_signature(directory: Path) -> str | None:
    """The sidecar's signature now (see read_sidecar_signed), None without a sidecar."""
    try:
        st = os.stat(directory / SIDECAR)
    except FileNotFoundError:
        return None
    return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"


def write_sidecar(directory: Path, meta: dict) -> None:
    """Replace the sidecar atomically (and durably): this commits a save."""
    _write_atomic(directory / SIDECAR, json.dumps(meta, indent=1).encode())
    _fsync_dir(directory)


def read_slots(directory: Path, meta: dict) -> np.ndarray:
    """The slot -> image id map the sidecar names, checked against its slot count."""
    slots = int(meta["slots"])
    slot_ids = np.load(directory / meta["slots_file"])
    if slot_ids.shape != (slots,):
        raise CatalogMismatchError(f"{meta['slots_file']} does not match {SIDECAR}")
    return slot_ids.astype(np.int64)


def write_slots(directory: Path, gen: int, slot_ids: np.ndarray) -> str:
    """Write generation `gen`'s slot map (fsynced); returns its file name."""
    name = f"slots-{gen}.npy"
    tmp = directory / (name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, slot_ids)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, directory / name)
    return name


def write_index_file(directory: Path, index: faiss.Index, gen: int | str) -> str:
    """Write the index as generation `gen` (fsynced); returns its file name."""
    path = index_path(directory, gen)
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.name


def remove_stale(directory: Path, meta: dict, rebuilding: bool) -> None:
    """Delete files the sidecar `meta` no longer names; while a rebuild runs, its
    raw-/index- files in progress are left alone."""
    keep = {SIDECAR, meta["raw_file"], meta["slots_file"]}
    if meta["index_file"]:
        keep.add(meta["index_file"])
    for child in directory.iterdir():
        if child.name in keep or child.is_dir():
            continue
        if rebuilding and child.name.startswith(("raw-", "index-")):
            continue  # the rebuild worker's files in progress
        try:
            child.unlink()
        except OSError:
            pass


def wipe(directory: Path) -> None:
    """Delete everything in the store's directory (a reset)."""
    for child in directory.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


# --------------------------------------------------------------------------- the log


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

    def follow(self, rows: int) -> None:
        """Another process saved `rows` rows into this file: take them as saved."""
        with self._lock:
            size = os.fstat(self._fh.fileno()).st_size
            if size < rows * self.row_bytes:
                raise CatalogMismatchError(
                    f"{self.path} holds {size // self.row_bytes} vectors, the sidecar says {rows}"
                )
            self._truncate_first = size > rows * self.row_bytes
            self.rows = rows

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
