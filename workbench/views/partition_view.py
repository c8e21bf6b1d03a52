"""Block partitioning of every sum layer, and a live what-if over block size and partition tolerance.

Reads `PlanState` (which recompiles the plan, without tensors, when its options change) and draws:
a heat map of the selected layer's block-sparse edge matrix, real vs padded slots per partition,
padding and partitions per sum layer, predicted FLOPs / bytes / memory and a history of the what-ifs.
"""

from __future__ import annotations

import pandas as pd
import panel as pn
import param

from workbench.services import tiles
from workbench.state.plan import BLOCK_SIZES, PlanState
from workbench.views._common import fmt_bytes, fmt_count, learn, plural, safe_text
from workbench.views._deferred import DeferWhileHidden
from workbench.views.tiles_plot import PAD_COLOR, LayerBarsFigure, SlotsFigure, TilesFigure, title_for

LEARN = """**Block partitioning.** A sum layer runs as a few dense *block tiles*: node blocks with a
similar number of child blocks are grouped into a *partition* and padded to the same width, so one
batched matmul computes the whole partition. In the picture each row is a node block (the strip on
the left: its partition), each blue cell a `block x block` weight tile, and the red cells right of a
row the padded slots its partition computes for nothing. Bigger blocks mean fewer, larger tiles
(better GPU utilisation); a larger *tolerance* merges more node blocks into one partition (fewer
kernel launches) at the price of more red. Move the controls and watch padding, predicted FLOPs,
bytes and memory change; pick a partition in the table to see its rows."""

BLOCK_LABELS = {"auto (per vector)": None, **{str(b): b for b in BLOCK_SIZES if b is not None}}
PART_COLUMNS = [
    "partition",
    "block_size",
    "num_node_blocks",
    "width",
    "num_edges",
    "padded_edges",
    "padding_ratio",
    "kernel",
]


def capped_note(ps: PlanState) -> str:
    """Say so when the chosen block size cannot take effect: the compiler cuts a sum vector into
    gcd(its own block size, block size) tiles, so it never merges nodes of different vectors (a
    PSDD import has one node per vector: its tiles stay 1x1 whatever is chosen)."""
    if ps.block_size is None:
        return ""
    largest = max((p["block_size"] for x in ps.sum_layers for p in x["partitions"]), default=1)
    if largest >= ps.block_size:
        return ""
    return (
        f"\n\n*Block size {ps.block_size} acts as {largest} here: the compiler only cuts node vectors into "
        f"smaller blocks and never merges nodes of different vectors, and this circuit's sum vectors have "
        f"blocks of at most {largest} {plural(largest, 'node')} (a PSDD import has one node per vector).*"
    )


def layer_label(s: dict) -> str:
    n = s["num_partitions"]
    return f"layer {s['layer']} (depth {s['depth']}, {n} {plural(n, 'partition')})"


