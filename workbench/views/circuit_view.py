"""A readable layered drawing of the circuit that stays responsive at 10^5+ nodes.

Three zoom levels from the layout service (`workbench.services.layout`), all plain column data:
plan layers -> node vectors of a rank range (crowded ranks aggregated) -> node blocks of one vector.
Click a glyph (or use the controls) to drill down; the drawing is Segments + Points on bokeh.
"""

from __future__ import annotations

import holoviews as hv
import pandas as pd
import panel as pn
import param

from workbench.services import layout
from workbench.state.plan import PlanState
from workbench.views._common import KIND_COLORS, fmt_count, learn

LEARN = """**The circuit, layer by layer.** Nodes at the same depth do not depend on each other, so a
compiler can evaluate each *layer* of inputs, products or sums in one parallel step; the number of
layers (the depth) bounds how much sequential work remains. Large circuits are drawn aggregated: one
glyph per layer, then node vectors of a few layers (crowded levels grouped), then the node blocks of
one vector, the unit a block-sparse kernel works on. Click a glyph to drill down."""

LEVELS = ["Layers", "Node vectors", "Blocks"]
COLORS = {**KIND_COLORS, "mixed": "#9d755d"}
SCALAR_NODE_COLUMNS = ("id", "x", "y", "label", "kind", "size", "count")


def draw(d: layout.Drawing, title: str):
    """Segments (edges, width ~ log weight) under Points (size ~ log nodes, colour = kind)."""
    nodes = pd.DataFrame({k: d.nodes[k] for k in SCALAR_NODE_COLUMNS if k in d.nodes})
    edges = pd.DataFrame(d.edges)
    seg = (
        hv.Segments(edges, ["x0", "y0", "x1", "y1"], ["weight", "source", "target"])
        if len(edges)
        else hv.Segments([], ["x0", "y0", "x1", "y1"])
    )
    seg = seg.opts(color="#8a8a8a", alpha=0.35, line_width=1)
    pts = hv.Points(nodes, ["x", "y"], ["label", "kind", "size", "count", "id"])
    pts = pts.opts(
        color="kind",
        cmap=COLORS,
        size=hv.dim("size").log10() * 3 + 7,
        line_color="white",
        tools=["hover", "tap"],
        hover_tooltips=[("", "@label"), ("aggregated", "@count")],
        nonselection_alpha=0.6,
        show_legend=True,
        legend_position="right",
    )
    out = seg * pts
    if len(nodes) <= 40:
        short = [lab if len(lab) <= 42 else lab[:40] + "…" for lab in nodes["label"]]
        labels = hv.Labels({"x": nodes["x"], "y": nodes["y"], "text": short}, ["x", "y"], "text")
        out = out * labels.opts(text_font_size="8pt", xoffset=0.08, text_align="left", text_color="#333")
    lo, hi = (min(d.nodes["x"]), max(d.nodes["x"])) if len(nodes) else (0.0, 0.0)
    xlim = (lo - 1.0, hi + 2.0) if hi - lo < 4 else (lo - 0.05 * (hi - lo), hi + 0.25 * (hi - lo))
    return out.opts(
        xlim=xlim,
        responsive=True,
        height=560,
        title=title,
        xaxis=None,
        ylabel="rank (0 = inputs)",
        active_tools=["wheel_zoom"],
        show_grid=False,
    )


