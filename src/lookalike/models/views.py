"""Catalog views and power normalisation of a base model's vectors.

Catalog views: each catalog image embedded as itself and altered copies (mirrored, turned
by some degrees), the views' vectors averaged into the one vector it is stored with.
Shoppers hold products tilted and from either side; the studio shot shows one pose. One
vector per image as before (same index size, same search), k forward passes per image at
ingest. Power normalisation (`sign(x) |x|^p`, then L2) of the pooled vector, on the
catalog's vectors and the queries' alike: it damps the few large activations that make
any two photos look alike. Measured on the burst split of grocery train.csv
(docs/quality.md, "Catalog views").

`CatalogViewEncoder` wraps a base encoder: `prepare(img)` gives the (k, S, S, 3) stack of
the image's views, `embed` of (N, k, S, S, 3) averages each image's views, then applies
the power (a plain (N, S, S, 3) batch is embedded as one view each). Its stamp is the
base's plus the views and the power (`...+catalog:rot-20+power0.5`), so catalog vectors
made otherwise are never compared with these: a home whose setting changed says so
(`CatalogMismatchError`) until `lookalike index` re-embeds it. Queries are embedded by
the base network, power-normalised the same way (`query_encoder`; its stamp is the
base's plus the power, so a centre calibrated in another space is ignored with a warning).

Which a home uses (`catalog_views`, `power_normalise` in `quality.json`): its setting when
it names one; else what its catalog was indexed with (an existing home keeps its
vectors: one indexed before these existed has neither); else, for a new home,
DEFAULT_CATALOG_VIEWS and DEFAULT_POWER: the image and its 20-degree clockwise turn (two
passes an image) with the signed square root. Tuned models are never wrapped (their heads
train on the bare base embedding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..encoders.runtime import l2_normalise
from ..framing import border_colour

STAMP_TAG = "+catalog:"
POWER_TAG = "+power"
BASE_STAMP_META = "base_catalog_stamp"
"""Catalog meta key: the base model's catalog stamp when a tuned model took over, so that
`tune --reset` gives the home back the catalog views and power it had."""
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

DEFAULT_CATALOG_VIEWS: tuple[str, ...] = ("rot-20",)
"""A new home's: the image and its 20-degree clockwise turn, two forward passes an image
(four, TURNED_VIEWS, put ingest under its 60 images/s target). With DEFAULT_POWER, the
best of the sets of at most two passes on grocery train.csv per burst (Recall@1 0.393 ->
0.434, Recall@5 0.773 -> 0.782; fashion-footwear category precision 0.6237 -> 0.6271;
docs/quality.md, "Catalog views")."""

DEFAULT_POWER: float | None = 0.5
"""A new home's power normalisation: the signed square root, catalog and queries alike."""


def power_normalise(vectors: np.ndarray, p: float | None) -> np.ndarray:
    """sign(x) |x|^p of each row, L2-normalised (the vectors as they are for None)."""
    if p is None:
        return vectors
    x = np.asarray(vectors, dtype=np.float32)
    return l2_normalise(np.sign(x) * np.abs(x) ** p).astype(np.float32)


def check_power(p: Any) -> float | None:
    """The power as a float, None for off (`false`), or ValueError."""
    if p is False or p is None:
        return None
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < 1:
        raise ValueError(f"power_normalise must be a number between 0 and 1, or false, not {p!r}")
    return float(p)


def _power_tag(p: float | None) -> str:
    """The stamp's suffix for power normalisation p ("" for none)."""
    return "" if p is None else f"{POWER_TAG}{p:g}"


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


def parse_stamp(stored: str | None, base_stamp: str) -> tuple[tuple[str, ...], float | None] | None:
    """The catalog views and power a stored catalog stamp says its vectors were made with,
    for this base model: ((), None) for the bare base stamp, None when it is another
    model's."""
    if stored is None or not stored.startswith(base_stamp):
        return None
    rest, power = stored[len(base_stamp) :], None
    if POWER_TAG in rest:
        rest, _, p = rest.rpartition(POWER_TAG)
        try:
            power = check_power(float(p))
        except ValueError:
            return None
        if power is None:
            return None
    if not rest:
        return (), power
    if not rest.startswith(STAMP_TAG):
        return None
    try:
        return check_views(rest[len(STAMP_TAG) :].split(",")), power
    except ValueError:
        return None


