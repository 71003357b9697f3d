"""One `lookalike tune` run's data (lookalike.tuning.train runs the steps): every image
of the run with its features in the cache (computing only what is missing), the
training arrays gathered from the cache, the unlabelled photos' pseudo-labels added to
them, and model.json's record of the sources."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError, UsageError
from ..fsutil import sha256_of
from .features import (
    FeatureCache,
    Featurize,
    ImageRef,
    compute_crops,
    compute_features,
    crop_embeddings,
    featurizer,
    probe_maps,
    session_embeddings,
    session_images,
    shopper_embeddings,
    shopper_images,
)
from .finetune import Trunk
from .pseudo import LABEL_CROPS, PseudoLabels, label_views, mix_shopper_views, self_train
from .settings import TuneSettings
from .sources import Inputs

# --------------------------------------------------------------------------- features


@dataclass
class Features:
    """Every image of the run, with its features in `cache`."""

    cache: FeatureCache
    trunk: Trunk | None  # the finetune method's cut base graph (exported again at the end)
    photo_images: list[ImageRef]  # labelled photos
    cat_images: list[ImageRef]
    val_images: list[ImageRef]
    unreadable: list[str]
    unl_images: list[ImageRef] = field(default_factory=list)  # unlabelled photos
    crops: FeatureCache | None = None  # --photos: embeddings of the labelling crops


def cached_features(
    base: Any, home: Path, settings: TuneSettings, inputs: Inputs, progress: bool
) -> Features:
    """Make sure the feature cache holds every image of the run (and, for finetune, the
    augmented views), computing only what is missing."""
    finetuning = settings.method == "finetune"
    photo_images = [ImageRef(p, sha256_of(p)) for p, _ in inputs.known]
    unl_images = [ImageRef(p, sha) for p, sha in inputs.unlabelled]
    cat_images = [ImageRef(Path(src), sha) for _, _, src, sha in inputs.cat_rows]
    val_images = [ImageRef(p, sha256_of(p)) for p, _ in inputs.val_rows]
    trunk = None
    if finetuning:
        trunk = Trunk(base)  # one ONNX load and session: features, then export
        cache = FeatureCache.open(home, base, "trunk")
        featurize: Featurize = trunk.run
    else:
        cache = FeatureCache.open(home, base, "cells")
        if cache.index and not cache.has_colour():  # written before colours were kept
            cache = FeatureCache(cache.path, cache.dim, cache.stamp, "cells")
        use_cells = cache.has_spatial() or (
            len(cache.index) == 0 and probe_maps(base, [*cat_images, *photo_images])
        )
        featurize = featurizer(base, use_cells)
    unreadable: list[str] = []
    steps = ((cat_images, "catalog features"), (photo_images, "photo features"),
             (unl_images, "unlabelled photos"), (val_images, "validation"))  # fmt: skip
    for images, desc in steps:
        if images:
            unreadable += compute_features(
                base, cache, images, featurize=featurize, progress=progress, desc=desc
            )
    if finetuning and (settings.views or settings.catalog_augment_views):
        view_images = [
            *(ImageRef(i.path, i.sha256, k) for k in range(1, settings.catalog_augment_views + 1)
              for i in cat_images),
            *(ImageRef(i.path, i.sha256, k) for k in range(1, settings.views + 1)
              for i in [*photo_images, *unl_images]),
        ]  # fmt: skip
        unreadable += compute_features(
            base, cache, view_images, featurize=featurize, progress=progress, desc="views"
        )
    if finetuning and not cache.has_spatial():
        raise ModelError(f"{cache.path}: trunk maps missing; delete the file and run again")
    crops = None
    if unl_images:  # pseudo-labelling embeds central crops too (pseudo.LABEL_CROPS)
        crops = FeatureCache.open(home, base, "crops")
        unreadable += compute_crops(base, crops, [*cat_images, *photo_images, *unl_images],
                                    LABEL_CROPS, progress)  # fmt: skip
        # ... and the catalog images' synthetic shopper views, on the photos (a view that
        # fails leaves its image to its own label view: not an unreadable input)
        readable = [i for i in cat_images if i.sha256 in cache]
        compute_features(base, crops, shopper_images(readable, [i for i in unl_images
                                                                 if i.sha256 in cache]),
                         featurize=featurizer(base, False), progress=progress,
                         desc="shopper views")  # fmt: skip
        if settings.session_views and not finetuning:  # more samples for the head (augment)
            photos = [i for i in [*photo_images, *unl_images] if i.sha256 in cache]
            compute_features(base, crops, session_images(photos, settings.session_views),
                             featurize=featurizer(base, False), progress=progress,
                             desc="session views")  # fmt: skip
    for used in (cache, crops):  # what earlier runs cached and this one did not use goes
        if used is not None:
            used.prune()
    return Features(cache, trunk, photo_images, cat_images, val_images, unreadable, unl_images,
                     crops)  # fmt: skip


# --------------------------------------------------------------------------- arrays


@dataclass
class Data:
    """The training arrays. `*_x` are what the method trains on: trunk maps (finetune),
    grid cells or base embeddings (head); `*_emb` the base embeddings; `*_y` product
    indices; `*_views` (N, V, C, h, w) trunk maps of each image's augmented views."""

    finetuning: bool
    spatial: bool  # `*_x` are spatial (trunk maps or cells), not embeddings
    n_products: int
    photo_x: np.ndarray
    photo_y: np.ndarray
    cat_x: np.ndarray
    cat_y: np.ndarray
    cat_emb: np.ndarray
    photo_views: np.ndarray | None
    cat_views: np.ndarray | None
    val_x: np.ndarray | None = None
    val_y: np.ndarray | None = None
    val_emb: np.ndarray | None = None
    n_photos: int = 0  # labelled + pseudo-labelled photos in photo_x (0: catalog only)
    photo_emb: np.ndarray | None = None  # base embeddings of the labelled photos
    unl_x: np.ndarray | None = None  # unlabelled photos: what the method trains on
    unl_emb: np.ndarray | None = None  # ... and their base embeddings
    unl_views: np.ndarray | None = None
    cat_field: np.ndarray | None = None  # --field: class of each catalog image (-1: none)
    cat_colour: np.ndarray | None = None  # colour descriptors (None: the cache has none)
    val_colour: np.ndarray | None = None
    # --photos: what photos are labelled with (pseudo.label_views), and the head's targets
    label_emb: dict[str, np.ndarray] = field(default_factory=dict)  # "cat", "photo", "unl"
    photo_targets: np.ndarray | None = None  # (n_photos, P) soft targets, or None: photo_y
    # ... and the embeddings of the photos' central crops (LABEL_CROPS), "cat", "photo",
    # "unl", then (photos only) of their session views (settings.session_views, augment)
    crop_emb: dict[str, list[np.ndarray]] = field(default_factory=dict)


