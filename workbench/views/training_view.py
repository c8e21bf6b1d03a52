"""Train the built circuit in a worker process and watch it live.

Start / pause / stop go to the shared `JobRunner`; a periodic callback pulls the job's new events into
a `RunState` (one `param.update` per pull) and, only when something changed, pushes the new series to
the plots' `Pipe` streams inside one held document update. Results stay in the run store.
"""

from __future__ import annotations

import time

import holoviews as hv
import pandas as pd
import panel as pn
import param
from holoviews.streams import Pipe

from workbench.state.runs import RunState
from workbench.state.session import SessionState
from workbench.views._common import PASS_COLORS, fmt_bytes, learn, set_status, status

LEARN = """**Train with EM.** Each mini-batch runs the forward pass (log-likelihoods), then the flows
pass, whose accumulated *flows* give the EM update of every sum weight and input parameter. Training
runs in its own worker process (on the GPU when one is present), streaming per-layer runtimes and
device memory a few times per second: watch which layers dominate a step, and how the likelihood on
training and validation data improves per epoch."""

POLL_MS = 300
PLOT_MIN_S = 2.0  # seconds between plot redraws of a live run (measured: benchmarks/workbench_ui_metrics.py)
DEVICES = {"auto (GPU if present, else CPU)": "auto", "CPU": "cpu", "GPU (cuda)": "cuda"}
LAYER_COLUMNS = ["layer", "kind", "pass", "ms", "calls"]


def _ll_plot(data: dict):
    curves = [
        hv.Curve((data["epoch"], data[k]), "epoch", "log-likelihood (nats)", label=label).opts(framewise=True)
        for k, label in (("train_ll", "train"), ("valid_ll", "valid"))
    ]
    pts = [
        hv.Scatter((data["epoch"], data[k]), "epoch", "log-likelihood (nats)", label=label).opts(
            size=7, framewise=True
        )
        for k, label in (("train_ll", "train"), ("valid_ll", "valid"))
    ]
    return hv.Overlay(curves + pts).opts(
        title="Log-likelihood per epoch",
        responsive=True,
        height=260,
        legend_position="bottom_right",
        framewise=True,
    )


def _batch_plot(data: dict):
    return hv.Curve((data["step"], data["ll"]), "mini-batch", "batch log-likelihood").opts(
        title="Mini-batch log-likelihood", responsive=True, height=260, color="#888", framewise=True
    )


def _layer_plot(data: list):
    df = pd.DataFrame(data, columns=LAYER_COLUMNS)
    df["layer"] = df["layer"].astype(str)
    return hv.Bars(df, ["layer", "pass"], "ms").opts(
        title="Per-layer time (ms per call, latest window)",
        responsive=True,
        height=260,
        color="pass",
        cmap=PASS_COLORS,
        tools=["hover"],
        framewise=True,
        legend_position="top_left",
        xrotation=90,
        multi_level=False,
    )


def _memory_plot(data: dict):
    t0 = data["t"][0] if data["t"] else 0
    t = [x - t0 for x in data["t"]]
    mib = {k: [v / 2**20 for v in data[k]] for k in ("allocated", "peak_allocated")}
    return hv.Overlay(
        [
            hv.Curve((t, mib["allocated"]), "s", "MiB", label="in use").opts(framewise=True),
            hv.Curve((t, mib["peak_allocated"]), "s", "MiB", label="peak").opts(framewise=True),
        ]
    ).opts(
        title="Device memory (GPU; 0 on CPU)",
        responsive=True,
        height=260,
        framewise=True,
        legend_position="top_left",
    )


