"""One home, several processes, as a shop runs it: a nightly `lookalike index` beside a
running `lookalike serve` that takes API writes; a server killed with kill -9 in the
middle of writes; a vector store whose vectors disagree with the catalog. Real processes
(the CLI and `lookalike serve` as subprocesses), the real model, the real FAISS store."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_data
from live import Serve, check_home, lookalike, lookalike_bg

from lookalike.engine import Engine


def copy_images(files: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def footwear() -> list[Path]:
    return sorted(require_data("footwear300", "data").glob("*.jpg"))


def found(server: Serve, image: Path) -> bool:
    return any(r["product_id"] == image.stem and r["score"] > 0.99 for r in server.search(image))


def test_index_beside_serve_is_followed_and_nothing_is_lost(tmp_path: Path, footwear) -> None:
    home = tmp_path / "home"
    first = copy_images(footwear[:20], tmp_path / "first")
    nightly = copy_images(footwear[20:60], tmp_path / "nightly")
    api = footwear[60:72]
    assert lookalike("--home", str(home), "index", str(first)).returncode == 0
    with Serve(home, tmp_path / "serve.log") as server:
        assert found(server, footwear[0])
        job = lookalike_bg("--home", str(home), "index", str(nightly), log=tmp_path / "index.log")
        for image in api:  # the server's own writes, while the index runs
            got = server.add(image.stem, image)
            assert got.status_code == 201, got.text
        assert job.wait(600) == 0, (tmp_path / "index.log").read_text()
        done = time.monotonic()
        while not all(found(server, f) for f in footwear[20:60:5]):
            assert time.monotonic() - done < 10, "the server did not follow the index run"
            time.sleep(0.5)
        assert all(found(server, f) for f in footwear[20:60] + api)
        assert all(found(server, f) for f in footwear[:20])
    report = check_home(home, {f.stem for f in footwear[:72]})
    assert report["images"] == 72 and report["mismatched"] == 0
    assert report["min_cosine"] > 0.9999


def test_a_server_killed_mid_writes_then_an_index_leaves_every_vector_right(
    tmp_path: Path, footwear
) -> None:
    """The issue's sequence: API adds, kill -9 of the server, a CLI index of another
    folder; a stored vector ended up belonging to another image."""
    home = tmp_path / "home"
    start = copy_images(footwear[:10], tmp_path / "a")
    assert lookalike("--home", str(home), "index", str(start)).returncode == 0
    server = Serve(home, tmp_path / "serve.log")
    for image in footwear[10:16]:
        assert server.add(image.stem, image).status_code == 201
    server.kill()  # kill -9: nothing saved on the way out
    other = copy_images(footwear[16:30], tmp_path / "b")
    done = lookalike("--home", str(home), "index", str(other))
    assert done.returncode == 0, done.stderr
    report = check_home(home, {f.stem for f in footwear[:30]})
    assert report["images"] == 30 and report["mismatched"] == 0
    assert report["min_cosine"] > 0.9999


def test_a_store_vector_that_disagrees_with_the_catalog_is_repaired_on_open(
    tmp_path: Path, footwear
) -> None:
    home = tmp_path / "home"
    with Engine(home) as engine:
        engine.index(footwear[:12], progress=False)
        ids = np.sort(engine.store.ids())
        victim, donor = int(ids[3]), int(ids[7])
        # the store now says `victim` looks like `donor` (as a lost write would leave it)
        engine.store.add(np.array([victim]), engine.catalog.vectors([donor]))
        engine.store.save()
    with Engine(home) as engine:
        source = Path(engine.catalog.image(victim).source)
    got = lookalike("--home", str(home), "search", str(source), "-k", "1", "--json")
    assert got.returncode == 0, got.stderr
    assert f'"product_id": "{source.stem}"' in got.stdout
    report = check_home(home, {f.stem for f in footwear[:12]})
    assert report["mismatched"] == 0


def api_writes(server: Serve, stop, live: set, deleted: set, photos, rng) -> None:
    """Adds (75%) and deletes until stopped or the server dies; `live` and `deleted`
    hold what the server acknowledged."""
    try:
        while not stop.is_set():
            if live and rng.random() < 0.25:
                victim = sorted(live)[0]
                live.discard(victim)  # in flight: it may or may not survive a kill
                got = server.client.delete(f"/products/{victim}", headers=auth())
                if got.status_code == 204:
                    deleted.add(victim)
            else:
                photo = next(photos)
                if server.add(f"api-{photo.stem}", photo).status_code == 201:
                    live.add(f"api-{photo.stem}")
    except Exception:  # noqa: BLE001 - the server died under the request
        return


def test_api_writes_killed_at_random_points_lose_nothing_acknowledged(
    tmp_path: Path, footwear
) -> None:
    """kill -9 of the server in the middle of a stream of adds and deletes, three times:
    every write it answered survives, and every stored vector is its file's."""
    import random
    import threading

    home = tmp_path / "home"
    start = copy_images(footwear[:8], tmp_path / "a")
    assert lookalike("--home", str(home), "index", str(start)).returncode == 0
    rng = random.Random(7)
    photos = iter(footwear[8:200])
    live: set[str] = set()
    deleted: set[str] = set()
    for _ in range(3):
        server = Serve(home, tmp_path / "serve.log")
        page = server.client.get("/products", params={"limit": 500}).json()
        listed = {p["product_id"] for p in page["products"]}
        assert live <= listed and not deleted & listed
        live.clear()
        live.update(p for p in listed if p.startswith("api-"))
        stop = threading.Event()
        thread = threading.Thread(
            target=api_writes, args=(server, stop, live, deleted, photos, rng)
        )
        thread.start()
        time.sleep(rng.uniform(1.0, 3.0))
        server.kill()
        stop.set()
        thread.join(30)
    report = check_home(home)
    assert report["mismatched"] == 0 and report["min_cosine"] > 0.9999
    with Engine(home) as engine:
        products = {p.product_id for p in engine.list_products(limit=1000)[0]}
    assert live <= products and not deleted & products
    assert len(deleted) + len(live) > 3  # the writes did happen


def auth() -> dict:
    from live import API_KEY

    return {"Authorization": f"Bearer {API_KEY}"}