def gather_arrays(features: Features, inputs: Inputs, settings: TuneSettings) -> Data:
    cache = features.cache
    finetuning = settings.method == "finetune"
    spatial = cache.has_spatial()

    def gather(images: Sequence[ImageRef], labels: Sequence[str]):
        keep = [i for i, img in enumerate(images) if img.sha256 in cache]
        rows_ = cache.rows([images[i].sha256 for i in keep])
        y = np.array([inputs.pindex[labels[i]] for i in keep], dtype=np.int64)
        x = cache.spatial[rows_] if spatial else cache.embeddings[rows_]
        return x, y, cache.embeddings[rows_]

    def gather_views(images: Sequence[ImageRef], count: int) -> np.ndarray | None:
        """(N, count, ...) trunk maps of the views of the readable `images`."""
        if not (finetuning and count):
            return None
        kept = [img for img in images if img.sha256 in cache]
        views = [ImageRef(img.path, img.sha256, k).key for img in kept
                 for k in range(1, count + 1)]  # fmt: skip
        # an unreadable view (never cached) stands in as the image itself
        keys = [key if key in cache else key.split("#", 1)[0] for key in views]
        maps = cache.spatial[cache.rows(keys)]
        return maps.reshape(len(kept), count, *maps.shape[1:])

    photo_x, photo_y, photo_emb = gather(features.photo_images,
                                         [pid for _, pid in inputs.known])  # fmt: skip
    cat_rows = inputs.cat_rows
    cat_x, cat_y, cat_emb = gather(features.cat_images, [pid for _, pid, _, _ in cat_rows])
    data = Data(
        finetuning, spatial, len(inputs.products), photo_x, photo_y, cat_x, cat_y, cat_emb,
        photo_views=gather_views(features.photo_images, settings.views),
        cat_views=gather_views(features.cat_images, settings.catalog_augment_views),
        n_photos=len(photo_y), photo_emb=photo_emb,
    )  # fmt: skip
    if inputs.labels_path is not None and len(photo_y) == 0:
        raise UsageError(f"{inputs.labels_path}: none of its images could be read")
    if inputs.field is not None:
        kept = [i for i, img in enumerate(features.cat_images) if img.sha256 in cache]
        data.cat_field = inputs.field.y[kept]
    if features.unl_images:
        unl = [img for img in features.unl_images if img.sha256 in cache]
        if not unl:
            raise UsageError("--photos: none of the photos could be read")
        rows_ = cache.rows([img.sha256 for img in unl])
        data.unl_x = cache.spatial[rows_] if spatial else cache.embeddings[rows_]
        data.unl_emb = cache.embeddings[rows_]
        data.unl_views = gather_views(unl, settings.views)
        kept_photos = [img for img in features.photo_images if img.sha256 in cache]
        kept_cat = [img for img in features.cat_images if img.sha256 in cache]
        for name, images in (("cat", kept_cat), ("photo", kept_photos), ("unl", unl)):
            assert features.crops is not None
            views = crop_embeddings(cache, features.crops, images, LABEL_CROPS)
            data.label_emb[name] = label_views(views)
            data.crop_emb[name] = views[1:]
            if name != "cat" and settings.session_views and not finetuning:
                data.crop_emb[name] += session_embeddings(cache, features.crops, images,
                                                          settings.session_views)  # fmt: skip
        shopper, have = shopper_embeddings(features.crops, shopper_images(kept_cat, unl),
                                           len(kept_cat))  # fmt: skip
        data.label_emb["cat"] = mix_shopper_views(data.label_emb["cat"], shopper, have)
    if features.val_images:
        data.val_x, data.val_y, data.val_emb = gather(
            features.val_images, [pid for _, pid in inputs.val_rows]
        )
    if cache.has_colour():
        assert cache.colour is not None
        for images, name in ((features.cat_images, "cat_colour"), (features.val_images,
                                                                   "val_colour")):  # fmt: skip
            rows_ = cache.rows([img.sha256 for img in images if img.sha256 in cache])
            setattr(data, name, cache.colour[rows_])
    return data


