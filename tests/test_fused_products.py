"""Products fused into the block sum kernels (`KernelOptions.fuse_products`): the sum kernels sum each
product's child node rows while loading it, and the product forward and recompute never run.

Each check is against the PyTorch executor (its own product layers) or float64, on random inputs."""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")

import engine  # noqa: E402
from engine import queries  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.executor import torch_ops  # noqa: E402
from engine.kernels import product  # noqa: E402
from engine.kernels.sum_block import FusedProducts, block_tensors, sum_forward_block  # noqa: E402
from engine.structures import hclt_from_tree, pd  # noqa: E402
from tests.kernel_runner import DEVICE, OPTS, compare, data  # noqa: E402

UNFUSED = dataclasses.replace(OPTS, fuse_products=False)


def _pd():
    return pd((4, 4), 32, (2, 2), input_dist=Categorical(4), block_size=16)


def _hclt():
    import numpy as np

    return hclt_from_tree(np.array([[0, 1], [1, 2], [1, 3]]), 4, 32, Categorical(5), block_size=16)


def _count_product_forwards(monkeypatch) -> list:
    calls = []
    real = product.prod_forward
    monkeypatch.setattr(product, "prod_forward", lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("make", [_pd, _hclt], ids=["pd", "hclt"])
def test_fused_pass_runs_no_product_forward_and_matches_torch(make, monkeypatch):
    root = make()
    x, m = data([Categorical(4 if make is _pd else 5)] * (16 if make is _pd else 4), 9)
    calls = _count_product_forwards(monkeypatch)
    pc = compare(root, x.long(), m)  # every buffer against the PyTorch executor
    kinds = [la["partitions"][0]["kernel"] for la in pc.plan.to_dict()["layers"] if la["kind"] == "product"]
    # the root's one-node sum runs the sparse kernel: only the product layer under it stays unfused
    assert kinds.count("product_fused") == len(kinds) - 1 and kinds[-1] == "product"
    assert len(calls) == 2  # that layer's forward and recompute; no fused layer was computed
    calls_unfused = _count_product_forwards(monkeypatch)
    compare(root, x.long(), m, opts=UNFUSED)
    assert len(calls_unfused) == 2 * len(kinds)  # the switch works: unfused, every layer runs twice


def test_fused_training_step_matches_torch():
    """The overlapped training step (side streams, node scale in place, deferred parameter flows)."""
    root = _pd()
    x, m = data([Categorical(4)] * 16, 12)
    pcs = [
        engine.compile(copy.deepcopy(root), device=DEVICE, backend=b, kernel_options=OPTS)
        for b in ("triton", "torch")
    ]
    for _ in range(2):
        lls = [c.train_step(x.long().to(DEVICE), m.to(DEVICE), em=(0.5, 0.1)) for c in pcs]
        assert torch.allclose(lls[0], lls[1], rtol=1e-5)
    err = ((pcs[0].params - pcs[1].params).norm() / pcs[1].params.norm()).item()
    assert err < 1e-5, err


def test_queries_that_read_element_values_still_get_them():
    """MPE runs the max semiring on the element buffer, and its top-down walk (as sampling's) reads
    element values: both must compute the fused product layers."""
    root = _pd()
    x, m = data([Categorical(4)] * 16, 6, missing_rate=0.5)
    got, ref = (
        queries.mpe(
            engine.compile(copy.deepcopy(root), device=DEVICE, backend=b, kernel_options=OPTS),
            x.long().to(DEVICE),
            m.to(DEVICE),
        )
        for b in ("triton", "torch")
    )
    assert torch.equal(got.cpu(), ref.cpu())
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OPTS)
    s = queries.sample(pc, 5, x[:1].long().to(DEVICE), m[:1].to(DEVICE))
    assert s.shape == (5, 16) and torch.equal(s[:, ~m[0]].cpu(), x[:1, ~m[0]].long().expand(5, -1))


def test_fused_table_rows_and_errors():
    t = product.ProdLayerKernelTensors(
        [], torch.tensor([10, 12]), torch.tensor([[3, 4], [5, 0]]), torch.tensor([]), torch.tensor([])
    )
    table = product.fused_table(t, 10, 13)
    assert table.tolist() == [[3, 4], [-1, -1], [5, 0]]  # row 11: written by no product
    with pytest.raises(ValueError, match="outside"):
        product.fused_table(t, 11, 13)


def test_fused_forward_against_float64_with_unwritten_rows_and_padding():
    """One tiled partition whose children are products of node rows (`FusedProducts`): a one-child
    product (padded with row 0, log 1), an element row no product writes (-inf) and a padded child
    tile, against the float64 PyTorch forward over the explicit element values. The element buffer
    handed to the kernel holds NaN: the fused kernel must not read it."""
    nb, w, bs, B, lo, n_child = 4, 3, 16, 20, 64, 40
    out0 = 1 + n_child  # the partition's own node rows start here, after the children's
    nm = torch.randn(out0 + nb * bs, B) * 2 - 3
    nm[0] = 0.0
    n_elem = w * bs
    table = torch.randint(1, out0, (n_elem, 2))
    table[5, 1] = 0
    table[7] = -1
    em = torch.full((lo + n_elem, B), -torch.inf, dtype=torch.float64)
    em[lo:] = nm.double()[table.clamp_min(0)].sum(1)
    em[lo + 7] = -torch.inf
    child_rows = (lo + torch.arange(w) * bs).repeat(nb, 1)
    child_rows[3, 2] = 0
    node_rows = out0 + torch.arange(nb) * bs
    base = torch_ops.SumPartitionTensors(
        bs,
        nb,
        w,
        0,
        (node_rows[:, None] + torch.arange(bs)).view(-1),
        (child_rows[:, :, None] + torch.arange(bs)).view(nb, -1),
    )
    params = torch.rand(nb * bs * w * bs)
    ref = nm.double().clone()
    torch_ops.sum_forward(base, params.double(), em, ref)
    pt = block_tensors(
        base, node_rows, child_rows, lo, lambda a: torch.as_tensor(a, dtype=torch.long).to(DEVICE)
    )
    pt.fused = FusedProducts(table.to(DEVICE), lo)
    got = nm.clone().to(DEVICE)
    got[out0:] = torch.nan
    sum_forward_block(pt, params.to(DEVICE), torch.full(em.shape, torch.nan, device=DEVICE), got, OPTS)
    got = got.cpu()
    assert torch.isfinite(got[out0:]).all()
    err = ((got[out0:].double() - ref[out0:]).norm() / ref[out0:].norm()).item()
    assert err < 1e-5, err
