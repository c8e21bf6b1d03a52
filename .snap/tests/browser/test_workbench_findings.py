"""Issue 9's remaining findings, end to end: the Flows tab, the Schedule's memory timeline and device
calibration, checked template fields, one node count, the Train settings at 1400 px, and Compare
after a long session of builds and runs.

Run serially with the rest: `scripts/test tests/browser`.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.browser.test_workbench import build_hclt, open_tab
from tests.browser.test_workbench_more import figures, set_number, start_cpu_run
from tests.browser.test_workbench_teaching import wait_figure, wait_for_demo

pytestmark = pytest.mark.browser


def test_flows_tab_shows_one_training_step_of_the_current_circuit(page):
    wait_for_demo(page)
    open_tab(page, "Flows")
    expect(
        page.get_by_text(re.compile(r"One EM step on the first 256 training rows of nltcs"))
    ).to_be_visible()
    mass = wait_figure(page, "Flow per example reaching each layer")
    bars = [g for g in mass[0]["glyphs"] if g["glyph"] == "VBar"]
    assert bars and bars[0]["n"] == 9, mass  # one bar per layer of the demo's plan
    update = wait_figure(page, "EM update of node 0 of sum layer 8")
    assert any(g["glyph"] == "VBar" and g["n"] >= 6 for g in update[0]["glyphs"]), update
    expect(page.get_by_text(re.compile(r"Node 0 received flow 256 over the batch"))).to_be_visible()
    # linked: a sum layer picked here is the Partitions tab's layer
    page.get_by_label("Layer of the sum node", exact=True).select_option(label="layer 4 (depth 2, 32 nodes)")
    wait_figure(page, "EM update of node")
    page.wait_for_function(
        "() => [...window.Bokeh.index.all_views()].some((v) => v.model.title"
        " && String(v.model.title.text).includes('of sum layer 4'))"
    )
    screenshot(page, "flows")
    open_tab(page, "Partitions")
    expect(page.get_by_label("Sum layer", exact=True)).to_have_value(re.compile(r".+"))
    selected = page.get_by_label("Sum layer", exact=True).locator("option:checked")
    expect(selected).to_have_text(re.compile(r"^layer 4 "))
    assert page.watch.console_errors == [], page.watch.console_errors


def test_schedule_draws_memory_timeline_and_says_the_model_is_uncalibrated(page):
    wait_for_demo(page)
    open_tab(page, "Schedule")
    memory = wait_figure(page, "Step memory: peak")
    assert "with product layers recomputed" in memory[0]["title"] and "saves" in memory[0]["title"]
    areas = [g for g in memory[0]["glyphs"] if g["glyph"] == "Patch"]  # one stacked area per buffer
    assert len(areas) == 5 and all(g["n"] > 10 for g in areas), memory
    expect(page.get_by_text(re.compile(r"Device model: uncalibrated"))).to_be_visible()
    expect(page.get_by_role("button", name="Use the calibrated device model")).to_be_disabled()
    assert figures(page, "Calibrated model") == []
    page.get_by_text(re.compile(r"Device model: uncalibrated")).scroll_into_view_if_needed()
    screenshot(page, "schedule_memory")


def test_num_latents_out_of_range_is_clamped_with_a_message(page):
    wait_for_demo(page)
    set_number(page, "Num latents", 5000)
    expect(
        page.get_by_text(re.compile(r"Num latents 5000 is out of range \(1 to 4096.*set to 4096"))
    ).to_be_visible()
    expect(page.get_by_label("Num latents", exact=True)).to_have_value("4096")
    set_number(page, "Num latents", 12)
    expect(page.get_by_text(re.compile("Num latents 5000"))).to_be_hidden()


def test_invalid_pd_data_shape_refuses_to_build(page):
    wait_for_demo(page)
    page.get_by_role("button", name="PD").click()
    shape = page.get_by_label("Data shape (H x W)", exact=True)
    expect(shape).to_have_value("4 x 4")  # nltcs: 16 variables
    shape.fill("4 x four")
    shape.press("Enter")
    expect(
        page.get_by_text(re.compile(r"Data shape '4 x four': sizes must be whole numbers"))
    ).to_be_visible()
    page.get_by_role("button", name="Build circuit").click()
    expect(page.get_by_text(re.compile(r"Not built: Data shape '4 x four'"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"^Built PD"))).to_have_count(0)
    shape.fill("2 x 8")
    shape.press("Enter")
    page.get_by_role("button", name="Build circuit").click()
    expect(page.get_by_text(re.compile(r"Built PD-8.* on nltcs in"))).to_be_visible(timeout=60_000)


def test_hmm_node_count_is_the_same_on_build_and_circuit(page):
    wait_for_demo(page)
    page.get_by_role("button", name="HMM").click()
    expect(page.get_by_label("Num latents", exact=True)).to_have_value("16")
    page.get_by_role("button", name="Build circuit").click()
    report = page.get_by_text(re.compile(r"Built HMM-16.* a valid circuit of"))
    expect(report).to_be_visible(timeout=60_000)
    count = re.search(r"circuit of ([\d,]+) nodes", report.inner_text()).group(1).replace(",", "")
    open_tab(page, "Circuit")
    info = page.get_by_text(re.compile(r"\d+ layers, \d+ nodes \(\d+ in the compiled plan"))
    expect(info).to_contain_text(f"layers, {count} nodes (")
    expect(info).to_contain_text("one-child product")
    title = wait_figure(page, "Layers:")[0]["title"]
    assert title.endswith(f"{count} nodes"), title


def test_train_settings_fit_a_1400_px_window(page):
    wait_for_demo(page)
    open_tab(page, "Train")
    width = page.evaluate("() => window.innerWidth")
    for label in ("Device", "Mini-batch epochs", "Batch size", "EM step size", "Pseudocount"):
        box = page.get_by_label(label, exact=True).filter(visible=True).bounding_box()
        assert box is not None and box["x"] + box["width"] <= width, (label, box, width)
    assert page.evaluate("() => document.documentElement.scrollWidth <= window.innerWidth")


def _compare_has_lines(page, runs: int) -> bool:
    """Every run has a line in the per-epoch plot and a bar in the seconds plot."""
    curves = [g for f in figures(page, "valid_ll per epoch") for g in f["glyphs"] if g["glyph"] == "Line"]
    bars = [g for f in figures(page, "Mean seconds per epoch") for g in f["glyphs"] if g["glyph"] == "VBar"]
    return len(curves) == runs and all(g["n"] > 0 for g in curves) and bars and bars[0]["n"] == runs


def test_compare_still_draws_after_a_long_session_of_builds_and_runs(page):
    """The new-user report: after several builds and runs, Compare drew axes without lines."""
    wait_for_demo(page)
    for latents in (4, 6, 8):
        build_hclt(page, "nltcs", latents)
        open_tab(page, "Partitions")
        page.get_by_label("Block size", exact=True).select_option(
            "2" if latents != 6 else "auto (per vector)"
        )
        open_tab(page, "Schedule")
        start_cpu_run(page, 1)
        expect(page.get_by_text(re.compile(r": done · Epoch 1/1"))).to_be_visible(timeout=180_000)
        open_tab(page, "Compare")
        deadline = 30
        while not _compare_has_lines(page, runs=[4, 6, 8].index(latents) + 1) and deadline:
            page.wait_for_timeout(1000)
            deadline -= 1
        assert deadline, figures(page, "")
        open_tab(page, "Flows")
    open_tab(page, "Compare")
    page.wait_for_timeout(1500)
    assert _compare_has_lines(page, 3), figures(page, "")
    screenshot(page, "compare")  # three runs, one colour each
    info = page.get_by_text(re.compile(r"Comparing \d+ runs"))
    expect(info).to_have_text("Comparing 3 runs.")
    open_tab(page, "Partitions")
    tiles = wait_figure(page, "Layer ")
    assert any(g["glyph"] == "Quad" and g["n"] > 0 for g in tiles[0]["glyphs"]), tiles
    assert page.watch.console_errors == [], page.watch.console_errors