class PartitionView(DeferWhileHidden, pn.viewable.Viewer):
    """What-if controls, plan totals, per-layer heat map and partition table, and a what-if history."""

    plan = param.ClassSelector(class_=PlanState)

    def __init__(self, **params):
        super().__init__(**params)
        ps = self.plan
        current = {v: k for k, v in BLOCK_LABELS.items()}[ps.block_size]
        self.block = pn.widgets.Select(
            name="Block size", options=list(BLOCK_LABELS), value=current, width=150
        )
        self.tol = pn.widgets.FloatSlider(
            name="Partition tolerance", start=0.0, end=2.0, step=0.05, value=ps.tolerance, width=240
        )
        self.batch = pn.widgets.IntInput(name="Batch size", value=ps.batch_size, start=1, width=110)
        self.layer = pn.widgets.Select(name="Sum layer", options={}, width=320)
        self.block.param.watch(lambda e: self._what_if(block_size=BLOCK_LABELS[e.new]), "value")
        self.tol.param.watch(lambda e: self._what_if(tolerance=e.new), "value_throttled")
        self.batch.param.watch(lambda e: self._what_if(batch_size=e.new), "value")
        self.layer.param.watch(lambda e: self._on_layer(e.new), "value")
        ps.param.watch(lambda e: self._follow_selection(e.new), "selected_layer")
        self.totals = pn.pane.Markdown("", margin=(0, 10))
        self.alert = pn.pane.Alert("", alert_type="danger", visible=False)
        # plain Bokeh figures updated in place: a what-if sends data, not new figures
        self.tiles_fig, self.slots_fig = TilesFigure(), SlotsFigure()
        self.padding_fig = LayerBarsFigure("Padding per sum layer", "padding (%)", PAD_COLOR, ymax=100)
        self.parts_fig = LayerBarsFigure("Partitions per sum layer", "partitions", "#3ca951", integer=True)
        self.heat = pn.pane.Bokeh(self.tiles_fig.fig, sizing_mode="stretch_width", height=380)
        self.slots = pn.pane.Bokeh(self.slots_fig.fig, sizing_mode="stretch_width", height=380)
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(columns=PART_COLUMNS),
            show_index=False,
            disabled=True,
            selectable=1,
            height=180,
            sizing_mode="stretch_width",
        )
        self.per_layer = pn.Row(
            pn.pane.Bokeh(self.padding_fig.fig, sizing_mode="stretch_width"),
            pn.pane.Bokeh(self.parts_fig.fig, sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
        self.history = pn.widgets.Tabulator(
            pd.DataFrame(), show_index=False, disabled=True, height=200, sizing_mode="stretch_width"
        )
        self._history: list[dict] = []
        self._setting_layer = False
        ps.param.watch(lambda *e: self.when_shown("plan", self.refresh), ["plan", "error", "absent"])
        self.table.param.watch(lambda e: self._redraw_tiles(), "selection")
        self.refresh()

    def _what_if(self, **options) -> None:
        """Set plan options; the figures get new data in place, sent to the browser in one message
        (0.03 s of server time on the demo, was 2-3 s when each what-if rebuilt three figures)."""
        with pn.io.hold():  # one message to the browser; the figures only get new data (no freeze needed)
            self.plan.param.update(**options)

    # ------------------------------------------------------------------ whole-plan summaries
    def refresh(self) -> None:
        with pn.io.hold():  # see _draw_layer
            self._refresh()

    def _refresh(self) -> None:
        ps = self.plan
        self.alert.param.update(
            object=f"**Cannot plan this circuit:** {safe_text(ps.error)}", visible=bool(ps.error)
        )
        if ps.plan is None:
            self.totals.object = ps.absent if not ps.error else ""
            self._clear()
            return
        s = ps.summary
        flops = sum(x["flops"] for x in ps.sum_layers)
        bytes_ = sum(x["bytes"] for x in ps.sum_layers)
        parts = sum(x["num_partitions"] for x in ps.sum_layers)
        mem = s["memory_bytes"]["total"]
        self.totals.object = (
            f"**{len(ps.sum_layers)}** sum layers, **{parts}** partitions, padding "
            f"**{100 * ps.padding_ratio:.1f}%** of sum edges · predicted per batch of {ps.batch_size}: "
            f"**{fmt_count(flops)}FLOP**, **{fmt_bytes(bytes_)}** moved (sum layers, forward) · "
            f"training memory **{fmt_bytes(mem)}** · {s['num_params']:,} sum params · "
            f"planned in {1e3 * ps.seconds:.0f} ms" + capped_note(ps)
        )
        self._record(parts, flops, bytes_, mem)
        options = {layer_label(x): x["layer"] for x in ps.sum_layers}
        sel = ps.selected_layer  # picked in another tab (maybe while this one was hidden)
        keep = (
            sel
            if sel in options.values()
            else self.layer.value
            if self.layer.value in options.values()
            else None
        )
        self._setting_layer = True  # the tab's own default layer is no user selection
        try:
            self.layer.options = options
            self.layer.value = (
                keep if keep is not None else max(ps.sum_layers, key=lambda x: x["num_edges"])["layer"]
            )
        finally:
            self._setting_layer = False
        self._draw_per_layer()
        self._draw_layer()

    def _clear(self) -> None:
        """No plan: no picture of an older one."""
        self.layer.options = {}
        self.tiles_fig.update(None, "No circuit")
        self.slots_fig.update([])
        self.padding_fig.update([], [])
        self.parts_fig.update([], [])
        self.table.value = pd.DataFrame(columns=PART_COLUMNS)

    def _record(self, parts: int, flops: float, bytes_: float, mem: float) -> None:
        ps = self.plan
        row = {
            "block_size": "auto" if ps.block_size is None else ps.block_size,
            "tolerance": ps.tolerance,
            "batch": ps.batch_size,
            "partitions": parts,
            "padding_%": round(100 * ps.padding_ratio, 2),
            "GFLOP/batch": round(flops / 1e9, 4),
            "MB moved": round(bytes_ / 1e6, 3),
            "memory MB": round(mem / 1e6, 2),
        }
        if not self._history or self._history[-1] != row:
            self._history = (self._history + [row])[-12:]
            self.history.value = pd.DataFrame(self._history[::-1])

    def _draw_per_layer(self) -> None:
        layers = [str(x["layer"]) for x in self.plan.sum_layers]
        self.padding_fig.update(layers, [100 * x["padding_ratio"] for x in self.plan.sum_layers])
        self.parts_fig.update(layers, [x["num_partitions"] for x in self.plan.sum_layers])

    # ------------------------------------------------------------------ one layer
    def _redraw_tiles(self) -> None:
        """A partition picked in the table: its band stays bright in the tiles, the others dim."""
        s = self._layer_summary()
        if s is not None:
            with pn.io.hold():  # see _draw_layer
                self._draw_tiles(s)

    def _layer_summary(self) -> dict | None:
        return next((x for x in self.plan.sum_layers if x["layer"] == self.layer.value), None)

    def _on_layer(self, layer) -> None:
        self.when_shown("layer", self._draw_layer)
        if layer is not None and not self._setting_layer:
            self.plan.selected_layer = layer  # linked: the schedule and the circuit highlight it

    def _follow_selection(self, layer) -> None:
        """A sum layer picked elsewhere (schedule bar, circuit glyph) becomes this tab's layer."""
        if layer is not None and layer in self.layer.options.values():
            self.layer.value = layer

    def _draw_layer(self) -> None:
        """Table, tiles and slots of the chosen layer. Held: changes to plain Bokeh models made in a
        widget's callback (a Tabulator selection, a Select) reached the browser only when held."""
        with pn.io.hold():
            self._draw_layer_now()

    def _draw_layer_now(self) -> None:
        s = self._layer_summary()
        if s is None:
            return
        rows = [
            {"partition": k, **{c: p[c] for c in PART_COLUMNS[1:]}} for k, p in enumerate(s["partitions"])
        ]
        with param.parameterized.discard_events(self.table):
            self.table.selection = []
        self.table.value = pd.DataFrame(rows, columns=PART_COLUMNS)
        self._draw_tiles(s)
        self.slots_fig.update(rows)

    def _draw_tiles(self, s: dict) -> None:
        """The layer's block tiles, rows grouped by partition, padded slots in red (see tiles_plot)."""
        t = tiles.block_tiles(self.plan.plan.layers[s["layer"]])
        self.tiles_fig.update(t, title_for(s["layer"], t), self._selected_partition())

    def _selected_partition(self) -> int | None:
        sel = self.table.selection
        return (
            int(self.table.value.iloc[sel[0]]["partition"])
            if sel and len(self.table.value) > sel[0]
            else None
        )

    def __panel__(self):
        controls = pn.Row(self.block, self.tol, self.batch, self.layer, align="end")
        return pn.Column(
            learn(LEARN),
            controls,
            self.alert,
            self.totals,
            pn.Row(pn.Column(self.heat, sizing_mode="stretch_width"), pn.Column(self.slots, width=420)),
            self.table,
            self.per_layer,
            pn.pane.Markdown("**What-if history** (latest first)", margin=(0, 10)),
            self.history,
            sizing_mode="stretch_width",
        )
