"""How `tune --photos` scales with the catalog: the pseudo-labelling's time and peak
memory, and the head's training time per epoch with the whole catalog embedded at every
step (`head_catalog_per_step` 0, the code before the bound) against a sample of at most
256 catalog images a step (the default), side by side in one run.

    .venv/bin/python benchmarks/bench_tune_scale.py [--sizes 81,1000,3000,10000]
        [--photos 2640] [--epochs 1] [--per-step 0,256] [--fashion] [--json FILE]

Synthetic part: each size runs in its own process (peak memory is the process's
`ru_maxrss`) on synthetic unit vectors of the bundled encoder's width (1,632): one
catalog vector per product, the photos near their product's vector, grocery's 2,640
photos and their four extra samples each (two crops, two session views) as a real run
has. What scales is the shapes, not the values, so synthetic vectors measure it; the
labelling's accuracy on them is printed only to show it ran. The head's time is
measured over `--epochs` epochs (12 in a real run: multiply).

`--fashion`: the real thing end to end, `lookalike tune --photos footwear300/data` (300
product shots of another shop, unlabelled) against the fashion-footwear catalog (2,836
images), once per setting on the same home (the second run reuses the cached features),
the training's seconds from the tune's own report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = ROOT / "../shared/data"
DIM = 1632
EXTRA_SAMPLES = 4  # two central crops and two session views of each photo


def one_size(products: int, photos: int, epochs: int, per_step: int, labelling: bool) -> dict:
    """In this process: label `photos` synthetic photos against `products` catalog
    vectors (with `labelling`) and train the head for `epochs`; seconds and peak MB."""
    import numpy as np

    from lookalike.tuning import TuneSettings, pseudo
    from lookalike.tuning.head import fit_head

    rng = np.random.default_rng(0)
    cat = rng.standard_normal((products, DIM)).astype(np.float32)
    cat /= np.linalg.norm(cat, axis=1, keepdims=True)
    truth = rng.integers(0, products, photos)
    ph = cat[truth] + rng.standard_normal((photos, DIM)).astype(np.float32) / np.sqrt(DIM)
    ph /= np.linalg.norm(ph, axis=1, keepdims=True)
    cat_y = np.arange(products)
    settings = TuneSettings(method="head").resolved(None, photos=True, labelled=False)
    settings = replace(settings, epochs=epochs, head_catalog_per_step=per_step)
    out: dict = {"products": products, "photos": photos, "head_catalog_per_step": per_step}
    if labelling:
        t0 = time.perf_counter()
        labels = pseudo.self_train(settings, ph, cat, cat_y, products)
        out["labelling_s"] = round(time.perf_counter() - t0, 1)
        out["labelling_peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        out["labelling_accuracy"] = round(float((labels.labels == truth).mean()), 3)
        targets = labels.targets
    else:
        targets = np.eye(products, dtype=np.float32)[truth]
    extra = (np.concatenate([ph] * EXTRA_SAMPLES), np.tile(np.arange(photos), EXTRA_SAMPLES))
    t0 = time.perf_counter()
    fit_head(settings, ph, targets, cat, cat_y, products, extra=extra)
    out["head_s_per_epoch"] = round((time.perf_counter() - t0) / epochs, 1)
    out["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def synthetic(sizes: list[int], photos: int, epochs: int, per_steps: list[int]) -> list[dict]:
    rows = []
    for products in sizes:
        for i, per_step in enumerate(per_steps):  # the labelling once, with the first
            cmd = [sys.executable, __file__, "--one", str(products), "--photos", str(photos),
                   "--epochs", str(epochs), "--per-step", str(per_step)]  # fmt: skip
            if i:
                cmd.append("--no-labelling")
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def fashion(per_steps: list[int]) -> list[dict]:
    from lookalike.engine import Engine
    from lookalike.tuning import TuneSettings, train_tuned_model

    shots = DATA / "footwear300" / "data"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Path(tmp) / "fashion")
        try:
            t0 = time.perf_counter()
            engine.index([], metadata=DATA / "fashion-footwear" / "catalog.csv", progress=False)
            print(f"fashion-footwear indexed in {time.perf_counter() - t0:.0f} s", flush=True)
            for per_step in [per_steps[-1], *per_steps]:  # the first computes the features
                settings = TuneSettings(method="head", seed=0, head_catalog_per_step=per_step)
                t0 = time.perf_counter()
                report = train_tuned_model(engine, photos=[shots], settings=settings,
                                           progress=False, log=lambda _: None)  # fmt: skip
                row = {"head_catalog_per_step": per_step, "photos": report.photos_used,
                       "catalog_images": 2836, "tune_s": round(time.perf_counter() - t0, 1),
                       "parts_s": report.seconds}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            engine.close()
    return rows[1:]  # the first run's time is mostly its features


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="81,1000,3000,10000", help="catalog sizes (products)")
    ap.add_argument("--photos", type=int, default=2640)
    ap.add_argument("--epochs", type=int, default=1, help="head epochs timed (12 in a run)")
    ap.add_argument("--fashion", action="store_true", help="also tune fashion-footwear for real")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument(
        "--per-step",
        default="0,256",
        help="head_catalog_per_step values compared (0: the whole catalog)",
    )
    ap.add_argument("--no-labelling", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_size(args.one, args.photos, args.epochs, int(args.per_step),
                                  not args.no_labelling)))  # fmt: skip
        return 0
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version()}  # fmt: skip
    print(json.dumps(info))
    per_steps = [int(s) for s in args.per_step.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    out = {**info, "synthetic": synthetic(sizes, args.photos, args.epochs, per_steps)}
    if args.fashion:
        out["fashion"] = fashion(per_steps)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
