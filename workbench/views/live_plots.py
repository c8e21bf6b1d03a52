"""The Train tab's live plots, drawn with Bokeh directly and updated in place.

A redraw streams only the rows added since the last one (`ColumnDataSource.stream`) and swaps the
per-layer bars' columns in place. No figure is rebuilt, so an update is a few hundred bytes on the
websocket and neither the server nor the browser recomputes the document. Rebuilding the figures
(HoloViews `Pipe` updates) cost the server 0.2-0.5 s per redraw on a busy 2-core machine, most of
it walking every model of the session's document (benchmarks/workbench_ui_metrics.py).
"""

from __future__ import annotations

import math

from bokeh.models import BasicTicker, ColumnDataSource, FactorRange, HoverTool, Label
from bokeh.plotting import figure
from bokeh.transform import dodge

from workbench.views._common import PASS_COLORS

TOOLS = "pan,wheel_zoom,box_zoom,reset,save"  # none active on scroll: the wheel scrolls the page
SERIES = {  # source key -> columns, all streamed row by row
    "ll": ("epoch", "train_ll", "valid_ll"),
    "batch": ("step", "ll"),
    "memory": ("t", "allocated", "peak_allocated"),
}
LAYER_COLUMNS = ("layer", "kind", *PASS_COLORS)  # one row per layer, ms per pass


def _figure(title: str, x_label: str, y_label: str, **kw):
    fig = figure(
        title=title,
        height=260,
        sizing_mode="stretch_width",
        tools=TOOLS,
        toolbar_location="right",
        x_axis_label=x_label,
        y_axis_label=y_label,
        **kw,
    )
    fig.toolbar.logo = None
    fig.toolbar.active_scroll = None  # the mouse wheel scrolls the page, it does not zoom
    return fig


def _number(v) -> float:
    return math.nan if v is None else float(v)


def _megabytes(v) -> float:
    return v / 1e6


