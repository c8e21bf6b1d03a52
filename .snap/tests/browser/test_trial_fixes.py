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


def test_compare_draws_the_picked_runs_once_and_clear_removes_the_plots(page):
    """Trial: Clear said 'Pick two or more runs' beside eight plotted runs."""
    from tests.browser.test_workbench_more import FIGURES_JS, figures, start_cpu_run

    wait_for_demo(page)
    for _ in range(2):
        start_cpu_run(page, 1)
        expect(page.get_by_text(re.compile(r": done · Epoch 1/1"))).to_be_visible(timeout=180_000)
    open_tab(page, "Compare")
    page.get_by_role("button", name="Refresh list").click()
    runs = page.get_by_label("Stored runs", exact=True)
    expect(runs.locator("option").nth(1)).to_be_attached()
    runs.select_option(index=[0, 1])
    page.get_by_role("button", name="Compare selected").click()
    expect(page.get_by_text(re.compile(r"Comparing 2 runs"))).to_be_visible(timeout=30_000)
    page.wait_for_function(
        "() => [...window.Bokeh.index.all_views()].some((v) => v.model.title"
        " && String(v.model.title.text).startsWith('Mean seconds per epoch'))"
    )
    page.get_by_role("button", name="Clear").click()
    # the server's reply to Clear can take seconds on a loaded 2-core machine (a full-suite run,
    # 2026-11-30 16:2x, missed the default 5 s; alone it passes): wait as the steps above do
    expect(page.get_by_text(re.compile("Pick two or more runs"))).to_be_visible(timeout=30_000)
    # the browser drops the figures when it applies the server's patch: on a loaded 2-core machine
    # that took over a second (CI, 2026-11-30), so wait for it (a plot that stays still fails here)
    page.wait_for_function(
        f"() => ({FIGURES_JS})('Mean seconds per epoch').length === 0"
        f" && ({FIGURES_JS})('valid_ll per epoch').length === 0",
        timeout=30_000,
    )
    assert figures(page, "Mean seconds per epoch") == [] and figures(page, "valid_ll per epoch") == []
    assert page.watch.console_errors == [], page.watch.console_errors
