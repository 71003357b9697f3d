"""The search page in a real browser: Playwright drives Debian's chromium
(/usr/bin/chromium; `make test` installs it with scripts/install-browser.sh) against a real
`python -m lookalike serve` process on a loopback port and a 40-product real catalog.
Screenshots go to test-output/browser/ (git-ignored)."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_server import LiveServer
from PIL import Image
from test_api import build_catalog  # the same small real catalog as the API tests

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "../shared/data"
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-output" / "browser"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[dict]]:
    home, rows = build_catalog(tmp_path_factory.getbasetemp() / "api-catalog")
    copy = tmp_path_factory.mktemp("browser") / "home"
    shutil.copytree(home, copy)
    return copy, rows


@pytest.fixture(scope="module")
def server(catalog, tmp_path_factory) -> Iterator[str]:
    """A real `lookalike serve` process, ready (model loaded, catalog open)."""
    home, _ = catalog
    live = LiveServer(home, log=tmp_path_factory.mktemp("server-log") / "serve.log")
    live.env.pop("LOOKALIKE_API_KEY", None)  # the page as a shopper sees it: no writes
    with live:
        yield live.url


@pytest.fixture(scope="module")
def browser_context() -> Iterator:
    if not CHROMIUM.exists():
        pytest.skip(
            f"{CHROMIUM} is missing: run scripts/install-browser.sh (make test does) to install"
            " Debian's chromium"
        )
    profile = tempfile.mkdtemp(prefix="lookalike-chromium-")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile,
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport=DESKTOP,
        )
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


# Records what the page sends (form fields; image sizes) so tests can check the request.
RECORD_REQUESTS = """
window.__sent = [];
const realFetch = window.fetch;
window.fetch = async (url, options = {}) => {
  if (options.body instanceof FormData) {
    const entry = { url: String(url) };
    for (const [key, value] of options.body.entries()) {
      if (value instanceof Blob) {
        const bitmap = await createImageBitmap(value).catch(() => null);
        entry[key] = bitmap ? [bitmap.width, bitmap.height] : value.size;
      } else {
        entry[key] = value;
      }
    }
    window.__sent.push(entry);
  }
  return realFetch(url, options);
};
"""


def last_sent(page) -> dict:
    return page.evaluate("window.__sent[window.__sent.length - 1]")


@pytest.fixture
def page(browser_context, server):
    page = browser_context.new_page()
    page.add_init_script(RECORD_REQUESTS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_viewport_size(DESKTOP)
    page.goto(server + "/")
    expect(page.locator("#catalog-status")).to_contain_text("40 products")
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def wait_for_results(page, action, url_part: str = "/search") -> None:
    """Run `action` and wait until the search it starts has been rendered."""
    with page.expect_response(lambda r: url_part in r.url):
        action()
    expect(page.locator("#busy")).to_be_hidden()


def wait_until(page, condition: str, seconds: float = 20) -> None:
    """Poll a JS condition with evaluate. (Playwright's wait_for_function polls through
    eval, which the pages' CSP forbids: that made such waits flaky.)"""
    deadline = time.monotonic() + seconds
    while not page.evaluate(condition):
        assert time.monotonic() < deadline, f"still not true after {seconds} s: {condition}"
        page.wait_for_timeout(100)


def cards(page) -> list[dict]:
    return page.locator("#grid .card").evaluate_all(
        """cards => cards.map(c => ({
            id: c.dataset.productId,
            title: c.querySelector('.title').textContent,
            category: (c.querySelector('.category') || {}).textContent || null,
            price: c.querySelector('.price').textContent,
            stock: c.querySelector('.badge').textContent,
            score: c.querySelector('.score span').textContent,
            imageLoaded: c.querySelector('img').complete && c.querySelector('img').naturalWidth > 0,
        }))"""
    )


def two_products_photo(rows: list[dict], path: Path) -> tuple[dict, dict]:
    """A 'shopper photo' with two different catalog products side by side."""
    left, right = rows[2], rows[30]
    canvas = Image.new("RGB", (520, 360), "white")
    canvas.paste(Image.open(left["image"]).convert("RGB").resize((240, 320)), (10, 20))
    canvas.paste(Image.open(right["image"]).convert("RGB").resize((240, 320)), (270, 20))
    canvas.save(path, format="JPEG", quality=95)
    return left, right


def test_upload_a_photo_and_see_results(page, catalog):
    _, rows = catalog
    row = rows[7]
    wait_for_results(page, lambda: page.set_input_files("#file-input", row["image"]))
    found = cards(page)
    assert len(found) == 12  # the page's default k
    assert found[0]["id"] == row["product_id"]
    assert found[0]["title"] == row["title"]
    shown = [float(c["score"].removeprefix("similarity ")) for c in found]
    assert shown == sorted(shown, reverse=True) and 0.9 < shown[0] <= 1.0
    # thumbnails load after the cards render: wait until each has loaded or failed
    wait_until(
        page, "() => [...document.querySelectorAll('#grid .card img')].every(i => i.complete)"
    )
    found = cards(page)
    assert all(c["imageLoaded"] for c in found), "every result shows its thumbnail"
    expect(page.locator("#timing")).to_contain_text("12 results")
    expect(page.locator("#timing")).to_contain_text("ms on the server")
    expect(page.locator("#results-heading")).to_have_text("Products like your photo")
    expect(page.locator("#error")).to_be_hidden()
    shot(page, "desktop-results")


def test_select_a_region_then_search(page, catalog, tmp_path):
    _, rows = catalog
    photo = tmp_path / "two-products.jpg"
    left, right = two_products_photo(rows, photo)
    wait_for_results(page, lambda: page.set_input_files("#file-input", str(photo)))
    box = page.locator("#stage").bounding_box()
    scale = box["width"] / 520  # the preview is shown scaled to fit

    def drag(x0: float, y0: float, x1: float, y1: float) -> None:
        page.mouse.move(box["x"] + x0 * scale, box["y"] + y0 * scale)
        page.mouse.down()
        page.mouse.move(box["x"] + (x0 + x1) / 2 * scale, box["y"] + (y0 + y1) / 2 * scale)
        page.mouse.move(box["x"] + x1 * scale, box["y"] + y1 * scale)
        page.mouse.up()

    wait_for_results(page, lambda: drag(272, 22, 508, 338))
    x, y, w, h = (int(v) for v in last_sent(page)["crop"].split(","))
    assert abs(x - 272) <= 3 and abs(y - 22) <= 3 and abs(w - 236) <= 3 and abs(h - 316) <= 3
    expect(page.locator("#results-heading")).to_have_text("Products like the selected area")
    expect(page.locator("#selection")).to_be_visible()
    expect(page.locator("#crop-info")).to_contain_text("selected area")
    assert cards(page)[0]["id"] == right["product_id"]
    shot(page, "desktop-crop-right")

    wait_for_results(page, lambda: drag(12, 22, 248, 338))
    assert cards(page)[0]["id"] == left["product_id"]

    wait_for_results(page, lambda: page.click("#clear-crop"))
    expect(page.locator("#selection")).to_be_hidden()
    expect(page.locator("#results-heading")).to_have_text("Products like your photo")


def test_filters(page, catalog):
    _, rows = catalog
    wait_for_results(page, lambda: page.set_input_files("#file-input", rows[0]["image"]))

    wait_for_results(page, lambda: page.select_option("#category", "Flats"))
    flats = cards(page)
    expected = [r for r in rows if r["category"] == "Flats"]
    assert len(flats) == min(12, len(expected))
    assert {c["category"] for c in flats} == {"Flats"}

    wait_for_results(page, lambda: page.check("#in-stock"))
    in_stock = cards(page)
    assert in_stock and {c["stock"] for c in in_stock} == {"In stock"}
    assert len(in_stock) == len([r for r in expected if r["in_stock"]])

    page.select_option("#category", "")
    wait_for_results(page, lambda: page.uncheck("#in-stock"))
    page.fill("#price-min", "50")
    page.fill("#price-max", "120")
    wait_for_results(page, lambda: page.click("#search-button"))
    priced = cards(page)
    assert priced
    for card in priced:
        assert 50 <= float(card["price"].replace(",", "")) <= 120

    page.select_option("#k", "6")
    wait_for_results(page, lambda: page.click("#search-button"))
    assert len(cards(page)) == 6
    shot(page, "desktop-filters")

    page.fill("#price-min", "300")
    page.fill("#price-max", "10")
    page.click("#search-button")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("minimum price is higher")


def test_click_a_result_for_more_like_this(page, catalog):
    _, rows = catalog
    wait_for_results(page, lambda: page.set_input_files("#file-input", rows[7]["image"]))
    second = page.locator("#grid .card").nth(1)
    clicked = second.get_attribute("data-product-id")
    title = second.locator(".title").text_content()
    wait_for_results(page, lambda: second.click(), url_part="/similar")
    expect(page.locator("#results-heading")).to_have_text(f"More like “{title}”")
    expect(page.locator("#back")).to_be_visible()
    similar = cards(page)
    assert len(similar) == 12
    assert clicked not in {c["id"] for c in similar}
    shot(page, "desktop-more-like-this")

    wait_for_results(page, lambda: page.click("#back"))
    expect(page.locator("#results-heading")).to_have_text("Products like your photo")
    assert cards(page)[0]["id"] == rows[7]["product_id"]


def test_a_non_image_file_shows_an_error(page, catalog, tmp_path):
    _, rows = catalog
    wait_for_results(page, lambda: page.set_input_files("#file-input", rows[0]["image"]))
    assert cards(page)
    bogus = tmp_path / "notes.txt"
    bogus.write_text("this is a shopping list, not a photo\n")
    with page.expect_response(lambda r: "/search" in r.url) as response:
        page.set_input_files("#file-input", str(bogus))
    assert response.value.status == 415
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("not an image we can read")
    expect(error).to_contain_text("notes.txt: not a recognised image format")
    assert cards(page) == []  # the previous photo's results are not left on show
    expect(page.locator("#results-heading")).to_have_text("Results")
    shot(page, "desktop-error")


def test_drop_and_paste_a_photo(page, catalog):
    """Drag-and-drop and clipboard paste, with the File built inside the page."""
    _, rows = catalog
    row = rows[20]
    data = list(Path(row["image"]).read_bytes())
    make_file = "bytes => new File([new Uint8Array(bytes)], 'shoe.jpg', {type: 'image/jpeg'})"

    def drop() -> None:
        page.evaluate(
            f"""bytes => {{
                const dt = new DataTransfer();
                dt.items.add(({make_file})(bytes));
                const zone = document.getElementById('drop-zone');
                zone.dispatchEvent(new DragEvent('dragenter', {{dataTransfer: dt, bubbles: true}}));
                zone.dispatchEvent(new DragEvent('drop', {{dataTransfer: dt, bubbles: true,
                                                           cancelable: true}}));
            }}""",
            data,
        )

    wait_for_results(page, drop)
    assert cards(page)[0]["id"] == row["product_id"]
    expect(page.locator("#drop-zone")).not_to_have_class("dragging")

    other = rows[33]
    data = list(Path(other["image"]).read_bytes())

    def paste() -> None:
        page.evaluate(
            f"""bytes => {{
                const dt = new DataTransfer();
                dt.items.add(({make_file})(bytes));
                document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: dt,
                                                                     bubbles: true}}));
            }}""",
            data,
        )

    wait_for_results(page, paste)
    assert cards(page)[0]["id"] == other["product_id"]


def test_camera_input_is_offered(page):
    camera = page.locator("#camera-input")
    assert camera.get_attribute("capture") == "environment"
    assert camera.get_attribute("accept") == "image/*"
    expect(page.locator("label[for=camera-input]")).to_have_text("Take photo")


def test_phone_sized_screen(page, catalog):
    _, rows = catalog
    page.set_viewport_size(PHONE)
    page.reload()
    expect(page.locator("#catalog-status")).to_contain_text("40 products")
    shot(page, "phone-start")
    wait_for_results(page, lambda: page.set_input_files("#file-input", rows[25]["image"]))
    assert cards(page)[0]["id"] == rows[25]["product_id"]
    overflow = page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow}px on a phone"
    columns = page.evaluate(
        "getComputedStyle(document.getElementById('grid')).gridTemplateColumns.split(' ').length"
    )
    assert columns == 2
    for card in page.locator("#grid .card").all()[:4]:
        inner = card.evaluate("c => c.scrollWidth - c.clientWidth")
        assert inner <= 0, "card content overflows its card"
    shot(page, "phone-results")


