"""The feature cache of `lookalike tune`: base-encoder features of image files, computed
once and kept by file content in `<home>/models/features/`, so tuning can run again and
re-embedding after `tune` or `tune --reset` can skip the network.

For the head method the spatial part is a GRID x GRID grid of pooled cells of the final
feature map (a cheap feature-level crop: each sample is pooled over a random rectangle of
cells); for the finetune method it is the trunk map lookalike.tuning.finetune trains the
network's tail on.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.colour import colour_descriptor
from ..encoders.runtime import l2_normalise
from ..errors import LookalikeError
from ..fsutil import atomic_write
from ..images import load_image
from ..query import centre_square
from . import augment
from .finetune import VIEW_RECIPE, random_view
from .shopper import Background, pick_background, shopper_view, view_seed, views_per_image

GRID = 3
"""Feature maps are pooled into GRID x GRID cells for the feature-level crops."""
FEATURES_DIR = Path("models") / "features"


class FeatureCache:
    """Base-encoder features of image files, keyed by the file's sha256, for one base
    stamp: the embedding (float32) and a spatial array (float16) of one of two kinds:

    - "cells": a GRID x GRID grid of pooled cells of the final feature map, for the head
      method's feature-level crops (absent for encoders without a feature map);
    - "trunk": the trunk map the finetune method trains the network's tail on
      (lookalike.tuning.finetune), about 34 KB an image for EfficientNet-Lite2.

    Lets tuning run again without re-running the network, and lets re-embedding after
    `tune` or `tune --reset` skip it. A run keeps only what it used (`prune`): the images
    of the last run, so a server tuning itself on the photos it keeps (`serve
    --tune-every`) does not grow the cache by every photo it ever kept."""

    def __init__(self, path: Path, dim: int, stamp: str, kind: str = "cells"):
        self.path = path
        self.dim = dim
        self.stamp = stamp
        self.kind = kind
        self.index: dict[str, int] = {}
        self.embeddings = np.zeros((0, dim), dtype=np.float32)
        self.spatial: np.ndarray | None = None  # (N, G, G, C) cells or (N, C, h, w) maps
        self.colour: np.ndarray | None = None  # (N, 64) colour descriptors (encoders.colour)
        self.used: set[str] = set()  # the keys this run asked for (compute_features)
        self._dirty = False

    @classmethod
    def open(cls, home: str | os.PathLike, base: Any, kind: str = "cells") -> FeatureCache:
        digest = hashlib.sha256(base.stamp.encode()).hexdigest()[:16]
        name = f"{digest}.npz" if kind == "cells" else f"{digest}-{kind}.npz"
        cache = cls(Path(home) / FEATURES_DIR / name, int(base.dim), base.stamp, kind)
        if cache.path.is_file():
            try:
                with np.load(cache.path, allow_pickle=False) as z:
                    shas = [str(s) for s in z["sha256"]]
                    emb = z["embeddings"].astype(np.float32)
                    # "cells": what caches written before the finetune method called it
                    key = next((k for k in ("spatial", "cells") if k in z.files), None)
                    spatial = z[key] if key else None
                    colour = z["colour"].astype(np.float32) if "colour" in z.files else None
                    stamp = str(z["stamp"])
                if stamp == base.stamp and emb.shape[1:] == (cache.dim,):
                    cache.index = {s: i for i, s in enumerate(shas)}
                    cache.embeddings = emb
                    cache.spatial = spatial if spatial is not None and spatial.size else None
                    if colour is not None and len(colour) == len(emb):
                        cache.colour = colour
            except Exception:  # a damaged cache is only a slower run
                cache.index = {}
        return cache

    def __contains__(self, sha: str) -> bool:
        return sha in self.index

    def has_spatial(self) -> bool:
        return self.spatial is not None

    def has_colour(self) -> bool:
        """Whether every cached image has its colour descriptor (caches written before
        they were kept have none)."""
        return self.colour is not None

    def add(
        self,
        shas: Sequence[str],
        embeddings: np.ndarray,
        spatial: np.ndarray | None,
        colour: np.ndarray | None = None,
    ) -> None:
        new = [i for i, s in enumerate(shas) if s not in self.index]
        if not new:
            return
        start = len(self.index)
        if colour is not None and (self.colour is not None or start == 0):
            block = colour[new].astype(np.float32)
            self.colour = block if self.colour is None else np.concatenate([self.colour, block])
        else:
            self.colour = None
        for offset, i in enumerate(new):
            self.index[shas[i]] = start + offset
        self.embeddings = np.concatenate([self.embeddings, embeddings[new].astype(np.float32)])
        if spatial is not None and (self.spatial is not None or start == 0):
            block = spatial[new].astype(np.float16)
            self.spatial = block if self.spatial is None else np.concatenate([self.spatial, block])
        else:
            self.spatial = None  # mixed: fall back to embeddings only
        self._dirty = True

    def rows(self, shas: Sequence[str]) -> np.ndarray:
        return np.array([self.index[s] for s in shas], dtype=np.int64)

    def prune(self) -> int:
        """Drop every entry this run did not ask for, and save; returns how many went."""
        keep = [s for s in sorted(self.index, key=self.index.get) if s in self.used]
        dropped = len(self.index) - len(keep)
        if dropped:
            rows = self.rows(keep)
            self.embeddings = self.embeddings[rows]
            if self.spatial is not None:
                self.spatial = self.spatial[rows]
            if self.colour is not None:
                self.colour = self.colour[rows]
            self.index = {s: i for i, s in enumerate(keep)}
            self._dirty = True
            self.save()
        return dropped

    def save(self) -> None:
        if not self._dirty:
            return
        shas = np.array(sorted(self.index, key=self.index.get))
        arrays = {
            "sha256": shas,
            "embeddings": self.embeddings,
            "stamp": np.array(self.stamp),
        }
        if self.spatial is not None:
            arrays["spatial"] = self.spatial
        if self.colour is not None:
            arrays["colour"] = self.colour
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda fh: np.savez(fh, **arrays))
        self._dirty = False


def grid_cells(maps: np.ndarray, grid: int = GRID) -> np.ndarray:
    """(N, C, h, w) feature maps -> (N, grid, grid, C) means over a grid of cells (cell
    edges as even as the map allows; the full-image mean is the area-weighted cell mean,
    and with h, w divisible by grid simply their mean)."""
    n, c, h, w = maps.shape
    ys = np.linspace(0, h, grid + 1).round().astype(int)
    xs = np.linspace(0, w, grid + 1).round().astype(int)
    out = np.empty((n, grid, grid, c), dtype=np.float32)
    for i in range(grid):
        for j in range(grid):
            cell = maps[:, :, ys[i] : max(ys[i + 1], ys[i] + 1), xs[j] : max(xs[j + 1], xs[j] + 1)]
            out[:, i, j] = cell.mean(axis=(2, 3))
    return out


Featurize = Callable[[np.ndarray], tuple[np.ndarray, "np.ndarray | None"]]
"""A prepared uint8 batch -> (base embeddings (N, D), spatial array or None)."""


def featurizer(base: Any, use_cells: bool) -> Featurize:
    """What goes into the head method's FeatureCache ("cells") for this base encoder (the
    finetune method's "trunk" cache is filled by finetune.Trunk.run)."""
    if use_cells:

        def cells(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            maps = base.features(batch)
            return l2_normalise(maps.mean(axis=(2, 3))), grid_cells(maps)

        return cells
    return lambda batch: (base.embed(batch), None)


def _maps_match_embedding(base: Any, sample: np.ndarray) -> bool:
    """True when the encoder's `features` map, average-pooled and normalised, is its
    embedding: only then can grid cells stand in for crops of the embedding."""
    if not callable(getattr(base, "features", None)):
        return False
    try:
        maps = base.features(sample)
    except Exception:
        return False
    if maps.ndim != 4 or maps.shape[1] != base.dim:
        return False
    pooled = l2_normalise(maps.mean(axis=(2, 3)))
    return bool(np.allclose(pooled, base.embed(sample), atol=1e-4))


@dataclass
class ImageRef:
    path: Path
    sha256: str
    view: int = 0  # > 0: a randomly augmented view of the image (finetune.random_view)
    crop: float = 0.0  # > 0: the central square of this fraction of the shorter side
    shopper: int = 0  # > 0: a synthetic shopper view of the image on `background` (shopper)
    background: Background | None = None
    session: int = 0  # > 0: a session view of the photo (augment.session_view)

    @property
    def key(self) -> str:
        """The feature cache key: the file's sha256, plus the view for a view."""
        if self.shopper and self.background is not None:
            return f"{self.sha256}#shopper{self.shopper}.{self.background.sha256[:16]}"
        if self.crop:
            return f"{self.sha256}#centre{round(self.crop * 100)}"
        if self.session:
            return f"{self.sha256}#{augment.RECIPE}.{self.session}"
        if not self.view:
            return self.sha256
        return f"{self.sha256}#{VIEW_RECIPE}.{self.view}"


def compute_features(
    base: Any,
    cache: FeatureCache,
    images: Sequence[ImageRef],
    *,
    featurize: Featurize,
    progress: bool,
    desc: str,
    batch_size: int = 32,
    workers: int = 2,
) -> list[str]:
    """Make sure `cache` holds every image; returns the errors of images that could not
    be read (path: reason)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    todo: list[ImageRef] = []
    seen: set[str] = set()
    cache.used.update(image.key for image in images)
    for image in images:
        if image.key not in cache and image.key not in seen:
            seen.add(image.key)
            todo.append(image)
    errors: list[str] = []
    if not todo:
        return errors
    draft = int(getattr(base, "draft_size", 2 * int(base.input_size)))

    def prepare(image: ImageRef) -> tuple[ImageRef, np.ndarray | None]:
        try:
            img = load_image(image.path, draft_size=draft)
            if image.view:
                img = random_view(img, image.sha256, image.view)
            if image.crop:
                img = centre_square(img, image.crop)
            if image.session:
                img = augment.session_view(img, augment.view_seed(image.sha256, image.session))
            if image.shopper and image.background is not None:
                bg = load_image(image.background.path, draft_size=draft)
                img = shopper_view(img, bg, view_seed(image.sha256, image.shopper))
            return image, base.prepare(img)
        except LookalikeError as exc:
            errors.append(f"{image.path}: {exc}")
        except Exception as exc:  # a decoder bug on one hostile file must not stop the run
            errors.append(f"{image.path}: {type(exc).__name__}: {exc}")
        return image, None

    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    keys: list[str] = []
    embs: list[np.ndarray] = []
    colours: list[np.ndarray] = []
    with_colour = cache.kind == "cells"  # the head method's cache: `--field` heads read it
    spatials: list[np.ndarray | None] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(todo), batch_size):
            chunk = list(pool.map(prepare, todo[start : start + batch_size]))
            good = [(img, arr) for img, arr in chunk if arr is not None]
            if good:
                batch = np.stack([a for _, a in good])
                emb, spatial = featurize(batch)
                keys += [img.key for img, _ in good]
                embs.append(emb)
                if with_colour:
                    colours.append(colour_descriptor(batch))
                spatials.append(None if spatial is None else spatial.astype(np.float16))
            bar.update(len(chunk))
    bar.close()
    if keys:  # one concatenation, not one per batch
        spatial_all = None if any(x is None for x in spatials) else np.concatenate(spatials)
        cache.add(keys, np.concatenate(embs), spatial_all,
                  np.concatenate(colours) if with_colour else None)  # fmt: skip
        cache.save()
    return errors


def probe_maps(base: Any, images: Sequence[ImageRef]) -> bool:
    """Whether this encoder's feature map can be cached as grid cells (tried on the
    first readable image)."""
    for image in images[:5]:
        try:
            sample = _prepared(base, image.path)
        except (LookalikeError, OSError):
            continue
        return _maps_match_embedding(base, sample)
    return False


def _prepared(base: Any, path: Path) -> np.ndarray:
    draft = int(getattr(base, "draft_size", 2 * int(base.input_size)))
    return base.prepare(load_image(path, draft_size=draft))[None]


def catalog_images(
    catalog: Any, except_stamp: str | None = None
) -> list[tuple[int, str, str, str]]:
    """(image_id, product_id, source, sha256) of every catalog image (with `except_stamp`:
    of those whose vector that model did not make)."""
    out = []
    for rows in catalog.iter_images():
        out += [(r.image_id, r.product_id, r.source, r.sha256) for r in rows
                if except_stamp is None or r.stamp != except_stamp]  # fmt: skip
    return out


def compute_crops(base: Any, crops: FeatureCache, images: Sequence[ImageRef],
                  fractions: Sequence[float], progress: bool) -> list[str]:  # fmt: skip
    """Make sure `crops` holds the base embedding of each image's central squares of
    these `fractions` (query.centre_square); returns the errors, as compute_features."""
    views = [ImageRef(i.path, i.sha256, crop=c) for c in fractions for i in images]
    return compute_features(base, crops, views, featurize=featurizer(base, False),
                            progress=progress, desc="central crops")  # fmt: skip


def session_images(images: Sequence[ImageRef], views: int) -> list[ImageRef]:
    """The first `views` session views (lookalike.tuning.augment) of each of `images`,
    view by view."""
    return [ImageRef(i.path, i.sha256, session=k) for k in range(1, views + 1) for i in images]


def session_embeddings(cache: FeatureCache, crops: FeatureCache, images: Sequence[ImageRef],
                       views: int) -> list[np.ndarray]:  # fmt: skip
    """[view 1, ...] embeddings of the session views of cached `images` (a view missing
    from `crops` stands in as the image's own embedding, as in crop_embeddings)."""
    full = cache.embeddings[cache.rows([img.sha256 for img in images])]
    return [_or_own(full, crops, [ImageRef(img.path, img.sha256, session=k).key
                                  for img in images]) for k in range(1, views + 1)]  # fmt: skip


def shopper_images(catalog: Sequence[ImageRef], photos: Sequence[ImageRef],
                   views: int | None = None) -> list[ImageRef]:  # fmt: skip
    """The synthetic shopper views (lookalike.tuning.shopper) of each `catalog` image
    (`views` each; None: shopper.views_per_image), each on a background picked from
    `photos` by content."""
    views = views_per_image(len(catalog)) if views is None else views
    unique = {p.sha256: Background(p.path, p.sha256) for p in reversed(photos)}
    ordered = [unique[sha] for sha in sorted(unique)]
    if not ordered:
        return []
    return [ImageRef(i.path, i.sha256, shopper=k, background=pick_background(i.sha256, k, ordered))
            for i in catalog for k in range(1, views + 1)]  # fmt: skip


def shopper_embeddings(crops: FeatureCache, views: Sequence[ImageRef],
                       n_images: int) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(n_images, V, D) embeddings of `views` (shopper_images' order: V views of each
    image in turn) and (n_images, V) whether each was computed (a view that failed is
    left out)."""
    per = len(views) // max(1, n_images)
    have = np.array([v.key in crops for v in views], dtype=bool)
    out = np.zeros((len(views), crops.dim), dtype=np.float32)
    if have.any():
        out[have] = crops.embeddings[crops.rows([v.key for v in views if v.key in crops])]
    return out.reshape(n_images, per, crops.dim), have.reshape(n_images, per)


def crop_embeddings(cache: FeatureCache, crops: FeatureCache, images: Sequence[ImageRef],
                    fractions: Sequence[float]) -> list[np.ndarray]:  # fmt: skip
    """[full, crop 1, ...] embeddings of cached `images` (a crop missing from `crops`
    stands in as the image's own embedding)."""
    full = cache.embeddings[cache.rows([img.sha256 for img in images])]
    return [full, *(_or_own(full, crops, [ImageRef(img.path, img.sha256, crop=c).key
                                          for img in images]) for c in fractions)]  # fmt: skip


def _or_own(full: np.ndarray, crops: FeatureCache, keys: Sequence[str]) -> np.ndarray:
    """The embeddings `crops` holds under `keys`, one an image; an image whose key it does
    not hold keeps its own (`full`'s row)."""
    view = full.copy()
    have = np.array([k in crops for k in keys], dtype=bool)
    if have.any():
        view[have] = crops.embeddings[crops.rows([k for k in keys if k in crops])]
    return view
