"""Words search (issue 14): the FTS5 words index in the catalog (stemming, prefixes,
BM25 order, filters, crash consistency, migration, no rebuild when nothing changed) and
its fusion with the visual ranking on real fashion-footwear images."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, fashion_products, require_data

from lookalike import fusion, textindex
from lookalike.catalog import _SCHEMA, Catalog, Filters, Product
from lookalike.engine import Engine
from lookalike.errors import UsageError
from lookalike.search import rank_products


def words_catalog(path: Path) -> Catalog:
    catalog = Catalog(path)
    rows = [
        Product("p1", "Catwalk Women Red Heels", "Heels", 40.0, True, {"colour": "Red"}),
        Product("p2", "Rocia Women Black Stilettos", "Heels", 55.0, True, {"colour": "Black"}),
        Product("p3", "HM Women Red Flats", "Flats", 20.0, False, {"colour": "Red"}),
        Product("p4", "Puma Women Sneakers", "Sports Shoes", 70.0, True, {"colour": "Red"}),
        Product("p5", "Café Crème Ballerinas", "Flats", 30.0, True, {"colour": "Beige"}),
        Product("p6", "Nike Women Heeled Sandals", "Sandals", 35.0, True,
                {"colour": "Blue", "tags": ["summer", "beach"]}),
    ]  # fmt: skip
    with catalog.transaction():
        for product in rows:
            catalog.upsert_product(product)
    return catalog


def ids(results) -> list[str]:
    return [hit.product_id for hit in results.hits]


def test_stemming_folding_and_prefixes(tmp_path: Path) -> None:
    catalog = words_catalog(tmp_path / "c.sqlite")
    heel = catalog.text_search("heel", 10)
    # "heel" finds "Heels" (title and category) and "Heeled"
    assert set(ids(heel)) == {"p1", "p2", "p6"}
    assert heel.hits[0].matched == ["heel"]
    assert ids(catalog.text_search("HEELS", 10)) == ids(heel)
    assert ids(catalog.text_search("cafe creme", 10)) == ["p5"]  # diacritics folded
    assert ids(catalog.text_search("stilet", 10)) == ["p2"]  # not a word: a prefix
    assert ids(catalog.text_search("beach", 10)) == ["p6"]  # nested attribute values
    assert catalog.text_search("zzzz", 10).hits == []
    with pytest.raises(UsageError):
        catalog.text_search("  !! ", 10)
    with pytest.raises(UsageError):
        catalog.text_search("x" * 2000, 10)


def test_bm25_order_all_words_first_then_some(tmp_path: Path) -> None:
    catalog = words_catalog(tmp_path / "c.sqlite")
    found = catalog.text_search("red heels", 10)
    order = ids(found)
    assert order[0] == "p1"  # both words, in title and category
    both = [h.product_id for h in found.hits if len(h.matched) == 2]
    assert both == ["p1"]
    # then products with one of the words: Heels in title+category before a red
    # colour attribute only
    assert order.index("p2") < order.index("p4")
    scores = [h.score for h in found.hits]
    assert scores == sorted(scores, reverse=True) and 0 < scores[-1] <= scores[0] <= 1
    assert found.hits[0].matched == ["red", "heels"]
    assert set(catalog.text_search("red", 10).hits[0].matched) == {"red"}
    # the category column weighs more than an attribute value
    reds = catalog.text_search("red", 10)
    assert {h.product_id for h in reds.hits} == {"p1", "p3", "p4"}
    assert reds.hits[-1].product_id == "p4"  # red only as colour, not in the title


def test_words_with_filters(tmp_path: Path) -> None:
    catalog = words_catalog(tmp_path / "c.sqlite")
    assert ids(catalog.text_search("red", 10, Filters(category="Flats"))) == ["p3"]
    assert ids(catalog.text_search("red", 10, Filters(in_stock=True, price_max=50))) == ["p1"]
    found = catalog.text_search("women", 10, Filters(attrs={"colour": "Red"}, price_min=30))
    assert set(ids(found)) == {"p1", "p4"}
    assert catalog.text_search("red", 10, Filters(category="Sandals")).hits == []
    report = fusion.words_alone(catalog, "red heels", k=5, filters=Filters(category="Heels"))
    assert report.results == []  # products without images are not results


def test_writes_keep_the_words_index_in_step(tmp_path: Path) -> None:
    catalog = words_catalog(tmp_path / "c.sqlite")
    catalog.update_product("p4", {"title": "Puma Women Running Shoes"})
    assert ids(catalog.text_search("sneakers", 10)) == []
    assert ids(catalog.text_search("running", 10)) == ["p4"]
    catalog.update_product("p4", {"attributes": {"material": "Mesh"}})
    assert ids(catalog.text_search("mesh", 10)) == ["p4"]
    catalog.remove_products(["p1"])
    assert "p1" not in ids(catalog.text_search("red heels", 10))
    state = catalog.check_text_index()
    assert state == {"products": 5, "indexed": 5, "missing": [], "extra": []}


def test_an_old_catalog_gets_its_words_index_built_once(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # a schema-1 catalog, as lookalike wrote it before
        db.executescript(_SCHEMA)
        db.execute("INSERT INTO meta VALUES('schema_version', '1')")
        db.executemany(
            "INSERT INTO products(product_id, title, category, attributes) VALUES(?,?,?,?)",
            [("a", "Catwalk Red Heels", "Heels", '{"colour": "Red"}'),
             ("b", "HM Blue Flats", "Flats", '{"colour": "Blue"}')],
        )  # fmt: skip
    catalog = Catalog(path)
    assert catalog.get_meta("schema_version") == "2"
    assert ids(catalog.text_search("heel", 10)) == ["a"]
    assert catalog.check_text_index()["indexed"] == 2
    catalog.close()
    before = _index_state(path)
    Catalog(path).close()  # opening again builds nothing
    assert _index_state(path) == before


def _index_state(path: Path) -> tuple:
    with sqlite3.connect(path) as db:
        return (
            db.execute("SELECT * FROM text_docs ORDER BY doc").fetchall(),
            db.execute("SELECT * FROM products_text_data ORDER BY id").fetchall(),
        )


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Engine:
    """300 fashion-footwear products with their metadata, indexed once."""
    out = tmp_path_factory.mktemp("words")
    fashion_products(out / "products.csv", 300, price=lambda i: 10 + i % 50)
    engine = Engine(out / "home")
    report = engine.index([], metadata=out / "products.csv", progress=False)
    assert report.ok and report.added == 300
    yield engine
    engine.close()


def test_unchanged_reindex_does_not_touch_the_words_index(shop: Engine) -> None:
    products = shop.home.parent / "products.csv"
    before = _index_state(shop.catalog.path)
    report = shop.index([], metadata=products, progress=False)
    assert report.unchanged == 300 and report.added == 0
    assert _index_state(shop.catalog.path) == before
    # a changed title is searchable at once; only that product's words changed
    rows = products.read_text().splitlines()
    header, first = rows[0], rows[1].split(",")
    first[2] = "Zanzibar Women Red Heels"
    edited = shop.home.parent / "edited.csv"
    edited.write_text("\n".join([header, ",".join(first), *rows[2:]]) + "\n")
    report = shop.index([], metadata=edited, progress=False)
    assert report.unchanged == 300 and report.changed_products == [first[0]]
    assert [r.product_id for r in fusion.words_alone(shop.catalog, "zanzibar").results] == [
        first[0]
    ]
    docs_before, _ = before
    docs_after, _ = _index_state(shop.catalog.path)
    assert docs_after == docs_before
    shop.index([], metadata=products, progress=False)  # back as it was


def test_photo_and_words_refine_the_photo(shop: Engine) -> None:
    stiletto = require_data("footwear300", "search_image_01.jpg")
    query = shop.embed_queries([stiletto])
    photo = rank_products(shop.catalog, shop.store, query, 10)[0]
    both = fusion.photo_and_words(shop.catalog, shop.store, query, "heels", k=10)[0]
    assert both.mode == "both" and both.words == ["heels"] and both.unmatched == []
    assert len(both.results) == 10
    assert all(r.category == "Heels" for r in both.results)
    assert sum(r.category == "Heels" for r in photo) < 10
    for r in both.results:
        assert r.matched == ["heels"] and r.visual is not None and 0 < r.text <= 1
        row = r.to_dict()
        assert {"product_id", "score", "image", "visual", "text", "combined", "matched"} <= set(row)
        assert row["combined"] == row["score"]
    combined = [r.score for r in both.results]
    assert combined == sorted(combined, reverse=True)
    # text_weight 0 is the photo alone
    alone = fusion.photo_and_words(shop.catalog, shop.store, query, "heels", 10, text_weight=0)
    assert [r.product_id for r in alone[0].results] == [r.product_id for r in photo]
    with pytest.raises(UsageError):
        fusion.photo_and_words(shop.catalog, shop.store, query, "heels", 10, text_weight=2)
    # filters hold with words
    cheap = Filters(price_max=20)
    filtered = fusion.photo_and_words(shop.catalog, shop.store, query, "heels", 10, cheap)[0]
    assert filtered.results and all(r.price <= 20 for r in filtered.results)
    # min_score applies to the combined score
    floor = combined[4]
    capped = fusion.photo_and_words(shop.catalog, shop.store, query, "heels", 10, min_score=floor)
    assert [r.score for r in capped[0].results] == combined[:5]


def test_words_that_match_nothing_keep_the_photo_results(shop: Engine) -> None:
    stiletto = require_data("footwear300", "search_image_01.jpg")
    query = shop.embed_queries([stiletto])
    photo = rank_products(shop.catalog, shop.store, query, 10)[0]
    report = fusion.photo_and_words(shop.catalog, shop.store, query, "qwertyuiop", k=10)[0]
    assert [r.product_id for r in report.results] == [r.product_id for r in photo]
    assert report.unmatched == ["qwertyuiop"] and "qwertyuiop" in report.note
    assert report.to_dict()["note"] == report.note
    # words no product passing the filters has: the filtered photo results
    flats = Filters(category="Flats")
    report = fusion.photo_and_words(shop.catalog, shop.store, query, "heels stiletto", 5, flats)
    assert report[0].results and all(r.category == "Flats" for r in report[0].results)


def test_words_alone_with_images_and_scores(shop: Engine) -> None:
    report = fusion.words_alone(shop.catalog, "red heels", k=10)
    assert report.mode == "words" and len(report.results) == 10
    top = report.results[:5]
    assert all(r.category == "Heels" and r.attributes["colour"] == "Red" for r in top)
    assert all(Path(r.image).is_file() and r.visual is None for r in report.results)
    both = [len(r.matched) == 2 for r in report.results]
    assert all(both[:5]) and both == sorted(both, reverse=True)
    cheap = fusion.words_alone(shop.catalog, "heels", k=50, filters=Filters(price_max=15))
    assert cheap.results and all(r.price <= 15 and r.category for r in cheap.results)
    none = fusion.words_alone(shop.catalog, "qwertyuiop", k=10)
    assert none.results == [] and none.unmatched == ["qwertyuiop"] and none.note


_WRITER = textwrap.dedent(
    """
    import sys, itertools
    from lookalike.catalog import Catalog, Product
    catalog = Catalog(sys.argv[1])
    print("ready", flush=True)
    for i in itertools.count():
        with catalog.transaction():
            for j in range(50):
                n = i * 50 + j
                catalog.upsert_product(Product(f"w{n}", f"Writer Shoe {n} Red", "Heels",
                                               attributes={"colour": "Red", "n": n}))
                if n % 3 == 0 and catalog.find_product(f"w{n // 2}"):
                    catalog.update_product(f"w{n // 2}", {"title": f"Renamed {n}"})
                if n % 7 == 0 and n:
                    catalog.remove_products([f"w{n - 1}"])
    """
)


def test_kill_9_during_catalog_writes_leaves_words_and_rows_together(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], env=env, stdout=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.5 + 0.3 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        catalog = Catalog(path)
        state = catalog.check_text_index()
        assert state["products"] > 0
        assert state["products"] == state["indexed"] and not state["missing"] and not state["extra"]
        # every product is found by its own words
        last = catalog.list_products(limit=1, offset=state["products"] - 1)[0][0]
        assert last.product_id in ids(catalog.text_search(last.title, 5))
        catalog.close()


def test_kill_9_during_index_leaves_words_and_rows_together(tmp_path: Path) -> None:
    require_data("fashion-footwear")
    meta = tmp_path / "products.csv"
    fashion_products(meta, 400)
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "lookalike", "--home", str(home), "-q", "index",
           "--metadata", str(meta)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        try:
            with sqlite3.connect(home / "catalog.sqlite") as db:
                if db.execute("SELECT COUNT(*) FROM images").fetchone()[0] >= 48:
                    break
        except sqlite3.Error:
            continue
    if proc.poll() is not None:
        pytest.fail("indexing finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    catalog = Catalog(home / "catalog.sqlite")
    state = catalog.check_text_index()
    assert 48 <= state["products"] < 400
    assert state["products"] == state["indexed"] and not state["missing"] and not state["extra"]
    catalog.close()
    engine = Engine(home)
    report = engine.index([], metadata=meta, progress=False)
    assert report.ok
    state = engine.catalog.check_text_index()
    assert state["products"] == state["indexed"] == 400
    assert len(fusion.words_alone(engine.catalog, "heels", k=20).results) == 20
    engine.close()


def test_text_weight_and_words_parsing() -> None:
    assert fusion.check_text_weight(None) == fusion.TEXT_WEIGHT
    assert fusion.check_text_weight(0) == 0.0
    for bad in (-0.1, 1.5, float("nan"), "x", True):
        with pytest.raises(UsageError):
            fusion.check_text_weight(bad)
    assert textindex.parse_words("Red, red HEELS!") == ["red", "heels"]
    assert textindex.text_score({"red": {0, 1, 2}}, ["red"]) == 1.0
    assert textindex.text_score({}, ["red"]) == 0.0
    assert json.dumps(fusion.SearchReport([], "words", ["a"], ["a"], note="n").to_dict())
    assert np.isclose(
        sum(fusion.neighbourhood_scores({"red": 2.0}, {"a": {"red"}, "b": set()}).values()), 1.0
    )
