"""The Partitions tab's figures, drawn with Bokeh directly and updated in place.

`TilesFigure` draws `BlockTiles`: weight tiles in blue, padded slots in red beside them, a partition
strip. `SlotsFigure`: real vs padded edges per partition. `LayerBarsFigure`: a value per sum layer.
A what-if (block size, tolerance) only sends new column data and titles: no figure is rebuilt, so
neither the server nor the browser recomputes the session's document. Rebuilding three HoloViews
figures per what-if cost the server 2-3 s on this 2-core box (measured 2026-11-30).

Partition colours come from a palette without blues or reds, so they never read as occupancy or
padding; the same colours mark partitions in the Circuit tab's Blocks level.
"""

from __future__ import annotations

import numpy as np
from bokeh.models import ColorBar, ColumnDataSource, FactorRange, HoverTool, LinearColorMapper
from bokeh.palettes import Blues256
from bokeh.plotting import figure

from workbench.services.tiles import BlockTiles
from workbench.views._common import integer_ticks, plural, si_ticks

PARTITION_COLORS = ["#f2b701", "#3ca951", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f"]
REAL_COLOR, PAD_COLOR = "#2b5d9b", "#e45756"
TOOLS = "pan,wheel_zoom,box_zoom,reset,save"  # none active on scroll: the wheel scrolls the page
QUAD_COLUMNS = ("left", "right", "top", "bottom")


def partition_color(k: int) -> str:
    return PARTITION_COLORS[k % len(PARTITION_COLORS)]


def _figure(title: str, x_label: str, y_label: str, height: int, **kw):
    fig = figure(
        title=title,
        height=height,
        sizing_mode="stretch_width",
        tools=TOOLS,
        x_axis_label=x_label,
        y_axis_label=y_label,
        **kw,
    )
    fig.toolbar.logo = None
    fig.toolbar.active_scroll = None
    return fig


def _quads(x0, y0, x1, y1, **cols) -> dict:
    return {
        "left": np.asarray(x0, float),
        "right": np.asarray(x1, float),
        "top": np.asarray(y0, float),
        "bottom": np.asarray(y1, float),
        **{k: np.asarray(v) if not isinstance(v, list) else v for k, v in cols.items()},
    }


class TilesFigure:
    """One sum layer's block-sparse edge matrix: rows = node blocks by partition, cells = tiles."""

    def __init__(self, height: int = 380):
        self.fig = _figure(
            "Block tiles", "child blocks", "node blocks, by partition (strip)", height, match_aspect=False
        )
        self.fig.y_range.flipped = True
        self.mapper = LinearColorMapper(palette=list(reversed(Blues256))[40:], low=0, high=1)
        empty = {k: [] for k in QUAD_COLUMNS}
        # the cells first: browser tests read their "alpha" column
        self.cells = ColumnDataSource({**empty, "alpha": [], "filled": [], "partition": []})
        self.pads = ColumnDataSource({**empty, "alpha": [], "padded": []})
        self.strip = ColumnDataSource({**empty, "color": [], "partition": [], "blocks": []})
        self.bounds = ColumnDataSource({"x0": [], "y0": [], "x1": [], "y1": []})
        cells = self.fig.quad(
            source=self.cells,
            fill_color={"field": "filled", "transform": self.mapper},
            fill_alpha="alpha",
            line_color="white",
            line_alpha="alpha",
            line_width=0.5,
        )
        pads = self.fig.quad(source=self.pads, fill_color=PAD_COLOR, fill_alpha="alpha", line_color="white")
        strip = self.fig.quad(source=self.strip, fill_color="color", line_color=None)
        self.fig.segment("x0", "y0", "x1", "y1", source=self.bounds, color="#333", line_width=1.2)
        self.fig.add_tools(
            HoverTool(
                renderers=[cells],
                tooltips=[("share of slots holding a tile", "@filled{0.00}"), ("partition", "@partition")],
            ),
            HoverTool(renderers=[pads], tooltips=[("padded slots", "@padded")]),
            HoverTool(renderers=[strip], tooltips=[("partition", "@partition"), ("node blocks", "@blocks")]),
        )
        self.colorbar = ColorBar(
            color_mapper=self.mapper, title="share of slots holding a tile", visible=False
        )
        self.fig.add_layout(self.colorbar, "right")
        self.fig.xgrid.grid_line_color = self.fig.ygrid.grid_line_color = None

    def update(self, t: BlockTiles | None, title: str, selected: int | None = None) -> None:
        """Show `t` (None: nothing); `selected` partition stays opaque, the others dim."""
        if t is None:
            for src in (self.cells, self.pads, self.strip, self.bounds):
                src.data = {k: [] for k in src.data}
            self.fig.title.text = title
            return
        dim = (t.row_partition != selected) if selected is not None else np.zeros(len(t.row_blocks), bool)
        alpha = np.where(dim[t.row], 0.25, 1.0)
        self.mapper.high = 1.0 if not t.aggregated else max(float(t.fill.max(initial=0)), 1e-3)
        self.colorbar.visible = t.aggregated  # unmerged, every drawn cell is one whole tile
        self.cells.data = _quads(
            t.col, t.row, t.col + 1, t.row + 1, alpha=alpha, filled=t.fill, partition=t.row_partition[t.row]
        )
        self.pads.data = _pad_quads(t, t.num_cols + 0.5, dim)
        rows = np.arange(len(t.row_blocks))
        self.strip.data = _quads(
            np.full(rows.size, -1.5),
            rows,
            np.full(rows.size, -0.5),
            rows + 1,
            color=[partition_color(int(k)) for k in t.row_partition],
            partition=t.row_partition,
            blocks=t.row_blocks,
        )
        width = t.num_cols + 1.5 + max(t.max_pad, 1)
        edges = np.flatnonzero(np.diff(t.row_partition)) + 1
        self.bounds.data = {
            "x0": np.full(edges.size, -1.5),
            "y0": edges.astype(float),
            "x1": np.full(edges.size, width),
            "y1": edges.astype(float),
        }
        self.fig.title.text = title
        self.fig.xaxis.axis_label = f"child {plural(t.col_blocks, 'block')} per column · red: padded slots"


def _pad_quads(t: BlockTiles, x0: float, dim: np.ndarray) -> dict:
    """Padded slots right of the matrix: one cell per slot, or (merged rows / columns) a bar as long
    as the mean padded slots per node block, in drawn columns."""
    out = []
    for r in np.flatnonzero(t.row_pad):
        a = 0.25 if dim[r] else 1.0
        n = int(t.row_pad[r])
        if not t.aggregated:
            out += [(x0 + j, r, x0 + j + 1, r + 1, n, a) for j in range(n)]
        else:
            length = n / (t.row_blocks[r] * t.col_blocks)
            out.append((x0, r, x0 + max(length, 0.15), r + 1, n, a))
    cols = list(zip(*out)) if out else [[]] * 6
    return _quads(cols[0], cols[1], cols[2], cols[3], padded=cols[4], alpha=cols[5])


def title_for(layer: int, t: BlockTiles) -> str:
    """'Layer 5: 12 node blocks x 16 child blocks, 48 tiles of 4x4, 6 padded slots (merged ...)'."""
    merged = ""
    if t.aggregated:
        merged = f" · cells merge up to {int(t.row_blocks.max())}x{t.col_blocks} blocks"
    return (
        f"Layer {layer}: {t.num_node_blocks:,} node x {t.num_child_blocks:,} child blocks, "
        f"{t.num_tiles:,} {plural(t.num_tiles, 'tile')} of {t.block_size}x{t.block_size}, "
        f"{t.num_padded:,} padded {plural(t.num_padded, 'slot')}{merged}"
    )


class SlotsFigure:
    """Real and padded edges per partition of one layer, stacked."""

    def __init__(self, height: int = 370):
        self.fig = _figure(
            "Real vs padded edges per partition",
            "partition",
            "edges",
            height,
            x_range=FactorRange(factors=[]),
        )
        self.source = ColumnDataSource({"partition": [], "real": [], "padding": []})
        self.fig.vbar_stack(
            ["real", "padding"],
            x="partition",
            width=0.8,
            color=[REAL_COLOR, PAD_COLOR],
            source=self.source,
            legend_label=["real", "padding"],
        )
        self.fig.add_tools(
            HoverTool(tooltips=[("partition", "@partition"), ("real", "@real"), ("padding", "@padding")])
        )
        self.fig.y_range.start = 0
        self.fig.yaxis.formatter = si_ticks()
        self.fig.legend.location = "top_right"
        self.fig.xgrid.grid_line_color = None

    def update(self, rows: list[dict]) -> None:
        parts = [str(r["partition"]) for r in rows]
        self.fig.x_range.factors = parts
        self.source.data = {
            "partition": parts,
            "real": [r["num_edges"] for r in rows],
            "padding": [r["padded_edges"] - r["num_edges"] for r in rows],
        }


class LayerBarsFigure:
    """One value per sum layer (padding %, partitions)."""

    def __init__(
        self, title: str, y_label: str, color: str, integer: bool = False, ymax: float | None = None
    ):
        self.fig = _figure(title, "sum layer", y_label, 250, x_range=FactorRange(factors=[]))
        self.source = ColumnDataSource({"layer": [], "value": []})
        self.fig.vbar(x="layer", top="value", width=0.8, source=self.source, color=color)
        self.fig.add_tools(HoverTool(tooltips=[("sum layer", "@layer"), (y_label, "@value{0.[00]}")]))
        self.fig.y_range.start = 0
        if ymax is not None:
            self.fig.y_range.end = ymax
        if integer:
            self.fig.yaxis.ticker = integer_ticks()
        self.fig.xgrid.grid_line_color = None

    def update(self, layers: list[str], values: list[float]) -> None:
        self.fig.x_range.factors = list(layers)
        self.source.data = {"layer": list(layers), "value": list(values)}
