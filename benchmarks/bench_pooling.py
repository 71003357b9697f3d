"""Object-focused pooling of the plain pipeline's feature maps (SCDA-style: the map
weighted by its own activation energy before pooling) against today's global average,
on the burst split of grocery train.csv (val.csv is never read) and fashion-footwear
leave-one-out precision@10 (docs/quality.md, "What was tried and not shipped").

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_pooling.py
        --workdir DIR [--limit N] [--json FILE]

The encoder's `features` output (N, 1280 + C, h, w: the head's channels after ReLU6 and
the last block's; lookalike.encoders.efficientnet) is computed once and cached in DIR
(float16 .npz) for: the 2,640 train.csv photos as the shipped query view (`centre70`,
`QueryPipeline`'s own view code), the 81 grocery catalog images and their rot-20 view,
the 2,836 fashion-footwear images and their rot-20 view, and the red stiletto
(footwear300/search_image_01.jpg, query view). Each pooling of a map gives a vector that
takes the place of the embedding, then the new-home default follows as in
`CatalogViewEncoder` / `PoweredEncoder`: a catalog image's vector is the L2 mean of its two
views' L2-normalised vectors, then power-normalised (p = 0.5); a query's is its vector
power-normalised. Poolings (energy A(x, y) = the sum of the head's 1280 channels at a
cell; the weights apply to all channels, head and block alike):

- `gap`: the mean of every cell (today's embedding);
- `scda-mask`: the mean of the cells with A above the map's mean A (Wei et al. 2017);
- `scda-mask+largest`: the same, only the largest 4-connected part of the mask (needs
  scipy; left out, and said so, when it is not installed);
- `energy^a`: the cells weighted by A^a / sum A^a, a = 0.5, 1, 2;
- `gap+scda`: the mean of the L2-normalised `gap` and `scda-mask` vectors.

Each on both sides (catalog and queries), and on the query side only (catalog `gap`).
Grocery: every train.csv photo queries the 81 catalog vectors: Recall@1 / @5 per photo,
per burst (95 % bootstrap over bursts; bench_catalog_views.scores_of) and on the block
split's held-out part (each product's last 30 % of file numbers; bench_tune_sources
.block_split), with the change in Recall@1 per burst against `gap` (paired bootstrap).
Fashion: each image's catalog vector queries all the others' (precision@10 of category
and colour); for a query-side-only pooling the query vector is the image's own views
pooled that way, the others' `gap`. Also: the stiletto's Heels / Red in its top 10 of
the fashion catalog, and the pooling's cost per query.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_catalog_views import FASHION, leave_one_out_p10, power, scores_of  # noqa: E402
from bench_query_views import GROCERY, STILETTO, _rows, burst_of, l2  # noqa: E402
from bench_tune_sources import block_split  # noqa: E402

from lookalike.encoders import DEFAULT_MODEL, load_encoder  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.views import (  # noqa: E402
    DEFAULT_CATALOG_VIEWS,
    DEFAULT_POWER,
    CatalogViewEncoder,
)
from lookalike.query import QualitySettings, QueryPipeline  # noqa: E402

QUERY_VIEW = "centre70"
HEAD = 1280
"""The head conv's channels, first in `features`; the energy is their sum."""
CHUNK = 16
EXPECTED_GAP = {"r1_burst": 0.434, "r5_burst": 0.782, "r1": 0.426, "r5": 0.788,
                "p10_category": 0.6271, "p10_colour": 0.3002}  # fmt: skip
"""bench_catalog_views.py --two-pass, image + rot-20, power 0.5 (docs/quality.md)."""
HAS_SCIPY = importlib.util.find_spec("scipy") is not None


# -- pooling: float32 (N, C, h, w) -> (N, C) --------------------------------------------


def energy(f: np.ndarray) -> np.ndarray:
    """(N, h, w): the head channels' sum at each cell (>= 0, they follow a ReLU6)."""
    return f[:, :HEAD].sum(axis=1)


