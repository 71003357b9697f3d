"""Encoders turn images into L2-normalised embedding vectors.

Contract (every implementation):
- `name`: the spec it was loaded from, e.g. "efficientnet-lite2" or "onnx:/path/model.onnx".
- `stamp`: identifies the exact vector space (model id + weights/graph content hash +
  preprocessing + pooling). Vectors with different stamps are never compared.
- `input_size`: the square side the network takes; `dim`: the embedding length;
  `draft_size`: what to pass to `load_image(draft_size=)` (JPEGs decode at >= 2x the input).
- `prepare(img: PIL.Image.Image) -> np.ndarray`: an RGB image (already decoded by
  lookalike.images) to a uint8 (S, S, 3) array; pure and thread/process safe, so
  ingest runs it in parallel with `embed`.
- `embed(batch: np.ndarray) -> np.ndarray`: uint8 (N, S, S, 3) -> float32 (N, dim),
  each row L2-normalised. Runs on ONNX Runtime.

`load_encoder(spec, cache_dir)` builds one from a spec string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from lookalike.errors import UsageError

DEFAULT_MODEL = "efficientnet-lite2-int8"
BUNDLED_MODELS = (
    "efficientnet-lite2",
    "efficientnet-lite0",
    "efficientnet-lite2-int8",
    "efficientnet-lite0-int8",
)


@runtime_checkable
class Encoder(Protocol):
    """See the module docstring."""

    name: str
    stamp: str
    input_size: int
    dim: int
    draft_size: int

    def prepare(self, img: Image.Image) -> np.ndarray: ...

    def embed(self, batch: np.ndarray) -> np.ndarray: ...


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lookalike" / "models"


def load_encoder(
    spec: str | None = None,
    cache_dir: str | Path | None = None,
    *,
    fit: str | None = None,
    threads: int | None = None,
    **options: Any,
) -> Encoder:
    """Build an encoder from `spec`.

    - "efficientnet-lite2-int8" (the default, 260 px), "efficientnet-lite2",
      "efficientnet-lite0-int8", "efficientnet-lite0" (224 px): the bundled ImageNet
      EfficientNet-Lite, exported to ONNX into `cache_dir` on first use (normally
      `<home>/models/`) and reused afterwards; the "-int8" ones are quantised to INT8
      from that export (lookalike.encoders.quantize): about 2x less CPU, same quality;
    - "onnx:/path/model.onnx[?size=..&mean=..&std=..&layout=..&fit=..&output=..&pool=..]":
      a user's own ONNX image model (see lookalike.encoders.onnx_file for the options
      and how to export CLIP or DINOv2); `options` may give the same keys.

    `fit` overrides the square-fitting mode (pad/crop/stretch); `threads` the ORT
    intra-op thread count (default: one per core).
    """
    spec = (spec or DEFAULT_MODEL).strip()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if spec.startswith("onnx:"):
        from lookalike.encoders.onnx_file import load_onnx_file

        return load_onnx_file(spec, cache, threads=threads, fit=fit, **options)
    if spec in BUNDLED_MODELS:
        if options:
            raise UsageError(
                f"{spec} takes no options besides fit/threads, got: {', '.join(options)}"
            )
        from lookalike.encoders.efficientnet import load_bundled

        return load_bundled(spec, cache, fit=fit, threads=threads)
    raise UsageError(
        f"unknown model {spec!r}: use one of {', '.join(BUNDLED_MODELS)} "
        "or onnx:/path/to/model.onnx"
    )
