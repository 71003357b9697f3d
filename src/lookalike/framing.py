"""Framing a query so the whole product is seen: a studio shot on a plain background
whose product the encoder's centre crop would cut is letterboxed instead.

The bundled encoders look at the central square of an image (their "crop" fit). For a
shopper's photo that is what it should be; for a tall product shot (a stiletto filling a
portrait frame) it cuts off the heel and the toe, and what is left looks like a flat.
`letterbox_product` notices the case, on a small copy of the image:

- a plain background: at least PLAIN_SHARE of the border pixels within TOLERANCE of
  the border's median colour in every channel;
- product pixels (those farther than TOLERANCE from it) outside the central square.

Then the image is padded to a square with the background colour, so the crop keeps all
of it. Anything else (a cluttered photo, a product that fits the square) is left as it
is. The query pipeline (lookalike.query, `frame_products`) does this for tuned models by
default; docs/quality.md has what it changes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

TOLERANCE = 30  # per channel, out of 255
PLAIN_SHARE = 0.9  # of the border pixels near the border colour: a plain background
PROBE = 128  # the long side of the copy the test runs on
MIN_OUTSIDE = 0.005  # share of the image's pixels that must lie outside the square
PRE_SHARE = 0.8  # of the full-size border near its median: worth the test (_maybe_plain)


def letterbox_product(img: Image.Image, keep: float = 1.0) -> Image.Image | None:
    """`img` (RGB) padded to a square with its background colour when it is a product
    on a plain background that the central square would cut; None otherwise. `keep`: the
    side of that square as a share of the shorter side (the query view's crop: 0.6 for
    `centre60`); a square image it would cut is returned as it is, to be seen whole."""
    w, h = img.size
    if (w == h and keep >= 1.0) or min(w, h) < 8:
        return None
    if not _maybe_plain(img):
        return None
    # bilinear, not thumbnail's antialiased reduction: half the cost (0.46 against 0.86 ms
    # on a 348x348 photo) and the same decisions on 6,155 real images
    scale = min(1.0, PROBE / max(w, h))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = img.resize(size, Image.BILINEAR) if scale < 1.0 else img
    a = np.asarray(small.convert("RGB"), dtype=np.int16)
    sh, sw = a.shape[:2]
    share, colour = _plain_share(a)
    if share < PLAIN_SHARE:
        return None
    product = away_from(a, colour)
    side = max(1, round(min(sh, sw) * keep))
    inside = np.zeros_like(product)
    top, left = (sh - side) // 2, (sw - side) // 2
    inside[top : top + side, left : left + side] = True
    if float((product & ~inside).sum()) < MIN_OUTSIDE * product.size:
        return None
    if w == h:
        return img
    fill = tuple(int(round(c)) for c in colour)
    out = Image.new("RGB", (max(w, h), max(w, h)), fill)
    out.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out


def _maybe_plain(img: Image.Image) -> bool:
    """A quick look at the full image's border before the test proper: False when fewer
    than PRE_SHARE of its pixels are near their median colour, which no image the test
    frames comes near (lowest 0.91 over 6,155 real images, every shop photo of grocery
    below 0.77). A shop photo is turned down in 0.07 ms instead of 0.5. Only the border
    strips are copied out of the image, not the whole of it (0.06 ms of a 348 px photo)."""
    rgb = img if img.mode == "RGB" else img.convert("RGB")
    w, h = rgb.size
    boxes = ((0, 0, w, 1), (0, h - 1, w, h), (0, 1, 1, h - 1), (w - 1, 1, w, h - 1))
    strips = b"".join(rgb.crop(box).tobytes() for box in boxes)
    return _near_share(np.frombuffer(strips, dtype=np.uint8).reshape(-1, 3))[0] >= PRE_SHARE


def _plain_share(pixels: np.ndarray) -> tuple[float, np.ndarray]:
    """(the share of an image's border pixels near the border's median colour, that
    colour): how plain its background is."""
    return _near_share(border_pixels(pixels))


def _near_share(border: np.ndarray) -> tuple[float, np.ndarray]:
    """(the share of `border` (n, 3) pixels near their median colour, that colour)."""
    colour = _median(border)
    away = away_from(border, colour)
    return (away.size - np.count_nonzero(away)) / away.size, colour


def _median(border: np.ndarray) -> np.ndarray:
    """np.median(border, axis=-2), the same float64 values, without its layers of
    Python: in a query, right after the network's pass, np.median took 0.12 ms here."""
    n = border.shape[-2]
    lo, hi = (n - 1) // 2, n // 2
    part = np.partition(border, [lo, hi], axis=-2)
    dtype = border.dtype if border.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    return (part[..., lo, :].astype(dtype) + part[..., hi, :].astype(dtype)) / dtype.type(2)


def border_pixels(pixels: np.ndarray) -> np.ndarray:
    """(..., h, w, 3) images -> their border pixels (..., 2h + 2w - 4, 3): the top row,
    the bottom row, then the left and the right column between them."""
    p = pixels
    return np.concatenate([p[..., 0, :, :], p[..., -1, :, :], p[..., 1:-1, 0, :],
                           p[..., 1:-1, -1, :]], axis=-2)  # fmt: skip


def border_colour(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., h, w, 3) images -> (their border pixels (..., 2h + 2w - 4, 3), the border's
    median colour (..., 3)): the background of a studio shot."""
    border = border_pixels(pixels)
    return border, _median(border)


def away_from(pixels: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """True where a pixel is farther than TOLERANCE from `colour` (broadcast against
    `pixels`) in some channel: a product pixel on that background. Per channel rather
    than a max over the last axis, which numpy reduces slowly (a query's cost)."""
    d = np.abs(pixels - colour.astype(np.float32))
    return (d[..., 0] > TOLERANCE) | (d[..., 1] > TOLERANCE) | (d[..., 2] > TOLERANCE)