def test_large_photo_is_scaled_down_before_upload(page, catalog, tmp_path):
    """A 12-megapixel photo is sent scaled to 2048 px, and its crop box scaled with it."""
    _, rows = catalog
    row = rows[15]
    big = Image.new("RGB", (4000, 3000), (240, 240, 240))
    big.paste(Image.open(row["image"]).convert("RGB").resize((1500, 2000)), (2000, 500))
    path = tmp_path / "big.jpg"
    big.save(path, format="JPEG", quality=85)
    wait_for_results(page, lambda: page.set_input_files("#file-input", str(path)))
    assert last_sent(page)["image"] == [2048, 1536]
    stage = page.locator("#stage").bounding_box()
    scale = stage["width"] / 4000
    page.mouse.move(stage["x"] + 2010 * scale, stage["y"] + 510 * scale)
    page.mouse.down()
    page.mouse.move(stage["x"] + 3490 * scale, stage["y"] + 2490 * scale)
    wait_for_results(page, lambda: page.mouse.up())
    x, y, w, h = (int(v) for v in last_sent(page)["crop"].split(","))
    scale = 2048 / 4000  # the box is sent in the uploaded (scaled-down) image's pixels
    assert abs(x - 2010 * scale) <= 6 and abs(y - 510 * scale) <= 6
    assert abs(w - 1480 * scale) <= 6 and abs(h - 1980 * scale) <= 6
    assert cards(page)[0]["id"] == row["product_id"]