def weighted(f: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The cells' mean weighted by w (N, h, w), each map's weights summing to 1."""
    return np.einsum("nchw,nhw->nc", f, w, optimize=True)


def gap(f: np.ndarray) -> np.ndarray:
    return f.mean(axis=(2, 3))


def above_mean(a: np.ndarray) -> np.ndarray:
    """SCDA's mask: the cells whose energy is above the map's mean (all, for a flat map)."""
    mask = a > a.mean(axis=(1, 2), keepdims=True)
    mask[~mask.any(axis=(1, 2))] = True
    return mask


def mask_mean(f: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)
    return weighted(f, m / m.sum(axis=(1, 2), keepdims=True))


def scda(f: np.ndarray) -> np.ndarray:
    return mask_mean(f, above_mean(energy(f)))


def scda_largest(f: np.ndarray) -> np.ndarray:
    """SCDA's mask cut to its largest 4-connected component (scipy.ndimage.label)."""
    from scipy import ndimage

    a = energy(f)
    mask = above_mean(a)
    for i, m in enumerate(mask):
        labels, n = ndimage.label(m)  # the default structure is 4-connected in 2-D
        if n > 1:
            sizes = np.bincount(labels.ravel())[1:]
            mask[i] = labels == 1 + int(np.argmax(sizes))
    return mask_mean(f, mask)


def energy_power(a_exp: float) -> Callable[[np.ndarray], np.ndarray]:
    def pool(f: np.ndarray) -> np.ndarray:
        w = energy(f) ** a_exp
        total = w.sum(axis=(1, 2), keepdims=True)
        flat = total[:, 0, 0] <= 0
        w[flat] = 1.0
        total[flat] = w.shape[1] * w.shape[2]
        return weighted(f, w / total)

    return pool


def gap_scda(f: np.ndarray) -> np.ndarray:
    return l2(gap(f)) + l2(scda(f))


POOLS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gap": gap,
    "scda-mask": scda,
    **({"scda-mask+largest": scda_largest} if HAS_SCIPY else {}),
    "energy^0.5": energy_power(0.5),
    "energy^1": energy_power(1.0),
    "energy^2": energy_power(2.0),
    "gap+scda": gap_scda,
}


def pooled(maps: np.ndarray, pool: Callable) -> np.ndarray:
    """float16 (N, C, h, w) -> (N, C) L2-normalised vectors, a few hundred maps at a time."""
    return np.concatenate(
        [l2(pool(maps[i : i + 256].astype(np.float32))) for i in range(0, len(maps), 256)]
    )


def query_vectors(maps: np.ndarray, pool: Callable) -> np.ndarray:
    """As `PoweredEncoder` embeds a query: the vector, power-normalised."""
    return power(pooled(maps, pool), DEFAULT_POWER)


def catalog_vectors(maps: np.ndarray, pool: Callable) -> np.ndarray:
    """(N, k, C, h, w) -> as `CatalogViewEncoder` embeds: the L2 mean of the views' vectors,
    then power-normalised."""
    views = [pooled(maps[:, j], pool) for j in range(maps.shape[1])]
    return power(l2(sum(views)), DEFAULT_POWER)


# -- feature maps, cached ---------------------------------------------------------------


def feature_maps(base, arrays) -> np.ndarray:
    """float16 (N, C, h, w) of an iterable of lists of prepared (S, S, 3) arrays."""
    out, t0, done = [], time.time(), 0
    for chunk in arrays:
        out.append(base.features(np.stack(chunk)).astype(np.float16))
        done += len(chunk)
        if len(out) % 20 == 0:
            print(f"  {done} maps, {time.time() - t0:.0f} s", file=sys.stderr)
    return np.concatenate(out)


def chunks(items: list, n: int = CHUNK):
    for i in range(0, len(items), n):
        yield items[i : i + n]


def cached(path: Path, stamp: str, n: int, make: Callable[[], np.ndarray]) -> np.ndarray:
    if path.is_file():
        data = np.load(path)
        if str(data["stamp"]) == stamp and len(data["maps"]) == n:
            return data["maps"]
    started = time.time()
    maps = make()
    np.savez(path, maps=maps, stamp=np.array(stamp))
    print(f"{path.name}: {maps.shape} in {time.time() - started:.0f} s", file=sys.stderr)
    return maps


def query_maps(base, paths: list[Path]) -> np.ndarray:
    pipe = QueryPipeline(base, QualitySettings(query_views=(QUERY_VIEW,), centre=False))

    def prepared():
        for group in chunks(paths):
            images = [load_image(p, draft_size=base.draft_size) for p in group]
            yield [base.prepare(v) for img in images for v in pipe._views(img)]

    return feature_maps(base, prepared())


