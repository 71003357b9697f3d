"""Session views of the unlabelled photos (`tune --photos`): copies of each photo as
another capture session might have taken it, with another light (brightness, gamma,
contrast), another white balance and camera (a colour cast, saturation, blur, JPEG) and
from a little nearer or further (a square crop of the middle, slightly off centre and
turned). The head trains on their base embeddings as more samples, each with the soft
target of the photo it came from (train.crop_samples), as it does on the photos' central
crops: what a photo shows does not change with the session, the head learns to ignore
what does.

Every random choice is seeded by the photo's content hash and the view number, so the
same photos give the same views whatever the files are called. Measured on grocery's
selection splits of train.csv: docs/quality.md ("Fifth round").
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

SESSION_VIEWS = 2
"""Session views made of each photo of a `--photos` run (head method; 0: none). Two passed
the fifth round's rule on grocery's three selection splits (docs/quality.md); four were
no better in the scratch runs."""
RECIPE = "session1"
"""The name of the recipe below in the feature cache's keys: a changed recipe must not
reuse views cached by an older one."""


@dataclass(frozen=True)
class Recipe:
    """The ranges a session view is drawn from (uniform unless said)."""

    brightness: tuple[float, float] = (0.7, 1.3)
    gamma: tuple[float, float] = (0.75, 1.35)
    contrast: tuple[float, float] = (0.75, 1.25)
    saturation: tuple[float, float] = (0.7, 1.3)
    cast: float = 0.12  # white balance: red and blue gains 1 -/+ up to this, opposite ways
    tint: float = 0.05  # ... and green's gain 1 +- up to this
    hue: float = 0.0  # hue turned by up to this share of the circle (0: never)
    blur: float = 0.4  # probability of a Gaussian blur of radius 0.3-1.5 px
    jpeg: tuple[int, int] = (35, 90)  # quality of the JPEG round trip
    side: tuple[float, float] = (0.55, 0.85)  # crop side, share of the shorter side (1: none)
    shift: float = 0.08  # crop centre off the middle by up to this share of the side
    angle: float = 8.0  # rotation, degrees either way


DEFAULT = Recipe()


def view_seed(sha256: str, view: int) -> int:
    """The seed of session view `view` of the photo with this content hash."""
    return int(hashlib.sha256(f"{sha256}#{RECIPE}.{view}".encode()).hexdigest()[:16], 16)


def session_view(img, seed: int, recipe: Recipe = DEFAULT):  # (PIL.Image, int) -> PIL RGB
    """One session view of the photo `img`: its geometry first (crop, turn), then light,
    colour and camera."""
    from PIL import Image, ImageEnhance, ImageFilter

    rng = np.random.default_rng(seed)
    out = img.convert("RGB")
    w, h = out.size
    lo, hi = recipe.side
    if hi < 1.0 or lo < 1.0:
        side = max(1, round(min(w, h) * rng.uniform(lo, hi)))
        cx = w / 2 + rng.uniform(-recipe.shift, recipe.shift) * side
        cy = h / 2 + rng.uniform(-recipe.shift, recipe.shift) * side
        left = int(np.clip(round(cx - side / 2), 0, w - side))
        top = int(np.clip(round(cy - side / 2), 0, h - side))
        angle = rng.uniform(-recipe.angle, recipe.angle)
        if angle:  # turned about the crop's centre; what comes in at the corners is photo
            out = out.rotate(angle, resample=Image.BILINEAR, center=(left + side / 2,
                                                                    top + side / 2))  # fmt: skip
        out = out.crop((left, top, left + side, top + side))
    gamma = rng.uniform(*recipe.gamma)
    warm = rng.uniform(-recipe.cast, recipe.cast)
    gains = (1 + warm, 1 + rng.uniform(-recipe.tint, recipe.tint), 1 - warm)
    levels = np.arange(256, dtype=np.float64) / 255.0
    lut = np.concatenate([np.clip(255.0 * g * levels**gamma, 0, 255) for g in gains])
    out = out.point(lut.round().astype(np.uint8).tolist())  # white balance and gamma
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(*recipe.brightness))
    out = ImageEnhance.Contrast(out).enhance(rng.uniform(*recipe.contrast))
    out = ImageEnhance.Color(out).enhance(rng.uniform(*recipe.saturation))
    turn = rng.uniform(-recipe.hue, recipe.hue)
    if turn:
        hue, sat, val = out.convert("HSV").split()
        step = round(turn * 256) % 256
        hue = hue.point([(v + step) % 256 for v in range(256)])
        out = Image.merge("HSV", (hue, sat, val)).convert("RGB")
    if rng.random() < recipe.blur:
        out = out.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5)))
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=int(rng.integers(recipe.jpeg[0], recipe.jpeg[1] + 1)))
    buf.seek(0)
    return Image.open(buf).convert("RGB")
