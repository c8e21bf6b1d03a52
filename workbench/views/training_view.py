"""Train the built circuit in a worker process and watch it live.

Start / pause / stop go to the shared `JobRunner`; a periodic callback pulls the job's new events into
a `RunState` (one `param.update` per pull) and brings the progress line, the live plots (`LivePlots`:
new points streamed, no figure rebuilt) and the tables up to date, each at its own pace (`PACE`),
in one held document update. While the Train tab is hidden nothing is redrawn. Results stay in the
run store.
"""

from __future__ import annotations

import time
from html import escape

import pandas as pd
import panel as pn
import param

from workbench.state.runs import RunState
from workbench.state.session import SessionState
from workbench.views._common import fmt_bytes, learn, plural, safe_text, set_status, status
from workbench.views.live_plots import LivePlots
from workbench.views.ranks_view import RankPlots, gpu_selector

LEARN = """**Train with EM.** Each mini-batch runs the forward pass (log-likelihoods), then the flows
pass, whose accumulated *flows* give the EM update of every sum weight and input parameter. Training
runs in its own worker process (on the GPU when one is present), streaming per-layer runtimes and
device memory a few times per second: watch which layers dominate a step, and how the likelihood on
training and validation data improves per epoch."""

POLL_MS = 500  # the progress line follows every poll: two updates a second
# Seconds between redraws of each part while a run is live. Every redraw costs the browser style
# and layout work that takes CPU from the worker on a small machine, and tables (Tabulator redraws
# all rows on any change) cost the most (measured: benchmarks/workbench_ui_metrics.py).
PACE = {"progress": 0.0, "plots": 0.5, "tables": 6.0}  # plots: two updates a second
DEVICES = {"auto (GPU if present, else CPU)": "auto", "CPU": "cpu", "GPU (cuda)": "cuda"}


def device_options() -> dict:
    """The devices to offer: "GPU (cuda)" only when a GPU is visible (counted in a child process by
    `services.ranks.visible_gpus`, so the server never initialises CUDA); offered without one, a
    run failed only after Start."""
    from workbench.services.ranks import visible_gpus

    return {k: v for k, v in DEVICES.items() if v != "cuda" or visible_gpus() > 0}


# Table columns with their dtypes: the empty tables start with them, because a change of columns or
# dtypes makes Tabulator rebuild itself and the browser lay out the whole page again
LAYER_COLUMNS = {"layer": "int64", "kind": "object", "pass": "object", "ms": "float64", "calls": "int64"}
EPOCH_COLUMNS = {
    "epoch": "int64",
    "phase": "object",
    "train_ll": "float64",
    "valid_ll": "float64",
    "test_ll": "float64",
    "seconds": "float64",
}


def epoch_phase(spec: dict, epoch: int) -> str:
    """Which EM phase `epoch` (1-based, over both phases) of a run with `spec` is in:
    'mini-batch 3/5' or 'full-batch 2/10' (the run makes the mini-batch epochs first)."""
    mini, full = int(spec.get("epochs", 0)), int(spec.get("full_batch_epochs", 0))
    before = _epochs_before(spec)  # a continued run counts on from the run it continues
    if epoch - before <= mini or not full:
        return f"mini-batch {max(epoch, 0)}/{before + mini}"
    return f"full-batch {epoch - before - mini}/{full}"


def _epochs_before(spec: dict) -> int:
    return int((spec.get("continues") or {}).get("epochs_before", 0))


def epoch_label(spec: dict, finished: int, in_progress: int | None) -> str:
    """'Epoch 3/15 (mini-batch 3/5)': one count for both halves, the epoch in progress (or the last
    one finished when none is), so the total and the phase never disagree."""
    total = _epochs_before(spec) + int(spec.get("epochs", 0)) + int(spec.get("full_batch_epochs", 0))
    current = max(in_progress or 0, finished)
    return f"Epoch {current}/{total} ({epoch_phase(spec, current)})"


