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
from workbench.views._common import KIND_COLORS, NO_WHEEL, fmt_count, learn, plural, plural_n
from workbench.views._deferred import DeferWhileHidden
from workbench.views.tiles_plot import partition_color

LEARN = """**The circuit, layer by layer.** Nodes at the same depth do not depend on each other, so a
compiler can evaluate each *layer* of inputs, products or sums in one parallel step; the number of
layers (the depth) bounds how much sequential work remains. Large circuits are drawn aggregated: one
glyph per layer, then node vectors of a few layers (crowded levels grouped), then the node blocks of
one vector, the unit a block-sparse kernel works on. Click a glyph to drill down."""

LEVELS = ["Layers", "Node vectors", "Blocks"]
COLORS = {**KIND_COLORS, "mixed": "#9d755d"}
SCALAR_NODE_COLUMNS = ("id", "x", "y", "label", "kind", "size", "count", "partition", "outline")


def _bin_firsts(d: layout.Drawing, prefix: str) -> list[int]:
    """First block index of each drawn `prefix` glyph (labels read '... block 4' or '... blocks 4-7')."""
    out = []
    for gid, label in zip(d.nodes["id"], d.nodes["label"]):
        if gid.startswith(prefix):
            out.append(int(label.rsplit(" ", 1)[1].split("-")[0]))
    return out


def _widest_sum(idx: layout.VectorIndex) -> str:
    """Id of the sum vector with the most block edges (the most to see at the block level)."""
    sums = [i for i, k in enumerate(idx.kind) if k == "sum"]
    best = max(sums, key=lambda i: idx.vectors[i].edge_ids.shape[1] * idx.vectors[i].block_size ** 2)
    return idx.ids[best]


