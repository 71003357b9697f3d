"""Tuned models at inference time: what `lookalike tune` saved, loaded to embed images.

Two kinds (lookalike.tuning trains them; nothing here imports torch):

- `TunedEncoder`: the base encoder followed by a learned `Head` (an MLP in numpy,
  `head.npz`), the "head" method;
- `FinetunedEncoder`: the base trunk graph followed by a fine-tuned tail, one ONNX graph
  (`model.onnx`), plus the tail alone (`tail.onnx`) to embed cached trunk maps, the
  "finetune" method.

Each has its own stamp (the base stamp + a hash of what was learned), so its vectors are
never compared with the base model's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..encoders.runtime import OnnxEncoder, file_sha256, l2_normalise, make_session
from ..errors import ModelError
from ..fsutil import atomic_write

HEAD_FORMAT = 1
"""Format of head.npz and model.json (recorded in model.json, hashed into the head digest)."""
TRUNK_INPUT = "trunk"
"""The tail graph's input: the trunk's output map (N, C, h, w)."""
SMALL_BATCH = 16
"""Up to this many rows a Head multiplies without BLAS (Head.apply)."""


@dataclass
class Head:
    """A small MLP on the base embedding: normalise(layers((x - mean))), with ReLU between
    layers (one layer: a linear projection). With `keep_base` > 0 the base embedding
    itself, scaled by it, is appended before the final normalisation (`tune --field`
    keeps what the base sees, such as colour, beside what the head learned)."""

    mean: np.ndarray  # (D_in,)
    weights: list[np.ndarray]  # (D_in, H), ..., (H, D_out)
    biases: list[np.ndarray]
    keep_base: float = 0.0

    @property
    def dim(self) -> int:
        out = int(self.weights[-1].shape[1])
        return out + self.in_dim if self.keep_base else out

    @property
    def in_dim(self) -> int:
        return int(self.weights[0].shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(N, D_in) base embeddings -> (N, D_out) float32 L2-normalised."""
        y = np.asarray(x, dtype=np.float32) - self.mean
        # a query's few rows: a plain loop, not BLAS, whose threads fight ONNX Runtime's
        # still-spinning ones right after the base pass (measured: 7 ms a query under
        # load instead of 0.2 ms; docs/quality.md)
        few = len(y) <= SMALL_BATCH
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            if i:
                np.maximum(y, 0, out=y)
            y = (np.einsum("ij,jk->ik", y, w, optimize=False) if few else y @ w) + b
        if self.keep_base:
            x = np.asarray(x, dtype=np.float32)
            y = np.concatenate([l2_normalise(y), self.keep_base * x], axis=1)
        return l2_normalise(y)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"mean": self.mean}
        if self.keep_base:
            out["keep_base"] = np.array([self.keep_base], dtype=np.float32)
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
                keep_base=float(z["keep_base"][0]) if "keep_base" in z.files else 0.0,
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
    return TunedEncoder(base, head, version, info)


def is_tuned(encoder: Any) -> bool:
    """Whether `encoder` is a tuned model (either method)."""
    return isinstance(encoder, (TunedEncoder, FinetunedEncoder))


def base_of(encoder: Any) -> Any:
    """The untuned encoder underneath `encoder` (itself when it is not tuned)."""
    return encoder.base if is_tuned(encoder) else encoder
