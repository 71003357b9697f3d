"""Colour constancy of the query photo for the plain pipeline: a grey-world style
correction of the query view before the encoder, against a new home's default, on
grocery train.csv (val.csv is never read) (docs/quality.md).

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_query_colour.py
        --workdir DIR [--limit N] [--json FILE]

Shopper photos come from capture sessions with their own light and white balance; the
catalog is studio-lit on white. Each variant is an image -> image step on the query's
`centre70` view (uint8 RGB, after the crop, before the encoder's `prepare`;
bench_query_views.ResPipeline with its `step`), then a new home's default follows:
queries power-normalised (p 0.5), the catalog the L2 mean of each image's and its rot-20
view's vectors, power-normalised (`CatalogViewEncoder`), as bench_pooling.py's `gap`.

- `none`: today's default;
- `grey-world`: each channel scaled so that its mean is the mean of the three means;
- `shades-of-grey-p6` (Finlayson & Trezzi 2004): the channel's Minkowski p-norm mean
  (p = 6) instead of the mean;
- `white-patch`: each channel's 99th percentile mapped to the three percentiles' mean;
- `autocontrast`: PIL `ImageOps.autocontrast(cutoff=1)`, each channel stretched alone;
  `autocontrast-luma`: the same with `preserve_tone=True` (one stretch for all three);
- `grey-world-half`, `shades-of-grey-p6-half`: the gains moved halfway (gain ** 0.5).

Every variant on the query side only (the catalog as indexed); the two query-side
variants with the best Recall@1 per burst also on both sides (each catalog image
corrected, then its rot-20 view made from it; the fashion catalog too), for the record.
Grocery: every train.csv photo (2,640, 296 bursts) queries the 81 catalog vectors:
Recall@1 / @5 per photo, per burst (95 % bootstrap over bursts) and on the block split's
held-out part (each product's last 30 % of file numbers, bench_tune_sources.block_split),
with the paired bootstrap of the per-burst change against `none`. Fashion (both-sides
rows and `none`): leave-one-out category / colour precision@10 over the 2,836 images.
The red stiletto (footwear300/search_image_01.jpg, the query view and the step) against
the fashion catalog: Heels / Red in its top 10. The step's cost per query is timed.
For the rule's candidate only: the same with a calibrated centre (the mean query vector of
the block split's kept photos, no labels, each variant its own), scored on the held-out
part. Vectors are cached in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_catalog_views import FASHION, leave_one_out_p10, scores_of  # noqa: E402
from bench_pooling import EXPECTED_GAP, QUERY_VIEW, burst_hits  # noqa: E402
from bench_query_views import GROCERY, STILETTO, ResPipeline, _rows, burst_of, l2  # noqa: E402
from bench_tune_sources import block_split  # noqa: E402

from lookalike.encoders import DEFAULT_MODEL, load_encoder  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.views import (  # noqa: E402
    DEFAULT_CATALOG_VIEWS,
    DEFAULT_POWER,
    CatalogViewEncoder,
    PoweredEncoder,
)

CHUNK = 48
BOTH_SIDES = 2
"""How many query-side variants (best Recall@1 per burst) are also measured on both sides."""
EXPECTED_STILETTO = (5, 4)
"""bench_pooling.py's `gap` row: the stiletto's Heels / Red with the default."""

Step = Callable[[Image.Image], Image.Image]


# -- the colour steps: uint8 RGB image -> uint8 RGB image -------------------------------


def _rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.float32)


def channel_gains(stat: Callable[[np.ndarray], np.ndarray], half: bool = False) -> Step:
    """Each channel scaled by mean(s) / s_c, s = stat of the (pixels, 3) values (gain ** 0.5
    for `half`); a channel with s under one grey level is left alone."""

    def step(img: Image.Image) -> Image.Image:
        a = _rgb(img)
        s = np.asarray(stat(a.reshape(-1, 3)), dtype=np.float64)
        gain = np.where(s >= 1.0, s.mean() / np.maximum(s, 1.0), 1.0)
        if half:
            gain = gain**0.5
        out = np.clip(np.rint(a * gain.astype(np.float32)), 0, 255).astype(np.uint8)
        return Image.fromarray(out, "RGB")

    return step


def mean(x: np.ndarray) -> np.ndarray:
    return x.mean(axis=0, dtype=np.float64)


def minkowski(p: float) -> Callable[[np.ndarray], np.ndarray]:
    """Shades of grey: the channel's p-norm mean, (mean x^p)^(1/p), in grey levels."""

    def stat(x: np.ndarray) -> np.ndarray:
        return 255.0 * np.mean((x.astype(np.float64) / 255.0) ** p, axis=0) ** (1.0 / p)

    return stat


