"""Decode image files and uploads safely into upright RGB Pillow images.

One code path for catalog images and shopper queries, so both are seen by the encoder
the same way:

- byte limit (checked before decoding) and pixel limit (checked from the header,
  before the pixels are decoded) -> `ImageTooLargeError`; decompression bombs included;
- empty, truncated, corrupt or non-image input -> `ImageError` with the reason;
- EXIF orientation applied (`ImageOps.exif_transpose`);
- every mode to RGB: palette / LA / RGBA transparency composited on white, CMYK (through
  its ICC profile when it has one), 16-bit and 32-bit integer greyscale scaled to 8 bits,
  float images, 1-bit and greyscale;
- JPEG, PNG, WebP, GIF (first frame), TIFF, BMP, PPM, JPEG 2000, AVIF (Pillow), HEIC/HEIF
  (pillow-heif, when installed) and nothing else (see `FORMATS`);
- optional JPEG draft decoding (`draft_size`) that lets libjpeg decode a big phone photo
  at 1/2, 1/4 or 1/8 scale, several times faster, while keeping the shorter side at
  least `draft_size` pixels.

`fit_square` turns a decoded image into the square uint8 array an encoder takes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from lookalike.errors import ImageError, ImageTooLargeError, InputPathError

try:  # HEIC/HEIF support is optional: pillow-heif registers an opener with Pillow.
    import pillow_heif

    pillow_heif.register_heif_opener()
    HEIF_SUPPORTED = True
except Exception:  # pragma: no cover - depends on the installed wheels
    HEIF_SUPPORTED = False

# Our own limits replace Pillow's warning (which would only print); Pillow still raises
# DecompressionBombError beyond twice its own limit, which we report the same way.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

DEFAULT_MAX_PIXELS = 100_000_000
"""Width x height as stored in the file (a 108-megapixel phone photo is 12000 x 9000)."""
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
"""File or upload size."""

FORMATS: tuple[str, ...] = (
    "JPEG",  # also opens MPO (JPEG with extra frames, as some phones write)
    "PNG",
    "WEBP",
    "AVIF",
    "HEIF",
    "GIF",
    "TIFF",
    "BMP",
    "PPM",
    "JPEG2000",
)
"""Formats `load_image` opens. Pillow's other plugins (EPS runs Ghostscript, PSD, FITS,
...) are not offered untrusted uploads."""

FitMode = Literal["pad", "crop", "stretch"]
FIT_MODES: tuple[str, ...] = ("pad", "crop", "stretch")
RESAMPLE = Image.Resampling.BICUBIC
PAD_COLOUR = (255, 255, 255)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def load_image(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode `source` (a path or the raw bytes of an upload) into an upright RGB image.

    `draft_size`: when set and the file is a JPEG, decode it reduced (1/2, 1/4, 1/8)
    as long as both sides stay >= `draft_size`; use about twice the model input size.

    Raises `InputPathError` for a missing/unreadable path, `ImageTooLargeError` for more
    than `max_bytes` bytes or `max_pixels` pixels, and `ImageError` for anything that
    is not a decodable image.
    """
    data, label = _read_bytes(source, max_bytes)
    img = _open_checked(data, label, max_pixels)

    try:
        if draft_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (draft_size, draft_size))
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{label}: image has too many pixels ({exc})") from exc
    except Exception as exc:
        raise ImageError(f"{label}: corrupt or truncated image data: {_reason(exc)}") from exc

    img = _upright(img)
    try:
        rgb = to_rgb(img)
    except Exception as exc:
        raise ImageError(
            f"{label}: cannot convert {img.mode} image to RGB: {_reason(exc)}"
        ) from exc
    return rgb


@dataclass(frozen=True)
class ImageHeader:
    """What an image file says about itself before any pixel is decoded."""

    format: str
    width: int
    height: int
    orientation: int = 1
    """EXIF orientation (1 = as stored; 5..8 swap width and height)."""

    @property
    def upright_size(self) -> tuple[int, int]:
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height

    @property
    def suffix(self) -> str:
        """The file name extension this format is stored under (".jpg", ".png", ...)."""
        return SUFFIXES.get(self.format, ".img")


SUFFIXES = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "AVIF": ".avif",
    "HEIF": ".heic",
    "GIF": ".gif",
    "TIFF": ".tiff",
    "BMP": ".bmp",
    "PPM": ".ppm",
    "JPEG2000": ".jp2",
}
"""File extension per format of `FORMATS` (MPO is stored as the JPEG it starts with)."""


