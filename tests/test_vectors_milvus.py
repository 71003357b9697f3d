"""The Milvus store on Milvus Lite (a real embedded Milvus): CRUD, filter pushdown,
persistence, and parity with FAISS exact search on real embeddings."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from conftest import fashion_products, missing

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from lookalike.errors import CatalogMismatchError  # noqa: E402
from lookalike.vectors import FaissStore, VectorStore, open_store  # noqa: E402
from lookalike.vectors.milvus_store import (  # noqa: E402
    MilvusStore,
    filters_to_expr,
    parse_uri,
)

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
VGG = DATA / "footwear300/models/feature_vector_store.p"
CATEGORIES = ("Heels", "Flats", "Sports Shoes")


@pytest.fixture(scope="module")
def real_vectors() -> np.ndarray:
    if not VGG.exists():
        missing(f"real data not found at {DATA}")
    with open(VGG, "rb") as fh:
        v = np.asarray(pickle.load(fh), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def payload(n: int) -> list[dict]:
    return [
        {
            "product_id": f"p{i // 2}",
            "category": CATEGORIES[i % 3],
            "price": float(10 + (i * 7) % 90),
            "in_stock": i % 4 != 0,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, real_vectors):
    """The same 300-image catalog in Milvus Lite and in the FAISS store."""
    home = tmp_path_factory.mktemp("home")
    ids = np.arange(300, dtype=np.int64) * 3 + 1
    milvus = open_store("vectors.db", home, 512, "vgg16-gap")
    milvus.add(ids, real_vectors, payload=payload(300))
    faiss_store = open_store(None, home, 512, "vgg16-gap")
    faiss_store.add(ids, real_vectors)
    yield milvus, faiss_store, ids, home
    milvus.close()


def test_uri_forms(tmp_path: Path) -> None:
    assert parse_uri("milvus://db.example:19530")["uri"] == "http://db.example:19530"
    opts = parse_uri("milvus://m:1234?collection=shop&index=hnsw")
    assert opts["collection"] == "shop" and opts["index"] == "HNSW"
    assert parse_uri("milvus+https://m")["uri"] == "https://m:19530"
    assert parse_uri(str(tmp_path / "x.db"))["lite"] is True


def test_parity_with_faiss_exact_search(stores, real_vectors) -> None:
    milvus, faiss_store, ids, home = stores
    assert isinstance(milvus, MilvusStore) and isinstance(milvus, VectorStore)
    assert isinstance(faiss_store, FaissStore)
    assert (home / "vectors.db").exists()
    assert len(milvus) == 300
    np.testing.assert_array_equal(milvus.ids(), np.sort(ids))
    rng = np.random.default_rng(1)
    # catalog images as queries and unseen mixtures of two of them
    picks = rng.choice(300, 20, replace=False)
    mixed = 0.7 * real_vectors[picks] + 0.3 * real_vectors[rng.choice(300, 20, replace=False)]
    for q in (real_vectors[picks], mixed / np.linalg.norm(mixed, axis=1, keepdims=True)):
        ms, mi = milvus.search(q, 10)
        fs, fi = faiss_store.search(q, 10)
        np.testing.assert_array_equal(mi[:, 0], fi[:, 0])
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(mi, fi, strict=True)])
        assert overlap == 1.0
        np.testing.assert_allclose(ms, fs, atol=1e-4)


def test_filters_pushed_down_match_faiss_allowed_ids(stores, real_vectors) -> None:
    milvus, faiss_store, ids, _ = stores
    rows = payload(300)
    q = real_vectors[[3, 50, 123]]
    cases = [
        {"category": "Heels"},
        {"category": "Flats", "price_max": 40.0},
        {"in_stock": False, "price_min": 50.0},
    ]
    for f in cases:
        expr = filters_to_expr(f)
        keep = [
            i
            for i, r in enumerate(rows)
            if r["category"] == f.get("category", r["category"])
            and r["price"] >= f.get("price_min", -1e9)
            and r["price"] <= f.get("price_max", 1e9)
            and r["in_stock"] == f.get("in_stock", r["in_stock"])
        ]
        allowed = ids[keep]
        _, by_expr = milvus.search(q, 5, expr=expr)
        _, by_ids = milvus.search(q, 5, allowed_ids=allowed)
        _, want = faiss_store.search(q, 5, allowed_ids=allowed)
        assert np.isin(by_expr[by_expr >= 0], allowed).all()
        np.testing.assert_array_equal(by_expr[:, 0], want[:, 0])
        np.testing.assert_array_equal(by_ids[:, 0], want[:, 0])
        assert [set(r) for r in by_expr] == [set(r) for r in want]


def test_upsert_remove_and_persistence(tmp_path: Path, real_vectors) -> None:
    store = open_store(str(tmp_path / "m.db"), tmp_path, 512, "vgg16-gap")
    store.add(np.arange(50), real_vectors[:50])
    store.add(np.array([7]), real_vectors[100:101])  # replace
    assert len(store) == 50
    _, got = store.search(real_vectors[100:101], 1)
    assert got[0, 0] == 7
    store.remove(np.array([7, 8, 12345]))
    assert len(store) == 48
    _, got = store.search(real_vectors[:10], 48)
    assert not np.isin(got, [7, 8]).any()
    scores, got = store.search(real_vectors[:1], 5, allowed_ids=np.array([1, 2, 7]))
    assert set(got[0]) == {1, 2, -1} and np.isneginf(scores[0, 2:]).all()
    np.testing.assert_allclose(store.get(np.array([3]))[0], real_vectors[3], rtol=1e-6)
    store.save()
    store.close()
    again = open_store(str(tmp_path / "m.db"), tmp_path, 512, "vgg16-gap")
    assert len(again) == 48 and again.describe()["backend"] == "milvus-lite"
    with pytest.raises(CatalogMismatchError):
        open_store(str(tmp_path / "m.db"), tmp_path, 512, "another-model")
    again.close()
    fresh = open_store(str(tmp_path / "m.db"), tmp_path, 256, "another-model", reset=True)
    assert len(fresh) == 0
    fresh.close()


def test_filters_to_expr_quotes_values() -> None:
    expr = filters_to_expr({"category": 'Heels "x"', "in_stock": True, "attrs": {"c": "red"}})
    assert expr == 'category == "Heels \\"x\\"" and in_stock == true and attrs["c"] == "red"'
    assert filters_to_expr({}) is None


def test_engine_answers_the_same_products_on_milvus_lite(tmp_path: Path) -> None:
    """End to end: a catalog indexed with the FAISS store, then the same home opened with
    `--vector-store vectors.db` (Milvus Lite, filled from the catalog's own vectors,
    nothing re-embedded): the same products, in the same order, with the same scores."""
    from lookalike.engine import Engine

    folder = DATA / "footwear300" / "data"
    if not folder.exists():
        missing(f"real data not found at {DATA}")
    files = sorted(folder.glob("*.jpg"))[:30]
    queries = [files[3], files[17], DATA / "footwear300" / "search_image_01.jpg"]
    home = tmp_path / "home"
    engine = Engine.open(home)
    engine.index(files, progress=False)
    want = engine.search(queries, k=5)
    engine.close()
    on_milvus = Engine.open(home, vector_store="vectors.db")
    try:
        got = on_milvus.search(queries, k=5)
        info = on_milvus.info()["vector_store"]
        assert info["backend"] == "milvus-lite" and info["vectors"] == 30
        assert (home / "vectors.db").exists()
    finally:
        on_milvus.close()
    assert [[r.product_id for r in rs] for rs in got] == [[r.product_id for r in rs] for rs in want]
    assert got[0][0].product_id == files[3].stem
    np.testing.assert_allclose(
        [[r.score for r in rs] for rs in got], [[r.score for r in rs] for rs in want], atol=1e-4
    )


def test_engine_pushes_metadata_filters_down_to_milvus(tmp_path: Path) -> None:
    """Filters reach Milvus as expressions on the products' fields (not as id lists), give
    the same products as the FAISS store, and follow product edits at once; a payload
    left stale by a crash is re-sent on the next open."""
    from lookalike.catalog import Filters
    from lookalike.engine import Engine
    from lookalike.payload import PayloadStore

    meta = tmp_path / "products.csv"
    rows = fashion_products(
        meta, 50, price=lambda i: 10 + i, in_stock=lambda i: "yes" if i % 3 else "no"
    )
    query = rows[0]["image"]
    filters = [
        Filters(category="Heels", price_max=40),
        Filters(in_stock=True, attrs={"colour": "Black"}),
        Filters(category=["Flats", "Casual Shoes"]),
    ]
    faiss_home, milvus_home = tmp_path / "f", tmp_path / "m"
    with Engine(faiss_home) as engine:
        engine.index([], metadata=meta, progress=False)
        want = [engine.search([query], k=8, filters=f)[0] for f in filters]
    engine = Engine(milvus_home, vector_store="vectors.db")
    engine.index([], metadata=meta, progress=False)
    assert isinstance(engine.store, PayloadStore)
    calls = []
    inner_search = engine.store._inner.search

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return inner_search(*args, **kwargs)

    engine.store._inner.search = spy
    got = [engine.search([query], k=8, filters=f)[0] for f in filters]
    assert [[r.product_id for r in rs] for rs in got] == [[r.product_id for r in rs] for rs in want]
    assert calls and all(c.get("allowed_ids") is None and c.get("expr") for c in calls)
    assert 'category == "Heels" and price <= 40.0' in calls[0]["expr"]

    target = want[0][0].product_id
    engine.update_product(target, {"category": "Sandals"})
    assert target not in [r.product_id for r in engine.search([query], k=8, filters=filters[0])[0]]
    sandals = engine.search([query], k=8, filters=Filters(category="Sandals"))[0]
    assert target in [r.product_id for r in sandals]
    # a crash between a catalog edit and the payload update: repaired on the next open
    engine.catalog.update_product(target, {"category": "Heels"})
    engine.catalog.set_meta("payload_dirty", "1")
    engine.close()
    with Engine(milvus_home) as reopened:  # the catalog remembers the store URI
        heels = reopened.search([query], k=8, filters=filters[0])[0]
        assert [r.product_id for r in heels] == [r.product_id for r in want[0]]
        assert not reopened.catalog.get_meta("payload_dirty")


def test_reindexing_metadata_resends_only_changed_products(tmp_path: Path, monkeypatch) -> None:
    """Re-indexing with a metadata file sends Milvus the payload of the products whose
    fields changed, not the whole catalog's: nothing when nothing changed, one product's
    images when one price changed, and filters follow the new value."""
    from lookalike.catalog import Filters
    from lookalike.engine import Engine

    meta = tmp_path / "products.csv"
    prices = [10 + i for i in range(20)]
    rows = fashion_products(meta, 20, price=lambda i: prices[i])
    sent: list[int] = []
    real_add = MilvusStore.add

    def spy(self, ids, vectors, payload=None):
        sent.extend(np.asarray(ids).tolist())
        return real_add(self, ids, vectors, payload=payload)

    monkeypatch.setattr(MilvusStore, "add", spy)
    engine = Engine(tmp_path / "m", vector_store="vectors.db")
    report = engine.index([], metadata=meta, progress=False)
    assert report.added == len(rows) and len(sent) == len(rows)  # each image once

    sent.clear()
    report = engine.index([], metadata=meta, progress=False)
    assert report.unchanged == len(rows) and sent == []  # nothing changed: nothing sent

    target = rows[3]["product_id"]
    prices[3] = 500
    fashion_products(meta, 20, price=lambda i: prices[i])
    report = engine.index([], metadata=meta, progress=False)
    assert report.changed_products == [target]
    assert sorted(sent) == sorted(r.image_id for r in engine.catalog.images_of(target))
    expensive = engine.search([rows[3]["image"]], k=5, filters=Filters(price_min=400))
    assert [r.product_id for r in expensive[0]] == [target]
    assert not engine.catalog.get_meta("payload_dirty")
    engine.close()
