"""`serve --keep-photos N --tune-every T`: a live server tunes its model on the photos it
keeps (`tune --photos HOME/query-photos` in a child process at nice 10), keeps the catalog
field its model was tuned on, leaves a model tuned on labels alone, and the server's
engine follows the new model without a restart. Real grocery photos, a real child
`lookalike tune`, a real engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from conftest import require_data
from PIL import Image
from test_tune import _write_csv, grocery_products

from lookalike.api import autolearn, create_app
from lookalike.api.autolearn import NICE, AutoLearn
from lookalike.api.routes.meta import tuned_on
from lookalike.engine import Engine
from lookalike.errors import ModelError
from lookalike.keptphotos import MIN_TO_TUNE, KeptPhotos
from lookalike.models import active_version, is_tuned, list_models, model_info, remove_model
from lookalike.query import CENTRE_FILE
from lookalike.tuning import TuneSettings, train_tuned_model

N_PRODUCTS = 8
PHOTOS_PER_PRODUCT = 6
FLOOR = N_PRODUCTS * PHOTOS_PER_PRODUCT  # the test's stand-in for MIN_TO_TUNE
QUICK = TuneSettings(method="head", epochs=2, seed=0)


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> dict:
    """A home with N_PRODUCTS grocery products (with their category), and shopper
    photos of them to keep."""
    root = require_data("grocery")
    out = tmp_path_factory.mktemp("auto-tune")
    chosen, by_product = grocery_products(root, N_PRODUCTS)
    rows = [{"product_id": r["product_id"], "image": str(root / r["image"]),
             "title": r["title"], "category": r["category"]} for r in chosen]  # fmt: skip
    catalog = _write_csv(out / "catalog.csv", ["product_id", "image", "title", "category"], rows)
    photos = [f for pid in sorted(by_product) for f in by_product[pid][:PHOTOS_PER_PRODUCT]]
    labels = [{"image": f, "product_id": pid} for pid in sorted(by_product)
              for f in by_product[pid][-2:]]  # fmt: skip
    home = out / "indexed"
    with Engine(home) as engine:
        assert engine.index([], metadata=catalog, progress=False).ok
    return {
        "home": home,
        "photos": [Path(p) for p in photos],
        "labels": _write_csv(out / "labels.csv", ["image", "product_id"], labels),
    }


def _home_with_kept(shop: dict, tmp_path: Path) -> tuple[Path, KeptPhotos]:
    import shutil

    home = tmp_path / "home"
    shutil.copytree(shop["home"], home)
    kept = KeptPhotos.of_home(home, FLOOR)
    for i, photo in enumerate(shop["photos"]):
        assert kept.keep(Image.open(photo), f"{i:016x}")
    return home, kept


def _finish(learning: AutoLearn) -> None:
    """Wait for the child under way to exit and be heard."""
    waiter = learning._waiter
    assert waiter is not None
    waiter.join(600)
    assert not waiter.is_alive() and learning._proc is None


def test_the_server_tunes_on_its_kept_photos_keeping_the_field_and_follows(
    shop, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(autolearn, "MIN_TO_TUNE", FLOOR)
    home, kept = _home_with_kept(shop, tmp_path)
    with Engine(home) as engine:  # the server's engine, open before and after the tune
        photo = str(shop["photos"][0])
        engine.search([photo], k=3)
        assert not is_tuned(engine.encoder)
        # the shop tuned it on its catalog's category before going live (as `make run` does)
        field_model = train_tuned_model(engine, field="category", progress=False, settings=QUICK)
        learning = AutoLearn(home, kept, tune_every=3)
        caplog.set_level(logging.INFO, logger="lookalike.api")
        learning.photo_kept()
        learning.photo_kept()
        assert learning._proc is None  # two new photos of three
        learning.photo_kept()
        proc = learning._proc
        assert proc is not None and os.getpriority(os.PRIO_PROCESS, proc.pid) == NICE
        assert proc.args[-5:] == ["--photos", str(kept.folder), "--json", "--field", "category"]
        learning.photo_kept()
        assert learning._proc is proc  # one child at a time
        _finish(learning)
        assert learning.runs["tune"] == 1, caplog.text
        version = active_version(home)
        assert version not in (None, field_model.version)
        assert learning.last["tune"]["version"] == version
        sources = model_info(home, version)["sources"]
        assert sources["used"] == ["photos", "field"]
        assert sources["photos"]["sources"] == [str(kept.folder)]
        assert sources["photos"]["photos"] == FLOOR
        assert sources["field"]["name"] == "category"
        assert f"tuned on {FLOOR} kept photos: model {version} is active" in caplog.text
        # /readyz names what the new model learned from before the server's engine has
        # loaded it (it follows at its next search)
        assert engine.encoder.version == field_model.version  # not followed yet
        assert tuned_on(home, version) == f"{FLOOR} unlabelled photos + category"
        engine.search([photo], k=3)
        assert is_tuned(engine.encoder) and engine.encoder.version == version

    # a tuned home is not calibrated automatically (autolearn.CALIBRATE_TUNED)
    monkeypatch.setattr(autolearn, "MIN_TO_CALIBRATE", FLOOR)
    calibrating = AutoLearn(home, kept, calibrate_every=1)
    calibrating.photo_kept()
    calibrating.photo_kept()
    assert calibrating._proc is None and not (home / CENTRE_FILE).exists()
    assert caplog.text.count("not calibrating: the home's model is tuned") == 1  # said once


def test_a_model_tuned_on_labels_is_not_replaced_by_pseudo_labels(
    shop, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(autolearn, "MIN_TO_TUNE", FLOOR)
    home, kept = _home_with_kept(shop, tmp_path)
    with Engine(home) as engine:
        labelled = train_tuned_model(engine, shop["labels"], progress=False, settings=QUICK)
    caplog.set_level(logging.INFO, logger="lookalike.api")
    learning = AutoLearn(home, kept, tune_every=1)
    learning.photo_kept()
    assert learning._proc is None and active_version(home) == labelled.version
    assert "was tuned on labelled photos; tune by hand with --labels" in caplog.text


def test_two_servers_on_one_home_learn_one_at_a_time(shop, tmp_path, monkeypatch, caplog):
    """Two servers on one home (two AutoLearn on one kept folder), both due: the child of
    the first holds the home's learning lock, the second waits until it has exited."""
    monkeypatch.setattr(autolearn, "MIN_TO_CALIBRATE", FLOOR)
    home, kept = _home_with_kept(shop, tmp_path)
    caplog.set_level(logging.INFO, logger="lookalike.api")
    first = AutoLearn(home, kept, calibrate_every=1)
    second = AutoLearn(home, KeptPhotos(kept.folder, FLOOR), calibrate_every=1)
    first.photo_kept()
    assert first._proc is not None
    second.photo_kept()
    second.photo_kept()
    assert second._proc is None
    assert caplog.text.count("another server on this home is calibrating or tuning") == 1
    _finish(first)
    assert first.runs["calibrate"] == 1 and first.last["calibrate"], caplog.text
    second.photo_kept()  # the lock went with the first child
    assert second._proc is not None
    _finish(second)
    assert second.last["calibrate"]["photos"] == FLOOR


