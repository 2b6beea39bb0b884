"""End-to-end in a real headless browser: the real server.py (waitress) around a temporary index, driven by Chromium.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``), the ``playwright`` Python package
(requirements-dev.txt) and axe-core from npm (``npm ci`` at the repository root; ``scripts/setup.sh --dev`` runs it);
``playwright install`` is never used. Missing any of them is a failure, not a skip.

axe-core is injected into every page with ``add_init_script`` (DevTools, not a <script> tag, so the page's CSP stays
as it is) and every state of the page is checked for critical and serious violations.

``RETRIEVAL_SCREENSHOT_DIR=docs`` copies the screenshots the README shows (desktop, phone, dark mode, error, no index)
into ``docs/``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the browser fixture as a failure
    expect = None

from conftest import DEMO_DATABASE, REPO, start_server, stop
from retrieval.indexing import build_index
from retrieval.storage.database import FeatureDatabase, read_database, write_database

CHROMIUM = Path(os.environ.get("RETRIEVAL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
AXE_PACKAGE = REPO / "node_modules" / "axe-core"
GROUPS = ("coffee", "chelsea", "rocket", "astronaut")
VIEWS = ("original.jpg", "view-01.jpg", "view-02.jpg")
LONG_PATH = "clock/station-platform-clocks/old-railway-station-platform-clock.jpg"  # hyphens and a nested folder
SIZE = 13
MAX_UPLOAD = 20 * 1024 * 1024
DESKTOP = {"viewport": {"width": 1280, "height": 800}}
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
AXE_REPORT: dict[str, list] = {}


@dataclass
class Served:
    url: str
    folder: Path
    index: Path
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def axe_script() -> Path:
    script = AXE_PACKAGE / "axe.min.js"
    if not script.exists():
        pytest.fail(f"axe-core is missing ({script}): run `npm ci` in {REPO} (scripts/setup.sh --dev does)", pytrace=False)
    pinned = json.loads((REPO / "package.json").read_text())["devDependencies"]["axe-core"]
    installed = json.loads((AXE_PACKAGE / "package.json").read_text())["version"]
    assert installed == pinned, f"axe-core {installed} is installed, package.json pins {pinned}: run `npm ci`"
    return script


@pytest.fixture(scope="module")
def browser(axe_script):
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install chromium` (Debian)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -r requirements-dev.txt", pytrace=False)
    # the page's CSP forbids eval, so waits use expect()/selectors or evaluate(), never wait_for_function strings
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        browser.axe_script = axe_script
        yield browser
        browser.close()
    if AXE_REPORT:
        print("\naxe-core violations by state (none may be critical or serious):")
        for state, violations in AXE_REPORT.items():
            print(f"  {state}: {[(v['id'], v['impact']) for v in violations] or 'none'}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server.py around a 13-image index (four groups of three, and one deep, hyphenated path)."""
    root = tmp_path_factory.mktemp("browser")
    folder = root / "images"
    for group in GROUPS:
        (folder / group).mkdir(parents=True)
        for view in VIEWS:
            shutil.copy(DEMO_DATABASE / group / view, folder / group / view)
    (folder / LONG_PATH).parent.mkdir(parents=True)
    shutil.copy(DEMO_DATABASE / "clock" / "original.jpg", folder / LONG_PATH)
    index = root / "index.h5"
    build_index(folder, index, backbone="efficientnet-lite0", progress=False)
    log = root / "server.log"
    process, url = start_server(log, "--index", index, "--threads", "4")
    try:
        yield Served(url, folder, index, log)
    finally:
        stop(process)


# ---------------------------------------------------------------------------------------------------- helpers


