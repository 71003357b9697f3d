"""The duplicates review page in a real browser (as tests/test_browser.py: Playwright on
Debian's chromium against a real `python -m lookalike serve`), on a real catalog with
planted copies. Screenshots go to test-output/browser/."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer
from test_browser import CHROMIUM, CHROMIUM_ARGS, DESKTOP, SHOTS, wait_until
from test_duplicates import _catalog_rows, _write_csv

from lookalike.engine import Engine

pytestmark = pytest.mark.browser
ROOT = Path(__file__).resolve().parents[1]
sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    folder = tmp_path_factory.mktemp("dup-page")
    rows, _ = _catalog_rows(folder)
    home = folder / "home"
    with Engine(home) as engine:
        engine.index([], metadata=_write_csv(folder / "catalog.csv", rows), progress=False)
    live = LiveServer(home, log=folder / "serve.log")
    live.env.pop("LOOKALIKE_API_KEY", None)
    with live:
        yield live.url, home


@pytest.fixture(scope="module")
def page(server):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run scripts/install-browser.sh (make test does)")
    profile = tempfile.mkdtemp(prefix="lookalike-chromium-")
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=DESKTOP,
        )  # fmt: skip
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        try:
            yield page
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
    assert not errors, f"JavaScript errors on the page: {errors}"


def test_review_groups_with_thumbnails_and_open_a_product(page, server):
    base, home = server
    expected = httpx.get(base + "/duplicates", params={"limit": 100}, timeout=300).json()
    assert expected["total"] >= 3
    page.goto(base + "/duplicates")
    groups = page.locator("#groups .group")
    expect(groups.first).to_be_visible(timeout=60_000)
    expect(page.locator("#dup-status")).to_contain_text(f"{expected['total']} groups")
    shown = min(12, expected["total"])
    expect(groups).to_have_count(shown)
    first = expected["groups"][0]
    tiles = groups.first.locator(".dup-tile")
    expect(tiles).to_have_count(len(first["images"]))
    assert tiles.evaluate_all("ts => ts.map(t => t.dataset.productId)") == [
        i["product_id"] for i in first["images"]
    ]
    wait_until(
        page,
        "() => [...document.querySelectorAll('#groups img')]"
        ".every(i => i.complete && i.naturalWidth > 0)",
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "duplicates.png"), full_page=True)
    # open the product of the second image of the first group
    target = first["images"][1]["product_id"]
    tiles.nth(1).click()
    dialog = page.locator("#product")
    expect(dialog).to_be_visible()
    expect(page.locator("#product-fields")).to_contain_text(target)
    expect(page.locator("#product-images img").first).to_be_visible()
    page.screenshot(path=str(SHOTS / "duplicates-product.png"))
    dialog.locator(".close").click()
    expect(dialog).to_be_hidden()


def test_threshold_and_within_products(page, server):
    base, _ = server
    page.goto(base + "/duplicates")
    expect(page.locator("#groups .group").first).to_be_visible(timeout=60_000)
    page.fill("#threshold", "1")
    with page.expect_response(lambda r: "threshold=1" in r.url):
        page.click("#rescan")
    expect(page.locator("#dup-empty")).to_be_visible()
    page.fill("#threshold", "")
    page.check("#within")
    with page.expect_response(lambda r: "within_products=true" in r.url):
        page.click("#rescan")
    inner = page.locator(".group", has=page.locator('[data-product-id="fw-footwear_0020"]'))
    expect(inner.first).to_be_visible()
