"""`serve --keep-photos N`: the searched photos a server keeps, so the unlabelled stream
of a live shop can tune it later (`tune --photos HOME/query-photos`, `calibrate`).
Real grocery photos, the real app over a real engine, and a real `lookalike serve`."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lookalike.api import create_app
from lookalike.engine import Engine
from lookalike.keptphotos import KEPT_DIR, MAX_SIDE, KeptPhotos
from lookalike.query import photo_paths


def _photos(n: int, start: int = 0) -> list[Path]:
    from conftest import require_data

    grocery = require_data("grocery")
    with open(grocery / "train.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [grocery / r["image"] for r in rows[start::97][:n]]


def _key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _with_exif(path: Path) -> bytes:
    """The photo re-saved with an EXIF block a shopper's phone might write."""
    img = Image.open(path)
    exif = img.getexif()
    exif[0x013B] = "Jane Shopper"  # Artist
    exif[0x010F] = "PhoneMaker"  # Make
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95, exif=exif.tobytes())
    assert Image.open(io.BytesIO(out.getvalue())).getexif().get(0x013B) == "Jane Shopper"
    return out.getvalue()


def test_keeps_newest_once_each_without_metadata(tmp_path):
    kept = KeptPhotos(tmp_path / "kept", limit=3)
    start = datetime(2026, 12, 1, 23, 59, 58, tzinfo=UTC)
    paths = []
    for i, photo in enumerate(_photos(5)):
        img = Image.open(io.BytesIO(_with_exif(photo)))
        paths.append(kept.keep(img, _key(i), now=start + timedelta(seconds=i)))
    assert all(p is not None for p in paths)
    # the two oldest went, and the day folder they emptied with them
    assert sorted(kept.folder.rglob("*.jpg")) == paths[2:]
    assert sorted(p.name for p in kept.folder.iterdir()) == ["2026-12-02"]
    assert kept.count() == 3
    for path in paths[2:]:
        with Image.open(path) as saved:
            assert saved.format == "JPEG" and saved.mode == "RGB"
            assert not saved.getexif() and "exif" not in saved.info
    # the same key again is not kept twice, even by a new process reading the folder
    assert kept.keep(Image.open(_photos(1)[0]), _key(4)) is None
    again = KeptPhotos(kept.folder, limit=3)
    assert again.count() == 3
    assert again.keep(Image.open(_photos(1)[0]), _key(4)) is None
    # what tune --photos and calibrate read from the folder: the kept files
    assert photo_paths([kept.folder]) == paths[2:]


def test_two_servers_on_one_home_keep_the_limit_between_them(tmp_path):
    """Two processes serving one home (two KeptPhotos on one folder): the newest `limit`
    photos between them, each upload once, and both count what is on disk."""
    first, second = KeptPhotos(tmp_path / "kept", limit=3), KeptPhotos(tmp_path / "kept", limit=3)
    start = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    photos, paths = _photos(5), []
    for i, photo in enumerate(photos):
        server = first if i % 2 == 0 else second
        paths.append(server.keep(Image.open(photo), _key(i), now=start + timedelta(seconds=i)))
    assert sorted(first.folder.rglob("*.jpg")) == paths[2:]
    assert first.count() == second.count() == 3
    assert second.keep(Image.open(photos[4]), _key(4)) is None  # the first kept it already


def test_large_photos_shrink_and_zero_keeps_none(tmp_path):
    big = Image.open(_photos(1)[0]).convert("RGB").resize((3000, 2000))
    path = KeptPhotos(tmp_path / "k", 5).keep(big, "a" * 64)
    with Image.open(path) as saved:
        assert max(saved.size) == MAX_SIDE and saved.size == (MAX_SIDE, 683)
    off = KeptPhotos(tmp_path / "off", 0)
    assert off.keep(big, "b" * 64) is None and not off.folder.exists()
    with pytest.raises(Exception, match=">= 0"):
        KeptPhotos(tmp_path / "neg", -1)