def keep_screenshot(path: Path) -> None:
    """Screenshots live in pytest's tmp dir; RETRIEVAL_SCREENSHOT_DIR=DIR also copies them there (docs/, CI)."""
    print(f"screenshot: {path}")
    target = os.environ.get("RETRIEVAL_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def open_page(browser, url, **context_options):
    context = browser.new_context(**context_options)
    context.add_init_script(path=str(browser.axe_script))
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(url)
    return context, page, problems


def assert_accessible(page, state: str) -> None:
    """axe-core over the whole page in its current state: no critical or serious violation."""
    violations = page.evaluate(
        """async () => {
            const result = await axe.run(document, {resultTypes: ['violations']});
            return result.violations.map((v) => ({id: v.id, impact: v.impact, help: v.help,
                                                  nodes: v.nodes.slice(0, 5).map((n) => n.target.join(' '))}));
        }"""
    )
    AXE_REPORT[state] = violations
    blocking = [v for v in violations if v["impact"] in ("critical", "serious")]
    assert not blocking, f"axe-core, state {state!r}: {json.dumps(blocking, indent=1)}"


def wait_for_thumbnails(page) -> None:
    """Until every thumbnail in (or near) the viewport has loaded."""
    page.evaluate(
        """async () => {
            for (let i = 0; i < 300; i++) {
                const near = [...document.querySelectorAll('#grid img')]
                    .filter((img) => img.getBoundingClientRect().top < window.innerHeight + 300);
                if (near.every((img) => img.getAttribute('src') && img.complete)) return;
                await new Promise((resolve) => setTimeout(resolve, 50));
            }
            throw new Error('thumbnails did not load');
        }"""
    )


def first_path(page):
    return page.locator("#grid .card").first


def card_paths(page) -> list[str]:
    return [card.get_attribute("data-path") for card in page.locator("#grid .card").all()]


def card(page, path: str):
    return page.locator(f'#grid .card[data-path="{path}"]')


def database_ids(page, url) -> dict[str, int]:
    items = page.request.get(url + "api/sample?n=200").json()["items"]
    return {item["path"]: item["id"] for item in items}


def rgb(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in re.findall(r"[\d.]+", text)[:3])


def contrast(a: str, b: str) -> float:
    def luminance(color):
        channels = [c / 255 for c in rgb(color)]
        linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def upload(page, path: Path) -> None:
    page.set_input_files("#file-input", str(path))


def kb(size: int) -> str:
    return f"{int(size / 1024 + 0.5)}\u00a0kB"


def ignore_failed_loads(problems: list[str], *codes: str) -> list[str]:
    """Console errors other than the browser's own notes about requests that were meant to fail."""
    return [p for p in problems if not (p.startswith("Failed to load resource") and any(c in p for c in codes))]


# ---------------------------------------------------------------------------------------------------- the core flow


def test_search_by_upload_then_by_clicking_a_result(browser, server, tmp_path):
    url, folder = server.url, server.folder
    context, page, problems = open_page(browser, url, **DESKTOP)
    try:
        # before any query: the database facts and a sample to start from
        page.wait_for_selector("#grid .card img")
        assert page.inner_text("#info-size") == str(SIZE) and page.inner_text("#info-backbone") == "efficientnet-lite0"
        assert page.inner_text("#info-pooling") == "max"
        assert page.locator("#grid .card").count() == SIZE and page.locator("#grid .rank").count() == 0
        assert page.title() == "Image search" and page.locator("h1").inner_text() == "Image search"
        wait_for_thumbnails(page)
        assert_accessible(page, "sample")

        # pick a file: the query is shown and the ranked grid has the same photo first
        upload(page, folder / "coffee" / "original.jpg")
        page.wait_for_selector('#grid .card[data-rank="1"]')
        assert page.is_visible("#query-image") and "original.jpg" in page.inner_text("#query-caption")
        paths = card_paths(page)
        assert len(paths) == 10 and paths[0] == "coffee/original.jpg"
        assert set(paths[1:3]) == {"coffee/view-01.jpg", "coffee/view-02.jpg"}
        assert page.locator("#grid .rank").all_inner_texts()[:3] == ["#1", "#2", "#3"]
        assert page.locator("#grid .card .score").first.inner_text() == "score 1.000"
        assert re.fullmatch(rf"Top 10 of {SIZE} · \d+ ms", page.inner_text("#status"))
        assert page.title() == "Similar to original.jpg – Image search"
        wait_for_thumbnails(page)
        assert_accessible(page, "results")
        page.screenshot(path=str(tmp_path / "screenshot.png"))

        # load more
        page.click("#more-button")
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        assert page.is_hidden("#more-button")

        # click a result: it becomes the query, and the ranking follows it
        card(page, "rocket/view-01.jpg").locator("button.card-search").click()
        expect(first_path(page)).to_have_attribute("data-path", "rocket/view-01.jpg")
        assert "rocket/view-01.jpg" in page.inner_text("#query-caption") and "?id=" in page.url
        assert set(card_paths(page)[1:3]) == {"rocket/original.jpg", "rocket/view-02.jpg"}
        assert page.title() == "Similar to rocket/view-01.jpg – Image search"

        # the keyboard works too: results are real buttons
        card(page, "chelsea/view-02.jpg").locator("button.card-search").focus()
        page.keyboard.press("Enter")
        expect(first_path(page)).to_have_attribute("data-path", "chelsea/view-02.jpg")

        # a result opens at full size, served by id
        href = page.locator("#grid .card a.open").first.get_attribute("href")
        assert re.fullmatch(r"/image/\d+\?v=\w+", href)
        full = page.request.get(url.rstrip("/") + href)
        assert full.ok and full.headers["content-type"] == "image/jpeg"
        assert full.body() == (folder / "chelsea" / "view-02.jpg").read_bytes()

        # every picture has alt text; no script or CSP errors happened
        assert page.evaluate("[...document.images].filter((img) => img.getAttribute('src')).every((img) => img.alt.trim().length > 0)")
        assert problems == []
        keep_screenshot(tmp_path / "screenshot.png")
    finally:
        context.close()


def test_drop_and_paste(browser, server):
    context, page, problems = open_page(browser, server.url, **DESKTOP)
    try:
        page.wait_for_selector("#grid .card img")
        ids = database_ids(page, server.url)
        # a dropped file
        page.evaluate(
            """async (href) => {
                const blob = await (await fetch(href)).blob();
                const transfer = new DataTransfer();
                transfer.items.add(new File([blob], 'dropped.jpg', {type: 'image/jpeg'}));
                document.getElementById('dropzone').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }""",
            f"/image/{ids['astronaut/original.jpg']}",
        )
        page.wait_for_selector('#grid .card[data-rank="1"]')
        assert "dropped.jpg" in page.inner_text("#query-caption") and card_paths(page)[0] == "astronaut/original.jpg"

        # a pasted image
        page.evaluate(
            """async (href) => {
                const blob = await (await fetch(href)).blob();
                const transfer = new DataTransfer();
                transfer.items.add(new File([blob], 'pasted.jpg', {type: 'image/jpeg'}));
                document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: transfer, bubbles: true}));
            }""",
            f"/image/{ids['coffee/original.jpg']}",
        )
        expect(page.locator("#query-caption")).to_contain_text("pasted.jpg")
        expect(first_path(page)).to_have_attribute("data-path", "coffee/original.jpg")
        assert problems == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- items 1, 2, 9, 12: keyboard


def test_keyboard_focus_ring_tab_stops_shortcuts_and_load_more(browser, server, tmp_path):
    from PIL import Image

    context, page, problems = open_page(browser, server.url, **DESKTOP)
    try:
        upload(page, server.folder / "coffee" / "original.jpg")
        page.wait_for_selector('#grid .card[data-rank="1"]')
        wait_for_thumbnails(page)

        # 12: one tab stop for the whole grid: Choose -> k -> folder -> the grid -> Load more
        page.focus("#choose-button")
        for _ in range(3):
            page.keyboard.press("Tab")
        first = page.locator('#grid .card[data-rank="1"] button.card-search')
        expect(first).to_be_focused()
        assert page.locator("#grid [tabindex='0']").count() == 1
        assert page.locator("#grid a:not([tabindex='-1'])").count() == 0
        page.keyboard.press("Tab")
        expect(page.locator("#more-button")).to_be_focused()
        page.keyboard.press("Shift+Tab")
        expect(first).to_be_focused()

        # 1 + 9: the ring is drawn where it is seen (around the card and inside the photo), at 3:1 or more
        li = page.locator('#grid .card[data-rank="1"]')
        ring = li.evaluate("(node) => getComputedStyle(node).outlineColor")
        page_bg = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert li.evaluate("(node) => getComputedStyle(node).outlineStyle") == "solid"
        assert contrast(ring, page_bg) >= 3, (ring, page_bg)
        shot = tmp_path / "focus.png"
        page.screenshot(path=str(shot))
        box = li.bounding_box()
        button = first.bounding_box()
        pixels = Image.open(shot).convert("RGB")
        expected = rgb(ring)
        outside = pixels.getpixel((int(box["x"] - 3.5), int(box["y"] + box["height"] / 2)))
        inside = pixels.getpixel((int(button["x"] + 1.5), int(button["y"] + button["height"] / 2)))
        for seen in (outside, inside):
            assert all(abs(a - b) <= 40 for a, b in zip(seen, expected)), (seen, expected)

        # 12: arrow keys move across results
        columns = page.evaluate("getComputedStyle(document.getElementById('grid')).gridTemplateColumns.split(' ').length")
        page.keyboard.press("ArrowRight")
        expect(page.locator('#grid .card[data-rank="2"] button.card-search')).to_be_focused()
        page.keyboard.press("ArrowDown")
        expect(page.locator(f'#grid .card[data-rank="{2 + columns}"] button.card-search')).to_be_focused()
        page.keyboard.press("End")
        expect(page.locator('#grid .card[data-rank="10"] button.card-search')).to_be_focused()
        page.keyboard.press("Home")
        expect(first).to_be_focused()
        assert page.locator("#grid [tabindex='0']").count() == 1

        # 2: Load more by keyboard: focus goes on to result 11 (it used to drop to <body>), and Tab carries on from there
        page.focus("#more-button")
        page.keyboard.press("Enter")
        expect(page.locator('#grid .card[data-rank="11"] button.card-search')).to_be_focused()
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement !== document.body")
        page.keyboard.press("Shift+Tab")
        expect(page.locator('#grid .card[data-rank="11"] button.card-search')).to_be_focused()

        # 12: ? shows the shortcuts, Esc closes them and focus comes back
        page.keyboard.press("?")
        expect(page.locator("#help")).to_be_visible()
        assert_accessible(page, "help dialog")
        page.keyboard.press("Escape")
        expect(page.locator("#help")).to_be_hidden()
        expect(page.locator('#grid .card[data-rank="11"] button.card-search')).to_be_focused()

        # 12: / and u open the file picker. Playwright turns the browser's file-chooser interception on when the first
        # listener is added, without waiting for it: a listener first, and a round trip, so no key press races it
        page.on("filechooser", lambda chooser: None)
        page.evaluate("0")
        for key in ("/", "u"):
            with page.expect_file_chooser() as chooser:
                page.keyboard.press(key)
            assert not chooser.value.is_multiple()
            chooser.value.set_files([])  # close it (nothing chosen: nothing happens)

        # 13 by keyboard: D downloads the selected result, O opens its original
        with page.expect_download() as download:
            page.keyboard.press("d")
        assert download.value.suggested_filename == Path(card_paths(page)[10]).name
        with context.expect_page() as opened:
            page.keyboard.press("o")
        opened.value.wait_for_load_state()
        assert re.search(r"/image/\d+\?v=\w+$", opened.value.url)
        opened.value.close()

        # Enter searches with the selected result; focus lands on the results heading, not on <body>
        chosen = card_paths(page)[10]
        page.keyboard.press("Enter")
        expect(first_path(page)).to_have_attribute("data-path", chosen)
        expect(page.locator("#results-heading")).to_be_focused()
        assert problems == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 3, 11, 12: phone


def test_phone_sized_screen(browser, server, tmp_path):
    url, folder = server.url, server.folder
    context, page, problems = open_page(browser, url, **PHONE)
    try:
        page.wait_for_selector("#grid .card img")
        # 12: touch screens get touch advice, not "drop" and "Ctrl+V"
        hint = page.inner_text("#drop-hint")
        assert "Take a photo" in hint and "Ctrl+V" not in hint and "Drop" not in hint
        assert page.is_hidden("#help-button")
        wait_for_thumbnails(page)
        assert_accessible(page, "phone, sample")

        # 11: the busy indicator is next to the query, on screen, and the button is disabled meanwhile
        held = []
        page.route("**/api/search*", lambda route: held.append(route))
        upload(page, folder / "chelsea" / "original.jpg")
        expect(page.locator("#busy")).to_be_visible()
        busy = page.locator("#busy").bounding_box()
        assert 0 <= busy["y"] and busy["y"] + busy["height"] <= 844
        expect(page.locator("#choose-button")).to_have_attribute("aria-disabled", "true")
        expect(page.locator("#busy")).to_contain_text("Searching")
        while not held:
            page.wait_for_timeout(20)
        held[0].continue_()
        page.unroute("**/api/search*")

        # 3: the query and the first result (with its score) are on screen without scrolling
        page.wait_for_selector('#grid .card[data-rank="1"]')
        assert card_paths(page)[0] == "chelsea/original.jpg"
        expect(page.locator("#busy")).to_be_hidden()
        score = page.locator("#grid .card .score").first.bounding_box()
        assert score["y"] + score["height"] <= 844, score
        preview = page.locator("#query-image").bounding_box()
        assert preview["y"] >= 0 and preview["y"] + preview["height"] <= 844
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        query_box = page.locator(".query-panel").bounding_box()
        grid_box = page.locator("#grid").bounding_box()
        assert grid_box["y"] >= query_box["y"] + query_box["height"]  # one column: results below the query
        wait_for_thumbnails(page)
        assert_accessible(page, "phone, results")
        page.screenshot(path=str(tmp_path / "screenshot-phone.png"))
        keep_screenshot(tmp_path / "screenshot-phone.png")

        # 3: a shared link, too
        ids = database_ids(page, url)
        page.goto(f"{url}?id={ids['rocket/view-02.jpg']}&k=10")
        expect(first_path(page)).to_have_attribute("data-path", "rocket/view-02.jpg")
        score = page.locator("#grid .card .score").first.bounding_box()
        assert score["y"] + score["height"] <= 844, score
        assert problems == []
    finally:
        context.close()


def test_a_photo_the_browser_cannot_show_is_still_searched(browser, server):
    """A phone's HEIC photo picked on a desktop (Chromium shows no HEIC): the search runs on the server, which reads
    it, and the preview says so instead of showing a broken image; the next query shows its picture again."""
    url, folder = server.url, server.folder
    context, page, problems = open_page(browser, url, **DESKTOP)
    try:
        page.wait_for_selector("#grid .card img")
        upload(page, Path(__file__).with_name("rotated-coffee.heic"))
        page.wait_for_selector('#grid .card[data-rank="1"]')
        expect(page.locator("#query-meta")).to_contain_text("this browser cannot show it")
        assert page.is_hidden("#query-image") and "rotated-coffee.heic" in page.inner_text("#query-caption")
        assert_accessible(page, "an upload without a preview")
        upload(page, folder / "coffee" / "original.jpg")
        expect(first_path(page)).to_have_attribute("data-path", "coffee/original.jpg")
        expect(page.locator("#query-image")).to_be_visible()
        assert "cannot show" not in page.inner_text("#query-meta")
        assert problems == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- items 9, 10: dark mode


def test_dark_mode(browser, server, tmp_path):
    context, page, problems = open_page(browser, server.url, color_scheme="dark", **DESKTOP)
    try:
        page.wait_for_selector("#grid .card img")
        wait_for_thumbnails(page)
        assert_accessible(page, "dark, sample")
        upload(page, server.folder / "rocket" / "original.jpg")
        page.wait_for_selector('#grid .card[data-rank="1"]')
        wait_for_thumbnails(page)
        assert_accessible(page, "dark, results")
        badge = page.locator('#grid .card[data-rank="1"] .rank')
        colors = badge.evaluate("(node) => [getComputedStyle(node).color, getComputedStyle(node).backgroundColor]")
        assert contrast(*colors) >= 4.5, colors  # it was 2.61:1
        page.focus("#folder-select")
        page.keyboard.press("Tab")
        li = page.locator('#grid .card[data-rank="1"]')
        ring = li.evaluate("(node) => getComputedStyle(node).outlineColor")
        assert contrast(ring, page.evaluate("getComputedStyle(document.body).backgroundColor")) >= 3
        page.screenshot(path=str(tmp_path / "screenshot-dark.png"))
        keep_screenshot(tmp_path / "screenshot-dark.png")
        assert problems == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 4: failures


def test_failures_never_mix_the_query_with_other_results(browser, server, tmp_path):
    context, page, problems = open_page(browser, server.url, **DESKTOP)
    try:
        upload(page, server.folder / "coffee" / "original.jpg")
        page.wait_for_selector('#grid .card[data-rank="1"]')
        before = card_paths(page)
        url_before = page.url

        # a file that is not an image: said plainly; the query, its results and Load more all stay as they were
        not_image = tmp_path / "holiday.jpg"
        not_image.write_text("this is a text file with an image's name")
        upload(page, not_image)
        page.wait_for_selector("#error:not([hidden])")
        message = page.inner_text("#error")
        assert "“holiday.jpg”" in message and "not an image" in message and "Traceback" not in message
        assert "still those for “original.jpg”" in message
        assert page.inner_text("#error-action") == "Choose another image…"
        assert page.inner_text("#query-caption") == "original.jpg" and page.is_visible("#query-image")
        assert card_paths(page) == before and page.url == url_before
        # ... and they still work: Load more and k send their requests for the query on screen
        with page.expect_request(lambda r: "/api/search" in r.url and r.method == "POST"):
            page.click("#more-button")
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        with page.expect_request(lambda r: "/api/search" in r.url and r.method == "POST"):
            page.select_option("#k-select", "20")
        expect(page.locator("#status")).to_contain_text(f"Top {SIZE} of {SIZE}")
        page.select_option("#k-select", "10")
        expect(page.locator("#status")).to_contain_text(f"Top 10 of {SIZE}")
        before = card_paths(page)

        # the server is unreachable: changing k fails, and the control goes back to what the grid shows
        page.route("**/api/search*", lambda route: route.abort())
        page.select_option("#k-select", "20")
        expect(page.locator("#error-text")).to_contain_text("cannot be reached")
        expect(page.locator("#k-select")).to_have_value("10")
        # clicking a result changes nothing but the message, which offers a retry
        card(page, "rocket/view-01.jpg").locator("button.card-search").click()
        expect(page.locator("#error-text")).to_contain_text("Could not search with “rocket/view-01.jpg”")
        assert "cannot be reached" in page.inner_text("#error-text") and page.inner_text("#error-action") == "Try again"
        assert page.inner_text("#query-caption") == "original.jpg" and card_paths(page) == before
        assert page.url == url_before and page.title() == "Similar to original.jpg – Image search"
        assert_accessible(page, "error")
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(tmp_path / "screenshot-error.png"))
        keep_screenshot(tmp_path / "screenshot-error.png")

        # back online: Try again runs the last search, and the preview, URL and grid change together
        page.unroute("**/api/search*")
        page.click("#error-action")
        expect(first_path(page)).to_have_attribute("data-path", "rocket/view-01.jpg")
        assert "rocket/view-01.jpg" in page.inner_text("#query-caption") and "?id=" in page.url
        assert page.is_hidden("#error")
        assert ignore_failed_loads(problems, "415", "ERR_FAILED") == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 5: URL and history


