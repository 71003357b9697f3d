"""Shared fixtures: where the real data is, and one model cache for the whole session
(the ONNX export happens once per test run, not once per test).

In CI (the `CI` environment variable set, as `.ci/run` has it) a test that would be
skipped fails instead: missing data, a missing dependency, HEIC support or a Milvus server
that does not start are defects of the machine's setup there, not reasons to pass. Only a
skip whose reason starts with PLATFORM_SKIP (`platform_skip`: the test cannot run on this
kind of machine at all) stays a skip in CI."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / "../shared/data").resolve()


PLATFORM_SKIP = "not on this platform:"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(reason: str) -> NoReturn:
    """Stop a test that lacks a prerequisite (data, a dependency, a service): a skip on a
    developer's machine, a failure in CI."""
    if in_ci():
        pytest.fail(f"{reason} (CI is set: a missing prerequisite is a failure)", pytrace=False)
    pytest.skip(reason)


def platform_skip(reason: str) -> NoReturn:
    """Skip a test that cannot run on this kind of machine (also in CI)."""
    pytest.skip(f"{PLATFORM_SKIP} {reason}")


def require_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        missing(f"real data not found: {path}")
    return path


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _fail_skip_in_ci(report: pytest.TestReport | pytest.CollectReport) -> None:
    """Turn a skip (pytest.skip, skipif, importorskip, at collection or in a test) into
    a failure when CI is set, unless it is a platform skip or an expected failure."""
    if not (in_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if reason.removeprefix("Skipped: ").startswith(PLATFORM_SKIP):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped in CI, which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    _fail_skip_in_ci(outcome.get_result())


@pytest.fixture(scope="session", autouse=True)
def shared_model_cache(tmp_path_factory) -> Path:
    """Every Engine in the tests exports/loads its ONNX models from one folder."""
    cache = Path(os.environ.get("LOOKALIKE_TEST_MODELS") or tmp_path_factory.mktemp("models"))
    old = os.environ.get("LOOKALIKE_MODELS")
    os.environ["LOOKALIKE_MODELS"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("LOOKALIKE_MODELS", None)
    else:
        os.environ["LOOKALIKE_MODELS"] = old


def fashion_products(path: Path, n: int, **columns: Callable[[int], object]) -> list[dict]:
    """Write the first n fashion-footwear products as a metadata CSV at `path` (image
    paths made absolute), with extra columns computed from the row number, e.g.
    `price=lambda i: 10 + i`. Returns the rows written."""
    folder = require_data("fashion-footwear")
    with open(folder / "catalog.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:n]
    for i, row in enumerate(rows):
        row["image"] = str(folder / row["image"])
        row.update({name: make(i) for name, make in columns.items()})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows
