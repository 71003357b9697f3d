"""Tuned models at inference time: what `lookalike tune` saved, loaded to embed images.

Two kinds (lookalike.tuning trains them; nothing here imports torch):

- `TunedEncoder`: the base encoder followed by a learned `Head` (an MLP, `head.npz`),
  the "head" method; run as its INT8 ONNX graph (`head.onnx`, lookalike.models.head_graph)
  where the model has one, in numpy for models saved before it;
- `FinetunedEncoder`: the base trunk graph followed by a fine-tuned tail, one ONNX graph
  (`model.onnx`), plus the tail alone (`tail.onnx`) to embed cached trunk maps, the
  "finetune" method.

Each has its own stamp (the base stamp + a hash of what was learned), so its vectors are
never compared with the base model's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.colour import DIM as COLOUR_DIM
from ..encoders.colour import colour_descriptor
from ..encoders.runtime import OnnxEncoder, file_sha256, l2_normalise, make_session
from ..errors import ModelError
from ..fsutil import atomic_write
from .head_graph import COLOUR_INPUT
from .head_graph import INPUT as GRAPH_INPUT
from .head_graph import OUTPUT as GRAPH_OUTPUT
from .prototypes import PROTOTYPES_FILE, PhotoPrototypes

HEAD_FORMAT = 1
"""Format of head.npz and model.json (recorded in model.json, hashed into the head digest)."""
TRUNK_INPUT = "trunk"
"""The tail graph's input: the trunk's output map (N, C, h, w)."""
SMALL_BATCH = 16
"""Up to this many rows a Head multiplies without BLAS (Head.apply)."""


@dataclass
class Head:
    """What a "head" tuned model adds to the base embedding x, each part L2-normalised
    or scaled as below, concatenated and normalised together:

    - an MLP (`weights`, `biases`; ReLU between layers, one layer: a linear projection)
      on the centred embedding, normalised; none when `weights` is empty;
    - with `keep_base` > 0, x itself scaled by it (`tune --field` keeps what the base
      sees, such as shape details, beside what the head learned);
    - with `class_weight` > 0, the posterior of the field's values read off x by a
      linear classifier (`classifier`, `classifier_bias`; softmax), scaled by it: products
      the classifier puts in one category come together (`tune --field`);
    - with `colour_weight` > 0, the image's colour descriptor
      (lookalike.encoders.colour) scaled by it: what the field does not name (colour)
      still counts. Such a head needs the image's pixels, not only its base embedding.
    """

    mean: np.ndarray  # (D_in,)
    weights: list[np.ndarray]  # (D_in, H), ..., (H, D_out); empty: no MLP part
    biases: list[np.ndarray]
    keep_base: float = 0.0
    classifier: np.ndarray | None = None  # (D_in, C)
    classifier_bias: np.ndarray | None = None  # (C,)
    class_weight: float = 0.0
    colour_weight: float = 0.0

    @property
    def dim(self) -> int:
        out = int(self.weights[-1].shape[1]) if self.weights else 0
        if self.keep_base:
            out += self.in_dim
        if self.class_weight and self.classifier is not None:
            out += int(self.classifier.shape[1])
        if self.colour_weight:
            out += COLOUR_DIM
        return out

    @property
    def in_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def needs_colour(self) -> bool:
        return bool(self.colour_weight)

    def apply(
        self, x: np.ndarray, colour: np.ndarray | None = None, few: bool | None = None
    ) -> np.ndarray:
        """(N, D_in) base embeddings (and, for a head with a colour part, the images'
        (N, 64) colour descriptors) -> (N, dim) float32 L2-normalised. `few`: multiply
        with the loop below (True) or BLAS (False); None: by the row count."""
        x = np.asarray(x, dtype=np.float32)
        # a query's few rows: a plain loop, not BLAS, whose threads fight ONNX Runtime's
        # still-spinning ones right after the base pass (measured: 7 ms a query under
        # load instead of 0.2 ms; docs/quality.md)
        few = len(x) <= SMALL_BATCH if few is None else few
        parts: list[np.ndarray] = []
        if self.weights:
            y = x - self.mean
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                if i:
                    np.maximum(y, 0, out=y)
                y = _matmul(y, w, few) + b
            if not (self.keep_base or self.class_weight or self.colour_weight):
                return l2_normalise(y)
            parts.append(l2_normalise(y))
        if self.keep_base:
            parts.append(self.keep_base * x)
        if self.class_weight and self.classifier is not None:
            logits = _matmul(x, self.classifier, few) + self.classifier_bias
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            parts.append(self.class_weight * p / p.sum(axis=1, keepdims=True))
        if self.colour_weight:
            parts.append(self.colour_weight * _colour_rows(colour, len(x)))
        return l2_normalise(np.concatenate(parts, axis=1))

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean}
        if self.keep_base:
            out["keep_base"] = np.array([self.keep_base], dtype=np.float32)
        if self.class_weight and self.classifier is not None:
            out["classifier"] = self.classifier
            out["classifier_bias"] = np.asarray(self.classifier_bias, dtype=np.float32)
            out["class_weight"] = np.array([self.class_weight], dtype=np.float32)
        if self.colour_weight:
            out["colour_weight"] = np.array([self.colour_weight], dtype=np.float32)
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
        atomic_write(path, lambda fh: np.savez(fh, **arrays))

    @classmethod
    def load(cls, path: Path) -> Head:
        with np.load(path, allow_pickle=False) as z:
            n = sum(1 for k in z.files if k.startswith("w"))
            return cls(
                mean=z["mean"].astype(np.float32),
                weights=[z[f"w{i}"].astype(np.float32) for i in range(n)],
                biases=[z[f"b{i}"].astype(np.float32) for i in range(n)],
                keep_base=_scalar(z, "keep_base"),
                classifier=z["classifier"].astype(np.float32) if "classifier" in z.files else None,
                classifier_bias=(
                    z["classifier_bias"].astype(np.float32)
                    if "classifier_bias" in z.files
                    else None
                ),  # fmt: skip
                class_weight=_scalar(z, "class_weight"),
                colour_weight=_scalar(z, "colour_weight"),
            )


def _scalar(z: Any, name: str) -> float:
    return float(z[name][0]) if name in z.files else 0.0


def _colour_rows(colour: np.ndarray | None, n: int) -> np.ndarray:
    """The n images' colour descriptors as float32, or a ModelError if they are missing."""
    if colour is None or len(colour) != n:
        raise ModelError("this tuned model needs each image's colour descriptor")
    return np.asarray(colour, dtype=np.float32)


