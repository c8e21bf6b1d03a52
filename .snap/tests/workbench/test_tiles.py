"""Block tiles of a sum layer: rows grouped by partition, padded slots counted, merged when large."""

from __future__ import annotations

import numpy as np

from engine.data import load_dataset
from engine.dists import Categorical
from engine.structures import hclt
from engine.structures.sparse import block_sparse
from workbench.services import plans
from workbench.services.tiles import block_tiles


def _plan(latents=16, density=0.5, tolerance=0.5):
    ds = load_dataset("nltcs")
    root = block_sparse(hclt(ds.train, latents, input_dist=Categorical(2)), density, 4, seed=0)
    return plans.make_plan(root, None, tolerance)


def test_rows_are_grouped_by_partition_and_padding_is_counted():
    plan = _plan()
    for layer in plan.sum_layers:
        t = block_tiles(layer)
        assert not t.aggregated
        assert (np.diff(t.row_partition) >= 0).all(), "rows ordered by partition"
        assert t.num_tiles == sum(p.num_real_children for p in layer.partitions)
        slots = sum(p.num_node_blocks * p.width for p in layer.partitions)
        assert t.num_padded == slots - t.num_tiles
        assert t.row_pad.sum() == t.num_padded and len(t.row) == t.num_tiles  # one cell per tile
        assert (t.fill == 1).all()
    assert sum(block_tiles(la).num_padded for la in plan.sum_layers) > 0


def test_large_layers_merge_into_at_most_max_cells():
    plan = _plan(latents=64, density=0.3)
    layer = max(plan.sum_layers, key=lambda la: la.num_edges)
    t = block_tiles(layer, max_rows=8, max_cols=8)
    assert t.aggregated and len(t.row_blocks) <= 8 and t.num_cols <= 8
    assert t.row_blocks.sum() == t.num_node_blocks
    assert 0 < t.fill.max() <= 1
    assert t.row_real.sum() == t.num_tiles and t.row_pad.sum() == t.num_padded
