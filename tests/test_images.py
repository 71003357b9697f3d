"""lookalike.images: safe decoding and square fitting, on generated and real images."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import ImageError, ImageTooLargeError, InputPathError
from lookalike.images import (
    DEFAULT_MAX_PIXELS,
    HEIF_SUPPORTED,
    fit_square,
    load_image,
)

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def close(pixel, expected, tol=12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def halves(w: int, h: int, first=RED, second=BLUE) -> Image.Image:
    """Left half `first`, right half `second`."""
    img = Image.new("RGB", (w, h), second)
    img.paste(first, (0, 0, w // 2, h))
    return img


def fake_png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds almost no data (a bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# ---------------------------------------------------------------- orientation and modes


def test_exif_rotated_jpeg_decodes_upright():
    stored = halves(80, 40)  # landscape: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left becomes the top
    img = load_image(encode(stored, "JPEG", exif=exif, quality=95))
    assert img.mode == "RGB"
    assert img.size == (40, 80)
    assert close(img.getpixel((20, 10)), RED, 40)
    assert close(img.getpixel((20, 70)), BLUE, 40)


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    out = load_image(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == WHITE
    assert out.getpixel((0, 0)) == RED
    assert close(out.getpixel((1, 0)), (127, 127, 127), 2)


def test_palette_transparency_and_la_on_white():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    out = load_image(encode(pal, "PNG", transparency=0))
    assert out.getpixel((4, 4)) == WHITE  # index 0 (black) was transparent
    assert out.getpixel((0, 0)) == RED

    la = Image.new("LA", (4, 4), (0, 0))
    out = load_image(encode(la, "PNG"))
    assert out.getpixel((1, 1)) == WHITE


def test_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.paste((0, 0, 0, 0), (0, 0, 8, 16))  # left half: no ink = white
    out = load_image(encode(cmyk, "JPEG", quality=95))
    assert out.mode == "RGB"
    assert close(out.getpixel((2, 8)), WHITE, 10)
    assert close(out.getpixel((13, 8)), RED, 30)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_greyscale_scaled_to_8bit(fmt):
    arr = np.zeros((4, 8), dtype=np.uint16)
    arr[:, 2:4] = 32768
    arr[:, 4:] = 65535
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = load_image(encode(img, fmt))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0, 0, 0)
    assert close(out.getpixel((2, 0)), (128, 128, 128), 1)
    assert out.getpixel((6, 0)) == WHITE


def test_float_tiff_scaled():
    arr = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = load_image(encode(Image.fromarray(arr), "TIFF"))
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_webp_and_avif_roundtrip():
    src = halves(32, 32)
    for fmt in ("WEBP", "AVIF"):
        out = load_image(encode(src, fmt, quality=95))
        assert out.size == (32, 32)
        assert close(out.getpixel((4, 16)), RED, 40), fmt
        assert close(out.getpixel((28, 16)), BLUE, 40), fmt


def test_mpo_multi_picture_jpeg_opens_first_picture():
    data = encode(halves(32, 32), "MPO", save_all=True, append_images=[Image.new("RGB", (32, 32))])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    out = load_image(data)
    assert out.size == (32, 32) and close(out.getpixel((4, 16)), RED, 40)
    big = encode(halves(800, 600), "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))])
    assert load_image(big, draft_size=100).size == (200, 150)  # draft works on MPO too


def test_draft_keeps_cmyk_and_greyscale_jpegs_right():
    cmyk = Image.new("CMYK", (800, 600), (0, 255, 255, 0))
    cmyk.paste((0, 0, 0, 0), (0, 0, 400, 600))
    out = load_image(encode(cmyk, "JPEG", quality=95), draft_size=100)
    assert out.size == (200, 150) and out.mode == "RGB"
    assert close(out.getpixel((10, 75)), WHITE, 10) and close(out.getpixel((190, 75)), RED, 30)
    grey = load_image(encode(Image.new("L", (800, 600), 50), "JPEG"), draft_size=100)
    assert grey.size == (200, 150) and close(grey.getpixel((5, 5)), (50, 50, 50), 2)


@pytest.mark.skipif(not HEIF_SUPPORTED, reason="pillow-heif is not installed")
def test_heic_roundtrip():
    try:
        data = encode(halves(64, 64), "HEIF", quality=95)
    except (OSError, KeyError, ValueError) as exc:
        pytest.skip(f"this pillow-heif build cannot encode HEIC: {exc}")
    out = load_image(data)
    assert out.size == (64, 64)
    assert close(out.getpixel((8, 32)), RED, 40)


def test_jpeg_draft_decodes_reduced_but_not_below_draft_size():
    big = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), np.uint8))
    data = encode(big, "JPEG", quality=80)
    assert load_image(data).size == (2000, 1500)
    small = load_image(data, draft_size=260)
    assert small.size == (500, 375)  # 1/4 scale; 1/8 would give a 188 px short side
    assert min(small.size) >= 260


def test_path_and_bytes_give_the_same_image(tmp_path):
    path = tmp_path / "a.png"
    halves(20, 10).save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(path.read_bytes())))
    assert np.array_equal(np.asarray(load_image(str(path))), np.asarray(load_image(path)))


# ---------------------------------------------------------------- bad input


def test_truncated_jpeg_raises_image_error():
    noise = np.random.default_rng(1).integers(0, 255, (200, 200, 3), np.uint8)
    data = encode(Image.fromarray(noise), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_empty_file_raises_image_error(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(empty)
    with pytest.raises(ImageError, match="empty"):
        load_image(b"")


def test_text_file_raises_image_error(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n" * 20)
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(text)


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "ICO"])
def test_formats_outside_the_allow_list_are_refused(fmt):
    data = encode(Image.new("RGB", (32, 32), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself would open it
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_image(data)


def test_corrupt_header_raises_image_error():
    data = encode(Image.new("RGB", (50, 50), RED), "PNG")
    broken = data[:16] + b"\xff" * 40 + data[56:]
    with pytest.raises(ImageError):
        load_image(broken)


def test_missing_path_and_directory_raise_input_path_error(tmp_path):
    with pytest.raises(InputPathError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(InputPathError, match="directory"):
        load_image(tmp_path)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 40_000])  # below and above Pillow's own limit
def test_decompression_bomb_raises_too_large(side):
    assert side * side > DEFAULT_MAX_PIXELS
    bomb = fake_png_header(side, side)
    assert len(bomb) < 200
    with pytest.raises(ImageTooLargeError, match="pixels"):
        load_image(bomb)


def test_pixel_limit_is_configurable():
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")
    with pytest.raises(ImageTooLargeError, match="10,000 pixels"):
        load_image(data, max_pixels=9_999)
    assert load_image(data, max_pixels=10_000).size == (100, 100)


def test_too_many_bytes(tmp_path):
    data = encode(Image.new("RGB", (64, 64), RED), "PNG")
    with pytest.raises(ImageTooLargeError, match="bytes"):
        load_image(data, max_bytes=len(data) - 1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    with pytest.raises(ImageTooLargeError, match="bytes"):
        load_image(path, max_bytes=len(data) - 1)
    assert load_image(path, max_bytes=len(data)).size == (64, 64)


def test_too_large_is_an_image_error():
    # the CLI/API may catch ImageError for both; the HTTP status still differs
    assert issubclass(ImageTooLargeError, ImageError)
    assert ImageTooLargeError.http_status == 413


# ---------------------------------------------------------------- fit_square


def test_fit_square_pad_keeps_whole_image_on_white():
    arr = fit_square(Image.new("RGB", (200, 100), RED), 64, "pad")
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert tuple(arr[2, 32]) == WHITE  # top band is padding
    assert tuple(arr[61, 32]) == WHITE
    assert tuple(arr[32, 1]) == RED  # full width kept
    assert tuple(arr[32, 62]) == RED


def test_fit_square_crop_takes_the_centre():
    img = Image.new("RGB", (300, 100), BLUE)
    img.paste(RED, (100, 0, 200, 100))  # the centre square is red
    arr = fit_square(img, 50, "crop")
    assert arr.shape == (50, 50, 3)
    assert close(arr[:, 3:-3].reshape(-1, 3).min(0), RED, 8)
    assert close(arr[:, 3:-3].reshape(-1, 3).max(0), RED, 8)


def test_fit_square_stretch_keeps_both_ends():
    arr = fit_square(halves(300, 100), 50, "stretch")
    assert arr.shape == (50, 50, 3)
    assert close(arr[25, 2], RED, 5) and close(arr[25, 47], BLUE, 5)


def test_fit_square_rejects_unknown_mode():
    with pytest.raises(ValueError, match="pad, crop, stretch"):
        fit_square(Image.new("RGB", (4, 4)), 8, "zoom")


# ---------------------------------------------------------------- real photos


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not present")
def test_real_phone_photo_and_catalog_image():
    photo = DATA / "grocery/dataset/val/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg"
    img = load_image(photo)
    assert img.mode == "RGB" and min(img.size) > 100
    drafted = load_image(photo, draft_size=64)
    assert min(drafted.size) >= 64 and drafted.size[0] <= img.size[0]
    shoe = load_image(DATA / "fashion-footwear/images/59051.jpg")
    assert shoe.mode == "RGB"
    assert fit_square(shoe, 224, "pad").shape == (224, 224, 3)
