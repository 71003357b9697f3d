"""Shared fixtures: where the real data is, and one model cache for the whole session
(the ONNX export happens once per test run, not once per test)."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
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