def probe_image(
    source: str | Path | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> ImageHeader:
    """Format, size and EXIF orientation of an image from its header alone: no pixel is
    decoded (a PNG whose EXIF block follows its pixels reports orientation 1 rather than
    decode them). Raises the errors `load_image` raises for bytes, pixels and format."""
    data, label = _read_bytes(source, max_bytes)
    with _open_checked(data, label, max_pixels) as img:
        return ImageHeader(img.format or "", *img.size, _header_orientation(img))


def _open_checked(data: bytes, label: str, max_pixels: int) -> Image.Image:
    """The opened (not decoded) image, after the byte, format and pixel-count checks."""
    if not data:
        raise ImageError(f"{label}: empty file (0 bytes), not an image")
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{label}: image has too many pixels ({exc}); limit is {max_pixels:,}"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{label}: not a recognised image format (supported: {', '.join(FORMATS)})"
        ) from exc
    except Exception as exc:  # Pillow plugins raise many types on bad headers
        raise ImageError(f"{label}: cannot read image header: {_reason(exc)}") from exc
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageError(f"{label}: image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        img.close()
        raise ImageTooLargeError(
            f"{label}: image is {width}x{height} = {width * height:,} pixels, "
            f"more than the limit of {max_pixels:,} (possible decompression bomb)"
        )
    return img


def _header_orientation(img: Image.Image) -> int:
    """The EXIF orientation found without decoding pixels (`getexif()` decodes a PNG)."""
    try:
        raw = img.info.get("exif")
        if raw:
            exif = Image.Exif()
            exif.load(raw)
            value = exif.get(0x0112, 1)
        elif img.format == "TIFF":  # TIFF tags are read with the header
            value = img.getexif().get(0x0112, 1)
        else:
            value = 1
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # a broken EXIF block: the image is used as stored
        return 1


def _read_bytes(source: str | Path | bytes, max_bytes: int) -> tuple[bytes, str]:
    """The raw bytes of `source` and a label for messages, enforcing `max_bytes`."""
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        if len(data) > max_bytes:
            raise ImageTooLargeError(
                f"upload: {len(data):,} bytes, more than the limit of {max_bytes:,} bytes"
            )
        return data, "upload"
    path = Path(source)
    label = str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise InputPathError(f"{label}: no such file") from exc
    except OSError as exc:
        raise InputPathError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    if path.is_dir():
        raise InputPathError(f"{label}: is a directory, not an image file")
    if size > max_bytes:
        raise ImageTooLargeError(
            f"{label}: {size:,} bytes, more than the limit of {max_bytes:,} bytes"
        )
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)  # the file may have grown since stat()
    except OSError as exc:
        raise InputPathError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"{label}: more than the limit of {max_bytes:,} bytes")
    return data, label


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a broken EXIF block leaves the image as stored."""
    try:
        return ImageOps.exif_transpose(img) or img
    except Exception:
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB; transparent pixels become white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _INT_MODES or mode == "F":
        return _scale_to_8bit(img).convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, PAD_COLOUR + (255,))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _scale_to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale to 'L', mapping the type's range to 0..255."""
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(arr.max(initial=0.0))
        scale = 255.0 if top <= 1.0 else 255.0 / max(top, 255.0)
        out = arr * scale
    else:
        arr = arr.astype(np.int64)
        top = int(arr.max(initial=0))
        # 16-bit data (the usual case: 16-bit PNG/TIFF greyscale) uses the full 0..65535
        # range; wider integers are scaled by their own maximum.
        denominator = 65535 if top <= 65535 else top
        out = arr * (255.0 / denominator)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


_SRGB = None


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK through its embedded ICC profile when present, else Pillow's formula."""
    global _SRGB
    icc = img.info.get("icc_profile")
    if icc:
        try:
            if _SRGB is None:
                _SRGB = ImageCms.createProfile("sRGB")
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            out = ImageCms.profileToProfile(img, src, _SRGB, outputMode="RGB")
            if out is not None:
                return out
        except Exception:
            pass  # a broken profile: fall back to the plain conversion
    return img.convert("RGB")


def fit_square(img: Image.Image, size: int, mode: str = "pad") -> np.ndarray:
    """A uint8 (size, size, 3) array of `img` made square.

    - "pad": keep the whole image, letterboxed on white (the long side becomes `size`);
    - "crop": centre crop of the shorter side (loses the ends of long products);
    - "stretch": resize to size x size, changing the aspect ratio.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit mode must be one of {', '.join(FIT_MODES)}, not {mode!r}")
    if img.mode != "RGB":
        img = to_rgb(img)
    w, h = img.size
    if mode == "stretch" or w == h:
        out = img.resize((size, size), RESAMPLE, reducing_gap=3.0)
    elif mode == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        out = img.resize((size, size), RESAMPLE, box=(left, top, left + side, top + side))
    else:  # pad: same as padding to a square first, without resizing the padding
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.resize((nw, nh), RESAMPLE, reducing_gap=3.0)
        out = Image.new("RGB", (size, size), PAD_COLOUR)
        out.paste(resized, ((size - nw) // 2, (size - nh) // 2))
    return np.asarray(out, dtype=np.uint8)
