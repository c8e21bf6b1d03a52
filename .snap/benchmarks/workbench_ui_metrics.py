"""Workbench metrics seen through the browser: latency to the first streamed point, UI update rate,
and training throughput with the UI attached versus headless `engine.optim.fit`.

    PYTHONPATH=. .venv/bin/python benchmarks/workbench_ui_metrics.py [--epochs 15] [--repeats 5]

Serves `apps/workbench.py` with `panel serve` on a free port (run store in a temporary folder, as in
tests/browser/conftest.py) and drives it with Playwright (Debian chromium): build an HCLT, set the EM
epochs, full-batch epochs 0 and device CPU, press Start. Per repeat it measures
- first point: from the click to the first progress text showing a batch counter (browser clock;
  the page samples the progress text every 50 ms, so the resolution is 50 ms; the end of the run
  is awaited on these samples too, not by searching the page);
- UI update rate: changes of the visible progress text per second between the first point and "done";
- UI epoch seconds: the 'epoch' events of the run's metrics.jsonl (epoch 1 excluded as warm-up);
then headless `fit` in this process on the same structure, data and EM schedule (from the run's
spec.json), with the worker's torch thread count, profiling off. ratio = headless / UI epoch seconds
(1.0 = streaming to the UI costs nothing). UI and headless runs alternate, so drift of a shared
machine hits both. Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, _wait_http, free_port  # noqa: E402

SAMPLER_JS = """() => {
  // Panel renders panes inside shadow roots: search them; keep the root that holds the progress line
  const re = /^\\s*(Run \\S+ on|No run yet)/;  // "No run yet." before Start: found once, then cheap
  let home = null;
  const scan = (root) => {
    for (const p of root.querySelectorAll("p")) if (re.test(p.innerText)) return [root, p];
    for (const el of root.querySelectorAll("*")) {
      if (el.shadowRoot) { const hit = scan(el.shadowRoot); if (hit) return hit; }
    }
    return null;
  };
  const find = () => {
    if (home) { const p = [...home.querySelectorAll("p")].find((q) => re.test(q.innerText)); if (p) return p; }
    const hit = scan(document);
    if (hit) { home = hit[0]; return hit[1]; }
    return null;
  };
  window.__cw = [];
  window.__cwTimer = setInterval(() => {
    const p = find();
    window.__cw.push([performance.now(), p ? p.innerText : ""]);
  }, 50);
}"""


LAST_SAMPLE_JS = """(pattern) => {
  const s = window.__cw;
  return s.length > 0 && new RegExp(pattern).test(s[s.length - 1][1]);
}"""


def serve(runs: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """`panel serve apps/workbench.py` on a free port with CW_RUNS_DIR=runs; returns (process, url)."""
    port = free_port()
    env = {**os.environ, "CW_RUNS_DIR": str(runs), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "panel", "serve", "apps/workbench.py", "--port", str(port)]
    cmd += ["--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-procs", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/workbench"
    _wait_http(url, proc, 90)
    return proc, url


def ui_run(browser, url: str, args) -> dict:
    """One UI training run in a fresh session; returns timings measured in the page."""
    import re

    from playwright.sync_api import expect

    from tests.browser.test_workbench import build_hclt, open_tab

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url, timeout=90_000)
    expect(page.get_by_text("Build a circuit.", exact=False).first).to_be_visible(timeout=60_000)
    build_hclt(page, args.dataset, args.latents)
    open_tab(page, "Train")
    for label, value in (("Epochs", args.epochs), ("Full-batch epochs", 0)):
        box = page.get_by_label(label, exact=True)
        box.fill(str(value))
        box.press("Enter")
    page.get_by_label("Device", exact=True).select_option(label="CPU")
    page.wait_for_timeout(500)  # let the settings reach the server before Start
    page.evaluate(SAMPLER_JS)
    start = page.get_by_role("button", name="Start")
    t_click = page.evaluate("performance.now()")
    start.click()
    done = re.compile(rf"(done|failed|stopped) · Epoch \d+/{args.epochs}")
    # wait on the sampler's last reading: Playwright's `expect(get_by_text(...))` would search the
    # whole page's text (every tab, every shadow root) on each retry, costing the browser CPU
    # that this benchmark would then charge to the UI
    page.wait_for_function(LAST_SAMPLE_JS, arg=done.pattern, polling=250, timeout=args.timeout * 1000)
    page.wait_for_timeout(300)
    samples = page.evaluate("() => { clearInterval(window.__cwTimer); return window.__cw; }")
    text = page.get_by_text(done).inner_text()
    context.close()
    if "done" not in text:
        raise RuntimeError(f"UI run did not finish: {text}")
    run_id = re.search(r"Run (\S+) on", text).group(1)
    batch = re.compile(r"batch \d+/\d+")
    first = next(t for t, s in samples if batch.search(s))
    last = next(t for t, s in samples if done.search(s))
    during = [(t, s) for t, s in samples if first <= t <= last]
    changes = sum(1 for (_, a), (_, b) in zip(during, during[1:]) if a != b)
    gaps = [b[0] - a[0] for a, b in zip(during, during[1:])]
    return {
        "run_id": run_id,
        "first_point_s": (first - t_click) / 1000,
        "streaming_s": (last - first) / 1000,
        "text_changes": changes,
        "text_changes_per_s": changes / max((last - first) / 1000, 1e-9),
        "samples": len(during),
        "sample_gap_ms_median": statistics.median(gaps) if gaps else None,
    }


def ui_epochs(runs: Path, run_id: str) -> tuple[dict, list[float]]:
    """(spec, epoch seconds) of a stored run, from spec.json and metrics.jsonl."""
    spec = json.loads((runs / run_id / "spec.json").read_text())
    lines = (runs / run_id / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(x) for x in lines if x.strip()]
    return spec, [e["seconds"] for e in events if e.get("type") == "epoch"]


def headless(spec: dict, threads: int) -> list[float]:
    """`engine.optim.fit` in this process on the run's structure, data and schedule; epoch seconds."""
    import torch

    import engine
    from engine.data import load_dataset
    from engine.optim import fit
    from workbench.services.circuits import build
    from workbench.services.jobs import JobSpec

    js = JobSpec.from_dict(spec)
    torch.set_num_threads(threads)
    torch.manual_seed(js.seed)
    ds = load_dataset(js.dataset)
    pc = engine.compile(
        build(js.circuit, ds).root, block_size=js.block_size, device="cpu", tolerance=js.tolerance
    )
    hist = fit(pc, ds.train, ds.valid, ds.test, js.epochs, js.schedule())
    return [e["seconds"] for e in hist]