def test_a_full_disk_is_logged_once_and_the_search_still_answers(indexed, tmp_path, caplog):
    """A folder that cannot be made (a file stands where it should be): keep returns None
    and logs once; the API's search answers 200 all the same."""
    home = _fresh_home(indexed, tmp_path)
    (home / KEPT_DIR).write_text("not a folder")
    with Engine.open(home) as engine:
        from fastapi.testclient import TestClient

        with TestClient(create_app(engine, api_key="", keep_photos=5)) as client:
            for photo in _photos(2):
                r = client.post("/search", files={"image": (photo.name, photo.read_bytes())})
                assert r.status_code == 200 and r.json()["results"]
    assert sum("cannot keep query photos" in m for m in caplog.messages) == 1


@pytest.fixture(scope="module")
def indexed(tmp_path_factory) -> Path:
    """The grocery catalog (81 products) indexed once for this file."""
    from conftest import require_data

    grocery = require_data("grocery")
    home = tmp_path_factory.mktemp("kept") / "home"
    with Engine.open(home) as engine:
        report = engine.index([], metadata=grocery / "catalog.csv", progress=False)
        assert report.ok, report.summary()
    return home


def _fresh_home(indexed: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(indexed, home)
    return home


def test_the_api_keeps_searched_photos_not_catalog_images(indexed, tmp_path):
    from conftest import require_data
    from fastapi.testclient import TestClient

    grocery = require_data("grocery")
    home = _fresh_home(indexed, tmp_path)
    with open(grocery / "catalog.csv", newline="") as fh:
        catalog_image = grocery / next(csv.DictReader(fh))["image"]
    photos = _photos(4)
    with Engine.open(home) as engine, TestClient(create_app(engine, keep_photos=10)) as c:

        def post(path: Path, **form) -> None:
            r = c.post("/search", files={"image": (path.name, path.read_bytes())}, data=form)
            assert r.status_code == 200, r.text

        for photo in photos[:3]:
            post(photo)
        post(photos[0])  # the same photo again: kept once
        post(photos[0], crop="50,60,200,180")  # the same photo cut: what was searched
        post(photos[3], q="apple")  # photo and words: the photo is kept too
        post(catalog_image)  # a catalog image's own bytes: the catalog, not a shopper
        r = c.post("/search", data={"q": "apple"})  # words alone: no photo to keep
        assert r.status_code == 200
        info = engine.info()
    kept = sorted((home / KEPT_DIR).rglob("*.jpg"))
    assert len(kept) == 5
    sizes = sorted(Image.open(p).size for p in kept)
    assert sizes == [(200, 180)] + [(348, 348)] * 4
    assert info["kept_photos"]["photos"] == 5


def test_serve_keeps_photos_that_calibrate_then_reads(indexed, tmp_path):
    """The whole loop through real processes: `lookalike serve` with
    LOOKALIKE_KEEP_PHOTOS, shoppers' searches over HTTP, then `calibrate` on the folder."""
    from live import lookalike
    from live_server import LiveServer

    home = _fresh_home(indexed, tmp_path)
    photos = _photos(14, start=5)
    with LiveServer(home, env={"LOOKALIKE_KEEP_PHOTOS": "12"}) as server:
        for photo in photos:
            r = httpx.post(
                server.url + "/search",
                files={"image": (photo.name, photo.read_bytes())},
                timeout=60,
            )
            assert r.status_code == 200, r.text
    kept = sorted((home / KEPT_DIR).rglob("*.jpg"))
    assert len(kept) == 12
    info = json.loads(lookalike("--home", str(home), "info", "--json").stdout)
    assert info["kept_photos"]["photos"] == 12
    done = lookalike("--home", str(home), "calibrate", str(home / KEPT_DIR), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["found"] == 12


def test_bad_keep_photos_settings_are_clear_errors(tmp_path, monkeypatch):
    from live import lookalike

    monkeypatch.setenv("LOOKALIKE_KEEP_PHOTOS", "lots")
    with pytest.raises(Exception, match="LOOKALIKE_KEEP_PHOTOS must be a whole number"):
        create_app(home=tmp_path / "h", api_key="")
    done = lookalike("--home", str(tmp_path / "h"), "serve", "--keep-photos", "-2")
    assert done.returncode != 0 and "--keep-photos must be >= 0" in done.stderr
    done = lookalike("--home", str(tmp_path / "h"), "serve", "--calibrate-every", "-1")
    assert done.returncode != 0 and "--calibrate-every must be >= 0" in done.stderr
    monkeypatch.setenv("LOOKALIKE_KEEP_PHOTOS", "0")
    monkeypatch.setenv("LOOKALIKE_CALIBRATE_EVERY", "50")
    with pytest.raises(Exception, match="needs --keep-photos"):
        create_app(home=tmp_path / "h", api_key="")


def test_serve_calibrates_again_on_the_photos_it_keeps(indexed, tmp_path):
    """`serve --keep-photos --calibrate-every`: no calibration before MIN_PHOTOS are kept,
    then one in a child process, whose centre the server's next searches use."""
    from live_server import LiveServer

    from lookalike.keptphotos import MIN_TO_CALIBRATE as MIN_PHOTOS
    from lookalike.query import CENTRE_FILE, QueryCentre

    home = _fresh_home(indexed, tmp_path)
    every = MIN_PHOTOS // 4
    photos = _all_photos()[: MIN_PHOTOS + every // 2]
    env = {"LOOKALIKE_KEEP_PHOTOS": str(2 * MIN_PHOTOS), "LOOKALIKE_CALIBRATE_EVERY": str(every)}
    with LiveServer(home, env=env) as server, httpx.Client(timeout=60) as client:

        def search(photo: Path) -> list[str]:
            r = client.post(
                server.url + "/search", files={"image": (photo.name, photo.read_bytes())}
            )
            assert r.status_code == 200, r.text
            return [x["product_id"] for x in r.json()["results"]]

        assert client.get(server.url + "/readyz").json()["calibrated_on"] is None
        for photo in photos[: MIN_PHOTOS - 1]:
            search(photo)
        time.sleep(1.0)
        assert not (home / CENTRE_FILE).exists()  # intervals passed, but too few photos
        before = search(photos[MIN_PHOTOS - 1])  # the MIN_PHOTOS-th kept: a calibration starts
        deadline = time.monotonic() + 240  # the child process has exited and been heard
        while "calibrated on" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (home / CENTRE_FILE).exists(), server.output()
        assert f"calibrated on {MIN_PHOTOS} photos, hub scores of" in server.output()
        centre = QueryCentre.load(home / CENTRE_FILE)
        assert centre.photos == MIN_PHOTOS and centre.hub_r is not None
        assert client.get(server.url + "/readyz").json()["calibrated_on"] == MIN_PHOTOS
        after = search(photos[MIN_PHOTOS - 1])  # kept already: no new count
        assert after != before  # the server scores with the new centre (and hub correction)
    with pytest.raises(Exception, match=f"at least {MIN_PHOTOS}"):
        create_app(home=home, api_key="", keep_photos=MIN_PHOTOS - 1, calibrate_every=10)


def _all_photos() -> list[Path]:
    from conftest import require_data

    grocery = require_data("grocery")
    with open(grocery / "train.csv", newline="") as fh:
        return [grocery / r["image"] for r in csv.DictReader(fh)][::3]


def test_the_calibration_child_runs_at_low_priority_and_stops_with_the_server(indexed, tmp_path):
    from lookalike.api.autolearn import NICE, AutoLearn
    from lookalike.keptphotos import MIN_TO_CALIBRATE as MIN_PHOTOS
    from lookalike.query import CENTRE_FILE

    home = _fresh_home(indexed, tmp_path)
    kept = KeptPhotos.of_home(home, MIN_PHOTOS)
    for i, photo in enumerate(_all_photos()[:MIN_PHOTOS]):
        assert kept.keep(Image.open(photo), _key(i))
    calibrating = AutoLearn(home, kept, calibrate_every=2)
    calibrating.photo_kept()
    assert calibrating._proc is None  # one new photo of two
    calibrating.photo_kept()
    proc = calibrating._proc
    assert proc is not None and proc.poll() is None
    assert os.getpriority(os.PRIO_PROCESS, proc.pid) == NICE
    calibrating.photo_kept()
    calibrating.photo_kept()
    assert calibrating._proc is proc  # one at a time
    calibrating.close()  # the server stops: the child is stopped, writes no centre
    assert proc.poll() is not None and not (home / CENTRE_FILE).exists()
    assert calibrating.runs["calibrate"] == 1 and calibrating.last["calibrate"] is None