def test_state_is_in_the_url_and_history(browser, server):
    url = server.url
    context, page, problems = open_page(browser, url, **DESKTOP)
    try:
        ids = database_ids(page, url)
        rocket = ids["rocket/original.jpg"]
        page.goto(f"{url}?id={rocket}&k=20")
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        expect(page.locator("#k-select")).to_have_value("20")
        assert page.title() == "Similar to rocket/original.jpg – Image search"
        page.reload()  # k survives a reload (it did not)
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        expect(page.locator("#k-select")).to_have_value("20")

        page.select_option("#k-select", "10")
        expect(page.locator("#grid .card")).to_have_count(10)
        assert page.url.endswith(f"?id={rocket}&k=10")
        page.click("#more-button")
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        assert page.url.endswith(f"?id={rocket}&k=10&offset=10")
        page.reload()  # the results loaded so far come back too
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        assert page.is_hidden("#more-button") and card_paths(page)[0] == "rocket/original.jpg"

        # an upload is a history entry of its own; Back and Forward restore both
        upload(page, server.folder / "coffee" / "view-01.jpg")
        expect(first_path(page)).to_have_attribute("data-path", "coffee/view-01.jpg")
        assert "id=" not in page.url and page.title() == "Similar to view-01.jpg – Image search"
        page.go_back()
        expect(first_path(page)).to_have_attribute("data-path", "rocket/original.jpg")
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        assert "rocket/original.jpg" in page.inner_text("#query-caption")
        assert page.title() == "Similar to rocket/original.jpg – Image search"
        with page.expect_request(lambda r: "/api/search" in r.url and r.method == "POST"):
            page.go_forward()
        expect(first_path(page)).to_have_attribute("data-path", "coffee/view-01.jpg")
        expect(page.locator("#query-caption")).to_have_text("view-01.jpg")
        assert page.title() == "Similar to view-01.jpg – Image search"
        page.reload()  # the upload's bytes are kept with its history entry
        expect(page.locator("#query-caption")).to_have_text("view-01.jpg")
        expect(first_path(page)).to_have_attribute("data-path", "coffee/view-01.jpg")
        assert problems == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 7: bad links