def _frame(records: list[dict], columns: dict) -> pd.DataFrame:
    """Records as a DataFrame with exactly `columns` ({name: dtype}); missing numbers become NaN."""
    df = pd.DataFrame([{c: r.get(c) for c in columns} for r in records], columns=list(columns))
    return df.astype(
        {c: ("float64" if t == "int64" and df[c].isna().any() else t) for c, t in columns.items()}
    )


def _device_text(run) -> str:
    """The device the worker reported, or what was asked for while it has not said (never '…')."""
    if run.device:
        return run.device
    asked = run.spec.get("device") or "auto"
    return (
        f"{asked} (not started)"
        if not run.live and run.status in ("failed", "stopped")
        else f"{asked} (starting)"
    )


class TrainingView(pn.viewable.Viewer):
    """EM settings, job controls, live plots, per-layer table and downloads of the current run."""

    session = param.ClassSelector(class_=SessionState)
    schedule = param.Parameter(default=None, doc="ScheduleView that receives measured layer times")
    shown = param.Boolean(default=True, doc="Whether the Train tab is on screen; hidden, it defers redraws")

    def __init__(self, **params):
        super().__init__(**params)
        t = self.session.training
        offered = device_options()
        if t.device not in offered.values():
            t.device = "auto"
        self.device = pn.widgets.Select.from_param(t.param.device, options=offered, name="Device", width=230)
        self.gpus = gpu_selector(t)  # hidden unless several GPUs (or CW_RANKS_ON_CPU=1) are offered
        self.rank_plots = RankPlots()  # per-rank step split, layer times and memory of a multi-GPU run
        self.epochs = pn.widgets.IntInput.from_param(t.param.epochs, name="Mini-batch epochs", width=130)
        self.batch_size = pn.widgets.IntInput.from_param(t.param.batch_size, name="Batch size", width=100)
        self.step_size = pn.widgets.FloatInput.from_param(t.param.step_size, name="EM step size", width=110)
        self.final_step = pn.widgets.FloatInput.from_param(
            t.param.final_step_size, name="final step", width=100
        )
        self.pseudocount = pn.widgets.FloatInput.from_param(
            t.param.pseudocount, name="Pseudocount", width=100
        )
        self.full_batch = pn.widgets.IntInput.from_param(
            t.param.full_batch_epochs, name="Full-batch epochs", width=120
        )
        self.epoch_total = pn.pane.Markdown("", margin=(22, 5, 0, 5), width=230)
        t.param.watch(lambda *e: self._describe_epochs(), ["epochs", "full_batch_epochs"])
        self._describe_epochs()
        self.start_btn = pn.widgets.Button(name="Start", button_type="success", width=90)
        self.pause_btn = pn.widgets.Button(name="Pause", button_type="warning", width=90, disabled=True)
        self.stop_btn = pn.widgets.Button(name="Stop", button_type="danger", width=90, disabled=True)
        self.start_btn.on_click(lambda e: self.start())
        # Continue a stopped or interrupted run of this browser (JobRunner.continue_run)
        self.continue_pick = pn.widgets.Select(name="Stopped or interrupted run", width=300)
        self.continue_btn = pn.widgets.Button(name="Continue", button_type="primary", width=100)
        self.continue_btn.on_click(lambda e: self.continue_run())
        self.share = pn.widgets.Checkbox(name="Share this run with other browsers", disabled=True)
        self.share.param.watch(lambda e: self.session.share_run(e.new), "value")
        self._list_continuable()
        self.pause_btn.on_click(lambda e: self.toggle_pause())
        self.stop_btn.on_click(lambda e: self.stop())
        self.progress = pn.indicators.Progress(value=0, max=1000, bar_color="success", width=300)
        self.progress_text = pn.pane.HTML("<p>No run yet.</p>", margin=(0, 10))
        self.alert = status()
        self.compile_info = pn.pane.Markdown("", margin=(0, 10))
        self.session.plan.param.watch(lambda *e: self._describe_compile(), ["block_size", "tolerance"])
        self._describe_compile()
        self.live = LivePlots()
        self.plots = {
            k: pn.pane.Bokeh(fig, sizing_mode="stretch_width") for k, fig in self.live.figures.items()
        }
        self.layer_table = pn.widgets.Tabulator(
            _frame([], LAYER_COLUMNS),
            show_index=False,
            css_classes=["cw-layer-table"],
            disabled=True,
            height=260,
            sizing_mode="stretch_width",
        )
        self.epoch_table = pn.widgets.Tabulator(
            _frame([], EPOCH_COLUMNS),
            show_index=False,
            disabled=True,
            height=160,
            css_classes=["cw-epoch-table"],
            sizing_mode="stretch_width",
        )
        self.download_metrics = pn.widgets.FileDownload(
            callback=self._metrics_zip,
            filename="run.zip",
            label="Download metrics (zip)",
            disabled=True,
            width=220,
        )
        self.download_model = pn.widgets.FileDownload(
            callback=self._model_bytes,
            filename="model.cwpc",
            label="Download trained model",
            disabled=True,
            width=220,
        )
        self._callback = None
        self._draw = {"progress": self._progress_text, "plots": self._draw_plots, "tables": self._draw_tables}
        self._drawn = dict.fromkeys(PACE, (-1, 0.0))  # part -> (run version, monotonic s) last drawn
        self._tables = {"layers": None, "epochs": None}  # what the tables show
        self._finished_ticks = 0
        self.param.watch(lambda e: self._catch_up(), "shown")

    # ------------------------------------------------------------------ controls
    def _describe_epochs(self) -> None:
        """Say how many epochs the run will make in all: mini-batch EM, then full-batch EM."""
        t = self.session.training
        self.epoch_total.object = (
            f"= **{t.epochs + t.full_batch_epochs}** {plural(t.epochs + t.full_batch_epochs, 'epoch')}: "
            f"{t.epochs} mini-batch EM, "
            f"then {t.full_batch_epochs} full-batch EM"
        )

    def _describe_compile(self) -> None:
        plan = self.session.plan
        bs = "each vector's own" if plan.block_size is None else plan.block_size
        self.compile_info.object = (
            f"Compiles with block size **{bs}** and partition tolerance "
            f"**{plan.tolerance:g}** (set in the Partitions tab)."
        )

    @property
    def run(self) -> RunState | None:
        return self.session.run

    def start(self) -> None:
        ses = self.session
        if ses.build.root is None:
            set_status(self.alert, "Build a valid circuit first (Build tab).", "warning")
            return
        c = ses.build.spec()
        data = ses.build.data.dataset.split("/")[-1]
        tied = "-homogeneous" if c.get("template") == "hmm" and c.get("homogeneous") else ""
        name = f"{c.get('template', c['source'])}{tied}-{data}-bs{ses.plan.block_size or 'auto'}"
        user_name = ses.training.run_name
        ses.training.run_name = user_name or name  # default: structure, data and block size
        run = ses.start_training()
        ses.training.run_name = user_name
        self._follow_new_run(run, "Cannot start")

    def continue_run(self) -> None:
        """Train on from the picked run's checkpoint in a new run, followed like a started one."""
        self._follow_new_run(self.session.continue_run(self.continue_pick.value), "Cannot continue")

    def _list_continuable(self) -> None:
        runs = self.session.continuable_runs() if self.session.store is not None else []
        self.continue_pick.options = {f"{r.name} · {r.status} · {r.run_id}": r.run_id for r in runs}
        self.continue_btn.disabled = not runs

    def _follow_new_run(self, run, failed: str) -> None:
        ses = self.session
        if run is None:
            set_status(self.alert, f"{failed}: {safe_text(ses.error)}", "danger")
            return
        self.share.param.update(value=False, disabled=False)
        set_status(self.alert, "")
        self._drawn = dict.fromkeys(PACE, (-1, 0.0))
        self._finished_ticks = 0
        self._tables = {"layers": None, "epochs": None}
        self._list_continuable()  # a run just continued is continuable no more
        # nothing of the previous run may stay on screen: empty bar and tables at once; the plots
        # (plain Bokeh models, which a button callback may not write outside the document lock)
        # start over at the first poll, LivePlots.update seeing a new run id
        self.progress.param.update(value=0, bar_color="success")
        self.layer_table.value = _frame([], LAYER_COLUMNS)
        self.epoch_table.value = _frame([], EPOCH_COLUMNS)
        self._progress_text()
        self._set_running(True)
        if self._callback is None:
            self._callback = pn.state.add_periodic_callback(self.poll, period=POLL_MS)

    def toggle_pause(self) -> None:
        if self.run is None:
            return
        if self.pause_btn.name == "Pause":
            self.session.pause()
            self.pause_btn.name = "Resume"
        else:
            self.session.resume()
            self.pause_btn.name = "Pause"

    def stop(self) -> None:
        self.session.stop()

    def _set_running(self, running: bool) -> None:
        self.start_btn.disabled = running
        lockstep = self.run is not None and int(self.run.spec.get("gpus") or 1) > 1  # ranks cannot pause
        self.pause_btn.param.update(disabled=not running or lockstep, name="Pause")
        self.stop_btn.disabled = not running
        self.download_metrics.disabled = running
        self.download_model.disabled = running or self.run is None or not self._has_model()

    # ------------------------------------------------------------------ streaming
    def poll(self) -> None:
        """Periodic callback: pull events, bring the shown parts up to date, stop when finished.

        Stops one tick after the job is seen finished: the job's status can turn terminal just
        before its last events are appended, so the extra tick picks those up.
        """
        run = self.run
        if run is None:
            return
        self.session.poll()
        if self.shown:
            self._refresh()
        self._finished_ticks = 0 if run.live else self._finished_ticks + 1
        if self._finished_ticks >= 2 and self._callback is not None:
            self._callback.stop()
            self._callback = None
            self._set_running(False)
            self._finished()

    def _catch_up(self) -> None:
        """Show what changed while the tab was hidden."""
        if self.shown and self.run is not None:
            self._refresh()

    def _refresh(self) -> None:
        """Redraw each part (progress line, plots, tables) that is behind the run, at most once per
        its PACE while the run is live and at once when it ends; all in one document update."""
        run, now = self.run, time.monotonic()
        with pn.io.hold():
            for part, pace in PACE.items():
                version, at = self._drawn[part]
                if run.version != version and (not run.live or now - at >= pace):
                    self._drawn[part] = (run.version, now)
                    self._draw[part]()

    def _draw_plots(self) -> None:
        self.live.update(self.run)
        self.rank_plots.update(self.run)

    def _draw_tables(self) -> None:
        """Per-layer table (latest window) and epoch table, each only when its rows changed."""
        run = self.run
        if run.layer_times and run.layer_times is not self._tables["layers"]:
            self._tables["layers"] = run.layer_times
            self.layer_table.value = _frame(run.layer_times, LAYER_COLUMNS).round({"ms": 4})
        epochs = (run.run_id, len(run.epochs["epoch"]))
        if epochs[1] and epochs != self._tables["epochs"]:
            self._tables["epochs"] = epochs
            keys = [k for k in EPOCH_COLUMNS if k != "phase"]
            rows = [dict(zip(keys, r)) for r in zip(*(run.epochs[k] for k in keys))]
            for r in rows:
                r["phase"] = epoch_phase(run.spec, int(r["epoch"])).split(" ")[0]
            self.epoch_table.value = _frame(rows, EPOCH_COLUMNS).round(4)

    def _progress_text(self) -> None:
        """The progress bar and line (HTML: no markdown parse on the server per update)."""
        run, p = self.run, self.run.progress
        before = _epochs_before(run.spec)  # a continued run: the epochs of the run it continues
        total_epochs = before + int(run.spec.get("epochs", 0)) + int(run.spec.get("full_batch_epochs", 0))
        done = before + len(run.epochs["epoch"])
        frac = done / max(total_epochs, 1)  # a run that has not made a batch yet: its finished epochs
        if p.get("num_batches"):
            frac = max(frac, ((p["epoch"] - 1) + p["batch"] / p["num_batches"]) / max(total_epochs, 1))
        bar = "danger" if run.status == "failed" else "success"
        self.progress.param.update(value=int(1000 * min(1.0, frac)), bar_color=bar)
        last = run.epochs
        ll = (
            f" · train LL <b>{last['train_ll'][-1]:.4f}</b>, valid LL <b>{last['valid_ll'][-1]:.4f}</b> nats"
            if last["epoch"] and last["valid_ll"][-1] is not None
            else ""
        )
        mem = run.memory
        mem_txt = (
            f" · memory {fmt_bytes(mem.get('allocated', 0))} (peak {fmt_bytes(mem.get('peak_allocated', 0))})"
            if mem and run.device != "cpu"  # no device memory on CPU: the memory plot says so
            else ""
        )
        batch = f" · batch {p.get('batch')}/{p.get('num_batches')}" if p else ""
        device, status = escape(_device_text(run)), escape(run.status)
        if run.status == "queued" and run.message:  # its place in the worker queue
            status += f"</b> ({escape(run.message)})<b>"
        self.progress_text.object = (
            f"<p>Run <code>{escape(run.run_id)}</code> on <b>{device}</b>: <b>{status}</b> · "
            f"{epoch_label(run.spec, done, p.get('epoch'))}{batch}{ll}"
            f"{mem_txt}</p>"
        )
        if run.message and run.status == "failed":
            set_status(self.alert, f"Training failed: {safe_text(run.message)}", "danger")

    def _finished(self) -> None:
        run = self.run
        self._list_continuable()
        if run.status == "done":
            self.progress.value = 1000
        if self.schedule is not None and run.layer_means:
            self.schedule.param.update(
                measured_source=run.name,
                measured_plan=list(run.plan.get("layers", [])),
                run_plan=dict(run.plan),
                measured=dict(run.layer_means),
            )
        self._progress_text()

    # ------------------------------------------------------------------ downloads
    def _has_model(self) -> bool:
        return self.session.services.store.model_path(self.run.run_id).exists()

    def _metrics_zip(self):
        import io

        self.download_metrics.filename = f"{self.run.run_id}.zip"
        return io.BytesIO(self.session.services.store.archive(self.run.run_id))

    def _model_bytes(self):
        import io

        self.download_model.filename = f"{self.run.run_id}.cwpc"
        return io.BytesIO(self.session.services.store.model_path(self.run.run_id).read_bytes())

    def __panel__(self):
        # wraps instead of running off the page on narrower windows (it did at 1400 px)
        settings = pn.FlexBox(
            self.device,
            self.gpus,
            self.epochs,
            self.full_batch,
            self.epoch_total,
            self.batch_size,
            self.step_size,
            self.final_step,
            self.pseudocount,
            flex_wrap="wrap",
            align_items="flex-end",
            sizing_mode="stretch_width",
        )
        controls = pn.Row(self.start_btn, self.pause_btn, self.stop_btn, self.progress, align="center")
        p = self.plots
        return pn.Column(
            learn(LEARN),
            settings,
            self.compile_info,
            controls,
            self.progress_text,
            self.alert,
            pn.Row(p["ll"], p["batch"]),
            pn.Row(p["layers"], p["memory"]),
            self.rank_plots.view,
            pn.Row(
                pn.Column("**Per-layer time (ms per call)**", self.layer_table),
                pn.Column(
                    "**Epochs**",
                    self.epoch_table,
                    pn.Row(self.download_metrics, self.download_model),
                    self.share,
                    pn.Row(self.continue_pick, self.continue_btn, align="end"),
                ),
            ),
            sizing_mode="stretch_width",
        )