def _matmul(a: np.ndarray, b: np.ndarray, few: bool) -> np.ndarray:
    return np.einsum("ij,jk->ik", a, b, optimize=False) if few else a @ b


class TunedEncoder:
    """The base encoder followed by a learned head. Same input and preprocessing as the
    base; its own stamp, so its vectors are never compared with the base model's."""

    def __init__(
        self,
        base: Any,
        head: Head,
        version: str,
        info: dict[str, Any] | None = None,
        graph: Path | None = None,
        prototypes: PhotoPrototypes | None = None,
    ):
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
        # `graph`: the head as an INT8 ONNX graph (head.onnx, checked against model.json's
        # hash), run in place of Head.apply for every image, catalog and query alike; its
        # vectors differ from the numpy head's by about 1e-3, so the stamp names the graph
        self._graph = None
        digest = head.digest()
        if graph is not None:
            digest = file_sha256(graph, None) if graph.is_file() else ""
            if not digest or digest != self.info.get("head_graph_sha256"):
                raise ModelError(f"tuned model {version}: head.onnx does not match model.json")
            self._graph = make_session(graph, threads=1)
        self.stamp = f"{base.stamp}+tuned:{digest[:16]}"
        # `prototypes`: catalog images' vectors moved towards the shop photos the model
        # gives them (lookalike.models.prototypes); they change the stored vectors only
        self.prototypes = prototypes
        if prototypes is not None:
            if prototypes.dim != head.dim:
                raise ModelError(f"tuned model {version}: photo prototypes not {head.dim}-d")
            self.stamp += f"+proto:{prototypes.digest()[:12]}"
        self.input_size = base.input_size
        self.dim = head.dim
        self.draft_size = getattr(base, "draft_size", 2 * int(base.input_size))

    def __repr__(self) -> str:
        return f"<TunedEncoder {self.stamp} dim={self.dim}>"

    def prepare(self, img: Any) -> np.ndarray:
        return self.base.prepare(img)

    @property
    def needs_colour(self) -> bool:
        """Whether the head also reads each image's colour descriptor (from_base_vectors
        then needs them)."""
        return self.head.needs_colour

    def embed(self, batch: np.ndarray) -> np.ndarray:
        base = self.base.embed(batch)
        if len(base) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        colour = colour_descriptor(batch) if self.head.needs_colour else None
        return self._apply(base, colour)

    def from_base_vectors(
        self, vectors: np.ndarray, colour: np.ndarray | None = None
    ) -> np.ndarray:
        """Tuned vectors from base embeddings (and colour descriptors) already computed
        (cached)."""
        return self._apply(vectors, colour)

    def catalog_vectors(self, vectors: np.ndarray, sha256: Sequence[str | None]) -> np.ndarray:
        """The vectors to store for catalog images whose embeddings (this model's) are
        `vectors` and whose content hashes are `sha256`: moved towards their photo
        prototypes where the model has them (queries are never moved)."""
        if self.prototypes is None:
            return vectors
        return self.prototypes.apply(vectors, sha256)

    def _apply(self, x: np.ndarray, colour: np.ndarray | None) -> np.ndarray:
        if self._graph is None:
            return self.head.apply(x, colour)
        if len(x) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        feeds = {GRAPH_INPUT: np.ascontiguousarray(x, dtype=np.float32)}
        if self.head.needs_colour:
            feeds[COLOUR_INPUT] = np.ascontiguousarray(_colour_rows(colour, len(x)))
        (out,) = self._graph.run([GRAPH_OUTPUT], feeds)
        return out