def percentile99(x: np.ndarray) -> np.ndarray:
    return np.percentile(x, 99, axis=0)


def autocontrast(preserve_tone: bool) -> Step:
    return lambda img: ImageOps.autocontrast(img.convert("RGB"), cutoff=1,
                                             preserve_tone=preserve_tone)  # fmt: skip


STEPS: dict[str, Step | None] = {
    "none": None,
    "grey-world": channel_gains(mean),
    "shades-of-grey-p6": channel_gains(minkowski(6)),
    "white-patch": channel_gains(percentile99),
    "autocontrast": autocontrast(False),
    "autocontrast-luma": autocontrast(True),
    "grey-world-half": channel_gains(mean, half=True),
    "shades-of-grey-p6-half": channel_gains(minkowski(6), half=True),
}


# -- vectors, cached --------------------------------------------------------------------


def cached(path: Path, stamp: str, n: int, make: Callable[[], dict]) -> dict:
    """`make()`'s arrays, kept in `path` (reused when the stamp and the row count match)."""
    if path.is_file():
        with np.load(path) as data:
            if str(data["stamp"]) == stamp and len(data["v"]) == n:
                return {k: data[k] for k in data.files}
    started = time.time()
    out = make()
    np.savez(path, stamp=np.array(stamp), **out)
    print(f"{path.name}: {out['v'].shape} in {time.time() - started:.0f} s", file=sys.stderr)
    return out


def query_vectors(powered, paths: list[Path], names: list[str]) -> dict[str, dict]:
    """{variant: {"v": (N, dim) query vectors, "step_s": seconds of the step}} for these
    variants, in one decode of the photos (each view cropped once, then each step)."""
    pipes = {n: ResPipeline(powered, QUERY_VIEW, 0, STEPS[n]) for n in names}
    out = {n: [] for n in names}
    step_s = dict.fromkeys(names, 0.0)
    t0 = time.time()
    for i in range(0, len(paths), CHUNK):
        images = [load_image(p, draft_size=powered.draft_size) for p in paths[i : i + CHUNK]]
        plain = ResPipeline(powered, QUERY_VIEW, 0)
        views = [v for img in images for v in plain._views(img)]  # the crop, once
        for n, pipe in pipes.items():
            started = time.perf_counter()
            stepped = [pipe.step(v) for v in views] if pipe.step else views
            step_s[n] += time.perf_counter() - started
            arrays = np.stack([powered.prepare(v) for v in stepped])
            out[n].append(np.concatenate([powered.embed(arrays[j : j + 16])
                                          for j in range(0, len(arrays), 16)]))  # fmt: skip
        done = min(i + CHUNK, len(paths))
        print(f"  {done}/{len(paths)} photos x {len(names)} variants, {time.time() - t0:.0f} s",
              file=sys.stderr)  # fmt: skip
    return {n: {"v": np.concatenate(out[n]), "step_s": np.array(step_s[n])} for n in names}


def catalog_vectors(base, paths: list[Path], step: Step | None) -> dict:
    """As `lookalike index` stores them with the default, each image corrected first."""
    enc = CatalogViewEncoder(base, DEFAULT_CATALOG_VIEWS, DEFAULT_POWER)
    out = []
    for i in range(0, len(paths), 32):
        images = [load_image(p, draft_size=base.draft_size) for p in paths[i : i + 32]]
        out.append(enc.embed(np.stack([enc.prepare(step(m) if step else m) for m in images])))
    return {"v": np.concatenate(out)}


# -- scoring ----------------------------------------------------------------------------


def passes(r: dict, n: dict) -> bool:
    """The rule, fixed before the run: against `none` in the same run."""
    eps = 1e-9
    ok = (
        r["r1_burst"] - n["r1_burst"] >= 0.015 - eps
        and r["r5_burst"] >= n["r5_burst"] - 0.005 - eps
        and r["r1_held"] >= n["r1_held"] - eps
    )
    if r["side"] == "both":
        ok = ok and r["p10_category"] >= n["p10_category"] - eps and r["p10_colour"] >= 0.30 - eps
    return bool(ok)


def stiletto_top(q: np.ndarray, fashion: np.ndarray, frows: list[dict]) -> list[int]:
    top = np.argsort(-(fashion @ q))[:10]
    return [int(sum(frows[i]["category"] == "Heels" for i in top)),
            int(sum(frows[i]["colour"] == "Red" for i in top))]  # fmt: skip


