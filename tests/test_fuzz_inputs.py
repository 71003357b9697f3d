"""Property-based fuzzing (hypothesis) of the two readers of untrusted input: the image
decoder (`images.load_image`, `images.probe_image`) and the metadata reader
(`metadata.read_metadata`). The property: any input is either read or refused with the
module's typed error (ImageError / MetadataError, a FILE:LINE message for a bad row);
nothing else escapes. LOOKALIKE_FUZZ_EXAMPLES sets the examples per test (default 150;
benchmarks/bench_reliability_api.py runs it with more)."""

from __future__ import annotations

import io
import os
import re
import tempfile
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lookalike.errors import ImageError, InputPathError, MetadataError
from lookalike.images import HEIF_SUPPORTED, load_image, probe_image
from lookalike.metadata import read_metadata

EXAMPLES = int(os.environ.get("LOOKALIKE_FUZZ_EXAMPLES") or 150)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=bool(os.environ.get("CI")),
)
SMALL_LIMIT = 4_000_000  # pixels: a mutated header may claim any size


@cache
def seeds() -> tuple[bytes, ...]:
    """One small valid file per supported format (and a few modes), to mutate."""
    base = Image.new("RGB", (23, 17), (200, 40, 90))
    base.paste((10, 220, 30), (5, 3, 15, 12))
    made = []
    for fmt, mode, extra in [
        ("JPEG", "RGB", {"quality": 80}),
        ("JPEG", "CMYK", {}),
        ("PNG", "RGBA", {}),
        ("PNG", "P", {"transparency": 0}),
        ("PNG", "I;16", {}),
        ("WEBP", "RGB", {"quality": 70}),
        ("WEBP", "RGBA", {"lossless": True}),
        ("GIF", "P", {}),
        ("BMP", "RGB", {}),
        ("TIFF", "RGB", {"compression": "tiff_deflate"}),
        ("TIFF", "F", {}),
        ("PPM", "RGB", {}),
        ("JPEG2000", "RGB", {}),
        ("AVIF", "RGB", {}),
        ("HEIF", "RGB", {}),
    ]:
        if fmt == "HEIF" and not HEIF_SUPPORTED:
            continue
        out = io.BytesIO()
        img = base.convert(mode)
        if fmt == "JPEG" and mode == "RGB":
            exif = Image.Exif()
            exif[0x0112] = 6
            extra = {**extra, "exif": exif.tobytes()}
        img.save(out, fmt, **extra)
        made.append(out.getvalue())
    return tuple(made)


def check_decode(data: bytes) -> None:
    """The property of the decoder: an RGB image or a typed ImageError, nothing else."""
    try:
        header = probe_image(data, max_pixels=SMALL_LIMIT)
        assert header.width > 0 and header.height > 0
    except ImageError:
        pass
    try:
        img = load_image(data, max_pixels=SMALL_LIMIT, draft_size=32)
    except ImageError:
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds())))
    for _ in range(draw(st.integers(0, 8))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "header"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:  # the header is where sizes and offsets live
            data[min(at, 40)] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(mutated_images())
def test_mutated_images_decode_or_raise_image_error(data):
    check_decode(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_random_bytes_decode_or_raise_image_error(data):
    check_decode(data)


@FUZZ
@given(
    st.sampled_from(
        [
            b"\xff\xd8\xff",
            b"\x89PNG\r\n\x1a\n",
            b"RIFF",
            b"GIF89a",
            b"BM",
            b"II*\x00",
            b"MM\x00*",
            b"\x00\x00\x00\x1cftypheic",
            b"\x00\x00\x00\x1cftypavif",
            b"P6\n",
        ]
    ),
    st.binary(max_size=512),
)
def test_magic_numbers_followed_by_garbage(magic, rest):
    check_decode(magic + rest)


# ------------------------------------------------------------------ metadata reader

LINE = re.compile(r"^.+:\d+: .+")
HEADERS = ["product_id", "image", "title", "category", "price", "in_stock", "colour", ""]
cells = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        ["inf", "-inf", "nan", "1e400", "$1,000.50", "yes", "no", "a/b", "靴", '"', ""]
    ),
)


def check_metadata(name: str, content: bytes) -> None:
    """The property of the reader: a MetadataFile whose errors are FILE:LINE lines, or a
    MetadataError / InputPathError, nothing else."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content)
        try:
            meta = read_metadata(path)
        except (MetadataError, InputPathError) as exc:
            assert str(exc)
            return
        for error in meta.errors:
            assert LINE.match(error), error
        for product in meta.products.values():
            assert product.product_id and "/" not in product.product_id
            assert product.price is None or product.price >= 0


@st.composite
def csv_files(draw) -> bytes:
    header = draw(st.lists(st.sampled_from(HEADERS), min_size=1, max_size=7))
    rows = draw(st.lists(st.lists(cells, min_size=0, max_size=9), max_size=8))
    sep = draw(st.sampled_from([",", ";", "\t"]))
    text = sep.join(header) + "\n" + "\n".join(sep.join(r) for r in rows)
    raw = text.encode("utf-8")
    if draw(st.booleans()):
        raw = draw(st.binary(max_size=16)) + raw[draw(st.integers(0, len(raw))) :]
    return raw


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@st.composite
def jsonl_files(draw) -> bytes:
    import json

    lines = []
    for _ in range(draw(st.integers(0, 6))):
        row = draw(st.dictionaries(st.sampled_from(HEADERS + ["heel"]), json_values, max_size=6))
        text = json.dumps(row)  # NaN / Infinity written as JSON's extensions
        if draw(st.booleans()):
            text = text[: draw(st.integers(0, len(text)))]
        lines.append(text)
    return "\n".join(lines).encode("utf-8")


@FUZZ
@given(csv_files())
def test_csv_metadata_reads_or_raises_metadata_error(content):
    check_metadata("meta.csv", content)


@FUZZ
@given(jsonl_files())
def test_jsonl_metadata_reads_or_raises_metadata_error(content):
    check_metadata("meta.jsonl", content)


@FUZZ
@given(st.binary(max_size=1024), st.sampled_from(["m.csv", "m.jsonl"]))
def test_random_bytes_as_metadata(content, name):
    check_metadata(name, content)


@pytest.mark.parametrize("size", [131_073, 1_000_000])
def test_a_huge_csv_field_is_a_metadata_error(tmp_path, size):
    path = tmp_path / "m.csv"
    path.write_text("product_id,image,title\np1,a.jpg," + "x" * size + "\n")
    check_metadata("m.csv", path.read_bytes())
