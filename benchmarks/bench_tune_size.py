"""How many unlabelled photos `lookalike tune --photos` needs before it beats what the
server would otherwise serve, and whether a tuned home should also be calibrated: the two
numbers of `serve --tune-every` (MIN_TUNE_PHOTOS, and calibration on a tuned home).

On the two burst splits of grocery train.csv (salt "" and "b2"; val.csv is not read): a
new home indexed with the grocery catalog; n photos drawn at random from the split's kept
bursts (seeded as bench_calibrate_size.py), listed in a CSV with only an image column.
Each condition starts from a fresh copy of the indexed home, then its held-out bursts are
searched through `Engine.search`: Recall@1 / @5 per burst (bench_calibrate_size.per_burst).
train.csv's labels only score.

- calibrated: the base model, `calibrate_home` on the n photos with the catalog (the
  centre and the hub correction, as `lookalike calibrate` and `serve --calibrate-every`);
- tuned: `train_tuned_model(photos=[the n photos], settings=TuneSettings(seed=0))`;
- tuned+calibrated: that tuned home, then `calibrate_home` on the same n photos (a tuned
  home gets the centre only: the hub correction is for base models).

The uncalibrated base is scored once per split. Sizes: 100, 300, 1000 (two draws each)
and "all" (the whole pool, one draw).

Rules fixed before the run:
- MIN_TUNE_PHOTOS is the smallest measured n from which on (that n and every larger one
  measured) the mean over draws of "tuned" is >= "calibrated" in both Recall@1 and
  Recall@5 per burst, on both splits. If there is none, auto-tune would not ship.
- A tuned home gets auto-calibration only if "tuned+calibrated" >= "tuned" in both
  Recall@1 and Recall@5 per burst on both splits at every n >= MIN_TUNE_PHOTOS; otherwise
  the server skips calibration on a tuned home.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_tune_size.py \\
        [--sizes 100,300,1000,all] [--draws 2] [--splits 1,2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_calibrate_size import per_burst  # noqa: E402
from bench_tune_sources import GROCERY, _rows, _write, burst_split  # noqa: E402

from lookalike.calibration import calibrate_home  # noqa: E402
from lookalike.engine import Engine  # noqa: E402
from lookalike.query import describe, query_pipeline  # noqa: E402
from lookalike.tuning import TuneSettings, train_tuned_model  # noqa: E402

SALTS = {"1": "", "2": "b2"}
CONDITIONS = ("calibrated", "tuned", "tuned+calibrated")


def _calibrate(engine: Engine, listing: Path, photos: int) -> None:
    """`calibrate_home` as the server's child process does it, and a check that the
    engine's next search uses the new centre (the query pipeline re-reads the file)."""
    calibrate_home(engine.home, engine.encoder, [listing], limit=None, catalog=engine.catalog)
    used = describe(query_pipeline(engine.home, engine.encoder))["query_centre"]
    if not used or used["photos"] != photos:
        raise RuntimeError(f"the new centre is not what searches use: {used}")


