"""The layer schedule of one training step: forward, then backward with product-layer recomputation.

Draws `PlanState.schedule(measured)` as a timeline (x: predicted or measured time, one lane per pass,
coloured by layer kind), a compute-vs-IO scatter per layer and a table with predicted and measured
milliseconds. `measured` ({(layer, pass): mean ms}) is set by the app from the training run, with
`run_plan` (the plan event the worker sent, `plan.to_dict()`). When that run's plan differs from the
current one, a switch draws the run's own plan (laid out from the dict by `plans.schedule`) with its
measured times; the current what-if plan is never drawn against another plan's measurements.

A second switch picks the stream schedule: one stream (profiled batches, `backward_flows()`, the CPU
executor) or the three streams of a GPU training step (`plans.stream_schedule`, the engine's rule in
engine/executor/stream_schedule.py), which also sets the memory plot's policy. Measured times always
come from profiled batches, which run on one stream: drawn as measured, and laid out on three streams
only as a prediction.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import holoviews as hv
import pandas as pd
import panel as pn
import param

from workbench.services import calibrate, memory
from workbench.services.plans import (
    STREAM_LANES,
    plan_batch_size,
    plan_from_dict,
    plan_signature,
    step_ms,
    stream_schedule,
)
from workbench.state.plan import PlanState
from workbench.views._common import KIND_COLORS, NO_WHEEL, fmt_bytes, fmt_count, learn
from workbench.views._deferred import DeferWhileHidden
from workbench.views.memory_plot import memory_plot
from workbench.views.roofline import roofline

LEARN = """**Layer schedule.** The compiled circuit runs layer by layer: the forward pass bottom-up,
then the backward (flows) pass top-down. Product layers are cheap elementwise work but would need a
buffer each, so the engine keeps one *scratch* buffer and **recomputes** each product layer just before
the backward of the sum layer above it (the middle lane): a little extra compute buys a lot of memory.
**Streams.** That is the one-stream order: the CPU, profiled batches and `backward_flows()` run it. A
GPU training step runs its flows pass on **three streams**: the *main chain* (forward, then per sum
layer its node scale and element flows and the product layer's backward, then the input statistics),
each product layer *recomputed ahead* on a second stream into one of **two** alternating element
buffers (a buffer is reused only after the parameter flows of the sum layer two above have read it),
and each sum layer's *parameter flows behind* on a third, since nothing reads them until the EM update.
**Early input statistics**: input rows whose flows are final before the pass ends (in an HCLT, the
variables whose subtree ends above the lowest layer: about half of its input nodes or more) get their statistics on
the third stream right after the product layer that finished them (bars in the input layers'
colour in the *param flows behind* lane); the input layers' own step at the end does only the rest. A PD reads every input node
in its lowest layer, so there all statistics stay at the end.
Switch *Stream schedule* to see it: the side work hides behind the main chain. The second element
buffer costs little memory: it takes node-value rows whose readers are done, and only the top layers,
where too few such rows exist yet, get a small spare. The model splits a sum layer's backward half and half (element flows and parameter
flows are one matmul each) and assumes the streams do not slow each other, so it is a lower bound:
fed an H200's one-stream kernel trace it predicts -23% for HCLT-128 and -20% for PD-128, where the
GPU measured -15% and -2% (benchmarks/README.md, round 4): PD's large layers already fill the card.
The top timeline is each step's predicted time (a roofline: the larger of FLOPs / peak and bytes /
bandwidth, plus a launch cost per partition); once this very plan has been trained with profiling,
its measured times appear below, with the device model *calibrated* to them (throughput, bandwidth
and launch cost fitted to the run) in between. Each timeline's time axis fits its own step (the
preset can be 10x off): compare the step times in their titles. The memory plot stacks the
buffers live at each step; the dashed line is what storing every product layer would take instead
of recomputing it. A run of another plan (another circuit, block size or tolerance) is not lined up
against this one: switch *Plan* to the run's own plan to see its layers with its measured times. The
roofline plot places every step by arithmetic intensity: left of the ridge, memory traffic bounds it
(input and product layers); right of it, compute. Tap a bar of any timeline of the current plan to
highlight its layer in every tab."""

LANES = ["forward", "recompute", "backward"]
STREAM_LANE_NAMES = list(STREAM_LANES.values())  # main chain, recompute ahead, param flows behind
# a bar's hover, on one stream or three: what it does in words (an early statistics launch: its nodes
# and product layer) and its time in ms, not the rectangle's corners, lane coordinates and alpha
HOVER = [
    ("layer", "@layer (@kind)"),
    ("does", "@what"),
    ("time", "@ms{0.000[0]} ms, from @t0{0.000[0]} to @t1{0.000[0]} ms"),
]
# what a one-stream step does, by (kind, pass); any other kind: by pass
STEP_NOTES = {
    ("input", "forward"): "forward: the input distributions' values",
    ("product", "forward"): "forward: products of its children's values",
    ("sum", "forward"): "forward: weighted sums of its children's values",
    ("product", "recompute"): "recomputed into the scratch buffer just before the sum layer above needs it",
    ("product", "backward"): "backward: flows to its children",
    ("sum", "backward"): "backward: element flows and parameter flows",
    ("input", "backward"): "input statistics, at the end of the pass",
}
# what a three-stream slot does where it differs from one stream (`slot_note`)
SLOT_NOTES = {
    ("product", "recompute"): "recomputed ahead, into one of two alternating element buffers",
    ("sum", "backward"): "backward: node scale and element flows (the main chain waits for these)",
    ("sum", "param flows"): "parameter flows, behind the main chain: only the EM update reads them",
}
# the stacked timelines do not share an x axis: a 0.45 ms predicted step on a measured step's 8 ms axis
# is a sliver no one can read
OWN_AXES = "each timeline's time axis fits its own step: compare the step times in their titles."
STREAM_OPTIONS = {
    "Stream schedule: one stream (CPU, profiled batches)": 1,
    "three streams (GPU training default)": 3,
}
TABLE_COLUMNS = [
    "step",
    "layer",
    "kind",
    "pass",
    "flops",
    "bytes",
    "bound",
    "predicted_ms",
    "calibrated_ms",
    "measured_ms",
]


def step_note(r: dict) -> str:
    """What a one-stream step (a `PlanState.schedule` record) does, in words, for its hover."""
    return STEP_NOTES.get((r["kind"], r["pass"]), r["pass"])


def bars(rects: list[tuple], lanes: list[str], title: str, t: float, tap: bool = True):
    """Rectangles (t0, lane0, t1, lane1, kind, layer, pass, ms, what, alpha) coloured by kind, one lane
    each of `lanes`; the x axis fits this step alone (`t` ms, 2% margin), so a short step is not drawn
    as a sliver of a longer one's axis. `tap`: bars can be tapped (the caller selects the layer)."""
    vdims = ["kind", "layer", "pass", "ms", "what", "alpha"]
    el = hv.Rectangles(rects, kdims=["t0", "lane0", "t1", "lane1"], vdims=vdims)
    return el.opts(
        color="kind",
        cmap=KIND_COLORS,
        alpha="alpha",
        # a faint dark edge: bars stay apart, and one narrower than a pixel keeps its colour
        # (a white edge washed it out)
        line_color="black",
        line_alpha=0.25,
        line_width=0.5,
        responsive=True,
        height=200,
        tools=["hover", "tap"] if tap else ["hover"],
        hover_tooltips=HOVER,
        title=f"{title}: {t:.3g} ms per training step",
        xlabel="time in the step (ms)",
        ylabel="",
        yticks=list(enumerate(lanes)),
        ylim=(-0.6, 2.6),
        xlim=(0, max(t, 1e-6) * 1.02),
        show_legend=False,
        **NO_WHEEL,
    )