def pseudo_label(settings: TuneSettings, data: Data, log: Callable[[str], None]) -> PseudoLabels:
    """Give the unlabelled photos pseudo-labels and add them to the training photos."""
    assert data.unl_emb is not None and data.unl_x is not None
    known = data.n_photos > 0

    def on_round(r: int, row: dict[str, float]) -> None:
        log(f"pseudo-labels, round {r}: {row['products_assigned']} products assigned,"
            f" mean confidence {row['mean_confidence']:.3f}")  # fmt: skip

    emb = data.label_emb
    pseudo = self_train(
        settings, emb["unl"], emb["cat"], data.cat_y, data.n_products,
        labelled=emb["photo"] if known else None, labelled_y=data.photo_y if known else None,
        on_round=on_round,
    )  # fmt: skip
    assert pseudo.targets is not None
    given = np.eye(data.n_products, dtype=np.float32)[data.photo_y]  # true labels: one-hot
    data.photo_targets = np.concatenate([given, pseudo.targets]) if known else pseudo.targets
    data.photo_x = np.concatenate([data.photo_x, data.unl_x]) if known else data.unl_x
    data.photo_y = np.concatenate([data.photo_y, pseudo.labels]) if known else pseudo.labels
    if data.photo_views is not None and data.unl_views is not None:
        data.photo_views = (np.concatenate([data.photo_views, data.unl_views]) if known
                            else data.unl_views)  # fmt: skip
    data.n_photos = len(data.photo_y)
    return pseudo


def catalog_as_photos(data: Data) -> None:
    """With no photos at all (`--field` alone) the catalog images are the training
    samples: each against its own product's proxy (what keeps products apart) and its
    field value's."""
    data.photo_x, data.photo_y, data.photo_views = data.cat_x, data.cat_y, data.cat_views


def sources_info(inputs: Inputs, pseudo: PseudoLabels | None, data: Data) -> dict[str, Any]:
    """model.json's record of what the run learned from."""
    out: dict[str, Any] = {"used": inputs.sources()}
    if inputs.labels_path is not None:
        out["labels"] = {"file": str(inputs.labels_path), "photos": len(inputs.known)}
    if pseudo is not None:
        digest = hashlib.sha256("\n".join(sha for _, sha in inputs.unlabelled).encode())
        out["photos"] = {"sources": inputs.photo_sources, "photos_sha256": digest.hexdigest(),
                         **pseudo.summary()}  # fmt: skip
    if inputs.field is not None:
        out["field"] = {"name": inputs.field.name, "classes": inputs.field.classes,
                        "counts": inputs.field.counts()}  # fmt: skip
    return out
