"""The HTTP API against the real app, the real engine (ONNX encoder, FAISS) and a small
real catalog: 40 fashion-footwear products from ../shared/data with their metadata, plus
prices and stock flags this file derives from the product ids (the source has none)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.api import (
    Limits,
    create_app,
    load_query_image,
    parse_crop,
    tune_encoder_for_serving,
)
from lookalike.engine import Engine
from lookalike.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
FASHION = DATA / "fashion-footwear"
KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


# ------------------------------------------------------------------ the test catalog


def catalog_rows(count: int = 40) -> list[dict]:
    """`count` fashion-footwear products spread over the categories, with a price and a
    stock flag derived from the product id."""
    if not (FASHION / "catalog.csv").exists():
        pytest.skip(f"real data not found: {FASHION.resolve()}")
    with (FASHION / "catalog.csv").open(encoding="utf-8") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: (r["category"], int(r["product_id"])))
    step = max(1, len(rows) // count)
    picked = rows[::step][:count]
    out = []
    for row in picked:
        pid = int(row["product_id"])
        out.append(
            {
                "product_id": row["product_id"],
                "image": str((FASHION / row["image"]).resolve()),
                "title": row["title"],
                "category": row["category"],
                "colour": row["colour"],
                "price": float(20 + pid % 180),
                "in_stock": pid % 3 != 0,
            }
        )
    return out


def build_catalog(folder: Path, count: int = 40) -> tuple[Path, list[dict]]:
    """A lookalike home indexed from `count` real products (built once per folder)."""
    home = folder / "home"
    manifest = folder / "products.json"
    if manifest.exists():
        return home, json.loads(manifest.read_text())
    rows = catalog_rows(count)
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "metadata.csv"
    with meta.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "in_stock": "yes" if row["in_stock"] else "no"})
    with Engine.open(home) as engine:
        report = engine.index([], metadata=meta, progress=False)
        assert report.ok and report.added == len(rows), report.summary()
    manifest.write_text(json.dumps(rows))
    return home, rows


@pytest.fixture(scope="session")
def catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    return build_catalog(tmp_path_factory.getbasetemp() / "api-catalog")


@pytest.fixture(scope="module")
def engine(catalog) -> Iterator[Engine]:
    home, _ = catalog
    with Engine.open(home) as eng:
        yield eng


@pytest.fixture(scope="module")
def client(engine) -> Iterator[TestClient]:
    """Read-only client on the shared catalog (writes are refused: no key)."""
    with TestClient(create_app(engine, api_key="")) as c:
        yield c


@pytest.fixture
def writable(catalog, tmp_path) -> Iterator[tuple[TestClient, list[dict]]]:
    """A client with an API key on a private copy of the catalog."""
    home, rows = catalog
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    with Engine.open(copy) as eng, TestClient(create_app(eng, api_key=KEY)) as c:
        yield c, rows


def image_bytes(row: dict) -> bytes:
    return Path(row["image"]).read_bytes()


def search(client: TestClient, data: bytes, name: str = "q.jpg", **fields) -> httpx.Response:
    form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    return client.post("/search", files={"image": (name, data, "image/jpeg")}, data=form)


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"}, body
    assert body["detail"], body
    if error is not None:
        assert body["error"] == error, body
    return body


def png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------ search


def test_search_finds_the_product_whose_photo_it_is(client, catalog):
    _, rows = catalog
    row = rows[7]
    response = search(client, image_bytes(row), k=5)
    assert response.status_code == 200, response.text
    body = response.json()
    results = body["results"]
    assert len(results) == 5
    top = results[0]
    assert top["product_id"] == row["product_id"]
    assert top["score"] > 0.99
    assert top["title"] == row["title"]
    assert top["category"] == row["category"]
    assert top["price"] == row["price"]
    assert top["in_stock"] is row["in_stock"]
    assert top["attributes"]["colour"] == row["colour"]
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert len({r["product_id"] for r in results}) == 5  # products, not images
    assert body["took_ms"] > 0
    thumb = client.get(top["image_url"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    original = client.get(top["full_image_url"])
    assert original.content == image_bytes(row)


def test_search_k_and_min_score(client, catalog):
    _, rows = catalog
    data = image_bytes(rows[3])
    assert len(search(client, data, k=1).json()["results"]) == 1
    assert len(search(client, data, k=40).json()["results"]) == 40
    assert len(search(client, data, k=100).json()["results"]) == 40  # all there is
    only_itself = search(client, data, k=10, min_score=0.99).json()["results"]
    assert [r["product_id"] for r in only_itself] == [rows[3]["product_id"]]
    default = search(client, data).json()["results"]
    assert len(default) == 10


def test_search_filters_keep_only_matching_products_and_lose_none(client, catalog):
    _, rows = catalog
    data = image_bytes(rows[0])

    def ids(**filters) -> set[str]:
        response = search(client, data, k=100, **filters)
        assert response.status_code == 200, response.text
        return {r["product_id"] for r in response.json()["results"]}

    def truth(pred) -> set[str]:
        return {r["product_id"] for r in rows if pred(r)}

    assert ids(category="Flats") == truth(lambda r: r["category"] == "Flats")
    assert ids(in_stock=True) == truth(lambda r: r["in_stock"])
    assert ids(in_stock=False) == truth(lambda r: not r["in_stock"])
    assert ids(price_min=50, price_max=120) == truth(lambda r: 50 <= r["price"] <= 120)
    assert ids(**{"attr.colour": "Black"}) == truth(lambda r: r["colour"] == "Black")
    combined = ids(category="Heels", in_stock=True, price_max=150)
    assert combined == truth(
        lambda r: r["category"] == "Heels" and r["in_stock"] and r["price"] <= 150
    )
    assert combined  # the sample has such products, so the test can fail
    assert ids(category="No Such Category") == set()
    either = client.post(
        "/search",
        files={"image": ("q.jpg", data, "image/jpeg")},
        data={"k": "100", "category": ["Flats", "Flip Flops"]},
    ).json()["results"]
    assert {r["product_id"] for r in either} == truth(
        lambda r: r["category"] in ("Flats", "Flip Flops")
    )


def test_crop_box_searches_only_that_region(client, catalog):
    """A photo with two products side by side: the crop decides which one is found."""
    _, rows = catalog
    left_row, right_row = rows[2], rows[30]
    assert left_row["category"] != right_row["category"]
    left = Image.open(left_row["image"]).convert("RGB").resize((240, 320))
    right = Image.open(right_row["image"]).convert("RGB").resize((240, 320))
    canvas = Image.new("RGB", (520, 360), "white")
    canvas.paste(left, (10, 20))
    canvas.paste(right, (270, 20))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=95)
    data = buf.getvalue()

    top_left = search(client, data, k=1, crop="10,20,240,320").json()["results"][0]
    top_right = search(client, data, k=1, crop="270,20,240,320").json()["results"][0]
    assert top_left["product_id"] == left_row["product_id"]
    assert top_right["product_id"] == right_row["product_id"]
    # the same box as four fields
    fields = search(client, data, k=1, x=270, y=20, w=240, h=320).json()["results"][0]
    assert fields["product_id"] == right_row["product_id"]
    # a box reaching past the edge is clipped to the image
    clipped = search(client, data, k=1, crop="270,20,400,400").json()["results"][0]
    assert clipped["product_id"] == right_row["product_id"]


def test_crop_box_on_a_large_jpeg_decoded_reduced(client, catalog):
    """Big JPEGs are decoded at 1/2..1/8 scale; the box (in full-size pixels) must still
    land on the same spot."""
    _, rows = catalog
    target, distractor = rows[12], rows[35]
    canvas = Image.new("RGB", (4000, 3600), (235, 235, 235))
    canvas.paste(Image.open(distractor["image"]).convert("RGB").resize((1050, 1400)), (100, 900))
    canvas.paste(Image.open(target["image"]).convert("RGB").resize((2400, 3200)), (1500, 300))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()

    decoded = load_query_image(data, (1500, 300, 2400, 3200), 260, Limits())
    assert decoded.size == (600, 800)  # decoded at 1/4 scale, then cut to the box
    results = search(client, data, k=1, crop="1500,300,2400,3200").json()["results"]
    assert results[0]["product_id"] == target["product_id"]
    # as close to the target as the target alone, at that size, uploaded on its own
    buf = io.BytesIO()
    decoded.save(buf, format="PNG")  # lossless: the box's pixels, no shortcut to the catalog
    alone = search(client, buf.getvalue(), "alone.png", k=1).json()["results"][0]
    assert alone["product_id"] == target["product_id"]
    assert results[0]["score"] == pytest.approx(alone["score"], abs=0.01)
    results = search(client, data, k=1, crop="100,900,1050,1400").json()["results"]
    assert results[0]["product_id"] == distractor["product_id"]


def test_crop_box_is_in_upright_pixels_of_an_exif_rotated_photo(client, catalog):
    """A phone photo stored sideways with EXIF orientation 6: the box is given in the
    photo as it is shown (upright), and lands there, also when decoded reduced."""
    _, rows = catalog
    top_row, bottom_row = rows[8], rows[28]
    upright = Image.new("RGB", (2000, 4000), (245, 245, 245))
    upright.paste(Image.open(top_row["image"]).convert("RGB").resize((1800, 1900)), (100, 50))
    upright.paste(Image.open(bottom_row["image"]).convert("RGB").resize((1800, 1900)), (100, 2050))
    stored = upright.rotate(90, expand=True)  # what the camera wrote: 4000 x 2000
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()

    decoded = load_query_image(data, (100, 2050, 1800, 1900), 260, Limits())
    assert decoded.size == (900, 950)  # decoded at 1/2 scale, upright, cut to the box
    top = search(client, data, k=1, crop="100,50,1800,1900").json()["results"][0]
    bottom = search(client, data, k=1, crop="100,2050,1800,1900").json()["results"][0]
    assert top["product_id"] == top_row["product_id"]
    assert bottom["product_id"] == bottom_row["product_id"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"crop": "1,2,3"}, "four numbers"),
        ({"crop": "a,b,c,d"}, "four numbers"),
        ({"crop": "0,0,0,10"}, "positive"),
        ({"crop": "-5,0,10,10"}, ">= 0"),
        ({"crop": "5000,5000,10,10"}, "outside"),
        ({"x": "1", "y": "2"}, "all four"),
        ({"crop": "0,0,10,10", "x": "1"}, "not both"),
    ],
)
def test_bad_crop_box_is_422(client, catalog, fields, message):
    _, rows = catalog
    body = assert_error(search(client, image_bytes(rows[0]), **fields), 422, "UsageError")
    assert message in body["detail"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"k": "0"}, "k"),
        ({"k": "101"}, "k"),
        ({"k": "ten"}, "k"),
        ({"price_min": "cheap"}, "price_min"),
        ({"price_max": "-1"}, "price_max"),
        ({"in_stock": "maybe"}, "in_stock"),
        ({"min_score": "2"}, "min_score"),
    ],
)
def test_bad_search_parameters_are_422_naming_the_field(client, catalog, fields, field):
    _, rows = catalog
    body = assert_error(search(client, image_bytes(rows[0]), **fields), 422, "ValidationError")
    assert field in body["detail"]
    assert any(e["field"] == field for e in body["errors"])


def test_contradictory_filters_are_422(client, catalog):
    _, rows = catalog
    body = assert_error(
        search(client, image_bytes(rows[0]), price_min=100, price_max=10), 422, "UsageError"
    )
    assert "price_min" in body["detail"]
    body = assert_error(
        search(client, image_bytes(rows[0]), **{"attr.bad'name": "x"}), 422, "UsageError"
    )
    assert "attribute" in body["detail"]


def test_missing_image_is_422(client):
    body = assert_error(client.post("/search", data={"k": "3"}), 422, "ValidationError")
    assert "image" in body["detail"]
    assert_error(client.post("/search", json={"image": "x"}), 422, "ValidationError")


def _truncated_jpeg(rows: list[dict]) -> bytes:
    data = image_bytes(rows[0])
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "make", "status"),
    [
        ("notes.txt", lambda rows: b"this is not an image\n" * 20, 415),
        ("empty.jpg", lambda rows: b"", 415),
        ("random.jpg", lambda rows: bytes(range(256)) * 40, 415),
        ("truncated.jpg", _truncated_jpeg, 415),
        ("fake.png", lambda rows: b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, 415),
        ("page.html", lambda rows: b"<html><body>hi</body></html>", 415),
    ],
)
def test_unreadable_uploads_are_4xx_with_a_reason(client, catalog, name, make, status):
    _, rows = catalog
    body = assert_error(search(client, make(rows), name=name), status)
    assert body["error"] == "ImageError"
    assert body["detail"].startswith(f"{name}: ")  # names the file the user sent


def test_size_limits_are_413(engine, catalog):
    _, rows = catalog
    limits = Limits(max_image_bytes=50_000, max_image_pixels=1_000_000)
    with TestClient(create_app(engine, api_key="", limits=limits)) as small:
        big_bytes = bytes(60_000)
        body = assert_error(search(small, big_bytes), 413)
        assert "50,000" in body["detail"]
        # many pixels in few bytes (a decompression bomb in miniature)
        body = assert_error(search(small, png(2000, 1000), name="wide.png"), 413)
        assert body["error"] == "ImageTooLargeError"
        assert "1,000,000" in body["detail"]
        # a body far over the limit is refused from its Content-Length, before parsing
        response = small.post(
            "/search",
            content=b"x" * 400_000,
            headers={"content-type": "multipart/form-data; boundary=zzz"},
        )
        assert_error(response, 413, "RequestTooLarge")
        # within the limits the same app searches normally
        assert search(small, image_bytes(rows[0]), k=2).status_code == 200


ODD_REQUESTS = [
    (
        "POST",
        "/search",
        {
            "content": b"--zzz\r\ngarbage",
            "headers": {"content-type": "multipart/form-data; boundary=zzz"},
        },
    ),
    ("POST", "/search", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}),
    ("POST", "/search", {"data": {"image": "not a file"}}),
    ("POST", "/search", {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}}),
    ("GET", "/products/%00", {}),
    ("GET", "/products/" + "x" * 5000, {}),
    ("GET", "/products/x/similar?k=1e9", {}),
    ("GET", "/products?limit=abc", {}),
    ("GET", "/products?offset=99999999999999999999999", {}),
    ("GET", "/images/-1", {}),
    ("GET", "/images/99999999999999999999999", {}),
    ("GET", "/images/1?size=99999999999999999999", {}),
    ("PATCH", "/products/x", {"json": {"price": "abc"}}),
    ("PATCH", "/products/x", {"json": {"attributes": {"a": {"nested": 1}}}}),
    ("PATCH", "/products/x", {"json": [1, 2]}),
    ("DELETE", "/products/", {}),
]


@pytest.mark.parametrize(("method", "url", "kwargs"), ODD_REQUESTS)
def test_odd_requests_are_4xx_never_500(client, method, url, kwargs):
    response = client.request(method, url, **kwargs)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert {"error", "detail"} <= set(response.json())


@pytest.mark.parametrize(
    "fields",
    [
        {"crop": "1e400,0,10,10"},
        {"crop": "nan,0,10,10"},
        {"x": "1e308", "y": "0", "w": "10", "h": "10"},
        {"price_min": "1e400"},
        {"k": ""},
        {"attr." + "a" * 3000: "x"},
        {"category": "Ünïcødé 🥿"},
        {"min_score": "nan"},
    ],
)
def test_odd_search_fields_are_answered_without_a_500(client, catalog, fields):
    _, rows = catalog
    response = search(client, image_bytes(rows[0]), **fields)
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        assert isinstance(response.json()["results"], list)


def test_limits_from_environment():
    limits = Limits.from_env(
        {"LOOKALIKE_MAX_IMAGE_BYTES": "1234", "LOOKALIKE_MAX_K": "7"}, max_page_size=9
    )
    assert (limits.max_image_bytes, limits.max_k, limits.max_page_size) == (1234, 7, 9)
    with pytest.raises(UsageError):
        Limits.from_env({"LOOKALIKE_MAX_IMAGE_PIXELS": "lots"})


def test_server_gives_each_concurrent_search_its_share_of_the_cores(engine):
    limits = Limits(max_concurrent_searches=1, encoder_threads=0)
    assert limits.threads_per_search == len(os.sched_getaffinity(0))
    assert Limits(encoder_threads=-1).threads_per_search is None
    assert Limits(max_concurrent_searches=64).threads_per_search == 1
    app = create_app(engine, api_key="", limits=Limits(encoder_threads=1))
    with TestClient(app):
        assert app.state.engine_holder.wait(120)
        options = engine.encoder.session.get_session_options()
        assert options.intra_op_num_threads == 1
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_session_resizing_reaches_through_wrapping_encoders():
    calls = []

    class Onnx:
        def set_threads(self, threads, spinning=True):
            calls.append((threads, spinning))

    class Wrapper:  # like TunedEncoder: no set_threads of its own
        def __init__(self, base):
            self.base = base

    assert tune_encoder_for_serving(Wrapper(Wrapper(Onnx())), 1)
    assert calls == [(1, False)]
    assert not tune_encoder_for_serving(Wrapper(object()), 1)


def test_parse_crop_rounds_and_accepts_both_forms():
    assert parse_crop("1.4, 2.6, 10, 20", None, None, None, None) == (1, 3, 10, 20)
    assert parse_crop(None, 0, 0, 5, 5) == (0, 0, 5, 5)
    assert parse_crop(None, None, None, None, None) is None
    assert parse_crop("", None, None, None, None) is None


# ------------------------------------------------------------------ more like this


def test_similar_excludes_the_product_and_ranks(client, catalog):
    _, rows = catalog
    row = rows[5]
    response = client.get(f"/products/{row['product_id']}/similar", params={"k": 6})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 6
    assert row["product_id"] not in {r["product_id"] for r in results}
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert response.json()["took_ms"] >= 0


def test_similar_with_filters(client, catalog):
    _, rows = catalog
    row = rows[5]
    response = client.get(
        f"/products/{row['product_id']}/similar",
        params={"k": 100, "category": "Heels", "in_stock": "true", "attr.colour": "Black"},
    )
    got = {r["product_id"] for r in response.json()["results"]}
    want = {
        r["product_id"]
        for r in rows
        if r["category"] == "Heels"
        and r["in_stock"]
        and r["colour"] == "Black"
        and r["product_id"] != row["product_id"]
    }
    assert got == want and want
    either = client.get(
        f"/products/{row['product_id']}/similar",
        params=[("k", "100"), ("category", "Flats"), ("category", "Sports Shoes")],
    ).json()["results"]
    assert {r["category"] for r in either} == {"Flats", "Sports Shoes"}
    assert len(either) == sum(
        r["category"] in ("Flats", "Sports Shoes") and r["product_id"] != row["product_id"]
        for r in rows
    )
    strict = client.get(
        f"/products/{row['product_id']}/similar", params={"k": 10, "min_score": 0.999}
    )
    assert all(r["score"] >= 0.999 for r in strict.json()["results"])


def test_similar_errors(client, catalog):
    _, rows = catalog
    assert_error(client.get("/products/no-such-product/similar"), 404, "UnknownProductError")
    pid = rows[0]["product_id"]
    assert_error(client.get(f"/products/{pid}/similar", params={"k": 0}), 422)
    assert_error(
        client.get(f"/products/{pid}/similar", params={"price_min": 9, "price_max": 1}), 422
    )


# ------------------------------------------------------------------ catalog reads


def test_get_product(client, catalog):
    _, rows = catalog
    row = rows[9]
    body = client.get(f"/products/{row['product_id']}").json()
    assert body["product_id"] == row["product_id"]
    assert body["title"] == row["title"]
    assert body["price"] == row["price"]
    assert body["in_stock"] is row["in_stock"]
    assert body["attributes"]["colour"] == row["colour"]
    assert len(body["images"]) == 1
    image = client.get(body["images"][0]["full_image_url"])
    assert image.content == image_bytes(row)
    assert_error(client.get("/products/does-not-exist"), 404, "UnknownProductError")


def test_list_products_pages_and_filters(client, catalog):
    _, rows = catalog
    first = client.get("/products", params={"limit": 15}).json()
    second = client.get("/products", params={"limit": 15, "offset": 15}).json()
    rest = client.get("/products", params={"limit": 15, "offset": 30}).json()
    assert first["total"] == len(rows)
    assert (first["limit"], first["offset"]) == (15, 0)
    listed = [p["product_id"] for page in (first, second, rest) for p in page["products"]]
    assert sorted(listed) == sorted(r["product_id"] for r in rows)
    assert len(rest["products"]) == len(rows) - 30

    flats = client.get("/products", params={"category": "Flats", "limit": 100}).json()
    assert {p["product_id"] for p in flats["products"]} == {
        r["product_id"] for r in rows if r["category"] == "Flats"
    }
    assert flats["total"] == len(flats["products"])
    out = client.get("/products", params={"in_stock": "false", "limit": 100}).json()
    assert {p["product_id"] for p in out["products"]} == {
        r["product_id"] for r in rows if not r["in_stock"]
    }
    assert_error(client.get("/products", params={"limit": 0}), 422)
    assert_error(client.get("/products", params={"limit": 100000}), 422)
    assert_error(client.get("/products", params={"offset": -1}), 422)
    assert_error(client.get("/products", params={"in_stock": "perhaps"}), 422)


def test_categories(client, catalog):
    _, rows = catalog
    body = client.get("/categories").json()
    counts = {c["name"]: c["count"] for c in body["categories"]}
    expected: dict[str, int] = {}
    for row in rows:
        expected[row["category"]] = expected.get(row["category"], 0) + 1
    assert counts == expected


def test_images_by_id_and_thumbnails(client, catalog):
    _, rows = catalog
    product = client.get(f"/products/{rows[1]['product_id']}").json()
    image_id = product["images"][0]["image_id"]
    thumb = client.get(f"/images/{image_id}", params={"size": 64})
    assert thumb.status_code == 200
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 64
    again = client.get(f"/images/{image_id}", params={"size": 64})
    assert again.content == thumb.content  # served from the thumbnail cache
    # never upscaled: the 60x80 originals stay 60x80 in a 256 thumbnail
    assert Image.open(io.BytesIO(client.get(product["images"][0]["image_url"]).content)).size == (
        60,
        80,
    )
    assert_error(client.get("/images/987654"), 404, "UnknownImageError")
    assert_error(client.get("/images/abc"), 422)
    assert_error(client.get("/images/../../etc/passwd"), 404)
    assert_error(client.get(f"/images/{image_id}", params={"size": 5}), 422)


# ------------------------------------------------------------------ writes and auth


def test_writes_refused_without_a_configured_key(client, catalog):
    _, rows = catalog
    pid = rows[0]["product_id"]
    for response in (
        client.patch(f"/products/{pid}", json={"price": 1}, headers=AUTH),
        client.delete(f"/products/{pid}", headers=AUTH),
        client.post(
            "/products",
            data={"product_id": "x"},
            files=[("images", ("a.jpg", image_bytes(rows[0]), "image/jpeg"))],
            headers=AUTH,
        ),
    ):
        body = assert_error(response, 403, "WritesDisabledError")
        assert "LOOKALIKE_API_KEY" in body["detail"]
    assert client.get(f"/products/{pid}").json()["price"] == rows[0]["price"]


def test_wrong_or_missing_key_is_401(writable):
    client, rows = writable
    pid = rows[0]["product_id"]
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer ünïcode".encode()},
    ):
        response = client.patch(f"/products/{pid}", json={"price": 1}, headers=headers)
        body = assert_error(response, 401)
        assert response.headers.get("www-authenticate") == "Bearer"
        assert "key" in body["detail"].lower()
    assert client.get(f"/products/{pid}").json()["price"] == rows[0]["price"]


def test_add_search_update_delete_roundtrip(writable, catalog):
    client, rows = writable
    new_photo = (DATA / "footwear300/data/footwear_0042.jpg").read_bytes()
    before = search(client, new_photo, k=1).json()["results"][0]
    assert before["score"] < 0.99  # not in the catalog yet

    response = client.post(
        "/products",
        data={
            "product_id": "new-42",
            "title": "Test Boot",
            "category": "Boots",
            "price": "99.5",
            "in_stock": "true",
            "attr.colour": "Red",
        },
        files=[("images", ("boot.jpg", new_photo, "image/jpeg"))],
        headers=AUTH,
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["location"] == "/products/new-42"
    assert created["title"] == "Test Boot" and created["price"] == 99.5
    assert created["attributes"] == {"colour": "Red"}
    assert len(created["images"]) == 1
    assert client.get(created["images"][0]["full_image_url"]).content == new_photo

    top = search(client, new_photo, k=1).json()["results"][0]  # the very next search
    assert top["product_id"] == "new-42" and top["score"] > 0.99
    assert top["category"] == "Boots"

    patched = client.patch(
        "/products/new-42",
        json={"price": 10, "in_stock": False, "title": "Sale Boot", "attributes": {"size": "38"}},
        headers=AUTH,
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["attributes"] == {"colour": "Red", "size": "38"}
    hit = search(client, new_photo, k=1).json()["results"][0]
    assert (hit["product_id"], hit["price"], hit["in_stock"], hit["title"]) == (
        "new-42",
        10.0,
        False,
        "Sale Boot",
    )
    in_stock_only = search(client, new_photo, k=100, in_stock=True).json()["results"]
    assert "new-42" not in {r["product_id"] for r in in_stock_only}
    by_attr = search(client, new_photo, k=5, **{"attr.size": "38"}).json()["results"]
    assert [r["product_id"] for r in by_attr] == ["new-42"]

    assert client.delete("/products/new-42", headers=AUTH).status_code == 204
    after = search(client, new_photo, k=5).json()["results"]
    assert "new-42" not in {r["product_id"] for r in after}
    assert_error(client.get("/products/new-42"), 404)
    assert_error(client.delete("/products/new-42", headers=AUTH), 404)
    assert client.get("/products").json()["total"] == len(rows)


def test_add_product_with_several_images(writable):
    client, _ = writable
    photos = [
        (DATA / f"footwear300/data/footwear_{n:04d}.jpg").read_bytes() for n in (100, 101, 102)
    ]
    response = client.post(
        "/products",
        data={"product_id": "multi"},
        files=[("images", (f"{i}.jpg", p, "image/jpeg")) for i, p in enumerate(photos)],
        headers=AUTH,
    )
    assert response.status_code == 201, response.text
    assert len(response.json()["images"]) == 3
    with_json = client.post(
        "/products",
        data={"product_id": "json-attrs", "attributes": '{"colour": "Teal", "size": 38}'},
        files={"images": ("j.jpg", (DATA / "footwear300/data/footwear_0103.jpg").read_bytes())},
        headers=AUTH,
    )
    assert with_json.status_code == 201, with_json.text
    assert with_json.json()["attributes"] == {"colour": "Teal", "size": 38}
    for photo in photos:  # any of its images finds it
        assert search(client, photo, k=1).json()["results"][0]["product_id"] == "multi"
    similar = client.get("/products/multi/similar", params={"k": 3}).json()["results"]
    assert len(similar) == 3 and "multi" not in {r["product_id"] for r in similar}


def test_add_product_errors_change_nothing(writable, catalog):
    client, rows = writable
    good = image_bytes(rows[0])

    def add(data: dict, files: list) -> httpx.Response:
        return client.post("/products", data=data, files=files, headers=AUTH)

    img = ("a.jpg", good, "image/jpeg")
    assert_error(add({"product_id": "p1"}, []), 422)  # no image at all
    body = assert_error(
        add({"product_id": "p1"}, [("images", img), ("images", ("b.txt", b"nope", "text/plain"))]),
        415,
        "ImageError",
    )
    assert "image 2" in body["detail"]
    assert_error(add({"product_id": rows[0]["product_id"]}, [("images", img)]), 409)
    assert_error(add({"product_id": "p1", "price": "-3"}, [("images", img)]), 422)
    assert_error(add({"product_id": "p1", "in_stock": "perhaps"}, [("images", img)]), 422)
    assert_error(add({"title": "no id"}, [("images", img)]), 422)
    assert_error(add({"product_id": "p1", "attributes": "{not json"}, [("images", img)]), 422)
    assert_error(add({"product_id": "p1", "attributes": "[1, 2]"}, [("images", img)]), 422)
    assert_error(add({"product_id": "p1", "attributes": '{"a": {"b": 1}}'}, [("images", img)]), 422)
    too_many = [("images", (f"{i}.jpg", good, "image/jpeg")) for i in range(11)]
    assert_error(add({"product_id": "p1"}, too_many), 422)
    assert_error(client.get("/products/p1"), 404)
    assert client.get("/products").json()["total"] == len(rows)


def test_patch_errors(writable, catalog):
    client, rows = writable
    pid = rows[0]["product_id"]
    assert_error(client.patch("/products/nope", json={"price": 1}, headers=AUTH), 404)
    assert_error(client.patch(f"/products/{pid}", json={"colour": "x"}, headers=AUTH), 422)
    assert_error(client.patch(f"/products/{pid}", json={}, headers=AUTH), 422)
    assert_error(client.patch(f"/products/{pid}", json={"price": -1}, headers=AUTH), 422)
    assert_error(client.patch(f"/products/{pid}", json={"in_stock": None}, headers=AUTH), 422)
    assert_error(client.patch(f"/products/{pid}", content=b"{not json", headers=AUTH), 422)
    assert client.get(f"/products/{pid}").json()["price"] == rows[0]["price"]


# ------------------------------------------------------------------ health, routing, docs


def test_health_and_readiness(client, catalog):
    _, rows = catalog
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready"
    assert ready["products"] == len(rows)
    assert ready["model"] and ready["tuned"] is None and ready["tuned_on"] is None  # base


def test_readiness_while_the_engine_opens_in_the_background(writable_home, tmp_path):
    home = writable_home
    release = threading.Event()

    def slow_open(path):
        release.wait(30)
        return Engine.open(path)

    app = create_app(home=home, api_key="", opener=slow_open)
    with TestClient(app) as c:
        assert c.get("/healthz").status_code == 200
        body = assert_error_free(c.get("/readyz"), 503)
        assert body["status"] == "loading"
        busy = assert_error(search(c, png(64, 64)), 503, "NotReadyError")
        assert "loading" in busy["detail"]
        release.set()
        assert app.state.engine_holder.wait(60)
        assert c.get("/readyz").json()["status"] == "ready"

    def broken_open(path):
        raise OSError("disk on fire")

    with TestClient(create_app(home=tmp_path / "x", api_key="", opener=broken_open)) as c:
        app_holder = c.app.state.engine_holder
        assert app_holder.wait(10)
        body = assert_error_free(c.get("/readyz"), 503)
        assert body["status"] == "failed" and "disk on fire" in body["detail"]
        assert "disk on fire" in assert_error(c.get("/products"), 503)["detail"]


def test_an_empty_catalog_serves_and_takes_products(tmp_path, catalog):
    """`lookalike serve` on a new home: ready, searchable (nothing found), and products
    added through the API are found by the next search."""
    _, rows = catalog
    app = create_app(home=tmp_path / "new-home", api_key=KEY)
    with TestClient(app) as c:
        assert app.state.engine_holder.wait(180)
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["products"] == 0
        photo = image_bytes(rows[4])
        assert search(c, photo).json()["results"] == []
        assert c.get("/products").json() == {"products": [], "total": 0, "limit": 50, "offset": 0}
        assert c.get("/categories").json() == {"categories": []}
        added = c.post(
            "/products",
            data={"product_id": "first", "category": "Flats"},
            files={"images": ("a.jpg", photo, "image/jpeg")},
            headers=AUTH,
        )
        assert added.status_code == 201, added.text
        top = search(c, photo).json()["results"]
        assert [r["product_id"] for r in top] == ["first"] and top[0]["score"] > 0.99
        assert c.get("/readyz").json()["products"] == 1


def assert_error_free(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()


def test_unknown_routes_and_methods_are_json(client):
    assert_error(client.get("/no/such/thing"), 404, "NotFound")
    assert_error(client.put("/search"), 405, "MethodNotAllowed")
    assert_error(client.get("/search"), 422, "ValidationError")  # words alone need q


def test_cross_origin_calls_only_from_configured_origins(engine, client):
    shop = "https://shop.example"
    preflight = {"Origin": shop, "Access-Control-Request-Method": "POST"}
    with TestClient(create_app(engine, api_key="", cors_origins=[shop + "/"])) as c:
        response = c.options("/search", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == shop
        listed = c.get("/categories", headers={"Origin": shop})
        assert listed.headers["access-control-allow-origin"] == shop
        other = c.get("/categories", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    # none configured: no CORS headers at all
    assert (
        "access-control-allow-origin"
        not in client.get("/categories", headers={"Origin": shop}).headers
    )


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    for path in (
        "/search",
        "/products",
        "/products/{product_id}",
        "/products/{product_id}/similar",
        "/images/{image_id}",
        "/healthz",
        "/readyz",
    ):
        assert path in spec["paths"], path
    assert set(spec["paths"]["/products/{product_id}"]) == {"get", "patch", "delete"}
    assert client.get("/docs").status_code == 200


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert 'id="file-input"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    assert_error(client.get("/static/../api.py"), 404)
    # encoded, so the dots reach StaticFiles: web/../api/app.py exists but is not served
    assert_error(client.get("/static/%2e%2e/api/app.py"), 404)


# ------------------------------------------------------------------ a real server, threads


@pytest.fixture
def live_server(writable_home) -> Iterator[str]:
    import uvicorn

    home = writable_home
    app = create_app(home=home, api_key=KEY)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    else:
        pytest.fail("server did not become ready")
    yield base
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def writable_home(catalog, tmp_path) -> Path:
    home, _ = catalog
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    return copy


def test_concurrent_searches_while_products_are_added_and_removed(live_server, catalog):
    """Over real HTTP: parallel searches all succeed and stay correct while another client
    adds and deletes products; every change is visible to the next search."""
    _, rows = catalog
    photos = [image_bytes(r) for r in rows[:8]]
    extra = [(DATA / f"footwear300/data/footwear_{n:04d}.jpg").read_bytes() for n in range(6)]
    stop = threading.Event()
    failures: list[str] = []

    def searcher(i: int) -> int:
        done = 0
        with httpx.Client(base_url=live_server, timeout=60) as http:
            while not stop.is_set() or done < 3:
                row, photo = rows[i % 8], photos[i % 8]
                r = http.post("/search", files={"image": ("q.jpg", photo)}, data={"k": "3"})
                if r.status_code != 200:
                    failures.append(f"search {r.status_code}: {r.text}")
                elif r.json()["results"][0]["product_id"] != row["product_id"]:
                    failures.append(f"wrong top result for {row['product_id']}")
                done += 1
        return done

    def writer() -> None:
        with httpx.Client(base_url=live_server, timeout=60, headers=AUTH) as http:
            for n, photo in enumerate(extra):
                pid = f"churn-{n}"
                r = http.post(
                    "/products", data={"product_id": pid}, files={"images": ("x.jpg", photo)}
                )
                if r.status_code != 201:
                    failures.append(f"add {r.status_code}: {r.text}")
                    continue
                hit = http.post("/search", files={"image": ("q.jpg", photo)}, data={"k": "1"})
                if hit.json()["results"][0]["product_id"] != pid:
                    failures.append(f"{pid} not found right after adding it")
                if http.delete(f"/products/{pid}").status_code != 204:
                    failures.append(f"delete {pid} failed")
                gone = http.post("/search", files={"image": ("q.jpg", photo)}, data={"k": "3"})
                if pid in {x["product_id"] for x in gone.json()["results"]}:
                    failures.append(f"{pid} still found after deleting it")

    with ThreadPoolExecutor(5) as pool:
        searches = [pool.submit(searcher, i) for i in range(4)]
        writer()
        stop.set()
        counts = [f.result() for f in searches]
    assert not failures, failures[:5]
    assert sum(counts) >= 12
    total = httpx.get(live_server + "/products").json()["total"]
    assert total == len(rows)
