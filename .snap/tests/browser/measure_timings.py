"""Measure what a user waits for in the workbench (issue 9), with Playwright and Debian's chromium.

    .venv/bin/panel serve apps/workbench.py --port 5091 --address 127.0.0.1 &
    .venv/bin/python tests/browser/measure_timings.py http://127.0.0.1:5091/workbench [--pd]

Prints JSON: page load -> first content (the demo circuit built and reported), Build click -> the
Build tab's new report and -> the Circuit tab drawn after opening it, a block-size change -> the
Partitions tab's new tiles; with --pd the same for a ~300K-node PD (28x28 grid, 64 latents, split 4)
on an uploaded random 784-variable binary dataset, and the time to draw its Flows tab (one EM step). Not a test: run by hand, numbers go in README.
"""

from __future__ import annotations

import io
import json
import re
import sys
import time

import numpy as np
from playwright.sync_api import expect, sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu"]
TITLE_JS = """(p) => [...window.Bokeh.index.all_views()].filter((v) => v.model.title
  && String(v.model.title.text).startsWith(p)).map((v) => String(v.model.title.text))"""


def log(what: str) -> None:
    """Progress on stderr, so a step that hangs is named."""
    print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)


def tab(page, name: str) -> None:
    page.locator(".bk-tab").filter(has_text=re.compile(f"^{name}$")).first.click()


def wait_title(page, prefix: str, contains: str = "", timeout_s: float = 120) -> float:
    """Seconds until a figure titled `prefix...` (holding `contains`) is drawn."""
    t0 = time.monotonic()
    page.wait_for_function(
        f"([p, c]) => ({TITLE_JS})(p).some((t) => t.includes(c))",
        arg=[prefix, contains],
        timeout=timeout_s * 1e3,
    )
    return time.monotonic() - t0


def report_after(page, click, pattern: str, timeout_s: float = 300) -> float:
    """Seconds from `click()` until the Build report matching `pattern` replaces the old one
    (polled from Python: Bokeh renders in shadow DOM, which Playwright's locators pierce)."""
    old = page.get_by_text(re.compile(r"^Built ")).first.inner_text()
    new = page.get_by_text(re.compile(pattern))
    t0 = time.monotonic()
    click()
    while time.monotonic() - t0 < timeout_s:
        if new.count() and new.first.inner_text() != old:
            return time.monotonic() - t0
        page.wait_for_timeout(50)
    raise TimeoutError(f"no new report matching {pattern!r} within {timeout_s} s")


def measure(url: str, with_pd: bool) -> dict:
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "url": url}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(300_000)
        ws = {}
        page.on("console", lambda m: ws.setdefault("t", time.monotonic()) if "now open" in m.text else None)
        t0 = time.monotonic()
        log("loading the page")
        page.goto(url, timeout=120_000)
        expect(page.get_by_text(re.compile(r"Built HCLT-16.* on nltcs in"))).to_be_visible(timeout=120_000)
        t1 = time.monotonic()
        out["page_load_to_first_content_s"] = round(t1 - t0, 2)
        out["websocket_open_to_first_content_s"] = round(t1 - ws.get("t", t0), 2)
        # Build click -> Build report: HCLT-8 first, so the HCLT-16 report differs from the one shown
        click = lambda: page.get_by_role("button", name="Build circuit").click()  # noqa: E731
        for k in (8, 16):
            log(f"HCLT-{k}: build")
            box = page.get_by_label("Num latents", exact=True)
            box.fill(str(k))
            box.press("Enter")
            out[f"hclt{k}_build_click_to_report_s"] = round(report_after(page, click, rf"Built HCLT-{k},"), 2)
        t2 = time.monotonic()
        log("Circuit tab")
        tab(page, "Circuit")
        page.wait_for_function(f"() => ({TITLE_JS})('Layers:').length > 0")
        out["hclt16_circuit_tab_drawn_after_opening_s"] = round(time.monotonic() - t2, 2)
        # block-size what-if on the Partitions tab
        log("Partitions tab")
        tab(page, "Partitions")
        wait_title(page, "Layer ")
        log("block size 2")
        t3 = time.monotonic()
        page.get_by_label("Block size", exact=True).select_option("2")
        wait_title(page, "Layer ", "of 2x2")
        out["hclt16_block_size_change_to_new_tiles_s"] = round(time.monotonic() - t3, 2)
        if with_pd:
            try:
                measure_pd(page, out)
            except Exception as err:  # keep what was measured; say what was not
                out["pd300k_error"] = f"{type(err).__name__}: {err}"[:300]
        browser.close()
    return out


def measure_pd(page, out: dict) -> None:
    log("PD: block size auto")
    page.get_by_label("Block size", exact=True).select_option("auto (per vector)")
    tab(page, "Build")
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).integers(0, 2, size=(2000, 784)).astype(np.int64))
    page.locator("input[type=file][accept='.npy,.npz,.csv']").set_input_files(
        {"name": "mnist_like.npy", "mimeType": "application/octet-stream", "buffer": buf.getvalue()}
    )
    log("PD: uploading 784-variable data")
    expect(page.get_by_text(re.compile(r"mnist_like.*784 variables"))).to_be_visible(timeout=120_000)
    log("PD: uploaded")
    page.get_by_role("button", name="PD").click()
    # PD's fields replace HCLT's: type only once they are there, and check the server kept the value
    # (typed into the outgoing HCLT field, 64 was lost and PD-8 built: the "300 s hang" of 07:03)
    expect(page.get_by_label("Split intervals", exact=True)).to_be_visible()
    box = page.get_by_label("Num latents", exact=True)
    expect(box).to_have_value("8")
    box.fill("64")
    box.press("Enter")
    page.wait_for_timeout(1000)
    expect(box).to_have_value("64")
    click = lambda: page.get_by_role("button", name="Build circuit").click()  # noqa: E731
    log("PD: build clicked")
    out["pd300k_build_click_to_report_s"] = round(report_after(page, click, r"Built PD-64"), 2)
    out["pd300k_report"] = page.get_by_text(re.compile("^Built PD-64")).first.inner_text()
    log("PD: built")
    tab(page, "Partitions")
    t0 = time.monotonic()
    wait_title(page, "Layer ")
    log("PD: partitions drawn")
    out["pd300k_partitions_tab_drawn_after_opening_s"] = round(time.monotonic() - t0, 2)
    old = page.evaluate(TITLE_JS, "Layer ")
    t1 = time.monotonic()
    page.get_by_label("Block size", exact=True).select_option("2")  # its sum vectors' own blocks: 4
    page.wait_for_function(
        f"(old) => ({TITLE_JS})('Layer ').some((t) => t.includes('of 2x2') && !old.includes(t))",
        arg=old,
        timeout=120_000,
    )
    out["pd300k_block_size_change_to_new_tiles_s"] = round(time.monotonic() - t1, 2)
    log("PD: Flows tab")
    t2 = time.monotonic()
    tab(page, "Flows")  # too large to run a step unasked: the tab offers a button
    button = page.get_by_role("button", name=re.compile(r"Run one EM step on \d+ rows"))
    expect(button).to_be_visible(timeout=120_000)
    out["pd300k_flows_tab_drawn_after_opening_s"] = round(time.monotonic() - t2, 2)
    t3 = time.monotonic()
    button.click()
    expect(page.get_by_text(re.compile(r"One EM step on the first \d+ training rows"))).to_be_visible(
        timeout=300_000
    )
    wait_title(page, "EM update of node")
    out["pd300k_flows_step_after_click_s"] = round(time.monotonic() - t3, 2)


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], "--pd" in sys.argv), indent=2))