def timeline(records: list[dict], key: str, title: str, selected: int | None = None, tap: bool = True):
    """Rectangles laid end to end along x by `key` (ms), one lane per pass; the bars stand for the
    records with a `key` time, in order."""
    t, rects = 0.0, []
    for r in records:
        ms = r.get(key)
        if ms is None:
            continue
        lane = LANES.index(r["pass"])
        alpha = 1.0 if selected is None or r["layer"] == selected else 0.3
        rects.append(
            (t, lane - 0.4, t + ms, lane + 0.4, r["kind"], r["layer"], r["pass"], ms, step_note(r), alpha)
        )
        t += ms
    return bars(rects, LANES, title, t, tap)


def slot_note(slot: dict, early_steps: Collection[int] = ()) -> str:
    """What a stream slot does, in words, for its hover: an early statistics launch says which input
    nodes and which product layer made their flows final; `early_steps`: input steps with such launches."""
    if slot["pass"] == "statistics":
        lo, hi = slot["rows"]
        return (
            f"input statistics of nodes {lo}-{hi - 1}, computed early: their flows are final after "
            f"product layer {slot['after']}'s backward"
        )
    if slot["kind"] == "input" and slot["pass"] == "backward" and slot["stream"] == "main":
        rest = " of the nodes not done early" if slot["step"] in early_steps else ""
        return f"input statistics{rest}, at the end of the pass"
    return SLOT_NOTES.get((slot["kind"], slot["pass"])) or step_note(slot)


