"""The Schedule tab's stream switch in the browser: the demo circuit's step drawn on one stream, then
on a GPU training step's three (three lanes, a shorter predicted step, two element buffers).

Run serially with the rest: `scripts/test tests/browser`.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import screenshot
from tests.browser.test_schedule_run_plan import QUADS_JS
from tests.browser.test_workbench import open_tab
from tests.browser.test_workbench_teaching import wait_figure, wait_for_demo

pytestmark = pytest.mark.browser

STEP_MS = re.compile(r": ([\d.e+-]+) ms per training step")
# the title of the drawn figure titled `prefix...` (null if none is drawn)
TITLE_JS = """(p) => { for (const v of window.Bokeh.index.all_views()) { const t = v.model.title;
  if (t && String(t.text).startsWith(p) && v.el.isConnected) return String(t.text); } return null; }"""


def lanes(page, prefix: str) -> set[int]:
    cols = page.evaluate(QUADS_JS, [prefix, ["lane0"]])
    assert cols is not None, f"no timeline titled {prefix!r} on the page"
    return {round(y + 0.4) for y in cols[0]}


def test_switching_to_three_streams_draws_three_lanes_and_a_shorter_step(page):
    wait_for_demo(page)
    open_tab(page, "Schedule")
    wait_figure(page, "Predicted (roofline), one stream")
    one = page.evaluate(TITLE_JS, "Predicted (roofline)")
    assert lanes(page, "Predicted (roofline)") == {0, 1, 2}  # forward, recompute, backward passes
    info = page.get_by_text(re.compile(r"Predicted step: .* ms on one stream"))
    expect(info).to_be_visible()
    expect(page.get_by_text(re.compile(r"Drawn: one stream"))).to_be_visible()
    wait_figure(page, "Step memory: peak")
    memory_one = page.evaluate(TITLE_JS, "Step memory: peak")

    page.get_by_role("button", name="three streams (GPU training default)").click()
    expect(page.get_by_text(re.compile(r"Drawn: three streams"))).to_be_visible(timeout=20_000)
    wait_figure(page, "Predicted (roofline), three streams")
    three = page.evaluate(TITLE_JS, "Predicted (roofline)")
    assert float(STEP_MS.search(three).group(1)) < float(STEP_MS.search(one).group(1))
    assert lanes(page, "Predicted (roofline)") == {0, 1, 2}  # main chain, recompute ahead, param flows
    labels = page.evaluate(
        """() => { for (const v of window.Bokeh.index.all_views()) { const t = v.model.title;
          if (t && String(t.text).startsWith("Predicted (roofline)") && v.el.isConnected)
            { const o = v.model.left[0].major_label_overrides;
              return Array.from(o instanceof Map ? o.values() : Object.values(o || {})); } } return null; }"""
    )
    assert labels is not None and set(labels) == {"main chain", "recompute ahead", "param flows behind"}
    page.wait_for_function(
        "([p, old]) => { for (const v of window.Bokeh.index.all_views()) { const t = v.model.title;"
        " if (t && String(t.text).startsWith(p) && v.el.isConnected) return String(t.text) !== old; }"
        " return false; }",
        arg=["Step memory: peak", memory_one],
    )
    assert "two element buffers" in page.evaluate(TITLE_JS, "Step memory: peak")
    page.get_by_text(re.compile(r"Drawn: three streams")).scroll_into_view_if_needed()
    screenshot(page, "schedule_three_streams")