def run_draw(
    home: Path,
    tmp: Path,
    held: list[dict],
    pick: list[str],
    also: dict | None = None,
    settings: TuneSettings | None = None,
) -> dict:
    """The three conditions on fresh copies of `home`, calibrated/tuned on `pick` (with
    `settings`, by default TuneSettings(seed=0)), scored on `held` (and on each of the
    held-out sets in `also`: out["also"][name][condition])."""
    listing = _write(tmp / "photos.csv", ["image"], [{"image": p} for p in pick])
    out: dict = {"also": {name: {} for name in also or {}}}

    def score(engine: Engine, condition: str) -> None:
        out[condition] = per_burst(engine, held)
        for name, rows in (also or {}).items():
            out["also"][name][condition] = per_burst(engine, rows)

    work = tmp / "calibrated"
    shutil.copytree(home, work)
    with Engine(work) as engine:
        _calibrate(engine, listing, len(pick))
        score(engine, "calibrated")
    shutil.rmtree(work)
    work = tmp / "tuned"
    shutil.copytree(home, work)
    with Engine(work) as engine:
        t0 = time.perf_counter()
        report = train_tuned_model(engine, photos=[listing], progress=False,
                                   settings=settings or TuneSettings(seed=0))  # fmt: skip
        out["tune_seconds"] = round(time.perf_counter() - t0, 1)
        out["tune_parts"] = report.seconds
        out["photos_used"] = report.photos_used
        score(engine, "tuned")
        _calibrate(engine, listing, len(pick))
        score(engine, "tuned+calibrated")
    shutil.rmtree(work)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100,300,1000,all", help="photo counts; all: the pool")
    ap.add_argument("--draws", type=int, default=2, help="draws per n below all (all: one)")
    ap.add_argument("--splits", default="1,2", help='1: salt "", 2: salt "b2"')
    ap.add_argument(
        "--draws-at", default="", help="per-n overrides of --draws, e.g. 1000=1 (said in output)"
    )
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args()
    sizes = args.sizes.split(",")
    overrides = {int(k): int(v) for k, v in (s.split("=") for s in args.draws_at.split(",") if s)}
    train = [{**r, "image": str(GROCERY / r["image"])} for r in _rows(GROCERY / "train.csv")]
    started = time.time()
    table: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        with Engine.open(home) as engine:
            engine.index([], metadata=GROCERY / "catalog.csv", progress=False)
        for split in args.splits.split(","):
            salt = SALTS[split]
            name = f"split {split}"
            pool, held = burst_split(train, salt)
            work = tmp / "plain"
            shutil.copytree(home, work)
            with Engine(work) as engine:
                plain = per_burst(engine, held)
            shutil.rmtree(work)
            print(f"{name} (salt {salt!r}): {len(held)} held-out photos, pool {len(pool)};"
                  f" uncalibrated base R@1 {plain[0]:.3f} R@5 {plain[1]:.3f}",
                  flush=True)  # fmt: skip
            table[name] = {"pool": len(pool), "held": len(held), "plain": plain, "sizes": {}}
            for size in sizes:
                n = len(pool) if size == "all" else int(size)
                draws = 1 if size == "all" else overrides.get(n, args.draws)
                got = []
                for draw in range(draws):
                    rng = np.random.default_rng(1000 * draw + n)
                    pick = [pool[i]["image"] for i in rng.choice(len(pool), n, replace=False)]
                    one = run_draw(home, tmp, held, pick)
                    got.append(one)
                    print(f"  n {size:>4} draw {draw}: "
                          + "  ".join(f"{c} {one[c][0]:.3f}/{one[c][1]:.3f}" for c in CONDITIONS)
                          + f"  tune {one['tune_seconds']:.0f} s", flush=True)  # fmt: skip
                mean = {c: tuple(float(x) for x in np.mean([g[c] for g in got], axis=0))
                        for c in CONDITIONS}  # fmt: skip
                secs = float(np.mean([g["tune_seconds"] for g in got]))
                table[name]["sizes"][size] = {"n": n, "draws": got, "mean": mean,
                                              "tune_seconds": secs}  # fmt: skip
                print(f"  n {size:>4} mean of {draws}: "
                      + "  ".join(f"{c} {mean[c][0]:.3f}/{mean[c][1]:.3f}" for c in CONDITIONS)
                      + f"  tune {secs:.0f} s", flush=True)  # fmt: skip

    def beats(n: str, better: str, than: str) -> bool:
        return all(
            t["sizes"][n]["mean"][better][0] >= t["sizes"][n]["mean"][than][0]
            and t["sizes"][n]["mean"][better][1] >= t["sizes"][n]["mean"][than][1]
            for t in table.values()
        )

    floor = next(
        (n for i, n in enumerate(sizes) if all(beats(m, "tuned", "calibrated") for m in sizes[i:])),
        None,
    )
    print(f"tuned >= calibrated (R@1 and R@5, both splits) at: "
          f"{[n for n in sizes if beats(n, 'tuned', 'calibrated')]}")  # fmt: skip
    print(f"tuned+calibrated >= tuned (R@1 and R@5, both splits) at: "
          f"{[n for n in sizes if beats(n, 'tuned+calibrated', 'tuned')]}")  # fmt: skip
    if floor is None:
        print("MIN_TUNE_PHOTOS: none (tuned never stays >= calibrated): auto-tune would not ship")
        calibrate_tuned = None
    else:
        above = sizes[sizes.index(floor) :]
        calibrate_tuned = all(beats(n, "tuned+calibrated", "tuned") for n in above)
        print(f"MIN_TUNE_PHOTOS: {floor}")
        print(f"auto-calibrate a tuned home: {'yes' if calibrate_tuned else 'no, skip it'}")
    print(f"({time.time() - started:.0f} s)", flush=True)
    if args.json:
        figures = {
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "args": vars(args),
            "splits": table,
            "min_tune_photos": floor,
            "calibrate_tuned": calibrate_tuned,
            "seconds": round(time.time() - started),
            "load_average": os.getloadavg(),
        }
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
