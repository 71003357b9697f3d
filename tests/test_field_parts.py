"""The parts `tune --field` adds beside the base embedding, and the query framing that
lets a tall product shot be seen whole: the colour descriptor (lookalike.encoders.colour),
a Head with a field classifier and a colour part (lookalike.models.Head), and
lookalike.framing.letterbox_product; on real images where it matters."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import require_data
from PIL import Image, ImageDraw

from lookalike import framing
from lookalike.encoders.colour import DIM, colour_descriptor
from lookalike.errors import ModelError
from lookalike.framing import letterbox_product
from lookalike.models import Head


def _shoe(colour: tuple[int, int, int], size=(260, 260), box=(60, 100, 200, 160)) -> np.ndarray:
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).rectangle(box, fill=colour)
    return np.asarray(img)


def test_colour_descriptor_sees_the_product_not_the_background():
    red, red_big, blue = (_shoe((200, 20, 20)), _shoe((200, 20, 20), box=(20, 60, 240, 200)),
                          _shoe((20, 20, 200)))  # fmt: skip
    d = colour_descriptor(np.stack([red, red_big, blue]))
    assert d.shape == (3, DIM) and d.dtype == np.float32
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    # the white background is left out: a small and a big red product look the same
    assert float(d[0] @ d[1]) > 0.99
    assert float(d[0] @ d[2]) < 0.1
    # an image without a plain background uses all its pixels (no division by zero)
    noise = np.random.default_rng(0).integers(0, 256, (1, 260, 260, 3), dtype=np.uint8)
    assert np.isfinite(colour_descriptor(noise)).all()
    with pytest.raises(ValueError):
        colour_descriptor(np.zeros((260, 260, 3), np.uint8))


def _head(colour_weight: float) -> Head:
    rng = np.random.default_rng(1)
    return Head(mean=np.zeros(8, np.float32), weights=[], biases=[], keep_base=1.0,
                classifier=rng.normal(size=(8, 3)).astype(np.float32),
                classifier_bias=np.zeros(3, np.float32), class_weight=2.0,
                colour_weight=colour_weight)  # fmt: skip


def test_field_head_parts_round_trip_and_need_the_colour(tmp_path):
    head = _head(0.7)
    x = np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32)
    colour = colour_descriptor(np.stack([_shoe((200, 20, 20))] * 5))
    assert head.dim == 8 + 3 + DIM and head.needs_colour
    out = head.apply(x, colour)
    assert out.shape == (5, head.dim)
    assert np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    # the parts, as the docstring of Head says: x, the softmax posterior, the colour
    logits = x @ head.classifier + head.classifier_bias
    post = np.exp(logits - logits.max(axis=1, keepdims=True))
    post /= post.sum(axis=1, keepdims=True)
    want = np.concatenate([x, 2.0 * post, 0.7 * colour], axis=1)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    assert np.allclose(out, want, atol=1e-5)
    with pytest.raises(ModelError, match="colour"):
        head.apply(x)
    head.save(tmp_path / "head.npz")
    again = Head.load(tmp_path / "head.npz")
    assert again.digest() == head.digest()
    assert np.array_equal(again.apply(x, colour), out)
    # every part is in the digest: another colour weight is another model
    assert _head(0.5).digest() != head.digest()
    no_colour = _head(0.0)
    assert not no_colour.needs_colour and no_colour.apply(x).shape == (5, 11)


def test_a_query_s_rows_and_a_batch_s_agree_within_float32_rounding():
    """A Head multiplies a query's few rows with a loop and a batch with BLAS (`few`):
    the same vectors but for float32 rounding, on a head of the --photos shape."""
    rng = np.random.default_rng(3)
    head = Head(mean=rng.normal(size=1632).astype(np.float32) * 0.01,
                weights=[rng.normal(size=(1632, 1024)).astype(np.float32) * 0.03,
                         rng.normal(size=(1024, 512)).astype(np.float32) * 0.04],
                biases=[np.zeros(1024, np.float32), np.full(512, 0.01, np.float32)],
                keep_base=1.25)  # fmt: skip
    x = rng.normal(size=(20, 1632)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    loop, blas = head.apply(x, few=True), head.apply(x, few=False)
    assert np.abs(loop - blas).max() < 1e-6
    assert np.array_equal(head.apply(x[:1]), loop[:1])  # by the row count: a query's
    assert np.array_equal(head.apply(x), blas)


def test_letterbox_frames_a_tall_product_shot_and_leaves_photos_alone():
    tall = Image.new("RGB", (200, 300), (250, 250, 250))
    ImageDraw.Draw(tall).polygon([(20, 290), (180, 10), (190, 290)], fill=(200, 0, 0))
    framed = letterbox_product(tall)
    assert framed is not None and framed.size == (300, 300)
    assert framed.getpixel((5, 150)) == (250, 250, 250)  # padded with the background
    assert framed.getpixel((150, 150)) == tall.getpixel((100, 150))
    # a product the central square keeps whole is left alone
    small = Image.new("RGB", (200, 300), (255, 255, 255))
    ImageDraw.Draw(small).rectangle((60, 110, 140, 190), fill=(0, 0, 200))
    assert letterbox_product(small) is None
    # no plain background (a shop photo), or already square: left alone
    rng = np.random.default_rng(0)
    assert letterbox_product(Image.fromarray(rng.integers(0, 256, (300, 200, 3), np.uint8))) is None
    assert letterbox_product(Image.new("RGB", (200, 200), (255, 255, 255))) is None


def test_letterbox_on_real_images():
    """The red stiletto (a portrait studio shot whose heel and toe the crop cuts) is
    framed; grocery's shop photos never are."""
    foot = require_data("footwear300")
    grocery = require_data("grocery")
    stiletto = Image.open(foot / "search_image_01.jpg").convert("RGB")
    assert letterbox_product(stiletto) is not None
    photos = sorted((grocery / "dataset" / "train").rglob("*.jpg"))[::130]
    assert photos and all(letterbox_product(Image.open(p).convert("RGB")) is None for p in photos)


