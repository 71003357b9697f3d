"""A catalog-only tune: a head trained on the catalog's own images alone, each product its
own class (exemplar / instance discrimination), with synthetic views of them that look
like shopper photos. No shopper photo and no label is read to train, so a shop could get
it on its first `index`. Does it beat a new home's plain pipeline?

Variants (all `train_tuned_model(..., settings=TuneSettings(method="head", seed=0))`):

- A: `field="sku"`, a field unique per product. `--field` reads only category, title,
  price, in_stock or an attribute, and refuses a field with fewer than two values, so
  the bench writes a copy of the catalog CSV with an `sku` column equal to product_id
  (an attribute; no change to src/). With the field alone `tune` trains its weak-label
  head: the base embedding, the posterior of a softmax regression of the sku on the
  catalog images' base embeddings (one image a class), and the colour descriptor.
- B: A plus 8 synthetic shopper views of every catalog image, written as image files and
  given as `labels_csv` (image,product_id: the product the view was made from), so the
  head method's MLP trains on them as labelled photos (product proxies and the sku
  field's proxies), and the three parts of A are appended (as `tune --labels V.csv
  --field sku --method head` does). A view: the product cut from its border colour
  (shopper.product_mask), 45-90 % of the side, turned up to 25 degrees, off centre by up
  to 10 %, on one of: another catalog image, enlarged and blurred; a 3x3 shelf of other
  catalog images, blurred; a grey or tinted surface with a soft texture; then
  brightness, contrast and colour jitter, a blur half the time and the file saved as a
  JPEG of quality 30-85. Every choice is seeded by the image's content hash and the view
  number; the other catalog images are drawn from the catalog in content-hash order.
- C: B with 16 views an image.
- D: B with augment.session_view (the `--photos` session recipe: crop, turn, gamma,
  white balance, light, blur, JPEG) applied on top of each view (saved at quality 95).

The method is the head for all four: it is what `--field` alone runs (A), and B-D keep
it so that they differ from A only by the views (`auto` would pick finetune with labels,
which on fashion's 22,688 views would take far beyond ten minutes).

Measured:
- grocery: a new home indexed with the catalog (a new home's defaults), one fresh copy
  per variant, tuned once (the tune reads no photo, so one model serves both splits);
  the held-out bursts of both burst splits of train.csv (salt "" and "b2";
  bench_tune_sources.burst_split) searched through `Engine.search`: Recall@1 / @5 per
  burst (bench_calibrate_size.per_burst), against the untuned home in the same run.
  train.csv's labels only score; val.csv is not read.
- fashion-footwear (2,836 products): leave-one-out category and colour precision@10
  (run_leave_one_out), the red stiletto's Heels / Red in its top 10, and the tune's wall
  time: making and writing the views plus `train_tuned_model` (re-embedding included),
  each home with a cold feature cache.

Ship rule (fixed before the first run): a variant passes if, against the plain home in
the same run, mean Recall@1 per burst is up by >= 2.0 points on BOTH grocery splits,
Recall@5 per burst down by no more than 0.5 points on either split, fashion
leave-one-out category AND colour P@10 each not lower by more than 0.005, and its tune
on fashion-footwear (views + train_tuned_model) takes under 10 minutes. A variant not
run on fashion cannot pass.

    flock /tmp/lookalike-bench.lock .venv/bin/python benchmarks/bench_catalog_tune.py \\
        [--part grocery|fashion|all] [--variants A,B,C,D] [--workdir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_calibrate_size import per_burst  # noqa: E402
from bench_tune_sources import FASHION, GROCERY, _rows, _stiletto, _write, burst_split  # noqa: E402

from lookalike.engine import Engine  # noqa: E402
from lookalike.evaluate import run_leave_one_out  # noqa: E402
from lookalike.fsutil import sha256_of  # noqa: E402
from lookalike.tuning import TuneSettings, train_tuned_model  # noqa: E402
from lookalike.tuning.augment import session_view  # noqa: E402
from lookalike.tuning.shopper import product_mask  # noqa: E402

VARIANTS = {"A": (0, False), "B": (8, False), "C": (16, False), "D": (8, True)}
"""variant -> (synthetic views an image, session_view on top)."""
SALTS = {"split 1": "", "split b2": "b2"}
SIDE = 320
FIELD = "sku"
BARE = {"catalog_views": [], "power_normalise": False, "query_views": ["full"]}


def with_sku(rows: list[dict[str, str]], folder: Path) -> list[dict[str, str]]:
    """The catalog rows with absolute image paths and an `sku` column (= product_id)."""
    return [{**r, "image": str(folder / r["image"]), FIELD: r["product_id"]} for r in rows]


def view_seed(sha: str, view: int) -> int:
    return int(hashlib.sha256(f"{sha}#catself{view}".encode()).hexdigest()[:16], 16)


def _background(others: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    kind = int(rng.integers(3))
    if kind == 0:  # another catalog image, enlarged and blurred
        back = others[0].convert("RGB").resize((SIDE, SIDE), Image.BICUBIC)
        return back.filter(ImageFilter.GaussianBlur(float(rng.uniform(2, 6))))
    if kind == 1:  # a shelf: a 3x3 grid of other catalog images, blurred
        cell = SIDE // 3
        back = Image.new("RGB", (SIDE, SIDE), (200, 200, 200))
        for i, o in enumerate(others[1:10]):
            back.paste(o.convert("RGB").resize((cell, cell), Image.BICUBIC),
                       ((i % 3) * cell, (i // 3) * cell))  # fmt: skip
        return back.filter(ImageFilter.GaussianBlur(float(rng.uniform(1, 3))))
    # a grey or tinted surface with a soft texture
    level = rng.uniform(70, 210) + rng.uniform(-15, 15, 3)
    grain = rng.uniform(0, 25)
    noise = rng.uniform(-grain, grain, (SIDE // 16, SIDE // 16, 1))
    small = np.clip(level + noise, 0, 255).astype(np.uint8)
    surface = Image.fromarray(small).resize((SIDE, SIDE), Image.BICUBIC)
    return surface.filter(ImageFilter.GaussianBlur(4))


def catalog_view(
    product: Image.Image, others: list[Image.Image], seed: int
) -> tuple[Image.Image, int]:
    """One synthetic shopper view of catalog image `product` and its JPEG quality."""
    rng = np.random.default_rng(seed)
    product = product.convert("RGB")
    mask = product_mask(product)
    out = _background(others, rng)
    w, h = product.size
    f = rng.uniform(0.45, 0.9) * SIDE / max(w, h)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    angle = float(rng.uniform(-25, 25))
    p = product.resize(size, Image.BICUBIC).rotate(angle, Image.BILINEAR, expand=True)
    m = mask.resize(size).rotate(angle, expand=True)
    dx, dy = (rng.uniform(-0.1, 0.1, 2) * SIDE).astype(int)
    out.paste(p, ((SIDE - p.size[0]) // 2 + dx, (SIDE - p.size[1]) // 2 + dy), m)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.75, 1.25))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.5))))
    return out, int(rng.integers(30, 86))


def write_views(rows: list[dict[str, str]], count: int, session: bool, folder: Path) -> Path:
    """`count` views of every catalog image as files in `folder`, listed with their product
    in `folder/views.csv` (image,product_id)."""
    folder.mkdir(parents=True)
    ordered = sorted((sha256_of(Path(r["image"])), r["image"], r["product_id"]) for r in rows)
    images = [Image.open(path).convert("RGB") for _, path, _ in ordered]
    listing = []
    for i, (sha, _, pid) in enumerate(ordered):
        for v in range(count):
            seed = view_seed(sha, v)
            pick = np.random.default_rng(seed ^ 0x5EED).choice(len(ordered) - 1, 10)
            others = [images[j + (j >= i)] for j in pick]
            img, quality = catalog_view(images[i], others, seed)
            name = f"{i:05d}-{v:02d}.jpg"
            if session:
                img = session_view(img, view_seed(sha, 1000 + v))
                quality = 95
            img.save(folder / name, "JPEG", quality=quality)
            listing.append({"image": name, "product_id": pid})
    return _write(folder / "views.csv", ["image", "product_id"], listing)


def tune(engine: Engine, rows: list[dict[str, str]], variant: str, work: Path) -> dict:
    """Make the variant's views and tune the engine's home on them: what and how long."""
    count, session = VARIANTS[variant]
    t0 = time.perf_counter()
    labels = write_views(rows, count, session, work / f"views-{variant}") if count else None
    t1 = time.perf_counter()
    report = train_tuned_model(engine, labels_csv=labels, field=FIELD, progress=False,
                               settings=TuneSettings(method="head", seed=0))  # fmt: skip
    t2 = time.perf_counter()
    return {"views": count * len(rows), "views_seconds": round(t1 - t0, 1),
            "tune_seconds": round(t2 - t1, 1), "total_seconds": round(t2 - t0, 1),
            "parts": report.seconds, "keep_base": report.settings["keep_base"],
            "sources": report.sources.get("used")}  # fmt: skip


def bench_grocery(work: Path, variants: list[str], out: dict, save=lambda: None) -> dict:
    rows = with_sku(_rows(GROCERY / "catalog.csv"), GROCERY)
    catalog = _write(work / "grocery.csv", list(rows[0]), rows)
    train = [{**r, "image": str(GROCERY / r["image"])} for r in _rows(GROCERY / "train.csv")]
    held = {name: burst_split(train, salt)[1] for name, salt in SALTS.items()}
    home = work / "grocery-home"
    with Engine.open(home) as engine:
        engine.index([], metadata=catalog, progress=False)
    out["held"] = {k: len(v) for k, v in held.items()}
    # for the record (not in the rule): the base a tuned head sits on (catalog image alone,
    # no power normalisation, the whole photo as the query), and every home again with the
    # central 70 % square as its query view (quality.json)
    bare = work / "grocery-bare"
    shutil.rmtree(bare, ignore_errors=True)
    bare.mkdir()
    (bare / "quality.json").write_text(json.dumps(BARE))
    with Engine.open(bare) as engine:
        engine.index([], metadata=catalog, progress=False)
        out["bare"] = {split: per_burst(engine, rows_) for split, rows_ in held.items()}
        (bare / "quality.json").write_text(json.dumps({**BARE, "query_views": ["centre70"]}))
        out["bare"]["centre70"] = {s: per_burst(engine, r) for s, r in held.items()}
    print(f"grocery bare base: {out['bare']}", flush=True)
    shutil.rmtree(bare)
    for name in ["plain", *variants]:
        copy = work / f"grocery-{name}"
        shutil.copytree(home, copy)
        with Engine(copy) as engine:
            row = {} if name == "plain" else tune(engine, rows, name, work / "g")
            for split, rows_ in held.items():
                row[split] = per_burst(engine, rows_)
            if name != "plain":
                (copy / "quality.json").write_text(json.dumps({"query_views": ["centre70"]}))
                row["centre70"] = {s: per_burst(engine, r) for s, r in held.items()}
        out[name] = row
        save()  # a run stopped later keeps what it measured
        print(f"grocery {name}: " + "  ".join(f"{s} {row[s][0]:.3f}/{row[s][1]:.3f}"
                                              for s in SALTS)
              + (f"  tune {row['total_seconds']:.0f} s" if name != "plain" else ""),
              flush=True)  # fmt: skip
        shutil.rmtree(copy)
    return out


def bench_fashion(work: Path, variants: list[str], out: dict, save=lambda: None) -> dict:
    rows = with_sku(_rows(FASHION / "catalog.csv"), FASHION)
    catalog = _write(work / "fashion.csv", list(rows[0]), rows)
    home = work / "fashion-home"
    with Engine.open(home) as engine:
        engine.index([], metadata=catalog, progress=False)
    for name in ["plain", *variants]:
        copy = work / f"fashion-{name}"
        shutil.copytree(home, copy)
        with Engine(copy) as engine:
            row = {} if name == "plain" else tune(engine, rows, name, work / "f")
            for field in ("category", "colour"):
                row[field] = round(run_leave_one_out(engine, field, 10)["precision"], 4)
            stiletto = _stiletto(engine)
            row["stiletto"] = [stiletto["heels"], stiletto["red"]]
        out[name] = row
        save()  # a run stopped later keeps what it measured
        print(f"fashion {name}: category {row['category']:.4f} colour {row['colour']:.4f}"
              f" stiletto {row['stiletto']}"
              + (f"  tune {row['total_seconds']:.0f} s (views {row['views_seconds']:.0f})"
                 if name != "plain" else ""), flush=True)  # fmt: skip
        shutil.rmtree(copy)
        shutil.rmtree(work / "f", ignore_errors=True)
    return out


def verdict(grocery: dict, fashion: dict) -> dict[str, str]:
    """The ship rule, per variant."""
    out = {}
    for v in [k for k in grocery if k in VARIANTS]:
        why = []
        for split in SALTS:
            d1 = 100 * (grocery[v][split][0] - grocery["plain"][split][0])
            d5 = 100 * (grocery[v][split][1] - grocery["plain"][split][1])
            if d1 < 2.0:
                why.append(f"{split} R@1 {d1:+.1f}")
            if d5 < -0.5:
                why.append(f"{split} R@5 {d5:+.1f}")
        if v not in fashion:
            why.append("not run on fashion")
        else:
            for field in ("category", "colour"):
                d = fashion[v][field] - fashion["plain"][field]
                if d < -0.005:
                    why.append(f"fashion {field} {d:+.4f}")
            if fashion[v]["total_seconds"] >= 600:
                why.append(f"fashion tune {fashion[v]['total_seconds']:.0f} s")
        out[v] = "pass" if not why else "fail: " + ", ".join(why)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", default="all", choices=["all", "grocery", "fashion"])
    ap.add_argument("--variants", default="A,B,C,D")
    ap.add_argument("--fashion-variants", help="variants for fashion (default: --variants)")
    ap.add_argument("--workdir", help="keep the work here (default: a temporary folder)")
    ap.add_argument("--json", help="write the figures to this file (merged with what it has)")
    args = ap.parse_args()
    variants = args.variants.split(",")
    started = time.time()
    figures: dict = json.loads(Path(args.json).read_text()) if args.json and Path(
        args.json).exists() else {}  # fmt: skip

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.part in ("all", "grocery"):
            shutil.rmtree(work / "grocery-home", ignore_errors=True)
            shutil.rmtree(work / "g", ignore_errors=True)
            bench_grocery(work, variants, figures.setdefault("grocery", {}), save)
        if args.part in ("all", "fashion"):
            shutil.rmtree(work / "fashion-home", ignore_errors=True)
            fv = (args.fashion_variants or args.variants).split(",")
            bench_fashion(work, fv, figures.setdefault("fashion", {}), save)
    if "grocery" in figures:
        figures["verdict"] = verdict(figures["grocery"], figures.get("fashion", {}))
        for v, text in figures["verdict"].items():
            print(f"{v}: {text}")
    figures.setdefault("runs", []).append({
        "part": args.part, "seconds": round(time.time() - started),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average": os.getloadavg(), "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                   time.gmtime())})  # fmt: skip
    print(f"({time.time() - started:.0f} s)")
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