def test_links_that_name_nothing_say_so(browser, server):
    context, page, problems = open_page(browser, server.url + "?id=999", **DESKTOP)
    try:
        expect(page.locator("#error-text")).to_contain_text("no database image with id 999")
        expect(page.locator("#grid .card")).to_have_count(SIZE)  # a sample to start from, and no broken picture
        assert page.is_hidden("#query-preview") and page.inner_text("#results-heading") == "A sample of the database"
        assert "id=" not in page.url
        page.goto(server.url + "?id=abc")
        expect(page.locator("#error-text")).to_contain_text("“abc” is not a database id")
        expect(page.locator("#grid .card")).to_have_count(SIZE)
        page.goto(server.url + "?id=1&k=lots")
        expect(page.locator("#error-text")).to_contain_text("k must be a whole number from 1 to 200")
        page.goto(server.url + "?id=1&folder=../../etc")
        expect(page.locator("#error-text")).to_contain_text("folder must be a folder of the database")
        assert page.is_hidden("#query-preview")
        assert ignore_failed_loads(problems, "404", "400") == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 8: messages


def test_messages_keep_file_names_and_plain_words(browser, server, tmp_path):
    context, page, problems = open_page(browser, server.url, **DESKTOP)
    searches = []
    page.on("request", lambda r: searches.append(r) if "/api/search" in r.url else None)
    try:
        page.wait_for_selector("#grid .card img")
        # the file picker offers what the server reads, and no SVG
        accept = page.get_attribute("#file-input", "accept")
        assert "svg" not in accept and "image/*" not in accept and ".tiff" in accept and "image/webp" in accept

        big = tmp_path / "big-25mb.jpg"
        with open(big, "wb") as out:
            out.truncate(25 * 1024 * 1024)
        upload(page, big)
        expect(page.locator("#error-text")).to_contain_text("“big-25mb.jpg” is too large")
        assert "Big-25mb" not in page.inner_text("#error-text") and searches == []  # refused here, no request

        empty = tmp_path / "empty.jpg"
        empty.write_bytes(b"")
        upload(page, empty)
        expect(page.locator("#error-text")).to_contain_text("“empty.jpg” is empty")
        assert "Empty.jpg" not in page.inner_text("#error-text")

        data = (server.folder / "coffee" / "original.jpg").read_bytes()
        cut = tmp_path / "cut-short.jpg"
        cut.write_bytes(data[:-22])
        upload(page, cut)
        expect(page.locator("#error-text")).to_contain_text("corrupt or truncated image")
        text = page.inner_text("#error-text")
        assert "“cut-short.jpg”" in text and "bytes not processed" not in text and "image file is" not in text

        # the page and the server draw the line at the same byte: the limit itself is accepted, one more is not
        exact = tmp_path / "exactly-the-limit.jpg"
        exact.write_bytes(data + b"\0" * (MAX_UPLOAD - len(data)))
        upload(page, exact)
        expect(page.locator("#query-caption")).to_have_text("exactly-the-limit.jpg")
        expect(first_path(page)).to_have_attribute("data-path", "coffee/original.jpg")
        over = tmp_path / "one-byte-over.jpg"
        over.write_bytes(data + b"\0" * (MAX_UPLOAD + 1 - len(data)))
        count = len(searches)
        upload(page, over)
        expect(page.locator("#error-text")).to_contain_text("“one-byte-over.jpg” is too large")
        assert "20,971,521 bytes" in page.inner_text("#error-text") and "20,971,520 bytes" in page.inner_text("#error-text")
        assert len(searches) == count
        assert ignore_failed_loads(problems, "415") == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 11: busy