def test_the_quick_look_reads_the_same_border_as_the_whole_image():
    """_maybe_plain copies only the border strips out of the image: the same pixels in
    the same order as the border of the whole array, and its median and share are
    np.median's and the mean's values, so the same decisions, on real shop photos, studio
    shots and catalog images of every shape."""
    foot = require_data("footwear300")
    grocery = require_data("grocery")
    paths = sorted((grocery / "dataset" / "train").rglob("*.jpg"))[::97]
    paths += sorted((foot / "data").glob("*.jpg"))[::15] + [foot / "search_image_01.jpg"]
    decisions = set()
    for path in paths:
        img = Image.open(path).convert("RGB")
        whole = np.asarray(img)
        share, colour = framing._plain_share(whole)
        w, h = img.size
        boxes = ((0, 0, w, 1), (0, h - 1, w, h), (0, 1, 1, h - 1), (w - 1, 1, w, h - 1))
        strips = np.concatenate([np.asarray(img.crop(b)).reshape(-1, 3) for b in boxes])
        assert np.array_equal(strips, framing.border_pixels(whole)), path
        assert np.array_equal(colour, np.median(strips, axis=-2)), path  # np.median's values
        assert share == float((~framing.away_from(strips, colour)).mean()), path
        assert framing._maybe_plain(img) == (share >= framing.PRE_SHARE), path
        decisions.add(share >= framing.PRE_SHARE)
    assert decisions == {True, False}  # both kinds of image were looked at
    grey = Image.new("L", (40, 60), 200)  # not RGB: read as RGB
    assert framing._maybe_plain(grey)
    # the median of a batch's borders (lookalike.encoders.colour), odd and even counts
    rng = np.random.default_rng(4)
    for shape in ((3, 7, 9, 3), (2, 8, 8, 3)):
        for dtype in (np.uint8, np.int16, np.float32):
            batch = rng.integers(0, 256, shape).astype(dtype)
            border, colour = framing.border_colour(batch)
            want = np.median(border, axis=-2)
            assert colour.dtype == want.dtype and np.array_equal(colour, want)


def test_a_crop_view_sees_a_square_product_shot_whole(shared_model_cache):
    """A view that keeps the central 60 % (a `tune --photos` model's) would cut a square
    product shot on a plain background (a grocery catalog image): it is framed, and seen
    whole; a square shop photo is still cropped."""
    from lookalike.encoders import load_encoder
    from lookalike.query import QualitySettings, QueryPipeline, centre_square

    grocery = require_data("grocery")
    iconic = grocery / "dataset" / "iconic-images-and-descriptions" / "Fruit" / "Apple"
    shot = Image.open(iconic / "Golden-Delicious" / "Golden-Delicious_Iconic.jpg").convert("RGB")
    photo = Image.open(sorted((grocery / "dataset" / "train").rglob("*.jpg"))[0]).convert("RGB")
    assert shot.width == shot.height and photo.width == photo.height
    assert letterbox_product(shot) is None  # the full square cuts nothing
    assert letterbox_product(shot, keep=0.6) is shot
    assert letterbox_product(photo, keep=0.6) is None
    base = load_encoder("efficientnet-lite2", shared_model_cache)
    pipe = QueryPipeline(base, QualitySettings(query_views=("centre60",), frame_products=True))
    assert pipe.keep == 0.6
    got = pipe.embed_queries([shot, photo])
    want = base.embed(np.stack([base.prepare(shot), base.prepare(centre_square(photo, 0.6))]))
    np.testing.assert_allclose(got, want, atol=1e-6)