def test_automatic_tunes_keep_their_newest_versions(shop, tmp_path, monkeypatch, caplog):
    """Each automatic tune saves a version; the older automatic ones go past
    KEEP_VERSIONS, a version tuned by hand on other photos stays, the active one cannot
    be removed."""
    monkeypatch.setattr(autolearn, "MIN_TO_TUNE", FLOOR)
    monkeypatch.setattr(autolearn, "KEEP_VERSIONS", 2)
    home, kept = _home_with_kept(shop, tmp_path)
    rows = [{"image": str(p)} for p in shop["photos"][::2]]
    by_hand = _write_csv(tmp_path / "mine.csv", ["image"], rows)
    with Engine(home) as engine:
        hand = train_tuned_model(engine, photos=[by_hand], progress=False, settings=QUICK)
    caplog.set_level(logging.INFO, logger="lookalike.api")
    learning = AutoLearn(home, kept, tune_every=1)
    made = []
    for _ in range(3):
        learning.photo_kept()
        _finish(learning)
        made.append(learning.last["tune"]["version"])
    assert len(set(made)) == 3 and active_version(home) == made[-1]
    assert [m["version"] for m in list_models(home)] == [hand.version, *made[1:]]
    assert f"removed 1 older automatic tune(s): {made[0]}" in caplog.text
    with pytest.raises(ModelError, match="is active"):
        remove_model(home, made[-1])


def test_a_failed_tune_is_logged_and_changes_nothing(shop, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(autolearn, "MIN_TO_TUNE", FLOOR)
    home, kept = _home_with_kept(shop, tmp_path)
    for photo in kept.folder.rglob("*.jpg"):  # every kept photo unreadable: nothing to learn
        photo.write_bytes(b"not a jpeg")
    caplog.set_level(logging.INFO, logger="lookalike.api")
    learning = AutoLearn(home, kept, tune_every=1)
    learning.photo_kept()
    _finish(learning)
    assert learning.runs["tune"] == 1 and learning.last["tune"] is None
    assert "tune failed (exit" in caplog.text and active_version(home) is None


def test_bad_tune_every_settings_are_clear_errors(shop, tmp_path, monkeypatch):
    from live import lookalike

    home = tmp_path / "h"
    with pytest.raises(Exception, match=f"needs --keep-photos .* of at least {MIN_TO_TUNE}"):
        create_app(home=home, api_key="", keep_photos=MIN_TO_TUNE - 1, tune_every=10)
    monkeypatch.setenv("LOOKALIKE_KEEP_PHOTOS", str(MIN_TO_TUNE))
    monkeypatch.setenv("LOOKALIKE_TUNE_EVERY", "10")
    with pytest.raises(Exception, match="cannot go with --model"):
        create_app(home=home, api_key="", model="efficientnet-lite0")
    monkeypatch.setenv("LOOKALIKE_TUNE_EVERY", "often")
    with pytest.raises(Exception, match="LOOKALIKE_TUNE_EVERY must be a whole number"):
        create_app(home=home, api_key="")
    done = lookalike("--home", str(home), "serve", "--tune-every", "-1")
    assert done.returncode != 0 and "--tune-every must be >= 0" in done.stderr
