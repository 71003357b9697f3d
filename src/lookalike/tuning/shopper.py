"""Synthetic shopper views of catalog images (`tune --photos`): each catalog image cut
from its plain background and pasted, once or twice, rotated and scaled, on a random crop
of one of the run's own unlabelled photos (a shelf, a hand, a counter), with the light,
colour, blur and JPEG quality of a phone photo. Their embeddings are mixed into the
catalog images' side of the pseudo-labelling (pseudo.mix_shopper_views): a studio shot
then looks a little more like the photos it has to be found in.

Every random choice is seeded by content (the catalog image's sha256, the view number),
and the backgrounds are picked from the photos in their content-hash order, so the same
catalog and photos give the same views, whatever the files are called. Measured on
grocery's two burst splits of train.csv: docs/quality.md.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..framing import away_from, border_colour

VIEWS = 12
"""Synthetic shopper views made of each catalog image..."""
BUDGET = 4800
"""... up to this many views in all: a larger catalog gets fewer a image (at least one),
so the views cost at most about as much as the catalog's own features (grocery's 81
images: 12 each, 972 views, about 20 s on 2 cores)."""


def views_per_image(n_images: int) -> int:
    """How many shopper views each of `n_images` catalog images gets."""
    return max(1, min(VIEWS, BUDGET // max(1, n_images)))


SIDE = 320
"""Pixel side of a synthetic view (the base encoder's prepare resizes it)."""


@dataclass(frozen=True)
class Background:
    """One unlabelled photo a view is pasted on."""

    path: Path
    sha256: str


def view_seed(sha256: str, view: int) -> int:
    """The seed of view `view` of the image with this content hash."""
    return int(hashlib.sha256(f"{sha256}#shopper{view}".encode()).hexdigest()[:16], 16)


def pick_background(sha256: str, view: int, ordered: Sequence[Background]) -> Background:
    """The photo view `view` of this catalog image is pasted on: one of `ordered` (the
    photos sorted by content hash), chosen by the view's seed."""
    rng = np.random.default_rng(view_seed(sha256, view) ^ 0x5EED)
    return ordered[int(rng.integers(len(ordered)))]


def product_mask(img):  # PIL.Image -> PIL.Image ("L")
    """Where the product is: pixels away from the image's border colour (framing),
    grown by a pixel and softened."""
    from PIL import Image, ImageFilter

    a = np.asarray(img, dtype=np.float32)
    _, colour = border_colour(a)
    m = away_from(a, colour).astype(np.uint8) * 255
    return Image.fromarray(m).filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.GaussianBlur(1))


def shopper_view(product, background, seed: int):  # (PIL, PIL, int) -> PIL.Image RGB
    """One synthetic shopper photo of `product` (a catalog image) on `background`."""
    from PIL import Image, ImageEnhance, ImageFilter

    rng = np.random.default_rng(seed)
    product = product.convert("RGB")
    mask = product_mask(product)
    bg = background.convert("RGB")
    w, h = bg.size
    s = max(1, int(min(w, h) * rng.uniform(0.5, 1.0)))
    x0, y0 = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    out = bg.crop((x0, y0, x0 + s, y0 + s)).resize((SIDE, SIDE))
    for _ in range(int(rng.integers(1, 3))):  # one or two copies
        side = max(1, int(SIDE * rng.uniform(0.45, 0.9)))
        p, m = product.resize((side, side)), mask.resize((side, side))
        angle = rng.uniform(-25, 25)
        p = p.rotate(angle, expand=True, resample=Image.BILINEAR)
        m = m.rotate(angle, expand=True)
        cx = int(rng.uniform(0.3, 0.7) * SIDE - p.size[0] / 2)
        cy = int(rng.uniform(0.3, 0.7) * SIDE - p.size[1] / 2)
        out.paste(p, (cx, cy), m)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.2))
    out = ImageEnhance.Color(out).enhance(rng.uniform(0.7, 1.3))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(30, 85)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")
