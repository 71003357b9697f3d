"""`lookalike tune`: one training run, step by step. Read the sources (labelled photos,
unlabelled photos, a catalog field; lookalike.tuning.sources) and the catalog, make sure
every image's features are cached, gather the training arrays, give unlabelled photos
pseudo-labels (lookalike.tuning.pseudo), train the chosen method, save the result as a
new version under `<home>/models/tuned/`, and (optionally) switch the engine to it.

Training reads only the sources and the catalog; the `--validate` file is only embedded
to report Recall@1/@5 before and after.
"""

from __future__ import annotations

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
from ..errors import LookalikeError, UsageError
from ..fsutil import atomic_write, sha256_of
from ..images import load_image
from ..models import (
    HEAD_FORMAT,
    CatalogViewEncoder,
    Head,
    TunedEncoder,
    base_of,
    catalog_vectors,
    open_tuned,
    tuned_root,
)
from ..models.head_graph import write_head_graph
from ..models.prototypes import PROTOTYPES_FILE, PhotoPrototypes
from ..query import query_pipeline
from .data import (
    Data,
    Features,
    cached_features,
    catalog_as_photos,
    gather_arrays,
    pseudo_label,
    sources_info,
)
from .features import (
    GRID,
)
from .finetune import Trunk, calibration_maps, embed_maps, export_tuned, train_tail
from .head import fit_head
from .pseudo import LABEL_CROPS, PHOTOS_QUERY_VIEWS
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
    photo_prototypes: dict[str, Any] | None = None  # model.json's entry, when it has them

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
        protos = self.photo_prototypes
        if protos:
            lines.append(
                f"photo prototypes: {protos['images']} catalog images moved towards the"
                f" {protos['photos']} photos the model gives them (weight {protos['weight']:g})"
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
            f" photo prototypes {s.get('prototypes', 0):.1f}s,"
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
    features = cached_features(base, home, settings, inputs, progress)
    seconds = {"features": time.perf_counter() - t0}
    data = gather_arrays(features, inputs, settings)
    pseudo = None
    if data.unl_emb is not None:
        t3 = time.perf_counter()
        pseudo = pseudo_label(settings, data, log)
        seconds["pseudo_labels"] = time.perf_counter() - t3
    if data.n_photos == 0:
        catalog_as_photos(data)
    before = None
    val_recall = _validation_recall(home, features, data)
    if val_recall is not None:
        before = val_recall(*_searched_catalog(engine, base, inputs, features, data))
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
        sources = sources_info(inputs, pseudo, data)
        prototypes = _PrototypeInputs(home, features, progress)
        tuned, info = _save_version(base, settings, inputs, data, folder, written, epochs,
                                    before, val_recall, sources,
                                    prototypes)  # fmt: skip
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
        photo_prototypes=info.get("photo_prototypes"),
    )
    if info.get("photo_prototypes"):
        seconds["prototypes"] = info["photo_prototypes"]["seconds"]
    if activate:
        t2 = time.perf_counter()
        report.reembedded = use_model(engine, tuned.version, progress=progress)
        seconds["reembed"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - started
    report.seconds = {k: round(v, 2) for k, v in seconds.items()}
    return report


# --------------------------------------------------------------------------- 4. training


def _train(
    settings: TuneSettings,
    data: Data,
    trunk: Trunk | None,
    progress: bool,
    log: Callable[[str], None],
) -> tuple[Any, list[dict[str, float]]]:
    """Train the method: returns (the torch tail or the Head, per-epoch figures)."""
    from tqdm import tqdm

    epochs: list[dict[str, float]] = []
    targets = data.photo_y if data.photo_targets is None else data.photo_targets
    extra = None if data.finetuning else crop_samples(data)
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


def crop_samples(data: Data) -> tuple[np.ndarray, np.ndarray] | None:
    """`tune --photos`, head method: the central crops of every photo (pseudo.LABEL_CROPS,
    already embedded for labelling) and its session views (settings.session_views,
    lookalike.tuning.augment) as more samples, each with the row of its photo (whose
    target it trains on: fit_head's `extra`), or None (no --photos). Measured on
    grocery's burst split: Recall@1/@5 +1.4/+1.1 points with full-image queries, more
    with the central-square query view (pseudo.PHOTOS_QUERY_VIEWS)."""
    if not data.crop_emb:
        return None
    names = ["photo", "unl"]  # the order of photo_x: labelled photos first
    per_view = [np.concatenate([data.crop_emb[name][i] for name in names])
                for i in range(len(data.crop_emb["unl"]))]  # fmt: skip
    assert len(per_view[0]) == data.n_photos
    return np.concatenate(per_view), np.tile(np.arange(data.n_photos), len(per_view))


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
    trained: Any, settings: TuneSettings, data: Data, features: Features, folder: Path
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
                              f" {settings.catalog_augment_views} (catalog) augmented views;"
                              " mirror + random-crop of the maps"}  # fmt: skip
        return _Written(digest, described, kind_info)
    head: Head = trained
    head.save(folder / "head.npz")
    digest = head.digest()
    described = describe_head(head, settings.hidden)
    kind_info = {"kind": "head", "head_sha256": digest,
                 "input": f"{GRID}x{GRID} grid cells, random-rectangle crops"
                 if data.spatial else "embedding"}  # fmt: skip
    # what search runs: the head as an INT8 graph (head_graph.py), where it has an MLP,
    # whose weights are what the graph saves reading; a --field head alone (the posterior,
    # the colour, the base) has none, and stays in numpy (docs/quality.md)
    if settings.head_int8 and head.weights:
        write_head_graph(head, folder / "head.onnx")
        kind_info["head_graph_sha256"] = file_sha256(folder / "head.onnx", None)
        described += "; run as an INT8 ONNX graph"
    if data.crop_emb:  # trained on the photos' central crops too: queried with one
        squares = " and ".join(f"{round(c * 100)} %" for c in LABEL_CROPS)
        kind_info["input"] += f"; the photos' central {squares} squares as more samples"
        if settings.session_views:
            kind_info["input"] += f", and {settings.session_views} session views of each"
        kind_info["query_views"] = list(PHOTOS_QUERY_VIEWS)
    return _Written(digest, described, kind_info)


