"""More end-to-end checks: job controls, data uploads, circuit drill-down, PSDD import, plot contents.

Run serially with the rest: `PYTHONPATH=. .venv/bin/python -m pytest tests/browser -q -p no:randomly`.
Rendered plots are checked through BokehJS (`Bokeh.index`): the data behind a figure's glyphs and
the screen position of a glyph, so a tap on a circuit glyph is a real mouse click on the canvas.
"""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import REPO
from tests.browser.test_workbench import build_hclt, open_tab

pytestmark = pytest.mark.browser

# Figures by title prefix: [{title, x_range, factors, glyphs: [{glyph, n, x, y}]}] (x/y: first 64 values).
FIGURES_JS = """(prefix) => {
  const out = [];
  for (const v of window.Bokeh.index.all_views()) {
    const m = v.model;
    if (!m.title || !("renderers" in m) || !String(m.title.text).startsWith(prefix)) continue;
    const glyphs = m.renderers.filter((r) => r.data_source).map((r) => {
      const d = r.data_source.data, g = r.glyph, col = (k) => (k && d[k] ? Array.from(d[k]) : []);
      const xf = g.x ? g.x.field : undefined, yf = g.y ? g.y.field : undefined;
      return {glyph: g.type, n: r.data_source.get_length() || 0,
              x: col(xf).slice(0, 64), y: col(yf).slice(0, 64)};
    });
    out.push({title: m.title.text, x_range: m.x_range.type,
              factors: m.x_range.factors ? m.x_range.factors.length : null, glyphs});
  }
  return out;
}"""

# Page coordinates of every point of the first Scatter glyph of a figure (for mouse clicks).
GLYPH_POSITIONS_JS = """(prefix) => {
  for (const v of window.Bokeh.index.all_views()) {
    const m = v.model;
    if (!m.title || !("renderers" in m) || !String(m.title.text).startsWith(prefix)) continue;
    const r = m.renderers.find((r) => r.glyph && r.glyph.type === "Scatter");
    if (!r) return [];
    const d = r.data_source.data, xs = d[r.glyph.x.field], ys = d[r.glyph.y.field];
    const bb = v.canvas_view.el.getBoundingClientRect();
    return Array.from(xs, (x, i) => [bb.x + v.frame.x_scale.compute(x), bb.y + v.frame.y_scale.compute(ys[i])]);
  }
  return [];
}"""


def figures(page, prefix: str) -> list[dict]:
    return page.evaluate(FIGURES_JS, prefix)


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def start_cpu_run(page, epochs: int) -> None:
    open_tab(page, "Train")
    set_number(page, "Mini-batch epochs", epochs)
    set_number(page, "Full-batch epochs", 0)
    page.get_by_label("Device", exact=True).select_option(label="CPU")
    page.get_by_role("button", name="Start").click()


def run_status(page) -> str:
    """The status word of the progress line 'Run <id> on <device>: <status> · Epoch ...'."""
    m = re.search(r"Run \S+ on \S+: (\w+) ·", page.locator("body").inner_text())
    return m.group(1) if m else ""


def test_pause_resume_stop(page, runs_dir):
    """Pause blocks the worker between batches, resume continues, stop ends the run as 'stopped'."""
    build_hclt(page)
    start_cpu_run(page, epochs=500)  # far more than the test waits for: it is stopped long before
    line = page.get_by_text(re.compile(r"Run \S+ on cpu: \w+ · Epoch \d+/500"))
    expect(line).to_contain_text(
        re.compile(r": running · Epoch \d+/500 \(mini-batch \d+/500\) · batch \d+/32"), timeout=120_000
    )
    run_id = re.search(r"Run (\S+) on", line.inner_text()).group(1)

    page.get_by_role("button", name="Pause").click()
    expect(line).to_contain_text(": paused ·", timeout=30_000)
    expect(page.get_by_role("button", name="Resume")).to_be_visible()
    assert json.loads((runs_dir / run_id / "status.json").read_text())["status"] == "paused"
    # no batch progress while paused: the batch counter holds still over several poll periods
    frozen = line.inner_text()
    page.wait_for_timeout(1500)
    assert line.inner_text() == frozen

    page.get_by_role("button", name="Resume").click()
    expect(line).to_contain_text(": running ·", timeout=30_000)
    expect(line).not_to_have_text(frozen, timeout=30_000)  # batches stream again

    page.get_by_role("button", name="Stop").click()
    expect(line).to_contain_text(": stopped ·", timeout=60_000)
    expect(page.get_by_role("button", name="Start")).to_be_enabled(timeout=30_000)
    expect(page.get_by_role("button", name="Download trained model")).to_be_enabled()  # stop saves the model
    status = json.loads((runs_dir / run_id / "status.json").read_text())
    assert status["status"] == "stopped", status
    assert (runs_dir / run_id / "model.cwpc").exists()

    open_tab(page, "Compare")
    page.get_by_role("button", name="Refresh list").click()
    option = page.get_by_label("Stored runs", exact=True).locator("option").filter(has_text=run_id)
    expect(option).to_have_text(re.compile(r"· stopped ·"))
    assert "Traceback" not in page.locator("body").inner_text()
    assert page.watch.console_errors == [], page.watch.console_errors


