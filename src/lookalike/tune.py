"""Learn from the shop's own labelled photos: `lookalike tune`.

An ImageNet network was never taught that a shelf photo of a juice carton and the
carton's catalog picture show the same product. A shop knows it: `lookalike tune
--labels photos.csv` (rows `image,product_id`) adapts the model so that labelled photos
land next to their product's catalog images, re-embeds the catalog with it, and makes
searches use it at once.

Two methods (chosen by measurement, see docs/quality.md and benchmarks/bench_tune.py):

- "finetune" (the default for the bundled EfficientNet-Lite models): the network's last
  two blocks and head conv are fine-tuned together with an MLP head, on trunk maps
  computed once per image and cached (lookalike.finetune);
- "head" (any encoder, `onnx:` models included): an MLP head on the frozen base
  embedding; for encoders that expose their final feature map, each sample is pooled
  over a random rectangle of a cached 3x3 grid of cells (a cheap feature-level crop).

Both train the labelled photos and the catalog images themselves with a normalised-softmax
loss against one learned proxy per product, initialised from the product's catalog
images. Features are cached by file content in `<home>/models/features/`. Training never
reads anything but the labels file and the catalog; the `--validate` file is only
embedded to report Recall@1/@5 before and after.

A tuned model lives in `<home>/models/tuned/<version>/` (`model.onnx` + `tail.onnx` for
finetune, `head.npz` for head, and `model.json` with the base model stamp, the model's
hash, the label file hash, the training settings and the validation figures);
`<home>/models/tuned/active.json` names the active one. A tuned encoder has its own stamp
(base stamp + hash of what was learned), so the catalog and vector store can never mix
vectors of two models: activating or resetting re-embeds the catalog, from cached
features where they exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .encoders.runtime import file_sha256
from .errors import LookalikeError, ModelError, UsageError
from .ingest import sha256_of

GRID = 3
"""Feature maps are pooled into GRID x GRID cells for the feature-level crops."""
HEAD_FORMAT = 1
TUNED_DIR = Path("models") / "tuned"
FEATURES_DIR = Path("models") / "features"
ACTIVE_FILE = "active.json"


# --------------------------------------------------------------------------- settings


@dataclass
class TuneSettings:
    """Training hyper-parameters (defaults chosen on grocery; docs/quality.md says how).
    `None` fields take the method's default (METHOD_DEFAULTS)."""

    method: str = "auto"  # "finetune", "head", or "auto": finetune where the base allows
    dim: int = 512
    hidden: int = 1024  # 0: a linear projection (head method only)
    dropout: float = 0.5
    epochs: int | None = None
    batch_size: int | None = None
    lr: float = 1e-3
    block_lr: float = 3e-4  # finetune: the network's own layers learn at 0.3x the head's rate
    weight_decay: float = 1e-4
    temperature: float = 0.1
    crop_probability: float = 0.5
    catalog_weight: float = 1.0
    catalog_per_step: int = 24  # finetune: catalog images beside each batch of photos
    views: int = 2  # finetune: augmented views of each labelled photo (finetune.random_view)
    catalog_views: int = 8  # finetune: ... and of each catalog image
    seed: int = 0

    def resolved(self, base: Any) -> TuneSettings:
        """These settings with the method and its defaults filled in for `base`."""
        from . import finetune

        method = self.method
        if method == "auto":
            method = "finetune" if finetune.supports(base) else "head"
        if method not in METHOD_DEFAULTS:
            raise UsageError(f"unknown tuning method {method!r}: use finetune or head")
        if method == "finetune" and not finetune.supports(base):
            raise UsageError(
                f"--method finetune needs a bundled EfficientNet-Lite base model, not"
                f" {base.name}; use --method head"
            )
        if method == "finetune" and not self.hidden:
            raise UsageError("--method finetune needs an MLP head (hidden > 0)")
        defaults = METHOD_DEFAULTS[method]
        out = replace(self, method=method)
        if out.epochs is None:
            out.epochs = defaults["epochs"]
        if out.batch_size is None:
            out.batch_size = defaults["batch_size"]
        return out


METHOD_DEFAULTS: dict[str, dict[str, int]] = {
    "finetune": {"epochs": 8, "batch_size": 96},
    "head": {"epochs": 12, "batch_size": 128},
}


# --------------------------------------------------------------------------- the head