def view_maps(base, paths: list[Path]) -> np.ndarray:
    """(N, 1 + views, C, h, w): each image and its default catalog views."""
    enc = CatalogViewEncoder(base, DEFAULT_CATALOG_VIEWS)
    k = 1 + len(DEFAULT_CATALOG_VIEWS)

    def prepared():
        for group in chunks(paths, CHUNK // k):
            images = [load_image(p, draft_size=base.draft_size) for p in group]
            yield [a for img in images for a in enc.prepare(img)]

    maps = feature_maps(base, prepared())
    return maps.reshape(len(paths), k, *maps.shape[1:])


# -- scoring ----------------------------------------------------------------------------


def cross_p10(q: np.ndarray, c: np.ndarray, fields: dict[str, np.ndarray]) -> dict[str, float]:
    """leave_one_out_p10 with queries `q` against catalog `c` (row i is the same image)."""
    sims = q @ c.T
    np.fill_diagonal(sims, -np.inf)
    top = np.argsort(-sims, axis=1)[:, :10]
    return {f"p10_{f}": round(float((v[top] == v[:, None])[v != ""].mean()), 4)
            for f, v in fields.items()}  # fmt: skip


def burst_hits(sims: np.ndarray, truth: np.ndarray, bidx: list, k: int = 1) -> np.ndarray:
    """Each burst's share of photos whose product is in the top k (for paired bootstraps)."""
    rank = (sims > sims[np.arange(len(sims)), truth][:, None]).sum(axis=1) + 1
    hit = (rank <= k).astype(np.float64)
    return np.array([hit[i].mean() for i in bidx])


def passes(r: dict, g: dict) -> bool:
    """The rule, fixed before the run: against `gap` in the same run."""
    eps = 1e-9
    return bool(
        r["r1_burst"] - g["r1_burst"] >= 0.015 - eps
        and r["r5_burst"] >= g["r5_burst"] - 0.005 - eps
        and r["r1_held"] >= g["r1_held"] - eps
        and r["p10_category"] >= g["p10_category"] - eps
        and r["p10_colour"] >= 0.30 - eps
    )


def pool_cost(maps: np.ndarray) -> dict[str, float]:
    """Microseconds a query for each pooling (with its L2 and the power), median of runs."""
    one = maps[:1].astype(np.float32)
    out = {}
    for name, pool in POOLS.items():
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(200):
                power(l2(pool(one)), DEFAULT_POWER)
            times.append((time.perf_counter() - t0) / 200)
        out[name] = round(1e6 * float(np.median(times)), 1)
    return out


def output_cost(base) -> dict[str, float]:
    """Milliseconds of one single-image forward pass fetching `embedding` or `features`."""
    x = np.full((1, base.input_size, base.input_size, 3), 128, dtype=np.uint8)
    times: dict[str, list[float]] = {"embedding": [], "features": []}
    for _ in range(15):
        for name in times:
            t0 = time.perf_counter()
            base.run(x, [name])
            times[name].append(time.perf_counter() - t0)
    return {k: round(1e3 * float(np.median(v)), 1) for k, v in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="feature-map cache")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--limit", type=int, help="first N photos / fashion images (smoke)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models = os.environ.get("LOOKALIKE_MODELS") or os.environ.get("LOOKALIKE_TEST_MODELS")
    base = load_encoder(args.model, Path(models or Path(tempfile.gettempdir()) / "lk-models"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{base.stamp}|{QUERY_VIEW}|{','.join(DEFAULT_CATALOG_VIEWS)}"
    tag = f"-{args.limit}" if args.limit else ""

    train = _rows(GROCERY / "train.csv")[: args.limit]  # labels only to score, find bursts
    cat_rows = _rows(GROCERY / "catalog.csv")
    if args.limit:  # a smoke run: the photos' products and a few others
        wanted = {r["product_id"] for r in train}
        cat_rows = [r for i, r in enumerate(cat_rows) if i < 4 or r["product_id"] in wanted]
    cat_ids = [r["product_id"] for r in cat_rows]
    frows = _rows(FASHION / "catalog.csv")[: args.limit]
    w = args.workdir
    qmaps = cached(w / f"grocery-queries{tag}.npz", stamp, len(train),
                   lambda: query_maps(base, [GROCERY / r["image"] for r in train]))  # fmt: skip
    cmaps = cached(w / f"grocery-catalog{tag}.npz", stamp, len(cat_rows),
                   lambda: view_maps(base, [GROCERY / r["image"] for r in cat_rows]))  # fmt: skip
    fmaps = cached(w / f"fashion{tag}.npz", stamp, len(frows),
                   lambda: view_maps(base, [FASHION / r["image"] for r in frows]))  # fmt: skip
    smaps = cached(w / "stiletto.npz", stamp, 1, lambda: query_maps(base, [STILETTO]))
    assert qmaps.shape[1] > HEAD, qmaps.shape

    # the maps' mean is the embedding: check it on a few catalog images
    enc = CatalogViewEncoder(base, DEFAULT_CATALOG_VIEWS)
    probe = [load_image(GROCERY / r["image"], draft_size=base.draft_size) for r in cat_rows[:4]]
    probe = np.concatenate([enc.prepare(img) for img in probe])
    agree = (base.embed(probe) * l2(gap(base.features(probe)))).sum(axis=1)
    print(f"embedding vs L2 mean of features, cosine: min {agree.min():.6f}", file=sys.stderr)

    truth = np.array([cat_ids.index(r["product_id"]) for r in train])
    bursts = np.array([burst_of(r) for r in train])
    ids = sorted(set(bursts))
    bidx = [np.flatnonzero(bursts == b) for b in ids]
    boot = np.random.default_rng(1).integers(0, len(ids), (2000, len(ids)))
    held_images = {r["image"] for r in block_split(train)[1]}
    held = np.array([r["image"] in held_images for r in train])
    fields = {f: np.array([r[f] for r in frows]) for f in ("category", "colour")}

    vec = {name: {"q": query_vectors(qmaps, pool), "c": catalog_vectors(cmaps, pool),
                  "f": catalog_vectors(fmaps, pool), "s": query_vectors(smaps, pool)[0]}
           for name, pool in POOLS.items()}  # fmt: skip
    g = vec["gap"]
    g_hits = burst_hits(g["q"] @ g["c"].T, truth, bidx)
    rows: list[dict] = []
    for name in POOLS:
        for side in ("both", "query") if name != "gap" else ("both",):
            v = vec[name]
            cat, fcat = (v["c"], v["f"]) if side == "both" else (g["c"], g["f"])
            sims = v["q"] @ cat.T
            diff = burst_hits(sims, truth, bidx) - g_hits
            sample = diff[boot].mean(axis=1)
            top = np.argsort(-(fcat @ v["s"]))[:10]
            rows.append({
                "pooling": name, "side": side, **scores_of(sims, truth, bidx, held, boot),
                "d_r1_burst": round(float(diff.mean()), 4),
                "d_r1_ci": [round(float(np.quantile(sample, c)), 3) for c in (0.025, 0.975)],
                **(leave_one_out_p10(v["f"], fields) if side == "both"
                   else cross_p10(v["f"], fcat, fields)),
                "stiletto": [int(sum(frows[i]["category"] == "Heels" for i in top)),
                             int(sum(frows[i]["colour"] == "Red" for i in top))],
            })  # fmt: skip
    gap_row = rows[0]
    for r in rows[1:]:
        r["passes"] = passes(r, gap_row)
    cost = pool_cost(qmaps)
    outputs = output_cost(base)
    report(args, base, rows, train, ids, held, cost, outputs, qmaps.shape[1:])
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "pool_us": cost, "pass_ms": outputs},
                                        indent=1))  # fmt: skip
    return 0