def _npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=array.dtype == object)
    return buf.getvalue()


def test_upload_data_and_build(page, tmp_path):
    """A .npy upload becomes the dataset an HCLT is built on; bad files get one readable line."""
    open_tab(page, "Build")
    upload = page.locator("input[type=file][accept='.npy,.npz,.csv']")
    alert = page.locator(".alert-danger").filter(has_text="Upload rejected")

    pickled = tmp_path / "objects.npy"  # a valid .npy header over a pickled object array
    pickled.write_bytes(_npy_bytes(np.array([{"a": 1}, None], dtype=object)))
    upload.set_input_files(str(pickled))
    expect(alert).to_contain_text("holds Python objects (pickle), which are never loaded")

    nan_csv = tmp_path / "with_nan.csv"
    nan_csv.write_text("a,b,c\n0,1,0\n1,nan,0\n" + "0,1,1\n" * 20)
    upload.set_input_files(str(nan_csv))
    expect(alert).to_contain_text("NaN or infinite value")
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "Exception" not in body

    good = tmp_path / "tiny_binary.npy"
    good.write_bytes(_npy_bytes(np.random.default_rng(0).integers(0, 2, size=(300, 10))))
    upload.set_input_files(str(good))
    expect(
        page.get_by_text(re.compile(r"tiny_binary-\w+: binary, 10 variables, 240 / 30 / 30"))
    ).to_be_visible()
    expect(alert).to_be_hidden()  # a good upload clears the earlier rejection
    assert page.locator("select").first.input_value().endswith(".npy")

    page.get_by_role("button", name="HCLT").click()
    set_number(page, "Num latents", 4)
    page.get_by_role("button", name="Build circuit").click()
    expect(
        page.get_by_text(re.compile(r"Built HCLT-4\b.*a valid circuit .* over 10 variables"))
    ).to_be_visible(timeout=60_000)
    open_tab(page, "Circuit")
    expect(page.get_by_text(re.compile(r"\d+ layers, [\d.]+[kM]? nodes"))).to_be_visible()
    assert page.watch.console_errors == [], page.watch.console_errors


def circuit_info(page):
    """The Circuit tab's line about what is drawn (it ends with a hint per zoom level)."""
    return page.get_by_text(re.compile(r"Click a (layer|single vector)|Top row:"))


def test_circuit_drill_down_controls_and_tap(page):
    """Layers -> node vectors -> blocks, by the controls and by clicking glyphs on the canvas."""
    build_hclt(page)
    open_tab(page, "Circuit")
    info = circuit_info(page)
    expect(info).to_contain_text(re.compile(r"\d+ layers, [\d.]+[kM]? nodes"))

    # controls: the level buttons, then a vector id typed into the block-level box
    page.get_by_role("button", name="Node vectors").click()
    expect(info).to_contain_text(re.compile(r"\d+ node vectors in ranks 0-4"))
    drawn = figures(page, "Node vectors in ranks")
    ids = [g for g in drawn[0]["glyphs"] if g["glyph"] == "Scatter"]
    assert ids and ids[0]["n"] > 1, drawn
    vector_box = page.get_by_label("Vector id (block level)", exact=True)
    vector_box.fill("nonsense")
    vector_box.press("Enter")
    page.get_by_role("button", name="Blocks").click()
    expect(page.get_by_text("vector ids look like")).to_be_visible()
    vector_box.fill("v0")
    vector_box.press("Enter")
    expect(info).to_contain_text(re.compile(r"\w+ vector v0: 1 block of \d+ nodes"))
    assert "Traceback" not in page.locator("body").inner_text()

    # taps: a real click on a layer glyph drills to that layer's vectors, then on a vector to its blocks
    page.get_by_role("button", name="Layers").click()
    expect(info).to_contain_text(re.compile(r"\d+ layers, "))
    _click_glyph(page, "Layers:", index=-1)  # the top layer (the root's sum layer)
    expect(info).to_contain_text(re.compile(r"\d+ node vectors in ranks \d+-\d+"))
    expect(page.get_by_role("button", name="Node vectors")).to_have_class(re.compile("active"))
    _click_glyph(page, "Node vectors in ranks", index=-1)  # the highest-ranked glyph: the root vector
    expect(info).to_contain_text(re.compile(r"sum vector v\d+: \d+ blocks?"))
    assert page.watch.console_errors == [], page.watch.console_errors


