"""Hostile uploads: decompression bombs in every supported format, truncated files,
wrong types and polyglots, each with the answer the API owes it. Used by
tests/test_api_hostile.py and benchmarks/bench_reliability_api.py."""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import lookalike.images  # noqa: F401  (registers the HEIF opener and saver)

BOMB_SIDE = 7500  # 56 M pixels: over the server's default 50 M limit


@dataclass(frozen=True)
class Hostile:
    name: str
    data: bytes
    filename: str
    content_type: str
    expect: frozenset[int]
    """The statuses a correct server may answer (never a 5xx)."""


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _photo(fmt: str = "JPEG", size=(320, 240), **kw) -> bytes:
    img = Image.new("RGB", size, (180, 60, 40))
    for x in range(0, size[0], 16):
        img.paste((30, 200, 90), (x, 0, x + 6, size[1]))
    return _save(img, fmt, **kw)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_with(extra: bytes, side: tuple[int, int] = (1, 1), idat: bytes | None = None) -> bytes:
    ihdr = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", *side, 8, 2, 0, 0, 0))
    idat = idat if idat is not None else zlib.compress(b"\0" + b"\0\0\0" * side[0])
    return (
        b"\x89PNG\r\n\x1a\n" + ihdr + extra + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    )


def _jpeg_claiming(width: int, height: int) -> bytes:
    data = bytearray(_photo("JPEG", (64, 48)))
    at = data.find(b"\xff\xc0")  # baseline SOF0: length(2) precision(1) height(2) width(2)
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # logical screen
    at = data.find(b"\x2c")  # image descriptor: left, top, width, height
    data[at + 5 : at + 9] = struct.pack("<HH", width, height)
    return bytes(data)


def _bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("RGB", (8, 8)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def _webp_claiming(width: int, height: int) -> bytes:
    data = bytearray(_save(Image.new("RGB", (8, 8)), "WEBP", lossless=True))
    at = data.find(b"VP8L") + 9  # after the chunk header and the 0x2f signature
    bits = (
        (width - 1)
        | ((height - 1) << 14)
        | (int.from_bytes(data[at : at + 4], "little") & ~((1 << 28) - 1))
    )
    data[at : at + 4] = bits.to_bytes(4, "little")
    return bytes(data)


def _cached(cache: Path, name: str, make: Callable[[], bytes]) -> bytes:
    path = cache / name
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(make())
        os.replace(tmp, path)
    return path.read_bytes()


def _big(fmt: str, mode: str = "L", **kw) -> Callable[[], bytes]:
    return lambda: _save(Image.new(mode, (BOMB_SIDE, BOMB_SIDE), 200), fmt, **kw)


def _tiff_ifd_loop() -> bytes:
    data = bytearray(_save(Image.new("RGB", (8, 8)), "TIFF"))
    first = struct.unpack("<I", data[4:8])[0]
    count = struct.unpack("<H", data[first : first + 2])[0]
    next_at = first + 2 + 12 * count
    data[next_at : next_at + 4] = struct.pack("<I", first)  # the next IFD is itself
    return bytes(data)


def _zip_bomb() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (50 * 1024 * 1024))
    return out.getvalue()


