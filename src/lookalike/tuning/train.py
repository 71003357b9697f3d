"""`lookalike tune`: one training run, step by step. Read the sources (labelled photos,
unlabelled photos, a catalog field; lookalike.tuning.sources) and the catalog, make sure
every image's features are cached, gather the training arrays, give unlabelled photos
pseudo-labels (lookalike.tuning.pseudo), train the chosen method, save the result as a
new version under `<home>/models/tuned/`, and (optionally) switch the engine to it.

Training reads only the sources and the catalog; the `--validate` file is only embedded
to report Recall@1/@5 before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.runtime import file_sha256
from ..errors import ModelError, UsageError
from ..fsutil import atomic_write, sha256_of
from ..models import HEAD_FORMAT, Head, base_of, open_tuned, tuned_root
from .features import (
    GRID,
    FeatureCache,
    Featurize,
    ImageRef,
    compute_crops,
    compute_features,
    crop_embeddings,
    featurizer,
    probe_maps,
)
from .finetune import Trunk, calibration_maps, embed_maps, export_tuned, train_tail
from .head import fit_head
from .pseudo import LABEL_CROPS, PHOTOS_QUERY_VIEWS, PseudoLabels, label_views, self_train
from .settings import TuneSettings
from .sources import Inputs, read_inputs
from .switch import use_model
from .weak import CLASSIFIER_STEPS, describe_head, field_head


@dataclass
class TuneReport:
    """What `train_tuned_model` did."""

    version: str
    stamp: str
    base_stamp: str
    labels: str | None
    labels_sha256: str | None
    photos_used: int
    products_labelled: int
    catalog_products: int
    catalog_images: int
    skipped_unknown: list[str] = field(default_factory=list)  # "FILE:LINE: product 'x' ..."
    skipped_unreadable: list[str] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)
    validation: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    reembedded: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"tuned model {self.version} is active ({self.stamp})",
            f"sources: {', '.join(self.sources.get('used', []))}; trained on"
            f" {self.photos_used} photos of {self.products_labelled} products +"
            f" {self.catalog_images} catalog images of {self.catalog_products} products",
        ]
        pseudo = self.sources.get("photos")
        if pseudo:
            lines.append(
                f"unlabelled photos: {pseudo['photos']} given pseudo-labels of"
                f" {pseudo['products_assigned']} products (mean confidence"
                f" {pseudo['mean_confidence']:.3f})"
            )
        weak = self.sources.get("field")
        if weak:
            lines.append(
                f"field {weak['name']!r}: {len(weak['classes'])} values as weak labels of the"
                " catalog images"
            )
        if self.skipped_unknown:
            lines.append(
                f"skipped {len(self.skipped_unknown)} label row(s) naming products not in the"
                " catalog:"
            )
            lines += [f"  {s}" for s in self.skipped_unknown[:5]]
            if len(self.skipped_unknown) > 5:
                lines.append(f"  ... and {len(self.skipped_unknown) - 5} more")
        if self.skipped_unreadable:
            lines.append(f"skipped {len(self.skipped_unreadable)} unreadable image(s):")
            lines += [f"  {s}" for s in self.skipped_unreadable[:5]]
        if self.validation:
            v = self.validation
            b, a = v["before"], v["after"]
            lines.append(
                f"validation ({v['queries']} photos of {v['file']}):"
                f" Recall@1 {b['recall@1']:.3f} -> {a['recall@1']:.3f},"
                f" Recall@5 {b['recall@5']:.3f} -> {a['recall@5']:.3f}"
            )
        s = self.seconds
        lines.append(
            f"time: features {s.get('features', 0):.1f}s, training {s.get('training', 0):.1f}s,"
            f" re-embedding {s.get('reembed', 0):.1f}s, total {s.get('total', 0):.1f}s"
        )
        return "\n".join(lines)


def train_tuned_model(
    engine: Any,
    labels_csv: str | os.PathLike | None = None,
    validate_csv: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    photos: Sequence[str | os.PathLike] | None = None,
    field: str | None = None,
    settings: TuneSettings | None = None,
    activate: bool = True,
    log: Callable[[str], None] | None = None,
) -> TuneReport:
    """Learn from whatever the shop has, alone or together: `labels_csv` (image,product_id
    rows; image paths relative to the file), unlabelled `photos` (folders, images, or CSVs
    of which only the `image` column is read; lookalike.tuning.pseudo), the catalog
    field `field` as weak labels (lookalike.tuning.weak), and always the engine's
    catalog. Save the result as a new version, and (with `activate`) make it the
    engine's model: the catalog is re-embedded and searches use it at once.

    Two methods (`settings.method`; "auto" picks finetune where the base allows it):
    "finetune" fine-tunes the network's last blocks plus an MLP head on cached trunk
    maps (lookalike.tuning.finetune); "head" learns a head on frozen base embeddings
    (any encoder, `onnx:` models included; lookalike.tuning.head).

    Label rows naming products that are not in the catalog are reported and skipped.
    `validate_csv` is only used to report and save Recall@1/@5 before and after. `log`
    receives a line per epoch (loss, validation figures); by default they are dropped."""
    started = time.perf_counter()
    base = base_of(engine.encoder)
    settings = (settings or TuneSettings()).resolved(
        base, field=field is not None, labelled=labels_csv is not None, photos=bool(photos)
    )
    if log is None:
        log = _no_log
    home = Path(engine.home)
    inputs = read_inputs(engine.catalog, labels_csv, validate_csv, photos, field)

    t0 = time.perf_counter()
    features = _cached_features(base, home, settings, inputs, progress)
    seconds = {"features": time.perf_counter() - t0}
    data = _gather(features, inputs, settings)
    pseudo = None
    if data.unl_emb is not None:
        t3 = time.perf_counter()
        pseudo = _pseudo_label(settings, data, log)
        seconds["pseudo_labels"] = time.perf_counter() - t3
    if data.n_photos == 0:
        _catalog_as_photos(data)
    before = None
    if data.val_x is not None:
        before = product_recall(data.val_emb, data.val_y, data.cat_emb, data.cat_y, data.n_products)
        log(
            f"validation before tuning: Recall@1 {before['recall@1']:.3f}"
            f"  Recall@5 {before['recall@5']:.3f}  ({len(data.val_y)} photos)"
        )

    folder = Path(tempfile.mkdtemp(prefix=".new-", dir=_mkdir(tuned_root(home))))
    try:
        t1 = time.perf_counter()
        trained, epochs = _train(settings, data, features.trunk, progress, log)
        seconds["training"] = time.perf_counter() - t1
        written = _write_model(trained, settings, data, features, folder)
        sources = _sources_info(inputs, pseudo, data)
        tuned, info = _save_version(base, settings, inputs, data, folder, written, epochs, before,
                                    sources)  # fmt: skip
        os.replace(folder, tuned_root(home) / tuned.version)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise

    report = TuneReport(
        version=tuned.version,
        stamp=tuned.stamp,
        base_stamp=base.stamp,
        labels=None if inputs.labels_path is None else str(inputs.labels_path),
        labels_sha256=info["labels_sha256"],
        photos_used=data.n_photos,
        products_labelled=int(len(np.unique(data.photo_y[: data.n_photos]))),
        catalog_products=data.n_products,
        catalog_images=int(len(data.cat_y)),
        skipped_unknown=inputs.skipped_unknown,
        skipped_unreadable=features.unreadable,
        epochs=epochs,
        validation=info["validation"],
        settings=asdict(settings),
        sources=sources,
    )
    if activate:
        t2 = time.perf_counter()
        report.reembedded = use_model(engine, tuned.version, progress=progress)
        seconds["reembed"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - started
    report.seconds = {k: round(v, 2) for k, v in seconds.items()}
    return report


# --------------------------------------------------------------------------- 2. features


@dataclass
class _Features:
    """Every image of the run, with its features in `cache`."""

    cache: FeatureCache
    trunk: Trunk | None  # the finetune method's cut base graph (exported again at the end)
    photo_images: list[ImageRef]  # labelled photos
    cat_images: list[ImageRef]
    val_images: list[ImageRef]
    unreadable: list[str]
    unl_images: list[ImageRef] = field(default_factory=list)  # unlabelled photos
    crops: FeatureCache | None = None  # --photos: embeddings of the labelling crops


def _cached_features(
    base: Any, home: Path, settings: TuneSettings, inputs: Inputs, progress: bool
) -> _Features:
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
    if finetuning and (settings.views or settings.catalog_views):
        view_images = [
            *(ImageRef(i.path, i.sha256, k) for k in range(1, settings.catalog_views + 1)
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
    return _Features(cache, trunk, photo_images, cat_images, val_images, unreadable, unl_images,
                     crops)  # fmt: skip


# --------------------------------------------------------------------------- 3. arrays


@dataclass
class _Data:
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
    # ... and the embeddings of the photos' central crops (LABEL_CROPS), "photo", "unl"
    crop_emb: dict[str, list[np.ndarray]] = field(default_factory=dict)


def _gather(features: _Features, inputs: Inputs, settings: TuneSettings) -> _Data:
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
    data = _Data(
        finetuning, spatial, len(inputs.products), photo_x, photo_y, cat_x, cat_y, cat_emb,
        photo_views=gather_views(features.photo_images, settings.views),
        cat_views=gather_views(features.cat_images, settings.catalog_views),
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


def _pseudo_label(settings: TuneSettings, data: _Data, log: Callable[[str], None]) -> PseudoLabels:
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


def _catalog_as_photos(data: _Data) -> None:
    """With no photos at all (`--field` alone) the catalog images are the training
    samples: each against its own product's proxy (what keeps products apart) and its
    field value's."""
    data.photo_x, data.photo_y, data.photo_views = data.cat_x, data.cat_y, data.cat_views


