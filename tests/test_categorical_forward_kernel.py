"""The categorical segment forward (`Categorical.kernel_forward`) against float64 PyTorch.

Random parameters (one zero probability, so one -inf), random values with missing ones, segments
cut at `stats_nodes` (a variable with more nodes than a segment, segments of 5 and 3 nodes that do
not fill a program, a variable whose nodes come back later), batch widths that are not multiples of
the tiles, 3, 200 and 300 categories. Off, or on float64 buffers, the family must leave the layer to
the generic kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.distributions.categorical import Categorical
from engine.kernels import inputs
from tests.kernel_runner import DEVICE, OPTS

VARS = [0] * 70 + [1] * 5 + [2] * 33 + [0] * 3


def _case(num_cats: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    d = Categorical(num_cats)
    vars_ = torch.tensor(VARS)
    p = torch.rand(len(VARS), num_cats, generator=g, dtype=torch.float64) + 0.01
    p[3, 1] = 0.0  # log 0 = -inf where observed
    p = p / p.sum(1, keepdim=True)
    x = torch.randint(0, num_cats, (batch, 3), generator=g)
    x[:, 0][::7] = 1  # node 3 meets its zero probability
    x[5, 2] = num_cats + 3  # out of range (the data check refuses it first): clamped like log_prob
    miss = torch.rand(batch, 3, generator=g) < 0.25
    return d, vars_, p, x, miss


def _forward(d, vars_, p, x, miss, opts):
    xt, mt = inputs.prepare_data(d, x.to(DEVICE), miss.to(DEVICE))
    segs = tuple(t.to(DEVICE) for t in inputs.segments(vars_, opts.stats_nodes))
    out = torch.full((len(VARS), x.shape[0]), float("nan"), device=DEVICE)
    ran = d.kernel_forward(out, p.float().to(DEVICE), xt, mt, segs, opts.stats_nodes, opts)
    return ran, out.cpu()


@pytest.mark.parametrize("num_cats", [3, 200, 300])
@pytest.mark.parametrize("cols,block_b,rows", [(256, 64, 16), (32, 16, 32), (16, 16, 16)])
def test_segment_forward_matches_float64(num_cats, cols, block_b, rows):
    d, vars_, p, x, miss = _case(num_cats, 77, seed=num_cats + rows)
    opts = dataclasses.replace(OPTS, input_cols=cols, input_block_b=block_b, input_rows=rows, stats_nodes=32)
    ran, out = _forward(d, vars_, p, x, miss, opts)
    assert ran
    ref = d.log_prob(p.float().double(), x.T[vars_], miss.T[vars_])
    assert not torch.isnan(out).any(), "a node row or batch column was never written"
    fin = torch.isfinite(ref)
    assert (~fin).any() and miss.any()  # the case has a -inf and missing values
    assert torch.equal(out[~fin], ref[~fin].float())
    assert (out.double()[fin] - ref[fin]).abs().max().item() < 2e-6
    assert (out[miss.T[vars_]] == 0).all()


def test_off_other_dtypes_and_strided_params_leave_it_to_the_generic_kernel():
    d, vars_, p, x, miss = _case(5, 20, seed=1)
    assert not _forward(d, vars_, p, x, miss, dataclasses.replace(OPTS, input_fwd=False))[0]
    segs = tuple(t.to(DEVICE) for t in inputs.segments(vars_, OPTS.stats_nodes))
    xt, mt = inputs.prepare_data(d, x.to(DEVICE), miss.to(DEVICE))
    out64 = torch.zeros(len(VARS), 20, dtype=torch.float64, device=DEVICE)
    assert not d.kernel_forward(out64, p.to(DEVICE), xt, mt, segs, OPTS.stats_nodes, OPTS)
    out = torch.zeros(len(VARS), 20, device=DEVICE)
    strided = torch.zeros(len(VARS), 10, device=DEVICE)[:, :5]  # rows 10 apart: not [n, C] contiguous
    strided.copy_(p.float())
    assert not d.kernel_forward(out, strided, xt, mt, segs, OPTS.stats_nodes, OPTS)


def test_segments_longer_than_the_options_say_are_all_written():
    """The table's own length limit drives the program count: a table cut at 64 nodes with options
    that say 16 still writes every row."""
    d, vars_, p, x, miss = _case(7, 30, seed=2)
    xt, mt = inputs.prepare_data(d, x.to(DEVICE), miss.to(DEVICE))
    segs = tuple(t.to(DEVICE) for t in inputs.segments(vars_, 64))
    out = torch.full((len(VARS), 30), float("nan"), device=DEVICE)
    assert d.kernel_forward(
        out, p.float().to(DEVICE), xt, mt, segs, 64, dataclasses.replace(OPTS, stats_nodes=16)
    )
    assert not torch.isnan(out).any()
    ref = d.log_prob(p.float().double(), x.T[vars_], miss.T[vars_])
    fin = torch.isfinite(ref)
    assert (out.cpu().double()[fin] - ref[fin]).abs().max().item() < 2e-6


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="input_fwd"):
        dataclasses.replace(OPTS, input_fwd=3)
    with pytest.raises(ValueError, match="input_rows"):
        dataclasses.replace(OPTS, input_rows=12)