def centred_scores(q, cat, truth, kept, held, bursts) -> dict:
    """The calibrated centre (mean query vector of the kept photos) subtracted, scored on
    the held-out photos: Recall@1 / @5 per photo and per burst of the held-out part."""
    qc = l2(q - q[kept].mean(axis=0))
    sims = qc[held] @ cat.T
    t = truth[held]
    rank = (sims > sims[np.arange(len(sims)), t][:, None]).sum(axis=1) + 1
    hb = bursts[held]
    out = {}
    for k in (1, 5):
        hit = (rank <= k).astype(np.float64)
        out[f"r{k}_held"] = round(float(hit.mean()), 4)
        out[f"r{k}_held_burst"] = round(float(np.mean([hit[hb == b].mean()
                                                       for b in sorted(set(hb))])), 4)  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="vector cache")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, help="first N photos / fashion images (smoke)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = os.environ.get("LOOKALIKE_MODELS") or os.environ.get("LOOKALIKE_TEST_MODELS")
    base = load_encoder(args.model, Path(models or Path(tempfile.gettempdir()) / "lk-models"))
    powered = PoweredEncoder(base, DEFAULT_POWER)
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    stamp = f"{base.stamp}|{QUERY_VIEW}|{','.join(DEFAULT_CATALOG_VIEWS)}|{DEFAULT_POWER}"
    tag = f"-{args.limit}" if args.limit else ""

    train = _rows(GROCERY / "train.csv")[: args.limit]  # labels only to score, find bursts
    cat_rows = _rows(GROCERY / "catalog.csv")
    if args.limit:  # a smoke run: the photos' products and a few others
        wanted = {r["product_id"] for r in train}
        cat_rows = [r for i, r in enumerate(cat_rows) if i < 4 or r["product_id"] in wanted]
    cat_ids = [r["product_id"] for r in cat_rows]
    frows = _rows(FASHION / "catalog.csv")[: args.limit]
    qpaths = [GROCERY / r["image"] for r in train]

    def queries(names: list[str]) -> dict[str, dict]:
        """The cached query vectors of these variants, the missing ones made in one pass."""
        path = {n: w / f"q-{n}{tag}.npz" for n in names}
        have = {}
        for n in names:
            if path[n].is_file():
                with np.load(path[n]) as data:
                    if str(data["stamp"]) == stamp and len(data["v"]) == len(train):
                        have[n] = {"v": data["v"], "step_s": data["step_s"]}
        todo = [n for n in names if n not in have]
        if todo:
            started = time.time()
            for n, d in query_vectors(powered, qpaths, todo).items():
                np.savez(path[n], stamp=np.array(stamp), **d)
                have[n] = d
            print(f"queries {todo}: {time.time() - started:.0f} s", file=sys.stderr)
        return have

    q = queries(list(STEPS))

    def catalog(n: str) -> np.ndarray:
        return cached(w / f"grocery-{n}{tag}.npz", stamp, len(cat_rows),
                      lambda: catalog_vectors(base, [GROCERY / r["image"] for r in cat_rows],
                                              STEPS[n]))["v"]  # fmt: skip

    def fashion(n: str) -> np.ndarray:
        return cached(w / f"fashion-{n}{tag}.npz", stamp, len(frows),
                      lambda: catalog_vectors(base, [FASHION / r["image"] for r in frows],
                                              STEPS[n]))["v"]  # fmt: skip

    stiletto_img = load_image(STILETTO, draft_size=base.draft_size)
    stiletto = {n: ResPipeline(powered, QUERY_VIEW, 0, s).embed_queries([stiletto_img])[0]
                for n, s in STEPS.items()}  # fmt: skip

    truth = np.array([cat_ids.index(r["product_id"]) for r in train])
    bursts = np.array([burst_of(r) for r in train])
    ids = sorted(set(bursts))
    bidx = [np.flatnonzero(bursts == b) for b in ids]
    boot = np.random.default_rng(1).integers(0, len(ids), (2000, len(ids)))
    held_images = {r["image"] for r in block_split(train)[1]}
    held = np.array([r["image"] in held_images for r in train])
    fields = {f: np.array([r[f] for r in frows]) for f in ("category", "colour")}

    cat_none, f_none = catalog("none"), fashion("none")
    none_sims = q["none"]["v"] @ cat_none.T
    none_hits = {k: burst_hits(none_sims, truth, bidx, k) for k in (1, 5)}

    def row(n: str, side: str) -> dict:
        cat, fcat = (catalog(n), fashion(n)) if side == "both" else (cat_none, f_none)
        sims = q[n]["v"] @ cat.T
        out = {"variant": n, "side": side, **scores_of(sims, truth, bidx, held, boot)}
        for k in (1, 5):
            diff = burst_hits(sims, truth, bidx, k) - none_hits[k]
            sample = diff[boot].mean(axis=1)
            out[f"d_r{k}_burst"] = round(float(diff.mean()), 4)
            out[f"d_r{k}_ci"] = [round(float(np.quantile(sample, c)), 3) for c in (0.025, 0.975)]
        if side == "both" or n == "none":
            out.update(leave_one_out_p10(fcat, fields))
        out["stiletto"] = stiletto_top(stiletto[n], fcat, frows)
        out["step_ms"] = round(1e3 * float(q[n]["step_s"]) / len(train), 2)
        return out

    rows = [row(n, "query" if n != "none" else "both") for n in STEPS]
    none_row = rows[0]
    best_q = sorted(rows[1:], key=lambda r: -r["r1_burst"])[:BOTH_SIDES]
    rows += [row(r["variant"], "both") for r in best_q]
    for r in rows[1:]:
        r["passes"] = passes(r, none_row)
    passing = [r for r in rows[1:] if r["passes"]]
    qside = [r for r in passing if r["side"] == "query"]
    best = max(qside or passing, key=lambda r: r["r1_burst"], default=None)

    centred = {}
    if best is not None:  # the candidate with a calibrated centre, beside `none`'s
        kept = ~held
        for r in (none_row, best):
            cat = catalog(r["variant"]) if r["side"] == "both" else cat_none
            centred[f"{r['variant']} ({r['side']})"] = centred_scores(
                q[r["variant"]]["v"], cat, truth, kept, held, bursts
            )
    report(args, base, rows, train, ids, held, best, centred)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "candidate": best and
                                         f"{best['variant']} ({best['side']})",
                                         "centred": centred}, indent=1))  # fmt: skip
    return 0


