"""The per-kernel batch tiles (`prod_block_b`, `scale_block_b`, `param_block_b`, `input_block_b`) and
the segment input forward (`input_segments`) against the PyTorch backend on the interpreter.

Batch tiles wider than the batch (masked columns), an input layer per family (Categorical, Bernoulli,
Gaussian) whose variables have more nodes than a segment holds (so a variable spans several
segments), missing values, and random data: a tile or segment that dropped, duplicated or misplaced a
row or a column would move some buffer (log-likelihoods, node values and flows, parameter flows,
statistics, the EM step) off the reference.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.dists import Bernoulli, Categorical, Gaussian
from engine.kernels import KernelOptions
from engine.kernels.sum_block import TILE_CAP, capped_batch_tile
from engine.nodes import inputs, multiply, summate
from tests.kernel_runner import OPTS, compare, data


def _circuit(dist_of):
    """Four variables of 48 input nodes (3 segments of 16), two tiled sum layers above them."""
    xs = [inputs(v, 48, dist_of(v)) for v in range(4)]
    a = summate(multiply(xs[0], xs[1]), num_nodes=32, block_size=16)
    b = summate(multiply(xs[2], xs[3]), multiply(xs[3], xs[2]), num_nodes=32, block_size=16)
    return summate(multiply(a, b), num_nodes=1)


FAMILIES = {
    "categorical": (lambda v: Categorical(7), [Categorical(7)] * 4),
    "bernoulli": (lambda v: Bernoulli(), [Bernoulli()] * 4),
    "gaussian_and_categorical": (
        lambda v: Gaussian() if v % 2 else Categorical(5),
        [Categorical(5), Gaussian(), Categorical(5), Gaussian()],
    ),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("segments", [True, False])
def test_wide_batch_tiles_and_segment_forward_match_pytorch(family, segments):
    dist_of, dists = FAMILIES[family]
    torch.manual_seed(3)
    x, m = data(dists, 40, missing_rate=0.25)  # 40 columns: a 32-wide tile and a masked one
    opts = dataclasses.replace(
        OPTS,
        input_segments=segments,
        input_block_b=32,
        prod_block_b=32,
        scale_block_b=32,
        param_block_b=32,
    )
    compare(_circuit(dist_of), x if family != "categorical" else x.long(), m, opts=opts)


def test_capped_batch_tile_bounds_the_register_tile():
    assert capped_batch_tile(32, 16) == 32  # small blocks keep the asked tile
    assert capped_batch_tile(128, 256) == TILE_CAP // 256  # a [256, 128] tile would hold 32768 floats
    assert capped_batch_tile(128, 4096) == 16  # never below tl.dot's 16
    assert capped_batch_tile(32, 512) == 32  # the old shared tile at HCLT-512's block size: unchanged


@pytest.mark.parametrize("field", ["prod_block_b", "scale_block_b", "param_block_b", "input_block_b"])
def test_tile_options_must_be_powers_of_two(field):
    with pytest.raises(ValueError, match=field):
        KernelOptions(**{field: 48})
    with pytest.raises(ValueError, match="input_segments"):
        KernelOptions(input_segments=2)
