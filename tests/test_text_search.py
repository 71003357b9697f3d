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


# ------------------------------------------------------------------ engine, CLI, API


STILETTO_PATH = ("footwear300", "search_image_01.jpg")


def test_engine_find_in_all_three_modes(shop: Engine) -> None:
    stiletto = require_data(*STILETTO_PATH)
    photo = shop.find([stiletto], k=5)[0]
    assert photo.mode == "photo" and photo.results[0].visual is None
    assert [r.product_id for r in photo.results] == [
        r.product_id for r in shop.search([stiletto], k=5)[0]
    ]
    words = shop.find([], "red heels", k=5)[0]
    assert words.mode == "words" and all(r.matched == ["red", "heels"] for r in words.results)
    both = shop.find([stiletto], "heels", k=5, filters=Filters(price_max=30))[0]
    assert both.mode == "both" and all(r.price <= 30 and r.matched for r in both.results)
    with pytest.raises(UsageError):
        shop.find([], None)
    with pytest.raises(UsageError):
        shop.find([], "  ")


def test_cli_search_words_photo_and_both(shop: Engine, tmp_path: Path, capsys) -> None:
    from lookalike.cli import main as cli_main

    stiletto = str(require_data(*STILETTO_PATH))
    home = ["--home", str(shop.home)]
    assert cli_main([*home, "search", "--text", "red heels", "-k", "3", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["query"] is None and line["text"] == "red heels"
    assert line["words"] == ["red", "heels"] and len(line["results"]) == 3
    first = line["results"][0]
    assert {"product_id", "score", "image", "title", "category", "price", "in_stock",
            "image_id", "visual", "text", "combined", "matched"} <= set(first)  # fmt: skip
    assert first["visual"] is None and first["matched"] == ["red", "heels"]

    code = cli_main([*home, "search", stiletto, "--text", "heels", "--text-weight", "0.4",
                     "-k", "4", "--category", "Heels", "--json"])  # fmt: skip
    assert code == 0
    line = json.loads(capsys.readouterr().out)
    assert line["query"] == stiletto and line["text_weight"] == 0.4
    assert all(r["category"] == "Heels" and r["visual"] > 0 and r["text"] > 0
               for r in line["results"])  # fmt: skip

    assert cli_main([*home, "search", stiletto, "-k", "2", "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["results"][0]["visual"] == line["results"][0]["score"]
    assert line["results"][0]["text"] is None

    sheet = tmp_path / "sheet.png"
    assert cli_main([*home, "search", "--text", "qwertyuiop", "--sheet", str(sheet)]) == 0
    out = capsys.readouterr()
    assert "no product has the words" in out.out and sheet.is_file()
    assert cli_main([*home, "search", stiletto, "--text", "qwertyuiop", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "results from the photo alone" in out and " 2. " in out
    assert cli_main([*home, "search"]) == 2
    assert "give query images" in capsys.readouterr().err
    assert cli_main([*home, "search", "--text", "heels", "--text-weight", "5"]) == 2
    capsys.readouterr()


@pytest.fixture
def api(shop: Engine, tmp_path: Path):
    """A client with an API key on a private copy of the words shop."""
    import shutil

    from fastapi.testclient import TestClient

    from lookalike.api import create_app

    copy = tmp_path / "home"
    shutil.copytree(shop.home, copy)
    with Engine.open(copy) as engine, TestClient(create_app(engine, api_key="k")) as client:
        yield client


def test_api_words_alone_photo_and_words(api) -> None:
    stiletto = require_data(*STILETTO_PATH).read_bytes()
    body = api.get("/search", params={"q": "red heels", "k": 5}).json()
    assert body["mode"] == "words" and body["words"] == ["red", "heels"]
    assert len(body["results"]) == 5
    assert all(r["matched"] == ["red", "heels"] and r["visual"] is None for r in body["results"])
    filtered = api.get(
        "/search", params={"q": "heels", "k": 50, "price_max": 15, "attr.colour": "Black"}
    ).json()["results"]
    assert filtered and all(r["price"] <= 15 and r["attributes"]["colour"] == "Black"
                            for r in filtered)  # fmt: skip
    posted = api.post("/search", data={"q": "red heels", "k": "5"}).json()
    assert [r["product_id"] for r in posted["results"]] == [
        r["product_id"] for r in body["results"]
    ]
    files = {"image": ("stiletto.jpg", stiletto, "image/jpeg")}
    both = api.post("/search", files=files, data={"q": "heels", "k": "6"}).json()
    assert both["mode"] == "both" and both["text_weight"] == fusion.TEXT_WEIGHT
    assert all(r["category"] == "Heels" and r["matched"] == ["heels"] and r["visual"] > 0
               for r in both["results"])  # fmt: skip
    photo = api.post("/search", files=files, data={"k": "3"}).json()
    assert (
        photo["mode"] == "photo" and photo["results"][0]["visual"] == photo["results"][0]["score"]
    )
    nothing = api.post("/search", files=files, data={"q": "qwertyuiop", "k": "3"}).json()
    assert nothing["note"] and nothing["unmatched"] == ["qwertyuiop"]
    assert [r["product_id"] for r in nothing["results"]] == [
        r["product_id"] for r in photo["results"]
    ]
    assert api.post("/search", data={"k": "3"}).status_code == 422
    assert api.get("/search").status_code == 422
    assert api.get("/search", params={"q": "!!"}).status_code == 422
    assert api.post("/search", data={"q": "heels", "text_weight": "2"}).status_code == 422
    spec = api.get("/openapi.json").json()["paths"]["/search"]
    assert {"get", "post"} <= set(spec)
    form = spec["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    assert form  # the form (image, q, text_weight, filters) is a documented schema
    assert any(p["name"] == "q" for p in spec["get"]["parameters"])


def test_api_writes_are_searchable_by_words_at_once(api) -> None:
    photo = require_data("footwear300", "data", "footwear_0042.jpg").read_bytes()
    auth = {"Authorization": "Bearer k"}
    made = api.post(
        "/products",
        data={
            "product_id": "new-1",
            "title": "Zanzibar Rain Boot",
            "category": "Boots",
            "attr.material": "Rubber",
        },  # fmt: skip
        files=[("images", ("boot.jpg", photo, "image/jpeg"))],
        headers=auth,
    )
    assert made.status_code == 201, made.text

    def found(q: str) -> list[str]:
        return [r["product_id"] for r in api.get("/search", params={"q": q}).json()["results"]]

    assert found("zanzibar") == ["new-1"] and found("rubber") == ["new-1"]
    assert api.patch("/products/new-1", json={"title": "Kilimanjaro Boot"},
                     headers=auth).status_code == 200  # fmt: skip
    assert found("zanzibar") == [] and found("kilimanjaro") == ["new-1"]
    assert api.delete("/products/new-1", headers=auth).status_code == 204
    assert found("kilimanjaro") == []


def test_milvus_store_searches_photo_and_words_the_same(tmp_path: Path) -> None:
    pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    fashion_products(tmp_path / "products.csv", 120)
    stiletto = require_data(*STILETTO_PATH)
    reports = {}
    for store in ("faiss", "vectors.db"):
        home = tmp_path / store.replace(".", "-")
        engine = Engine(home, vector_store=None if store == "faiss" else store)
        assert engine.index([], metadata=tmp_path / "products.csv", progress=False).ok
        if store != "faiss":
            assert engine.store.describe()["backend"] == "milvus-lite"
        reports[store] = (
            engine.find([stiletto], "heels", k=8, filters=Filters(attrs={"season": "Winter"})),
            engine.find([], "black flats", k=8),
        )
        engine.update_product(reports[store][1][0].results[0].product_id, {"title": "Quokka"})
        assert [r.product_id for r in engine.find([], "quokka")[0].results] == [
            reports[store][1][0].results[0].product_id
        ]
        engine.close()
    for faiss_report, milvus_report in zip(reports["faiss"], reports["vectors.db"], strict=True):
        a, b = faiss_report[0].results, milvus_report[0].results
        assert [r.product_id for r in a] == [r.product_id for r in b] and a
        assert np.allclose([r.score for r in a], [r.score for r in b], atol=1e-4)
    assert all(r.attributes["season"] == "Winter" and r.matched == ["heels"]
               for r in reports["vectors.db"][0][0].results)  # fmt: skip


def test_eval_queries_take_an_optional_text_column(shop: Engine, tmp_path: Path, capsys) -> None:
    from lookalike.cli import main as cli_main

    rows = [row for batch in shop.catalog.iter_images() for row in batch][:6]
    products = shop.catalog.products([r.product_id for r in rows])
    labels = tmp_path / "labels.csv"
    lines = ["image,product_id,text"]
    for i, row in enumerate(rows):
        title = products[row.product_id].title
        if i % 3 == 0:
            lines.append(f"{row.source},{row.product_id},")  # photo alone
        elif i % 3 == 1:
            lines.append(f"{row.source},{row.product_id},{products[row.product_id].category}")
        else:
            lines.append(f",{row.product_id},{title}")  # words alone
    labels.write_text("\n".join(lines) + "\n")
    home = ["--home", str(shop.home)]
    assert cli_main([*home, "eval", "--queries", str(labels), "--json", "--per-query"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["queries"] == 6
    per = report["per_query"]
    assert [q["text"] is None for q in per] == [True, False, False, True, False, False]
    assert [q["image"] is None for q in per] == [False, False, True, False, False, True]
    # a catalog photo finds its own product, alone or with its category's name
    assert all(q["rank"] == 1 for q in per if q["image"] is not None)
    for q in per:
        if q["image"] is None:  # words alone: a product with that very title comes first
            assert shop.catalog.get_product(q["top"][0]).title == q["text"]
    bad = tmp_path / "bad.csv"
    bad.write_text("image,product_id,text\n,x1,\n")
    assert cli_main([*home, "eval", "--queries", str(bad)]) != 0
    assert "empty image and text" in capsys.readouterr().err


def test_cached_word_answers_follow_writes_from_any_process(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    reader = words_catalog(path)
    with reader.transaction():
        for i, pid in enumerate(["p1", "p2", "p3"]):
            reader.put_image(pid, f"/x/{pid}.jpg", f"sha{i}", np.ones(4, np.float32), "s")
    assert reader.text_image_ids(["heels"]).size == 2  # p1, p2 (p6 has no image)
    assert reader.text_matches(["heels"], ["p1", "p3"]) == {"p1": {"heels": {0, 1}}}
    assert reader.word_counts(["red"]) == {"red": 3}
    writer = Catalog(path)  # another connection, as another process would have
    writer.update_product("p3", {"title": "HM Women Red Heels", "attributes": {"colour": "Pink"}})
    assert reader.text_image_ids(["heels"]).size == 3
    assert reader.text_matches(["heels"], ["p3"]) == {"p3": {"heels": {0}}}
    assert reader.word_counts(["red", "pink"]) == {"red": 3, "pink": 1}
    reader.update_product("p1", {"title": "Catwalk Women Red Pumps", "category": "Pumps"})
    assert reader.text_image_ids(["heels"]).size == 2
    writer.close()
    reader.close()