def report(args, base, rows, train, ids, held, cost, outputs, shape) -> None:  # fmt: skip
    g = rows[0]
    print(f"{base.stamp}; feature maps {shape}; {len(train)} train.csv photos in {len(ids)}"
          f" bursts ({int(held.sum())} in the block split's held-out part); queries"
          f" {QUERY_VIEW}, catalog image + {'+'.join(DEFAULT_CATALOG_VIEWS)}, power"
          f" {DEFAULT_POWER}")  # fmt: skip
    if not args.limit:
        off = {k: (g[k], e) for k, e in EXPECTED_GAP.items() if abs(g[k] - e) > 6e-4}
        bad = f"gap DOES NOT reproduce the default figures (got, expected): {off}"
        print(bad if off else "gap reproduces bench_catalog_views' default figures")
    if not HAS_SCIPY:
        print("scda-mask+largest: skipped (scipy is not installed in this venv)")
    print("\n| pooling | side | R@1 whole train | R@1 per burst (95 % CI) | ΔR@1 per burst vs gap"
          " (95 % CI) | R@5 whole train | R@5 per burst (95 % CI) | block held-out R@1 / R@5"
          " | fashion P@10 category / colour | stiletto Heels / Red | passes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ok = "" if r is g else ("yes" if r["passes"] else "no")
        print(f"| {r['pooling']} | {r['side']} | {r['r1']:.3f} | {r['r1_burst']:.3f} "
              f"({r['r1_ci'][0]:.2f}–{r['r1_ci'][1]:.2f}) | {100 * r['d_r1_burst']:+.1f} "
              f"({100 * r['d_r1_ci'][0]:+.1f} to {100 * r['d_r1_ci'][1]:+.1f}) | {r['r5']:.3f} "
              f"| {r['r5_burst']:.3f} ({r['r5_ci'][0]:.2f}–{r['r5_ci'][1]:.2f}) "
              f"| {r['r1_held']:.3f} / {r['r5_held']:.3f} | {r['p10_category']:.4f} / "
              f"{r['p10_colour']:.4f} | {'{} / {}'.format(*r['stiletto'])} | {ok} |")  # fmt: skip
    passing = [r for r in rows[1:] if r["passes"]]
    best = max(passing, key=lambda r: r["r1_burst"], default=None)
    print("\nthe rule's candidate: " + (f"{best['pooling']} ({best['side']} side"
          f"{'s' if best['side'] == 'both' else ' only'})" if best else "none passes"))  # fmt: skip
    print(
        "pooling per query (L2 and power included), µs: "
        + ", ".join(f"{k} {v}" for k, v in cost.items())
    )
    print(
        f"one forward pass, batch 1, ms (median of 15): embedding output "
        f"{outputs['embedding']}, features output {outputs['features']}"
    )


if __name__ == "__main__":
    sys.exit(main())
