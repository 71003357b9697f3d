"""How many unlabelled photos `calibrate` needs before it pays: the floor of
`serve --calibrate-every` (`lookalike.keptphotos.MIN_TO_CALIBRATE`).

On the two burst splits of grocery train.csv (salt "" and "b2"; val.csv is not read): a
new home on the default base pipeline, calibrated the way `lookalike calibrate` does it
(`calibrate_home` with the catalog: the centre and the hub correction) on n photos drawn
at random from the split's kept bursts, three draws each, then its held-out bursts
searched through `Engine.search`. Recall@1 / @5 per burst (the mean over bursts of each
burst's share), against the same home uncalibrated. train.csv's labels only score.

Rule fixed before the run: the floor is the smallest n from which on (that n and every
larger one measured) the mean over the draws is not below the uncalibrated home in
Recall@1 or Recall@5 per burst on either split.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_calibrate_size.py \\
        [--sizes 32,64,100,200,300,500,1000] [--draws 3]
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_tune_sources import GROCERY, _rows, burst_split  # noqa: E402

from lookalike.calibration import calibrate_home, remove_centre  # noqa: E402
from lookalike.engine import Engine  # noqa: E402


def per_burst(engine: Engine, held: list[dict[str, str]]) -> tuple[float, float]:
    """Recall@1 / @5 per burst of `held` through Engine.search."""
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for start in range(0, len(held), 32):
        chunk = held[start : start + 32]
        for row, res in zip(chunk, engine.search([r["image"] for r in chunk], k=5), strict=True):
            ids = [r.product_id for r in res]
            n = int(re.search(r"_(\d+)\.\w+$", row["image"]).group(1))
            burst = f"{row['product_id']}/{(n - 1) // 10}"
            first = bool(ids) and ids[0] == row["product_id"]
            hits[burst].append((first, row["product_id"] in ids))
    r1 = np.mean([np.mean([h[0] for h in v]) for v in hits.values()])
    r5 = np.mean([np.mean([h[1] for h in v]) for v in hits.values()])
    return float(r1), float(r5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,64,100,200,300,500,1000")
    ap.add_argument("--draws", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    train = [{**r, "image": str(GROCERY / r["image"])} for r in _rows(GROCERY / "train.csv")]
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        with Engine.open(home) as engine:
            engine.index([], metadata=GROCERY / "catalog.csv", progress=False)
        table: dict[str, dict] = {}
        for salt in ("", "b2"):
            name = salt or "split 1"
            pool, held = burst_split(train, salt)
            work = Path(tmp) / (salt or "s1")
            shutil.copytree(home, work)
            with Engine(work) as engine:
                remove_centre(work)
                plain = per_burst(engine, held)
                print(f"{name}: {len(held)} held-out photos, pool {len(pool)}; uncalibrated"
                      f" R@1 {plain[0]:.3f} R@5 {plain[1]:.3f}", flush=True)  # fmt: skip
                table[name] = {"plain": plain}
                for n in sizes:
                    got = []
                    for draw in range(args.draws):
                        rng = np.random.default_rng(1000 * draw + n)
                        pick = [pool[i]["image"] for i in rng.choice(len(pool), n, replace=False)]
                        listing = Path(tmp) / "calib.csv"
                        listing.write_text("image\n" + "".join(p + "\n" for p in pick))
                        calibrate_home(work, engine.encoder, [listing], limit=None,
                                       catalog=engine.catalog)  # fmt: skip
                        got.append(per_burst(engine, held))
                    mean = tuple(float(x) for x in np.mean(got, axis=0))
                    table[name][n] = mean
                    spread = np.ptp(got, axis=0)
                    print(f"  n {n:5}: R@1 {mean[0]:.3f} ({100 * (mean[0] - plain[0]):+.1f})"
                          f"  R@5 {mean[1]:.3f} ({100 * (mean[1] - plain[1]):+.1f})"
                          f"  range over {args.draws} draws {spread[0]:.3f} / {spread[1]:.3f}",
                          flush=True)  # fmt: skip

    def passes(n: int) -> bool:
        return all(t[n][0] >= t["plain"][0] and t[n][1] >= t["plain"][1] for t in table.values())

    floor = next((n for i, n in enumerate(sizes) if all(map(passes, sizes[i:]))), None)
    print(f"smallest n from which on calibration is not below uncalibrated on both splits:"
          f" {floor} ({time.time() - started:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
