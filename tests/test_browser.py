"""End-to-end in a real headless browser: the real server.py (waitress) around a temporary index, driven by Chromium.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install chromium``) and the ``playwright`` Python package
(requirements-dev.txt); ``playwright install`` is never used. Missing either is a failure, not a skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

try:
    from playwright.sync_api import expect
except ImportError:  # reported by the browser fixture as a failure
    expect = None

from conftest import start_server, stop, DEMO_DATABASE, REPO
from retrieval.indexing import build_index

CHROMIUM = Path(os.environ.get("RETRIEVAL_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
GROUPS = ("coffee", "chelsea", "rocket", "astronaut")
VIEWS = ("original.jpg", "view-01.jpg", "view-02.jpg")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install chromium` (Debian)", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -r requirements-dev.txt", pytrace=False)
    # the page's CSP forbids eval, so waits use expect()/selectors, never wait_for_function strings
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server.py around a 12-image index; yields (base URL, image folder)."""
    root = tmp_path_factory.mktemp("browser")
    folder = root / "images"
    for group in GROUPS:
        (folder / group).mkdir(parents=True)
        for view in VIEWS:
            shutil.copy(DEMO_DATABASE / group / view, folder / group / view)
    index = root / "index.h5"
    build_index(folder, index, backbone="efficientnet-lite0", progress=False)
    process, url = start_server(root / "server.log", "--index", index, "--threads", "4")
    try:
        yield url, folder
    finally:
        stop(process)


