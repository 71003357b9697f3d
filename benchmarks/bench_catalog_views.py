"""Catalog-side views and other catalog-side changes for the plain pipeline, on the burst
split of grocery train.csv (val.csv is never read), and on fashion-footwear leave-one-out
precision@10 (category, colour): the selection set of the `catalog_views` default
(lookalike.models.views, docs/quality.md "Catalog views").

    .venv/bin/python benchmarks/bench_catalog_views.py [--cache FILE.npz] [--no-fashion]
        [--json FILE] [--two-pass]

Every train.csv photo (2,640) is a query, embedded with the shipped query view
(`centre70`; `--cache` reuses bench_query_views.py's cache of raw view vectors), against
the 81 catalog images embedded

- as the mean of their views (`CatalogViewEncoder`, what `lookalike index` stores: one
  vector per image);
- as separate vectors per view, the product scored by its best one (k vectors per image;
  zoomed-out views: the product pasted at 50-80 % scale on white, grey or its own edge
  pixels, like a product seen smaller in a shop photo);
- with the catalog's mean vector subtracted from catalog and query vectors;
- with power normalisation (sign(x)|x|^p, then L2) on both sides: a new embedding, not
  a catalog-side setting.

`--two-pass` measures instead the sets of at most two forward passes per catalog image
(the image + one view, the mean of the two), each as it is and with power normalisation
p = 0.75 and 0.5 on both sides, beside power normalisation of the image alone.

Scored per photo, per burst (a burst is ten consecutive file numbers of one product; 95 %
bootstrap over bursts) and on the held-out quarter of bench_tune_sources.py `--selection`.
Fashion: each of the 2,836 images queries all others with its stored vector.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
FASHION = (ROOT / "../shared/data/fashion-footwear").resolve()

from bench_query_views import GROCERY, _rows, burst_of, embed_views, held_out, l2  # noqa: E402

from lookalike.encoders import DEFAULT_MODEL, load_encoder  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.models.views import (  # noqa: E402
    CATALOG_VIEWS,
    TURNED_VIEWS,
    CatalogViewEncoder,
)

QUERY_VIEW = "centre70"
MEAN_SETS = (
    (), ("flip",), ("rot20",), ("rot-20",), ("rot10", "rot-10"), ("rot15", "rot-15"),
    ("rot20", "rot-20"), ("rot25", "rot-25"), ("rot30", "rot-30"),
    ("flip", "rot10", "rot-10"), ("flip", "rot20", "rot-20"), ("flip", "rot30", "rot-30"),
    ("flip", "rot10", "rot-10", "rot20", "rot-20"),
)  # fmt: skip
FASHION_SETS = ((), ("flip",), ("rot20",), ("rot-20",), ("rot20", "rot-20"),
                ("flip", "rot20", "rot-20"), ("flip", "rot30", "rot-30"))  # fmt: skip


def zoom_out(img: Image.Image, scale: float, background: str) -> Image.Image:
    """`img` at `scale` of a canvas of its size / scale: white, grey, or its edges extended."""
    img = img.convert("RGB")
    w, h = img.size
    cw, ch = round(w / scale), round(h / scale)
    left, top = (cw - w) // 2, (ch - h) // 2
    if background == "edge":
        a = np.pad(np.asarray(img), ((top, ch - h - top), (left, cw - w - left), (0, 0)), "edge")
        return Image.fromarray(a)
    canvas = Image.new("RGB", (cw, ch), {"white": (255,) * 3, "grey": (128,) * 3}[background])
    canvas.paste(img, (left, top))
    return canvas


ZOOMS = {f"zoom{int(s * 100)}{bg}": (s, bg) for s in (0.5, 0.6, 0.8)
         for bg in ("white", "grey", "edge")}  # fmt: skip


def scores_of(sims: np.ndarray, truth: np.ndarray, bidx: list, held: np.ndarray,
              boot: np.ndarray) -> dict:  # fmt: skip
    """(N, P) product scores -> Recall@1/@5 per photo, per burst (CI), held-out quarter."""
    rank = (sims > sims[np.arange(len(sims)), truth][:, None]).sum(axis=1) + 1
    out: dict = {}
    for k in (1, 5):
        hit = (rank <= k).astype(np.float64)
        per_burst = np.array([hit[i].mean() for i in bidx])
        sample = per_burst[boot].mean(axis=1)
        out[f"r{k}"] = round(hit.mean(), 4)
        out[f"r{k}_burst"] = round(per_burst.mean(), 4)
        out[f"r{k}_ci"] = [round(float(np.quantile(sample, c)), 3) for c in (0.025, 0.975)]
        out[f"r{k}_held"] = round(hit[held].mean(), 4)
    return out


def power(x: np.ndarray, p: float) -> np.ndarray:
    return l2(np.sign(x) * np.abs(x) ** p)


TWO_PASS_VIEWS = ("rot15", "rot20", "rot25", "rot-20", "flip", "flip>rot20")
"""The one extra view of each 2-pass set; "flip>rot20" is the mirror turned by 20 degrees."""
POWERS = (None, 0.75, 0.5)


def one_view(img: Image.Image, view: str) -> Image.Image:
    """`img` as the named view ("a>b": view a, then view b of it)."""
    img = img.convert("RGB")
    for v in view.split(">"):
        img = CATALOG_VIEWS[v](img)
    return img


def two_pass_sets(single: dict[str, np.ndarray]) -> list[tuple[str, int, np.ndarray]]:
    """(label, passes, catalog vectors) of the image alone and the image + each view (mean
    of the two L2-normalised view vectors, as CatalogViewEncoder), each without and with
    power normalisation; `single` maps "orig" and each view to its (N, dim) vectors."""
    out = []
    for view in ("", *TWO_PASS_VIEWS):
        mean = l2(single["orig"] + single[view]) if view else single["orig"]
        for p in POWERS:
            label = ("image + " + view if view else "image alone") + (f", power {p}" if p else "")
            out.append((label, 2 if view else 1, power(mean, p) if p else mean))
    return out


def embed_single(base, images: list, views) -> dict[str, np.ndarray]:
    """The base vectors of `images` ("orig") and of each view of them (chunks of 64)."""
    out = {}
    for view in ("orig", *views):
        vecs = []
        for i in range(0, len(images), 64):
            chunk = images[i : i + 64]
            chunk = chunk if view == "orig" else [one_view(img, view) for img in chunk]
            vecs.append(base.embed(np.stack([base.prepare(img.convert("RGB")) for img in chunk])))
        out[view] = l2(np.concatenate(vecs))
    return out


def fashion_two_pass(base) -> list[dict]:
    rows = _rows(FASHION / "catalog.csv")
    fields = {f: np.array([r[f] for r in rows]) for f in ("category", "colour")}
    images = [load_image(FASHION / r["image"], draft_size=base.draft_size) for r in rows]
    out = []
    for label, passes, v in two_pass_sets(embed_single(base, images, TWO_PASS_VIEWS)):
        out.append({"label": "fashion, " + label, "catalog_passes": passes,
                    **leave_one_out_p10(v, fields)})  # fmt: skip
        print(out[-1], file=sys.stderr)
    return out


def leave_one_out_p10(
    v: np.ndarray, fields: dict[str, np.ndarray], against: np.ndarray | None = None
) -> dict[str, float]:
    """Precision@10 per field of each vector's nearest others (one image per product);
    `against`: the other images' vectors made another way (row i the same image as v's)."""
    sims = v @ (v if against is None else against).T
    np.fill_diagonal(sims, -np.inf)  # one image per product: leave-one-out
    top = np.argsort(-sims, axis=1)[:, :10]
    out = {}
    for f, vals in fields.items():
        ok = vals != ""
        out[f"p10_{f}"] = round(float((vals[top] == vals[:, None])[ok].mean()), 4)
    return out


def fashion_rows(base, sets) -> list[dict]:
    rows = _rows(FASHION / "catalog.csv")
    fields = {f: np.array([r[f] for r in rows]) for f in ("category", "colour")}
    out = []
    for views in sets:
        enc = CatalogViewEncoder(base, views) if views else base
        started, vecs = time.perf_counter(), []
        for i in range(0, len(rows), 64):
            imgs = [load_image(FASHION / r["image"], draft_size=base.draft_size)
                    for r in rows[i : i + 64]]  # fmt: skip
            vecs.append(enc.embed(np.stack([enc.prepare(img) for img in imgs])))
        seconds = time.perf_counter() - started
        row = {"label": "fashion, catalog views " + ("+".join(views) or "none"),
               "seconds": round(seconds, 1), "images": len(rows),
               **leave_one_out_p10(np.concatenate(vecs), fields)}  # fmt: skip
        out.append(row)
        print(row, file=sys.stderr)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, help="bench_query_views.py's raw view vectors")
    parser.add_argument("--no-fashion", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--two-pass", action="store_true", help="the sets of <= 2 passes")
    args = parser.parse_args()
    models = Path(os.environ.get("LOOKALIKE_MODELS") or Path(tempfile.gettempdir()) / "lk-models")
    base = load_encoder(args.model, models)

    cat_rows = _rows(GROCERY / "catalog.csv")
    cat_ids = [r["product_id"] for r in cat_rows]
    images = [load_image(GROCERY / r["image"], draft_size=base.draft_size) for r in cat_rows]
    train = _rows(GROCERY / "train.csv")  # labels used only to score and to find bursts
    truth = np.array([cat_ids.index(r["product_id"]) for r in train])
    bursts = np.array([burst_of(r) for r in train])
    held = np.array([held_out(b) for b in bursts])
    ids = sorted(set(bursts))
    bidx = [np.flatnonzero(bursts == b) for b in ids]
    boot = np.random.default_rng(1).integers(0, len(ids), (2000, len(ids)))

    q = None
    if args.cache and args.cache.is_file():
        data = np.load(args.cache)
        if QUERY_VIEW in list(data["views"]) and data["stamp"] == base.stamp:
            q = data["vectors"][:, list(data["views"]).index(QUERY_VIEW)]
    if q is None:
        q = embed_views(base, [GROCERY / r["image"] for r in train], [QUERY_VIEW])[:, 0]
    q = l2(q.astype(np.float32))

    rows: list[dict] = []

    def add(label: str, sims: np.ndarray, passes: int) -> None:
        rows.append({"label": label, "catalog_passes": passes,
                     **scores_of(sims, truth, bidx, held, boot)})  # fmt: skip

    if args.two_pass:
        for label, passes, cat in two_pass_sets(embed_single(base, images, TWO_PASS_VIEWS)):
            qp = power(q, float(label.rsplit(" ", 1)[1])) if ", power" in label else q
            add(label, qp @ cat.T, passes)
        return report(args, base, rows, train, ids, held, cat_ids,
                      [] if args.no_fashion else fashion_two_pass(base))  # fmt: skip

    started = time.perf_counter()
    mean_vectors = {}
    for views in MEAN_SETS:
        enc = CatalogViewEncoder(base, views) if views else base
        cat = enc.embed(np.stack([enc.prepare(img) for img in images]))
        mean_vectors[views] = cat
        add("mean of views: " + ("+".join(views) or "none (the image alone)"), q @ cat.T,
            1 + len(views))  # fmt: skip
    print(f"mean-of-views catalogs: {time.perf_counter() - started:.0f} s", file=sys.stderr)

    single = {"orig": mean_vectors[()]}
    for name, (s, bg) in ZOOMS.items():
        single[name] = base.embed(np.stack([base.prepare(zoom_out(i, s, bg)) for i in images]))
    for v in ("flip", "rot20", "rot-20"):  # the view alone: its own vector, not a mean
        view = CATALOG_VIEWS[v]
        single[v] = base.embed(np.stack([base.prepare(view(i.convert("RGB"))) for i in images]))
    for extra in [("flip",), ("flip", "rot20", "rot-20"), *[(z,) for z in ZOOMS]]:
        sims = np.max([q @ single[v].T for v in ("orig", *extra)], axis=0)
        add("separate vectors, best of: image+" + "+".join(extra), sims, 1 + len(extra))

    for views in ((), TURNED_VIEWS):
        cat = mean_vectors[views]
        for frac in (0.5, 1.0):
            mu = frac * cat.mean(axis=0)
            add(f"catalog mean x{frac} subtracted, views {'+'.join(views) or 'none'}",
                l2(q - mu) @ l2(cat - mu).T, 1 + len(views))  # fmt: skip
        for p in (0.75, 0.5):
            add(f"power normalisation p={p} (both sides), views {'+'.join(views) or 'none'}",
                power(q, p) @ power(cat, p).T, 1 + len(views))  # fmt: skip

    fashion = [] if args.no_fashion else fashion_rows(base, FASHION_SETS)
    return report(args, base, rows, train, ids, held, cat_ids, fashion)


def report(args, base, rows, train, ids, held, cat_ids, fashion) -> int:  # fmt: skip
    print(f"{base.stamp}; {len(train)} train.csv photos in {len(ids)} bursts"
          f" ({int(held.sum())} held out) vs {len(cat_ids)} catalog images;"
          f" queries: {QUERY_VIEW}")  # fmt: skip
    print(
        "| catalog side | passes / image | R@1 (photos) | R@1 per burst (95 % CI) "
        "| R@5 (photos) | R@5 per burst (95 % CI) | held-out quarter R@1 / R@5 |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['catalog_passes']} | {r['r1']:.3f} | {r['r1_burst']:.3f} "
              f"({r['r1_ci'][0]:.2f}–{r['r1_ci'][1]:.2f}) | {r['r5']:.3f} | {r['r5_burst']:.3f} "
              f"({r['r5_ci'][0]:.2f}–{r['r5_ci'][1]:.2f}) | {r['r1_held']:.3f} / "
              f"{r['r5_held']:.3f} |")  # fmt: skip
    if fashion:
        print("\n| fashion-footwear, catalog views | P@10 category | P@10 colour | embed s |")
        print("|---|---|---|---|")
        for r in fashion:
            print(f"| {r['label']} | {r['p10_category']:.4f} | {r['p10_colour']:.4f} "
                  f"| {r.get('seconds', '')} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"grocery": rows, "fashion": fashion}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