class LivePlots:
    """Log-likelihood per epoch, mini-batch log-likelihood, per-layer ms and device memory of one run.

    `update(run)` sends what changed since the last call; a different run (or a shorter series)
    replaces the plotted data instead.
    """

    def __init__(self):
        self.sources = {k: ColumnDataSource({c: [] for c in cols}) for k, cols in SERIES.items()}
        self.sources["layers"] = ColumnDataSource({c: [] for c in LAYER_COLUMNS})
        self.figures = {
            "ll": self._ll_figure(),
            "batch": self._batch_figure(),
            "layers": self._layer_figure(),
            "memory": self._memory_figure(),
        }
        self._run_id: str | None = None
        self._sent = dict.fromkeys(SERIES, 0)
        self._layer_records: list | None = None
        self._layer_factors: list[str] = []
        self._t0: float | None = None
        self._legends()  # none before the first run: with no data Bokeh draws labels without swatches

    # ------------------------------------------------------------------ figures
    def _ll_figure(self):
        fig = _figure("Log-likelihood per epoch", "epoch", "log-likelihood (nats)")
        src = self.sources["ll"]
        for col, label, color in (("train_ll", "train", "#4c78a8"), ("valid_ll", "valid", "#f58518")):
            fig.line("epoch", col, source=src, color=color, line_width=2, legend_label=label)
            fig.scatter("epoch", col, source=src, color=color, size=7, legend_label=label)
        fig.legend.location = "bottom_right"
        fig.xaxis.ticker = BasicTicker(min_interval=1, desired_num_ticks=8)  # whole epochs only
        return fig

    def _batch_figure(self):
        fig = _figure("Mini-batch log-likelihood", "mini-batch", "batch log-likelihood (nats)")
        fig.line("step", "ll", source=self.sources["batch"], color="#888", line_width=1.5)
        fig.xaxis.ticker = BasicTicker(min_interval=1, desired_num_ticks=8)
        return fig

    def _layer_figure(self):
        fig = _figure(
            "Per-layer time (ms per call, latest window)", "layer", "ms", x_range=FactorRange(factors=[])
        )
        src = self.sources["layers"]
        for i, (p, color) in enumerate(PASS_COLORS.items()):  # forward, recompute, backward side by side
            x = dodge("layer", 0.3 * (i - 1), range=fig.x_range)
            fig.vbar(x=x, top=p, width=0.28, source=src, color=color, line_color=None, legend_label=p)
        tips = [("layer", "@layer (@kind)")] + [(p, f"@{{{p}}}{{0.000}} ms") for p in PASS_COLORS]
        fig.add_tools(HoverTool(tooltips=tips))
        fig.y_range.start = 0
        fig.xaxis.major_label_orientation = "vertical"
        fig.xgrid.grid_line_color = None
        fig.add_layout(fig.legend[0], "right")  # beside the plot: inside it would cover bars
        return fig

    def _memory_figure(self):
        fig = _figure("Device memory", "time since the first sample (s)", "memory (MB)")
        self._cpu_note = Label(
            x=40, y=110, x_units="screen", y_units="screen", text="", text_color="#666", text_font_size="13px"
        )
        fig.add_layout(self._cpu_note)
        src = self.sources["memory"]
        fig.line("t", "allocated", source=src, color="#4c78a8", line_width=2, legend_label="in use")
        fig.line("t", "peak_allocated", source=src, color="#e45756", line_width=2, legend_label="peak")
        fig.legend.location = "top_left"
        fig.y_range.start = 0  # memory is never negative (an empty CPU plot ran from -1 MB)
        return fig

    # ------------------------------------------------------------------ updates
    def update(self, run) -> None:
        """Send the rows of `run` (a RunState) that the plots do not show yet."""
        if run.run_id != self._run_id:
            self._run_id, self._t0 = run.run_id, None
            self._sent = dict.fromkeys(SERIES, 0)
            self._layer_records, self._layer_factors = None, []
            self.sources["layers"].data = {c: [] for c in LAYER_COLUMNS}  # no bars of the last run
            self.figures["layers"].x_range.factors = []
        self._device_note(run.device)
        mem = run.memory_series
        if self._t0 is None and mem["t"]:
            self._t0 = mem["t"][0]
        t0 = self._t0 or 0.0
        series = {  # source key -> {column: (values, conversion)}: only unsent values are converted
            "ll": {k: (run.epochs[k], _number) for k in SERIES["ll"]},
            "batch": {k: (run.batches[k], _number) for k in SERIES["batch"]},
            "memory": {
                "t": (mem["t"], lambda t: t - t0),
                "allocated": (mem["allocated"], _megabytes),
                "peak_allocated": (mem["peak_allocated"], _megabytes),
            },
        }
        for key, cols in series.items():
            self._stream(key, cols)
        self._update_layers(run.layer_times)
        self._legends(cpu=run.device == "cpu")

    def _legends(self, cpu: bool = False) -> None:
        """A plot's legend only once it has data to draw swatches from (and none on the CPU memory plot)."""
        for key, col in (("ll", "epoch"), ("layers", "layer"), ("memory", "t")):
            legend = self.figures[key].legend
            shown = bool(len(self.sources[key].data[col])) and not (cpu and key == "memory")
            if legend.visible != shown:
                legend.visible = shown

    def _device_note(self, device: str) -> None:
        """On CPU there is no device memory to plot: say so instead of drawing a flat 0 line."""
        cpu = device == "cpu"
        fig = self.figures["memory"]
        title = "Device memory: none on CPU" if cpu else "Device memory"
        if fig.title.text != title:
            fig.title.text = title
            self._cpu_note.text = (
                "Training runs on the CPU: tensors live in host RAM,\nso there is no device memory to track."
                if cpu
                else ""
            )
            for r in fig.renderers:
                r.visible = not cpu

    def _stream(self, key: str, cols: dict) -> None:
        n, sent, src = len(next(iter(cols.values()))[0]), self._sent[key], self.sources[key]
        if n < sent or (sent == 0 and len(src.data[next(iter(cols))])):
            src.data, sent = {k: [] for k in cols}, 0  # another run, or a restarted series
        if n > sent:
            src.stream({k: [conv(v) for v in values[sent:]] for k, (values, conv) in cols.items()})
        self._sent[key] = n

    def _update_layers(self, records: list[dict]) -> None:
        """Bars of the latest window: columns replaced in place, the x factors only when layers change."""
        if not records or records is self._layer_records:
            return
        self._layer_records = records
        by_layer: dict[int, dict] = {}
        for r in records:
            row = by_layer.setdefault(r["layer"], {"kind": r.get("kind", "")})
            row[r["pass"]] = r["ms"]
        layers = sorted(by_layer)
        factors = [str(x) for x in layers]
        if factors != self._layer_factors:
            self._layer_factors = factors
            self.figures["layers"].x_range.factors = factors
        data = {"layer": factors, "kind": [by_layer[x]["kind"] for x in layers]}
        for p in PASS_COLORS:
            data[p] = [by_layer[x].get(p, math.nan) for x in layers]
        self.sources["layers"].data = data
