"""Limits before work (issue 12, items 3, 7, 8), against a real `lookalike serve` in a
subprocess: raw sockets and streamed bodies over real HTTP, and the server's own memory
read from /proc."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from live_server import LiveServer
from PIL import Image
from test_api import build_catalog, image_bytes

from lookalike.api.limits import Limits
from lookalike.api.thumbnails import ThumbnailCache
from lookalike.errors import UsageError

KEY = "limits-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
SERVER_ENV = {
    "LOOKALIKE_API_KEY": KEY,
    "LOOKALIKE_MAX_IMAGE_BYTES": str(2 * 1024 * 1024),
    "LOOKALIKE_HEADER_TIMEOUT": "2",
    "LOOKALIKE_BODY_TIMEOUT": "2",
    "LOOKALIKE_MIN_BODY_RATE": "100000",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    home, _ = build_catalog(tmp_path_factory.getbasetemp() / "api-catalog")
    copy = tmp_path_factory.mktemp("limits") / "home"
    shutil.copytree(home, copy)
    with LiveServer(copy, SERVER_ENV) as live:
        yield live


@pytest.fixture(scope="module")
def rows(server, tmp_path_factory) -> list[dict]:
    return build_catalog(tmp_path_factory.getbasetemp() / "api-catalog")[1]


def png_bomb(side: int = 9000) -> bytes:
    """A transparent side x side RGBA PNG: about 330 KB of file, 324 MB of pixels."""
    out = io.BytesIO()
    Image.new("RGBA", (side, side), (0, 0, 0, 0)).save(out, "PNG")
    return out.getvalue()


def send_raw(server: LiveServer, data: bytes, wait: float = 10) -> bytes:
    """Send `data` on a fresh connection; what the server answers within `wait` s."""
    with server.connect() as sock:
        sock.sendall(data)
        sock.settimeout(wait)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks):
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


def status_of(raw: bytes) -> int | None:
    if not raw.startswith(b"HTTP/1.1 "):
        return None
    return int(raw.split(b" ", 2)[1])


# ---------------------------------------------------------------- item 3: pixel bombs


def test_png_bomb_is_413_before_any_pixel_is_decoded(server):
    bomb = png_bomb()
    assert len(bomb) < 2 * 1024 * 1024  # under the byte limit: only the pixel limit stops it
    httpx.get(server.url + "/healthz")
    before = server.memory_kb()
    server.reset_peak()
    for path, files, headers in (
        ("/search", {"image": ("bomb.png", bomb, "image/png")}, {}),
        ("/products", {"images": ("bomb.png", bomb, "image/png")}, AUTH),
    ):
        data = {"product_id": "bomb"} if path == "/products" else {}
        response = httpx.post(server.url + path, files=files, data=data, headers=headers)
        assert response.status_code == 413, response.text
        assert "9000x9000" in response.json()["detail"]
    grown_mb = (server.memory_kb()["VmHWM"] - before["VmRSS"]) / 1024
    # decoding it (or its EXIF, which for a PNG decodes the whole image) costs ~310 MB
    assert grown_mb < 60, f"the server's peak memory grew by {grown_mb:.0f} MB"


def test_a_photo_within_the_limits_still_searches(server, rows):
    response = httpx.post(
        server.url + "/search",
        files={"image": ("q.jpg", image_bytes(rows[0]), "image/jpeg")},
        data={"k": "3"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["product_id"] == rows[0]["product_id"]


# ------------------------------------------------------- item 7: the key before the body


@pytest.mark.parametrize(
    "head",
    [
        b"POST /products HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data;"
        b" boundary=x\r\nContent-Length: 104857600\r\n\r\n",
        b"PATCH /products/1 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Content-Length: 20971520\r\n\r\n",
        b"POST /products HTTP/1.1\r\nHost: t\r\nContent-Type: multipart/form-data;"
        b" boundary=x\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"DELETE /products/1 HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer wrong\r\n"
        b"Content-Length: 1048576\r\n\r\n",
    ],
    ids=["multipart-100MB", "json-20MB", "chunked", "wrong-key"],
)
def test_a_write_without_the_key_is_refused_before_its_body_is_read(server, head):
    started = time.monotonic()
    raw = send_raw(server, head, wait=5)  # only the headers: no body byte is ever sent
    assert status_of(raw) == 401, raw[:300]
    assert time.monotonic() - started < 4
    assert b"www-authenticate: Bearer" in raw.lower().replace(b"bearer", b"Bearer")


def test_json_bodies_have_a_size_limit(server):
    big = json.dumps({"title": "x" * 200_000})
    response = httpx.patch(
        server.url + "/products/1",
        content=big,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "RequestTooLarge"


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A multipart body with one file part of about `total` bytes, in pieces."""
    yield (
        b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n"
    )
    sent = 0
    while sent < total:
        yield b"\0" * min(size, total - sent)
        sent += size


