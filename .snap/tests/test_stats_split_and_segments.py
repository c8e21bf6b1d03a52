"""What the interpreter's exact float32 `tl.dot` cannot show about the categorical statistics kernel.

Under TRITON_INTERPRET=1 a "tf32" dot multiplies in full float32, so a broken high/low split
(`_hi`) would still give hi + (f - hi) = f and test_categorical_stats_kernel.py would pass. Here
`_hi` runs on its own (interpreter or GPU) and the tensor cores' reading of the low part is
emulated in PyTorch: hi must be exact in tf32, f - hi exact in float32, and hi + tf32(lo) within
2^-21 of f (lo has at most 13 significant bits; a tf32 operand keeps 11). A second check runs the
whole circuit with `input_nodes != stats_nodes`, and a variable with more nodes than either, so
segments built with one size and a kernel tiled by the other would drop or misplace node rows.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from engine.distributions._triton import jit, tl
from engine.distributions.categorical import _hi
from engine.dists import Categorical
from engine.nodes import inputs, multiply, summate
from tests.kernel_runner import DEVICE, OPTS, data, errors

TF32_MASK = -8192  # 0xFFFFE000 as int32: sign, exponent and the 10 mantissa bits tf32 keeps


@jit
def _hi_kernel(x, out, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    tl.store(out + offs, _hi(tl.load(x + offs, mask=m, other=0.0)), mask=m)


def _tf32_truncated(v: torch.Tensor) -> torch.Tensor:
    """What an MMA that ignores a float32 operand's 13 low mantissa bits reads."""
    return (v.view(torch.int32) & TF32_MASK).view(torch.float32)


def _tf32_rounded(v: torch.Tensor) -> torch.Tensor:
    """cvt.rna.tf32.f32: to nearest, ties away from zero (finite values)."""
    return ((v.view(torch.int32) + 0x1000) & TF32_MASK).view(torch.float32)


def _flows(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.rand(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 6)
    special = torch.tensor([0.0, 1e-30, 1e-38, 1e-40, 1e30, 1.0, 1.0 - 2**-24, 2**-20 + 2**-43])
    return torch.cat([special, f, -f[:100]]).float()


def _split(f: torch.Tensor) -> torch.Tensor:
    hi = torch.empty_like(f, device=DEVICE)
    _hi_kernel[(-(-f.numel() // 1024),)](f.to(DEVICE), hi, f.numel(), BLOCK=1024)
    return hi.cpu()


def test_hi_is_tf32_exact_and_its_remainder_is_exact_in_float32():
    f = _flows(20000)
    hi = _split(f)
    assert torch.equal(hi.view(torch.int32) & ~TF32_MASK, torch.zeros_like(hi, dtype=torch.int32))
    lo = f - hi
    assert torch.equal(hi.double() + lo.double(), f.double())  # lo = f - hi loses nothing
    assert (hi.abs() <= f.abs()).all()  # truncated toward zero, never past f


@pytest.mark.parametrize("tf32", [_tf32_truncated, _tf32_rounded], ids=["truncated", "rounded"])
def test_two_tf32_products_recover_float32_within_the_split_bound(tf32):
    """hi + tf32(lo) against f: at most 2^-21 relative per flow (normal floats), whichever way the
    MMA reads lo; a plain tf32 product is ~1e-3 off, so the bound separates a working split."""
    f = _flows(200000, seed=1)
    f = f[f.abs() >= 2**-126]  # normal floats: below, tf32 and float32 share the absolute grid
    hi = _split(f)
    got = hi.double() + tf32(f - hi).double()
    rel = ((got - f.double()).abs() / f.double().abs().clamp_min(1e-300)).max().item()
    assert rel <= 2**-21, rel
    plain = ((tf32(f).double() - f.double()).abs() / f.double().abs().clamp_min(1e-300)).max().item()
    assert plain > 2**-12  # the check would see a split that kept only the high part


def _wide_variables(num_cats: int = 300):
    """Variable 0 with 48 + 48 nodes in two vectors (a run across vector boundaries), variable 1 with 48."""
    a, a2, b = (
        inputs(0, 48, Categorical(num_cats)),
        inputs(0, 48, Categorical(num_cats)),
        inputs(1, 48, Categorical(num_cats)),
    )
    s = summate(multiply(a, b), multiply(a2, b), num_nodes=16, block_size=16)
    return summate(multiply(s, inputs(2, 16, Categorical(num_cats))), num_nodes=1)


@pytest.mark.parametrize("input_nodes,stats_nodes", [(16, 32), (32, 16)])
def test_input_stats_when_forward_and_statistics_tiles_differ(input_nodes, stats_nodes):
    """Every input node's statistics (300 categories: three category tiles of 128, the last one
    partly masked) and EM update against the PyTorch backend, with the forward's node tile and the
    statistics segments of different sizes."""
    opts = dataclasses.replace(OPTS, input_nodes=input_nodes, stats_nodes=stats_nodes)
    x, m = data([Categorical(300)] * 3, 24)
    m[:, 1] = True  # every row of variable 1 missing: its statistics are the flows times the params
    pc, errs = errors(copy.deepcopy(_wide_variables()), x.long(), m, opts)
    for k, err in errs.items():
        assert err < 2e-5, f"{k}: relative error {err:.2e}"
    lens = pc.tables.inputs[0].segments[1]
    assert lens.max().item() == stats_nodes and lens.numel() > 3  # the segments are the stats tile's
