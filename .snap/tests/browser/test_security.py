"""Script payloads in uploaded file contents and file names are shown as text, never run."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import REPO
from tests.browser.test_workbench import open_tab

pytestmark = pytest.mark.browser

PAYLOAD = '<img src=q onerror="window.__pwned=1">'  # valid inline HTML for CommonMark


def _assert_inert(page, alert) -> None:
    """The payload is visible as literal text in `alert`, built no element, and ran nothing."""
    expect(alert).to_contain_text(PAYLOAD, timeout=60_000)
    assert alert.locator("img").count() == 0
    page.wait_for_timeout(1000)  # a broken image fires onerror as soon as its request fails
    assert page.evaluate("window.__pwned") is None


def test_payload_in_a_csv_cell_is_text(page, tmp_path):
    open_tab(page, "Build")
    bad = tmp_path / "cells.csv"
    bad.write_text(f"a,b\n0,1\n1,{PAYLOAD}\n")
    page.locator("input[type=file][accept='.npy,.npz,.csv']").set_input_files(str(bad))
    alert = page.locator(".alert-danger").filter(has_text="Upload rejected")
    _assert_inert(page, alert)


def test_payload_in_file_names_is_text(page):
    open_tab(page, "Build")
    data = page.locator("input[type=file][accept='.npy,.npz,.csv']")
    data.set_input_files({"name": f"x{PAYLOAD}.csv", "mimeType": "text/csv", "buffer": b"1,2\nnan,3\n"})
    _assert_inert(page, page.locator(".alert-danger").filter(has_text="Upload rejected"))

    open_tab(page, "Import")
    psdd = (REPO / "assets" / "circuits" / "little_4var.psdd").read_bytes()
    circuits = page.locator("input[type=file][accept^='.cw,.cwpc,.zip,.psdd']")
    circuits.set_input_files({"name": f"y{PAYLOAD}.psdd", "mimeType": "text/plain", "buffer": psdd})
    _assert_inert(page, page.locator(".alert").filter(has_text="Uploaded"))
    circuits.set_input_files({"name": f"z{PAYLOAD}.psdd", "mimeType": "text/plain", "buffer": b"psdd 1\nX\n"})
    _assert_inert(page, page.locator(".alert-danger").filter(has_text="Upload rejected"))


def test_oversized_upload_is_refused_in_the_browser_before_sending(page):
    from workbench.services.uploads import MAX_UPLOAD_BYTES

    open_tab(page, "Build")
    data = page.locator("input[type=file][accept='.npy,.npz,.csv']")
    data.set_input_files(
        {"name": "huge.csv", "mimeType": "text/csv", "buffer": b"1," * (MAX_UPLOAD_BYTES // 2 + 10)}
    )
    note = page.locator(".cw-upload-refused")
    expect(note).to_contain_text("Upload refused: huge.csv is", timeout=30_000)
    expect(note).to_contain_text("The file was not sent")
    page.wait_for_timeout(1000)
    assert (
        page.locator(".alert-danger").filter(has_text="Upload rejected").count() == 0
    )  # never reached the server
    small = b"0,1\n1,0\n" * 40
    data.set_input_files({"name": "small.csv", "mimeType": "text/csv", "buffer": small})
    expect(note).to_be_hidden()
    expect(page.get_by_text("small")).not_to_have_count(0, timeout=60_000)  # the session still works


def test_the_owner_cookie_survives_a_reload_and_differs_between_browsers(browser, workbench_url, page):
    """Runs belong to the browser: its `cw_owner` token comes back on the next page load (the server
    would mint, and the page store, a new one if it did not read it), and another browser has its own."""

    def owner(p) -> str:
        p.wait_for_function("document.cookie.includes('cw_owner=')", timeout=30_000)
        return next(c["value"] for c in p.context.cookies() if c["name"] == "cw_owner")

    first = owner(page)
    assert len(first) >= 32
    page.reload()
    # the new session's page has rendered (its demo built), so its OwnerCookie has written the cookie
    expect(page.get_by_text(re.compile(r"Built HCLT-16.* in"))).to_be_visible(timeout=90_000)
    assert owner(page) == first
    other = browser.new_context()
    try:
        p2 = other.new_page()
        p2.goto(workbench_url, timeout=90_000)
        assert owner(p2) != first
    finally:
        other.close()
