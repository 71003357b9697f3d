"""lookalike.query: settings, catalog margin, query views, calibration of the query
centre and its use by the Engine, on the real bundled encoder and generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lookalike.calibration import calibrate, save_centre
from lookalike.errors import InputPathError, MetadataError, UsageError
from lookalike.framing import letterbox_product
from lookalike.query import (
    CENTRE_FILE,
    QUERY_VIEWS,
    QualitySettings,
    QueryCentre,
    QueryPipeline,
    centre_square,
    load_settings,
    photo_paths,
    query_pipeline,
    with_margin,
)


def _photo(seed: int, size=(240, 180)) -> Image.Image:
    """A cluttered 'shop photo': random coloured boxes on a speckled grey shelf (no
    plain background: lookalike.framing leaves it alone)."""
    rng = np.random.default_rng(seed)
    shelf = rng.integers(40, 200, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(shelf)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x, y = int(rng.integers(0, size[0] - 40)), int(rng.integers(0, size[1] - 40))
        w, h = int(rng.integers(20, 80)), int(rng.integers(20, 80))
        draw.rectangle((x, y, x + w, y + h), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return img


def _catalog(folder: Path, n: int, seed: int, size: tuple[int, int]) -> Path:
    """`folder` with n generated product images c0.png.. and catalog.csv (P0.. -> c0.png..)."""
    folder.mkdir()
    lines = ["product_id,image"]
    for i in range(n):
        _photo(seed + i, size).save(folder / f"c{i}.png")
        lines.append(f"P{i},c{i}.png")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def base(shared_model_cache):
    from lookalike.encoders import load_encoder

    return load_encoder("efficientnet-lite2", shared_model_cache)


def test_settings_validate_and_load_from_home(tmp_path):
    assert load_settings(tmp_path) == QualitySettings()
    (tmp_path / "quality.json").write_text(
        json.dumps({"query_views": ["full", "centre80"], "centre": False})
    )
    settings = load_settings(tmp_path)
    assert settings.query_views == ("full", "centre80")
    assert settings.centre is False
    with pytest.raises(UsageError, match="query_views"):
        QualitySettings(query_views=("full", "zoom"))
    with pytest.raises(UsageError, match="centre"):
        QualitySettings(centre="yes")
    (tmp_path / "quality.json").write_text(json.dumps({"pooling": "gem"}))
    with pytest.raises(UsageError, match="unknown quality setting"):
        load_settings(tmp_path)
    (tmp_path / "quality.json").write_text("[1, 2")
    with pytest.raises(MetadataError):
        load_settings(tmp_path)


def test_margin_and_centre_crop_geometry():
    img = Image.new("RGB", (70, 140), (10, 20, 30))
    framed = with_margin(img, 0.7)
    assert framed.size == (200, 200)
    assert framed.getpixel((0, 0)) == (255, 255, 255)
    assert framed.getpixel((100, 100)) == (10, 20, 30)
    assert with_margin(img, 1.0) is img
    assert centre_square(Image.new("RGB", (300, 200)), 0.8).size == (160, 160)


def test_uncalibrated_pipeline_is_the_encoder_on_the_central_square(base):
    enc = QueryPipeline(base)
    assert enc.stamp == base.stamp
    assert enc.dim == base.dim
    assert enc.views == ("centre70",)  # the default of a base model: one view, one pass
    photos = [_photo(1), _photo(2)]
    central = base.embed(np.stack([base.prepare(centre_square(p, 0.7)) for p in photos]))
    np.testing.assert_allclose(enc.embed_queries(photos), central, atol=1e-6)
    # `full` is the encoder's own framing of the whole photo, as before the default changed
    whole = QueryPipeline(base, QualitySettings(query_views=("full",)))
    plain = base.embed(np.stack([base.prepare(p) for p in photos]))
    np.testing.assert_allclose(whole.embed_queries(photos), plain, atol=1e-6)
    assert not np.allclose(central, plain, atol=1e-3)
    assert all(letterbox_product(p) is None for p in photos)


def test_a_product_shot_the_crop_would_cut_is_letterboxed_first(base):
    tall = Image.new("RGB", (120, 240), (250, 250, 250))
    ImageDraw.Draw(tall).rectangle((30, 5, 90, 235), fill=(200, 10, 10))
    framed = letterbox_product(tall)
    assert framed is not None
    whole = base.embed(base.prepare(framed)[None])
    # with framing, a centre view, like `full`, sees the whole framed image
    for views in (None, ("full",), ("centre80",)):
        on = QualitySettings(query_views=views, frame_products=True)
        got = QueryPipeline(base, on).embed_queries([tall])
        np.testing.assert_allclose(got, whole, atol=1e-6)
    # a base model does not frame by default (a tuned one does: test_tune_sources)
    assert not QueryPipeline(base).frame
    off = QueryPipeline(base, QualitySettings(query_views=("full",)))
    np.testing.assert_allclose(off.embed_queries([tall]), base.embed(base.prepare(tall)[None]),
                               atol=1e-6)  # fmt: skip
    with pytest.raises(UsageError, match="frame_products"):
        QualitySettings(frame_products="yes")  # type: ignore[arg-type]


def test_every_centre_view_is_its_central_square(base):
    photo = _photo(3, (300, 200))
    for name in [v for v in QUERY_VIEWS if v.startswith("centre")]:
        percent = int(name[len("centre") :])
        assert 50 <= percent <= 95
        got = QueryPipeline(base, QualitySettings(query_views=(name,))).embed_queries([photo])
        want = base.embed(base.prepare(centre_square(photo, percent / 100))[None])
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_centre_made_with_other_views_is_still_used(base):
    photos = [_photo(s) for s in range(4)]
    whole = QueryPipeline(base, QualitySettings(query_views=("full",)))
    old = QueryCentre(whole.raw_query_views(photos).mean((0, 1)), base.stamp, 4, ("full",))
    enc = QueryPipeline(base)  # the default views, not the centre's
    enc.set_centre(old)
    assert enc.centre is old
    raw = enc.raw_query_views(photos[:2])[:, 0]
    expected = raw - old.mean
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(enc.embed_queries(photos[:2]), expected, atol=1e-5)


def test_views_are_summed_and_centring_subtracts_the_calibrated_mean(base, tmp_path):
    settings = QualitySettings(query_views=("full", "flip"))
    enc = QueryPipeline(base, settings)
    photos = [_photo(s) for s in range(3)]
    raw = enc.raw_query_views(photos)
    assert raw.shape == (3, 2, base.dim)
    flipped = base.embed(
        np.stack([base.prepare(p.transpose(Image.FLIP_LEFT_RIGHT)) for p in photos])
    )
    np.testing.assert_allclose(raw[:, 1], flipped, atol=1e-6)

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    np.testing.assert_allclose(enc.embed_queries(photos), unit(raw.sum(1)), atol=1e-5)

    for i, p in enumerate(photos):
        p.save(tmp_path / f"p{i}.png")  # lossless: the centre is exactly their mean
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    centre, failed = calibrate(enc, photo_paths([tmp_path]))
    assert centre.photos == 3
    assert len(failed) == 1 and "broken.jpg" in failed[0]
    assert centre.stamp == enc.stamp
    np.testing.assert_allclose(centre.mean, raw.reshape(-1, base.dim).mean(0), atol=1e-5)
    enc.set_centre(centre)
    expected = unit(unit(raw - centre.mean).sum(1))
    np.testing.assert_allclose(enc.embed_queries(photos), expected, atol=1e-5)
    # a centre from another vector space is refused, not silently used
    other = QueryCentre(centre.mean, "some-other-model", 3, ("full",))
    enc.set_centre(other)
    assert enc.centre is None


def test_photo_paths_reads_only_the_image_column(tmp_path):
    _photo(0).save(tmp_path / "a.jpg")
    (tmp_path / "list.csv").write_text("image,product_id\na.jpg,SECRET-LABEL\n")
    assert photo_paths([tmp_path / "list.csv"]) == [(tmp_path / "a.jpg").resolve()]
    (tmp_path / "bad.csv").write_text("path\na.jpg\n")
    with pytest.raises(MetadataError, match="image column"):
        photo_paths([tmp_path / "bad.csv"])
    with pytest.raises(InputPathError):
        photo_paths([tmp_path / "missing"])


def test_calibrate_command_changes_engine_queries(tmp_path, capsys):
    from lookalike.cli import main
    from lookalike.engine import Engine

    catalog = _catalog(tmp_path / "catalog", 3, 100, (200, 200))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        _photo(200 + i).save(photos / f"shop{i}.jpg")
    home = tmp_path / "home"
    assert (
        main(["--home", str(home), "-q", "index", "--metadata", str(catalog / "catalog.csv")]) == 0
    )
    query = photos / "shop0.jpg"
    with Engine(home) as engine:
        before = engine.embed_queries([query])
        assert query_pipeline(home, engine.encoder).centre is None
    capsys.readouterr()
    assert main(["--home", str(home), "calibrate", str(photos), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["photos"] == 4
    assert (home / CENTRE_FILE).is_file()
    with Engine(home) as engine:
        assert query_pipeline(home, engine.encoder).centre is not None
        after = engine.embed_queries([query])
        results = engine.search([query], k=3)[0]
    assert not np.allclose(before, after)
    assert sorted(r.product_id for r in results) == ["P0", "P1", "P2"]
    assert main(["--home", str(home), "calibrate", "--off"]) == 0
    assert not (home / CENTRE_FILE).exists()
    assert main(["--home", str(home), "calibrate"]) == 2  # no photos: a usage error
    with Engine(home) as engine:
        np.testing.assert_allclose(engine.embed_queries([query]), before, atol=1e-6)


def test_query_pipeline_follows_the_home_files(base, tmp_path):
    first = query_pipeline(tmp_path, base)
    assert query_pipeline(tmp_path, base) is first  # cached while nothing changes
    assert first.centre is None
    save_centre(
        tmp_path, QueryCentre(np.full(base.dim, 0.01, np.float32), base.stamp, 5, ("full",))
    )
    second = query_pipeline(tmp_path, base)
    assert second is not first and second.centre is not None
    (tmp_path / "quality.json").write_text(json.dumps({"centre": False}))
    third = query_pipeline(tmp_path, base)
    photo = [_photo(7)]
    plain = base.embed(np.stack([base.prepare(centre_square(photo[0], 0.7))]))
    np.testing.assert_allclose(third.embed_queries(photo), plain, atol=1e-6)
    assert not np.allclose(second.embed_queries(photo), plain, atol=1e-4)


def test_a_query_with_a_catalog_images_bytes_gets_its_stored_vector(tmp_path):
    """The default view crops every photo; a catalog image used as the query still finds
    itself first at score 1 through the content hash, and nothing else takes the shortcut."""
    from lookalike.engine import Engine

    catalog = _catalog(tmp_path / "catalog", 4, 300, (260, 200))
    home = tmp_path / "home"
    query = catalog / "c2.png"
    copy = tmp_path / "renamed.png"
    copy.write_bytes(query.read_bytes())
    with Engine(home) as engine:
        engine.index([], metadata=catalog / "catalog.csv", progress=False)
        (row,) = engine.catalog.images_of("P2")
        stored = engine.catalog.vectors([row.image_id])[0]
        pipeline = query_pipeline(home, engine.encoder)
        decoded = pipeline.embed_queries([Image.open(query).convert("RGB")])[0]
        assert not np.allclose(decoded, stored, atol=1e-3)  # the crop differs from the whole
        for source in (query, str(copy), query.read_bytes()):
            np.testing.assert_array_equal(engine.embed_queries([source])[0], stored)
            top = engine.search([source], k=1)[0][0]
            assert top.product_id == "P2" and top.score == pytest.approx(1.0, abs=1e-5)
        # a decoded image, or other bytes of the same picture, go through the pipeline
        np.testing.assert_allclose(engine.embed_queries([Image.open(query)])[0], decoded, atol=1e-6)
        other = tmp_path / "resaved.png"
        Image.open(query).save(other, compress_level=1)
        assert other.read_bytes() != query.read_bytes()
        np.testing.assert_allclose(engine.embed_queries([other])[0], decoded, atol=1e-6)
        # in a batch, each query on its own; with a centre stored the shortcut still holds
        save_centre(home, QueryCentre(np.full(engine.encoder.dim, 0.01, np.float32),
                                      pipeline.stamp, 5, ("centre70",)))  # fmt: skip
        mixed = engine.embed_queries([other, query])
        np.testing.assert_array_equal(mixed[1], stored)
        assert not np.allclose(mixed[0], decoded, atol=1e-4)  # centred
        with pytest.raises(InputPathError):
            engine.embed_queries([tmp_path / "missing.png"])