def _yticks(d: layout.Drawing, nodes: pd.DataFrame) -> list:
    """Integer ranks; at the block level the two rows are named."""
    if d.level == "blocks":
        return [(0, "child blocks"), (1, f"{d.info['vector']} blocks")]
    ys = sorted({int(y) for y in nodes["y"]}) if len(nodes) else [0]
    return ys if len(ys) <= 12 else ys[:: -(-len(ys) // 12)]


MAX_LABELS_PER_ROW = 12  # more labels on one rank run into each other at the drawing's width


def short_label(d: layout.Drawing, label: str, gid: str) -> str:
    """A label short enough to sit above its glyph: the vector id, the layer, or the block index
    (the full text is in the hover)."""
    if d.level == "layers":
        return label.split(":")[0].replace(" layer ", " ")  # 'sum 4'
    if d.level == "vectors":
        return gid if gid.startswith("v") else label.split(":")[0]  # 'v12' or '6 sum vectors'
    return "block " + label.rsplit(" ", 1)[-1]  # block index (or range)


def labelled(d: layout.Drawing, nodes: pd.DataFrame) -> pd.DataFrame:
    """The glyphs that get a label: every glyph of a rank with at most MAX_LABELS_PER_ROW glyphs
    (at the block level only the vector's own row: its children's blocks are many and alike)."""
    if not len(nodes):
        return nodes
    rows = nodes[nodes["y"] == 1] if d.level == "blocks" else nodes
    per_rank = rows.groupby("y")["id"].transform("size")
    shown = rows[per_rank <= MAX_LABELS_PER_ROW].copy()
    shown["short"] = [short_label(d, lab, gid) for lab, gid in zip(shown["label"], shown["id"])]
    return shown


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
    if "outline" in nodes:  # node blocks ringed in the colour of the partition that computes them
        ring = nodes[nodes["partition"] >= 0]
        rings = hv.Points(ring, ["x", "y"], ["outline", "partition"]).opts(
            marker="square",
            size=20,
            fill_alpha=0,
            line_color="outline",
            cmap={c: c for c in ring["outline"]} or None,
            line_width=3,
            show_legend=False,
        )
        out = out * rings
    shown = labelled(d, nodes)
    if len(shown):
        labels = hv.Labels({"x": shown["x"], "y": shown["y"], "text": shown["short"]}, ["x", "y"], "text")
        out = out * labels.opts(
            text_font_size="8pt", yoffset=0.18, text_align="center", text_baseline="bottom", text_color="#333"
        )
    lo, hi = (min(d.nodes["x"]), max(d.nodes["x"])) if len(nodes) else (0.0, 0.0)
    ys = [float(y) for y in nodes["y"]] if len(nodes) else [0.0]
    ylim = (min(ys) - 0.4, max(ys) + 0.6)  # room for the labels above the top row
    xlim = (lo - 1.0, hi + 2.0) if hi - lo < 4 else (lo - 0.05 * (hi - lo), hi + 0.25 * (hi - lo))
    return out.opts(
        xlim=xlim,
        ylim=ylim,
        responsive=True,
        height=560,
        title=title,
        xaxis=None,
        ylabel="rank (0 = inputs)" if d.level != "blocks" else "",
        yticks=_yticks(d, nodes),
        show_grid=False,
        **NO_WHEEL,
    )


class CircuitView(DeferWhileHidden, pn.viewable.Viewer):
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
        self.plan.param.watch(lambda e: self.when_shown("plan", self._on_plan), ["plan", "absent"])
        self.plan.param.watch(lambda e: self._on_selected(), "selected_layer")
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
            sel = self.plan.selected_layer  # ringed: the layer picked in the schedule or partitions
            d.nodes["partition"] = [0 if la == sel else -1 for la in d.nodes["layer"]]
            d.nodes["outline"] = ["#222" if la == sel else "white" for la in d.nodes["layer"]]
            return d, f"{d.info['num_layers']} layers, {self._node_count(d)}"
        idx = self.index()
        if self.level == "Node vectors":
            lo, hi = self.ranks
            d = layout.vector_dag(idx, (int(lo), int(min(hi, idx.max_rank))), self.max_per_rank)
            agg = (
                " (crowded ranks aggregated: click a group to see its rank alone)"
                if d.info["aggregated"]
                else ""
            )
            n = d.info["num_vectors"]
            return d, f"{plural_n(n, 'node vector')} in ranks {lo}-{hi}{agg}"
        vector = self.vector or _widest_sum(idx)  # no id typed: the sum vector with most block edges
        d = layout.block_dag(idx, vector, block_size=self.plan.block_size)
        self._mark_partitions(d, idx.vectors[idx.find(vector)])
        i = d.info
        at = "" if i["block_size"] == i["own_block_size"] else f" (cut from its own {i['own_block_size']})"
        return d, (
            f"{i['kind']} vector {i['vector']}{'' if self.vector else ' (widest sum vector; type an id)'}: "
            f"{plural_n(i['num_blocks'], 'block')} of {plural_n(i['block_size'], 'node')} at the plan's "
            f"block size{at}, {plural_n(i['num_child_blocks'], 'child block')}, "
            f"{plural_n(i['num_block_edges'], 'block edge')}"
        )

    def _node_count(self, d: layout.Drawing) -> str:
        """The circuit's node count, as the Build tab reports it, and the compiled plan's when it
        differs (HMM: 737 nodes, 753 in the plan)."""
        circuit = int(self.index().num_nodes.sum())
        planned = int(d.info["num_nodes"])
        text = f"{fmt_count(circuit)} {plural(circuit, 'node')}"
        if planned == circuit:
            return text
        return (
            f"{text} ({fmt_count(planned)} in the compiled plan, which merges products of products into "
            "one product and gives a sum that reads input nodes directly a one-child product to read)"
        )

    def _title(self, d: layout.Drawing) -> str:
        """A short title; the counts are in the line above the drawing."""
        if d.level == "blocks":
            i = d.info
            return f"Node blocks of {i['kind']} vector {i['vector']} ({i['block_size']} nodes each)"
        if d.level == "vectors":
            return f"Node vectors in ranks {d.info['ranks'][0]}-{d.info['ranks'][1]}"
        circuit = int(self.index().num_nodes.sum())
        return f"Layers: {d.info['num_layers']} layers, {fmt_count(circuit)} {plural(circuit, 'node')}"

    def _mark_partitions(self, d: layout.Drawing, vector) -> None:
        """Outline each parent block in the colour of the plan partition that computes it."""
        parts = self.plan.partitions_of(vector, d.info["block_size"]) if vector.kind == "sum" else []
        first = {f"p{b}": k for b, k in enumerate(_bin_firsts(d, "p"))}
        d.nodes["partition"] = [parts[first[i]][1] if i in first and parts else -1 for i in d.nodes["id"]]
        d.nodes["outline"] = [partition_color(k) if k >= 0 else "white" for k in d.nodes["partition"]]
        d.nodes["layer"] = [parts[first[i]][0] if i in first and parts else -1 for i in d.nodes["id"]]

    # ------------------------------------------------------------------ drawing
    def _on_plan(self) -> None:
        """A new circuit starts over at the layer level (widgets included); a new plan of the same
        circuit (block size, tolerance) keeps the level and redraws."""
        if self.plan.plan is not None and self.plan.root is not self._index_root:
            self._index = None
            top = max(layout.layer_rank(la) for la in self.plan.plan.layers)
            self.ranks_w.param.update(end=max(top, 1), value=(0, min(top, 4)))
            with param.parameterized.discard_events(self):  # one redraw below, not one per parameter
                self.param.update(ranks=(0, min(top, 4)), vector="", level="Layers", max_per_rank=48)
            self.level_w.value, self.vector_w.value, self.per_rank_w.value = "Layers", "", 48
        self.redraw()

    def _on_selected(self) -> None:
        if self.level == "Layers":
            self.when_shown("selected", self.redraw)

    def redraw(self) -> None:
        if self.plan.plan is None:
            self.info.object = self.plan.absent
            self.pane.object = None
            return
        try:
            d, text = self.drawing()
        except KeyError as err:
            self.info.object = (
                f"**{err.args[0]}**: vector ids look like `v12` (hover a vector to see its id)."
            )
            return
        el = draw(d, self._title(d))
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
            self.plan.selected_layer = int(node["layer"])
            r = int(node["y"])
            self.ranks_w.value = (max(0, r - 1), r + 1)
            self.param.update(ranks=(max(0, r - 1), r + 1), level="Node vectors")
        elif self.level == "Node vectors" and str(node["id"]).startswith("v"):
            self.param.update(vector=str(node["id"]), level="Blocks")
        elif self.level == "Node vectors":  # a group: its rank alone, with room for every vector
            r = int(node["y"])
            crowd = int(sum(c for c, y in zip(d.nodes["count"], d.nodes["y"]) if int(y) == r))
            self.ranks_w.value = (r, r)
            self.param.update(ranks=(r, r), max_per_rank=min(512, max(self.max_per_rank, crowd)))

    def __panel__(self):
        controls = pn.Row(self.level_w, self.ranks_w, self.vector_w, self.per_rank_w, align="end")
        return pn.Column(learn(LEARN), controls, self.info, self.pane, sizing_mode="stretch_width")
