"""`KernelOptions.param_split`: parameter flows of small launches reduced over batch ranges, the
partials summed by a second launch in a fixed order (engine/kernels/sum_block.py).

Checked against the PyTorch backend in float64 and against the option off: values, node flows and
input statistics do not depend on the split (bit-identical); parameter flows and the EM step that
reads them differ only by float32 rounding of the sum order (within 1e-6). On the interpreter the
device counts as 132 SMs, so every launch of these tiny circuits is "small" and is split.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import engine  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.sum_block import BlockSumTensors, group_size, param_batch_splits  # noqa: E402
from engine.nodes import inputs, multiply, summate  # noqa: E402
from engine.structures import hclt_from_tree, pd  # noqa: E402
from tests.kernel_runner import DEVICE, OPTS, data, errors, rel, run  # noqa: E402

SPLIT = dataclasses.replace(OPTS, param_split=4)
SAME = ("ll", "node_mars", "node_flows")  # never read parameter flows: bit-identical


def hclt_case():
    edges = np.array([[0, 1], [1, 2], [1, 3], [3, 4]])
    return hclt_from_tree(edges, 5, 32, Categorical(7)), [Categorical(7)] * 5


def pd_case():
    return pd((4, 4), 16, (2, 2), input_dist=Categorical(4)), [Categorical(4)] * 16


def two_partition_case():
    """A sum layer of two tiled partitions: node block 0 reads 1 child block, node block 1 reads 3
    (degrees 1 and 3 are not grouped at the default tolerance), both reading child block 0."""
    x = [inputs(v, 48, Categorical(5)) for v in range(4)]
    prod = multiply(x[0], x[1])  # 48 products: 3 child blocks of 16
    s = summate(prod, num_nodes=32, edge_ids=np.array([[0, 1, 1, 1], [0, 0, 1, 2]]), block_size=16)
    t = summate(multiply(x[2], x[3]), num_nodes=32, block_size=16)
    root = summate(multiply(s, t), num_nodes=1)
    return root, [Categorical(5)] * 4


CASES = {"hclt": hclt_case, "pd": pd_case, "two_partitions": two_partition_case}


def block_partitions(pc):
    return [
        pt
        for t in pc.tables.layers
        if t is not None and hasattr(t, "parts")
        for pt in t.parts
        if isinstance(pt, BlockSumTensors)
    ]


def splits_of(pt, B, opts, device) -> int:
    """Batch ranges of this partition's parameter-flow launch."""
    nkg = -(-pt.width // group_size(pt.block_size, pt.width, opts.group_cols))
    return param_batch_splits(pt.num_node_blocks * nkg, B, opts.block_b, opts.param_split, device)[0]


def test_split_rule():
    cpu = torch.device("cpu")  # counted as 132 SMs: splitting stops at 264 programs
    assert param_batch_splits(8, 512, 32, 0, cpu) == (1, 512)  # off
    assert param_batch_splits(8, 512, 32, 1, cpu) == (1, 512)  # one range is off too
    assert param_batch_splits(264, 512, 32, 8, cpu) == (1, 512)  # enough programs already
    assert param_batch_splits(8, 512, 32, 8, cpu) == (8, 64)  # HCLT-128's small layers
    assert param_batch_splits(216, 512, 32, 8, cpu) == (2, 256)  # two programs per SM reached
    assert param_batch_splits(48, 512, 32, 8, cpu) == (6, 96)  # ranges stay multiples of 32
    assert param_batch_splits(4, 40, 16, 8, cpu) == (3, 16)  # never more ranges than tiles; a short tail
    with pytest.raises(ValueError, match="param_split"):
        KernelOptions(param_split=-1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_param_split_matches_float64_and_unsplit(name):
    root, dists = CASES[name]()
    x, m = data(dists, 40)
    x = x.long()
    pc, err = errors(root, x, m, SPLIT, ref_dtype=torch.float64)
    assert max(err.values()) < 2e-5, err
    parts = block_partitions(pc)
    assert parts, "expected tiled partitions"
    # every launch of this circuit is split (3 ranges of 16, 16 and 8 columns)
    assert all(splits_of(pt, 40, SPLIT, pc.device) == 3 for pt in parts)
    if name == "two_partitions":
        assert any(
            sum(isinstance(p, BlockSumTensors) for p in t.parts) == 2
            for t in pc.tables.layers
            if t is not None and hasattr(t, "parts")
        )
    _, on = run(root, x, m, "triton", SPLIT)
    _, off = run(root, x, m, "triton", OPTS)
    for k in off:
        if k in SAME or k.startswith("stats_") or k.startswith("inputs_after_em"):
            assert torch.equal(on[k], off[k]), k
        else:
            assert rel(off[k], on[k]) < 1e-6, (k, rel(off[k], on[k]))
    assert not torch.equal(on["param_flows"], torch.zeros_like(on["param_flows"]))


def test_param_split_accumulates_over_batches():
    """Two batches into the same parameter flows (the read-modify-write of the reduce launch)."""
    root, dists = hclt_case()
    out = {}
    for opts in (OPTS, SPLIT):
        pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=opts)
        pc.zero_flows()
        for seed in (1, 2):
            torch.manual_seed(seed)
            x, m = data(dists, 24)
            pc.accumulate_flows(x.long(), m, validate=False)
        out[opts.param_split] = pc.param_flows.clone()
    assert rel(out[0], out[4]) < 1e-6


@pytest.mark.gpu
def test_param_split_gpu_hclt_and_pd():
    """Realistic sizes: float64 reference within 1e-4 (as the default kernels), and against the
    option off within 1e-5, with launches that are really split (HCLT-64's small layers)."""
    from engine.data import mnist_like
    from tests.kernel_runner import gpu_batch, gpu_cases

    torch.backends.cuda.matmul.allow_tf32 = False
    mnist = mnist_like(3000)
    for name in ("hclt64_mnist", "pd32_mnist"):
        root, kind = gpu_cases(mnist)[name]
        x, m = gpu_batch(kind, mnist, 512)
        _, ref = run(root, x, m, "torch", None, "cuda", torch.float64)
        pc, err = errors(root, x, m, KernelOptions(param_split=8), "cuda", ref=ref)
        assert max(err.values()) < 1e-4, (name, err)
        _, off = run(root, x, m, "triton", KernelOptions(), "cuda")
        _, on = run(root, x, m, "triton", KernelOptions(param_split=8), "cuda")
        assert rel(off["param_flows"], on["param_flows"]) < 1e-5, name
        assert torch.equal(off["ll"], on["ll"]), name
        splits = [splits_of(pt, 512, KernelOptions(param_split=8), pc.device) for pt in block_partitions(pc)]
        assert max(splits) > 1, (name, splits)
        params = [graph_training(root, mnist, KernelOptions(param_split=n)) for n in (0, 8)]
        assert rel(params[0], params[1]) < 1e-5, name


def graph_training(root, mnist, opts, steps=5, B=512):
    """Parameters after `steps` CUDA-graph-captured EM steps (the partial scratch is allocated inside
    the capture, from the graph's pool)."""
    from engine.kernels.graph import CapturedStep

    pc = engine.compile(copy.deepcopy(root), device="cuda", kernel_options=opts)
    step = CapturedStep(pc, B, em=(0.1, 0.1))
    for i in range(steps):
        step(mnist[i * B : (i + 1) * B].cuda())
    assert step.captured, step.failed
    return pc.params.clone()