def stream_timeline(slots: list[dict], title: str, selected: int | None = None, tap: bool = True):
    """`plans.stream_schedule` slots as rectangles at their own start/end (ms), one lane per stream,
    coloured by layer kind (early input statistics in the input colour, in the param-flows lane)."""
    early_steps = {s["step"] for s in slots if s["pass"] == "statistics"}
    rects = [
        (
            s["start_ms"],
            STREAM_LANE_NAMES.index(s["lane"]) - 0.4,
            s["end_ms"],
            STREAM_LANE_NAMES.index(s["lane"]) + 0.4,
            s["kind"],
            s["layer"],
            s["pass"],
            s["ms"],
            slot_note(s, early_steps),
            1.0 if selected is None or s["layer"] == selected else 0.3,
        )
        for s in slots
    ]
    return bars(rects, STREAM_LANE_NAMES, title, step_ms(slots), tap)


def log_ticks(lo: float, hi: float, max_ticks: int = 5) -> list[float]:
    """At most `max_ticks` round tick positions (1, 2, 5 x 10^k) for a log axis over [lo, hi].

    When the data spans less than a decade, Bokeh's log ticker falls back to ticks at every
    1..9 x 10^k with long scientific labels ("4.000e+5") that run into each other.
    """
    lo, hi = max(float(lo), 1.0), max(float(hi), 1.0)
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    for mantissas in ((1, 2, 5), (1, 3), (1,)):
        ticks = [m * 10.0**k for k in decades for m in mantissas if lo / 2 <= m * 10.0**k <= hi * 2]
        if len(ticks) <= max_ticks:
            return ticks
    return ticks[:: math.ceil(len(ticks) / max_ticks)]