def hostile_uploads(cache: Path, max_image_bytes: int = 20 * 1024 * 1024) -> list[Hostile]:
    """The hostile uploads; big bombs are made once and kept in `cache`."""
    too_big = frozenset({413})
    refused = frozenset({415})
    either = frozenset({413, 415})
    usable = frozenset({200, 201, 409})  # read as the image it also is (polyglots)
    jpeg, png, webp = _photo("JPEG"), _photo("PNG"), _photo("WEBP")
    gif, heic = _photo("GIF"), _photo("HEIF")
    return [
        # decompression bombs: a small file that claims or holds too many pixels
        Hostile("jpeg-bomb-header", _jpeg_claiming(65000, 65000), "b.jpg", "image/jpeg", too_big),
        Hostile(
            "png-bomb-9000px",
            _cached(
                cache,
                "bomb9000.png",
                lambda: _save(Image.new("RGBA", (9000, 9000), (0, 0, 0, 0)), "PNG"),
            ),
            "b.png",
            "image/png",
            too_big,
        ),
        Hostile("png-bomb-header", _png_with(b"", (100000, 100000)), "b.png", "image/png", too_big),
        Hostile("webp-bomb-header", _webp_claiming(16383, 16383), "b.webp", "image/webp", too_big),
        Hostile("gif-bomb-header", _gif_claiming(65535, 65535), "b.gif", "image/gif", too_big),
        Hostile("bmp-bomb-header", _bmp_claiming(30000, 30000), "b.bmp", "image/bmp", either),
        Hostile(
            "tiff-bomb-g4",
            _cached(cache, "bomb.tiff", _big("TIFF", "1", compression="group4")),
            "b.tiff",
            "image/tiff",
            too_big,
        ),
        Hostile(
            "heic-bomb",
            _cached(cache, "bomb.heic", _big("HEIF", "RGB", quality=10)),
            "b.heic",
            "image/heic",
            too_big,
        ),
        Hostile(
            "avif-bomb",
            _cached(cache, "bomb.avif", _big("AVIF", "RGB", speed=10, quality=10)),
            "b.avif",
            "image/avif",
            too_big,
        ),
        Hostile(
            "ppm-bomb-header",
            b"P6\n60000 60000\n255\n" + b"\0" * 64,
            "b.ppm",
            "image/x-portable-pixmap",
            too_big,
        ),
        Hostile(
            "png-zlib-bomb-1px",
            _png_with(b"", (1, 1), zlib.compress(b"\0" * (64 * 1024 * 1024), 9)),
            "z.png",
            "image/png",
            frozenset({200, 201, 415}),
        ),
        Hostile(
            "png-ztxt-bomb",
            _png_with(_png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * (64 * 1024 * 1024), 9))),
            "t.png",
            "image/png",
            frozenset({200, 201, 415}),
        ),
        Hostile(
            "png-iccp-bomb",
            _png_with(_png_chunk(b"iCCP", b"p\0\0" + zlib.compress(b"\0" * (64 * 1024 * 1024), 9))),
            "i.png",
            "image/png",
            frozenset({200, 201, 415}),
        ),
        # truncations
        Hostile("jpeg-truncated", jpeg[: len(jpeg) // 3], "t.jpg", "image/jpeg", refused),
        Hostile("png-truncated", png[: len(png) // 2], "t.png", "image/png", refused),
        Hostile("webp-truncated", webp[: len(webp) // 2], "t.webp", "image/webp", refused),
        Hostile("gif-truncated", gif[:40], "t.gif", "image/gif", refused),
        Hostile("heic-truncated", heic[: len(heic) // 2], "t.heic", "image/heic", refused),
        Hostile("jpeg-header-only", jpeg[:200], "h.jpg", "image/jpeg", refused),
        Hostile("empty", b"", "e.jpg", "image/jpeg", refused),
        # wrong types
        Hostile(
            "text-as-jpeg", b"hello, this is not a photo\n" * 20, "x.jpg", "image/jpeg", refused
        ),
        Hostile(
            "pdf",
            b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n",
            "x.pdf",
            "application/pdf",
            refused,
        ),
        Hostile(
            "svg-xxe",
            b'<?xml version="1.0"?><!DOCTYPE s [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
            b"<text>&x;</text></svg>",
            "x.svg",
            "image/svg+xml",
            refused,
        ),
        Hostile(
            "eps-ghostscript",
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
            b"(/etc/passwd) (r) file\nshowpage\n",
            "x.eps",
            "application/postscript",
            refused,
        ),
        Hostile(
            "psd",
            b"8BPS\x00\x01" + b"\0" * 6 + struct.pack(">HIIHH", 3, 100, 100, 8, 3) + b"\0" * 64,
            "x.psd",
            "image/vnd.adobe.photoshop",
            refused,
        ),
        Hostile("ico", _save(Image.new("RGB", (16, 16)), "ICO"), "x.ico", "image/x-icon", refused),
        Hostile("zip-bomb", _zip_bomb(), "x.zip", "application/zip", refused),
        Hostile(
            "html-as-png", b"<html><script>alert(1)</script></html>", "x.png", "image/png", refused
        ),
        Hostile(
            "tiff-ifd-loop",
            _tiff_ifd_loop(),
            "l.tiff",
            "image/tiff",
            frozenset({200, 201, 409, 415}),
        ),
        # polyglots: a real image that is something else too
        Hostile("jpeg-plus-zip", jpeg + _zip_bomb()[:4096], "p.jpg", "image/jpeg", usable),
        Hostile(
            "gif-javascript",
            b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00*/=1;alert(1);" + gif[13:],
            "p.gif",
            "image/gif",
            frozenset({200, 201, 409, 415}),
        ),
        Hostile(
            "png-plus-html",
            png + b"<html><script>alert(1)</script></html>",
            "p.png",
            "image/png",
            usable,
        ),
        # sizes and names
        Hostile(
            "over-byte-limit",
            b"\xff\xd8\xff\xe0" + os.urandom(max_image_bytes),
            "big.jpg",
            "image/jpeg",
            too_big,
        ),
        Hostile("path-traversal-name", jpeg, "../../etc/passwd", "image/jpeg", usable),
    ]
