"""The home's writer lock: one process writes a home at a time (catalog transaction plus
the vector store's files), whatever else reads it.

A real file lock (`fcntl.flock` on `<home>/writer.lock`): the kernel drops it when its
process dies, kill -9 included, so a crashed writer never leaves the home locked. Within
one process the lock is re-entrant for the thread that holds it and other threads wait
for it, so an Engine's threads and another process's writers all take turns. A writer
that has waited a moment is told who holds the lock (`on_wait`); after `timeout` seconds
it gets a BusyError naming the holder instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import BusyError

LOCK_FILE = "writer.lock"
DEFAULT_TIMEOUT = 120.0  # seconds a writer waits; LOOKALIKE_LOCK_TIMEOUT overrides
WAIT_MESSAGE_AFTER = 1.0  # seconds of waiting before on_wait is called
POLL = 0.05


def lock_timeout() -> float:
    """The writer lock timeout: $LOOKALIKE_LOCK_TIMEOUT seconds, else DEFAULT_TIMEOUT."""
    text = os.environ.get("LOOKALIKE_LOCK_TIMEOUT", "").strip()
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return value if value >= 0 and value == value else DEFAULT_TIMEOUT


class HomeLock:
    """The writer lock of one home folder (see module doc)."""

    def __init__(
        self,
        home: str | os.PathLike,
        *,
        timeout: float | None = None,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(home) / LOCK_FILE
        self.timeout = lock_timeout() if timeout is None else float(timeout)
        self.on_wait = on_wait
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (in any thread)."""
        return self._fd is not None

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it: 'pid N (command) for S s'."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return "another process"
        if not info:
            return "another process"
        since = time.time() - float(info.get("since", time.time()))
        return f"pid {info.get('pid')} ({info.get('command', '?')}) for {since:.0f} s"

    def acquire(self, timeout: float | None = None) -> bool:
        """Take the lock; wait at most `timeout` seconds (None: the lock's timeout; 0: do
        not wait). False when not taken in time (`hold` raises BusyError instead)."""
        timeout = self.timeout if timeout is None else float(timeout)
        deadline = time.monotonic() + timeout
        taken = (
            self._thread_lock.acquire(timeout=timeout)
            if timeout > 0
            else self._thread_lock.acquire(blocking=False)
        )
        if not taken:
            return False
        if self._depth > 0:  # this thread holds it already
            self._depth += 1
            return True
        try:
            if self._flock(deadline):
                self._depth = 1
                return True
        except BaseException:
            self._thread_lock.release()
            raise
        self._thread_lock.release()
        return False

    def _flock(self, deadline: float) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        told = False
        started = time.monotonic()
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if now >= deadline:
                        os.close(fd)
                        return False
                    if not told and self.on_wait and now - started >= WAIT_MESSAGE_AFTER:
                        told = True
                        self.on_wait(
                            f"waiting for the writer lock on {self.path.parent} "
                            f"(held by {self.holder()})"
                        )
                    time.sleep(min(POLL, max(0.0, deadline - now)))
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "command": " ".join(sys.argv[:3]), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return True

    def release(self) -> None:
        if self._depth <= 0:
            raise RuntimeError("release of a writer lock that is not held")
        self._depth -= 1
        if self._depth == 0:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._thread_lock.release()

    @contextlib.contextmanager
    def hold(self, timeout: float | None = None) -> Iterator[None]:
        """`with lock.hold():` the lock, or BusyError after the timeout."""
        wait = self.timeout if timeout is None else timeout
        if not self.acquire(wait):
            raise BusyError(
                f"{self.path.parent} is being written by {self.holder()}; gave up after "
                f"{wait:.0f} s (set LOOKALIKE_LOCK_TIMEOUT to wait longer)"
            )
        try:
            yield
        finally:
            self.release()
