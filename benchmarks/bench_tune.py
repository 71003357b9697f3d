"""`lookalike tune` on grocery: Recall@1/@5 of val.csv photos against the 81 catalog
products before and after tuning on train.csv, the tuning time, and single-query search
latency with the base and the tuned model side by side.

    .venv/bin/python benchmarks/bench_tune.py [--method auto|finetune|head] [--epochs N]
        [--seed S] [--no-warm] [--queries 60] [--json FILE]

Two homes are made in a temporary folder (or --workdir): one indexed with the base
model, one indexed and then tuned. Recall is measured through `Engine.search` (what a
shopper gets), not only the trainer's own figure. Latency: the same val photos are
searched one at a time on both engines, interleaved (base, tuned, base, ...) so load from
other processes hits both alike; median and p90 are printed, and the median of each
query's extra time over the base on the same query. Tuning is timed twice: cold
(backbone features computed) and warm (features cached, e.g. a second `tune` run with
new labels).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lookalike.engine import Engine  # noqa: E402
from lookalike.tuning import TuneSettings, train_tuned_model  # noqa: E402

DATA = ROOT / "../shared/data/grocery"


def recall(engine: Engine, rows: list[dict[str, str]]) -> dict[str, float]:
    hits1 = hits5 = 0
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        results = engine.search([str(DATA / r["image"]) for r in chunk], k=5)
        for row, res in zip(chunk, results, strict=True):
            ids = [r.product_id for r in res]
            hits1 += bool(ids) and ids[0] == row["product_id"]
            hits5 += row["product_id"] in ids
    return {"recall@1": hits1 / len(rows), "recall@5": hits5 / len(rows)}


def latency(engines: dict[str, Engine], paths: list[str]) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():  # warm-up
        engine.search(paths[0], k=10)
    for path in paths:
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.search(path, k=10)
            times[name].append(1000 * (time.perf_counter() - t0))
    out = {}
    first = next(iter(times))
    for name, ts in times.items():
        # each query's time over the first engine's on the same query, the two timed one
        # after the other: steadier than the difference of the medians
        extra = [t - f for t, f in zip(ts, times[first], strict=True)]
        ts = sorted(ts)
        out[name] = {
            "median_ms": round(statistics.median(ts), 1),
            "p90_ms": round(ts[int(0.9 * (len(ts) - 1))], 1),
        }
        if name != first:
            out[name][f"extra_over_{first}_ms"] = round(statistics.median(extra), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="auto", choices=["auto", "finetune", "head"])
    ap.add_argument("--epochs", type=int, help="default: the method's own")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-warm", action="store_true", help="skip the second (warm) run")
    ap.add_argument("--queries", type=int, default=60, help="photos for the latency test")
    ap.add_argument("--workdir", help="keep the homes here (default: a temporary folder)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"grocery data not found at {DATA}", file=sys.stderr)
        return 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-tune-"))
    work.mkdir(parents=True, exist_ok=True)
    with (DATA / "val.csv").open(newline="") as fh:
        val = list(csv.DictReader(fh))

    homes = {"base": work / "home-base", "tuned": work / "home-tuned"}
    for home in homes.values():
        shutil.rmtree(home, ignore_errors=True)
    engines = {name: Engine(home) for name, home in homes.items()}
    try:
        for engine in engines.values():
            engine.index([], metadata=DATA / "catalog.csv", progress=False)
        before = recall(engines["tuned"], val)

        settings = TuneSettings(method=args.method, epochs=args.epochs, seed=args.seed)
        t0 = time.perf_counter()
        report = train_tuned_model(
            engines["tuned"], DATA / "train.csv", DATA / "val.csv", progress=True,
            settings=settings, log=print,
        )  # fmt: skip
        cold = time.perf_counter() - t0
        warm_report, warm = report, float("nan")
        if not args.no_warm:
            t0 = time.perf_counter()
            warm_report = train_tuned_model(
                engines["tuned"], DATA / "train.csv", None, progress=False, settings=settings
            )
            warm = time.perf_counter() - t0
        after = recall(engines["tuned"], val)
        lat = latency(engines, [str(DATA / r["image"]) for r in val[: args.queries]])
    finally:
        for engine in engines.values():
            engine.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)

    figures = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "load_average": os.getloadavg(),
        "train_photos": report.photos_used,
        "val_photos": len(val),
        "catalog_products": report.catalog_products,
        "base_stamp": report.base_stamp,
        "tuned_stamp": warm_report.stamp,
        "same_model_both_runs": None if args.no_warm else report.stamp == warm_report.stamp,
        "settings": report.settings,
        "recall_base_search": before,
        "recall_tuned_search": after,
        "trainer_validation": report.validation,
        "tune_seconds_cold": round(cold, 1),
        "tune_seconds_cold_parts": report.seconds,
        "tune_seconds_warm": round(warm, 1),
        "tune_seconds_warm_parts": warm_report.seconds,
        "query_latency": lat,
    }
    print()
    print(f"grocery val ({len(val)} photos) vs {report.catalog_products} catalog products;")
    print(
        f"tuned on train.csv ({report.photos_used} photos): {report.settings['method']},"
        f" {report.settings['epochs']} epochs"
    )
    print(f"{'':24}{'base':>10}{'tuned':>10}")
    print(f"{'Recall@1':24}{before['recall@1']:>10.3f}{after['recall@1']:>10.3f}")
    print(f"{'Recall@5':24}{before['recall@5']:>10.3f}{after['recall@5']:>10.3f}")
    lb, lt = lat["base"], lat["tuned"]
    print(f"{'query latency median ms':24}{lb['median_ms']:>10.1f}{lt['median_ms']:>10.1f}")
    print(f"{'query latency p90 ms':24}{lb['p90_ms']:>10.1f}{lt['p90_ms']:>10.1f}")
    print(
        f"tuning time: cold {cold:.1f}s (features {report.seconds['features']:.1f}s,"
        f" training {report.seconds['training']:.1f}s, re-embed"
        f" {report.seconds.get('reembed', 0):.1f}s); warm {warm:.1f}s"
    )
    print(f"machine: {figures['machine']}; load average {figures['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
