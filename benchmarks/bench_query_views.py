"""Single query views on the burst split of grocery train.csv: the selection set for the
plain pipeline's default `query_views` (docs/quality.md). val.csv is never read here.

    .venv/bin/python benchmarks/bench_query_views.py [--views full,centre80,...]
        [--cache FILE.npz] [--json FILE]

Plain search learns nothing, so every train.csv photo (2,640) can be a selection query:
each is embedded as each view (the shipped `QueryPipeline`, one view at a time) and
searched against the 81 catalog images (cosine, the catalog embedded by the encoder's
own `prepare`, as `lookalike index` does). Scored per photo and per burst (a burst is
ten consecutive file numbers of one product, the unit that photos are alike in; the
interval is a 95 % bootstrap over bursts), and on the quarter of bursts that
bench_tune_sources.py `--selection` holds out (by a hash of the burst id).

Also: view pairs summed (two forward passes), and the calibrated centre (computed from
the other three quarters' photos, no labels) applied to a view when the centre was made
with the same view or with `full` (a centre stored before the default changed).

Resolution variants (`--views centre70@cat,centre70@x0.8,centre70@blur1.0`): the view is
brought down to the catalog's resolution before the encoder's `prepare` upsamples it.
`VIEW@N` resizes the view (antialiased bicubic) so its shorter side is N px, `@cat` uses
the catalog's median shorter side (grocery: 198), `@xF` scales by F (`@cat:lanczos`,
`:box`, `:bilinear` name the filter), `@blurS` applies a Gaussian blur of sigma S view
pixels instead; a view already at or under the target is left alone. `--stiletto` adds
the red stiletto of `make run` against the fashion-footwear catalog (Heels / Red in its
top 10; `@cat` is then that catalog's own median, 60). Measured and not shipped
(docs/quality.md, "What was tried and not shipped").
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
GROCERY = (ROOT / "../shared/data/grocery").resolve()

from lookalike.encoders import DEFAULT_MODEL, load_encoder  # noqa: E402
from lookalike.images import load_image  # noqa: E402
from lookalike.query import QUERY_VIEWS, QualitySettings, QueryPipeline  # noqa: E402

DEFAULT_VIEWS = "full,centre95,centre90,centre85,centre80,centre75,centre70,centre60"
PAIRS = (("full", "centre80"), ("full", "centre70"), ("centre90", "centre70"))
CHUNK = 48
FASHION = (ROOT / "../shared/data/fashion-footwear").resolve()
STILETTO = (ROOT / "../shared/data/footwear300/search_image_01.jpg").resolve()


FILTERS = {"bicubic": Image.Resampling.BICUBIC, "lanczos": Image.Resampling.LANCZOS,
           "box": Image.Resampling.BOX, "bilinear": Image.Resampling.BILINEAR}  # fmt: skip


def lowres(spec: str, catalog_side: int):
    """The image -> image step of a resolution variant (`198`, `cat`, `x0.8`, `blur1.0`;
    `cat:lanczos` etc. names the resize filter, bicubic by default)."""
    spec, _, name = spec.partition(":")
    resample = FILTERS[name or "bicubic"]
    if spec.startswith("blur"):
        sigma = float(spec[4:])
        return lambda img: img.filter(ImageFilter.GaussianBlur(sigma))

    def resize(img: Image.Image) -> Image.Image:
        short = min(img.size)
        side = round(short * float(spec[1:])) if spec.startswith("x") else (
            catalog_side if spec == "cat" else int(spec))  # fmt: skip
        if side >= short:
            return img
        w, h = img.size
        size = (max(1, round(w * side / short)), max(1, round(h * side / short)))
        return img.resize(size, resample)

    return resize


class ResPipeline(QueryPipeline):
    """The shipped pipeline of one view, with a resolution step after the view."""

    def __init__(self, base, view: str, catalog_side: int, step=None) -> None:
        """`step`: an image -> image step to use instead of the view's `@spec` one
        (bench_query_colour.py's colour steps)."""
        name, _, spec = view.partition("@")
        super().__init__(base, QualitySettings(query_views=(name,), centre=False))
        self.step = step or (lowres(spec, catalog_side) if spec else None)

    def _views(self, img):
        views = super()._views(img)
        return [self.step(v) for v in views] if self.step else views


def median_short_side(images) -> int:
    return int(np.median([min(img.size) for img in images]))


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def burst_of(row: dict[str, str]) -> str:
    """The burst id of bench_tune_sources.burst_split: product and file number // 10."""
    n = int(re.search(r"_(\d+)\.\w+$", row["image"]).group(1))
    return f"{row['product_id']}/{(n - 1) // 10}"


def held_out(burst: str) -> bool:
    return int(hashlib.md5(burst.encode()).hexdigest(), 16) % 4 == 0


def l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embed_views(base, paths: list[Path], views: list[str], catalog_side: int = 0) -> np.ndarray:
    """(N, V, dim) raw view vectors, decoded a chunk at a time (2,640 photos at 2x the
    input would not fit in memory at once). `catalog_side` is read by `@cat` views only."""
    pipes = [ResPipeline(base, v, catalog_side) for v in views]
    out = []
    t0 = time.time()
    for i in range(0, len(paths), CHUNK):
        images = [load_image(p, draft_size=base.draft_size) for p in paths[i : i + CHUNK]]
        out.append(np.stack([p.raw_query_views(images)[:, 0] for p in pipes], axis=1))
        done = min(i + CHUNK, len(paths))
        print(f"  {done}/{len(paths)} photos, {time.time() - t0:.0f} s", file=sys.stderr)
    return np.concatenate(out).astype(np.float16)


def score(q: np.ndarray, cat: np.ndarray, truth: np.ndarray, bursts: np.ndarray,
          held: np.ndarray, boot: list[np.ndarray]) -> dict:  # fmt: skip
    order = np.argsort(-(l2(q) @ cat.T), axis=1)
    rank = np.argmax(order == truth[:, None], axis=1) + 1
    out: dict = {}
    for k in (1, 5):
        hit = (rank <= k).astype(np.float64)
        per_burst = np.array([hit[idx].mean() for idx in boot[0]])
        sample = per_burst[boot[1]].mean(axis=1)
        out[f"r{k}"] = round(hit.mean(), 4)
        out[f"r{k}_burst"] = round(per_burst.mean(), 4)
        out[f"r{k}_ci"] = [round(float(np.quantile(sample, c)), 3) for c in (0.025, 0.975)]
        out[f"r{k}_held"] = round(hit[held].mean(), 4)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", default=DEFAULT_VIEWS)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache", type=Path, help="keep/reuse the raw view vectors here")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--stiletto", action="store_true", help="also the red stiletto")
    args = parser.parse_args()
    views = [v for v in args.views.split(",") if v]
    bad = [v for v in views if v.partition("@")[0] not in QUERY_VIEWS]
    if bad:
        parser.error(f"unknown views {bad}")
    models = Path(os.environ.get("LOOKALIKE_MODELS") or Path(tempfile.gettempdir()) / "lk-models")
    base = load_encoder(args.model, models)

    cat_rows = _rows(GROCERY / "catalog.csv")
    cat_ids = [r["product_id"] for r in cat_rows]
    cat_images = [load_image(GROCERY / r["image"], draft_size=base.draft_size) for r in cat_rows]
    cat = base.embed(np.stack([base.prepare(img) for img in cat_images]))
    catalog_side = median_short_side(cat_images)
    train = _rows(GROCERY / "train.csv")  # labels used only to score and to find bursts
    truth = np.array([cat_ids.index(r["product_id"]) for r in train])
    bursts = np.array([burst_of(r) for r in train])
    held = np.array([held_out(b) for b in bursts])
    ids = sorted(set(bursts))
    boot = [[np.flatnonzero(bursts == b) for b in ids],
            np.random.default_rng(1).integers(0, len(ids), (2000, len(ids)))]  # fmt: skip

    cached = None
    if args.cache and args.cache.is_file():
        data = np.load(args.cache)
        if list(data["views"]) == views and data["stamp"] == base.stamp:
            cached = data["vectors"]
    vectors = cached if cached is not None else embed_views(
        base, [GROCERY / r["image"] for r in train], views, catalog_side)  # fmt: skip
    if args.cache and cached is None:
        np.savez(args.cache, vectors=vectors, views=np.array(views), stamp=np.array(base.stamp))
    vectors = vectors.astype(np.float32)
    col = {v: vectors[:, i] for i, v in enumerate(views)}

    rows: list[dict] = []

    def add(label: str, passes: int, q: np.ndarray) -> None:
        rows.append({"label": label, "passes": passes, **score(q, cat, truth, bursts, held, boot)})

    for v in views:
        add(v, 1, col[v])
    for pair in PAIRS:
        if all(v in col for v in pair):
            add(" + ".join(pair), 2, sum(col[v] for v in pair))
    # centring: the mean of the kept three quarters' photos (no labels), scored on the held
    # quarter only (the r*_held columns); a centre made with `full` beside one made with v
    for v in views:
        for made_with in dict.fromkeys(w for w in ("full", v) if w in col):
            mean = col[made_with][~held].mean(axis=0)
            add(f"{v}, centred (centre made with {made_with})", 1, l2(col[v] - mean))

    print(
        f"{base.stamp}; {len(train)} train.csv photos in {len(ids)} bursts"
        f" ({int(held.sum())} in the held-out quarter) vs {len(cat_ids)} catalog images"
        f" (median shorter side {catalog_side} px)"
    )
    print("| query views | passes | R@1 (photos) | R@1 per burst (95 % CI) | R@5 (photos) "
          "| R@5 per burst (95 % CI) | held-out quarter R@1 / R@5 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['passes']} | {r['r1']:.3f} | {r['r1_burst']:.3f} "
              f"({r['r1_ci'][0]:.2f}–{r['r1_ci'][1]:.2f}) | {r['r5']:.3f} | {r['r5_burst']:.3f} "
              f"({r['r5_ci'][0]:.2f}–{r['r5_ci'][1]:.2f}) | {r['r1_held']:.3f} / "
              f"{r['r5_held']:.3f} |")  # fmt: skip
    if args.stiletto:
        for label, (heels, red) in stiletto(base, views).items():
            print(f"- red stiletto, {label}: {heels} Heels, {red} Red in the top 10")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def stiletto(base, views: list[str]) -> dict[str, tuple[int, int]]:
    """Heels / Red in the stiletto's top 10 against the fashion-footwear catalog embedded
    as `lookalike index` embeds it (the encoder's `prepare`), per view."""
    frows = _rows(FASHION / "catalog.csv")
    images = [load_image(FASHION / r["image"], draft_size=base.draft_size) for r in frows]
    side = median_short_side(images)
    cat = np.concatenate([base.embed(np.stack([base.prepare(img) for img in images[i : i + 64]]))
                          for i in range(0, len(images), 64)])  # fmt: skip
    query = load_image(STILETTO, draft_size=base.draft_size)
    out = {}
    for v in views:
        vec = ResPipeline(base, v, side).embed_queries([query])[0]
        top = np.argsort(-(cat @ vec))[:10]
        out[f"{v} (catalog side {side} px)"] = (
            sum(frows[i]["category"] == "Heels" for i in top),
            sum(frows[i]["colour"] == "Red" for i in top),
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
