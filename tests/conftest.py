"""Shared fixtures: where the real data is, and one model cache for the whole session
(the ONNX export happens once per test run, not once per test)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / "../shared/data").resolve()


def require_data(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found: {path}")
    return path


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
