"""The core on real images: ingest (incremental, bad files, metadata), product-level
search with filters, updates, removal, crash recovery and the CLI contract."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_data
from PIL import Image

from lookalike.catalog import Filters
from lookalike.cli import main as cli_main
from lookalike.encoders.runtime import int8_kernels
from lookalike.engine import DEFAULT_MODEL, Engine
from lookalike.errors import (
    CatalogMismatchError,
    InputPathError,
    MetadataError,
    UnknownProductError,
    UsageError,
)
from lookalike.metadata import read_metadata


def footwear_files(n: int) -> list[Path]:
    folder = require_data("footwear300", "data")
    return sorted(folder.glob("*.jpg"))[:n]


@pytest.fixture
def shop(tmp_path: Path) -> Path:
    """A writable shop folder: 24 footwear300 images in two sub-folders."""
    root = tmp_path / "shop"
    for i, src in enumerate(footwear_files(24)):
        dst = root / ("boots" if i % 2 else "heels") / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return root


@pytest.fixture(scope="module")
def fashion(tmp_path_factory) -> Engine:
    """60 fashion-footwear products with metadata (prices added by the test: the source
    has none), indexed once for the module."""
    folder = require_data("fashion-footwear")
    out = tmp_path_factory.mktemp("fashion")
    with open(folder / "catalog.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))[:60]
    meta = out / "products.csv"
    with open(meta, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0].keys(), "price", "in_stock"])
        writer.writeheader()
        for i, row in enumerate(rows):
            row["image"] = str(folder / row["image"])
            writer.writerow({**row, "price": 10 + i, "in_stock": "yes" if i % 3 else "no"})
    engine = Engine(out / "home")
    report = engine.index([], metadata=meta, progress=False)
    assert report.ok and report.added == 60
    yield engine
    engine.close()


def test_index_then_search_finds_the_image_itself(tmp_path: Path, shop: Path) -> None:
    engine = Engine(tmp_path / "home")
    report = engine.index([shop], progress=False)
    assert (report.added, report.unchanged, report.failed) == (24, 0, [])
    query = next((shop / "heels").iterdir())
    results = engine.search([query], k=5)[0]
    assert results[0].product_id == query.stem
    assert results[0].score == pytest.approx(1.0, abs=1e-4)
    assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
    assert len({r.product_id for r in results}) == 5
    info = engine.info()
    assert info["products"] == 24 and info["images"] == 24 and info["model"] == DEFAULT_MODEL
    assert info["vector_store"]["vectors"] == 24
    engine.close()


def test_second_run_encodes_nothing_and_changes_are_picked_up(tmp_path: Path, shop: Path) -> None:
    engine = Engine(tmp_path / "home")
    engine.index([shop], progress=False)
    again = engine.index([shop], progress=False)
    assert (again.added, again.updated, again.unchanged, again.encoded) == (0, 0, 24, 0)

    files = sorted((shop / "heels").iterdir())
    changed, deleted = files[0], files[1]
    Image.open(files[2]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(changed)
    deleted.unlink()
    third = engine.index([shop], progress=False)
    assert (third.updated, third.removed, third.unchanged, third.encoded) == (1, 1, 22, 1)
    assert engine.catalog.find_product(deleted.stem) is None
    top = engine.search([changed], k=1)[0][0]
    assert top.product_id == changed.stem and top.score == pytest.approx(1.0, abs=1e-4)
    engine.close()


def test_reencode_redoes_vectors_an_unchanged_run_keeps(tmp_path: Path, shop: Path) -> None:
    """`index --reencode`: a home whose vectors were computed wrongly under the right
    stamp (INT8 on a CPU without VNNI before sessions asked for exact arithmetic) gets
    them made again; a plain re-run keeps them, since nothing it can see changed."""
    home = tmp_path / "home"
    engine = Engine(home)
    engine.index([shop], progress=False)
    rows = [row for batch in engine.catalog.iter_images() for row in batch]
    ids = np.array([row.image_id for row in rows], dtype=np.int64)
    good = engine.catalog.vectors(ids.tolist())
    rng = np.random.default_rng(0)
    drifted = good + 0.3 * rng.standard_normal(good.shape).astype(np.float32)
    drifted /= np.linalg.norm(drifted, axis=1, keepdims=True)
    for row, vec in zip(rows, drifted, strict=True):
        engine.catalog.put_image(row.product_id, row.source, row.sha256, vec, row.stamp)
    engine.store.add(ids, drifted)
    query = next((shop / "heels").iterdir())

    plain = engine.index([shop], progress=False)
    assert (plain.unchanged, plain.encoded) == (24, 0)
    assert (engine.catalog.vectors(ids.tolist()) * good).sum(axis=1).max() < 0.99
    assert (engine.store.get(ids) * good).sum(axis=1).max() < 0.99
    engine.close()

    assert cli_main(["--home", str(home), "-q", "index", str(shop), "--reencode"]) == 0
    engine = Engine(home)
    assert np.allclose(engine.catalog.vectors(ids.tolist()), good, atol=1e-5)
    top = engine.search([query], k=1)[0][0]
    assert top.product_id == query.stem and top.score == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(engine.store.get(ids), good, atol=1e-5)
    again = engine.index([shop], progress=False, reencode=True)
    assert (again.updated, again.encoded, again.added, again.unchanged) == (24, 24, 0, 0)
    assert engine.info()["vector_store"]["vectors"] == 24
    engine.close()


def test_bad_files_are_reported_and_skipped(tmp_path: Path, shop: Path) -> None:
    bad = shop / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "notes.png").write_text("this is not an image")
    data = footwear_files(1)[0].read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 3])
    Image.new("1", (30000, 30000)).save(bad / "bomb.png")  # 900 Mpx, a few KB on disk
    engine = Engine(tmp_path / "home")
    report = engine.index([shop], progress=False)
    failed = {Path(p).name: reason for p, reason in report.failed}
    assert set(failed) == {"empty.jpg", "notes.png", "truncated.jpg", "bomb.png"}
    assert "empty" in failed["empty.jpg"]
    assert "pixels" in failed["bomb.png"].lower() or "large" in failed["bomb.png"].lower()
    assert report.added == 24 and not report.ok
    assert engine.catalog.count_images() == 24
    engine.close()
    # the CLI says so with its documented exit status, and keeps everything indexed
    assert cli_main(["--home", str(tmp_path / "home"), "-q", "index", str(shop)]) == 8
    assert Engine(tmp_path / "home").catalog.count_images() == 24


def test_metadata_products_with_several_images_come_back_once(tmp_path: Path) -> None:
    files = footwear_files(9)
    meta = tmp_path / "products.csv"
    rows = ["product_id,image,title,category,price,in_stock,colour"]
    for i, f in enumerate(files):
        pid = f"P{i // 3}"  # three images per product
        rows.append(f"{pid},{f},Shoe {i // 3},cat{i // 3},{10 * (i // 3 + 1)},yes,red")
    meta.write_text("\n".join(rows) + "\n")
    engine = Engine(tmp_path / "home")
    report = engine.index([], metadata=meta, progress=False)
    assert report.added == 9 and engine.catalog.count_products() == 3
    results = engine.search([files[4]], k=10)[0]
    assert [r.product_id for r in results][0] == "P1"
    assert sorted(r.product_id for r in results) == ["P0", "P1", "P2"]
    assert results[0].image == str(files[4]) and results[0].title == "Shoe 1"
    assert results[0].price == 20.0 and results[0].attributes == {"colour": "red"}
    engine.close()


def test_filters_never_lose_results(fashion: Engine) -> None:
    query = fashion.catalog.images_of(fashion.list_products(limit=1)[0][0].product_id)[0].source
    casual = Filters(category="Casual Shoes")
    expected = fashion.catalog.image_ids_matching(casual).size
    assert 0 < expected < 10
    results = fashion.search([query], k=10, filters=casual)[0]
    assert len(results) == expected and all(r.category == "Casual Shoes" for r in results)

    cheap_in_stock = Filters(price_max=20, in_stock=True)
    results = fashion.search([query], k=50, filters=cheap_in_stock)[0]
    assert results and all(r.price <= 20 and r.in_stock for r in results)
    assert len(results) == fashion.catalog.image_ids_matching(cheap_in_stock).size

    black = Filters(attrs={"colour": "Black", "year": "2012"})
    results = fashion.search([query], k=50, filters=black)[0]
    for r in results:
        assert r.attributes["colour"] == "Black" and str(r.attributes["year"]) == "2012"
    assert fashion.search([query], k=5, filters=Filters(category="No such"))[0] == []
    with pytest.raises(UsageError):
        fashion.search([query], k=5, filters=Filters(price_min=5, price_max=1))
    with pytest.raises(UsageError):
        fashion.search([query], k=0)


def test_metadata_edits_update_without_reencoding(tmp_path: Path) -> None:
    files = footwear_files(4)
    meta = tmp_path / "p.csv"
    meta.write_text(
        "product_id,image,title,price,in_stock\n"
        + "".join(f"S{i},{f},Old {i},5,yes\n" for i, f in enumerate(files))
    )
    engine = Engine(tmp_path / "home")
    engine.index([], metadata=meta, progress=False)
    meta.write_text(
        "product_id,image,title,price,in_stock\n"
        + "".join(f"S{i},{f},New {i},7.5,no\n" for i, f in enumerate(files[:3]))
    )
    report = engine.index([], metadata=meta, progress=False)
    assert report.encoded == 0 and report.removed == 1  # S3 left the file
    product = engine.catalog.get_product("S0")
    assert (product.title, product.price, product.in_stock) == ("New 0", 7.5, False)
    assert engine.catalog.find_product("S3") is None
    engine.close()


def test_malformed_metadata_rows_are_reported_with_file_and_line(tmp_path: Path) -> None:
    f = footwear_files(1)[0]
    meta = tmp_path / "p.csv"
    meta.write_text(
        f"product_id,image,price,in_stock\nA,{f},1,yes\nB,{f},cheap,yes\n,{f},1,yes\nC,{f},2,maybe\n"
    )
    parsed = read_metadata(meta)
    assert list(parsed.products) == ["A"]
    assert [e.split(": ")[0] for e in parsed.errors] == [f"{meta}:3", f"{meta}:4", f"{meta}:5"]
    assert "price" in parsed.errors[0] and "in_stock" in parsed.errors[2]
    (tmp_path / "nohead.csv").write_text("sku,picture\nA,a.jpg\n")
    with pytest.raises(MetadataError, match="product_id,image"):
        read_metadata(tmp_path / "nohead.csv")
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"product_id": "J", "image": str(f), "price": 3}) + "\n{oops\n")
    parsed = read_metadata(jsonl)
    assert parsed.products["J"].price == 3.0 and parsed.errors[0].startswith(f"{jsonl}:2:")


def test_remove_is_immediate_and_unknown_ids_remove_nothing(tmp_path: Path, shop: Path) -> None:
    engine = Engine(tmp_path / "home")
    engine.index([shop], progress=False)
    query = next((shop / "boots").iterdir())
    assert engine.search([query], k=1)[0][0].product_id == query.stem
    with pytest.raises(UnknownProductError, match="nope"):
        engine.remove([query.stem, "nope"])
    assert engine.catalog.find_product(query.stem) is not None
    engine.remove([query.stem])
    assert query.stem not in [r.product_id for r in engine.search([query], k=24)[0]]
    engine.close()
    reopened = Engine(tmp_path / "home")  # and it stays removed after a restart
    assert query.stem not in [r.product_id for r in reopened.search([query], k=24)[0]]
    assert len(reopened.search([query], k=100)[0]) == 23
    reopened.close()


def test_lost_vector_index_is_rebuilt_from_the_catalog(tmp_path: Path, shop: Path) -> None:
    engine = Engine(tmp_path / "home")
    engine.index([shop], progress=False)
    engine.close()
    shutil.rmtree(tmp_path / "home" / "vectors")
    engine = Engine(tmp_path / "home")
    query = next((shop / "heels").iterdir())
    assert engine.search([query], k=1)[0][0].product_id == query.stem
    assert len(engine.store) == 24
    engine.close()


def test_killed_ingest_resumes_and_stays_consistent(tmp_path: Path) -> None:
    folder = require_data("fashion-footwear", "images")
    shop = tmp_path / "shop"
    shop.mkdir()
    for src in sorted(folder.glob("*.jpg"))[:400]:
        os.symlink(src, shop / src.name)
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "lookalike", "--home", str(home), "-q", "index", str(shop)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(home / "catalog.sqlite") as db:
                done = db.execute("SELECT COUNT(*) FROM images").fetchone()[0]
        except sqlite3.Error:
            continue
        if done >= 48:
            break
    if proc.poll() is not None:
        pytest.fail("indexing finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    engine = Engine(home)
    committed = engine.catalog.count_images()
    assert 48 <= committed < 400
    report = engine.index([shop], progress=False)
    assert report.unchanged == committed and report.added == 400 - committed
    assert sorted(engine.store.ids().tolist()) == sorted(
        engine.catalog.embedded_ids(engine.encoder.stamp).tolist()
    )
    assert len(engine.store) == 400
    engine.close()


def test_cli_search_json_sheet_and_exit_statuses(tmp_path: Path, shop: Path, capsys) -> None:
    home = str(tmp_path / "home")
    assert cli_main(["--home", home, "-q", "index", str(shop)]) == 0
    capsys.readouterr()
    queries = [str(p) for p in sorted((shop / "heels").iterdir())[:2]]
    sheet = tmp_path / "sheet.png"
    assert (
        cli_main(["--home", home, "search", *queries, "-k", "3", "--json", "--sheet", str(sheet)])
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["query"] for line in lines] == queries
    first = lines[0]["results"][0]
    assert set(first) >= {"product_id", "score", "image", "title", "category", "price", "in_stock"}
    assert first["product_id"] == Path(queries[0]).stem and len(lines[0]["results"]) == 3
    with Image.open(sheet) as img:
        assert img.width > 4 * 150 and img.height > 2 * 150
    assert cli_main(["--home", home, "search", str(tmp_path / "missing.jpg")]) == 3
    (tmp_path / "bad.jpg").write_text("no")
    assert cli_main(["--home", home, "search", str(tmp_path / "bad.jpg")]) == 4
    assert cli_main(["--home", home, "remove", "nope"]) == 6
    assert cli_main(["--home", home, "index", str(tmp_path / "nowhere")]) == 3
    assert cli_main(["--home", home, "search", queries[0], "--where", "colour"]) == 2
    capsys.readouterr()
    assert cli_main(["--home", home, "info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["products"] == 24 and info["images"] == 24
    assert info["cpu"]["cores"] >= 1 and info["cpu"]["int8"] == int8_kernels()
    assert cli_main(["--home", home, "info"]) == 0
    assert f"cpu: cores={info['cpu']['cores']}, int8={int8_kernels()}" in capsys.readouterr().out


def test_home_comes_from_environment(tmp_path: Path, shop: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LOOKALIKE_HOME", str(tmp_path / "envhome"))
    assert cli_main(["-q", "index", str(shop / "heels")]) == 0
    assert (tmp_path / "envhome" / "catalog.sqlite").exists()
    capsys.readouterr()
    assert cli_main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["products"] == 12


@pytest.mark.parametrize("model", ["efficientnet-lite0", "efficientnet-lite2"])
def test_search_with_another_model_than_the_catalog_is_refused(
    tmp_path: Path, shop: Path, model: str
) -> None:
    engine = Engine(tmp_path / "home")
    engine.index([shop / "heels"], progress=False)
    engine.close()
    other = Engine(tmp_path / "home", model=model)
    with pytest.raises(CatalogMismatchError, match="Re-run `lookalike index`"):
        other.search([next((shop / "heels").iterdir())], k=3)
    # indexing with the new model re-embeds everything, and then search works
    report = other.index([shop / "heels"], progress=False)
    assert report.updated == 12 and report.encoded == 12
    assert other.info()["model"] == model
    assert np.isclose(
        other.search([next((shop / "heels").iterdir())], k=1)[0][0].score, 1, atol=1e-4
    )
    other.close()


def test_unreadable_paths_are_clear_errors(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "home")
    with pytest.raises(InputPathError, match="no such file"):
        engine.index([tmp_path / "missing"], progress=False)
    with pytest.raises(InputPathError, match="metadata file not found"):
        engine.index([], metadata=tmp_path / "missing.csv", progress=False)
    engine.close()


def test_a_serving_engine_follows_a_model_switch_made_elsewhere(tmp_path: Path, shop: Path) -> None:
    heels = shop / "heels"
    query = next(heels.iterdir())
    serving = Engine(tmp_path / "home")
    serving.index([heels], progress=False)
    before = serving.encoder.stamp
    assert serving.search([query], k=1)[0][0].product_id == query.stem
    other = Engine(tmp_path / "home", model="efficientnet-lite0")  # e.g. another process
    other.index([heels], progress=False)
    other.close()
    top = serving.search([query], k=1)[0][0]  # no CatalogMismatchError: it reloads
    assert serving.encoder.stamp != before
    assert serving.encoder.stamp == serving.catalog.get_meta("stamp")
    assert top.product_id == query.stem and top.score == pytest.approx(1.0, abs=1e-4)
    serving.close()