def test_busy_indicator_sits_by_the_query_with_the_button_disabled(browser, server):
    context, page, problems = open_page(browser, server.url, **DESKTOP)
    try:
        page.wait_for_selector("#grid .card img")
        assert page.is_hidden("#busy")
        held = []
        page.route("**/api/search*", lambda route: held.append(route))
        upload(page, server.folder / "astronaut" / "original.jpg")
        expect(page.locator("#busy")).to_be_visible()
        expect(page.locator("#busy")).to_contain_text("Searching")
        expect(page.locator("#choose-button")).to_have_attribute("aria-disabled", "true")
        expect(page.locator("#grid")).to_have_attribute("aria-busy", "true")
        busy, panel = page.locator("#busy").bounding_box(), page.locator(".query-panel").bounding_box()
        assert panel["y"] <= busy["y"] and busy["y"] + busy["height"] <= panel["y"] + panel["height"]
        choosers = []
        page.on("filechooser", lambda chooser: choosers.append(chooser))
        page.evaluate("0")  # the interception is on before the click (see the keyboard test)
        page.click("#choose-button", force=True)  # disabled: it opens nothing and starts nothing
        page.wait_for_timeout(200)
        assert choosers == [] and len(held) == 1
        held[0].continue_()
        page.unroute("**/api/search*")
        page.wait_for_selector('#grid .card[data-rank="1"]')
        expect(page.locator("#busy")).to_be_hidden()
        expect(page.locator("#choose-button")).to_have_attribute("aria-disabled", "false")
        assert problems == []
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 13: facts, links, folders