@dataclass
class Head:
    """A small MLP on the base embedding: normalise(layers((x - mean))), with ReLU between
    layers (one layer: a linear projection)."""

    mean: np.ndarray  # (D_in,)
    weights: list[np.ndarray]  # (D_in, H), ..., (H, D_out)
    biases: list[np.ndarray]

    @property
    def dim(self) -> int:
        return int(self.weights[-1].shape[1])

    @property
    def in_dim(self) -> int:
        return int(self.weights[0].shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, D_in) base embeddings -> (N, D_out) float32 L2-normalised."""
        y = np.asarray(x, dtype=np.float32) - self.mean
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i:
                np.maximum(y, 0, out=y)
            y = y @ w + b
        return _l2(y)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            out[f"w{i}"] = w
            out[f"b{i}"] = b
        return out

    def digest(self) -> str:
        h = hashlib.sha256(f"head-v{HEAD_FORMAT}".encode())
        for name, a in self.arrays().items():
            a = np.ascontiguousarray(a, dtype=np.float32)
            h.update(f"{name}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def save(self, path: Path) -> None:
        arrays = self.arrays()
        _atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: Path) -> Head:
        with np.load(path, allow_pickle=False) as z:
            n = sum(1 for k in z.files if k.startswith("w"))
            return cls(
                mean=z["mean"].astype(np.float32),
                weights=[z[f"w{i}"].astype(np.float32) for i in range(n)],
                biases=[z[f"b{i}"].astype(np.float32) for i in range(n)],
            )


class TunedEncoder:
    """The base encoder followed by a learned head. Same input and preprocessing as the
    base; its own stamp, so its vectors are never compared with the base model's."""

    def __init__(self, base: Any, head: Head, version: str, info: dict[str, Any] | None = None):
        if head.in_dim != base.dim:
            raise ModelError(
                f"tuned model {version} expects {head.in_dim}-d base vectors;"
                f" {base.name} makes {base.dim}-d ones"
            )
        self.base = base
        self.head = head
        self.version = version
        self.info = info or {}
        self.name = f"{base.name}+tuned:{version}"
        self.stamp = f"{base.stamp}+tuned:{head.digest()[:16]}"
        self.input_size = base.input_size
        self.dim = head.dim
        self.draft_size = getattr(base, "draft_size", 2 * int(base.input_size))

    def __repr__(self) -> str:
        return f"<TunedEncoder {self.stamp} dim={self.dim}>"

    def prepare(self, img: Any) -> np.ndarray:
        return self.base.prepare(img)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        base = self.base.embed(batch)
        if len(base) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.head.apply(base)

    def from_base_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Tuned vectors from base embeddings already computed (cached)."""
        return self.head.apply(vectors)


def is_tuned(encoder: Any) -> bool:
    """Whether `encoder` is a tuned model (either method)."""
    from .finetune import FinetunedEncoder

    return isinstance(encoder, (TunedEncoder, FinetunedEncoder))


def base_of(encoder: Any) -> Any:
    """The untuned encoder underneath `encoder` (itself when it is not tuned)."""
    return encoder.base if is_tuned(encoder) else encoder


# --------------------------------------------------------------------------- registry


def tuned_root(home: str | os.PathLike) -> Path:
    return Path(home) / TUNED_DIR


def active_version(home: str | os.PathLike) -> str | None:
    """The version named in `<home>/models/tuned/active.json`, if any."""
    path = tuned_root(home) / ACTIVE_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) and version else None


def model_info(home: str | os.PathLike, version: str) -> dict[str, Any]:
    path = tuned_root(home) / version / "model.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"tuned model {version}: cannot read {path}: {exc}") from None


def list_models(home: str | os.PathLike) -> list[dict[str, Any]]:
    """Every tuned model saved in this home, oldest first."""
    root = tuned_root(home)
    out = []
    if root.is_dir():
        for d in sorted(p for p in root.iterdir() if (p / "model.json").is_file()):
            try:
                out.append(model_info(home, d.name))
            except ModelError:
                continue
    return out


_LOADED: dict[tuple[str, str, str], Any] = {}
_LOADED_LOCK = threading.Lock()


def load_tuned(home: str | os.PathLike, version: str, base: Any) -> Any:
    """The tuned encoder `version` (a TunedEncoder or a finetune.FinetunedEncoder) on top
    of `base` (which must be the model it was trained on)."""
    info = model_info(home, version)
    if info.get("base_stamp") != base.stamp:
        raise ModelError(
            f"tuned model {version} was trained on {info.get('base_stamp')}, not on {base.stamp}"
        )
    key = (str(Path(home).resolve()), version, base.stamp)
    with _LOADED_LOCK:
        cached = _LOADED.get(key)
        if cached is not None and cached.base is base:
            return cached
    encoder = _open_tuned(base, tuned_root(home) / version, version, info)
    with _LOADED_LOCK:
        _LOADED[key] = encoder
    return encoder


def active_encoder(home: str | os.PathLike, base: Any) -> Any:
    """What Engine searches with: the active tuned model when one was trained for this
    base model, else `base`. A tuned model for another base model (the catalog was
    switched to another --model since) is ignored."""
    version = active_version(home)
    if version is None:
        return base
    try:
        return load_tuned(home, version, base)
    except ModelError as exc:
        if "was trained on" in str(exc):
            return base
        raise


def _set_active(home: Path, version: str | None) -> None:
    root = tuned_root(home)
    path = root / ACTIVE_FILE
    if version is None:
        path.unlink(missing_ok=True)
        return
    root.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"version": version}, indent=2).encode()
    _atomic_write(path, lambda fh: fh.write(payload))


# --------------------------------------------------------------------------- feature cache


class FeatureCache:
    """Base-encoder features of image files, keyed by the file's sha256, for one base
    stamp: the embedding (float32) and a spatial array (float16) of one of two kinds:

    - "cells": a GRID x GRID grid of pooled cells of the final feature map, for the head
      method's feature-level crops (absent for encoders without a feature map);
    - "trunk": the trunk map the finetune method trains the network's tail on
      (lookalike.finetune), about 34 KB an image for EfficientNet-Lite2.

    Lets tuning run again without re-running the network, and lets re-embedding after
    `tune` or `tune --reset` skip it."""

    def __init__(self, path: Path, dim: int, stamp: str, kind: str = "cells"):
        self.path = path
        self.dim = dim
        self.stamp = stamp
        self.kind = kind
        self.index: dict[str, int] = {}
        self.embeddings = np.zeros((0, dim), dtype=np.float32)
        self.spatial: np.ndarray | None = None  # (N, G, G, C) cells or (N, C, h, w) maps
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
                    stamp = str(z["stamp"])
                if stamp == base.stamp and emb.shape[1:] == (cache.dim,):
                    cache.index = {s: i for i, s in enumerate(shas)}
                    cache.embeddings = emb
                    cache.spatial = spatial if spatial is not None and spatial.size else None
            except Exception:  # a damaged cache is only a slower run
                cache.index = {}
        return cache

    def __contains__(self, sha: str) -> bool:
        return sha in self.index

    def has_spatial(self) -> bool:
        return self.spatial is not None

    def add(self, shas: Sequence[str], embeddings: np.ndarray, spatial: np.ndarray | None) -> None:
        new = [i for i, s in enumerate(shas) if s not in self.index]
        if not new:
            return
        start = len(self.index)
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path, lambda fh: np.savez(fh, **arrays))
        self._dirty = False


def _grid_cells(maps: np.ndarray, grid: int = GRID) -> np.ndarray:
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


def _featurizer(base: Any, use_cells: bool) -> Featurize:
    """What goes into the head method's FeatureCache ("cells") for this base encoder (the
    finetune method's "trunk" cache is filled by finetune.Trunk.run)."""
    if use_cells:

        def cells(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            maps = base.features(batch)
            return _l2(maps.mean(axis=(2, 3))), _grid_cells(maps)

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
    pooled = _l2(maps.mean(axis=(2, 3)))
    return bool(np.allclose(pooled, base.embed(sample), atol=1e-4))


@dataclass
class _Image:
    path: Path
    sha256: str
    view: int = 0  # > 0: a randomly augmented view of the image (finetune.random_view)

    @property
    def key(self) -> str:
        """The feature cache key: the file's sha256, plus the view for a view."""
        if not self.view:
            return self.sha256
        from .finetune import VIEW_RECIPE

        return f"{self.sha256}#{VIEW_RECIPE}.{self.view}"


def compute_features(
    base: Any,
    cache: FeatureCache,
    images: Sequence[_Image],
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

    from .images import load_image

    todo: list[_Image] = []
    seen: set[str] = set()
    for image in images:
        if image.key not in cache and image.key not in seen:
            seen.add(image.key)
            todo.append(image)
    errors: list[str] = []
    if not todo:
        return errors
    draft = int(getattr(base, "draft_size", 2 * int(base.input_size)))

    def prepare(image: _Image) -> tuple[_Image, np.ndarray | None]:
        try:
            img = load_image(image.path, draft_size=draft)
            if image.view:
                from .finetune import random_view

                img = random_view(img, image.sha256, image.view)
            return image, base.prepare(img)
        except LookalikeError as exc:
            errors.append(f"{image.path}: {exc}")
        except Exception as exc:  # a decoder bug on one hostile file must not stop the run
            errors.append(f"{image.path}: {type(exc).__name__}: {exc}")
        return image, None

    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    keys: list[str] = []
    embs: list[np.ndarray] = []
    spatials: list[np.ndarray | None] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(todo), batch_size):
            chunk = list(pool.map(prepare, todo[start : start + batch_size]))
            good = [(img, arr) for img, arr in chunk if arr is not None]
            if good:
                emb, spatial = featurize(np.stack([a for _, a in good]))
                keys += [img.key for img, _ in good]
                embs.append(emb)
                spatials.append(None if spatial is None else spatial.astype(np.float16))
            bar.update(len(chunk))
    bar.close()
    if keys:  # one concatenation, not one per batch
        spatial_all = None if any(x is None for x in spatials) else np.concatenate(spatials)
        cache.add(keys, np.concatenate(embs), spatial_all)
        cache.save()
    return errors


# --------------------------------------------------------------------------- training data


@dataclass
class TuneReport:
    """What `train_tuned_model` did."""

    version: str
    stamp: str
    base_stamp: str
    labels: str
    labels_sha256: str
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"tuned model {self.version} is active ({self.stamp})",
            f"trained on {self.photos_used} labelled photos of {self.products_labelled}"
            f" products + {self.catalog_images} catalog images of {self.catalog_products}"
            f" products",
        ]
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


