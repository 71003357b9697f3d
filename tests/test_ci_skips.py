"""In CI a skip is a failure: tests/conftest.py turns missing data, missing dependencies
and every other skip into failures when the `CI` environment variable is set, except a
platform skip. Checked by running pytest on small test files with and without CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from conftest import ROOT

TESTS = textwrap.dedent(
    """
    import pytest
    from conftest import platform_skip, require_data

    def test_missing_data():
        require_data("no-such-data-set")

    def test_plain_skip():
        pytest.skip("not today")

    @pytest.mark.skipif(True, reason="pillow-heif is not installed")
    def test_skipif_marker():
        pass

    def test_missing_dependency():
        pytest.importorskip("no_such_module_for_lookalike")

    def test_platform():
        platform_skip("needs Linux x86_64")

    @pytest.mark.xfail(reason="a known bug", strict=True)
    def test_expected_failure():
        assert False

    def test_runs():
        assert require_data is not None
    """
)
AT_IMPORT = 'import pytest\npytest.importorskip("no_such_module_for_lookalike")\n\n' + (
    "def test_never_collected():\n    pass\n"
)


def run(folder: Path, ci: str | None) -> tuple[int, dict[str, str]]:
    """Run pytest in `folder` with CI set to `ci` (unset for None): its exit status and
    each test's outcome (passed, failed, error, skipped, xfail) from its JUnit report."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    report = folder / "report.xml"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--junitxml={report}", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=folder,
    )  # fmt: skip
    outcomes = {}
    for case in ET.parse(report).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        kind = kinds[0] if kinds else "passed"
        if kind == "skipped" and (case.find("skipped").get("type") == "pytest.xfail"):
            kind = "xfail"
        outcomes[case.get("name") or case.get("classname")] = kind
    return proc.returncode, outcomes


def make_suite(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(ROOT / "tests" / "conftest.py", folder / "conftest.py")  # the real one
    (folder / f"{name}.py").write_text(text)
    return folder


def test_skips_fail_in_ci_and_stay_skips_elsewhere(tmp_path: Path) -> None:
    folder = make_suite(tmp_path, "test_tiny", TESTS)
    code, got = run(folder, ci="true")
    assert code == 1, got
    for name in (
        "test_missing_data",
        "test_plain_skip",
        "test_skipif_marker",
        "test_missing_dependency",
    ):
        assert got.get(name) in ("failure", "error"), (name, got)  # error: in setup (skipif)
    assert got.get("test_platform") == "skipped", got
    assert got.get("test_expected_failure") == "xfail", got
    assert got.get("test_runs") == "passed", got

    code, got = run(folder, ci=None)
    assert code == 0, got
    for name in (
        "test_missing_data",
        "test_plain_skip",
        "test_skipif_marker",
        "test_missing_dependency",
        "test_platform",
    ):
        assert got.get(name) == "skipped", (name, got)
    assert got.get("test_expected_failure") == "xfail", got
    assert got.get("test_runs") == "passed", got


def test_a_module_level_importorskip_fails_in_ci(tmp_path: Path) -> None:
    folder = make_suite(tmp_path, "test_at_import", AT_IMPORT)
    code, got = run(folder, ci="1")
    assert code != 0 and list(got.values()) == ["error"], got
    code, got = run(folder, ci=None)
    assert code == 5 and list(got.values()) == ["skipped"], got  # 5: no test ran


def test_ci_set_to_false_is_not_ci(tmp_path: Path) -> None:
    folder = make_suite(tmp_path, "test_tiny", TESTS)
    for value in ("", "0", "false"):
        code, got = run(folder, ci=value)
        assert code == 0 and got.get("test_missing_data") == "skipped", (value, got)
