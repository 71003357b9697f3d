"""Uploaded images: reading an upload within its byte limit, the query photo's crop box,
and decoding the query photo at no more resolution than the encoder can use."""

import math
from typing import Any

from fastapi import UploadFile
from PIL import Image

from ..errors import ImageTooLargeError, LookalikeError, UsageError
from ..images import load_image, probe_image
from ..query import tag_content
from .limits import Limits


def parse_crop(
    crop: str | None, x: float | None, y: float | None, w: float | None, h: float | None
) -> tuple[int, int, int, int] | None:
    """The crop box (x, y, w, h) from `crop="x,y,w,h"` or the four separate fields."""
    parts = [x, y, w, h]
    if crop is not None and crop.strip():
        if any(p is not None for p in parts):
            raise UsageError("give the crop box either as crop=x,y,w,h or as x, y, w, h, not both")
        pieces = [p.strip() for p in crop.split(",")]
        if len(pieces) != 4:
            raise UsageError(f"crop must be four numbers x,y,w,h, not {crop!r}")
        try:
            parts = [float(p) for p in pieces]
        except ValueError:
            raise UsageError(f"crop must be four numbers x,y,w,h, not {crop!r}") from None
    elif all(p is None for p in parts):
        return None
    elif any(p is None for p in parts):
        raise UsageError("a crop box needs all four of x, y, w and h")
    values = [float(p) for p in parts]  # type: ignore[arg-type]
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise UsageError("crop values must be finite numbers")
    bx, by, bw, bh = values
    if bw <= 0 or bh <= 0:
        raise UsageError(f"crop width and height must be positive, not {bw:g}x{bh:g}")
    if bx < 0 or by < 0:
        raise UsageError(f"crop x and y must be >= 0, not {bx:g},{by:g}")
    return round(bx), round(by), max(1, round(bw)), max(1, round(bh))


def crop_image(
    img: Image.Image, box: tuple[int, int, int, int], full_size: tuple[int, int] | None = None
) -> Image.Image:
    """`img` cut to `box` (x, y, w, h in its pixels), clipped to the image; a box that
    leaves fewer than 2x2 pixels inside the image is an error. `full_size` names the
    photo's size in messages when `img` was decoded reduced."""
    x, y, w, h = box
    width, height = img.size
    left, top = min(x, width), min(y, height)
    right, bottom = min(x + w, width), min(y + h, height)
    if right - left < 2 or bottom - top < 2:
        fw, fh = full_size or img.size
        raise UsageError(
            f"the crop box lies outside the {fw}x{fh} image, or leaves less than 2x2 pixels"
            " of it (x,y,w,h are in the uploaded image's pixels)"
        )
    return img.crop((left, top, right, bottom))


def load_query_image(
    data: bytes, box: tuple[int, int, int, int] | None, input_size: int, limits: Limits
) -> Image.Image:
    """Decode an uploaded query photo (cut to `box`, given in the photo's own upright
    pixels) at no more resolution than the encoder can use: a JPEG is decoded at 1/2, 1/4
    or 1/8 scale while the part that is searched keeps >= 2x the model's input size."""
    want = 2 * input_size
    # the header first: a bomb is refused here, before any pixel (or EXIF) is decoded
    header = probe_image(data, max_pixels=limits.max_image_pixels, max_bytes=limits.max_image_bytes)
    full = header.upright_size
    draft = want
    if box is not None:
        draft = max(want, math.ceil(want * min(full) / max(1, min(box[2], box[3]))))
    img = load_image(
        data,
        max_pixels=limits.max_image_pixels,
        max_bytes=limits.max_image_bytes,
        draft_size=draft,
    )
    if box is None:  # the uploaded picture itself: a catalog image's bytes find it first
        return tag_content(img, data)
    if header.format not in ("JPEG", "MPO"):
        full = img.size  # decoded whole: its own size is the upright size
    scale = max(img.size) / max(full)  # draft scales both sides by the same power of 2
    if scale != 1.0:
        box = (
            math.floor(box[0] * scale),
            math.floor(box[1] * scale),
            math.ceil(box[2] * scale),
            math.ceil(box[3] * scale),
        )
    return crop_image(img, box, full)


def encoder_input_size(engine: Any) -> int:
    """The side of the square image the engine's encoder takes (256 when it says none)."""
    try:
        return int(engine.encoder.input_size)
    except Exception:
        return 256


def with_file_name(exc: LookalikeError, name: str | None) -> LookalikeError:
    """The same error with the upload's file name instead of the word "upload"."""
    text = str(exc)
    if name and text.startswith("upload:"):
        text = f"{name}:{text[len('upload:') :]}"
    elif name:
        text = f"{name}: {text}"
    return type(exc)(text)


async def read_upload(upload: UploadFile, max_bytes: int) -> bytes:
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > max_bytes:
        raise ImageTooLargeError(
            f"{name}: {upload.size:,} bytes, more than the limit of {max_bytes:,} bytes"
        )
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{name}: more than the limit of {max_bytes:,} bytes")
    return data
