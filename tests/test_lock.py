"""requirements.lock (what `make setup` installs) agrees with pyproject.toml: every
dependency, the dev extra's and the build backend included, is pinned exactly once, with
`==`, at a version its range in pyproject.toml allows. Regenerate with `make lock`. The
lock is made for this project's machines (Linux x86_64, CPython 3.11: torch's CPU build)."""

from __future__ import annotations

import importlib.metadata
import sys
import tomllib
from pathlib import Path

from conftest import ROOT, missing
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

LOCK = ROOT / "requirements.lock"


def read_lock(path: Path) -> dict[str, Version]:
    """name -> pinned version for each `name==version` line."""
    pins: dict[str, Version] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}:{number}: {raw!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{path.name}:{number}: {req.name} pinned twice"
        pins[name] = Version(specs[0].version)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    reqs = list(project["project"]["dependencies"])
    for extra in project["project"].get("optional-dependencies", {}).values():
        reqs += extra
    reqs += project["build-system"]["requires"]
    tools = ROOT / "requirements-tools.in"
    reqs += [line.split("#", 1)[0] for line in tools.read_text().splitlines()]
    return [Requirement(r) for r in reqs if r.strip()]


def disagreements(pins: dict[str, Version], reqs: list[Requirement]) -> list[str]:
    out = []
    for req in reqs:
        name = canonicalize_name(req.name)
        if name not in pins:
            if req.marker is None or req.marker.evaluate():
                out.append(f"{req} is not pinned in requirements.lock")
            continue
        version = pins[name]
        if not req.specifier.contains(version, prereleases=True):
            out.append(f"{req} does not allow the locked {req.name}=={version}")
    return out


def test_the_lock_pins_every_dependency_within_its_range() -> None:
    pins = read_lock(LOCK)
    reqs = declared()
    assert len(reqs) >= 20
    assert disagreements(pins, reqs) == []
    assert pins["torch"] == Version("2.13.0+cpu")  # the CPU build on this machine's disk


def test_a_disagreement_is_found(tmp_path: Path) -> None:
    """The check itself: a dependency missing from the lock, a pin outside its range, and
    a line that is not an exact pin."""
    lock = tmp_path / "requirements.lock"
    lock.write_text("numpy==2.4.6\n    # via lookalike\npymilvus==2.4.0\n")
    pins = read_lock(lock)
    reqs = [
        Requirement("numpy>=1.26,<3"),
        Requirement("pymilvus>=3.0.2,<3.1"),
        Requirement("fastapi>=0.110"),
        Requirement("milvus==2.3.5; platform_system == 'Nowhere'"),  # not for this platform
    ]
    problems = disagreements(pins, reqs)
    assert len(problems) == 2, problems
    assert "pymilvus" in problems[0] and "fastapi" in problems[1]
    lock.write_text("numpy>=2\n")
    try:
        read_lock(lock)
    except AssertionError as exc:
        assert "numpy>=2" in str(exc)
    else:
        raise AssertionError("a range in the lock was accepted")


def test_the_venv_of_make_setup_holds_exactly_the_lock() -> None:
    """In the venv `make setup` made (as `make test` and CI use it): every installed
    distribution is in the lock at its pinned version, and nothing else is installed."""
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        missing(f"not running in make setup's venv ({ROOT / '.venv'}), but {sys.prefix}")
    pins = read_lock(LOCK)
    installed = {
        canonicalize_name(d.metadata["Name"]): Version(d.version)
        for d in importlib.metadata.distributions()
    }
    installed.pop("lookalike", None)
    hint = "the venv is not requirements.lock: run `make setup`"
    assert {n: str(v) for n, v in installed.items() if pins.get(n) != v} == {}, hint
    assert sorted(set(pins) - set(installed)) == [], hint
