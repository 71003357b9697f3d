"""Data rules (issue 12, items 4, 5, 6, 9): one photo and two products, non-finite
numbers, the product id rule, and what happens to uploaded files - through the real app
and engine (ONNX encoder, FAISS) on a copy of the small real catalog, and over real
HTTP where the wire matters (headers)."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from live_server import LiveServer
from PIL import Image
from test_api import build_catalog

from lookalike.api import create_app
from lookalike.engine import Engine
from lookalike.errors import UsageError
from lookalike.metadata import read_metadata

KEY = "data-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    return build_catalog(tmp_path_factory.getbasetemp() / "api-catalog")


@pytest.fixture
def app(catalog, tmp_path) -> Iterator[tuple[TestClient, Engine]]:
    copy = tmp_path / "home"
    shutil.copytree(catalog[0], copy)
    with Engine.open(copy) as engine, TestClient(create_app(engine, api_key=KEY)) as client:
        yield client, engine


def photo(seed: int, fmt: str = "JPEG", size=(120, 160)) -> bytes:
    """A small photo of its own: stripes whose colours depend on `seed`."""
    img = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256))
    for x in range(0, size[0], 12):
        img.paste((255 - seed * 7 % 256, 40, 200), (x, 0, x + 5, size[1]))
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def add(client: TestClient, product_id: str, *images: tuple[str, bytes], **fields):
    files = [("images", (name, data, "application/octet-stream")) for name, data in images]
    return client.post(
        "/products", data={"product_id": product_id, **fields}, files=files, headers=AUTH
    )


def uploads(engine: Engine) -> list[str]:
    folder = engine.home / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------- item 4: one photo, two products


def test_the_same_photo_for_a_second_product_is_409_naming_the_first(app):
    client, engine = app
    x = photo(1)
    assert add(client, "A", ("x.jpg", x)).status_code == 201
    second = add(client, "B", ("x.jpg", x))
    assert second.status_code == 409, second.text
    assert second.json()["error"] == "ImageInUseError"
    assert "product A" in second.json()["detail"]
    assert client.get("/products/B").status_code == 404  # nothing of B was written
    assert len(client.get("/products/A").json()["images"]) == 1  # X did not move


def test_deleting_another_product_leaves_a_its_image(app):
    client, engine = app
    x, y = photo(2), photo(3)
    assert add(client, "A", ("x.jpg", x)).status_code == 201
    assert add(client, "B", ("x.jpg", x), ("y.jpg", y)).status_code == 409
    assert add(client, "B", ("y.jpg", y)).status_code == 201
    assert client.delete("/products/B", headers=AUTH).status_code == 204
    images = client.get("/products/A").json()["images"]
    assert len(images) == 1
    assert client.get(images[0]["full_image_url"]).content == x
    found = client.post("/search", files={"image": ("x.jpg", x, "image/jpeg")}, data={"k": 1})
    assert found.json()["results"][0]["product_id"] == "A"


def test_the_same_photo_twice_in_one_request_is_one_image(app):
    client, _ = app
    x = photo(4)
    response = add(client, "A", ("x.jpg", x), ("x-again.jpg", x))
    assert response.status_code == 201, response.text
    assert len(response.json()["images"]) == 1


# ------------------------------------------------------ item 5: non-finite numbers


@pytest.mark.parametrize("number", ["Infinity", "-Infinity", "NaN", "1e400"])
def test_a_non_finite_attribute_is_422_and_filters_keep_working(app, catalog, number):
    client, _ = app
    pid = catalog[1][0]["product_id"]
    body = '{"attributes": {"heel": ' + number + "}}"
    response = client.patch(
        f"/products/{pid}", content=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    x = photo(5)
    added = add(client, "N", ("x.jpg", x), attributes='{"heel": ' + number + "}")
    assert added.status_code == 422, added.text
    assert client.get("/products/N").status_code == 404
    search = client.post(
        "/search", files={"image": ("x.jpg", x, "image/jpeg")}, data={"attr.heel": "high"}
    )
    assert search.status_code == 200, search.text


@pytest.mark.parametrize("field", ["price_min", "price_max", "min_score", "x"])
def test_non_finite_search_numbers_are_422(app, field):
    client, _ = app
    fields = {field: "inf"}
    if field == "x":
        fields.update(y="0", w="10", h="10")
    response = client.post(
        "/search", files={"image": ("x.jpg", photo(6), "image/jpeg")}, data=fields
    )
    assert response.status_code == 422, response.text


def test_a_non_finite_price_of_a_new_product_is_422(app):
    client, _ = app
    for price in ("inf", "nan", "1e400"):
        response = add(client, "P", ("x.jpg", photo(7)), price=price)
        assert response.status_code == 422, (price, response.text)


def test_the_engine_refuses_non_finite_attributes(app, catalog):
    _, engine = app
    pid = catalog[1][0]["product_id"]
    with pytest.raises(UsageError, match="finite"):
        engine.update_product(pid, {"attributes": {"heel": float("nan")}})
    assert "heel" not in engine.get_product(pid)["attributes"]


def jsonl_row(product_id: str, image: str, extra: str) -> str:
    """A JSONL line with a field written as given (`extra`, e.g. '"heel": NaN')."""
    return json.dumps({"product_id": product_id, "image": image})[:-1] + ", " + extra + "}"


def test_non_finite_numbers_in_a_jsonl_row_are_file_line_errors(tmp_path, catalog):
    image = catalog[1][0]["image"]
    lines = [
        {"product_id": "ok", "image": image, "heel": 3},
        jsonl_row("a", image, '"heel": NaN'),
        jsonl_row("b", image, '"price": 1e400'),
        jsonl_row("c", image, '"size": -Infinity'),
    ]
    path = tmp_path / "meta.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    meta = read_metadata(path)
    assert list(meta.products) == ["ok"]
    assert [e.split(": ", 1)[0] for e in meta.errors] == [f"{path}:{n}" for n in (2, 3, 4)]
    assert all("finite" in e for e in meta.errors)


def test_non_finite_prices_in_a_csv_row_are_file_line_errors(tmp_path, catalog):
    image = catalog[1][0]["image"]
    path = tmp_path / "meta.csv"
    rows = [f"p{i},{image},{price}" for i, price in enumerate(["1.5", "inf", "nan", "-inf"])]
    path.write_text("product_id,image,price\n" + "\n".join(rows) + "\n")
    meta = read_metadata(path)
    assert list(meta.products) == ["p0"]
    assert [e.split(": ", 1)[0] for e in meta.errors] == [f"{path}:{n}" for n in (3, 4, 5)]


# --------------------------------------------------------------- item 6: product ids


@pytest.mark.parametrize(
    "product_id",
    ["SKU/42", "a\\b", "line\r\nbreak", "tab\there", "nul\x00", "zero\u200bwidth", "..", "x" * 201],
)
def test_unsafe_product_ids_are_refused(app, product_id):
    client, _ = app
    response = add(client, product_id, ("x.jpg", photo(8)))
    assert response.status_code == 422, response.text
    assert "product_id" in response.json()["detail"]


@pytest.mark.parametrize("product_id", ["靴-1", "Café crème", "SKU 42?#%&+", "a.b_c~d", "ä" * 200])
def test_other_ids_go_both_ways_through_url_encoding(app, product_id):
    client, _ = app
    response = add(client, product_id, ("x.jpg", photo(9)))
    assert response.status_code == 201, response.text
    assert response.json()["product_id"] == product_id
    location = response.headers["location"]
    assert location == "/products/" + quote(product_id, safe="")
    assert client.get(location).json()["product_id"] == product_id
    listed = client.get("/products", params={"limit": 500}).json()["products"]
    assert product_id in [p["product_id"] for p in listed]
    assert client.get(location + "/similar").status_code == 200
    patched = client.patch(location, json={"title": "t"}, headers=AUTH)
    assert patched.status_code == 200 and patched.json()["product_id"] == product_id
    assert client.delete(location, headers=AUTH).status_code == 204
    assert client.get(location).status_code == 404


def test_unsafe_ids_in_a_metadata_file_are_file_line_errors(tmp_path, catalog):
    image = catalog[1][0]["image"]
    path = tmp_path / "meta.csv"
    path.write_text(f"product_id,image\nok,{image}\nSKU/42,{image}\n靴-1,{image}\n")
    meta = read_metadata(path)
    assert sorted(meta.products) == ["ok", "靴-1"]
    assert meta.errors and meta.errors[0].startswith(f"{path}:3: ")


def test_non_ascii_ids_over_real_http(catalog, tmp_path):
    copy = tmp_path / "home"
    shutil.copytree(catalog[0], copy)
    with LiveServer(copy, {"LOOKALIKE_API_KEY": KEY}) as server:
        files = {"images": ("x.jpg", photo(10), "image/jpeg")}
        response = httpx.post(
            server.url + "/products", data={"product_id": "靴-1"}, files=files, headers=AUTH
        )
        assert response.status_code == 201, response.text
        location = response.headers["location"]
        assert location == "/products/%E9%9D%B4-1"
        assert httpx.get(server.url + location).json()["product_id"] == "靴-1"
        crlf = httpx.post(
            server.url + "/products",
            data={"product_id": "evil\r\nSet-Cookie: x=1"},
            files={"images": ("y.jpg", photo(11), "image/jpeg")},
            headers=AUTH,
        )
        assert crlf.status_code == 422, crlf.text
        assert "set-cookie" not in crlf.headers
        assert httpx.delete(server.url + location, headers=AUTH).status_code == 204


# ---------------------------------------------------- item 9: what uploads become


@pytest.mark.parametrize(
    "fmt,suffix,media",
    [
        ("PNG", ".png", "image/png"),
        ("WEBP", ".webp", "image/webp"),
        ("JPEG", ".jpg", "image/jpeg"),
        ("GIF", ".gif", "image/gif"),
        ("TIFF", ".tiff", "image/tiff"),
    ],
)
def test_uploads_keep_their_type_and_go_with_their_product(app, fmt, suffix, media):
    client, engine = app
    data = photo(12, fmt)
    before = uploads(engine)
    response = add(client, "T", ("upload.bin", data))  # the file name says nothing
    assert response.status_code == 201, response.text
    new = sorted(set(uploads(engine)) - set(before))
    assert len(new) == 1 and new[0].endswith(suffix), new
    image = client.get(response.json()["images"][0]["full_image_url"])
    assert image.headers["content-type"] == media
    assert image.content == data
    assert client.delete("/products/T", headers=AUTH).status_code == 204
    assert uploads(engine) == before  # the file went with the last product using it


def test_an_upload_stored_without_its_type_is_served_with_the_right_one(app):
    """Homes written before issue 12 hold uploads as <sha>.img."""
    client, engine = app
    data = photo(13, "PNG")
    response = add(client, "L", ("l.png", data))
    image_id = response.json()["images"][0]["image_id"]
    path = engine.image_path(image_id)
    legacy = path.with_suffix(".img")
    path.rename(legacy)
    with engine.catalog.transaction() as catalog:  # as an older lookalike stored it
        catalog._db.execute("UPDATE images SET source=? WHERE image_id=?", (str(legacy), image_id))
    image = client.get(f"/images/{image_id}")
    assert image.headers["content-type"] == "image/png" and image.content == data
