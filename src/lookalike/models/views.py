"""Catalog views (opt-in): each catalog image embedded as itself and a few altered copies
(mirrored, turned by 20 degrees either way), the views' vectors averaged into the one
vector it is stored with. Shoppers hold products tilted and from either side; the studio
shot shows one pose. One vector per image as before (same index size, same search), k
forward passes per image at ingest. Measured on the burst split of grocery train.csv
(docs/quality.md, "Catalog views").

`CatalogViewEncoder` wraps a base encoder: `prepare(img)` gives the (k, S, S, 3) stack of
the image's views, `embed` of (N, k, S, S, 3) averages each image's views (a plain
(N, S, S, 3) batch is embedded as the base does). Its stamp is the base's plus the views,
so catalog vectors made with other views are never compared with these: a home whose
setting changed says so (`CatalogMismatchError`) until `lookalike index` re-embeds it.
Queries are embedded by the base network (lookalike.query unwraps it with `query_encoder`).

Which views a home uses (`catalog_views`): its `quality.json` setting when it names one;
else those its catalog was indexed with (an existing home keeps its vectors); else
DEFAULT_CATALOG_VIEWS, none: the views are a shop's choice (`"catalog_views": ["flip",
"rot20", "rot-20"]`, TURNED_VIEWS, before its first `index`), since they cost ingest
speed. Tuned models are never wrapped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..encoders.runtime import l2_normalise
from ..framing import border_colour

STAMP_TAG = "+catalog:"
EMBED_CHUNK = 32
"""Most view images per forward pass (activations grow with the batch)."""


def _rotation(degrees: int) -> Callable[[Image.Image], Image.Image]:
    """Turned about the centre, same size, corners filled with the border's median colour
    (a studio shot's background)."""

    def turn(img: Image.Image) -> Image.Image:
        fill = tuple(int(c) for c in border_colour(np.asarray(img))[1])
        return img.rotate(degrees, resample=Image.BICUBIC, expand=False, fillcolor=fill)

    return turn


CATALOG_VIEWS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "flip": ImageOps.mirror,
    **{f"rot{s}{d}": _rotation(int(f"{s}{d}")) for d in (10, 15, 20, 25, 30) for s in ("", "-")},
}
"""The views a catalog image can add to itself (the image as it is always counts)."""

TURNED_VIEWS: tuple[str, ...] = ("flip", "rot20", "rot-20")
"""The measured set, for a shop that sets it: grocery train.csv Recall@1 per burst 0.393 ->
0.408 (val 0.419 -> 0.456) with fashion-footwear leave-one-out precision not lower, at
four forward passes per catalog image at ingest (docs/quality.md, "Catalog views")."""

DEFAULT_CATALOG_VIEWS: tuple[str, ...] = ()
"""A new home's: the image alone. Four passes an image would put ingest under its target
(60 images/s end to end; 26-50 measured with TURNED_VIEWS) for a gain of 1.5 points of
Recall@1 on the selection split, inside its noise; a shop opts in with `catalog_views`."""


def check_views(views: Sequence[str]) -> tuple[str, ...]:
    """The views as a tuple, or ValueError naming the unknown ones."""
    views = tuple(views)
    unknown = [v for v in views if v not in CATALOG_VIEWS]
    if unknown or len(set(views)) != len(views):
        raise ValueError(
            f"catalog_views must be a list of distinct {', '.join(CATALOG_VIEWS)}"
            f" (or []), not {list(views)!r}"
        )
    return views


def stamp_views(stored: str | None, base_stamp: str) -> tuple[str, ...] | None:
    """The catalog views a stored catalog stamp says its vectors were made with, for this
    base model: () for the bare base stamp, None when it is another model's."""
    if stored == base_stamp:
        return ()
    if stored is None or not stored.startswith(base_stamp + STAMP_TAG):
        return None
    try:
        return check_views(stored[len(base_stamp + STAMP_TAG) :].split(","))
    except ValueError:
        return None


def catalog_views_for(
    setting: Sequence[str] | None, stored_stamp: str | None, base_stamp: str
) -> tuple[str, ...]:
    """The views a home's base model embeds its catalog with (see the module docstring)."""
    if setting is not None:
        return check_views(setting)
    kept = stamp_views(stored_stamp, base_stamp)
    return DEFAULT_CATALOG_VIEWS if kept is None else kept


class CatalogViewEncoder:
    """A base encoder whose catalog images are embedded as the mean of their views."""

    def __init__(self, base: Any, views: Sequence[str]) -> None:
        self.base = base
        self.views = check_views(views)
        self._fns = [CATALOG_VIEWS[v] for v in self.views]
        self.stamp = f"{base.stamp}{STAMP_TAG}{','.join(self.views)}"
        self.name = base.name
        self.dim = base.dim
        self.input_size = base.input_size
        self.draft_size = getattr(base, "draft_size", 2 * int(base.input_size))

    def __repr__(self) -> str:
        return f"<CatalogViewEncoder {self.stamp} dim={self.dim}>"

    def __getattr__(self, name: str) -> Any:  # anything else is the base's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def prepare(self, img: Image.Image) -> np.ndarray:
        """(1 + len(views), S, S, 3): the image as it is, then each view of it."""
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.stack([self.base.prepare(rgb)] + [self.base.prepare(f(rgb)) for f in self._fns])

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(N, k, S, S, 3) -> (N, dim), each image's view vectors averaged and normalised;
        (N, S, S, 3) -> the base's vectors."""
        batch = np.asarray(batch)
        if batch.ndim != 5:
            return self.base.embed(batch)
        n, k = batch.shape[:2]
        flat = batch.reshape(n * k, *batch.shape[2:])
        vectors = np.concatenate(
            [self.base.embed(flat[i : i + EMBED_CHUNK]) for i in range(0, len(flat), EMBED_CHUNK)]
        )
        return l2_normalise(vectors.reshape(n, k, -1).mean(axis=1)).astype(np.float32)


def with_catalog_views(encoder: Any, views: Sequence[str]) -> Any:
    """`encoder` wrapped to embed catalog images as the mean of these views (itself for
    none)."""
    return CatalogViewEncoder(encoder, views) if views else encoder


def query_encoder(encoder: Any) -> Any:
    """The encoder that embeds queries: the base under catalog views, else `encoder`."""
    return encoder.base if isinstance(encoder, CatalogViewEncoder) else encoder