def test_words_alone_photo_and_words(page, catalog):
    """One search box beside the photo: words alone, then photo + words; the cards say
    which words each product has, and words that match nothing keep the photo's results."""
    _, rows = catalog
    heels = [r for r in rows if r["category"] == "Heels"]
    assert heels, "the test catalog holds heels"
    page.fill("#q", "heels")
    expect(page.locator("#search-button")).to_be_enabled()
    wait_for_results(page, lambda: page.press("#q", "Enter"), "/search?q=heels")
    found = page.locator("#grid .card").evaluate_all(
        "cards => cards.map(c => [c.querySelector('.category').textContent,"
        " c.querySelector('.matched').textContent, c.querySelector('.score span').textContent])"
    )
    assert found and all(m == "words: heels" for _, m, _ in found)
    assert sum(cat == "Heels" for cat, _, _ in found) >= min(len(heels), len(found)) - 2
    assert all(s.startswith("words match ") for _, _, s in found)
    expect(page.locator("#results-heading")).to_have_text("Products matching “heels”")
    shot(page, "desktop-words")

    stiletto = DATA / "footwear300/search_image_01.jpg"
    wait_for_results(page, lambda: page.set_input_files("#file-input", str(stiletto)))
    assert last_sent(page)["q"] == "heels" and "image" in last_sent(page)
    expect(page.locator("#results-heading")).to_have_text("Products like your photo, with “heels”")
    both = page.locator("#grid .card .matched").all_text_contents()
    assert both and all(m == "words: heels" for m in both[: len(heels)])
    expect(page.locator("#words-note")).to_be_hidden()
    shot(page, "desktop-photo-and-words")

    page.fill("#q", "qwertyuiop")
    wait_for_results(page, lambda: page.click("#search-button"))
    expect(page.locator("#words-note")).to_be_visible()
    expect(page.locator("#words-note")).to_contain_text("results from the photo alone")
    assert page.locator("#grid .card").count() == 12
    assert page.locator("#grid .card .matched").count() == 0
