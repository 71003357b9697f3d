"""`onnx:PATH` — any ONNX image model a user brings (CLIP, DINOv2, a fine-tuned CNN...).

Spec: ``onnx:/path/model.onnx`` optionally followed by a query string, e.g.
``onnx:/models/clip-b32.onnx?size=224&mean=0.481,0.458,0.408&std=0.269,0.261,0.276``.
The same options may be given as keyword arguments of `load_encoder` (they win over
the query string):

=========  =====================================================================
size       square input side; default: the model's static input size, else 224
mean, std  per-channel RGB normalisation in the 0..1 pixel scale (pixel / 255);
           default ImageNet (0.485,0.456,0.406 / 0.229,0.224,0.225). Values above
           1 are read as 0..255 units (e.g. mean=127.5&std=127.5)
layout     NCHW (PyTorch) or NHWC (TensorFlow/Keras); default: read from the input
           shape (channels of 3 second -> NCHW, last -> NHWC), else NCHW
fit        pad | crop | stretch — how an image becomes square (default: the
           project default, see docs/preprocessing.md)
output     which graph output is the embedding (default: the first output)
pool       for a 3-D (N, tokens, D) output: cls (token 0, default) or mean
=========  =====================================================================

A graph whose input is uint8 gets the raw (N, S, S, 3) pixels and must normalise
itself (mean/std/layout are then ignored). The output is pooled if it is a 4-D
feature map (mean over the spatial axes), reduced to one token if 3-D, then
L2-normalised. The stamp is ``onnx:<sha256 of the file, 16 hex>:<preprocessing>``,
so a different file or different options give a different vector space.

Exporting an image tower to ONNX (run once, on any machine with the model; torch
and transformers are needed only for this step)::

    # CLIP ViT-B/32 image tower -> image_embeds (N, 512)
    import torch
    from transformers import CLIPVisionModelWithProjection
    m = CLIPVisionModelWithProjection.from_pretrained("openai/clip-vit-base-patch32").eval()
    class Tower(torch.nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, pixel_values): return self.m(pixel_values=pixel_values).image_embeds
    torch.onnx.export(Tower(m), (torch.zeros(1, 3, 224, 224),), "clip-b32.onnx",
                      input_names=["pixel_values"], output_names=["image_embeds"],
                      dynamic_axes={"pixel_values": {0: "n"}, "image_embeds": {0: "n"}},
                      opset_version=17)

    CLIP="onnx:$PWD/clip-b32.onnx?size=224&fit=crop"
    CLIP="$CLIP&mean=0.4815,0.4578,0.4082&std=0.2686,0.2613,0.2758"
    lookalike --model "$CLIP" index my-catalog/

    # DINOv2 ViT-S/14 -> pooler_output (the normalised CLS token, N x 384)
    from transformers import AutoModel
    m = AutoModel.from_pretrained("facebook/dinov2-small").eval()
    class Tower(torch.nn.Module):
        def __init__(self, m): super().__init__(); self.m = m
        def forward(self, pixel_values): return self.m(pixel_values=pixel_values).pooler_output
    torch.onnx.export(Tower(m), (torch.zeros(1, 3, 224, 224),), "dinov2-s14.onnx",
                      input_names=["pixel_values"], output_names=["cls"],
                      dynamic_axes={"pixel_values": {0: "n"}, "cls": {0: "n"}},
                      opset_version=17)

    lookalike --model "onnx:$PWD/dinov2-s14.onnx?size=224&fit=crop" index my-catalog/

(DINOv2 takes ImageNet mean/std, the default here, and sides that are multiples of 14;
224 is the usual one. Exporting the whole `last_hidden_state` instead also works:
pool=cls takes its first token. Give the model file as an absolute path: the catalog
remembers the spec. These two recipes need `transformers` and the downloaded weights,
which this project does not ship; they have not been run in its CI.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from lookalike.encoders.runtime import (
    DEFAULT_FIT,
    InputSpec,
    OnnxEncoder,
    file_sha256,
    make_session,
)
from lookalike.errors import InputPathError, ModelError, UsageError
from lookalike.images import FIT_MODES

OPTION_NAMES = ("size", "mean", "std", "layout", "fit", "output", "pool")


def parse_spec(spec: str) -> tuple[Path, dict[str, str]]:
    """`onnx:PATH?k=v&...` -> (PATH, {k: v}). PATH may itself contain '?' only if no options."""
    if not spec.startswith("onnx:"):
        raise UsageError(f"not an onnx: model spec: {spec!r}")
    body = spec[len("onnx:") :]
    path_text, _, query = body.partition("?")
    if not path_text:
        raise UsageError("onnx: model spec needs a path, e.g. onnx:/models/clip.onnx")
    options: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        if key not in OPTION_NAMES:
            raise UsageError(
                f"unknown option {key!r} in model spec; known: {', '.join(OPTION_NAMES)}"
            )
        options[key] = value
    return Path(path_text).expanduser(), options


def _triple(value: Any, what: str) -> tuple[float, float, float]:
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").split(",") if p]
    else:
        parts = list(value) if hasattr(value, "__iter__") else [value]
    try:
        nums = [float(p) for p in parts]
    except ValueError as exc:
        raise UsageError(f"{what} must be numbers, got {value!r}") from exc
    if len(nums) == 1:
        nums = nums * 3
    if len(nums) != 3:
        raise UsageError(f"{what} needs 1 or 3 values, got {len(nums)}")
    return nums[0], nums[1], nums[2]


def _guess_layout(shape: list) -> str:
    if len(shape) == 4 and shape[-1] == 3 and shape[1] != 3:
        return "NHWC"
    return "NCHW"


def load_onnx_file(
    spec: str, cache_dir: Path | None = None, threads: int | None = None, **overrides: Any
) -> OnnxEncoder:
    """Build an encoder from an `onnx:PATH[?options]` spec (options as in the docstring)."""
    path, options = parse_spec(spec)
    for key, value in overrides.items():
        if key not in OPTION_NAMES:
            raise UsageError(f"unknown model option {key!r}; known: {', '.join(OPTION_NAMES)}")
        if value is not None:
            options[key] = value
    if not path.is_file():
        raise InputPathError(f"{path}: ONNX model file not found")

    session = make_session(path, threads)
    (inp,) = session.get_inputs()[:1]
    raw_uint8 = inp.type == "tensor(uint8)"
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelError(f"{path}: input {inp.name!r} is {shape}, not a 4-D image batch")
    layout = str(options.get("layout") or _guess_layout(shape)).upper()
    if layout not in ("NCHW", "NHWC"):
        raise UsageError(f"layout must be NCHW or NHWC, not {layout!r}")
    if raw_uint8:
        layout = "NHWC"
    if "size" in options:
        try:
            size = int(options["size"])
        except ValueError as exc:
            raise UsageError(f"size must be an integer, not {options['size']!r}") from exc
    else:
        spatial = shape[2] if layout == "NCHW" else shape[1]
        size = spatial if isinstance(spatial, int) and spatial > 0 else 224
    if not 8 <= size <= 4096:
        raise UsageError(f"input size {size} is out of range 8..4096")
    mean = _triple(options.get("mean", (0.485, 0.456, 0.406)), "mean")
    std = _triple(options.get("std", (0.229, 0.224, 0.225)), "std")
    if max(mean) > 1.0 or max(std) > 1.0:  # given in 0..255 units
        mean = (mean[0] / 255, mean[1] / 255, mean[2] / 255)
        std = (std[0] / 255, std[1] / 255, std[2] / 255)
    if min(std) <= 0:
        raise UsageError("std values must be positive")
    fit = str(options.get("fit", DEFAULT_FIT))
    if fit not in FIT_MODES:
        raise UsageError(f"fit must be one of {', '.join(FIT_MODES)}, not {fit!r}")
    pool = str(options.get("pool", "cls"))
    if pool not in ("cls", "mean"):
        raise UsageError(f"pool must be cls or mean, not {pool!r}")
    output = options.get("output") or None

    spec_in = InputSpec(size=size, mean=mean, std=std, layout=layout, raw_uint8=raw_uint8)
    digest = file_sha256(path, cache_dir)[:16]
    preprocess = f"{fit}{size}-bicubic-{spec_in.ident()}-{output or 'out0'}-{pool}"
    try:
        return OnnxEncoder(
            name=spec,
            stamp=f"onnx:{digest}:{preprocess}",
            model_path=path,
            input_spec=spec_in,
            fit=fit,
            output=output,
            token_pool=pool,
            session=session,
        )
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{path}: model does not run on a {size}x{size} image: {exc}") from exc