class CircuitView(pn.viewable.Viewer):
    """Level selector, rank range and vector picker; the drawing; a line about what is shown."""

    plan = param.ClassSelector(class_=PlanState)
    level = param.Selector(default="Layers", objects=LEVELS, doc="Zoom level of the drawing")
    ranks = param.Range(default=(0, 4), doc="Rank range drawn at the node-vector level")
    vector = param.String(default="", doc="Vector id (v<N>) drawn at the block level")
    max_per_rank = param.Integer(default=48, bounds=(4, 512), doc="Glyphs per rank before aggregating")

    def __init__(self, **params):
        super().__init__(**params)
        self.level_w = pn.widgets.RadioButtonGroup.from_param(self.param.level, width=330)
        self.ranks_w = pn.widgets.IntRangeSlider(
            name="Ranks (vector level)", start=0, end=4, value=(0, 4), width=260
        )
        self.vector_w = pn.widgets.TextInput.from_param(
            self.param.vector, name="Vector id (block level)", width=170
        )
        self.per_rank_w = pn.widgets.IntInput.from_param(
            self.param.max_per_rank, name="Glyphs per rank", width=120
        )
        self.ranks_w.param.watch(lambda e: setattr(self, "ranks", e.new), "value_throttled")
        self.info = pn.pane.Markdown("", margin=(0, 10))
        self.pane = pn.pane.HoloViews(sizing_mode="stretch_width", height=570)
        self._index: layout.VectorIndex | None = None
        self._index_root = None
        self._selection = None
        self.plan.param.watch(lambda e: self._on_plan(), "plan")
        self.param.watch(lambda *e: self.redraw(), ["level", "ranks", "vector", "max_per_rank"])
        self._on_plan()

    # ------------------------------------------------------------------ data
    def index(self) -> layout.VectorIndex:
        """Vector index of the current root (built once per root)."""
        if self._index is None or self._index_root is not self.plan.root:
            self._index, self._index_root = layout.VectorIndex(self.plan.root), self.plan.root
        return self._index

    def drawing(self) -> tuple[layout.Drawing, str]:
        if self.level == "Layers":
            d = layout.layer_overview(self.plan.plan)
            return d, f"{d.info['num_layers']} layers, {fmt_count(d.info['num_nodes'])} nodes"
        idx = self.index()
        if self.level == "Node vectors" or not self.vector:
            lo, hi = self.ranks
            d = layout.vector_dag(idx, (int(lo), int(min(hi, idx.max_rank))), self.max_per_rank)
            agg = " (crowded ranks aggregated)" if d.info["aggregated"] else ""
            return d, f"{d.info['num_vectors']} node vectors in ranks {lo}-{hi}{agg}"
        d = layout.block_dag(idx, self.vector)
        i = d.info
        return d, (
            f"{i['kind']} vector `{i['vector']}`: {i['num_blocks']} blocks of {i['block_size']} nodes, "
            f"{i['num_child_blocks']} child blocks, {i['num_block_edges']} block edges"
        )

    # ------------------------------------------------------------------ drawing
    def _on_plan(self) -> None:
        self._index = None
        if self.plan.plan is not None:
            top = max(layout.layer_rank(la) for la in self.plan.plan.layers)
            self.ranks_w.param.update(end=max(top, 1), value=(0, min(top, 4)))
            with param.parameterized.discard_events(self):
                self.param.update(ranks=(0, min(top, 4)), vector="", level="Layers")
        self.redraw()

    def redraw(self) -> None:
        if self.plan.plan is None:
            self.info.object = "Build a circuit to see it here."
            self.pane.object = None
            return
        try:
            d, text = self.drawing()
        except KeyError as err:
            self.info.object = (
                f"**{err.args[0]}**: vector ids look like `v12` (hover a vector to see its id)."
            )
            return
        el = draw(d, f"{self.level}: {text}")
        self._selection = hv.streams.Selection1D(source=el.get(1))
        self._selection.add_subscriber(lambda index: self._drill(d, index))
        self.pane.object = el
        hint = {
            "Layers": "Click a layer to see its node vectors.",
            "Node vectors": "Click a single vector (id `v…`) to see its blocks; widen the rank range to see "
            "more layers.",
            "Blocks": "Top row: the vector's node blocks; bottom row: its children's blocks.",
        }[self.level]
        self.info.object = f"{text}. {hint}"

    def _drill(self, d: layout.Drawing, index: list[int]) -> None:
        if not index:
            return
        node = {k: d.nodes[k][index[0]] for k in d.nodes}
        if self.level == "Layers":
            r = int(node["y"])
            self.ranks_w.value = (max(0, r - 1), r + 1)
            self.param.update(ranks=(max(0, r - 1), r + 1), level="Node vectors")
        elif self.level == "Node vectors" and str(node["id"]).startswith("v"):
            self.param.update(vector=str(node["id"]), level="Blocks")

    def __panel__(self):
        controls = pn.Row(self.level_w, self.ranks_w, self.vector_w, self.per_rank_w, align="end")
        return pn.Column(learn(LEARN), controls, self.info, self.pane, sizing_mode="stretch_width")
