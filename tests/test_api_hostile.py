"""Hostile uploads against a real `lookalike serve` with its default limits: bombs in
every supported format, truncations, wrong types and polyglots (tests/hostile_uploads.py)
sent to POST /search (no key) and POST /products (with the key). Each gets the answer it
is owed, none a 5xx, and the server's peak memory stays bounded."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hostile_uploads import hostile_uploads
from live_server import LiveServer
from test_api import build_catalog

KEY = "hostile-key-0123456789"
CACHE = Path("/tmp/lookalike-hostile-cache")
MEMORY_BOUND_MB = 150
"""Peak RSS growth allowed over the whole run (one decoded 9000x9000 RGBA PNG is 310 MB)."""


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    home, _ = build_catalog(tmp_path_factory.getbasetemp() / "api-catalog")
    copy = tmp_path_factory.mktemp("hostile") / "home"
    shutil.copytree(home, copy)
    with LiveServer(copy, {"LOOKALIKE_API_KEY": KEY}) as live:
        yield live


def test_hostile_uploads_get_4xx_never_5xx_and_memory_stays_bounded(server):
    kinds = hostile_uploads(CACHE)
    assert len(kinds) >= 25
    httpx.get(server.url + "/healthz")
    before = server.memory_kb()["VmRSS"]
    server.reset_peak()
    wrong = []
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for kind in kinds:
            upload = (kind.filename, kind.data, kind.content_type)
            answers = [
                client.post("/search", files={"image": upload}),
                client.post(
                    "/products",
                    files={"images": upload},
                    data={"product_id": f"hostile-{kind.name}"},
                    headers={"Authorization": f"Bearer {KEY}"},
                ),
            ]
            for response in answers:
                if response.status_code not in kind.expect or response.status_code >= 500:
                    wrong.append((kind.name, response.status_code, response.text[:200]))
                if response.status_code >= 400:
                    assert response.json()["error"] and response.json()["detail"]
            assert client.get("/healthz").status_code == 200, kind.name
    assert not wrong, wrong
    grown_mb = (server.memory_kb()["VmHWM"] - before) / 1024
    assert grown_mb < MEMORY_BOUND_MB, f"peak RSS grew by {grown_mb:.0f} MB"