def test_results_show_size_link_download_and_filter_by_folder(browser, server):
    url, folder = server.url, server.folder
    context, page, problems = open_page(browser, url, **DESKTOP)
    try:
        upload(page, folder / "chelsea" / "view-01.jpg")
        page.wait_for_selector('#grid .card[data-rank="1"]')
        first = card(page, "chelsea/view-01.jpg")
        size = (folder / "chelsea" / "view-01.jpg").stat().st_size
        facts = first.locator(".facts").inner_text()
        assert kb(size) in facts
        api = page.request.get(url + "api/search?id=" + first.get_attribute("data-id") + "&k=1").json()["results"][0]
        assert api["bytes"] == size and {"width", "height", "download_url"} <= set(api)
        from PIL import Image  # the size recorded at indexing is the file's

        width, height = Image.open(folder / "chelsea" / "view-01.jpg").size
        assert (api["width"], api["height"]) == (width, height) and f"{width} × {height}" in facts

        # the original, and a download of it under its own name
        href = first.locator("a.open").get_attribute("href")
        assert page.request.get(url.rstrip("/") + href).body() == (folder / "chelsea" / "view-01.jpg").read_bytes()
        with page.expect_download() as download:
            first.locator("a.download").click()
        assert download.value.suggested_filename == "view-01.jpg"
        assert Path(download.value.path()).read_bytes() == (folder / "chelsea" / "view-01.jpg").read_bytes()

        # the folder filter: the same query, only images under rocket/, ranked within it
        options = page.locator("#folder-select option").all_inner_texts()
        assert options[0] == "All folders" and "rocket/ (3 images)" in options
        assert "clock/station-platform-clocks/ (1 image)" in options
        page.select_option("#folder-select", "rocket")
        expect(page.locator("#grid .card")).to_have_count(3)
        assert all(path.startswith("rocket/") for path in card_paths(page))
        assert page.locator("#grid .rank").all_inner_texts() == ["#1", "#2", "#3"]
        assert "folder=rocket" in page.url and page.inner_text("#results-heading") == "Most similar images in rocket/"
        expect(page.locator("#status")).to_contain_text("Top 3 of 3 in rocket/")
        page.select_option("#folder-select", "")
        expect(page.locator("#grid .card")).to_have_count(10)
        page.go_back()  # a filter is a history entry
        expect(page.locator("#grid .card")).to_have_count(3)
        expect(page.locator("#folder-select")).to_have_value("rocket")

        # without a query: a sample of that folder
        page.goto(url + "?folder=astronaut")
        expect(page.locator("#grid .card")).to_have_count(3)
        assert all(path.startswith("astronaut/") for path in card_paths(page))
        assert page.inner_text("#results-heading") == "A sample of astronaut/"
        assert problems == []
    finally:
        context.close()


