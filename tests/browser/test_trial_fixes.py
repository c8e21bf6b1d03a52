"""The 2026-11-30 new-user trial, in the browser: what a state-level test cannot see.

Run serially with the rest: `scripts/test tests/browser`.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.test_workbench import open_tab
from tests.browser.test_workbench_teaching import wait_for_demo

pytestmark = pytest.mark.browser


def test_clicking_the_homogeneous_label_ticks_it_and_the_report_says_tied(page):
    """The trial clicked the word 'Homogeneous'; the box stayed empty and the report was the plain HMM's."""
    wait_for_demo(page)
    open_tab(page, "Build")
    page.get_by_role("button", name="HMM").click()
    expect(page.get_by_text(re.compile("shares one transition matrix"))).to_be_visible()
    page.locator("label", has_text="Homogeneous").filter(visible=True).get_by_text("Homogeneous").click()
    expect(page.get_by_role("checkbox", name="Homogeneous")).to_be_checked()
    page.get_by_role("button", name="Build circuit").click()
    expect(page.get_by_text(re.compile(r"Built HMM-\d+ homogeneous"))).to_be_visible(timeout=60_000)
    expect(page.get_by_text(re.compile(r"Parameters: [\d,]+ learnable \(tied"))).to_be_visible()
    assert page.watch.console_errors == [], page.watch.console_errors