class TrainingView(pn.viewable.Viewer):
    """EM settings, job controls, live plots, per-layer table and downloads of the current run."""

    session = param.ClassSelector(class_=SessionState)
    schedule = param.Parameter(default=None, doc="ScheduleView that receives measured layer times")

    def __init__(self, **params):
        super().__init__(**params)
        t = self.session.training
        self.device = pn.widgets.Select.from_param(t.param.device, options=DEVICES, name="Device", width=230)
        self.epochs = pn.widgets.IntInput.from_param(t.param.epochs, name="Epochs", width=90)
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
        self.start_btn = pn.widgets.Button(name="Start", button_type="success", width=90)
        self.pause_btn = pn.widgets.Button(name="Pause", button_type="warning", width=90, disabled=True)
        self.stop_btn = pn.widgets.Button(name="Stop", button_type="danger", width=90, disabled=True)
        self.start_btn.on_click(lambda e: self.start())
        self.pause_btn.on_click(lambda e: self.toggle_pause())
        self.stop_btn.on_click(lambda e: self.stop())
        self.progress = pn.indicators.Progress(value=0, max=1000, bar_color="success", width=300)
        self.progress_text = pn.pane.Markdown("No run yet.", margin=(0, 10))
        self.alert = status()
        self.compile_info = pn.pane.Markdown("", margin=(0, 10))
        self.session.plan.param.watch(lambda *e: self._describe_compile(), ["block_size", "tolerance"])
        self._describe_compile()
        self._pipes = {
            "ll": Pipe(data=self._empty_epochs()),
            "batch": Pipe(data={"step": [], "ll": []}),
            "layers": Pipe(data=[]),
            "memory": Pipe(data={"t": [], "allocated": [], "peak_allocated": []}),
        }
        self.plots = {
            "ll": pn.pane.HoloViews(hv.DynamicMap(_ll_plot, streams=[self._pipes["ll"]])),
            "batch": pn.pane.HoloViews(hv.DynamicMap(_batch_plot, streams=[self._pipes["batch"]])),
            "layers": pn.pane.HoloViews(hv.DynamicMap(_layer_plot, streams=[self._pipes["layers"]])),
            "memory": pn.pane.HoloViews(hv.DynamicMap(_memory_plot, streams=[self._pipes["memory"]])),
        }
        self.layer_table = pn.widgets.Tabulator(
            pd.DataFrame(columns=LAYER_COLUMNS),
            show_index=False,
            css_classes=["cw-layer-table"],
            disabled=True,
            height=260,
            sizing_mode="stretch_width",
        )
        self.epoch_table = pn.widgets.Tabulator(
            pd.DataFrame(),
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
        self._seen_version = -1
        self._last_redraw = 0.0
        self._finished_ticks = 0

    # ------------------------------------------------------------------ controls
    @staticmethod
    def _empty_epochs() -> dict:
        return {"epoch": [], "train_ll": [], "valid_ll": []}

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
        name = f"{c.get('template', c['source'])}-{data}-bs{ses.plan.block_size or 'auto'}"
        user_name = ses.training.run_name
        ses.training.run_name = user_name or name  # default: structure, data and block size
        run = ses.start_training()
        ses.training.run_name = user_name
        if run is None:
            set_status(self.alert, f"Cannot start: {ses.error}", "danger")
            return
        set_status(self.alert, "")
        self._seen_version = -1
        self._finished_ticks = 0
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
        self.pause_btn.param.update(disabled=not running, name="Pause")
        self.stop_btn.disabled = not running
        self.download_metrics.disabled = running
        self.download_model.disabled = running or self.run is None or not self._has_model()

    # ------------------------------------------------------------------ streaming
    def poll(self) -> None:
        """Periodic callback: pull events, redraw once if anything changed, stop when finished.

        Stops one tick after the job is seen finished: the job's status can turn terminal just
        before its last events are appended, so the extra tick picks those up.
        """
        run = self.run
        if run is None:
            return
        self.session.poll()
        now = time.monotonic()
        if run.version != self._seen_version:
            # the progress line is cheap and follows every poll; plots and tables cost the server
            # 0.4-4 s a redraw on a 2-core machine, time the worker's training loses: at most one
            # redraw per PLOT_MIN_S while the run is live, and at once when it ends
            if run.live and now - self._last_redraw < PLOT_MIN_S:
                self._progress_text()
            else:
                self._seen_version, self._last_redraw = run.version, now
                with pn.io.hold():
                    self.redraw()
        self._finished_ticks = 0 if run.live else self._finished_ticks + 1
        if self._finished_ticks >= 2 and self._callback is not None:
            self._callback.stop()
            self._callback = None
            self._set_running(False)
            self._finished()

    def redraw(self) -> None:
        run = self.run
        self._pipes["ll"].send({k: list(run.epochs[k]) for k in ("epoch", "train_ll", "valid_ll")})
        self._pipes["batch"].send({"step": list(run.batches["step"]), "ll": list(run.batches["ll"])})
        records = [{c: r.get(c) for c in LAYER_COLUMNS} for r in run.layer_times]
        if records:
            self._pipes["layers"].send(records)
            df = pd.DataFrame(records, columns=LAYER_COLUMNS)
            df["ms"] = df["ms"].round(4)
            self.layer_table.value = df
        if run.memory_series["t"]:
            self._pipes["memory"].send(
                {k: list(run.memory_series[k]) for k in ("t", "allocated", "peak_allocated")}
            )
        ep = pd.DataFrame(run.epochs)
        if len(ep):
            self.epoch_table.value = ep.round(4)
        self._progress_text()

    def _progress_text(self) -> None:
        run, p = self.run, self.run.progress
        total_epochs = int(run.spec.get("epochs", 0)) + int(run.spec.get("full_batch_epochs", 0))
        done = len(run.epochs["epoch"])
        if p.get("num_batches"):
            frac = ((p["epoch"] - 1) + p["batch"] / p["num_batches"]) / max(total_epochs, 1)
            self.progress.value = int(1000 * min(1.0, max(frac, done / max(total_epochs, 1))))
        last = run.epochs
        ll = (
            f" · train LL **{last['train_ll'][-1]:.4f}**, valid LL **{last['valid_ll'][-1]:.4f}** nats"
            if done and last["valid_ll"][-1] is not None
            else ""
        )
        mem = run.memory
        mem_txt = (
            f" · memory {fmt_bytes(mem.get('allocated', 0))} (peak {fmt_bytes(mem.get('peak_allocated', 0))})"
            if mem
            else ""
        )
        batch = f" · batch {p.get('batch')}/{p.get('num_batches')}" if p else ""
        self.progress_text.object = (
            f"Run `{run.run_id}` on **{run.device or '…'}**: **{run.status}** · "
            f"Epoch {done}/{total_epochs}{batch}{ll}{mem_txt}"
        )
        if run.message and run.status == "failed":
            set_status(self.alert, f"Training failed: {run.message}", "danger")

    def _finished(self) -> None:
        run = self.run
        if run.status == "done":
            self.progress.value = 1000
        if self.schedule is not None and run.layer_means:
            self.schedule.measured_source = run.name
            self.schedule.measured = dict(run.layer_means)
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
        settings = pn.Row(
            self.device,
            self.epochs,
            self.batch_size,
            self.step_size,
            self.final_step,
            self.pseudocount,
            self.full_batch,
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
            pn.Row(
                pn.Column("**Per-layer time (ms per call)**", self.layer_table),
                pn.Column("**Epochs**", self.epoch_table, pn.Row(self.download_metrics, self.download_model)),
            ),
            sizing_mode="stretch_width",
        )
