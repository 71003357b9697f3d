"""Hubness correction of the catalog side (CSLS, Conneau et al. 2018), measured on the
burst splits of grocery train.csv only (val.csv is never read); the table of
docs/quality.md, section "Tuning before anyone labels a photo". Nothing here ships.

    .venv/bin/python benchmarks/bench_tune_sources.py --part photos --selection \
        [--split-salt b2] --workdir DIR
    .venv/bin/python benchmarks/bench_csls.py --workdir DIR [--split-salt b2] [--version V ...]

DIR is what the first command kept: a base home (`grocery-base`) and a home tuned with
`--photos` on the split's kept bursts (`grocery-tuned`). For each home (the tuned one
under each `--version`, default its active model; the base one as it is, and a copy of
it calibrated with `lookalike.query.calibrate_home` on the kept bursts' photos), the
held-out bursts (queries) and the kept bursts (the unlabelled pool: the photos `tune
--photos` read) are embedded through `Engine.embed_queries`, the real query pipeline.
r(c) = the mean cosine of catalog vector c to its k nearest pool photos (no labels);
products are ranked by cos(q, c) - beta * r(c), the per-query part of CSLS being
constant. beta 0 must give what `Engine.search` gives (printed beside it as a check).
train.csv's labels are read only to score.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_tune_sources import GROCERY, _rows, burst_split, recall  # noqa: E402

from lookalike.calibration import calibrate_home  # noqa: E402
from lookalike.engine import Engine  # noqa: E402
from lookalike.tuning.features import catalog_images  # noqa: E402
from lookalike.tuning.switch import use_model  # noqa: E402

SETTINGS = [(0.5, 10), (1.0, 10), (0.5, 50), (1.0, 50)]
"""(beta, k) fixed before the run; the rule: one setting gaining Recall@5 >= 1 point on
both splits with Recall@1 not lower on either."""


def hub_scores(catalog: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """r(c): mean cosine of each catalog vector to its k nearest pool vectors."""
    return np.sort(catalog @ pool.T, axis=1)[:, -k:].mean(axis=1)


def ranked_recall(queries: np.ndarray, catalog: np.ndarray, owners: list[str],
                  truth: list[str], penalty: np.ndarray) -> tuple[float, float]:  # fmt: skip
    """Recall@1 / @5 of products ranked by their best image's cos - penalty."""
    scores = queries @ catalog.T - penalty[None, :]
    hit1 = hit5 = 0
    for row, want in zip(scores, truth, strict=True):
        top: list[str] = []
        for j in np.argsort(-row, kind="stable"):
            if owners[j] not in top:
                top.append(owners[j])
                if len(top) == 5:
                    break
        hit1 += top[0] == want
        hit5 += want in top
    return round(hit1 / len(truth), 4), round(hit5 / len(truth), 4)


def _embed(engine: Engine, paths: list[str]) -> np.ndarray:
    return np.concatenate([engine.embed_queries(paths[i : i + 64])
                           for i in range(0, len(paths), 64)])  # fmt: skip


def score_home(engine: Engine, pool: list[dict], held: list[dict]) -> dict:
    imgs = catalog_images(engine.catalog)
    owners = [pid for _, pid, _, _ in imgs]
    cat = engine.catalog.vectors([i for i, _, _, _ in imgs]).astype(np.float32)
    q = _embed(engine, [r["image"] for r in held])
    p = _embed(engine, [r["image"] for r in pool])
    truth = [r["product_id"] for r in held]
    none = np.zeros(len(cat), np.float32)
    out = {"engine_search": recall(engine, held),
           "beta 0": ranked_recall(q, cat, owners, truth, none)}  # fmt: skip
    for beta, k in SETTINGS:
        out[f"beta {beta} k {k}"] = ranked_recall(q, cat, owners, truth,
                                                  beta * hub_scores(cat, p, k))  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a bench_tune_sources --selection workdir")
    ap.add_argument("--split-salt", default="", help="the salt that run was given")
    ap.add_argument("--version", nargs="*", default=[None], help="tuned versions to score")
    args = ap.parse_args()
    work = Path(args.workdir)
    train = [{**r, "image": str(GROCERY / r["image"])} for r in _rows(GROCERY / "train.csv")]
    pool, held = burst_split(train, args.split_salt)
    pool_csv = work / "csls-pool.csv"
    pool_csv.write_text("image\n" + "".join(r["image"] + "\n" for r in pool))
    calibrated = work / "grocery-base-calibrated"
    if not calibrated.exists():
        shutil.copytree(work / "grocery-base", calibrated)
    homes: list[tuple[str, Path, str | None]] = [
        *((f"tuned {v or '(active)'}", work / "grocery-tuned", v) for v in args.version),
        ("base", work / "grocery-base", None),
        ("base, calibrated", calibrated, None),
    ]
    for name, home, version in homes:
        with Engine(home) as engine:
            if version is not None:
                use_model(engine, version, progress=False)
            if name == "base, calibrated":
                calibrate_home(engine.home, engine.encoder, [pool_csv])
            res = score_home(engine, pool, held)
        base1, base5 = res["beta 0"]
        print(f"{name}: Engine.search {res.pop('engine_search')}; {len(held)} queries,"
              f" pool {len(pool)}", flush=True)  # fmt: skip
        for key, (r1, r5) in res.items():
            print(f"  {key:14} R@1 {r1:.3f} ({100 * (r1 - base1):+.1f})"
                  f"  R@5 {r5:.3f} ({100 * (r5 - base5):+.1f})", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