def _sources_info(inputs: Inputs, pseudo: PseudoLabels | None, data: _Data) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- 4. training


def _train(
    settings: TuneSettings,
    data: _Data,
    trunk: Trunk | None,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[Any, list[dict[str, float]]]:
    """Train the method: returns (the torch tail or the Head, per-epoch figures)."""
    from tqdm import tqdm

    epochs: list[dict[str, float]] = []
    targets = data.photo_y if data.photo_targets is None else data.photo_targets
    extra = None if data.finetuning else crop_samples(data, targets)
    samples = len(data.photo_y) + (0 if extra is None else len(extra[0]))
    steps = -(-samples // settings.batch_size)
    field_only = not data.finetuning and data.cat_field is not None and data.n_photos == 0
    total = CLASSIFIER_STEPS if field_only else settings.epochs * steps
    bar = tqdm(total=total, desc=f"tuning ({settings.method})", unit="step",
               disable=not progress, dynamic_ncols=True)  # fmt: skip

    # per-epoch figures: the finetune tail embeds trunk maps, a head base embeddings
    val_in, cat_in = (data.val_x, data.cat_x) if data.finetuning else (data.val_emb, data.cat_emb)

    def on_epoch(epoch: int, loss: float, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        row: dict[str, float] = {"epoch": epoch + 1, "loss": round(loss, 4)}
        text = f"epoch {epoch + 1}/{settings.epochs}  loss {loss:.4f}"
        if val_in is not None:
            r = product_recall(embed(val_in), data.val_y, embed(cat_in), data.cat_y,
                               data.n_products)  # fmt: skip
            row.update({k: round(v, 4) for k, v in r.items()})
            text += f"  val Recall@1 {r['recall@1']:.3f}  Recall@5 {r['recall@5']:.3f}"
        epochs.append(row)
        if not data.finetuning:
            bar.update(steps)
        if progress:
            bar.write(text)
        else:
            log(text)

    if data.finetuning:
        assert trunk is not None
        trained = train_tail(
            settings,
            trunk.base.name, trunk.cut.first_block, data.photo_x, data.photo_y, data.cat_x,
            data.cat_y, data.n_products,
            photo_views=data.photo_views, cat_views=data.cat_views, cat_field=data.cat_field,
            on_step=lambda: bar.update(1),
            on_epoch=lambda e, loss, t: on_epoch(e, loss, lambda m: embed_maps(t, m)),
        )  # fmt: skip
    elif field_only:
        # --field alone: the field's classifier and the colour beside the base embedding
        trained = field_head(settings, data.cat_emb, data.cat_field, on_step=lambda: bar.update(1))
    else:
        trained = fit_head(
            settings, data.photo_x, targets, data.cat_x, data.cat_y, data.n_products,
            cat_field=data.cat_field, extra=extra,
            on_epoch=lambda e, loss, h: on_epoch(e, loss, h.apply),
        )  # fmt: skip
        if data.cat_field is not None:
            trained = field_head(settings, data.cat_emb, data.cat_field, trained)
    bar.close()
    return trained, epochs


def crop_samples(data: _Data, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """`tune --photos`, head method: the central crops of every photo (pseudo.LABEL_CROPS,
    already embedded for labelling) as more samples with the photo's own target, or None
    (no --photos). Measured on grocery's burst split: Recall@1/@5 +1.4/+1.1 points with
    full-image queries, more with the central-square query view (pseudo.PHOTOS_QUERY_VIEWS)."""
    if not data.crop_emb:
        return None
    names = ["photo", "unl"]  # the order of photo_x: labelled photos first
    per_crop = [np.concatenate([data.crop_emb[name][i] for name in names])
                for i in range(len(LABEL_CROPS))]  # fmt: skip
    assert len(per_crop[0]) == len(targets) == data.n_photos
    return np.concatenate(per_crop), np.concatenate([targets] * len(per_crop))


def product_recall(
    queries: np.ndarray,
    query_products: np.ndarray,
    catalog: np.ndarray,
    catalog_products: np.ndarray,
    n_products: int,
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Recall@K of product retrieval: a product scores its best image."""
    sims = queries @ catalog.T
    best = np.full((len(queries), n_products), -np.inf, dtype=np.float32)
    for p in np.unique(catalog_products):
        best[:, p] = sims[:, catalog_products == p].max(axis=1)
    order = np.argsort(-best, axis=1, kind="stable")
    rank = (order == query_products[:, None]).argmax(axis=1)
    return {f"recall@{k}": float((rank < k).mean()) for k in ks}


# --------------------------------------------------------------------------- 5. saving


@dataclass
class _Written:
    """The files of a trained model, as model.json describes them."""

    digest: str  # sha256 of model.onnx (finetune) or the head's arrays (head)
    described: str  # "head" in model.json: what was learned, in words
    kind_info: dict[str, Any]  # the method's own model.json fields (kind, hashes, input)


def _write_model(
    trained: Any, settings: TuneSettings, data: _Data, features: _Features, folder: Path
) -> _Written:
    """Write the trained model's files into `folder`."""
    if data.finetuning:
        trunk = features.trunk
        assert trunk is not None
        model_path = export_tuned(
            trained, trunk, int(data.cat_x.shape[1]), tuple(data.cat_x.shape[2:]), folder,
            calibration=calibration_maps(trunk.base, data.photo_x, data.cat_x),
        )  # fmt: skip
        digest = file_sha256(model_path, None)
        described = (
            f"blocks {trunk.cut.first_block}+ and the head conv fine-tuned, then MLP"
            f" {int(data.cat_emb.shape[1])}-{settings.hidden}-{settings.dim} (ReLU),"
            " L2-normalised"
        )
        kind_info = {"kind": "finetune", "model_sha256": digest,
                     "tail_sha256": file_sha256(folder / "tail.onnx", None),
                     "first_block": trunk.cut.first_block, "trunk_tensor": trunk.cut.tensor,
                     "input": f"trunk maps of each image and {settings.views} (photos) /"
                              f" {settings.catalog_views} (catalog) augmented views;"
                              " mirror + random-crop of the maps"}  # fmt: skip
        return _Written(digest, described, kind_info)
    head: Head = trained
    head.save(folder / "head.npz")
    digest = head.digest()
    described = describe_head(head, settings.hidden)
    kind_info = {"kind": "head", "head_sha256": digest,
                 "input": f"{GRID}x{GRID} grid cells, random-rectangle crops"
                 if data.spatial else "embedding"}  # fmt: skip
    if data.crop_emb:  # trained on the photos' central crops too: queried with one
        squares = " and ".join(f"{round(c * 100)} %" for c in LABEL_CROPS)
        kind_info["input"] += f"; the photos' central {squares} squares as more samples"
        kind_info["query_views"] = list(PHOTOS_QUERY_VIEWS)
    return _Written(digest, described, kind_info)


def _save_version(
    base: Any,
    settings: TuneSettings,
    inputs: Inputs,
    data: _Data,
    folder: Path,
    written: _Written,
    epochs: list[dict[str, float]],
    before: dict[str, float] | None,
    sources: dict[str, Any],
) -> tuple[Any, dict[str, Any]]:
    """Name the new version, check it loads, score it on the validation photos through
    the saved model itself, and write its model.json. Returns (encoder, model.json)."""
    labels_sha = None if inputs.labels_path is None else sha256_of(inputs.labels_path)
    version = _unused_version(
        folder.parent, time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + written.digest[:8]
    )
    info: dict[str, Any] = {
        "format": HEAD_FORMAT,
        "version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base_model": base.name,
        "base_stamp": base.stamp,
        **written.kind_info,
        "dim": settings.dim,
        "head": written.described,
        "sources": sources,
        "labels": None if inputs.labels_path is None else str(inputs.labels_path),
        "labels_sha256": labels_sha,
        "photos_used": data.n_photos,
        "products_labelled": int(len(np.unique(data.photo_y[: data.n_photos]))),
        "catalog_images": int(len(data.cat_y)),
        "catalog_products": data.n_products,
        "skipped_unknown": len(inputs.skipped_unknown),
        "settings": asdict(settings),
        "epochs": epochs,
    }
    tuned = open_tuned(base, folder, version, info)
    info["stamp"] = tuned.stamp
    info["dim"] = tuned.dim
    validation = None
    if data.val_x is not None and before is not None:
        # through the saved model itself (what search will use)
        after = product_recall(
            _from_cache(tuned, data.val_x, data.val_emb, data.val_colour), data.val_y,
            _from_cache(tuned, data.cat_x, data.cat_emb, data.cat_colour), data.cat_y,
            data.n_products,
        )  # fmt: skip
        validation = {
            "file": str(inputs.validate_csv),
            "file_sha256": sha256_of(Path(inputs.validate_csv).expanduser()),
            "queries": int(len(data.val_y)),
            "skipped_unknown": inputs.val_unknown,
            "before": before,
            "after": after,
        }
    info["validation"] = validation
    atomic_write(folder / "model.json", lambda fh: fh.write(json.dumps(info, indent=2).encode()))
    return tuned, info


def _from_cache(
    encoder: Any, spatial: np.ndarray, embeddings: np.ndarray, colour: np.ndarray | None
) -> np.ndarray:
    """`encoder`'s vectors of images whose cached features are given."""
    if hasattr(encoder, "from_trunk_maps"):
        return encoder.from_trunk_maps(spatial)
    return encoder.from_base_vectors(embeddings, colour)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _no_log(text: str) -> None:
    return None


def _unused_version(root: Path, name: str) -> str:
    """`name`, or `name-2`, `name-3`... when a version of that name exists: the same model
    trained twice within one second (a deterministic run repeated) must not collide."""
    version, n = name, 1
    while (root / version).exists():
        n += 1
        version = f"{name}-{n}"
    return version