class FinetunedEncoder(OnnxEncoder):
    """A fine-tuned model: same input and preprocessing as its base, its own graph
    (`model.onnx`) and stamp. `from_trunk_maps` embeds cached trunk maps with the tail
    alone."""

    def __init__(self, base: Any, folder: Path, version: str, info: dict[str, Any]):
        model_path = folder / "model.onnx"
        digest = file_sha256(model_path, None)
        if digest != info.get("model_sha256"):
            raise ModelError(f"tuned model {version}: model.onnx does not match model.json")
        super().__init__(
            name=f"{base.name}+tuned:{version}",
            stamp=f"{base.stamp}+tuned:{digest[:16]}",
            model_path=model_path,
            input_spec=base.input_spec,
            fit=base.fit,
            output="embedding",
        )
        self.base = base
        self.version = version
        self.info = info
        self.draft_size = getattr(base, "draft_size", self.draft_size)
        self._tail_path = folder / "tail.onnx"
        self._tail = None

    def from_trunk_maps(self, maps: np.ndarray) -> np.ndarray:
        """(N, C, h, w) cached trunk maps -> (N, dim) tuned embeddings."""
        if self._tail is None:
            if file_sha256(self._tail_path, None) != self.info.get("tail_sha256"):
                raise ModelError(f"tuned model {self.version}: tail.onnx does not match model.json")
            self._tail = make_session(self._tail_path)
        (out,) = self._tail.run(["embedding"], {TRUNK_INPUT: np.asarray(maps, dtype=np.float32)})
        return l2_normalise(out)


def open_tuned(base: Any, folder: Path, version: str, info: dict[str, Any]) -> Any:
    """The tuned encoder saved in `folder` (either kind), described by `info` (its
    model.json), on top of `base`."""
    if info.get("kind") == "finetune":
        return FinetunedEncoder(base, folder, version, info)
    head = Head.load(folder / "head.npz")
    if head.digest() != info.get("head_sha256"):
        raise ModelError(f"tuned model {version}: head.npz does not match model.json")
    # models saved before head.onnx (no hash in model.json) run the numpy head
    graph = folder / "head.onnx" if info.get("head_graph_sha256") else None
    prototypes = None
    described = info.get("photo_prototypes")
    if described:
        prototypes = PhotoPrototypes.load(folder / PROTOTYPES_FILE)
        if prototypes.digest() != described.get("digest"):
            raise ModelError(f"tuned model {version}: {PROTOTYPES_FILE} does not match model.json")
    return TunedEncoder(base, head, version, info, graph, prototypes)


def catalog_vectors(encoder: Any, vectors: np.ndarray, sha256: Sequence[str | None]) -> np.ndarray:
    """What to store for catalog images that `encoder` embedded as `vectors`: the
    vectors themselves, or for a tuned model with photo prototypes, moved towards them
    (TunedEncoder.catalog_vectors). Every writer of catalog vectors goes through this."""
    move = getattr(encoder, "catalog_vectors", None)
    return vectors if move is None else move(vectors, sha256)


def is_tuned(encoder: Any) -> bool:
    """Whether `encoder` is a tuned model (either method)."""
    return isinstance(encoder, (TunedEncoder, FinetunedEncoder))


def base_of(encoder: Any) -> Any:
    """The untuned encoder underneath `encoder` (itself when it is not tuned), without
    catalog views or power normalisation (lookalike.models.views): what tuning trains on."""
    from .views import bare_base

    return encoder.base if is_tuned(encoder) else bare_base(encoder)
