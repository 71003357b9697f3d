"""The planted-duplicates catalog that bench_duplicates.py and tests/test_duplicates.py use.

Originals: every image of ../shared/data's fashion-footwear catalog (2,836 products,
60x80 px), footwear300 (300, 200 px wide) and the grocery catalog's iconic images (81).
A sample of them is copied with each transformation below, and every copy is its own
product, so each planted pair spans two products (what `lookalike duplicates` reports).
"""

from __future__ import annotations

import csv
import hashlib
import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / "../shared/data").resolve()


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def reencode(img: Image.Image, rng: random.Random) -> Image.Image:
    """A heavily re-compressed JPEG (quality 20-40)."""
    return _jpeg(img, rng.randint(20, 40))


def resize(img: Image.Image, rng: random.Random) -> Image.Image:
    """Scaled down to 45-70% (large images) or up 1.6-2.4x (thumbnails)."""
    factor = rng.uniform(0.45, 0.7) if min(img.size) >= 150 else rng.uniform(1.6, 2.4)
    size = (max(8, round(img.width * factor)), max(8, round(img.height * factor)))
    return img.resize(size, Image.Resampling.LANCZOS)


def crop(img: Image.Image, rng: random.Random) -> Image.Image:
    """4-12% cut off each side independently (a re-framed copy)."""
    w, h = img.size
    left, right = (round(w * rng.uniform(0.04, 0.12)) for _ in range(2))
    top, bottom = (round(h * rng.uniform(0.04, 0.12)) for _ in range(2))
    return img.crop((left, top, w - right, h - bottom))


def pad(img: Image.Image, rng: random.Random) -> Image.Image:
    """A border of 6-20% a side in white, black or grey (letterboxed or framed)."""
    w, h = img.size
    colour = rng.choice([(255, 255, 255), (0, 0, 0), (200, 200, 200), (245, 240, 230)])
    sides = [round(s * rng.uniform(0.06, 0.2)) for s in (w, h, w, h)]
    return ImageOps.expand(img, border=tuple(sides), fill=colour)


def watermark(img: Image.Image, rng: random.Random) -> Image.Image:
    """Semi-transparent shop text across the image and a small logo box in a corner."""
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = base.size
    size = max(8, w // 7)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    text = rng.choice(["SAMPLE", "© myshop", "shop.example", "PROOF"])
    alpha = rng.randint(90, 150)
    draw.text((w * 0.08, h * rng.uniform(0.35, 0.6)), text, fill=(255, 255, 255, alpha), font=font)
    draw.text((w * 0.1, h * rng.uniform(0.7, 0.8)), text, fill=(40, 40, 40, alpha), font=font)
    box = max(6, w // 8)
    x0, y0 = w - box - 2, h - box - 2
    draw.rectangle([x0, y0, x0 + box, y0 + box], fill=(220, 30, 30, 170))
    return Image.alpha_composite(base, layer).convert("RGB")


def mirror(img: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(img)


def recolour(img: Image.Image, rng: random.Random) -> Image.Image:
    """Light edits: brightness, contrast and saturation x0.85-1.15, hue turned up to 6 degrees."""
    out = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.85, 1.15))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.85, 1.15))
    h, s, v = out.convert("HSV").split()
    turn = round(rng.uniform(-6, 6) / 360 * 255)
    h = h.point(lambda x: (x + turn) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


TRANSFORMS: dict[str, Callable[[Image.Image, random.Random], Image.Image]] = {
    "reencode": reencode,
    "resize": resize,
    "crop": crop,
    "pad": pad,
    "watermark": watermark,
    "mirror": mirror,
    "recolour": recolour,
}


@dataclass
class Item:
    product_id: str
    path: Path
    source: str  # the original's product id (itself for originals)
    transform: str  # "" for originals


def originals() -> list[Item]:
    items: list[Item] = []
    fashion = DATA / "fashion-footwear"
    with open(fashion / "catalog.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            pid = f"ff-{row['product_id']}"
            items.append(Item(pid, fashion / row["image"], pid, ""))
    for path in sorted((DATA / "footwear300" / "data").glob("*.jpg")):
        pid = f"fw-{path.stem}"
        items.append(Item(pid, path, pid, ""))
    grocery = DATA / "grocery"
    with open(grocery / "catalog.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            pid = f"gr-{row['product_id']}"
            items.append(Item(pid, grocery / row["image"], pid, ""))
    return items


def split_of(source: str) -> str:
    """'tune' or 'test' from a hash of the original's id (stable across runs)."""
    return "tune" if hashlib.sha1(source.encode()).digest()[0] % 2 == 0 else "test"


def build(
    out: Path, n_sources: int = 240, seed: int = 15, transforms: list[str] | None = None
) -> list[Item]:
    """Write the copies of `n_sources` sampled originals (stratified over the three
    catalogs) under `out` and a metadata CSV `out/catalog.csv` of originals + copies."""
    names = transforms or list(TRANSFORMS)
    rng = random.Random(seed)
    items = originals()
    by_set: dict[str, list[Item]] = {}
    for item in items:
        by_set.setdefault(item.product_id[:2], []).append(item)
    share = {"ff": 0.6, "fw": 0.28, "gr": 0.12}
    sample: list[Item] = []
    for prefix, pool in by_set.items():
        sample += rng.sample(pool, min(len(pool), round(n_sources * share[prefix])))
    out.mkdir(parents=True, exist_ok=True)
    copies: list[Item] = []
    for item in sample:
        img = Image.open(item.path).convert("RGB")
        for name in names:
            copy = TRANSFORMS[name](img, rng)
            path = out / f"{item.product_id}--{name}.jpg"
            copy.save(path, "JPEG", quality=92)
            copies.append(Item(f"{item.product_id}--{name}", path, item.product_id, name))
    everything = items + copies
    with open(out / "catalog.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["product_id", "image"])
        writer.writerows((it.product_id, str(it.path)) for it in everything)
    return everything