def report(args, base, rows, train, ids, held, best, centred) -> None:
    n = rows[0]
    print(f"{base.stamp}; {len(train)} train.csv photos in {len(ids)} bursts"
          f" ({int(held.sum())} in the block split's held-out part); queries {QUERY_VIEW},"
          f" catalog image + {'+'.join(DEFAULT_CATALOG_VIEWS)}, power {DEFAULT_POWER}")  # fmt: skip
    if not args.limit:
        off = {k: (n[k], e) for k, e in EXPECTED_GAP.items() if abs(n[k] - e) > 6e-4}
        if tuple(n["stiletto"]) != EXPECTED_STILETTO:
            off["stiletto"] = (n["stiletto"], EXPECTED_STILETTO)
        bad = f"none DOES NOT reproduce bench_pooling's gap figures (got, expected): {off}"
        print(bad if off else "none reproduces bench_pooling's gap figures")
    print("\n| variant | side | R@1 whole train | R@1 per burst (95 % CI) | ΔR@1 per burst vs"
          " none, points (95 % CI) | R@5 whole train | R@5 per burst (95 % CI) | ΔR@5 per"
          " burst (95 % CI) | block held-out R@1 / R@5 | fashion P@10 category / colour"
          " | stiletto Heels / Red | step ms / query | passes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "" if r is n else ("yes" if r["passes"] else "no")
        d = [f"{100 * r[f'd_r{k}_burst']:+.1f} ({100 * r[f'd_r{k}_ci'][0]:+.1f} to "
             f"{100 * r[f'd_r{k}_ci'][1]:+.1f})" if r is not n else "" for k in (1, 5)]  # fmt: skip
        fash = f"{r['p10_category']:.4f} / {r['p10_colour']:.4f}" if "p10_colour" in r else ""
        print(f"| {r['variant']} | {r['side']} | {r['r1']:.3f} | {r['r1_burst']:.3f} "
              f"({r['r1_ci'][0]:.2f}–{r['r1_ci'][1]:.2f}) | {d[0]} | {r['r5']:.3f} "
              f"| {r['r5_burst']:.3f} ({r['r5_ci'][0]:.2f}–{r['r5_ci'][1]:.2f}) | {d[1]} "
              f"| {r['r1_held']:.3f} / {r['r5_held']:.3f} | {fash} "
              f"| {'{} / {}'.format(*r['stiletto'])} | {r['step_ms']:.2f} | {ok} |")  # fmt: skip
    print("\nthe rule's candidate: " + (f"{best['variant']} ({best['side']} side"
          f"{'s' if best['side'] == 'both' else ' only'})" if best else "none passes"))  # fmt: skip
    for label, c in centred.items():
        print(f"calibrated centre (block kept photos), block held-out, {label}: R@1 / R@5"
              f" {c['r1_held']:.3f} / {c['r5_held']:.3f}, per burst {c['r1_held_burst']:.3f}"
              f" / {c['r5_held_burst']:.3f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
