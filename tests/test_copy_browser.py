"""The "verified" mark in real Chromium around the real server.py, on an index built by index.py --preset
copy-detection: a screenshot of a database photo finds it first, marked "✓ verified · N inliers"; unrelated photos are
not marked; verify=0 in the address turns verification off; no critical or serious axe-core violation; the
Duplicates view says its pairs are verified."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from conftest import DEMO_DATABASE, REPO, start_server, stop
from test_browser import DESKTOP, assert_accessible, axe_script, browser, card_paths, expect, open_page, upload  # noqa: F401
from test_verification import pasted, photo

PHOTOS = ("chelsea", "coffee", "rocket", "astronaut", "camera")


@pytest.fixture(scope="module")
def copy_server(tmp_path_factory):
    """server.py around a copy-detection index of five demo photos and one other view of each."""
    root = tmp_path_factory.mktemp("copy-browser")
    folder = root / "images"
    for name in PHOTOS:
        (folder / name).mkdir(parents=True)
        for view in ("original.jpg", "view-01.jpg"):
            shutil.copy(DEMO_DATABASE / name / view, folder / name / view)
    index = root / "copies.h5"
    built = subprocess.run(
        [sys.executable, str(REPO / "index.py"), "--database", str(folder), "--index", str(index), "--preset",
         "copy-detection", "--backbone", "efficientnet-lite0", "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert built.returncode == 0, built.stderr
    screenshot = root / "screenshot of chelsea.png"
    Image.fromarray(pasted(photo("chelsea"))).save(screenshot)
    log = root / "server.log"
    process, url = start_server(log, "--index", index, "--threads", "4")
    try:
        yield url, screenshot
    finally:
        stop(process)


def test_a_screenshot_finds_its_original_marked_verified(browser, copy_server):
    url, screenshot = copy_server
    context, page, problems = open_page(browser, url, **DESKTOP)
    try:
        page.wait_for_selector("#grid .card img")
        upload(page, screenshot)
        page.wait_for_selector('#grid .card[data-rank="1"]')
        assert card_paths(page)[0] == "chelsea/original.jpg"
        first = page.locator('#grid .card[data-rank="1"]')
        mark = first.locator(".verified")
        expect(mark).to_have_text(re.compile(r"^\u2713 verified \u00b7 \d+ inliers$"))
        inliers = int(first.get_attribute("data-inliers"))
        assert inliers >= 12 and mark.inner_text() == f"\u2713 verified \u00b7 {inliers} inliers"
        assert "verified copy" in first.locator("button.card-search").get_attribute("aria-label")
        for name in ("coffee", "rocket", "astronaut", "camera"):  # unrelated photos are never marked
            for card in page.locator(f'#grid .card[data-path^="{name}/"]').all():
                assert card.locator(".verified").count() == 0 and card.get_attribute("data-inliers") is None
        assert_accessible(page, "verified results")

        # the same search with verification off (the API's verify=0): no mark anywhere
        response = page.request.post(f"{url}/api/search?verify=0", multipart={
            "image": {"name": screenshot.name, "mimeType": "image/png", "buffer": screenshot.read_bytes()},
        })
        assert response.ok, response.text()
        body = response.json()
        assert body["verify"] is False and not any(hit.get("verified") for hit in body["results"])
        assert problems == []
    finally:
        context.close()


def test_duplicates_view_says_the_pairs_are_verified(browser, copy_server):
    """On a copy-detection index the Duplicates view verifies by default and says so, with its own threshold."""
    url, _ = copy_server
    context, page, problems = open_page(browser, url, **DESKTOP)
    try:
        page.locator("#duplicates-button").click()
        status = page.locator("#duplicates-status")
        expect(status).to_contain_text("verified by local features")
        expect(status).to_contain_text(re.compile(r"\(\d[\d,]* pairs? rejected\)"))
        expect(page.locator("#duplicates-threshold")).to_have_value("0.5")
        assert problems == []
    finally:
        context.close()
