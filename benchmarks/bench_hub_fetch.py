"""Ranking cost of a hub-corrected photo search (lookalike.hubness), side by side in one
process: plain cosine, and the correction with the first fetch at 1x and at
`search.HUB_FETCH` times the usual candidates.

    .venv/bin/python benchmarks/bench_hub_fetch.py --home HOME [--photos DIR] [--n 150]

HOME: a base-model home already indexed and calibrated (e.g. fashion-footwear indexed,
`lookalike calibrate ../shared/data/footwear300`). The photos are embedded once; what is
timed is `search.best_images` (the store search and the catalog lookup), three rounds,
the variants interleaved. Each variant's top k is checked to be the same products.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lookalike import search  # noqa: E402
from lookalike.engine import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--home", required=True)
    ap.add_argument("--photos", default=str(HERE.parent.parent / "shared/data/footwear300"))
    ap.add_argument("--n", type=int, default=150)
    args = ap.parse_args()
    photos = sorted(str(p) for p in Path(args.photos).rglob("*.jpg"))[: args.n]
    shipped = search.HUB_FETCH
    with Engine(Path(args.home)) as engine:
        vectors, hubs = engine._embed_photos(photos)
        if hubs is None:
            sys.exit("the home has no hub correction: calibrate it first (base model)")
        store, catalog = engine.store, engine.catalog
        scope = search.search_scope(catalog, store, None, None)
        calls = {"n": 0}
        real = store.search

        def counted(*a, **kw):
            calls["n"] += 1
            return real(*a, **kw)

        store.search = counted
        variants = [("plain", None, 1), ("corrected, first fetch 1x", hubs, 1),
                    (f"corrected, first fetch {shipped}x", hubs, shipped)]  # fmt: skip
        for k in (10, 50):
            times: dict[str, list[float]] = {}
            rounds: dict[str, float] = {}
            tops: dict[str, list] = {}
            for _ in range(3):
                for name, hs, fetch in variants:
                    search.HUB_FETCH = fetch
                    calls["n"], ts, top = 0, [], []
                    for v, h in zip(vectors, hs or [None] * len(vectors), strict=True):
                        t = time.perf_counter()
                        best = search.best_images(catalog, store, v, k, scope, None, (), h)
                        ts.append((time.perf_counter() - t) * 1000)
                        top.append(list(best)[:k])
                    times.setdefault(name, []).append(statistics.median(ts))
                    rounds[name], tops[name] = calls["n"] / len(vectors), top
            search.HUB_FETCH = shipped
            same = tops[variants[1][0]] == tops[variants[2][0]]
            print(f"k {k}: {len(vectors)} photos, {scope.total} images; "
                  f"corrected tops equal: {same}")  # fmt: skip
            for name, _, _ in variants:
                print(f"  {name}: median {statistics.median(times[name]):.2f} ms "
                      f"(rounds {', '.join(f'{t:.2f}' for t in times[name])}), "
                      f"{rounds[name]:.2f} store searches a query")  # fmt: skip


if __name__ == "__main__":
    main()