def test_paths_break_between_folders_not_at_hyphens(browser, server):
    context, page, problems = open_page(browser, server.url + "?folder=clock", **PHONE)
    try:
        path = card(page, LONG_PATH).locator(".path")
        expect(path).to_have_attribute("title", LONG_PATH)
        assert path.locator(".folder").inner_text() == "clock/station-platform-clocks/"
        assert path.locator(".name").inner_text() == "old-railway-station-platform-clock.jpg"
        # the folder is one line (cut short with an ellipsis), the file name starts on a line of its own below it
        lines = path.locator(".folder").evaluate("(node) => Math.round(node.getBoundingClientRect().height / parseFloat(getComputedStyle(node).lineHeight))")
        assert lines == 1
        folder_box, name_box = path.locator(".folder").bounding_box(), path.locator(".name").bounding_box()
        assert name_box["y"] >= folder_box["y"] + folder_box["height"] - 1 and name_box["height"] > 0
        assert problems == []
    finally:
        context.close()


def test_without_javascript_the_notice_is_at_the_top(browser, server):
    context = browser.new_context(java_script_enabled=False, **DESKTOP)
    page = context.new_page()
    try:
        page.goto(server.url)
        notice = page.locator("noscript .alert, p.noscript").first
        expect(notice).to_be_visible()
        assert "needs JavaScript" in notice.inner_text()
        box, main = notice.bounding_box(), page.locator("main").bounding_box()
        assert box["y"] + box["height"] <= main["y"] + 1 and box["y"] < 800  # above the page, not under the footer
    finally:
        context.close()


# ---------------------------------------------------------------------------------------------------- item 14: the server log


def test_page_loads_do_not_flood_the_server_queue(browser, server):
    """24 thumbnails at once on 4 threads made waitress log "Task queue depth" on every page load. The page now loads
    at most 3 at a time, so one visitor never queues; a real overload (many visitors) is still logged."""
    offset = len(server.log_text())
    for _ in range(2):
        context, page, problems = open_page(browser, "about:blank", **DESKTOP)
        flight = {"now": 0, "peak": 0}

        def started(request):
            if "/thumb/" in request.url:
                flight["now"] += 1
                flight["peak"] = max(flight["peak"], flight["now"])

        def ended(request):
            if "/thumb/" in request.url:
                flight["now"] -= 1

        page.on("request", started)
        page.on("requestfinished", ended)
        page.on("requestfailed", ended)
        try:
            page.goto(server.url)
            page.wait_for_selector("#grid .card img")
            wait_for_thumbnails(page)
            upload(page, server.folder / "rocket" / "view-02.jpg")
            page.wait_for_selector('#grid .card[data-rank="1"]')
            page.click("#more-button")
            expect(page.locator("#grid .card")).to_have_count(SIZE)
            wait_for_thumbnails(page)
            assert flight["peak"] <= 3, flight
            assert problems == []
        finally:
            context.close()
    time.sleep(0.3)
    assert "Task queue depth" not in server.log_text()[offset:]


