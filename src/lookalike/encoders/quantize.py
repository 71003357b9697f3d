"""INT8 versions of the bundled encoders, made offline from their float32 ONNX graphs.

EfficientNet-Lite was designed to quantise well (ReLU6, no squeeze-excite), and ONNX
Runtime's static QDQ quantisation (per-channel int8 weights, uint8 activations) runs it
2-2.5x faster on a CPU core than float32 (docs/models.md, benchmarks/bench_int8.py).

Static quantisation needs calibration images, to fix each activation's range. The
calibration set here is *synthetic and deterministic*: "dead leaves" images (overlapping
discs and rectangles of random colours with power-law sizes, partly blurred), a classic
model of natural-image statistics. Measured against calibrating on real product photos
(64 fashion, footwear, grocery catalog or grocery shopper images), it gives the same
agreement with the float32 embeddings (cosine 0.995-0.996 on average, 0.990-0.993 at
worst for every set, `benchmarks/bench_models.py --calibration-study`) on held-out
fashion and grocery photos, so the INT8 model
needs no user data, is the same file on every machine, and its stamp can be computed
before it is built.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from lookalike.errors import ModelError

log = logging.getLogger(__name__)

QUANT_VERSION = "1"
"""Bump when the recipe below (calibration set, quantisation options) changes."""
CALIBRATION_IMAGES = 64
CALIBRATION_SEED = 20261124


def recipe_key() -> str:
    """What the quantised file depends on besides the float32 graph: this recipe and the
    quantiser's version (another ONNX Runtime may place the ranges differently)."""
    import onnxruntime

    major_minor = ".".join(onnxruntime.__version__.split(".")[:2])
    return f"int8-qdq-v{QUANT_VERSION}-n{CALIBRATION_IMAGES}-s{CALIBRATION_SEED}-ort{major_minor}"


def dead_leaves(seed: int, size: int, shapes: int = 400) -> np.ndarray:
    """One synthetic calibration image: uint8 (size, size, 3)."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    # radius density ~ r^-3 between 2 px and half the image: scale-invariant like photos
    rmin, rmax = 2.0, size / 2
    u = rng.random(shapes)
    radii = (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5
    for radius in sorted(radii, reverse=True):
        x, y = rng.uniform(-radius, size + radius, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        else:
            top = y - radius * rng.uniform(0.3, 1.0)
            draw.rectangle([x - radius, top, x + radius, y + radius], fill=colour)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    return np.asarray(img, dtype=np.uint8)


def calibration_batch(size: int, count: int = CALIBRATION_IMAGES) -> np.ndarray:
    """The deterministic calibration set: uint8 (count, size, size, 3)."""
    return np.stack([dead_leaves(CALIBRATION_SEED + i, size) for i in range(count)])


def quantize_int8(
    source: Path,
    dest: Path,
    input_name: str,
    size: int = 0,
    calibration: np.ndarray | None = None,
) -> Path:
    """Write an INT8 (QDQ) copy of the float32 graph `source` to `dest`, atomically.
    Calibrated on `calibration` (inputs for `input_name`) when given, else on the
    synthetic set for a uint8 NHWC input of side `size`."""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:  # pragma: no cover - part of onnxruntime's wheel
        raise ModelError(f"ONNX Runtime's quantisation tools are missing: {exc}") from exc

    batch = calibration_batch(size) if calibration is None else calibration

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter({input_name: batch[i : i + 8]} for i in range(0, len(batch), 8))

        def get_next(self):
            return next(self._feeds, None)

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.quant-", dir=dest.parent) as work:
        pre = Path(work) / "pre.onnx"
        tmp = Path(work) / "int8.onnx"
        try:
            with warnings.catch_warnings(), _quiet_quantizer():
                warnings.simplefilter("ignore")
                # shape inference + graph optimisation first, as ORT recommends
                quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
                quantize_static(
                    str(pre),
                    str(tmp),
                    Reader(),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"INT8 quantisation of {source.name} failed: {exc}") from exc
    log.info("quantised %s to %s", source.name, dest)
    return dest


@contextlib.contextmanager
def _quiet_quantizer():
    """The quantiser logs its progress at INFO on the root logger; keep it out of the
    user's terminal."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)
