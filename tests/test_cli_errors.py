"""Every error a user can cause on the command line is one `lookalike:` line on stderr
with its documented exit status, never a traceback. Each case runs the real CLI in a new
process, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, fashion_products

from lookalike.errors import MetadataError, UsageError


def lookalike(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "lookalike", "-q", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        **kw,
    )


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
