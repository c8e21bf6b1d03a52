"""`KernelOptions.scale_in_place`: in training steps (`accumulate_flows`) the tiled sum backward writes
its node scale over the layer's own node-flow rows instead of a `[nb * bs, B]` scratch.

Same arithmetic as the scratch, so training results are bit-identical to the option off; the public
`backward_flows()` (queries, the workbench) keeps node flows and must not use it.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import engine  # noqa: E402
import engine.kernels.backend as kernel_backend  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from tests.kernel_runner import DEVICE, EM, OPTS, data, errors, rel  # noqa: E402
from tests.test_param_split import CASES, block_partitions  # noqa: E402

IN_PLACE = dataclasses.replace(OPTS, scale_in_place=True)
BOTH = dataclasses.replace(OPTS, scale_in_place=True, param_split=4)


@pytest.fixture
def in_place_calls(monkeypatch):
    """The `in_place` argument of every tiled sum backward call."""
    seen = []
    real = kernel_backend.sum_backward_block

    def spy(*args):
        seen.append(args[9])  # in_place
        return real(*args)

    monkeypatch.setattr(kernel_backend, "sum_backward_block", spy)
    return seen


def train(root, batches, backend, opts, dtype=torch.float32, steps=2):
    """`steps` CapturedStep-style EM steps (zero_flows; accumulate_flows; em_step) over `batches`;
    returns the LLs, the last step's flows and statistics, and the parameters after."""
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend=backend, kernel_options=opts).to(dtype)
    out = {}
    for i in range(steps):
        x, m = batches[i % len(batches)]
        pc.zero_flows()
        out[f"ll_{i}"] = pc.accumulate_flows(x.to(DEVICE), m.to(DEVICE), validate=False)
        out[f"param_flows_{i}"] = pc.param_flows.clone()
        for j in range(len(pc.input_layers)):
            out[f"stats_{i}_{j}"] = pc.input_stats(j).clone()
        pc.em_step(*EM)
    out["params"] = pc.params.clone()
    for j in range(len(pc.input_layers)):
        out[f"inputs_{j}"] = pc.input_params(j).clone()
    return pc, out


def batches_for(dists):
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        x, m = data(dists, 20)
        out.append((x.long(), m))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_in_place_matches_scratch_and_float64(name, in_place_calls):
    root, dists = CASES[name]()
    batches = batches_for(dists)
    _, ref = train(root, batches, "torch", None, torch.float64)
    _, off = train(root, batches, "triton", OPTS)
    in_place_calls.clear()
    _, on = train(root, batches, "triton", IN_PLACE)
    assert in_place_calls and all(in_place_calls), "training steps should write the scale in place"
    for k in off:
        assert torch.equal(on[k], off[k]), k  # the same arithmetic, only the scale's address moved
        assert rel(ref[k], on[k]) < 2e-5, (k, rel(ref[k], on[k]))


def test_in_place_with_param_split(in_place_calls):
    root, dists = CASES["two_partitions"]()
    batches = batches_for(dists)
    _, off = train(root, batches, "triton", OPTS)
    in_place_calls.clear()
    _, on = train(root, batches, "triton", BOTH)
    assert in_place_calls and all(in_place_calls)
    for k in off:
        assert rel(off[k], on[k]) < 1e-6, (k, rel(off[k], on[k]))


@pytest.mark.parametrize("name", sorted(CASES))
def test_public_backward_flows_keeps_node_flows(name, in_place_calls):
    """`backward_flows()` returns node flows (queries, the workbench read them): the option on must
    leave them exact (tests.kernel_runner.run calls it with the default keep_node_flows=True)."""
    root, dists = CASES[name]()
    x, m = data(dists, 20)
    _, err = errors(root, x.long(), m, IN_PLACE, ref_dtype=torch.float64)
    assert err["node_flows"] < 2e-5 and max(err.values()) < 2e-5, err
    assert in_place_calls and not any(in_place_calls)


def test_partitions_of_a_layer_own_disjoint_node_rows():
    """What in-place relies on: each node row belongs to one node block of one partition, so a
    partition's scale never overwrites flows another partition of the layer still reads."""
    for name, case in CASES.items():
        root, _ = case()
        pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=IN_PLACE)
        multi = 0
        for layer in pc.plan.sum_layers:
            rows = torch.cat([pt.node_idx.cpu() for pt in pc.tables.layers[layer.index].parts])
            assert rows.unique().numel() == rows.numel(), (name, layer.index)
            multi += len(pc.tables.layers[layer.index].parts) > 1
        assert block_partitions(pc)
        if name == "two_partitions":
            assert multi, "expected a sum layer of several partitions"


def test_option_validation():
    assert KernelOptions(scale_in_place=1).scale_in_place  # kernel_breakdown's parse_variant int()s values
    with pytest.raises(ValueError, match="scale_in_place"):
        KernelOptions(scale_in_place=2)


@pytest.mark.gpu
def test_scale_in_place_gpu_training_is_bit_identical():
    """Realistic sizes on the GPU: 5 graph-captured EM steps (HCLT-64, PD-32, batch 512) with the option
    on give the same parameters as off, bit for bit; public node flows stay within 1e-4 of float64."""
    from engine.data import mnist_like
    from engine.kernels.graph import CapturedStep
    from tests.kernel_runner import gpu_batch, gpu_cases, run

    torch.backends.cuda.matmul.allow_tf32 = False
    mnist = mnist_like(3000)
    for name in ("hclt64_mnist", "pd32_mnist"):
        root, kind = gpu_cases(mnist)[name]
        params = []
        for opts in (KernelOptions(), KernelOptions(scale_in_place=True)):
            pc = engine.compile(copy.deepcopy(root), device="cuda", kernel_options=opts)
            step = CapturedStep(pc, 512, em=(0.1, 0.1))
            for i in range(5):
                step(mnist[i * 512 : (i + 1) * 512].cuda())
            assert step.captured, step.failed
            params.append(pc.params.clone())
        assert torch.equal(params[0], params[1]), name
        x, m = gpu_batch(kind, mnist, 512)
        _, ref = run(root, x, m, "torch", None, "cuda", torch.float64)
        _, err = errors(root, x, m, KernelOptions(scale_in_place=True), "cuda", ref=ref)
        assert max(err.values()) < 1e-4, (name, err)


@pytest.mark.parametrize("name", ["hclt", "pd"])
def test_contiguous_slab_and_row_lookup_paths_agree(name):
    """HCLT and PD node blocks sit on contiguous rows (the scale goes to their slab of node flows,
    the scratch kernels unchanged); the row-lookup path (IN_PLACE) for scattered blocks gives the same
    training, bit for bit."""
    root, dists = CASES[name]()
    batches = batches_for(dists)
    pc, slab = train(root, batches, "triton", IN_PLACE)
    parts = block_partitions(pc)
    assert parts and all(pt.rows_start >= 0 for pt in parts)
    real = engine.compile

    def scattered(*args, **kw):
        out = real(*args, **kw)
        for pt in block_partitions(out):
            pt.rows_start = -1
        return out

    engine.compile = scattered
    try:
        _, lookup = train(root, batches, "triton", IN_PLACE)
    finally:
        engine.compile = real
    for k in slab:
        assert torch.equal(slab[k], lookup[k]), k
