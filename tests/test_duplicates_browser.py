"""The page's "Duplicates" view in real Chromium around the real server.py (fixtures and axe check from
tests/test_browser.py): opened from the keyboard, groups with the image to keep first, another threshold, Escape back
to the search, a member link searches with it, and no critical or serious axe-core violation."""

from __future__ import annotations

import re

import pytest

from conftest import copy_duplicate_photos, start_server, stop
from retrieval.indexing import build_index
from test_browser import assert_accessible, axe_script, browser, expect, open_page  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def dup_server(tmp_path_factory):
    """server.py around an index with two groups of copies (one with a half-size copy) and two unrelated photos."""
    root = tmp_path_factory.mktemp("dup-browser")
    folder = copy_duplicate_photos(root / "images")
    index = root / "index.h5"
    build_index(folder, index, backbone="efficientnet-lite0", progress=False)
    log = root / "server.log"
    process, url = start_server(log, "--index", index, "--threads", "4")
    try:
        yield url
    finally:
        stop(process)


def test_duplicates_view_by_keyboard(browser, dup_server):
    context, page, problems = open_page(browser, dup_server)
    try:
        toggle = page.locator("#duplicates-button")
        expect(toggle).to_have_attribute("aria-expanded", "false")
        toggle.focus()
        page.keyboard.press("Enter")
        expect(toggle).to_have_attribute("aria-expanded", "true")
        panel = page.locator("#duplicates")
        expect(panel).to_be_visible()
        expect(page.locator(".results-panel")).to_be_hidden()
        expect(page.locator(".query-panel")).to_be_hidden()
        expect(page.locator("#duplicates-heading")).to_be_focused()
        groups = page.locator(".duplicate-group")
        expect(groups).to_have_count(2)
        expect(page.locator("#duplicates-status")).to_contain_text("2 groups")
        first = groups.nth(0)
        expect(first.locator("h3")).to_contain_text("3 images")
        keep = first.locator(".duplicate").nth(0)
        expect(keep).to_have_attribute("data-keep", "1")
        expect(keep.locator(".keep-badge")).to_have_text("Keep")
        expect(keep.locator(".path")).to_have_text(re.compile(r"^(coffee\.jpg|backup/coffee copy\.jpg)$"))
        expect(first.locator(".duplicate").nth(2).locator(".path")).to_have_text("backup/coffee small.jpg")
        expect(page.locator("#duplicates-threshold")).not_to_have_value("")
        # thumbnails really load
        page.wait_for_function("() => [...document.querySelectorAll('.duplicate img')].every(i => i.complete && i.naturalWidth > 0)")
        assert_accessible(page, "duplicates")

        # a threshold only exact copies pass: the half-size copy leaves its group; typed, then Enter
        page.locator("#duplicates-threshold").fill("0.999")
        page.locator("#duplicates-threshold").press("Enter")
        expect(page.locator("#duplicates-status")).to_contain_text("0.999")
        assert page.locator(".duplicate-group").count() >= 1
        assert "backup/coffee small.jpg" not in page.locator("#duplicates-groups").inner_text()

        # Escape goes back to the search with the focus on the button that opened the view
        page.keyboard.press("Escape")
        expect(panel).to_be_hidden()
        expect(page.locator(".results-panel")).to_be_visible()
        expect(toggle).to_be_focused()
        expect(toggle).to_have_attribute("aria-expanded", "false")

        # a member's link searches with it
        page.keyboard.press("Enter")
        link = page.locator(".duplicate-link").first
        expect(link).to_be_visible()
        wanted = link.get_attribute("href")
        link.focus()
        page.keyboard.press("Enter")
        page.wait_for_url(re.compile(re.escape(wanted) + r"(&|$)"))
        expect(page.locator("#grid .card").first).to_be_visible()
        expect(page.locator("#results-heading")).not_to_have_text("A sample of the database")
        assert not problems, problems
    finally:
        context.close()


def test_duplicates_view_says_why_it_failed(browser, dup_server):
    context, page, problems = open_page(browser, dup_server)
    try:
        page.route("**/api/duplicates*", lambda route: route.fulfill(
            status=400, content_type="application/json", body='{"error": "threshold must be a cosine similarity in (0, 1]"}'))
        page.locator("#duplicates-button").click()
        expect(page.locator("#duplicates-error")).to_be_visible()
        expect(page.locator("#duplicates-error-text")).to_contain_text("threshold must be a cosine similarity")
        assert_accessible(page, "duplicates error")
        problems[:] = [p for p in problems if "400" not in p]  # the refused request itself is logged by Chromium
        assert not problems, problems
    finally:
        context.close()
