"""The block-sparse edge matrix of one sum layer as the kernel sees it: block tiles and padded slots.

Each drawn row is a node block (rows ordered by partition, so a partition is one band), each drawn
column a child block; a filled cell is a real `block x block` weight tile. A partition is computed
as a dense table `[node blocks, width]`, so a node block with fewer child blocks than `width` owns
`width - degree` padded slots: they are drawn as extra cells right of the matrix. Above `max_rows`
node blocks or `max_cols` child blocks, neighbouring rows / columns are merged into one cell whose
value is the share of its slots holding real tiles: a 100K-edge layer still reads as tiles, not as
pixels. Plain numpy in, plain data out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.compiler.plan import PAD_ROWS, Layer


@dataclass
class BlockTiles:
    """Drawable tiles of one sum layer (all arrays are per drawn cell or per drawn row).

    cells: `row, col` int arrays and `fill` in (0, 1] (share of the cell's slots that are real tiles).
    rows: `row_partition [R]` (partition of the row's first node block), `row_blocks [R]` (node blocks
    merged into the row), `row_pad [R]` padded slots of the row, `row_real [R]` real tiles of the row.
    """

    row: np.ndarray
    col: np.ndarray
    fill: np.ndarray
    row_partition: np.ndarray
    row_blocks: np.ndarray
    row_pad: np.ndarray
    row_real: np.ndarray
    num_cols: int  # drawn child-block columns
    col_blocks: int  # child blocks merged into one drawn column
    max_pad: int  # widest padding of a drawn row, in drawn cells
    num_node_blocks: int
    num_child_blocks: int
    num_tiles: int  # real tiles (node block x child block pairs)
    num_padded: int  # padded slots
    block_size: int  # smallest tile size of the layer (nodes)

    @property
    def aggregated(self) -> bool:
        return self.col_blocks > 1 or int(self.row_blocks.max(initial=1)) > 1


def block_tiles(layer: Layer, max_rows: int = 96, max_cols: int = 128) -> BlockTiles:
    """Tiles of sum `layer`: rows = node blocks ordered by partition, columns = child blocks."""
    if layer.kind != "sum":
        raise ValueError(f"layer {layer.index} is a {layer.kind} layer; tiles exist for sum layers")
    unit = min(p.block_size for p in layer.partitions)
    part, real_cols, pads, degrees = [], [], [], []
    for k, p in enumerate(layer.partitions):
        order = np.argsort(p.node_rows, kind="stable")
        for i in order:
            ch = p.child_rows[i]
            ch = ch[ch >= PAD_ROWS]
            part.append(k)
            real_cols.append(ch)
            degrees.append(ch.size)
            pads.append(p.width - ch.size)
    starts = np.unique(np.concatenate(real_cols)) if real_cols else np.zeros(0, np.int64)
    n_rows, n_cols = len(part), max(len(starts), 1)
    row_bin = _bins(n_rows, max_rows)
    col_bin = _bins(n_cols, max_cols)
    nr, nc = int(row_bin.max(initial=0)) + 1, int(col_bin.max(initial=0)) + 1
    rows_per = np.bincount(row_bin, minlength=nr)
    cols_per = np.bincount(col_bin, minlength=nc)
    degrees = np.asarray(degrees, dtype=np.int64)
    r_idx = np.repeat(np.arange(n_rows), degrees)
    c_idx = np.searchsorted(starts, np.concatenate(real_cols)) if n_rows else np.zeros(0, np.int64)
    counts = np.zeros((nr, nc), dtype=np.int64)
    np.add.at(counts, (row_bin[r_idx], col_bin[c_idx]), 1)
    rr, cc = np.nonzero(counts)
    fill = counts[rr, cc] / (rows_per[rr] * cols_per[cc])
    pads = np.asarray(pads, dtype=np.int64)
    row_pad = np.bincount(row_bin, weights=pads, minlength=nr).astype(np.int64)
    row_real = np.bincount(row_bin, weights=degrees, minlength=nr).astype(np.int64)
    first = np.searchsorted(row_bin, np.arange(nr))
    col_blocks = int(cols_per.max(initial=1))
    return BlockTiles(
        row=rr,
        col=cc,
        fill=fill,
        row_partition=np.asarray(part, dtype=np.int64)[first] if n_rows else np.zeros(0, np.int64),
        row_blocks=rows_per,
        row_pad=row_pad,
        row_real=row_real,
        num_cols=nc,
        col_blocks=col_blocks,
        max_pad=int(np.ceil(pads.max(initial=0) / col_blocks)) if n_rows else 0,
        num_node_blocks=n_rows,
        num_child_blocks=len(starts),
        num_tiles=int(degrees.sum()),
        num_padded=int(pads.sum()),
        block_size=unit,
    )


def _bins(n: int, max_bins: int) -> np.ndarray:
    """Bin of each of `n` consecutive items when at most `max_bins` bins are drawn: [n]."""
    nb = max(1, min(n, max_bins))
    return (np.arange(n) * nb // max(n, 1)).astype(np.int64)