def steady(secs: list[float]) -> float:
    """Median epoch seconds, epoch 1 excluded as warm-up (when there are more)."""
    return statistics.median(secs[1:] or secs)


def environment() -> dict:
    import bokeh
    import holoviews
    import panel
    import torch
    from playwright.sync_api import sync_playwright

    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in x
        ),
        platform.processor(),
    )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        chromium = b.version
        b.close()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": "cpu",
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "panel": panel.__version__,
        "bokeh": bokeh.__version__,
        "holoviews": holoviews.__version__,
        "chromium": chromium,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="nltcs")
    p.add_argument("--latents", type=int, default=32)
    # an HCLT-32 epoch on nltcs takes ~0.35 s on a 2-core CPU: 5 epochs left 1.4 s of steady state per
    # repeat, less than one plot-redraw period, and repeats scattered by +-20%
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--repeats", type=int, default=5, help="alternating UI / headless pairs")
    p.add_argument("--timeout", type=int, default=600, help="seconds one UI run may take")
    p.add_argument("--out", default="benchmarks/results/workbench_ui_metrics_cpu.json")
    args = p.parse_args()

    from playwright.sync_api import sync_playwright

    # the UI starts jobs without JobSpec.threads, so the worker uses its default; headless gets the same
    from workbench.services.worker import default_threads

    threads = default_threads()
    results: dict = {"args": vars(args), "env": environment(), "worker_threads": threads, "repeats": []}
    results["env"]["loadavg_start"] = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        runs = Path(d) / "runs"
        runs.mkdir()
        proc, url = serve(runs, Path(d) / "panel.log")
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                for i in range(args.repeats):
                    ui = ui_run(browser, url, args)
                    spec, ui_secs = ui_epochs(runs, ui["run_id"])
                    hl_secs = headless(spec, threads)
                    row = {
                        **ui,
                        "ui_epoch_seconds": ui_secs,
                        "headless_epoch_seconds": hl_secs,
                        "ui_epoch_s": steady(ui_secs),
                        "headless_epoch_s": steady(hl_secs),
                    }
                    row["ratio_headless_over_ui"] = row["headless_epoch_s"] / row["ui_epoch_s"]
                    results["repeats"].append(row)
                    print(
                        f"repeat {i + 1}: {json.dumps({k: v for k, v in row.items() if 'seconds' not in k})}"
                    )
                browser.close()
        finally:
            proc.terminate()
            proc.wait(15)
    results["env"]["loadavg_end"] = os.getloadavg()
    reps = results["repeats"]
    keys = ("first_point_s", "text_changes_per_s", "ui_epoch_s", "headless_epoch_s", "ratio_headless_over_ui")
    results["median"] = {k: statistics.median(r[k] for r in reps) for k in keys}
    print(
        f"\n{'repeat':>6} {'first point s':>13} {'text chg/s':>10} {'UI epoch s':>10} "
        f"{'headless s':>10} {'ratio':>6}"
    )
    for i, r in enumerate([*reps, results["median"]]):
        name = str(i + 1) if i < len(reps) else "median"
        print(
            f"{name:>6} {r['first_point_s']:13.2f} {r['text_changes_per_s']:10.2f} {r['ui_epoch_s']:10.3f} "
            f"{r['headless_epoch_s']:10.3f} {r['ratio_headless_over_ui']:6.3f}"
        )
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
