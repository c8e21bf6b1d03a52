"""The input forward by variable segments (`inputs.input_forward` with the layer's segments, option
`input_fwd`) against float64 PyTorch, and against the per-node kernel it replaces by default.

Random parameters (one zero probability, so one -inf), random values with missing ones, segments
cut at `stats_nodes` (a variable with more nodes than a segment, segments of 5 and 3 nodes that do
not fill a program, a variable whose nodes come back later), batch widths that are not multiples of
the tiles, 3, 200 and 300 categories, and a continuous family (Gaussian) through the same kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.distributions.categorical import Categorical
from engine.distributions.gaussian import Gaussian
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


def _forward(d, vars_, p, x, miss, opts, max_len=None, dtype=torch.float32):
    """The Triton input forward on `[len(VARS), B]` poisoned with NaN; segments cut at `max_len`
    (default: the options' stats_nodes, as the backend's table)."""
    max_len = max_len or opts.stats_nodes
    xt, mt = inputs.prepare_data(d, x.to(DEVICE), miss.to(DEVICE))
    segs = tuple(t.to(DEVICE) for t in inputs.segments(vars_, max_len))
    out = torch.full((len(VARS), x.shape[0]), float("nan"), device=DEVICE, dtype=dtype)
    params = p.to(dtype=torch.float32, device=DEVICE)
    inputs.input_forward(d, params, vars_.to(DEVICE), xt, mt, out, opts, segs, max_len)
    return out.cpu()


def _check(out, ref, miss):
    assert not torch.isnan(out).any(), "a node row or batch column was never written"
    fin = torch.isfinite(ref)
    assert torch.equal(out[~fin].double(), ref[~fin])
    assert (out.double()[fin] - ref[fin]).abs().max().item() < 2e-6
    assert (out[miss] == 0).all()


@pytest.mark.parametrize("num_cats", [3, 200, 300])
@pytest.mark.parametrize("cols,block_b,rows", [(256, 64, 16), (32, 16, 32), (16, 16, 16)])
def test_segment_forward_matches_float64(num_cats, cols, block_b, rows):
    d, vars_, p, x, miss = _case(num_cats, 77, seed=num_cats + rows)
    opts = dataclasses.replace(OPTS, input_cols=cols, input_block_b=block_b, input_rows=rows, stats_nodes=32)
    out = _forward(d, vars_, p, x, miss, opts)
    ref = d.log_prob(p.float().double(), x.T[vars_], miss.T[vars_])
    assert (~torch.isfinite(ref)).any() and miss.any()  # the case has a -inf and missing values
    _check(out, ref, miss.T[vars_])


def test_off_and_float64_buffers_give_the_same_values():
    """`input_fwd=False` (one program per input_nodes nodes) and a float64 node buffer: the reference."""
    d, vars_, p, x, miss = _case(5, 20, seed=1)
    ref = d.log_prob(p.float().double(), x.T[vars_], miss.T[vars_])
    _check(_forward(d, vars_, p, x, miss, dataclasses.replace(OPTS, input_fwd=False)), ref, miss.T[vars_])
    _check(_forward(d, vars_, p, x, miss, OPTS, dtype=torch.float64), ref, miss.T[vars_])


def test_the_segment_kernel_is_the_default(monkeypatch):
    """By default the per-node kernel is never launched; with `input_fwd=False` it is."""

    class Refused:
        def __getitem__(self, grid):
            raise AssertionError("the per-node input kernel was launched")

    monkeypatch.setattr(inputs, "_input_fwd_kernel", Refused())
    d, vars_, p, x, miss = _case(5, 20, seed=1)
    _forward(d, vars_, p, x, miss, OPTS)
    with pytest.raises(AssertionError, match="per-node"):
        _forward(d, vars_, p, x, miss, dataclasses.replace(OPTS, input_fwd=False))


def test_a_continuous_family_runs_the_same_segment_kernel():
    g = torch.Generator().manual_seed(3)
    d = Gaussian()
    vars_ = torch.tensor(VARS)
    p = d.init_params(len(VARS)).double()
    x = torch.randn(30, 3, generator=g)
    miss = torch.rand(30, 3, generator=g) < 0.25
    out = _forward(d, vars_, p, x, miss, OPTS)
    ref = d.log_prob(p.float().double(), x.T[vars_].double(), miss.T[vars_])
    fin = torch.isfinite(ref)
    assert not torch.isnan(out).any() and fin.all()
    assert ((out.double() - ref).abs() / ref.abs().clamp_min(1)).max().item() < 1e-5
    assert (out[miss.T[vars_]] == 0).all()


def test_segments_longer_than_the_options_say_are_all_written():
    """The table's own length limit drives the program count: a table cut at 64 nodes with options
    that say 16 still writes every row."""
    d, vars_, p, x, miss = _case(7, 30, seed=2)
    out = _forward(d, vars_, p, x, miss, dataclasses.replace(OPTS, stats_nodes=16), max_len=64)
    _check(out, d.log_prob(p.float().double(), x.T[vars_], miss.T[vars_]), miss.T[vars_])


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="input_fwd"):
        dataclasses.replace(OPTS, input_fwd=3)
    with pytest.raises(ValueError, match="input_rows"):
        dataclasses.replace(OPTS, input_rows=12)
