"""End-to-end: load the workbench, build an HCLT, inspect partitions and schedule, train, compare.

Run serially: `PYTHONPATH=. .venv/bin/python -m pytest tests/browser -q -p no:randomly`.
Screenshots of each view land in docs/screenshots/ (used by the README) when CW_SCREENSHOTS=1.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import screenshot

pytestmark = pytest.mark.browser
# Hidden tabs redraw when opened; on a busy 2-core box that can take several seconds, so wait
# longer than expect's default 5 s (the page fixture's own timeout is 30 s).
expect.set_options(timeout=20_000)

ERROR_TEXT = re.compile(r"Traceback|Exception:|Error:", re.I)


def open_tab(page, name: str) -> None:
    page.locator(".bk-tab").filter(has_text=re.compile(f"^{name}$")).first.click()
    page.wait_for_timeout(300)


def build_hclt(page, dataset: str = "nltcs", latents: int = 8) -> None:
    """Choose a dataset and the HCLT template, set the latents, press Build and wait for success."""
    open_tab(page, "Build")
    page.locator("select").first.select_option(dataset)
    page.get_by_role("button", name="HCLT").click()
    latents_input = page.get_by_label("Num latents", exact=True)
    latents_input.fill(str(latents))
    latents_input.press("Enter")
    page.get_by_role("button", name="Build circuit").click()
    expect(page.get_by_text(re.compile(f"Built HCLT-{latents}.* on {dataset} in"))).to_be_visible(
        timeout=60_000
    )


def test_loads_without_errors(page):
    """Smoke: every tab renders, with no traceback text, no console errors and no off-host requests."""
    expect(page.get_by_text("Circuit Workbench").first).to_be_visible()
    for tab in ("Build", "Circuit", "Partitions", "Schedule", "Train", "Compare"):
        open_tab(page, tab)
    open_tab(page, "Build")
    expect(page.get_by_text("Build a circuit.", exact=False).first).to_be_visible()
    body = page.locator("body").inner_text()
    assert not ERROR_TEXT.search(body), body[:2000]
    assert page.watch.console_errors == [], page.watch.console_errors
    assert page.watch.external == [], f"page fetched off-host resources: {page.watch.external}"


def test_build_hclt_and_see_circuit_partitions_schedule(page):
    build_hclt(page)
    screenshot(page, "build")
    open_tab(page, "Circuit")
    expect(page.get_by_text(re.compile(r"\d+ layers, [\d.]+[kM]? nodes"))).to_be_visible()
    expect(page.locator(".bk-Canvas, canvas").first).to_be_visible()
    screenshot(page, "circuit")
    open_tab(page, "Partitions")
    expect(page.get_by_text(re.compile(r"\d+ sum layers, \d+ partitions"))).to_be_visible()
    screenshot(page, "partitions")
    # what-if: a new block size recompiles the plan and adds a history row
    page.get_by_label("Block size", exact=True).select_option("4")
    expect(page.get_by_text(re.compile(r"padding \*?\*?\d"))).to_be_visible()
    expect(page.locator(".tabulator-row").filter(has_text="auto").first).to_be_attached()
    expect(
        page.locator(".tabulator-cell[tabulator-field='block_size']")
        .filter(has_text=re.compile(r"^4$"))
        .first
    ).to_be_attached()
    open_tab(page, "Schedule")
    expect(page.get_by_text(re.compile(r"\d+ steps per training step"))).to_be_visible()
    expect(page.get_by_text("recompute", exact=True).first).to_be_attached()
    screenshot(page, "schedule")
    assert page.watch.console_errors == [], page.watch.console_errors


def build_non_smooth_circuit(page) -> None:
    """Compose the example (root -> prod -> (x0, x1)), add x2 under the root sum (not smooth), build."""
    open_tab(page, "Build")
    open_tab(page, "Compose")
    page.get_by_role("button", name="Load example").click()
    page.get_by_label("var (input)", exact=True).fill("2")
    page.get_by_role("button", name="Add node vector").click()
    page.get_by_label("parent", exact=True).select_option("root")
    child_select = page.get_by_label("child", exact=True)
    expect(child_select.locator("option")).to_have_count(5)  # x0, x1, prod, root and the new input
    child_select.select_option(child_select.locator("option").last.get_attribute("value"))
    page.get_by_role("button", name="Connect").click()
    page.get_by_role("button", name="Build circuit").click()


def test_invalid_graph_is_reported_not_raised(page):
    """A composed circuit that is not smooth shows the reason, never a traceback."""
    build_non_smooth_circuit(page)
    expect(page.get_by_text("Invalid circuit:", exact=False)).to_be_visible()
    expect(page.get_by_text(re.compile("Invalid circuit: circuit is not smooth"))).to_be_visible()
    assert "Traceback" not in page.locator("body").inner_text()


def test_train_two_epochs_live(page):
    build_hclt(page)
    open_tab(page, "Train")
    epochs = page.get_by_label("Mini-batch epochs", exact=True)
    epochs.fill("2")
    epochs.press("Enter")
    full_batch = page.get_by_label("Full-batch epochs", exact=True)
    full_batch.fill("0")
    full_batch.press("Enter")
    device = page.get_by_label("Device", exact=True)
    device.select_option(label="CPU")
    page.get_by_role("button", name="Start").click()
    # progress streams in while it runs; a fast machine may already show the final state
    expect(
        page.get_by_text(re.compile(r"Epoch [012]/2 \(mini-batch [012]/2\) · batch \d+/32"))
    ).to_be_visible(timeout=120_000)
    expect(page.locator(".cw-layer-table .tabulator-cell[tabulator-field='ms']").first).to_be_attached(
        timeout=60_000
    )
    expect(page.get_by_text(re.compile(r"done · Epoch 2/2"))).to_be_visible(timeout=180_000)
    expect(page.get_by_text(re.compile(r"valid LL \*?\*?-\d+\.\d+"))).to_be_visible()
    # the epoch table holds both epochs; the per-layer table has forward rows with ms values
    expect(page.locator(".cw-epoch-table .tabulator-cell[tabulator-field='train_ll']")).to_have_count(2)
    ms = page.locator(".cw-layer-table .tabulator-cell[tabulator-field='ms']").first.inner_text()
    assert float(ms) >= 0.0
    expect(page.get_by_role("button", name="Download trained model")).to_be_enabled()
    screenshot(page, "train")
    # measured per-layer times flow into the schedule view
    open_tab(page, "Schedule")
    # the tab renders when shown (DeferWhileHidden): on a loaded 2-core CI box that took over 20 s once
    expect(page.get_by_text(re.compile(r"Measured \(.*\): [\d.e+-]+ ms per step")).first).to_be_attached(
        timeout=90_000
    )
    screenshot(page, "schedule_measured")
    # the stored run can be compared (runs persist in the store)
    open_tab(page, "Compare")
    page.get_by_role("button", name="Refresh list").click()
    runs = page.get_by_label("Stored runs", exact=True)
    options = runs.locator("option")
    expect(options.first).to_be_attached()
    runs.select_option(index=list(range(min(options.count(), 2))))
    page.get_by_role("button", name="Compare selected").click()
    expect(page.get_by_text(re.compile(r"Comparing \*?\*?\d+"))).to_be_visible()
    epochs_cell = page.locator(".cw-compare-table .tabulator-cell[tabulator-field='epochs']").first
    expect(epochs_cell).to_have_text("2")
    screenshot(page, "compare")
    assert page.watch.console_errors == [], page.watch.console_errors