def keep_screenshot(path: Path) -> None:
    """Screenshots live in pytest's tmp dir; RETRIEVAL_SCREENSHOT_DIR=DIR also copies them there (CI artifacts)."""
    print(f"screenshot: {path}")
    target = os.environ.get("RETRIEVAL_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def open_page(browser, url, **context_options):
    context = browser.new_context(**context_options)
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(url)
    return context, page, problems


def first_path(page):
    return page.locator("#grid .card .path").first


def card_paths(page) -> list[str]:
    return page.locator("#grid .card .path").all_inner_texts()


def test_search_by_upload_then_by_clicking_a_result(browser, server, tmp_path):
    url, folder = server
    context, page, problems = open_page(browser, url, viewport={"width": 1280, "height": 900})
    try:
        # before any query: the database facts and a sample to start from
        page.wait_for_selector("#grid .card img")
        assert page.inner_text("#info-size") == "12" and page.inner_text("#info-backbone") == "efficientnet-lite0"
        assert page.inner_text("#info-pooling") == "max"
        assert page.locator("#grid .card").count() == 12 and page.locator("#grid .rank").count() == 0

        # pick a file: the query is shown and the ranked grid has the same photo first
        page.set_input_files("#file-input", str(folder / "coffee" / "original.jpg"))
        page.wait_for_selector('#grid .card[data-rank="1"]')
        assert page.is_visible("#query-image") and "original.jpg" in page.inner_text("#query-caption")
        paths = card_paths(page)
        assert len(paths) == 10 and paths[0] == "coffee/original.jpg"
        assert set(paths[1:3]) == {"coffee/view-01.jpg", "coffee/view-02.jpg"}
        assert page.locator("#grid .rank").all_inner_texts()[:3] == ["#1", "#2", "#3"]
        assert page.locator("#grid .card .score").first.inner_text() == "score 1.000"
        assert re.fullmatch(r"Top 10 of 12 · \d+ ms", page.inner_text("#status"))
        page.screenshot(path=str(tmp_path / "search.png"), full_page=True)

        # load more
        page.click("#more-button")
        expect(page.locator("#grid .card")).to_have_count(12)
        assert page.is_hidden("#more-button")

        # click a result: it becomes the query, and the ranking follows it
        page.locator("#grid .card", has_text="rocket/view-01.jpg").locator("button.card-search").click()
        expect(first_path(page)).to_have_text("rocket/view-01.jpg")
        assert "rocket/view-01.jpg" in page.inner_text("#query-caption") and "?id=" in page.url
        assert set(card_paths(page)[1:3]) == {"rocket/original.jpg", "rocket/view-02.jpg"}

        # the keyboard works too: results are real buttons
        page.locator("#grid .card", has_text="chelsea/view-02.jpg").locator("button.card-search").focus()
        page.keyboard.press("Enter")
        expect(first_path(page)).to_have_text("chelsea/view-02.jpg")

        # a result opens at full size, served by id
        href = page.locator("#grid .card a.open").first.get_attribute("href")
        assert re.fullmatch(r"/image/\d+\?v=\w+", href)
        full = page.request.get(url.rstrip("/") + href)
        assert full.ok and full.headers["content-type"] == "image/jpeg"
        assert full.body() == (folder / "chelsea" / "view-02.jpg").read_bytes()

        # every picture has alt text; no script or CSP errors happened
        assert page.evaluate("[...document.images].every((img) => img.alt.trim().length > 0)")
        assert problems == []
        keep_screenshot(tmp_path / "search.png")
    finally:
        context.close()


def test_drop_paste_and_readable_errors(browser, server, tmp_path):
    url, folder = server
    context, page, problems = open_page(browser, url, viewport={"width": 1280, "height": 900})
    try:
        page.wait_for_selector("#grid .card img")
        # a dropped file
        page.evaluate(
            """async (href) => {
                const blob = await (await fetch(href)).blob();
                const transfer = new DataTransfer();
                transfer.items.add(new File([blob], 'dropped.jpg', {type: 'image/jpeg'}));
                document.getElementById('dropzone').dispatchEvent(
                    new DragEvent('drop', {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }""",
            "/image/0",
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
            "/image/6",
        )
        expect(page.locator("#query-caption")).to_contain_text("pasted.jpg")
        expect(first_path(page)).to_have_text("coffee/original.jpg")

        # a file that is not an image: a readable message, no stack trace
        not_image = tmp_path / "holiday.jpg"
        not_image.write_text("this is a text file with an image's name")
        page.set_input_files("#file-input", str(not_image))
        page.wait_for_selector("#error:not([hidden])")
        message = page.inner_text("#error")
        assert "not an image" in message and "Traceback" not in message
        problems[:] = [p for p in problems if "415" not in p]  # the browser logs the failed request itself
        assert problems == []
    finally:
        context.close()


def test_phone_sized_screen(browser, server, tmp_path):
    url, folder = server
    context, page, problems = open_page(
        browser, url, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    try:
        page.wait_for_selector("#grid .card img")
        page.set_input_files("#file-input", str(folder / "chelsea" / "original.jpg"))
        page.wait_for_selector('#grid .card[data-rank="1"]')
        assert card_paths(page)[0] == "chelsea/original.jpg"
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # no sideways scrolling
        query_box = page.locator(".query-panel").bounding_box()
        grid_box = page.locator("#grid").bounding_box()
        assert grid_box["y"] >= query_box["y"] + query_box["height"]  # one column: results below the query
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        keep_screenshot(tmp_path / "phone.png")
        assert problems == []
    finally:
        context.close()


def test_server_without_an_index_says_so(browser, tmp_path):
    process, url = start_server(tmp_path / "server.log", "--index", tmp_path / "not-built-yet.h5")
    try:
        context, page, problems = open_page(browser, url)
        try:
            expect(page.locator("#error")).to_contain_text("No index loaded: build one with index.py")
            expect(page.locator("#error code")).to_have_text("python index.py --database database --index index/demo.h5")
            assert page.inner_text("#results-heading") == "No index loaded" and page.locator("#grid .card").count() == 0
            assert all("503" in p for p in problems), problems  # only the failed /api/info call is logged
        finally:
            context.close()
    finally:
        stop(process)
    assert "no such index file yet" in (tmp_path / "server.log").read_text()


def test_real_server_limits_paths_and_headers(server):
    """Through waitress itself (no test client): the upload limit, raw traversal paths, security headers."""
    import http.client
    from urllib.parse import urlsplit

    address = urlsplit(server[0])
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
