"""A small colour descriptor of a prepared image: what `tune --field` keeps beside the
category it learns, so two heels of different colours stay apart.

The descriptor is a histogram of the product's pixels over a coarse RGB grid (4 levels a
channel, 64 bins), square-rooted so that one strong colour does not swamp the rest
(Hellinger form; cosine of two such vectors is their Bhattacharyya coefficient). The
product's pixels are those that differ from the image's border colour (the median of
the border, a studio background) by more than lookalike.framing.TOLERANCE in some
channel (the test framing uses too); an image with
almost none (a photo with no plain background) uses all of its pixels. Computed from the
encoder's prepared uint8 batch, so catalog images and queries get it the same way; about
0.1 ms an image (every STEP-th pixel of a 260 px square).
"""

from __future__ import annotations

import numpy as np

from ..framing import away_from, border_colour

LEVELS = 4  # per channel: 64 bins
STEP = 4  # every STEP-th pixel in each direction
MIN_PIXELS = 20  # fewer product pixels than this: use the whole image
DIM = LEVELS**3


def colour_descriptor(batch: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 prepared images -> (N, 64) float32, each of unit L2 norm."""
    x = np.asarray(batch)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (N, S, S, 3) pixels, got {x.shape}")
    x = x[:, ::STEP, ::STEP].astype(np.int16)
    _, background = border_colour(x)  # (N, 3)
    product = away_from(x, background[:, None, None, :])
    q = x >> (8 - LEVELS.bit_length() + 1)  # 0..LEVELS-1 per channel
    codes = (q[..., 0] * LEVELS + q[..., 1]) * LEVELS + q[..., 2]
    out = np.zeros((len(x), DIM), dtype=np.float32)
    for i in range(len(x)):
        mask = product[i] if np.count_nonzero(product[i]) >= MIN_PIXELS else slice(None)
        out[i] = np.bincount(codes[i][mask].ravel(), minlength=DIM)
    out /= np.maximum(out.sum(axis=1, keepdims=True), 1.0)
    return np.sqrt(out)