def _click_glyph(page, title: str, index: int) -> None:
    """Click the glyph of the highest rank (index -1) of the figure titled `title...`."""
    page.wait_for_function(
        "(p) => [...window.Bokeh.index.all_views()].some((v) => v.model.title"
        " && String(v.model.title.text).startsWith(p))",
        arg=title,
    )
    points = page.evaluate(GLYPH_POSITIONS_JS, title)
    assert points, f"no glyphs drawn in {title!r}"
    x, y = sorted(points, key=lambda p: (-p[1], p[0]))[index]  # page y grows downwards
    page.mouse.click(x, y)


def test_import_bundled_psdd_and_upload(page, tmp_path):
    """A bundled .psdd builds and is drawn; an uploaded .psdd too; a broken one is refused readably."""
    open_tab(page, "Build")
    open_tab(page, "Import")
    page.get_by_label("Bundled example", exact=True).select_option("little_4var.psdd")
    expect(page.get_by_text("Selected little_4var.psdd")).to_be_visible()
    page.get_by_role("button", name="Build circuit").click()
    expect(
        page.get_by_text(re.compile(r"Built little_4var.psdd .*a valid circuit .* over 4 variables"))
    ).to_be_visible(timeout=60_000)
    open_tab(page, "Circuit")
    info = circuit_info(page)
    expect(info).to_contain_text(re.compile(r"\d+ layers, \d+ nodes"))
    drawn = figures(page, "Layers:")
    assert drawn and any(g["glyph"] == "Scatter" and g["n"] >= 2 for g in drawn[0]["glyphs"]), drawn

    open_tab(page, "Build")
    upload = page.locator("input[type=file][accept^='.cw,.cwpc,.zip,.psdd']")
    upload.set_input_files(str(REPO / "assets" / "circuits" / "asia.uai.psdd"))
    expect(page.get_by_text("Uploaded asia.uai.psdd")).to_be_visible()
    page.get_by_role("button", name="Build circuit").click()
    expect(page.get_by_text(re.compile(r"Built .* a valid circuit .* over 8 variables"))).to_be_visible(
        timeout=60_000
    )
    broken = tmp_path / "broken.psdd"
    broken.write_text("psdd 2\nD 0 0 1 7 8 0.0\n")
    upload.set_input_files(str(broken))
    expect(page.locator(".alert-danger").filter(has_text="Upload rejected")).to_be_visible()
    assert "Traceback" not in page.locator("body").inner_text()
    assert page.watch.console_errors == [], page.watch.console_errors


def test_training_plots_hold_the_streamed_data(page):
    """The epoch LL plot draws one point per epoch; the per-layer bars sit on a categorical axis."""
    build_hclt(page)
    start_cpu_run(page, epochs=2)
    expect(page.get_by_text(re.compile(r"done · Epoch 2/2"))).to_be_visible(timeout=180_000)
    expect(page.locator(".cw-epoch-table .tabulator-cell[tabulator-field='train_ll']")).to_have_count(2)
    ll = figures(page, "Log-likelihood per epoch")[0]
    drawn = [g for g in ll["glyphs"] if g["n"]]
    assert len(drawn) == 4 and all(g["n"] == 2 and g["x"] == [1, 2] for g in drawn), ll
    assert all(np.isfinite(g["y"]).all() for g in drawn), ll
    bars = figures(page, "Per-layer time")[0]
    assert bars["x_range"] == "FactorRange" and bars["factors"], bars
    assert any(g["glyph"] == "VBar" and g["n"] > 0 for g in bars["glyphs"]), bars
    assert page.watch.console_errors == [], page.watch.console_errors
