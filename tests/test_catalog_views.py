"""lookalike.models.views: catalog images embedded as the mean of their views, and power
normalisation of catalog and query vectors, on the real bundled INT8 encoder through the
Engine (ingest, the stamp guard, re-indexing, existing homes, the content hash shortcut,
queries, calibrated centres)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lookalike.calibration import calibrate_home, save_centre
from lookalike.encoders.runtime import l2_normalise
from lookalike.engine import Engine
from lookalike.errors import CatalogMismatchError, UsageError
from lookalike.models import base_of
from lookalike.models.views import (
    CATALOG_VIEWS,
    DEFAULT_CATALOG_VIEWS,
    DEFAULT_POWER,
    TURNED_VIEWS,
    CatalogViewEncoder,
    catalog_power_for,
    catalog_views_for,
    parse_stamp,
    query_encoder,
)
from lookalike.query import QualitySettings, QueryCentre, centre_square, query_pipeline


def _product(seed: int) -> Image.Image:
    """A studio shot: a coloured, asymmetric shape on a near-white background."""
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (220, 260), (245, 245, 240))
    draw = ImageDraw.Draw(img)
    colour = tuple(int(c) for c in rng.integers(0, 200, 3))
    x, y = int(rng.integers(20, 60)), int(rng.integers(20, 60))
    draw.polygon([(x, y), (x + 150, y + 30), (x + 60, y + 190)], fill=colour)
    draw.ellipse((x + 90, y + 120, x + 140, y + 170), fill=(colour[2], colour[0], 30))
    return img


def _catalog(folder: Path, n: int = 4, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    lines = ["product_id,image"]
    for i in range(n):
        _product(seed + i).save(folder / f"p{i}.png")
        lines.append(f"P{i},p{i}.png")
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalog.csv"


def _mean_of_views(base, img: Image.Image, views, power: float | None = None) -> np.ndarray:
    """What the catalog should store: the base's vectors of the image and of each view,
    averaged and normalised (computed one view at a time here), then sign(x)|x|^power."""
    shots = [img] + [CATALOG_VIEWS[v](img) for v in views]
    vectors = np.concatenate([base.embed(base.prepare(s)[None]) for s in shots])
    mean = l2_normalise(vectors.mean(axis=0, keepdims=True))[0]
    if power is None:
        return mean
    return l2_normalise((np.sign(mean) * np.abs(mean) ** power)[None])[0]


def test_views_and_which_a_home_uses():
    img = _product(3)
    turned = CATALOG_VIEWS["rot20"](img)
    assert turned.size == img.size
    assert turned.getpixel((0, 0)) == (245, 245, 240)  # corners: the background colour
    assert CATALOG_VIEWS["flip"](img).getpixel((219, 100)) == img.getpixel((0, 100))
    base = "m:1:crop260"
    # a new home: the image + its clockwise turn, signed square root
    assert catalog_views_for(None, None, base) == DEFAULT_CATALOG_VIEWS == ("rot-20",)
    assert catalog_power_for(None, None, base) == DEFAULT_POWER == 0.5
    # indexed before either existed: keeps its vectors (neither)
    assert catalog_views_for(None, base, base) == ()
    assert catalog_power_for(None, base, base) is None
    assert catalog_views_for(None, base + "+catalog:rot10,rot-10", base) == ("rot10", "rot-10")
    assert catalog_power_for(None, base + "+catalog:rot10,rot-10", base) is None
    assert parse_stamp(base + "+catalog:rot-20+power0.5", base) == (("rot-20",), 0.5)
    assert parse_stamp(base + "+power0.75", base) == ((), 0.75)
    for foreign in ("other:2:crop224", base + "+power2", base + "+catalog:zoom", base + "x"):
        assert parse_stamp(foreign, base) is None
    assert catalog_views_for(None, "other:2:crop224", base) == DEFAULT_CATALOG_VIEWS
    assert catalog_power_for(None, "other:2:crop224", base) == DEFAULT_POWER
    assert catalog_views_for(["flip"], base, base) == ("flip",)  # the setting wins
    assert catalog_views_for([], base + "+catalog:flip", base) == ()
    assert catalog_power_for(False, base + "+power0.5", base) is None
    assert catalog_power_for(0.75, base, base) == 0.75
    assert QualitySettings.from_dict({"catalog_views": ["flip"]}).catalog_views == ("flip",)
    for bad in (["zoom"], ["flip", "flip"], "flip"):
        with pytest.raises(UsageError, match="catalog_views"):
            QualitySettings(catalog_views=bad)
    for bad in (0, 1, 1.5, -0.5, True, "0.5"):
        with pytest.raises(UsageError, match="power_normalise"):
            QualitySettings(power_normalise=bad)


def _power(v: np.ndarray, p: float) -> np.ndarray:
    return l2_normalise((np.sign(v) * np.abs(v) ** p)[None])[0]


def test_a_new_home_embeds_the_image_and_its_turn_with_power_normalisation(tmp_path):
    """A new home's catalog vectors: the mean of the image and its clockwise 20-degree turn
    (two passes), power-normalised; its queries the base's central square, power-normalised
    the same way; a centre calibrated in the bare base space is not used."""
    csv_path = _catalog(tmp_path / "shop", n=3, seed=30)
    with Engine(tmp_path / "home") as engine:
        engine.index([], metadata=csv_path, progress=False)
        encoder = engine.encoder
        assert isinstance(encoder, CatalogViewEncoder)
        base = base_of(encoder)  # tuning trains on the bare base embedding
        assert "+" not in base.stamp and query_encoder(encoder) is not base
        assert encoder.stamp == base.stamp + "+catalog:rot-20+power0.5"
        assert query_encoder(encoder).stamp == base.stamp + "+power0.5"
        assert engine.catalog.get_meta("stamp") == encoder.stamp
        for i in range(3):
            (row,) = engine.catalog.images_of(f"P{i}")
            img = Image.open(tmp_path / "shop" / f"p{i}.png").convert("RGB")
            want = _mean_of_views(base, img, ("rot-20",), 0.5)
            np.testing.assert_allclose(engine.catalog.vectors([row.image_id])[0], want, atol=2e-5)
            plain = _mean_of_views(base, img, ("rot-20",))
            assert float(want @ plain) < 0.99  # the power changed it
            top = engine.search([tmp_path / "shop" / f"p{i}.png"], k=1)[0][0]
            assert top.product_id == f"P{i}" and top.score == pytest.approx(1.0, abs=1e-5)
        photo = _product(51).rotate(-8)
        raw = base.embed(base.prepare(centre_square(photo, 0.7))[None])[0]
        np.testing.assert_allclose(engine.embed_queries([photo])[0], _power(raw, 0.5), atol=1e-5)
        # the search ranks by the powered query against the powered catalog
        rows = {r.product_id: r.score for r in engine.search([photo], k=3)[0]}
        for i in range(3):
            (row,) = engine.catalog.images_of(f"P{i}")
            stored = engine.catalog.vectors([row.image_id])[0]
            assert rows[f"P{i}"] == pytest.approx(float(_power(raw, 0.5) @ stored), abs=1e-4)
        # a centre made in the bare base space is another space: not used
        save_centre(tmp_path / "home", QueryCentre(np.full(base.dim, 0.01, np.float32),
                                                   base.stamp, 5, ("centre70",)))  # fmt: skip
        assert query_pipeline(tmp_path / "home", encoder).centre is None
        photos = [tmp_path / "shop" / "p1.png", tmp_path / "shop" / "p2.png"]
        summary = calibrate_home(tmp_path / "home", encoder, photos)
        assert summary["stamp"] == base.stamp + "+power0.5"
        assert query_pipeline(tmp_path / "home", encoder).centre is not None


def test_an_existing_home_keeps_its_plain_vectors_without_reindex(tmp_path):
    """A home indexed before the default changed (bare base stamp, no quality.json) keeps
    searching its vectors with plain queries; it gets the new default only when it asks."""
    csv_path = _catalog(tmp_path / "shop", n=3, seed=40)
    home = tmp_path / "home"
    home.mkdir()
    (home / "quality.json").write_text(json.dumps({"catalog_views": [],
                                                  "power_normalise": False}))  # fmt: skip
    query = _product(41).rotate(6)
    with Engine(home) as engine:  # as a home indexed before the default changed
        engine.index([], metadata=csv_path, progress=False)
        old_stamp = engine.catalog.get_meta("stamp")
        assert not isinstance(engine.encoder, CatalogViewEncoder) and "+" not in old_stamp
        before = [(r.product_id, r.score) for r in engine.search([query], k=3)[0]]
    (home / "quality.json").unlink()
    with Engine(home) as engine:  # no setting: what the catalog was indexed with
        assert engine.encoder.stamp == old_stamp
        after = [(r.product_id, r.score) for r in engine.search([query], k=3)[0]]
        assert after == before
        again = engine.index([], metadata=csv_path, progress=False)
        assert again.encoded == 0 and engine.catalog.get_meta("stamp") == old_stamp
        # a new image added to that home is embedded as its others were
        _product(49).save(tmp_path / "shop" / "new.png")
        with open(csv_path, "a") as fh:
            fh.write("P7,new.png\n")
        assert engine.index([], metadata=csv_path, progress=False).encoded == 1
        (row,) = engine.catalog.images_of("P7")
        assert row.stamp == old_stamp
    (home / "quality.json").write_text(json.dumps({"power_normalise": 0.5}))
    with Engine(home) as engine:  # asking for the power: refused until re-indexed
        with pytest.raises(CatalogMismatchError, match="Re-run `lookalike index`"):
            engine.search([query], k=1)
        assert engine.index([], metadata=csv_path, progress=False).encoded == 4
        assert engine.catalog.get_meta("stamp") == old_stamp + "+power0.5"
        assert engine.search([query], k=1)[0][0].product_id in {f"P{i}" for i in (0, 1, 2, 7)}


def test_catalog_vectors_are_the_mean_of_their_views_and_queries_stay_the_base(tmp_path):
    csv_path = _catalog(tmp_path / "shop")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "quality.json").write_text(
        json.dumps({"catalog_views": TURNED_VIEWS, "power_normalise": False})
    )
    with Engine(tmp_path / "home") as engine:
        engine.index([], metadata=csv_path, progress=False)
        encoder = engine.encoder
        base = query_encoder(encoder)
        assert isinstance(encoder, CatalogViewEncoder) and base is not encoder
        assert base_of(encoder) is base  # tuning trains on the bare base model
        assert encoder.stamp == f"{base.stamp}+catalog:{','.join(TURNED_VIEWS)}"
        assert engine.catalog.get_meta("stamp") == encoder.stamp
        for i in range(4):
            (row,) = engine.catalog.images_of(f"P{i}")
            assert row.stamp == encoder.stamp
            stored = engine.catalog.vectors([row.image_id])[0]
            img = Image.open(tmp_path / "shop" / f"p{i}.png").convert("RGB")
            want = _mean_of_views(base, img, TURNED_VIEWS)
            np.testing.assert_allclose(stored, want, atol=2e-5)
            alone = base.embed(base.prepare(img)[None])[0]
            assert float(stored @ alone) < 0.999  # the views changed it
            # a catalog image as the query is its stored vector: itself first, at 1
            top = engine.search([tmp_path / "shop" / f"p{i}.png"], k=1)[0][0]
            assert top.product_id == f"P{i}" and top.score == pytest.approx(1.0, abs=1e-5)
        # another photo goes through the base model's query view, unchanged by the views
        photo = _product(50).rotate(5)
        want = base.embed(base.prepare(centre_square(photo, 0.7))[None])[0]
        np.testing.assert_allclose(engine.embed_queries([photo])[0], want, atol=1e-6)
        # a centre calibrated for the base model still applies: queries are its vectors
        save_centre(tmp_path / "home", QueryCentre(np.full(base.dim, 0.01, np.float32),
                                                   base.stamp, 5, ("centre70",)))  # fmt: skip
        assert query_pipeline(tmp_path / "home", encoder).centre is not None
        # a second run encodes nothing; a copy of an image's bytes reuses its vector
        again = engine.index([], metadata=csv_path, progress=False)
        assert again.encoded == 0 and again.unchanged == 4
        (tmp_path / "shop" / "copy.png").write_bytes((tmp_path / "shop" / "p1.png").read_bytes())
        with open(csv_path, "a") as fh:
            fh.write("P9,copy.png\n")
        more = engine.index([], metadata=csv_path, progress=False)
        assert more.reused == 1 and more.encoded == 0
        (copy,) = engine.catalog.images_of("P9")
        (first,) = engine.catalog.images_of("P1")
        vecs = engine.catalog.vectors([copy.image_id, first.image_id])
        np.testing.assert_array_equal(vecs[0], vecs[1])
        assert engine.remove(["P9"]) == 1
        found = {r.product_id for r in engine.search([photo], k=10)[0]}
        assert found == {f"P{i}" for i in range(4)}


def test_a_changed_setting_is_refused_until_reindexed_and_old_homes_keep_theirs(tmp_path):
    csv_path = _catalog(tmp_path / "shop", seed=10)
    home = tmp_path / "home"
    query = tmp_path / "shop" / "p2.png"
    (home).mkdir()
    (home / "quality.json").write_text(json.dumps({"catalog_views": [], "power_normalise": False}))
    with Engine(home) as engine:  # as a home indexed before catalog views existed
        engine.index([], metadata=csv_path, progress=False)
        base_stamp = engine.encoder.stamp
        assert "+catalog:" not in base_stamp
        (row,) = engine.catalog.images_of("P2")
        img = Image.open(query).convert("RGB")
        alone = engine.encoder.embed(engine.encoder.prepare(img)[None])[0]
        np.testing.assert_allclose(engine.catalog.vectors([row.image_id])[0], alone, atol=1e-6)
    (home / "quality.json").unlink()
    with Engine(home) as engine:  # no setting: the home keeps the vectors it has
        assert engine.encoder.stamp == base_stamp
        assert engine.search([query], k=1)[0][0].product_id == "P2"
    (home / "quality.json").write_text(json.dumps({"catalog_views": ["flip"]}))
    with Engine(home) as engine:  # a new setting: never mixed with the old vectors
        with pytest.raises(CatalogMismatchError, match="Re-run `lookalike index`"):
            engine.search([query], k=1)
        report = engine.index([], metadata=csv_path, progress=False)
        assert report.encoded == 4 and report.updated == 4
        (row,) = engine.catalog.images_of("P2")
        assert row.stamp == base_stamp + "+catalog:flip"
        want = _mean_of_views(query_encoder(engine.encoder), img, ("flip",))
        np.testing.assert_allclose(engine.catalog.vectors([row.image_id])[0], want, atol=2e-5)
        top = engine.search([query], k=1)[0][0]
        assert top.product_id == "P2" and top.score == pytest.approx(1.0, abs=1e-5)


def test_tune_and_reset_give_an_old_plain_home_back_its_plain_vectors(tmp_path):
    """A home indexed before the default changed, tuned, then reset: the base comes back
    with the catalog side it had (bare base stamp, vectors from the feature caches), not
    with a new home's views and power."""
    from lookalike.tuning import TuneSettings, reset, train_tuned_model

    csv_path = _catalog(tmp_path / "shop", n=4, seed=60)
    home = tmp_path / "home"
    home.mkdir()
    (home / "quality.json").write_text(json.dumps({"catalog_views": [], "power_normalise": False}))
    with Engine(home) as engine:
        engine.index([], metadata=csv_path, progress=False)
        plain = engine.catalog.get_meta("stamp")
    (home / "quality.json").unlink()  # as an old home: no setting, plain vectors
    lines = ["image,product_id"]
    for i in range(4):
        for k, angle in enumerate((-12, 9)):
            img = Image.open(tmp_path / "shop" / f"p{i}.png").rotate(angle, fillcolor=(90, 90, 90))
            img.save(tmp_path / "shop" / f"photo{i}_{k}.png")
            lines.append(f"photo{i}_{k}.png,P{i}")
    (tmp_path / "shop" / "labels.csv").write_text("\n".join(lines) + "\n")
    with Engine(home) as engine:
        assert engine.encoder.stamp == plain
        settings = TuneSettings(method="head", epochs=2, seed=0)
        report = train_tuned_model(
            engine, tmp_path / "shop" / "labels.csv", progress=False, settings=settings
        )
        assert engine.encoder.stamp == report.stamp != plain
        counts = reset(engine, progress=False)
        assert engine.encoder.stamp == plain == engine.catalog.get_meta("stamp")
        assert counts == {"from_cache": 4, "from_files": 0}
