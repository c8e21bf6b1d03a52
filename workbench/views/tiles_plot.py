"""Draw `BlockTiles`: weight tiles in blue, padded slots in red beside them, a partition strip.

Partition colours come from a palette without blues or reds, so they never read as occupancy or
padding; the same colours mark partitions in the slot bars and the partition table's selection.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np

from workbench.services.tiles import BlockTiles
from workbench.views._common import NO_WHEEL, plural

PARTITION_COLORS = ["#f2b701", "#3ca951", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f"]
REAL_COLOR, PAD_COLOR = "#2b5d9b", "#e45756"


def partition_color(k: int) -> str:
    return PARTITION_COLORS[k % len(PARTITION_COLORS)]


def tiles_plot(t: BlockTiles, title: str, selected: int | None = None):
    """Rectangles per drawn cell; `selected` partition (if any) stays opaque, others are dimmed."""
    nc = t.num_cols
    dim = (t.row_partition != selected) if selected is not None else np.zeros(len(t.row_blocks), bool)
    alpha = np.where(dim[t.row], 0.25, 1.0)
    cells = hv.Rectangles(
        (t.col, t.row, t.col + 1, t.row + 1, t.fill, t.row_partition[t.row], alpha),
        vdims=["filled", "partition", "alpha"],
    ).opts(
        color="filled",
        cmap="Blues",
        clim=(0, 1) if not t.aggregated else (0, max(float(t.fill.max(initial=0)), 1e-3)),
        alpha="alpha",
        line_color="white" if not t.aggregated else None,
        line_width=0.5,
        colorbar=t.aggregated,  # unmerged, every drawn cell is one whole tile
        colorbar_opts={"title": "share of slots holding a tile"},
        tools=["hover"],
    )
    pads = _pad_rects(t, nc + 0.5, dim)
    pad = hv.Rectangles(pads, vdims=["padded slots", "alpha"]).opts(
        color=PAD_COLOR, alpha="alpha", line_color="white", line_width=0.5, tools=["hover"]
    )
    rows = np.arange(len(t.row_blocks))
    strip = hv.Rectangles(
        (
            np.full(rows.size, -1.5),
            rows,
            np.full(rows.size, -0.5),
            rows + 1,
            t.row_partition,
            [partition_color(int(k)) for k in t.row_partition],
            t.row_blocks,
        ),
        vdims=["partition", "color", "node blocks"],
    ).opts(color="color", line_color=None, tools=["hover"])
    width = nc + 1.5 + max(t.max_pad, 1)
    edges = np.flatnonzero(np.diff(t.row_partition)) + 1
    bounds = hv.Segments((np.full(edges.size, -1.5), edges, np.full(edges.size, width), edges)).opts(
        color="#333", line_width=1.2
    )
    return (cells * pad * strip * bounds).opts(
        responsive=True,
        height=380,
        title=title,
        xlabel=f"child {plural(t.col_blocks, 'block')} per column · red: padded slots",
        ylabel="node blocks, by partition (strip)",
        invert_yaxis=True,
        xlim=(-1.7, width + 0.2),
        ylim=(0, max(len(t.row_blocks), 1)),
        show_legend=False,
        **NO_WHEEL,
    )


def _pad_rects(t: BlockTiles, x0: float, dim: np.ndarray) -> list[tuple]:
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
    return out


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