def _save_version(
    base: Any,
    settings: TuneSettings,
    inputs: Inputs,
    data: Data,
    folder: Path,
    written: _Written,
    epochs: list[dict[str, float]],
    before: dict[str, float] | None,
    val_recall: Callable[[Any, np.ndarray], dict[str, float]] | None,
    sources: dict[str, Any],
    prototypes: _PrototypeInputs | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Name the new version, check it loads, give it its photo prototypes (`tune
    --photos`, head method), score it on the validation photos through the saved model
    itself, and write its model.json. Returns (encoder, model.json)."""
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
    cat_sha = [] if prototypes is None else prototypes.catalog_sha256()
    # the catalog images' vectors before any prototype: the prototypes do not change them
    # (only what is stored), so the reopened model's would be the same
    cat_vectors = None
    if (prototypes is not None and settings.photo_prototypes and isinstance(tuned, TunedEncoder)
            and prototypes.features.unl_images and len(cat_sha) == len(data.cat_emb)):  # fmt: skip
        cat_vectors = _from_cache(tuned, data.cat_x, data.cat_emb, data.cat_colour)
        info["photo_prototypes"] = prototypes.write(tuned, settings, cat_vectors, cat_sha, folder)
        tuned = open_tuned(base, folder, version, info)
    info["stamp"] = tuned.stamp
    info["dim"] = tuned.dim
    validation = None
    if val_recall is not None and before is not None:
        # through the saved model itself and the query pipeline search will use
        if cat_vectors is None:
            cat_vectors = _from_cache(tuned, data.cat_x, data.cat_emb, data.cat_colour)
        if cat_sha:
            cat_vectors = catalog_vectors(tuned, cat_vectors, cat_sha)
        after = val_recall(tuned, cat_vectors)
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


@dataclass
class _PrototypeInputs:
    """What a run's photo prototypes (lookalike.models.prototypes) are made from: the
    run's unlabelled photos, embedded as queries of the new model."""

    home: Path
    features: Features
    progress: bool

    def catalog_sha256(self) -> list[str]:
        """The content hashes of the catalog images in data.cat_emb's order."""
        cache = self.features.cache
        return [img.sha256 for img in self.features.cat_images if img.sha256 in cache]

    def write(
        self,
        tuned: Any,
        settings: TuneSettings,
        cat_vectors: np.ndarray,
        cat_sha256: list[str],
        folder: Path,
    ) -> dict[str, Any]:
        """Embed the readable unlabelled photos through the query pipeline search will
        use with `tuned` (its views; one pass each), build and save the prototypes into
        `folder`; returns their model.json entry."""
        from tqdm import tqdm

        started = time.perf_counter()
        pipeline = query_pipeline(self.home, tuned)
        cache = self.features.cache
        paths = [img.path for img in self.features.unl_images if img.sha256 in cache]
        bar = tqdm(total=len(paths), desc="photo prototypes", unit="photo",
                   disable=not self.progress, dynamic_ncols=True)  # fmt: skip
        # a photo changed since its features were cached is left out
        photos = _embed_files(pipeline, paths, skip_unreadable=True, on_chunk=bar.update)
        bar.close()
        if len(photos) == 0:
            raise UsageError("--photos: none of the photos could be read")
        built = PhotoPrototypes.build(cat_vectors, cat_sha256, photos,
                                      settings.photo_prototypes,
                                      settings.prototype_temperature)  # fmt: skip
        built.save(folder / PROTOTYPES_FILE)
        return {"file": PROTOTYPES_FILE, "digest": built.digest(), "weight": built.weight,
                "temperature": settings.prototype_temperature, "photos": int(len(photos)),
                "images": len(built.sha256), "query_views": list(pipeline.views),
                "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip


def _validation_recall(
    home: Path, features: Features, data: Data
) -> Callable[[Any, np.ndarray], dict[str, float]] | None:
    """Recall@1/@5 of the `--validate` photos as a search embeds them with a given model
    (lookalike.query: that model's query views, framing and centre; decoded from the
    files, not the cache) against given catalog vectors; None without validation photos."""
    if data.val_x is None or data.val_y is None:
        return None
    val_y = data.val_y
    paths = [img.path for img in features.val_images if img.sha256 in features.cache]

    def recall(encoder: Any, cat_vectors: np.ndarray) -> dict[str, float]:
        queries = _embed_files(query_pipeline(home, encoder), paths)
        return product_recall(queries, val_y, cat_vectors, data.cat_y,
                              data.n_products)  # fmt: skip

    return recall


def _embed_files(
    pipeline: Any,
    paths: Sequence[Path],
    skip_unreadable: bool = False,
    on_chunk: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """Photo files -> their query vectors through `pipeline` (decoded from the files, 32
    at a time; `on_chunk` gets each chunk's file count). An unreadable file raises, or
    with `skip_unreadable` is left out of the result."""
    chunks = [np.zeros((0, pipeline.dim), dtype=np.float32)]
    for start in range(0, len(paths), 32):
        images = []
        for path in paths[start : start + 32]:
            try:
                images.append(load_image(path, draft_size=pipeline.draft_size).convert("RGB"))
            except LookalikeError:
                if not skip_unreadable:
                    raise
        if images:
            chunks.append(pipeline.embed_queries(images))
        if on_chunk is not None:
            on_chunk(len(paths[start : start + 32]))
    return np.concatenate(chunks)


def _searched_catalog(
    engine: Any, base: Any, inputs: Any, features: Features, data: Any
) -> tuple[Any, np.ndarray]:
    """The model that embeds the queries and the catalog vectors a search compares them
    with before tuning: the live model and its stored vectors when it is the base with
    catalog views or power normalisation (lookalike.models.views), else the base model
    and its vectors of the catalog images."""
    encoder = engine.encoder
    if not isinstance(encoder, CatalogViewEncoder):
        return base, data.cat_emb
    ids = [row[0] for row, img in zip(inputs.cat_rows, features.cat_images, strict=True)
           if img.sha256 in features.cache]  # fmt: skip
    if not set(ids) <= set(engine.catalog.embedded_ids(encoder.stamp).tolist()):
        return base, data.cat_emb  # not indexed with the live views yet
    return encoder, engine.catalog.vectors(ids)


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
