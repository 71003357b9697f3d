"""Stage 2: is a candidate pair the same photo, or two photos of similar products?

Uniform borders are trimmed (a frame, then the studio white), both images reduced to
small Lab thumbnails, one searched inside the other (its aspect kept, at SCALES of the
other's width, every offset, mirrored or not) by normalised cross-correlation of
lightness (the search finds the placement: whole silhouettes correlate even between two
different shoes). At the best placement the detail is compared: the correlation of a
band-pass of both (edges and texture), robustly (the worst TRIM share of the pixels
ignored, for watermarks and logos); then the colour: the score is that correlation less
COLOUR_WEIGHT for every Lab unit of colour difference past COLOUR_ALLOWANCE (colour
variants of one product are often the same shot recoloured: colour tells them apart).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..images import load_image

THUMB = 40  # long side of the comparison thumbnails
SCALES = (1.0, 0.93, 0.86, 0.79, 0.72, 0.65, 0.58, 0.5)  # widths one is searched at in the other
BAND = (3, 9)  # the detail band: local means of these sizes subtracted
TRIM = 0.15  # share of the worst-matching aligned pixels ignored (overlays, watermarks)
LIGHTNESS_WEIGHT = 0.5  # lightness counts half in the colour difference
CONTENT_DELTA = 8.0  # colour distance from the background that makes a pixel content
COLOUR_WEIGHT = 0.03  # score = detail - COLOUR_WEIGHT * (colour difference - allowance)
COLOUR_ALLOWANCE = 6.0  # colour difference (Lab units) a re-encode or light edit makes


@dataclass
class Thumb:
    """An image reduced for comparison: borders trimmed, long side THUMB px."""

    lum: np.ndarray  # float32 (h, w) lightness 0..100
    chroma: np.ndarray  # float32 (h, w, 2) Lab a, b

    @property
    def shape(self) -> tuple[int, int]:
        return self.lum.shape  # type: ignore[return-value]


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(np.float32) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
        dtype=np.float32,
    )
    xyz = c @ m.T / np.array([0.9505, 1.0, 1.089], dtype=np.float32)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1
    )


def trim_borders(img: Image.Image, tolerance: int = 24) -> Image.Image:
    """Cut uniform borders (letterboxing, frames, studio white) down to the content."""
    small = img if max(img.size) <= 256 else img.copy()
    scale = 1.0
    if max(img.size) > 256:
        small.thumbnail((256, 256))
        scale = img.width / small.width
    arr = np.asarray(small, dtype=np.int16)
    ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    background = np.median(ring, axis=0)
    differs = np.abs(arr - background).max(axis=2) > tolerance
    rows, cols = np.nonzero(differs.any(axis=1))[0], np.nonzero(differs.any(axis=0))[0]
    if rows.size == 0 or cols.size == 0:
        return img
    box = (cols[0] * scale, rows[0] * scale, (cols[-1] + 1) * scale, (rows[-1] + 1) * scale)
    box = tuple(int(round(v)) for v in box)
    if box[2] - box[0] < 4 or box[3] - box[1] < 4:
        return img
    return img.crop(box)


def make_thumb(img: Image.Image, size: int = THUMB) -> Thumb:
    img = img.convert("RGB")
    inner = trim_borders(img)
    if inner.size != img.size and min(inner.size) > 16:  # a frame came off: the white inside
        edge = max(1, min(inner.size) // 50)  # the frame's blurred edge
        inner = trim_borders(inner.crop((edge, edge, inner.width - edge, inner.height - edge)))
    img = inner
    scale = size / max(img.size)
    w, h = max(4, round(img.width * scale)), max(4, round(img.height * scale))
    small = img.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=2.0)
    lab = _srgb_to_lab(np.asarray(small))
    return Thumb(np.ascontiguousarray(lab[..., 0]), np.ascontiguousarray(lab[..., 1:]))


def _resize(arr: np.ndarray, w: int, h: int) -> np.ndarray:
    if arr.ndim == 3:
        return np.stack([_resize(arr[..., c], w, h) for c in range(arr.shape[2])], -1)
    return np.asarray(Image.fromarray(arr, mode="F").resize((w, h), Image.Resampling.BILINEAR))


class _Frame:
    """A thumbnail prepared as the frame another is searched in: its FFT and the
    integral images of its lightness and squared lightness."""

    def __init__(self, thumb: Thumb):
        self.thumb = thumb
        self.fft = np.fft.rfft2(thumb.lum)
        self.c1 = np.pad(thumb.lum, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
        self.c2 = np.pad(thumb.lum * thumb.lum, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def ncc(self, t: np.ndarray) -> tuple[float, int, int]:
        """Best normalised cross-correlation of template t over every offset: (value, i, j)."""
        return self.best([t])[0]

    def best(self, templates: Sequence[np.ndarray]) -> list[tuple[float, int, int]]:
        """`ncc` of several templates, their FFTs taken in one batch."""
        x = self.thumb.lum
        hx, wx = x.shape
        stack = np.zeros((len(templates), hx, wx), dtype=np.float32)
        norms = []
        for k, t in enumerate(templates):
            t0 = t - t.mean()
            stack[k, : t.shape[0], : t.shape[1]] = t0
            norms.append(float(np.sqrt((t0 * t0).sum())))
        corr = np.fft.irfft2(self.fft[None] * np.conj(np.fft.rfft2(stack)), s=x.shape)
        out = []
        for k, t in enumerate(templates):
            ht, wt = t.shape
            if norms[k] < 1e-3:
                out.append((-1.0, 0, 0))
                continue
            s1 = _window(self.c1, ht, wt)
            var = np.maximum(_window(self.c2, ht, wt) - s1 * s1 / (ht * wt), 1e-3)
            m = corr[k, : hx - ht + 1, : wx - wt + 1] / (norms[k] * np.sqrt(var))
            pos = int(np.argmax(m))
            i, j = divmod(pos, m.shape[1])
            out.append((float(m.flat[pos]), i, j))
        return out


def _window(c: np.ndarray, h: int, w: int) -> np.ndarray:
    return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]


@dataclass
class Comparison:
    score: float  # detail - COLOUR_WEIGHT * (colour - COLOUR_ALLOWANCE), when positive
    structure: float  # robust correlation of lightness where aligned, -1..1
    colour: float  # robust mean colour difference where aligned (Lab units, L halved)
    mirrored: bool
    detail: float = 0.0  # robust correlation of the high-pass (edges and texture) images


def _placements(x: Thumb, y: Thumb, scales: Sequence[float]) -> list[tuple[int, int]]:
    """Template sizes (w, h) for y inside x: y's own aspect kept, width a share of x's."""
    hx, wx = x.shape
    hy, wy = y.shape
    out = []
    for sx in scales:
        wt = round(wx * sx)
        ht = round(wt * hy / wy)
        if 6 <= wt <= wx and 6 <= ht <= hx:
            out.append((wt, ht))
    return out


def compare_thumbs(a: Thumb, b: Thumb, scales: Sequence[float] = SCALES) -> Comparison:
    """How surely a and b are the same photo: each searched inside the other (its aspect
    kept, at `scales` of the other's width, every offset, mirrored or not), then the
    aligned pixels compared robustly (the worst TRIM share ignored: a watermark or a
    logo covers part of a copy)."""
    best: tuple[float, Any] = (-2.0, None)
    for x, y in ((a, b), (b, a)):
        sizes = _placements(x, y, scales)
        if not sizes:
            continue
        frame = _Frame(x)
        tried = [(m, wt, ht) for m in (False, True) for wt, ht in sizes]
        flips = {False: y.lum, True: np.ascontiguousarray(y.lum[:, ::-1])}
        found = frame.best([_resize(flips[m], wt, ht) for m, wt, ht in tried])
        for (mirrored, wt, ht), (value, i, j) in zip(tried, found, strict=True):
            if value > best[0]:
                best = (value, (x, y, mirrored, i, j, ht, wt))
    if best[1] is None:
        return Comparison(-1.0, -1.0, 100.0, False, -1.0)
    best = _refine(*best)
    x, y, mirrored, i, j, ht, wt = best[1]
    ylum, ych = (y.lum[:, ::-1], y.chroma[:, ::-1]) if mirrored else (y.lum, y.chroma)
    ylum = _resize(np.ascontiguousarray(ylum), wt, ht)
    ych = _resize(np.ascontiguousarray(ych), wt, ht)
    xl, xc = x.lum[i : i + ht, j : j + wt], x.chroma[i : i + ht, j : j + wt]
    keep = max(1, int(round(xl.size * (1 - TRIM))))
    structure = _robust_correlation(xl, ylum, keep)
    detail = _robust_correlation(_high_pass(xl), _high_pass(ylum), keep)
    colour = _colour_difference(xl, xc, ylum, ych)
    penalty = COLOUR_WEIGHT * max(0.0, colour - COLOUR_ALLOWANCE)
    return Comparison(detail - penalty, structure, colour, mirrored, detail)


def _colour_difference(xl: np.ndarray, xc: np.ndarray, yl: np.ndarray, yc: np.ndarray) -> float:
    """Robust mean colour difference (Lab, lightness weighted LIGHTNESS_WEIGHT) over the
    pixels that stand out from the background (the colour of the window's edge) in
    either image: a colour variant differs on the product, not on the studio white."""
    x = np.concatenate([xl[..., None] * LIGHTNESS_WEIGHT, xc], -1)
    y = np.concatenate([yl[..., None] * LIGHTNESS_WEIGHT, yc], -1)
    content = np.zeros(xl.shape, dtype=bool)
    for img in (x, y):
        ring = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        content |= np.sqrt(((img - np.median(ring, axis=0)) ** 2).sum(-1)) > CONTENT_DELTA
    if content.sum() < 0.1 * content.size:
        content[:] = True
    diff = np.sqrt(((x - y) ** 2).sum(-1))[content]
    keep = max(1, int(round(diff.size * (1 - TRIM))))
    return float(np.partition(diff, keep - 1)[:keep].mean())


def _refine(value: float, where: tuple) -> tuple[float, tuple]:
    """Finer template widths around the best placement (the grid steps by 7%)."""
    x, y, mirrored, i, j, ht, wt = where
    ylum = np.ascontiguousarray(y.lum[:, ::-1]) if mirrored else y.lum
    frame = _Frame(x)
    hx, wx = x.shape
    best = (value, where)
    sizes = [(w, round(w * y.shape[0] / y.shape[1])) for w in (wt - 2, wt - 1, wt + 1, wt + 2)]
    sizes = [(w, h) for w, h in sizes if 6 <= w <= wx and 6 <= h <= hx]
    found = frame.best([_resize(ylum, w, h) for w, h in sizes]) if sizes else []
    for (w, h), (v, a, b) in zip(sizes, found, strict=True):
        if v > best[0]:
            best = (v, (x, y, mirrored, a, b, h, w))
    return best


def _robust_correlation(a: np.ndarray, b: np.ndarray, keep: int) -> float:
    """1 - half the mean squared difference of the standardised images, over the `keep`
    best-matching pixels: the correlation, with an overlay's pixels left out."""
    za = (a - a.mean()) / (a.std() + 1e-3)
    zb = (b - b.mean()) / (b.std() + 1e-3)
    err = np.partition(((za - zb) ** 2).ravel(), keep - 1)[:keep]
    return float(1.0 - err.mean() / 2)


def _high_pass(x: np.ndarray) -> np.ndarray:
    """A band of detail: the 3x3 local mean minus the 7x7 one (edges and texture; not the
    pixel noise of a heavy re-encode, not the silhouette's mass)."""
    return _box(x, BAND[0]) - _box(x, BAND[1])


def _box(x: np.ndarray, size: int) -> np.ndarray:
    if size <= 1:
        return x
    r = size // 2
    c = np.pad(np.pad(x, r, mode="edge"), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    return _window(c, size, size) / float(size * size)


class ThumbCache:
    """Thumbnails by image id, made on first use from the catalog's image files; the
    least recently used are dropped past `size`. An unreadable file gives None."""

    def __init__(self, path_of: Callable[[int], str | Path], size: int = 4096):
        self.path_of = path_of
        self.size = size
        self._items: OrderedDict[int, Thumb | None] = OrderedDict()

    def get(self, image_id: int) -> Thumb | None:
        if image_id in self._items:
            self._items.move_to_end(image_id)
            return self._items[image_id]
        try:
            thumb: Thumb | None = make_thumb(load_image(self.path_of(image_id), draft_size=128))
        except Exception:  # a file gone or broken since indexing: not comparable
            thumb = None
        self._items[image_id] = thumb
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return thumb
