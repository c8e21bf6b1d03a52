"""Compare runs side by side: pick stored runs (any session's, kept across restarts) and overlay them.

Uses `CompareState` (runs read back from the store; live ones are polled) and draws the chosen
per-epoch metric, seconds per epoch and mean per-layer time of each run on shared plots.
"""

from __future__ import annotations

import math
import time

import holoviews as hv
import pandas as pd
import panel as pn
import param

from workbench.services.jobs import JobRunner
from workbench.services.store import RunStore
from workbench.state.runs import CompareState, RunState
from workbench.views._common import NO_WHEEL, PASS_COLORS, integer_ticks, learn, plural

LEARN = """**Profile and compare.** Two runs of the same circuit with different block sizes show the
trade-off of the Partitions tab in real milliseconds: larger tiles amortise per-partition overhead
but compute padding; two structures (say HCLT vs RAT-SPN) show how the shape of the DAG, not just its
size, sets the number and width of layers. Runs are kept in the run store, so earlier sessions'
runs can be compared too."""

POLL_MS = 1000
# While runs train, redraw at most this often: a redraw renders three new figures (~1-5 s of server
# time on a busy 2-core CPU, measured), which would otherwise starve the session's other callbacks.
LIVE_REDRAW_S = 5.0


METRIC_LABELS = {
    "train_ll": "train log-likelihood (nats)",
    "valid_ll": "valid log-likelihood (nats)",
    "test_ll": "test log-likelihood (nats)",
    "seconds": "seconds per epoch (s)",
}

# Run colours: a run keeps its colour for the whole session (assigned in order of first display)
RUN_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


# Settings that tell apart runs of one name (say the same circuit at two block sizes), in this order
TELLING_SETTINGS = {
    "block_size": "bs",
    "batch_size": "batch",
    "epochs": "epochs",
    "full_batch_epochs": "full-batch",
    "step_size": "step",
    "tolerance": "tol",
    "device": "on",
    "gpus": "gpus",
}


def run_labels(runs: list[RunState]) -> dict[str, str]:
    """{run_id: label}: the run's name, with the id suffix; runs of one name also say the settings
    in which they differ ('hclt-nltcs [bs 2] (a1b2c3)'), so a legend does not rest on ids alone."""
    by_name: dict[str, list[RunState]] = {}
    for r in runs:
        by_name.setdefault(r.name, []).append(r)
    out = {}
    for name, group in by_name.items():
        differ = [k for k in TELLING_SETTINGS if len({str(r.spec.get(k)) for r in group}) > 1]
        for r in group:
            extra = ", ".join(f"{TELLING_SETTINGS[k]} {r.spec.get(k, '-')}" for k in differ)
            out[r.run_id] = f"{name}{f' [{extra}]' if extra else ''} ({r.run_id[-6:]})"
    return out