@pytest.mark.parametrize(
    "method,path,total",
    [("POST", "/search", 3 * 1024 * 1024), ("PATCH", "/products/1", 200_000)],
)
def test_a_chunked_body_over_the_limit_is_413_not_400(server, method, path, total):
    headers = {**AUTH, "Content-Type": "multipart/form-data; boundary=x"}
    with httpx.Client(timeout=30) as client:
        # a generator body has no length: httpx sends it chunked
        response = client.request(method, server.url + path, content=chunks(total), headers=headers)
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "RequestTooLarge"


# ------------------------------------------------------------- item 8: slow clients


def test_half_sent_headers_are_closed_within_the_header_timeout(server):
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # never the blank line
        sock.settimeout(15)
        started = time.monotonic()
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        took = time.monotonic() - started
    assert took < 6, f"still open after {took:.1f}s"
    assert status_of(answer) in (408, None)


def test_headers_sent_a_byte_at_a_time_are_cut_off(server):
    request = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
    with server.connect() as sock:
        started = time.monotonic()
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.25)
            if time.monotonic() - started > 12:
                break
        took = time.monotonic() - started
        sock.settimeout(5)
        try:
            rest = sock.recv(4096)
        except OSError:
            rest = b""
    assert closed or status_of(rest) == 408 or rest == b"", rest
    assert took < 8, f"a byte every 0.25 s kept the connection for {took:.1f}s"


def test_a_body_trickled_slowly_gets_408(server):
    head = (
        b"PATCH /products/1 HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
    )
    with server.connect() as sock:
        sock.sendall(head)
        started = time.monotonic()
        sock.settimeout(0.5)
        answer = b""
        while time.monotonic() - started < 15 and not answer:
            try:
                sock.sendall(b" ")
                answer = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
        took = time.monotonic() - started
    assert status_of(answer) == 408, answer[:200]
    assert took < 6


def test_an_idle_keep_alive_connection_is_closed(server):
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        sock.settimeout(20)
        first = sock.recv(4096)
        assert status_of(first) == 200
        started = time.monotonic()
        while sock.recv(4096):
            pass
        assert time.monotonic() - started < 10


def test_connections_beyond_the_limit_get_503(tmp_path_factory, server):
    limited = LiveServer(server.home, {**SERVER_ENV, "LOOKALIKE_MAX_CONNECTIONS": "3"})
    with limited:
        idle = [limited.connect() for _ in range(3)]
        try:
            raw = send_raw(limited, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            assert status_of(raw) == 503, raw[:200]
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.5)
        assert httpx.get(limited.url + "/healthz").status_code == 200


# ---------------------------------------------------------------- item 8: thumbnails


def test_thumbnails_come_in_a_fixed_set_of_sizes(server, rows):
    products = httpx.get(server.url + "/products", params={"limit": 1}).json()["products"]
    image_id = products[0]["images"][0]["image_id"]
    for size in (64, 128, 256, 512):
        response = httpx.get(f"{server.url}/images/{image_id}", params={"size": size})
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/jpeg"
    for size in (16, 100, 257, 1024):
        response = httpx.get(f"{server.url}/images/{image_id}", params={"size": size})
        assert response.status_code == 422, response.text
        assert "64, 128, 256 or 512" in response.json()["detail"]


def test_the_thumbnail_cache_is_bounded_by_bytes():
    cache = ThumbnailCache(capacity_bytes=10_000)
    for i in range(100):
        cache.put((i, 64), bytes(1500))
        assert cache.bytes <= 10_000
    assert len(cache) == 6
    assert cache.get((99, 64)) is not None and cache.get((0, 64)) is None
    cache.put(("huge",), bytes(20_000))  # larger than the whole cache: not kept
    assert cache.get(("huge",)) is None and cache.bytes <= 10_000


def test_limits_refuse_a_thumbnail_size_outside_the_set():
    with pytest.raises(UsageError, match="thumbnail_size"):
        Limits(thumbnail_size=300)
    with pytest.raises(UsageError, match="negative"):
        Limits.from_env({"LOOKALIKE_HEADER_TIMEOUT": "-1"})
