"""`block_sparse`: a valid, normalised circuit whose sum layers get several partitions and padding."""

from __future__ import annotations

import numpy as np
import pytest

from engine.compiler import compile_plan
from engine.dists import Categorical
from engine.structures import hclt, pd
from engine.structures.sparse import block_sparse
from tests.test_structures import assert_normalised, check_valid


def _data(num_vars=5, rows=600, seed=0):
    return np.random.default_rng(seed).integers(0, 2, size=(rows, num_vars))


def _partitions(root, tolerance):
    plan, _, _ = compile_plan(root, None, tolerance)
    return [len(layer.partitions) for layer in plan.sum_layers], plan


def test_block_sparse_hclt_is_valid_and_normalised():
    root = hclt(_data(), 8, input_dist=Categorical(2))
    sparse = block_sparse(root, 0.5, block_size=2, seed=1)
    check_valid(sparse, 5)
    assert_normalised(sparse, 5, 2)


def test_density_one_is_the_dense_circuit_and_bad_density_is_refused():
    root = hclt(_data(), 8, input_dist=Categorical(2))
    assert block_sparse(root, 1.0) is root
    with pytest.raises(ValueError, match="density"):
        block_sparse(root, 0.0)


def test_sparse_templates_have_several_partitions_and_padding():
    """Dense templates: one partition per sum layer, no padding; sparse: several, and padding at a
    large tolerance (the trade-off the Partitions tab teaches)."""
    root = hclt(_data(8), 16, input_dist=Categorical(2))
    dense, _ = _partitions(root, 0.25)
    assert max(dense) == 1
    sparse = block_sparse(root, 0.5, block_size=4, seed=0)
    counts, _ = _partitions(sparse, 0.25)
    assert max(counts) >= 3
    merged, plan = _partitions(sparse, 1.0)
    assert sum(merged) < sum(counts)
    padded = sum(
        p.summary("sum")["padded_edges"] - p.summary("sum")["num_edges"]
        for layer in plan.sum_layers
        for p in layer.partitions
    )
    assert padded > 0


def test_block_sparse_pd_is_valid():
    root = pd([2, 3], 4, 1, input_dist=Categorical(2))
    sparse = block_sparse(root, 0.5, block_size=2, seed=3)
    check_valid(sparse, 6)
    assert_normalised(sparse, 6, 2)