def catalog_views_for(
    setting: Sequence[str] | None, stored_stamp: str | None, base_stamp: str
) -> tuple[str, ...]:
    """The views a home's base model embeds its catalog with (see the module docstring)."""
    if setting is not None:
        return check_views(setting)
    kept = parse_stamp(stored_stamp, base_stamp)
    return DEFAULT_CATALOG_VIEWS if kept is None else kept[0]


def catalog_power_for(setting: Any, stored_stamp: str | None, base_stamp: str) -> float | None:
    """The power normalisation of a home's base model (see the module docstring); `setting`
    None when quality.json names none."""
    if setting is not None:
        return check_power(setting)
    kept = parse_stamp(stored_stamp, base_stamp)
    return DEFAULT_POWER if kept is None else kept[1]


class _OnBase:
    """An encoder in front of a base encoder: its stamp, and the base's everything else."""

    def __init__(self, base: Any, stamp: str) -> None:
        self.base = base
        self.stamp = stamp
        self.name = base.name
        self.dim = base.dim
        self.input_size = base.input_size
        self.draft_size = getattr(base, "draft_size", 2 * int(base.input_size))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.stamp} dim={self.dim}>"

    def __getattr__(self, name: str) -> Any:  # anything else is the base's
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)


class PoweredEncoder(_OnBase):
    """A base encoder whose vectors are power-normalised: how a home with power
    normalisation embeds its queries."""

    def __init__(self, base: Any, power: float) -> None:
        self.power = check_power(power)
        super().__init__(base, base.stamp + _power_tag(self.power))

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return power_normalise(self.base.embed(batch), self.power)


class CatalogViewEncoder(_OnBase):
    """A base encoder whose catalog images are embedded as the mean of their views,
    power-normalised when `power` is given."""

    def __init__(self, base: Any, views: Sequence[str], power: float | None = None) -> None:
        self.views = check_views(views)
        self.power = check_power(power)
        self._fns = [CATALOG_VIEWS[v] for v in self.views]
        views_tag = f"{STAMP_TAG}{','.join(self.views)}" if self.views else ""
        super().__init__(base, base.stamp + views_tag + _power_tag(self.power))
        self.query = base if self.power is None else PoweredEncoder(base, self.power)
        """What embeds queries: the base, power-normalised as the catalog is."""

    def prepare(self, img: Image.Image) -> np.ndarray:
        """(1 + len(views), S, S, 3): the image as it is, then each view of it."""
        rgb = img if img.mode == "RGB" else img.convert("RGB")
        return np.stack([self.base.prepare(rgb)] + [self.base.prepare(f(rgb)) for f in self._fns])

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(N, k, S, S, 3) -> (N, dim), each image's view vectors averaged and normalised,
        then power-normalised; (N, S, S, 3) -> the query encoder's vectors (one view)."""
        batch = np.asarray(batch)
        if batch.ndim != 5:
            return self.query.embed(batch)
        n, k = batch.shape[:2]
        flat = batch.reshape(n * k, *batch.shape[2:])
        vectors = np.concatenate(
            [self.base.embed(flat[i : i + EMBED_CHUNK]) for i in range(0, len(flat), EMBED_CHUNK)]
        )
        mean = l2_normalise(vectors.reshape(n, k, -1).mean(axis=1)).astype(np.float32)
        return power_normalise(mean, self.power)


def with_catalog_views(encoder: Any, views: Sequence[str], power: float | None = None) -> Any:
    """`encoder` wrapped to embed catalog images as the mean of these views, power-normalised
    (itself for no views and no power)."""
    return CatalogViewEncoder(encoder, views, power) if views or power is not None else encoder


def query_encoder(encoder: Any) -> Any:
    """The encoder that embeds queries: the (power-normalised) base under catalog views,
    else `encoder`."""
    return encoder.query if isinstance(encoder, CatalogViewEncoder) else encoder


def bare_base(encoder: Any) -> Any:
    """The base network under catalog views and power normalisation (what tuning trains
    on), else `encoder`."""
    return encoder.base if isinstance(encoder, CatalogViewEncoder) else encoder
