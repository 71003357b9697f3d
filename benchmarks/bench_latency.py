"""Single-query latency (decode + encode + search + product ranking) on the 2,836-product
fashion-footwear catalog.

    .venv/bin/python benchmarks/bench_latency.py [--queries 200] [--home DIR]

Queries are catalog images of fashion-footwear and the footwear300 images (a different
source, 200 px wide), one at a time, as `lookalike search` or the API runs them.
Prints p50/p90/p99 in milliseconds, and the share spent decoding, encoding and searching.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
DATA = (ROOT / "../shared/data").resolve()

from lookalike.engine import Engine  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.search import rank_products  # noqa: E402


def percentiles(values: list[float]) -> str:
    ms = np.array(values) * 1000
    return " / ".join(f"{np.percentile(ms, p):.1f}" for p in (50, 90, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--home", help="an already indexed home (default: index into a temp one)")
    parser.add_argument("--model", help="encoder to index with (default: the engine's default)")
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        engine = Engine(home, model=args.model)
        if engine.catalog.count_products() == 0:
            report = engine.index(
                [], metadata=DATA / "fashion-footwear/catalog.csv", progress=False
            )
            print(report.summary())
        print(f"catalog: {engine.catalog.count_products()} products")
        fashion = sorted((DATA / "fashion-footwear/images").glob("*.jpg"))
        footwear = sorted((DATA / "footwear300/data").glob("*.jpg"))
        rng = np.random.default_rng(0)
        half = args.queries // 2
        queries = [fashion[i] for i in rng.choice(len(fashion), half, replace=False)]
        queries += [
            footwear[i] for i in rng.choice(len(footwear), args.queries - half, replace=False)
        ]
        engine.search([queries[0]], k=10)  # warm-up: model and index loaded
        total, decode, encode, search = [], [], [], []
        encoder, store = engine.encoder, engine.store
        for query in queries:
            t0 = time.perf_counter()
            image = load_image(query, draft_size=2 * encoder.input_size)
            t1 = time.perf_counter()
            vector = encoder.embed(encoder.prepare(image)[None])
            t2 = time.perf_counter()
            rank_products(engine.catalog, store, vector, 10)
            t3 = time.perf_counter()
            decode.append(t1 - t0)
            encode.append(t2 - t1)
            search.append(t3 - t2)
        for query in queries:  # the public path, end to end
            t0 = time.perf_counter()
            engine.search([query], k=10)
            total.append(time.perf_counter() - t0)
        engine.close()
    print()
    print("| step | p50 / p90 / p99 ms |")
    print("|---|---|")
    print(f"| decode + orient + RGB | {percentiles(decode)} |")
    print(f"| prepare + encode (ONNX Runtime) | {percentiles(encode)} |")
    print(f"| vector search + product ranking (k=10) | {percentiles(search)} |")
    print(f"| **Engine.search, end to end** | **{percentiles(total)}** |")
    print(f"\n{len(queries)} single-image queries, one at a time.")


if __name__ == "__main__":
    main()