def _read_label_file(path: Path) -> list[tuple[Path, str, int]]:
    from .evaluate import read_labels

    return [(q.image, q.product_id, q.line) for q in read_labels(path)]


def _catalog_images(catalog: Any) -> list[tuple[int, str, str, str]]:
    """(image_id, product_id, source, sha256) of every catalog image."""
    out = []
    for rows in catalog.iter_images():
        out += [(r.image_id, r.product_id, r.source, r.sha256) for r in rows]
    return out


def _recall(
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


# --------------------------------------------------------------------------- training


def _fit_head(
    settings: TuneSettings,
    photo_x: np.ndarray,
    photo_y: np.ndarray,
    cat_x: np.ndarray,
    cat_y: np.ndarray,
    n_products: int,
    *,
    on_epoch: Callable[[int, float, Head], None] | None = None,
) -> Head:
    """Train the head. `*_x` are either (N, D) embeddings or (N, G, G, C) grid cells
    (then each sample is pooled over a random rectangle of cells with probability
    `crop_probability`)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    px = torch.from_numpy(np.ascontiguousarray(photo_x, dtype=np.float32))
    cx = torch.from_numpy(np.ascontiguousarray(cat_x, dtype=np.float32))
    py = torch.from_numpy(photo_y.astype(np.int64))
    cy = torch.from_numpy(cat_y.astype(np.int64))
    gridded = px.ndim == 4
    rects = _rect_masks(GRID) if gridded else None
    full = torch.ones(GRID, GRID)

    def pool(x: torch.Tensor, crop: bool) -> torch.Tensor:
        if not gridded:
            return x
        n = len(x)
        mask = full.expand(n, GRID, GRID)
        if crop and settings.crop_probability > 0:
            pick = rects[torch.from_numpy(rng.integers(0, len(rects), n))]
            use = torch.from_numpy(rng.random(n) < settings.crop_probability)
            mask = torch.where(use[:, None, None], pick, mask)
        pooled = (x * mask[..., None]).sum((1, 2)) / mask.sum((1, 2))[:, None]
        return F.normalize(pooled, dim=-1)

    with torch.no_grad():
        p_full = pool(px, False)
        c_full = pool(cx, False)
        mean = torch.cat([p_full, c_full]).mean(0)
    in_dim = p_full.shape[1]
    if settings.hidden:
        layers = [
            torch.nn.Linear(in_dim, settings.hidden),
            torch.nn.Linear(settings.hidden, settings.dim),
        ]
    else:
        layers = [torch.nn.Linear(in_dim, settings.dim)]
    net = torch.nn.ModuleList(layers)
    drop = torch.nn.Dropout(settings.dropout)

    def forward(x: torch.Tensor) -> torch.Tensor:
        y = x - mean
        for i, layer in enumerate(net):
            if i:
                y = drop(torch.relu(y))
            y = layer(y)
        return F.normalize(y, dim=-1)

    drop.eval()
    with torch.no_grad():  # one proxy per product, starting at its catalog images' mean
        start = torch.zeros(n_products, settings.dim).index_add_(0, cy, forward(c_full))
    drop.train()
    proxies = torch.nn.Parameter(F.normalize(start, dim=-1))
    params = [*net.parameters(), proxies]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    n = len(px)
    steps_per_epoch = max(1, (n + settings.batch_size - 1) // settings.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=settings.lr,
        total_steps=settings.epochs * steps_per_epoch,
        pct_start=0.1,
    )
    t = settings.temperature

    def current_head() -> Head:
        return Head(
            mean=mean.numpy().astype(np.float32).copy(),
            weights=[layer.weight.detach().numpy().T.astype(np.float32).copy() for layer in net],
            biases=[layer.bias.detach().numpy().astype(np.float32).copy() for layer in net],
        )

    for epoch in range(settings.epochs):
        perm = torch.from_numpy(rng.permutation(n))
        total = 0.0
        for start_i in range(0, n, settings.batch_size):
            idx = perm[start_i : start_i + settings.batch_size]
            q = forward(pool(px[idx], True))
            c = forward(pool(cx, True))
            p = F.normalize(proxies, dim=-1)
            loss = F.cross_entropy(q @ p.T / t, py[idx]) + settings.catalog_weight * (
                F.cross_entropy(c @ p.T / t, cy)
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / n, current_head())
    return current_head()


def _rect_masks(grid: int):  # -> torch.Tensor (R, grid, grid)
    """Every axis-aligned rectangle of cells covering at least 4 of them (crops of about
    half the image or more)."""
    import torch

    masks = []
    for y0 in range(grid):
        for y1 in range(y0 + 1, grid + 1):
            for x0 in range(grid):
                for x1 in range(x0 + 1, grid + 1):
                    if (y1 - y0) * (x1 - x0) >= min(4, grid * grid):
                        m = torch.zeros(grid, grid)
                        m[y0:y1, x0:x1] = 1
                        masks.append(m)
    return torch.stack(masks)


def train_tuned_model(
    engine: Any,
    labels_csv: str | os.PathLike,
    validate_csv: str | os.PathLike | None = None,
    progress: bool = True,
    *,
    settings: TuneSettings | None = None,
    activate: bool = True,
    log: Callable[[str], None] | None = None,
) -> TuneReport:
    """Learn from `labels_csv` (image,product_id rows; image paths relative to the file)
    and the engine's catalog, save the result as a new version, and (with `activate`)
    make it the engine's model: the catalog is re-embedded and searches use it at once.

    Two methods (`settings.method`; "auto" picks finetune where the base allows it):
    "finetune" fine-tunes the network's last blocks plus an MLP head on cached trunk
    maps (lookalike.finetune); "head" learns a head on frozen base embeddings (any
    encoder, `onnx:` models included).

    Label rows naming products that are not in the catalog are reported and skipped.
    `validate_csv` is only used to print and save Recall@1/@5 before and after."""
    started = time.perf_counter()
    base = base_of(engine.encoder)
    settings = (settings or TuneSettings()).resolved(base)
    finetuning = settings.method == "finetune"
    if log is None:
        log = _stderr_log if progress else _no_log
    home = Path(engine.home)
    labels_path = Path(labels_csv).expanduser()
    rows = _read_label_file(labels_path)
    catalog = engine.catalog
    cat_rows = _catalog_images(catalog)
    if not cat_rows:
        raise UsageError("the catalog has no images: run `lookalike index` before `tune`")
    products = sorted({pid for _, pid, _, _ in cat_rows})
    pindex = {pid: i for i, pid in enumerate(products)}

    skipped_unknown = [
        f"{labels_path}:{line}: product {pid!r} is not in the catalog"
        for _, pid, line in rows
        if pid not in pindex
    ]
    known = [(path, pid) for path, pid, _ in rows if pid in pindex]
    if not known:
        raise UsageError(
            f"{labels_path}: none of its {len(rows)} rows names a product in the catalog"
        )
    val_rows: list[tuple[Path, str]] = []
    val_unknown = 0
    if validate_csv is not None:
        for path, pid, _ in _read_label_file(Path(validate_csv).expanduser()):
            if pid in pindex:
                val_rows.append((path, pid))
            else:
                val_unknown += 1

    # ---- features (cached by file content)
    t0 = time.perf_counter()
    photo_images = [_Image(p, sha256_of(p)) for p, _ in known]
    cat_images = [_Image(Path(src), sha) for _, _, src, sha in cat_rows]
    val_images = [_Image(p, sha256_of(p)) for p, _ in val_rows]
    if finetuning:
        from . import finetune

        trunk = finetune.Trunk(base)  # one ONNX load and session: features, then export
        cache = FeatureCache.open(home, base, "trunk")
        featurize: Featurize = trunk.run
    else:
        cache = FeatureCache.open(home, base, "cells")
        use_cells = cache.has_spatial() or (
            len(cache.index) == 0 and _probe_maps(base, [*cat_images, *photo_images])
        )
        featurize = _featurizer(base, use_cells)
    unreadable: list[str] = []
    for images, desc in ((cat_images, "catalog features"), (photo_images, "photo features"),
                         (val_images, "validation")):  # fmt: skip
        if images:
            unreadable += compute_features(
                base, cache, images, featurize=featurize, progress=progress, desc=desc
            )
    if finetuning and (settings.views or settings.catalog_views):
        view_images = [
            *(_Image(i.path, i.sha256, k) for k in range(1, settings.catalog_views + 1)
              for i in cat_images),
            *(_Image(i.path, i.sha256, k) for k in range(1, settings.views + 1)
              for i in photo_images),
        ]  # fmt: skip
        unreadable += compute_features(
            base, cache, view_images, featurize=featurize, progress=progress, desc="views"
        )
    spatial = cache.has_spatial()
    if finetuning and not spatial:
        raise ModelError(f"{cache.path}: trunk maps missing; delete the file and run again")
    seconds = {"features": time.perf_counter() - t0}

    def gather(images: Sequence[_Image], labels: Sequence[str]):
        keep = [i for i, img in enumerate(images) if img.sha256 in cache]
        rows_ = cache.rows([images[i].sha256 for i in keep])
        y = np.array([pindex[labels[i]] for i in keep], dtype=np.int64)
        x = cache.spatial[rows_] if spatial else cache.embeddings[rows_]
        return x, y, cache.embeddings[rows_]

    def gather_views(images: Sequence[_Image], count: int) -> np.ndarray | None:
        """(N, count, ...) trunk maps of the views of the readable `images`."""
        if not (finetuning and count):
            return None
        kept = [img for img in images if img.sha256 in cache]
        views = [_Image(img.path, img.sha256, k).key for img in kept for k in range(1, count + 1)]
        # an unreadable view (never cached) stands in as the image itself
        keys = [key if key in cache else key.split("#", 1)[0] for key in views]
        maps = cache.spatial[cache.rows(keys)]
        return maps.reshape(len(kept), count, *maps.shape[1:])

    photo_x, photo_y, _ = gather(photo_images, [pid for _, pid in known])
    cat_x, cat_y, cat_emb = gather(cat_images, [pid for _, pid, _, _ in cat_rows])
    photo_views = gather_views(photo_images, settings.views)
    cat_views = gather_views(cat_images, settings.catalog_views)
    if len(photo_y) == 0:
        raise UsageError(f"{labels_path}: none of its images could be read")
    val_x = val_emb = val_y = None
    before = None
    if val_images:
        val_x, val_y, val_emb = gather(val_images, [pid for _, pid in val_rows])
        before = _recall(val_emb, val_y, cat_emb, cat_y, len(products))
        log(
            f"validation before tuning: Recall@1 {before['recall@1']:.3f}"
            f"  Recall@5 {before['recall@5']:.3f}  ({len(val_y)} photos)"
        )

    # ---- training
    from tqdm import tqdm

    t1 = time.perf_counter()
    epochs: list[dict[str, float]] = []
    steps = -(-len(photo_y) // settings.batch_size)
    bar = tqdm(total=settings.epochs * steps, desc=f"tuning ({settings.method})", unit="step",
               disable=not progress, dynamic_ncols=True)  # fmt: skip

    # per-epoch figures: the finetune tail embeds trunk maps, a head base embeddings
    val_in, cat_in = (val_x, cat_x) if finetuning else (val_emb, cat_emb)

    def on_epoch(epoch: int, loss: float, embed: Callable[[np.ndarray], np.ndarray]) -> None:
        row: dict[str, float] = {"epoch": epoch + 1, "loss": round(loss, 4)}
        text = f"epoch {epoch + 1}/{settings.epochs}  loss {loss:.4f}"
        if val_in is not None:
            r = _recall(embed(val_in), val_y, embed(cat_in), cat_y, len(products))
            row.update({k: round(v, 4) for k, v in r.items()})
            text += f"  val Recall@1 {r['recall@1']:.3f}  Recall@5 {r['recall@5']:.3f}"
        epochs.append(row)
        if not finetuning:
            bar.update(steps)
        if progress:
            bar.write(text)
        else:
            log(text)

    folder = Path(tempfile.mkdtemp(prefix=".new-", dir=_mkdir(tuned_root(home))))
    try:
        if finetuning:
            tail = finetune.train_tail(
                settings,
                base.name, trunk.cut.first_block, photo_x, photo_y, cat_x, cat_y, len(products),
                photo_views=photo_views, cat_views=cat_views,
                on_step=lambda: bar.update(1),
                on_epoch=lambda e, loss, t: on_epoch(e, loss, lambda m: finetune.embed_maps(t, m)),
            )  # fmt: skip
            bar.close()
            seconds["training"] = time.perf_counter() - t1
            model_path = finetune.export_tuned(
                tail, trunk, int(cat_x.shape[1]), tuple(cat_x.shape[2:]), folder,
                calibration=finetune.calibration_maps(base, photo_x, cat_x),
            )  # fmt: skip
            digest = file_sha256(model_path, None)
            described = (
                f"blocks {trunk.cut.first_block}+ and the head conv fine-tuned, then MLP"
                f" {int(cat_emb.shape[1])}-{settings.hidden}-{settings.dim} (ReLU),"
                " L2-normalised"
            )
            kind_info = {"kind": "finetune", "model_sha256": digest,
                         "tail_sha256": file_sha256(folder / "tail.onnx", None),
                         "first_block": trunk.cut.first_block, "trunk_tensor": trunk.cut.tensor,
                         "input": f"trunk maps of each image and {settings.views} (photos) /"
                                  f" {settings.catalog_views} (catalog) augmented views;"
                                  " mirror + random-crop of the maps"}  # fmt: skip
        else:
            head = _fit_head(
                settings, photo_x, photo_y, cat_x, cat_y, len(products),
                on_epoch=lambda e, loss, h: on_epoch(e, loss, h.apply),
            )  # fmt: skip
            bar.close()
            seconds["training"] = time.perf_counter() - t1
            head.save(folder / "head.npz")
            digest = head.digest()
            described = (
                f"MLP {head.in_dim}-{settings.hidden}-{head.dim} (ReLU)"
                if settings.hidden
                else f"linear {head.in_dim}-{head.dim}"
            ) + " on the centred base embedding, L2-normalised"
            kind_info = {"kind": "head", "head_sha256": digest,
                         "input": f"{GRID}x{GRID} grid cells, random-rectangle crops"
                         if spatial else "embedding"}  # fmt: skip

        # ---- save
        labels_sha = sha256_of(labels_path)
        version = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + digest[:8]
        info: dict[str, Any] = {
            "format": HEAD_FORMAT,
            "version": version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base_model": base.name,
            "base_stamp": base.stamp,
            **kind_info,
            "dim": settings.dim,
            "head": described,
            "labels": str(labels_path),
            "labels_sha256": labels_sha,
            "photos_used": int(len(photo_y)),
            "products_labelled": int(len(np.unique(photo_y))),
            "catalog_images": int(len(cat_y)),
            "catalog_products": len(products),
            "skipped_unknown": len(skipped_unknown),
            "settings": asdict(settings),
            "epochs": epochs,
        }
        tuned = _open_tuned(base, folder, version, info)
        info["stamp"] = tuned.stamp
        info["dim"] = tuned.dim
        validation = None
        if val_x is not None and before is not None:
            # through the saved model itself (what search will use)
            after = _recall(_from_cache(tuned, val_x, val_emb), val_y,
                            _from_cache(tuned, cat_x, cat_emb), cat_y, len(products))  # fmt: skip
            validation = {
                "file": str(validate_csv),
                "file_sha256": sha256_of(Path(validate_csv).expanduser()),
                "queries": int(len(val_y)),
                "skipped_unknown": val_unknown,
                "before": before,
                "after": after,
            }
        info["validation"] = validation
        _atomic_write(
            folder / "model.json", lambda fh: fh.write(json.dumps(info, indent=2).encode())
        )
        final = tuned_root(home) / version
        os.replace(folder, final)
    except BaseException:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        raise

    report = TuneReport(
        version=version,
        stamp=tuned.stamp,
        base_stamp=base.stamp,
        labels=str(labels_path),
        labels_sha256=labels_sha,
        photos_used=int(len(photo_y)),
        products_labelled=int(len(np.unique(photo_y))),
        catalog_products=len(products),
        catalog_images=int(len(cat_y)),
        skipped_unknown=skipped_unknown,
        skipped_unreadable=unreadable,
        epochs=epochs,
        validation=validation,
        settings=asdict(settings),
    )
    if activate:
        t2 = time.perf_counter()
        report.reembedded = use_model(engine, version, progress=progress)
        seconds["reembed"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - started
    report.seconds = {k: round(v, 2) for k, v in seconds.items()}
    return report


def _open_tuned(base: Any, folder: Path, version: str, info: dict[str, Any]) -> Any:
    """The tuned encoder saved in `folder` (either kind)."""
    if info.get("kind") == "finetune":
        from .finetune import FinetunedEncoder

        return FinetunedEncoder(base, folder, version, info)
    head = Head.load(folder / "head.npz")
    if head.digest() != info.get("head_sha256"):
        raise ModelError(f"tuned model {version}: head.npz does not match model.json")
    return TunedEncoder(base, head, version, info)


def _from_cache(encoder: Any, spatial: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """`encoder`'s vectors of images whose cached features are given."""
    if hasattr(encoder, "from_trunk_maps"):
        return encoder.from_trunk_maps(spatial)
    return encoder.from_base_vectors(embeddings)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _probe_maps(base: Any, images: Sequence[_Image]) -> bool:
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
    from .images import load_image

    draft = int(getattr(base, "draft_size", 2 * int(base.input_size)))
    return base.prepare(load_image(path, draft_size=draft))[None]


# --------------------------------------------------------------------------- switching


def use_model(engine: Any, version: str | None, progress: bool = True) -> dict[str, int]:
    """Make `version` (None: the base model) the engine's model and re-embed the catalog
    with it: from cached features where the feature caches have the image (trunk maps
    for a fine-tuned model, base embeddings otherwise), else from the image file.
    Returns {"from_cache": n, "from_files": m}."""
    from .ingest import IngestReport, reembed

    home = Path(engine.home)
    with engine._lock:
        base = base_of(engine.encoder)
        if version is not None:
            load_tuned(home, version, base)  # fails before anything changes
        _set_active(home, version)
        engine._encoder = None  # Engine re-resolves it through active_encoder()
        encoder = engine.encoder
        engine._switch_model_if_needed()  # new stamp: a fresh vector store
        store = engine._store
        catalog = engine.catalog
        catalog.set_meta("tuned", version or "")
        from_cache = 0
        finetuned = hasattr(encoder, "from_trunk_maps")
        # a fine-tuned model needs the trunk maps; the base model and a head need only
        # the base embedding, which both caches hold
        for kind in ("trunk",) if finetuned else ("trunk", "cells"):
            cache = FeatureCache.open(home, base, kind)
            if finetuned and not cache.has_spatial():
                continue
            stale = [
                (image_id, pid, src, sha)
                for image_id, pid, src, sha in _catalog_images_with_stamp(catalog, encoder.stamp)
                if sha in cache
            ]
            for start in range(0, len(stale), 1024):
                chunk = stale[start : start + 1024]
                rows = cache.rows([c[3] for c in chunk])
                if finetuned:
                    vectors = encoder.from_trunk_maps(cache.spatial[rows])
                elif isinstance(encoder, TunedEncoder):
                    vectors = encoder.from_base_vectors(cache.embeddings[rows])
                else:
                    vectors = cache.embeddings[rows]
                with catalog.transaction():
                    for (_, pid, src, sha), vector in zip(chunk, vectors, strict=True):
                        catalog.put_image(pid, src, sha, vector, encoder.stamp)
                store.add(np.array([c[0] for c in chunk], dtype=np.int64), vectors)
                from_cache += len(chunk)
        report = IngestReport()
        reembed(catalog, store, encoder, report, progress=progress)
        store.save()
        engine.sync_vectors()
        return {"from_cache": from_cache, "from_files": int(report.updated + report.added)}


def _catalog_images_with_stamp(catalog: Any, stamp: str) -> list[tuple[int, str, str, str]]:
    """Catalog images whose vector was not made by `stamp`."""
    out = []
    for rows in catalog.iter_images():
        out += [(r.image_id, r.product_id, r.source, r.sha256) for r in rows if r.stamp != stamp]
    return out


def reset(engine: Any, progress: bool = True) -> dict[str, int]:
    """Back to the base model (tuned models stay on disk)."""
    return use_model(engine, None, progress=progress)


def describe_active(home: str | os.PathLike, encoder: Any) -> dict[str, Any]:
    """What `tune --status` (and `info`) can show about the active model."""
    if is_tuned(encoder):
        info = encoder.info
        return {
            "model": "tuned",
            "method": info.get("kind", "head"),
            "version": encoder.version,
            "stamp": encoder.stamp,
            "base_stamp": encoder.base.stamp,
            "labels_sha256": info.get("labels_sha256"),
            "validation": info.get("validation"),
        }
    return {"model": "base", "stamp": encoder.stamp, "tuned_versions": len(list_models(home))}


# --------------------------------------------------------------------------- helpers


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stderr_log(text: str) -> None:
    print(text, file=sys.stderr)


def _no_log(text: str) -> None:
    return None
