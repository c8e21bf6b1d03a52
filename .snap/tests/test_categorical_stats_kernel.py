"""The categorical statistics kernel in every tile variant against float64 PyTorch.

`stats[n, c] += sum_b f[n, b] [x_b = c]` (+ missing entries' flows times the params) is a matmul of
the flows with a one-hot built in registers; its options change the tile's orientation
(`stats_cats_major`) and how the float operand meets the tensor cores (`stats_split`: two tf32
MMAs). On random flows spanning several orders of magnitude, random data with missing entries, and
segments that do not fill a tile, each variant must match the float64 reference. On a GPU host
the kernel runs on the GPU (where tf32 really truncates); here through Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch

from engine.distributions.categorical import Categorical
from engine.kernels import KernelOptions
from engine.kernels import inputs as input_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(num_vars=3, per_var=(20, 7, 33), C=40, B=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    vars_ = torch.cat([torch.full((k,), v, dtype=torch.long) for v, k in zip(range(num_vars), per_var)])
    N = vars_.numel()
    x = torch.randint(0, C, (B, num_vars), generator=g)
    missing = torch.rand(B, num_vars, generator=g) < 0.2
    flows = torch.rand(N, B, generator=g) * torch.exp(torch.randn(N, B, generator=g) * 3)
    params = torch.rand(N, C, generator=g) + 0.01
    params /= params.sum(1, keepdim=True)
    stats0 = torch.rand(N, C, generator=g)  # accumulates onto what is there
    return vars_, x, missing, flows, params, stats0


def _reference(dist, vars_, x, missing, flows, params, stats0):
    stats = stats0.double().clone()
    xv, miss = x.T[vars_], missing.T[vars_]
    dist.accumulate_stats(stats, params.double(), xv, miss, flows.double())
    return stats


@pytest.mark.parametrize("cats_major", [False, True])
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("precision", ["tf32x3", "ieee"])
def test_stats_kernel_variants_match_float64(cats_major, split, precision):
    dist = Categorical(40)
    vars_, x, missing, flows, params, stats0 = _case()
    ref = _reference(dist, vars_, x, missing, flows, params, stats0)
    opts = KernelOptions(
        precision=precision,
        stats_nodes=16,
        stats_block_b=16,
        stats_cats=32,  # 40 categories: two category tiles, the second partly masked
        stats_cats_major=cats_major,
        stats_split=split,
    )
    xt, mt = input_kernels.prepare_data(dist, x.to(DEVICE), missing.to(DEVICE))
    segs = tuple(t.to(DEVICE) for t in input_kernels.segments(vars_, opts.stats_nodes))
    stats = stats0.clone().to(DEVICE)
    args = (params.to(DEVICE), vars_.to(DEVICE), xt, mt, flows.to(DEVICE), segs, opts)
    assert dist.kernel_stats(stats, *args)
    stats = stats.cpu()
    err = (stats.double() - ref).norm() / ref.norm()
    assert err < 1e-5, err
    # every node row was touched: the segments cover all nodes (no row left at its start value)
    assert (stats != stats0).any(1).all()


def test_float64_buffers_take_the_pytorch_path():
    """The kernel is float32-only: a float64 circuit's statistics come from the PyTorch update instead
    of failing inside Triton (the tile split is a float32 bit mask)."""
    dist = Categorical(40)
    vars_, x, missing, flows, params, stats0 = _case()
    xt, mt = input_kernels.prepare_data(dist, x, missing)
    segs = input_kernels.segments(vars_, 16)
    stats = stats0.double()
    assert not dist.kernel_stats(stats, params.double(), vars_, xt, mt, flows.double(), segs, KernelOptions())
    assert torch.equal(stats, stats0.double())  # untouched: the caller runs accumulate_stats


@pytest.mark.parametrize("kw", [{"stats_warps": 3}, {"num_warps": 0}, {"stats_nodes": 48}])
def test_bad_kernel_options_are_refused_by_name(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        KernelOptions(**kw)
