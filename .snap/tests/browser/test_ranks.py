"""End-to-end (issue 12): the Train tab's "GPUs" selector and a 2-rank run's per-rank plots.

The shared server has no GPU and no override: the selector is hidden. A second server, started
with CW_RANKS_ON_CPU=1 (the testing aid: gloo ranks on the CPU), offers "GPUs"; a 2-rank run then
streams each rank's step split, whose title gives every rank's all-reduce share.
"""

from __future__ import annotations

import os
import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import CHROMIUM, PageWatch, serve_workbench
from tests.browser.test_workbench import build_hclt, open_tab

pytestmark = pytest.mark.browser
expect.set_options(timeout=20_000)


def test_gpus_selector_hidden_without_gpus(page):
    open_tab(page, "Train")
    expect(page.get_by_label("Device", exact=True)).to_be_visible()
    expect(page.get_by_label("GPUs", exact=True)).to_be_hidden()


@pytest.fixture(scope="module")
def ranks_url(tmp_path_factory):
    """A second workbench server that offers gloo ranks on the CPU."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed at /usr/bin/chromium")
    env = {
        "CW_RUNS_DIR": str(tmp_path_factory.mktemp("ranks_runs")),
        "CW_RANKS_ON_CPU": "1",
        "CW_DIST_TIMEOUT_S": "60",
    }
    with serve_workbench(env, tmp_path_factory.mktemp("ranks_log")) as url:
        yield url


def test_two_rank_run_streams_per_rank_plots(browser, ranks_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    watch = PageWatch(page, ranks_url.split("/")[2])
    try:
        page.goto(ranks_url, timeout=90_000)
        build_hclt(page, latents=4)
        open_tab(page, "Train")
        gpus = page.get_by_label("GPUs", exact=True)
        expect(gpus).to_be_visible()
        gpus.select_option("2")
        for label, value in (("Mini-batch epochs", "2"), ("Full-batch epochs", "0")):
            box = page.get_by_label(label, exact=True)
            box.fill(value)
            box.press("Enter")
        page.get_by_role("button", name="Start").click()
        expect(page.get_by_role("button", name="Pause")).to_be_disabled()  # ranks train in lockstep
        expect(page.get_by_text(re.compile(r"done · Epoch 2/2"))).to_be_visible(timeout=240_000)
        # the per-rank step plot is a canvas: its title is in the Bokeh document, read it from there
        title = page.evaluate(
            "() => Bokeh.documents.flatMap(d => [...d.all_models]).map(m => m.text)"
            ".filter(t => typeof t === 'string' && t.startsWith('Per-rank step'))"
        )
        assert title and re.search(r"all-reduce share rank 0 \d+%, rank 1 \d+%", title[0]), title
        assert watch.console_errors == [], watch.console_errors
    finally:
        context.close()
