"""The home's writer lock with real processes: a second writer waits, is told who holds
the lock, and gets a BusyError after its timeout; a killed holder frees the lock at once;
writers in several processes never interleave."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT
from live import env

from lookalike.errors import BusyError
from lookalike.locks import HomeLock


def holder(home: Path) -> subprocess.Popen:
    """A process that takes the lock, says so, and keeps it until killed."""
    code = textwrap.dedent(f"""
        import time
        from lookalike.locks import HomeLock
        lock = HomeLock({str(home)!r})
        lock.acquire()
        print("held", flush=True)
        time.sleep(600)
        """)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env(), cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_waits_is_told_and_gives_up_cleanly(tmp_path: Path) -> None:
    proc = holder(tmp_path)
    try:
        told: list[str] = []
        lock = HomeLock(tmp_path, on_wait=told.append)
        started = time.monotonic()
        assert lock.acquire(timeout=0) is False
        assert lock.acquire(timeout=1.5) is False
        assert 1.4 < time.monotonic() - started < 5
        assert len(told) == 1 and f"pid {proc.pid}" in told[0] and str(tmp_path) in told[0]
        with pytest.raises(BusyError) as caught:
            with lock.hold(timeout=0.2):
                pytest.fail("the lock was taken while another process held it")
        assert f"pid {proc.pid}" in str(caught.value) and "LOOKALIKE_LOCK_TIMEOUT" in str(
            caught.value
        )
        assert not lock.held
        os.kill(proc.pid, signal.SIGKILL)  # kill -9: the kernel drops the lock
        proc.wait()
        started = time.monotonic()
        with lock.hold(timeout=5):
            assert lock.held
        assert time.monotonic() - started < 1.0
    finally:
        proc.kill()
        proc.wait()


def test_writers_in_several_processes_never_interleave(tmp_path: Path) -> None:
    log = tmp_path / "log.txt"
    code = textwrap.dedent(f"""
        import os, time
        from lookalike.locks import HomeLock
        lock = HomeLock({str(tmp_path)!r})
        for i in range(15):
            with lock.hold():
                with open({str(log)!r}, "a") as fh:
                    fh.write(f"start {{os.getpid()}}\\n"); fh.flush()
                    time.sleep(0.01)
                    fh.write(f"end {{os.getpid()}}\\n")
        """)
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env(), cwd=ROOT) for _ in range(4)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0
    lines = log.read_text().splitlines()
    assert len(lines) == 4 * 15 * 2
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start.startswith("start ") and end == "end " + start.split()[1]


def test_reentrant_in_a_thread_exclusive_between_threads(tmp_path: Path) -> None:
    lock = HomeLock(tmp_path)
    order: list[str] = []
    with lock.hold():
        with lock.hold():  # the same thread again: no deadlock
            order.append("outer")

        def other() -> None:
            with lock.hold():
                order.append("other")

        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.3)
        order.append("still outer")  # the other thread is still waiting
    thread.join(5)
    assert order == ["outer", "still outer", "other"]
    assert not lock.held