# ---------------------------------------------------------------------------------------------------- item 6: no index


def subset_database(index: Path, rows) -> FeatureDatabase:
    database = read_database(index)
    rows = list(rows)
    return FeatureDatabase(
        encoder=database.encoder,
        vectors=database.vectors[rows],
        paths=[database.paths[i] for i in rows],
        file_sizes=database.file_sizes[rows],
        file_mtimes_ns=database.file_mtimes_ns[rows],
        image_root=database.image_root,
        created_at=database.created_at,
        updated_at="2030-01-01T00:00:00+00:00",
    )


def test_server_without_an_index_says_so_and_starts_when_it_appears(browser, server, tmp_path):
    watched = tmp_path / "not-built-yet.h5"
    process, url = start_server(tmp_path / "server.log", "--index", watched)
    try:
        paths = read_database(server.index).paths
        rocket = paths.index("rocket/original.jpg")
        context, page, problems = open_page(browser, f"{url}?id={rocket}&k=20", **DESKTOP)
        try:
            # the command names the file this server watches, and nothing can be searched meanwhile
            expect(page.locator("#no-index")).to_contain_text("No index loaded: build one with index.py")
            expect(page.locator("#no-index-command")).to_have_text(
                f"python index.py --database IMAGE_FOLDER --index {shlex.quote(str(watched))}"
            )
            assert page.inner_text("#results-heading") == "No index loaded" and page.locator("#grid .card").count() == 0
            assert page.title() == "No index loaded – Image search"
            expect(page.locator("#choose-button")).to_have_attribute("aria-disabled", "true")
            assert page.is_disabled("#k-select")
            page.keyboard.press("/")  # no file picker: it says why instead
            expect(page.locator("#error-text")).to_contain_text("No index is loaded yet")
            page.evaluate("document.getElementById('error').hidden = true")
            assert_accessible(page, "no index")
            page.screenshot(path=str(tmp_path / "screenshot-no-index.png"))
            keep_screenshot(tmp_path / "screenshot-no-index.png")

            # the index appears: the query the link asked for runs by itself, with its k
            staging = tmp_path / "staging.h5"
            shutil.copy(server.index, staging)
            os.replace(staging, watched)
            expect(first_path(page)).to_have_attribute("data-path", "rocket/original.jpg", timeout=90_000)  # polls back off to 15 s; the model loads first
            expect(page.locator("#grid .card")).to_have_count(SIZE)
            expect(page.locator("#k-select")).to_have_value("20")
            assert f"id={rocket}&k=20" in page.url and "rocket/original.jpg" in page.inner_text("#query-caption")
            assert page.inner_text("#info-size") == str(SIZE) and page.is_hidden("#no-index")

            # the index is updated: an id of the old version is refused, and the preview and URL let go of it too
            write_database(staging, subset_database(server.index, range(6)))
            os.replace(staging, watched)
            time.sleep(1.2)  # the server looks at the file at most once a second
            page.locator("#grid .card").nth(1).locator("button.card-search").click()
            expect(page.locator("#error-text")).to_contain_text("The database was updated")
            expect(page.locator("#results-heading")).to_have_text("A sample of the database")
            expect(page.locator("#grid .card")).to_have_count(6)
            assert page.is_hidden("#query-preview") and "id=" not in page.url and page.title() == "Image search"
            expect(page.locator("#info-size")).to_have_text("6")
            assert ignore_failed_loads(problems, "503", "409") == []
        finally:
            context.close()
    finally:
        stop(process)
    assert "no such index file yet" in (tmp_path / "server.log").read_text()


# ---------------------------------------------------------------------------------------------------- the server itself


def test_real_server_limits_paths_and_headers(server):
    """Through waitress itself (no test client): the upload limit, raw traversal paths, security headers."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)

    def ask(method, path, body=None, headers=None):
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()

    for path in ("/image/../../etc/passwd", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/thumb/..%2f..%2fetc%2fpasswd",
                 "/static/../server.py", "/static/%2e%2e/server.py", "//etc/passwd", "/image//etc/passwd"):
        response, body = ask("GET", path)
        assert response.status == 404, path
        assert b"root:" not in body and b"argparse" not in body
    response, body = ask("GET", "/healthz")
    assert response.status == 200 and response.getheader("X-Frame-Options") == "DENY"
    assert "default-src 'self'" in response.getheader("Content-Security-Policy")
    assert response.getheader("X-Content-Type-Options") == "nosniff" and response.getheader("Referrer-Policy")

    boundary = "b0undary"
    payload = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n\r\n").encode()
    payload += b"\xff\xd8" + b"\0" * (20 * 1024 * 1024) + f"\r\n--{boundary}--\r\n".encode()
    response, body = ask("POST", "/api/search", payload, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status == 413 and "too large" in body.decode()
