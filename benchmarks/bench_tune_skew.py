"""What `serve --calibrate-every` / `--tune-every` do to the products nobody photographed:
a live shop's kept photos are of what its shoppers search for, not of every product.

On the two burst splits of grocery train.csv (salt "" and "b2"; val.csv is not read),
half of the 81 products (by a hash of the split's salt and the product id) are the
"photographed" ones: the kept photos are up to 1,000 (MIN_TO_TUNE) of the split's pool
photos of those products only. Then, as bench_tune_size.py (its `run_draw`: each
condition on a fresh copy of a new grocery home), plain, calibrated on those photos,
tuned on them, and tuned then calibrated, each scored separately on the held-out bursts
of the photographed products and of the others: Recall@1 / @5 per burst through
`Engine.search`. train.csv's labels only pick the products and score.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_tune_skew.py \
        [--set NAME=VALUE ...] [--json FILE]

`--set` changes a TuneSettings field of the tune (as in bench_tune_sources.py), e.g.
`--set photo_prototypes=0` for a tune without the catalog's photo prototypes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_calibrate_size import per_burst  # noqa: E402
from bench_tune_size import CONDITIONS, run_draw  # noqa: E402
from bench_tune_sources import GROCERY, _overrides, _rows, burst_split  # noqa: E402

from lookalike.calibration import remove_centre  # noqa: E402
from lookalike.engine import Engine  # noqa: E402
from lookalike.keptphotos import MIN_TO_TUNE  # noqa: E402
from lookalike.tuning import TuneSettings  # noqa: E402


def photographed(product_id: str, salt: str) -> bool:
    return hashlib.sha256(f"skew{salt}/{product_id}".encode()).digest()[0] < 128


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="a TuneSettings field of the tune (repeatable)")  # fmt: skip
    args = ap.parse_args()
    settings = replace(TuneSettings(seed=0), **_overrides(args.set))
    train = [{**r, "image": str(GROCERY / r["image"])} for r in _rows(GROCERY / "train.csv")]
    started = time.time()
    figures: dict = {"overrides": _overrides(args.set)}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        with Engine.open(home) as engine:
            engine.index([], metadata=GROCERY / "catalog.csv", progress=False)
        for salt in ("", "b2"):
            name = f"split {salt or '1'}"
            pool, held = burst_split(train, salt)
            seen = [r for r in held if photographed(r["product_id"], salt)]
            unseen = [r for r in held if not photographed(r["product_id"], salt)]
            kept = [r for r in pool if photographed(r["product_id"], salt)]
            rng = np.random.default_rng(7)
            pick = [kept[i]["image"] for i in rng.permutation(len(kept))[:MIN_TO_TUNE]]
            products = len({r["product_id"] for r in kept})
            with Engine(home) as engine:
                remove_centre(home)
                plain = {"photographed": per_burst(engine, seen),
                         "others": per_burst(engine, unseen)}  # fmt: skip
            out = run_draw(home, tmp, seen, pick, also={"others": unseen}, settings=settings)
            rows = {"plain": plain}
            for c in CONDITIONS:
                rows[c] = {"photographed": out[c], "others": out["also"]["others"][c]}
            figures[name] = {"products photographed": products, "photos kept": len(pick),
                             "held photographed": len(seen), "held others": len(unseen),
                             "tune_seconds": out["tune_seconds"], **rows}  # fmt: skip
            print(f"{name}: {len(pick)} kept photos of {products} products; held-out"
                  f" {len(seen)} photos of them, {len(unseen)} of the others",
                  flush=True)  # fmt: skip
            for c, got in rows.items():
                a, b = got["photographed"], got["others"]
                print(f"  {c:>16}: photographed {a[0]:.3f} / {a[1]:.3f}   others"
                      f" {b[0]:.3f} / {b[1]:.3f}", flush=True)  # fmt: skip
            shutil.rmtree(tmp / "calibrated", ignore_errors=True)
    print(f"({time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
