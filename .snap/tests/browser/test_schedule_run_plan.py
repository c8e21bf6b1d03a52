"""Issue 10 end to end: a profiled run of circuit A, then circuit B is built; the Schedule offers A's
own plan (the worker's plan event) and draws A's layers with A's measured times, while B's what-if
timeline never shows A's measurements.

Run serially with the rest: `scripts/test tests/browser`.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.browser.test_workbench import build_hclt, open_tab
from tests.browser.test_workbench_more import start_cpu_run
from tests.browser.test_workbench_teaching import wait_figure, wait_for_demo

pytestmark = pytest.mark.browser

RUN_PLAN = re.compile(r"the run's plan \(.+, (\d+) layers\)")
# no figure titled `prefix...` is drawn
NO_FIGURE_JS = """(p) => ![...window.Bokeh.index.all_views()].some((v) => v.model.title
  && String(v.model.title.text).startsWith(p) && v.el.isConnected)"""


# Columns of the Quad glyph of the figure on the page titled `prefix...` (null if none is drawn).
QUADS_JS = """([prefix, columns]) => {
  for (const v of window.Bokeh.index.all_views()) {
    const m = v.model;
    if (!m.title || !("renderers" in m) || !String(m.title.text).startsWith(prefix) || !v.el.isConnected) continue;
    const r = m.renderers.find((r) => r.glyph && r.glyph.type === "Quad");
    if (r) return columns.map((c) => Array.from(r.data_source.data[c] || []));
  }
  return null;
}"""


def bars(page, prefix: str) -> list[tuple]:
    """(layer, pass, kind, width ms) of every bar of the timeline titled `prefix...`, left to right."""
    cols = page.evaluate(QUADS_JS, [prefix, ["t0", "layer", "pass", "kind", "t1"]])
    assert cols is not None, f"no timeline titled {prefix!r} on the page"
    rows = sorted(zip(*cols, strict=True))
    return [(int(la), p, k, t1 - t0) for t0, la, p, k, t1 in rows]


def test_a_run_of_circuit_a_is_drawn_on_its_own_plan_after_circuit_b_is_built(page):
    wait_for_demo(page)  # circuit A: the demo, HCLT-16 on nltcs
    start_cpu_run(page, 1)
    expect(page.get_by_text(re.compile(r"done · Epoch 1/1"))).to_be_visible(timeout=180_000)
    open_tab(page, "Schedule")
    expect(page.get_by_text(re.compile(r"Measured \(.*\): [\d.]+ ms per step")).first).to_be_visible(
        timeout=60_000
    )
    wait_figure(page, "Measured (")
    a_bars = bars(page, "Measured (")  # A's measured times, drawn on A's plan while it is current
    assert a_bars and all(w > 0 for *_, w in a_bars)
    a_layers = {la for la, *_ in a_bars}

    build_hclt(page, latents=8)  # circuit B
    open_tab(page, "Schedule")
    expect(page.get_by_text(re.compile("ran a different plan"))).to_be_visible(timeout=60_000)
    page.wait_for_function(NO_FIGURE_JS, arg="Measured (", timeout=30_000)
    expect(page.get_by_text(re.compile(r"Measured \(.*\): [\d.]+ ms per step"))).to_be_hidden()

    switch = page.get_by_role("button", name=RUN_PLAN)
    expect(switch).to_be_enabled()
    n_layers = int(RUN_PLAN.search(switch.inner_text()).group(1))
    assert n_layers == len(a_layers)
    switch.click()
    expect(
        page.get_by_text(re.compile(rf"The plan of run .*\(not the current circuit's\): {n_layers} layers"))
    ).to_be_visible(timeout=60_000)
    wait_figure(page, "Measured (")
    page.wait_for_function(
        "(p) => [...window.Bokeh.index.all_views()].some((v) => v.model.title"
        " && String(v.model.title.text).includes(p) && v.el.isConnected)",
        arg="on its own plan",
        timeout=30_000,
    )
    drawn = bars(page, "Measured (")
    # A's layers in A's order and colours, each bar as long as A's measured mean
    assert [b[:3] for b in drawn] == [b[:3] for b in a_bars]
    assert [b[3] for b in drawn] == pytest.approx([b[3] for b in a_bars], rel=1e-6)
    assert [b[:3] for b in bars(page, "Predicted (roofline), plan of")] == [b[:3] for b in a_bars]
    screenshot(page, "schedule_run_plan")

    page.get_by_role("button", name="Plan: current circuit").click()
    expect(page.get_by_text(re.compile("ran a different plan"))).to_be_visible(timeout=60_000)
    page.wait_for_function(NO_FIGURE_JS, arg="Measured (", timeout=30_000)
    assert page.watch.console_errors == [], page.watch.console_errors