class ScheduleView(DeferWhileHidden, pn.viewable.Viewer):
    """Predicted / measured timelines of a training step and a per-layer cost table."""

    plan = param.ClassSelector(class_=PlanState)
    measured = param.Dict(default={}, doc="Mean measured ms per (layer, pass) from profiling")
    measured_source = param.String(default="", doc="Which run the measured times come from")
    measured_plan = param.List(
        default=[], doc="plan.to_dict()['layers'] of the run the measured times come from"
    )
    run_plan = param.Dict(
        default={}, doc="plan.to_dict() of that run (the worker's plan event; its batch size included)"
    )
    show = param.Selector(
        default="current",
        objects=["current", "run"],
        doc="Which plan the timelines draw: the current what-if plan, or the profiled run's own plan",
    )
    num_streams = param.Selector(
        default=1,
        objects=[1, 3],
        doc="Stream schedule drawn: 1 (CPU, profiled batches) or 3 (a GPU training step's flows pass)",
    )

    def __init__(self, **params):
        super().__init__(**params)
        self.peak = pn.widgets.Select(
            name="Device model",
            width=300,
            options={
                "this CPU (1e11 FLOP/s, 20 GB/s)": (1e11, 2e10, 5.0),
                "H100 (5e13 FLOP/s, 3.35 TB/s)": (5e13, 3.35e12, 5.0),
                "laptop GPU (1e13 FLOP/s, 400 GB/s)": (1e13, 4e11, 8.0),
            },
        )
        self.peak.param.watch(self._on_device, "value")
        self.predicted = pn.pane.HoloViews(sizing_mode="stretch_width", height=210)
        # no fixed height and never hidden: without measured times it holds no plot and takes no room
        # (toggling `visible` inside a frozen document update trips Panel's stylesheet validation)
        self.measured_plot = pn.pane.HoloViews(sizing_mode="stretch_width")
        self.calibrated_plot = pn.pane.HoloViews(sizing_mode="stretch_width")
        self.calibration_info = pn.pane.Markdown("", margin=(0, 10))
        self.use_calibrated = pn.widgets.Button(
            name="Use the calibrated device model", width=260, disabled=True
        )
        self.use_calibrated.on_click(lambda e: self._apply_calibration())
        self.calibration: calibrate.Calibration | None = None
        self._calibration_source = ""  # the run the calibration was fitted to
        self.memory = pn.pane.HoloViews(sizing_mode="stretch_width", height=310)
        self.scatter = pn.pane.HoloViews(sizing_mode="stretch_width", height=300)
        self.legend = pn.pane.HTML(
            " ".join(
                f'<span style="background:{c};color:white;padding:2px 8px;border-radius:3px">{k}</span>'
                for k, c in KIND_COLORS.items()
                if k != "recompute"
            ),
            margin=(0, 10),
        )
        self.info = pn.pane.Markdown("", margin=(0, 10))
        # disabled (not hidden) while there is no other plan to show: see `measured_plot` above
        self.plan_switch = pn.widgets.RadioButtonGroup(
            options=self._switch_options(), value="current", disabled=True, width=520
        )
        self.plan_switch.param.watch(lambda e: setattr(self, "show", e.new), "value")
        self.stream_switch = pn.widgets.RadioButtonGroup(
            options=STREAM_OPTIONS, value=self.num_streams, width=560
        )
        self.stream_switch.param.watch(lambda e: setattr(self, "num_streams", e.new), "value")
        self.streams_info = pn.pane.Markdown("", margin=(0, 10))
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(columns=TABLE_COLUMNS),
            show_index=False,
            disabled=True,
            height=300,
            sizing_mode="stretch_width",
            pagination=None,
        )
        # every profiled run of this session, by plan: a later run of another circuit must not hide
        # the measurements of an earlier run of the plan the user has built again
        self._runs_by_plan: dict[tuple, tuple[str, dict]] = {}
        self.param.watch(self._remember, ["measured"])
        redraw = lambda *e: self.when_shown("plan", self.refresh)  # noqa: E731
        self.plan.param.watch(
            redraw, ["plan", "peak_flops", "bandwidth", "launch_us", "absent", "selected_layer"]
        )
        self.param.watch(redraw, ["measured", "measured_plan", "run_plan", "show", "num_streams"])
        self.refresh()

    def _on_device(self, event) -> None:
        flops, bw, launch = event.new
        self.plan.param.update(peak_flops=flops, bandwidth=bw, launch_us=launch)

    def _remember(self, _event=None) -> None:
        if self.measured and self.measured_plan:
            self._runs_by_plan[plan_signature(self.measured_plan)] = (
                self.measured_source,
                dict(self.measured),
            )

    def this_plan_measured(self) -> tuple[str, dict] | None:
        """(run name, mean ms per (layer, pass)) of the latest profiled run of exactly the current plan:
        the last run if it is one, else an earlier run of this session; None when no run measured it."""
        if self.matches():
            return self.measured_source, self.measured
        return self._runs_by_plan.get(plan_signature(self.plan.layers))

    def matches(self) -> bool:
        """Whether the measured times are of this very plan (same layers and partitions)."""
        return bool(self.measured) and plan_signature(self.measured_plan) == plan_signature(self.plan.layers)

    def _run_layers(self) -> list[dict]:
        """The profiled run's layers: from its plan event, else `measured_plan`."""
        return list(self.run_plan.get("layers") or self.measured_plan)

    def _switch_options(self) -> dict[str, str]:
        n = len(self._run_layers())
        run = (
            f"the run's plan ({self.measured_source}, {n} layers)" if n else "the run's plan (none profiled)"
        )
        return {"Plan: current circuit": "current", run: "run"}

    def other_run_plan(self) -> bool:
        """Whether a profiled run of another plan than the current one can be drawn on its own plan."""
        return bool(self.measured) and bool(self._run_layers()) and not self.matches()

    def showing_run(self) -> bool:
        """Whether the timelines draw the run's own plan (the switch is on it and it is another plan)."""
        return self.show == "run" and self.other_run_plan()

    def _sync_switch(self) -> None:
        opts = self._switch_options()
        if opts != self.plan_switch.options:
            self.plan_switch.options = opts
        self.plan_switch.param.update(value=self.show, disabled=not self.other_run_plan())

    def refresh(self) -> None:
        self._sync_switch()
        if self.showing_run():
            return self._refresh_run()
        if self.plan.plan is None:
            self._clear()
            self.info.object = self.plan.absent
            return
        found = self.this_plan_measured()
        ok = found is not None
        src, times = found or ("", {})
        plan, records = self.plan.plan, self.plan.schedule(times if ok else None)
        cal = self._calibrate(records, ok, src)
        predicted = sum(r["predicted_ms"] for r in records)
        measured = sum(r["measured_ms"] or 0.0 for r in records) if ok else 0.0
        sel = self.plan.selected_layer
        # tap a bar of any timeline: select its layer in every view
        self._taps = {}
        self.predicted.object = self._tappable(
            "predicted", *self._timeline(plan, records, "predicted_ms", "Predicted (roofline)", sel)
        )
        self.measured_plot.object = (
            self._tappable(
                "measured",
                timeline(records, "measured_ms", f"Measured ({src}), profiled batches on one stream", sel),
                [r for r in records if r.get("measured_ms") is not None],
            )
            if ok
            else None
        )
        self.calibrated_plot.object = (
            self._tappable(
                "calibrated", *self._timeline(plan, records, "calibrated_ms", "Calibrated model", sel)
            )
            if cal is not None
            else None
        )
        self._tap = self._taps["predicted"]
        self.calibration_info.object = self._calibration_line(cal, plan, records)
        self.use_calibrated.disabled = cal is None
        self.scatter.object = roofline(records, self.plan.peak_flops, self.plan.bandwidth, ok)
        self.memory.object = memory_plot(
            memory.memory_timeline(plan, records, self.plan.batch_size), self._memory_policy()
        )
        self.streams_info.object = self._streams_line(plan, records, ok)
        self.info.object = self._summary(records) + self._measured_line(src, predicted, measured)

    def _tappable(self, name: str, el, picks: list[dict]):
        """`el` with a tap stream that selects the layer of the tapped bar (`picks`: what its bars
        stand for, in order), kept in `_taps[name]`."""
        tap = hv.streams.Selection1D(source=el)
        tap.add_subscriber(lambda index: self._select(picks, index))
        self._taps[name] = tap
        return el

    def _timeline(self, plan, records: list[dict], key: str, title: str, sel=None, tap: bool = True):
        """(element, records its bars stand for in order): the one-stream timeline by pass, or the
        three-stream one by stream, whichever `num_streams` picks."""
        if self.num_streams == 3:
            slots = stream_schedule(plan, records, key)
            if slots is not None:
                return stream_timeline(slots, f"{title}, three streams (GPU training)", sel, tap), slots
        picks = [r for r in records if r.get(key) is not None]
        return timeline(records, key, f"{title}, one stream", sel, tap), picks

    def _memory_policy(self) -> str:
        return "three streams" if self.num_streams == 3 else "recompute"

    def _streams_line(self, plan, records: list[dict], measured: bool) -> str:
        """The predicted step on one stream and on three, and what the measured times are."""
        one = sum(r["predicted_ms"] for r in records)
        slots = stream_schedule(plan, records)
        three = step_ms(slots)
        gain = f"{100 * (1 - three / one):.0f}% less" if one > 0 else "no change"
        line = (
            f"Predicted step: **{one:.3g} ms on one stream** (CPU, profiled batches), "
            f"**{three:.3g} ms on three streams** (GPU training default, {gain}). "
        )
        if self.num_streams == 3:
            line += (
                "Drawn: **three streams**, a GPU training step (Triton executor, "
                "`KernelOptions.overlap=True`): the side streams' work overlaps the main chain, taken as "
                "not slowing it (a lower bound: large layers leave no idle SMs). The flows pass recomputes "
                "into two element buffers; the second takes node-value rows already read where they fit "
                "and a small spare elsewhere, which the memory plot counts. "
            ) + self._early_line(slots, known=bool(plan.input_flows_ready()))
        else:
            line += (
                "Drawn: **one stream**, what the CPU executor and profiled batches run; a GPU training "
                "step runs three streams: switch *Stream schedule* to see it. "
            )
        if measured:
            t = stream_schedule(plan, records, "measured_ms")
            line += (
                "*Measured per-layer times come from profiled batches, which run on one stream* (each "
                "layer timed alone), so the measured timeline is a one-stream one"
                + (
                    f"; laid out on three streams they predict **{step_ms(t):.3g} ms** per step."
                    if t
                    else "."
                )
            )
        return line

    @staticmethod
    def _early_line(slots: list[dict], known: bool = True) -> str:
        """How much of the input statistics the three-stream step computes early, or that none is and
        why; `known`: the plan says when its input nodes' flows are final (a run's stored plan from
        before plans stored it does not)."""
        early = [s for s in slots if s["pass"] == "statistics"]
        if not early and not known:
            return (
                "No input statistics are drawn early: this run's stored plan does not say when its input "
                "nodes' flows are final (stored before plans kept that), so all run on the main chain "
                "at the end. "
            )
        if not early:
            return (
                "**No input statistics come early in this circuit**: too few input nodes have their "
                "final flows before the lowest product layer's backward (a PD reads every input node "
                "there), so all run on the main chain at the end, as on one stream. "
            )
        stats = sum(s["ms"] for s in slots if s["kind"] == "input" and s["pass"] != "forward")
        moved = sum(s["ms"] for s in early)
        return (
            f"**{len(early)} early input-statistics launches** on the param-flows stream, each after the "
            f"product layer that made its rows' flows final: {100 * moved / max(stats, 1e-12):.0f}% of "
            "the input statistics' time leaves the end of the main chain. "
        )

    def _clear(self) -> None:
        self._tap, self._taps = None, {}
        self.streams_info.object = ""
        for pane in (self.predicted, self.measured_plot, self.calibrated_plot, self.scatter, self.memory):
            pane.object = None
        self.table.value = pd.DataFrame(columns=TABLE_COLUMNS)
        self.calibration, self.calibration_info.object = None, ""
        self.use_calibrated.disabled = True

    def _refresh_run(self) -> None:
        """Draw the profiled run's own plan (another circuit or options than the current one): its
        predicted and measured times on one axis, calibration and memory of that plan. No tap-to-select:
        its layer indices are not the current plan's."""
        d = self.run_plan or {"layers": self._run_layers()}
        try:
            records = self.plan.schedule_of(d, self.measured)
            skeleton = plan_from_dict(d)
        except ValueError as err:
            self._clear()
            self.info.object = f"*The run's plan cannot be drawn: {err}*"
            return
        bs = plan_batch_size(d, self.plan.batch_size)
        p = self.plan
        cal = self._calibrate(records, True, self.measured_source)
        predicted = sum(r["predicted_ms"] for r in records)
        measured = sum(r["measured_ms"] or 0.0 for r in records)
        src = self.measured_source
        self._tap, self._taps = None, {}  # no tap tool: the run's layer indices are not this plan's
        self.predicted.object = self._timeline(
            skeleton, records, "predicted_ms", f"Predicted (roofline), plan of {src}", tap=False
        )[0]
        self.measured_plot.object = timeline(
            records,
            "measured_ms",
            f"Measured ({src}) on its own plan, profiled batches on one stream",
            tap=False,
        )
        self.calibrated_plot.object = (
            self._timeline(skeleton, records, "calibrated_ms", "Calibrated model", tap=False)[0]
            if cal is not None
            else None
        )
        self.calibration_info.object = self._calibration_line(cal, skeleton, records)
        self.use_calibrated.disabled = cal is None
        self.scatter.object = roofline(records, p.peak_flops, p.bandwidth, True)
        self.memory.object = memory_plot(memory.memory_timeline(skeleton, records, bs), self._memory_policy())
        self.streams_info.object = self._streams_line(skeleton, records, True)
        n_re = sum(r["pass"] == "recompute" for r in records)
        self.info.object = (
            f"**The plan of run {src}** (not the current circuit's): **{len(skeleton.layers)}** layers, "
            f"{len(records)} steps per training step ({n_re} product-layer recomputations), batch {bs}. "
            f"Measured **{measured:.3g} ms per step**, predicted {predicted:.3g} ms for this plan "
            f"({measured / max(predicted, 1e-12):.3g}x); {OWN_AXES} "
            "Switch *Plan* back to the current circuit for its what-if timeline."
        )

    def _calibrate(self, records: list[dict], fit: bool, source: str = "") -> calibrate.Calibration | None:
        """Fit (`fit`: records of one plan with its run's measured times) the device model, add each
        record's calibrated_ms (None unfitted) and fill the table."""
        p = self.plan
        cal = calibrate.calibrate(records, p.peak_flops, p.bandwidth, p.launch_us) if fit else None
        self.calibration, self._calibration_source = cal, source
        for r in records:
            r["calibrated_ms"] = (
                float(
                    calibrate.predict_ms(
                        r["flops"], r["bytes"], r["launches"], cal.peak_flops, cal.bandwidth, cal.launch_us
                    )
                )
                if cal is not None
                else None
            )
        df = pd.DataFrame(records, columns=TABLE_COLUMNS)
        for c in ("predicted_ms", "calibrated_ms", "measured_ms"):
            df[c] = pd.to_numeric(df[c]).round(4)
        self.table.value = df
        return cal

    def _calibration_line(self, cal: calibrate.Calibration | None, plan=None, records=None) -> str:
        """What the device model is calibrated to, or that it is not; every step time says which
        schedule it is for (one stream: what was measured; three: `records`' calibrated_ms laid out on
        `plan`'s streams, the calibrated three-stream timeline's step)."""
        if cal is None:
            return (
                "Device model: **uncalibrated** (the preset above). Train this plan with profiling "
                "(Train tab) and its measured times calibrate the model."
            )
        slots = stream_schedule(plan, records, "calibrated_ms") if plan is not None and records else None
        three = f", **{step_ms(slots):.3g} ms on three streams** (a GPU training step)" if slots else ""
        return (
            f"Device model **calibrated** to {self._calibration_source} ({cal.num_steps} measured steps): "
            f"throughput **{fmt_count(cal.peak_flops)}FLOP/s**, bandwidth **{fmt_bytes(cal.bandwidth)}/s**, "
            f"launch **{cal.launch_us:.3g} us** per partition. Calibrated prediction "
            f"**{cal.predicted_ms:.3g} ms per step on one stream** against {cal.measured_ms:.3g} ms "
            f"measured on one stream (factor **{cal.factor:.2f}x**, median step off by "
            f"{cal.median_error:.2f}x){three}; the preset predicted {cal.uncalibrated_ms:.3g} ms on one "
            f"stream (factor {cal.uncalibrated_factor:.3g}x)."
        )

    def _apply_calibration(self) -> None:
        cal = self.calibration
        if cal is not None:
            self.plan.param.update(
                peak_flops=cal.peak_flops, bandwidth=cal.bandwidth, launch_us=cal.launch_us
            )

    def _select(self, records: list[dict], index: list[int]) -> None:
        """`records`: what the tapped timeline's bars stand for, in order (records or stream slots)."""
        if index:
            self.plan.selected_layer = records[index[0]]["layer"]

    def _summary(self, records: list[dict]) -> str:
        n_re = sum(r["pass"] == "recompute" for r in records)
        total_flops = sum(r["flops"] for r in records)
        recompute = sum(r["flops"] for r in records if r["pass"] == "recompute")
        return (
            f"**{len(records)}** steps per training step ({len(self.plan.layers)} layers forward, "
            f"{n_re} product-layer recomputations), {fmt_count(total_flops)}FLOP per batch of "
            f"{self.plan.batch_size}; recomputation adds {100 * recompute / max(total_flops, 1):.2f}% FLOPs."
        )

    def _measured_line(self, source: str, predicted: float, measured: float) -> str:
        """`source`: the run whose times of this plan are drawn ("" when none)."""
        if source:
            return (
                f" Measured ({source}): **{measured:.3g} ms per step**, predicted "
                f"{predicted:.3g} ms ({measured / max(predicted, 1e-12):.3g}x); {OWN_AXES}"
            )
        if self.measured:
            return (
                f" *The last profiled run ({self.measured_source}) ran a different plan (another circuit, "
                "block size or tolerance), so its times are not drawn against this one: train this plan "
                "to measure it, or switch Plan to the run's plan to see its times on its own layers.*"
            )
        return " *Measured times appear once a run of this plan is profiled (Train tab).*"

    def __panel__(self):
        return pn.Column(
            learn(LEARN),
            pn.Row(self.peak, self.legend, align="end"),
            self.plan_switch,
            self.stream_switch,
            self.info,
            self.streams_info,
            self.predicted,
            self.calibrated_plot,
            self.measured_plot,
            pn.Row(self.calibration_info, self.use_calibrated, align="center"),
            self.memory,
            self.scatter,
            self.table,
            sizing_mode="stretch_width",
        )
