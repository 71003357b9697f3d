"""Every error a user can cause on the command line is one `lookalike:` line on stderr
with its documented exit status, never a traceback. Each case runs the real CLI in a new
process, as a user would."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, fashion_products, missing, require_data
from live import check_home, lookalike

from lookalike.errors import BusyError, InputPathError, MetadataError, StorageError, UsageError


def one_line(proc: subprocess.CompletedProcess, status: int) -> str:
    """The single stderr line of a failed run with this exit status."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("lookalike: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("budget", ["1e400", "nan", "inf", "-2G", "0", "lots"])
def test_a_memory_budget_that_is_no_size(tmp_path: Path, budget: str) -> None:
    got = lookalike("--home", str(tmp_path / "h"), f"--memory-budget={budget}", "info")
    assert "memory budget" in one_line(got, UsageError.exit_code)


def test_a_csv_field_over_the_csv_limit_names_file_and_line(tmp_path: Path) -> None:
    meta = tmp_path / "products.csv"
    rows = fashion_products(meta, 3)
    with meta.open("a", newline="") as fh:
        fh.write(f'x1,{rows[0]["image"]},"{"a" * 140_000}",Heels\n')
    got = lookalike("--home", str(tmp_path / "h"), "index", "--metadata", str(meta))
    line = one_line(got, MetadataError.exit_code)
    assert f"{meta}:5:" in line and "131072" in line


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A small real home (6 footwear images), made by `lookalike index`."""
    folder = tmp_path_factory.mktemp("shop")
    for path in sorted(require_data("footwear300", "data").glob("*.jpg"))[:6]:
        shutil.copy(path, folder / path.name)
    home = tmp_path_factory.mktemp("cli") / "home"
    done = lookalike("--home", str(home), "index", str(folder))
    assert done.returncode == 0, done.stderr
    return home


def query() -> str:
    return str(require_data("footwear300", "search_image_01.jpg"))


@pytest.mark.parametrize("command", [["info"], ["search", "Q"], ["index", "Q"], ["serve"]])
def test_a_home_that_is_a_file(command: list[str]) -> None:
    args = [query() if a == "Q" else a for a in command]
    got = lookalike("--home", "/etc/passwd", *args)
    assert "is a file, not a folder" in one_line(got, InputPathError.exit_code)


def test_a_catalog_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "catalog.sqlite").write_bytes(b"not a database at all\n" * 50)
    for args in (["info"], ["search", query()], ["index", query()]):
        got = lookalike("--home", str(tmp_path), *args)
        assert "not a usable lookalike catalog" in one_line(got, InputPathError.exit_code)


def test_a_mistyped_home_is_refused_not_created(tmp_path: Path, home: Path) -> None:
    typo = tmp_path / "hmoe"
    commands = (["info"], ["search", query()], ["remove", "x"], ["eval", "--leave-one-out"])
    for args in commands:
        got = lookalike("--home", str(typo), *args)
        assert "no lookalike home at" in one_line(got, InputPathError.exit_code), args
        assert not typo.exists()
    assert lookalike("--home", str(home), "info").returncode == 0  # a real home still opens


def test_an_unknown_vector_store_is_an_error(tmp_path: Path, home: Path) -> None:
    for where, command in ((home, ["info"]), (tmp_path / "new", ["index", query()])):
        got = lookalike("--home", str(where), "--vector-store", "bogus", *command)
        assert "unknown vector store 'bogus'" in one_line(got, UsageError.exit_code)


def test_serve_on_a_port_it_cannot_have(home: Path) -> None:
    for port in ("99999", "0", "-1"):
        got = lookalike("--home", str(home), "serve", f"--port={port}")
        assert "--port must be 1-65535" in one_line(got, UsageError.exit_code)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        got = lookalike("--home", str(home), "serve", "--port", str(port), timeout=120)
        assert "cannot listen on" in one_line(got, UsageError.exit_code)


def test_a_second_writer_past_the_lock_timeout(home: Path) -> None:
    from lookalike.locks import HomeLock

    lock = HomeLock(home)
    code = f"from lookalike.locks import HomeLock; HomeLock({str(home)!r}).acquire(); input()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while lock.acquire(timeout=0):  # until the holder has it
            lock.release()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        got = lookalike("--home", str(home), "remove", "footwear_0001", timeout=120,
                        env_extra={"LOOKALIKE_LOCK_TIMEOUT": "2"})  # fmt: skip
        lines = got.stderr.strip().splitlines()
        assert got.returncode == BusyError.exit_code, got.stderr
        assert lines[0].startswith("lookalike: waiting for the writer lock"), got.stderr
        assert f"pid {holder.pid}" in lines[-1] and "LOOKALIKE_LOCK_TIMEOUT" in lines[-1]
        assert len(lines) == 2 and "Traceback" not in got.stderr
    finally:
        holder.kill()
        holder.wait()


@contextlib.contextmanager
def small_disk(folder: Path, size: str) -> Iterator[Callable[[str], None]]:
    """A real small file system at `folder` (a tmpfs of `size`; root can mount one), and
    a function that resizes it. Missing mount rights are a missing prerequisite."""
    folder.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)  # fmt: skip
    if made.returncode != 0:
        missing(f"cannot mount a small tmpfs here: {made.stderr.strip()}")

    def resize(new: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new}", str(folder)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_index_on_a_full_disk_is_one_line_and_resumes(tmp_path: Path) -> None:
    shop = tmp_path / "shop"
    shop.mkdir()
    for path in sorted(require_data("footwear300", "data").glob("*.jpg"))[:80]:
        shutil.copy(path, shop / path.name)
    with small_disk(tmp_path / "disk", "600k") as resize:
        home = tmp_path / "disk" / "home"
        got = lookalike("--home", str(home), "index", str(shop))
        line = one_line(got, StorageError.exit_code)
        assert "No space left on device" in line or "disk is full" in line, line
        resize("50m")
        again = lookalike("--home", str(home), "index", str(shop))
        assert again.returncode == 0, again.stderr
        report = check_home(home, {p.stem for p in shop.glob("*.jpg")})
        assert report["images"] == 80 and report["mismatched"] == 0
        assert report["min_cosine"] > 0.9999