class CompareView(pn.viewable.Viewer):
    """Run picker, overlaid curves, per-layer time comparison and a summary table."""

    store = param.ClassSelector(class_=RunStore)
    jobs = param.ClassSelector(class_=JobRunner, default=None, allow_None=True)
    compare = param.ClassSelector(class_=CompareState)
    shown = param.Boolean(default=True, doc="Whether the Compare tab is on screen; hidden, it defers redraws")

    def __init__(self, **params):
        params.setdefault("compare", CompareState())
        super().__init__(**params)
        self.picker = pn.widgets.MultiSelect(name="Stored runs", size=6, sizing_mode="stretch_width")
        self.refresh_btn = pn.widgets.Button(name="Refresh list", width=120)
        self.add_btn = pn.widgets.Button(name="Compare selected", button_type="primary", width=160)
        self.clear_btn = pn.widgets.Button(name="Clear", width=80)
        self.metric = pn.widgets.Select.from_param(self.compare.param.metric, name="Metric", width=160)
        self.refresh_btn.on_click(lambda e: self.refresh_list())
        self.add_btn.on_click(self._add_clicked)
        self.clear_btn.on_click(lambda e: setattr(self.compare, "runs", []))
        self._labels: dict[str, str] = {}
        self.curves = pn.pane.HoloViews(sizing_mode="stretch_width", height=300)
        self.timing = pn.pane.HoloViews(sizing_mode="stretch_width", height=300)
        self.layers = pn.pane.HoloViews(sizing_mode="stretch_width", height=320)
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(),
            show_index=False,
            disabled=True,
            height=180,
            sizing_mode="stretch_width",
            css_classes=["cw-compare-table"],
        )
        self.info = pn.pane.Markdown("", margin=(0, 10))
        self.compare.param.watch(lambda *e: self._changed(), ["runs", "metric"])
        self.param.watch(lambda *e: self._catch_up(), "shown")
        self._callback = None
        self._drawn: tuple = ()
        self._drawn_at = 0.0
        self._stale = False  # runs or metric changed while hidden
        self._idle_ticks = 0
        self._colors: dict[str, str] = {}
        self.param.watch(lambda e: self.refresh_list() if e.new else None, "shown")
        self.compare.param.watch(lambda e: self.refresh_list(), "runs")
        self.refresh_list()
        self.redraw()

    def color(self, run: RunState) -> str:
        """The run's colour, the same in every plot and redraw of this session."""
        if run.run_id not in self._colors:
            self._colors[run.run_id] = RUN_COLORS[len(self._colors) % len(RUN_COLORS)]
        return self._colors[run.run_id]

    def refresh_list(self) -> None:
        records = self.store.list_runs()
        self.picker.options = {f"{r.name} · {r.status} · {r.run_id}": r.run_id for r in records}

    def _load(self, run_id: str) -> RunState:
        """One picked run: followed live if this server still trains it, else read from the store."""
        job = self.jobs.get(run_id) if self.jobs is not None else None
        if job is not None and not job.finished:
            run = RunState.for_job(job)
            run.apply(self.store.events(run_id))
            run._since = job.drain(0)[1]  # events so far came from the store
            return run
        return RunState.from_store(self.store, run_id)

    def add_selected(self) -> None:
        """Read every picked run, then add them all at once: one redraw, not one per run (adding
        nine one by one drew 'Comparing 4 runs' with two lines for seconds)."""
        self._add_all([self._load(run_id) for run_id in self.picker.value])

    def _add_all(self, runs: list[RunState]) -> None:
        ids = {r.run_id for r in runs}
        self.compare.runs = [r for r in self.compare.runs if r.run_id not in ids] + runs

    async def _add_clicked(self, event=None) -> None:
        """The button: read the runs off the event loop, saying how far it got, then draw once."""
        import asyncio

        picked = list(self.picker.value)
        if not picked:
            return
        self.add_btn.disabled = True
        runs = []
        try:
            for i, run_id in enumerate(picked):
                self.info.object = f"Loading run {i + 1} of {len(picked)}…"
                runs.append(await asyncio.to_thread(self._load, run_id))
        finally:
            self.add_btn.disabled = False
        self._add_all(runs)

    def _signature(self) -> tuple:
        """What the plots show changes per epoch (and status), not per streamed batch."""
        return tuple((r.run_id, len(r.epochs["epoch"]), r.status) for r in self.compare.runs)

    def _follow_live_runs(self) -> None:
        """Poll once a second while any compared run trains; redraw per new epoch, at most every LIVE_REDRAW_S."""
        if any(r.live for r in self.compare.runs) and self._callback is None:
            self._idle_ticks = 0
            self._callback = pn.state.add_periodic_callback(self._poll, period=POLL_MS)

    def _changed(self) -> None:
        self._stale = True
        self._catch_up()

    def _catch_up(self) -> None:
        """Redraw what changed, but only while shown: a redraw renders three new figures, which
        costs the server and the browser (up to 2 s of browser time on a 2-core machine, measured)
        even in a hidden tab, so a hidden view redraws when its tab is opened."""
        if not self.shown:
            return
        self.compare.poll()
        if self._stale or self._signature() != self._drawn:
            self.redraw()
        else:
            self._follow_live_runs()

    def _poll(self) -> None:
        if not self.shown:  # stop following; opening the tab catches up
            self._callback.stop()
            self._callback = None
            return
        self.compare.poll()
        live = any(r.live for r in self.compare.runs)
        due = not live or time.monotonic() - self._drawn_at >= LIVE_REDRAW_S
        if self._signature() != self._drawn and due:
            self.redraw()
        # stop one tick after the last live run finished (its final events may land just after)
        self._idle_ticks = 0 if live else self._idle_ticks + 1
        if self._idle_ticks >= 2 and self._callback is not None:
            self._callback.stop()
            self._callback = None

    def redraw(self) -> None:
        runs = self.compare.runs
        if self._drawn and self._signature() != self._drawn:
            self.refresh_list()  # a run's epoch count or status changed: the list says "running" no more
        self._drawn, self._drawn_at, self._stale = self._signature(), time.monotonic(), False
        self._follow_live_runs()
        if not runs:
            self.info.object = "Pick two or more runs above (train some in the Train tab first)."
            with pn.io.hold():  # Clear: no plot of the runs just removed stays
                self.curves.object = self.timing.object = self.layers.object = None
                self.table.value = pd.DataFrame()
            return
        self._labels = run_labels(runs)
        self.info.object = f"Comparing **{len(runs)}** {plural(len(runs), 'run')}."
        with pn.io.hold(freeze=True):  # one document model recompute for all four panes
            self.curves.object = self._curves()
            self.timing.object = self._epoch_seconds()
            self.layers.object = self._layer_times()
            self.table.value = pd.DataFrame(self.compare.table()).round(4)

    def _curves(self):
        """One line per run; missing values (None: a run without a validation split, an epoch not
        evaluated) become NaN gaps, and a run with no value at all is named in the title instead
        of being drawn: a column holding None is an object array, which Bokeh draws as nothing."""
        m = self.compare.metric
        items, without = [], []
        for r in self.compare.runs:
            ep = [int(e) for e in r.epochs["epoch"]]
            vals = [math.nan if v is None else float(v) for v in r.epochs[m]]
            if not ep or all(math.isnan(v) for v in vals):
                without.append(self._label(r))
                continue
            c, label = self.color(r), self._label(r)
            items.append(hv.Curve((ep, vals), "epoch", m, label=label).opts(color=c))
            items.append(hv.Scatter((ep, vals), "epoch", m, label=label).opts(color=c, size=6))
        note = f" (no {m}: {', '.join(without)})" if without else ""
        if not items:
            return hv.Curve([]).opts(title=f"No {m} per epoch yet{note}")
        return hv.Overlay(items).opts(
            title=f"{m} per epoch{note}",
            ylabel=METRIC_LABELS.get(m, m),
            responsive=True,
            height=290,
            legend_position="right",  # beside the plot: inside, eight or more runs covered the lines
            legend_opts={"click_policy": "hide"},  # click a run in the legend to hide its line
            xticks=integer_ticks(),
            **NO_WHEEL,
        )

    def _label(self, r: RunState) -> str:
        return self._labels.get(r.run_id) or run_labels([r])[r.run_id]

    def _epoch_seconds(self):
        """A bar per run with timed epochs; a run without (failed before its first epoch) is named in
        the title, not drawn as an empty bar."""
        rows, without = [], []
        for r in self.compare.runs:
            secs = [s for s in r.epochs["seconds"] if s is not None]
            if secs:
                rows.append((self._label(r), sum(secs) / len(secs), self.color(r)))
            else:
                without.append(self._label(r))
        note = f" (no epochs: {', '.join(without)})" if without else ""
        return hv.Bars(rows, "run", ["seconds per epoch", "color"]).opts(
            title=f"Mean seconds per epoch{note}",
            responsive=True,
            height=290,
            tools=["hover"],
            xrotation=0 if len(rows) <= 3 else 60,  # several run names side by side overlapped
            color="color",
            **NO_WHEEL,
        )

    def _layer_times(self):
        rows, without = [], []
        for r in self.compare.runs:
            by_pass: dict[str, float] = {}
            for (layer, p), ms in r.layer_means.items():
                by_pass[p] = by_pass.get(p, 0.0) + ms
            rows += [(self._label(r), p, by_pass[p]) for p in PASS_COLORS if p in by_pass]
            if not by_pass:
                without.append(self._label(r))
        note = f" (no layer times: {', '.join(without)})" if without else ""
        if not rows:
            return hv.Bars([], ["run", "pass"], "ms").opts(title=f"No layer times recorded{note}")
        return hv.Bars(rows, ["run", "pass"], "ms per step").opts(
            title=f"Time per training step by pass (sum of mean per-layer ms){note}",
            responsive=True,
            height=310,
            tools=["hover"],
            multi_level=True,
            color="pass",
            cmap=PASS_COLORS,
            xlabel="run and pass",
            **NO_WHEEL,
        )

    def __panel__(self):
        controls = pn.Column(self.picker, pn.Row(self.refresh_btn, self.add_btn, self.clear_btn, self.metric))
        return pn.Column(
            learn(LEARN),
            controls,
            self.info,
            pn.Row(self.curves, self.timing),
            self.layers,
            self.table,
            sizing_mode="stretch_width",
        )
