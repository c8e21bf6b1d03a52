"""Every CSS and JS file comes from the workbench's own server, also under load: pages opened at
the same time (each building its demo, as the issue saw 2-3 of 10 do) request nothing off-host."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

pytestmark = pytest.mark.browser
PAGES = 6


def test_concurrent_page_loads_request_nothing_off_host(browser, workbench_url):
    host = workbench_url.split("/")[2]
    contexts, pages, outside, local = [], [], [], []

    def record(request) -> None:
        url = request.url
        if url.startswith(("http:", "https:", "ws:", "wss:")):
            (local if url.split("/")[2] == host else outside).append(url)

    for _ in range(PAGES):  # start every load before waiting for any
        ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
        page = ctx.new_page()
        page.on("request", record)
        page.goto(workbench_url, wait_until="commit", timeout=90_000)
        contexts.append(ctx)
        pages.append(page)
    try:
        for page in pages:
            expect(page.get_by_text(re.compile(r"Built HCLT-16.* in"))).to_be_visible(timeout=120_000)
            for tab in ("Circuit", "Partitions", "Schedule", "Train", "Compare", "Build"):
                page.locator(".bk-tab").filter(has_text=re.compile(f"^{tab}$")).first.click()
            page.wait_for_timeout(300)
        css = [u for u in local if ".css" in u]
        assert css, "no stylesheet was requested at all: the check would prove nothing"
        assert outside == [], f"{len(outside)} off-host requests, e.g. {outside[:5]}"
    finally:
        for ctx in contexts:
            ctx.close()
