"""Training steps' flows pass (`KernelOptions.overlap`, engine/executor/streams.py) and the in-place
node scale it relies on.

Training steps write each tiled sum partition's node scale over its own node-flow rows (contiguous
blocks), recompute product layers into two alternating element buffers, and run each sum layer's
parameter flows after the layer's critical-path kernels; the arithmetic is the same, so training is
bit-identical to the plain schedule. On the CPU (Triton interpreter) the schedule runs in program
order: these tests check the buffers, the deferral and the order the listener hears the layers in;
the GPU test checks the streams inside a captured CUDA graph.
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
import engine.circuit as circuit_mod  # noqa: E402
import engine.kernels.backend as kernel_backend  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.sum_block import BlockSumTensors  # noqa: E402
from engine.nodes import inputs, multiply, summate  # noqa: E402
from engine.structures import hclt_from_tree, pd  # noqa: E402
from tests.kernel_runner import DEVICE, EM, OPTS, data, errors, rel  # noqa: E402

OVERLAP = dataclasses.replace(OPTS, overlap=True)
PLAIN = dataclasses.replace(OPTS, overlap=False)


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


def chain_case():
    """HCLT over a path of 8 variables: a chain of sum layers, so each element buffer is reused."""
    edges = np.array([[v, v + 1] for v in range(7)])
    return hclt_from_tree(edges, 8, 16, Categorical(5)), [Categorical(5)] * 8


CASES = {"hclt": hclt_case, "pd": pd_case, "two_partitions": two_partition_case, "chain": chain_case}


def block_partitions(pc):
    return [
        pt
        for t in pc.tables.layers
        if t is not None and hasattr(t, "parts")
        for pt in t.parts
        if isinstance(pt, BlockSumTensors)
    ]


def batches_for(dists):
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        x, m = data(dists, 20)
        out.append((x.long(), m))
    return out


def train(root, batches, backend, opts, dtype=torch.float32, steps=2, scattered=False):
    """`steps` CapturedStep-style EM steps (zero_flows; accumulate_flows; em_step) over `batches`;
    returns the circuit and the LLs, each step's flows and statistics, and the parameters after.
    `scattered`: treat every node block as non-contiguous (the scratch path)."""
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend=backend, kernel_options=opts).to(dtype)
    if scattered:
        for pt in block_partitions(pc):
            pt.rows_start = -1
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


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Unwritten scratch rows read as NaN: a buffer the schedule forgot to fill shows up."""
    monkeypatch.setattr(circuit_mod, "POISON_SCRATCH", True)


@pytest.fixture
def deferred(monkeypatch):
    """The number of parameter-flow launches, and how many of them were deferred."""
    seen = {"deferred": 0, "direct": 0}
    real = kernel_backend.sum_backward_block

    def spy(*args):
        queued = args[10]
        before = len(queued) if queued is not None else 0
        real(*args)
        seen["deferred" if queued is not None and len(queued) > before else "direct"] += 1

    monkeypatch.setattr(kernel_backend, "sum_backward_block", spy)
    return seen


@pytest.mark.parametrize("name", sorted(CASES))
def test_overlapped_training_is_bit_identical_and_matches_float64(name, deferred):
    root, dists = CASES[name]()
    batches = batches_for(dists)
    _, ref = train(root, batches, "torch", None, torch.float64)
    _, off = train(root, batches, "triton", PLAIN)
    assert deferred["deferred"] == 0 and deferred["direct"] > 0
    direct = deferred["direct"]
    deferred.update(deferred=0, direct=0)
    _, on = train(root, batches, "triton", OVERLAP)
    assert deferred == {"deferred": direct, "direct": 0}, deferred  # every tiled partition deferred
    for k in off:
        assert torch.equal(on[k], off[k]), k
        assert rel(ref[k], on[k]) < 2e-5, (k, rel(ref[k], on[k]))


def test_second_element_buffer_is_used():
    """Consecutive sum layers alternate between the forward's element buffer and a spare one."""
    root, dists = chain_case()
    (x, m), _ = batches_for(dists)
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OVERLAP)
    used = []
    real = pc.backend.sum_backward

    def spy(table, params, element_mars, *rest, **kw):
        used.append(element_mars.data_ptr())
        return real(table, params, element_mars, *rest, **kw)

    pc.backend.sum_backward = spy
    pc.accumulate_flows(x, m, validate=False)
    assert len(pc.plan.sum_layers) >= 4 and len(used) == len(pc.plan.sum_layers)
    assert len(set(used)) == 2 and all(a != b for a, b in zip(used, used[1:])), used


def test_listener_hears_every_step_in_order():
    """Data-parallel EM all-reduces a layer's flows when the listener hears of it: the overlapped pass
    reports the same steps in the same order as the plain one."""
    root, dists = CASES["two_partitions"]()
    (x, m), _ = batches_for(dists)
    heard = {}
    for opts in (PLAIN, OVERLAP):
        pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=opts)
        steps = heard[opts.overlap] = []
        pc.flow_listener = lambda step, steps=steps: steps.append((step.layer.index, step.pass_name))
        pc.accumulate_flows(x, m, validate=False)
    assert heard[True] == heard[False] and len(heard[True]) == len(pc.plan.backward_steps())


def test_public_backward_flows_and_profiled_steps_do_not_overlap(deferred):
    """`backward_flows()` keeps node flows (queries read them) and a profiled step times each layer on
    one stream: neither takes the overlapped schedule."""
    root, dists = CASES["hclt"]()
    (x, m), _ = batches_for(dists)
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OVERLAP)
    pc.forward(x, m)
    pc.backward_flows()
    pc.profile(every=1)
    pc.accumulate_flows(x, m, validate=False)
    assert deferred["deferred"] == 0 and deferred["direct"] > 0


@pytest.mark.parametrize("name", ["hclt", "pd"])
def test_scattered_blocks_use_a_scratch_and_run_their_parameter_flows_at_once(name, deferred):
    """HCLT and PD node blocks sit on contiguous rows (the scale goes to their slab of node flows and
    the parameter flows may wait); blocks on scattered rows keep a per-call scratch, which would not
    outlive the call, so their parameter flows run at once: same results, bit for bit."""
    root, dists = CASES[name]()
    batches = batches_for(dists)
    pc, slab = train(root, batches, "triton", OVERLAP)
    assert all(pt.rows_start >= 0 for pt in block_partitions(pc)) and deferred["direct"] == 0
    deferred.update(deferred=0, direct=0)
    _, scattered = train(root, batches, "triton", OVERLAP, scattered=True)
    assert deferred["deferred"] == 0 and deferred["direct"] > 0
    for k in slab:
        assert torch.equal(slab[k], scattered[k]), k


@pytest.mark.parametrize("name", ["hclt", "two_partitions"])
def test_public_backward_flows_stay_exact(name):
    """`backward_flows()` returns node flows (queries, the workbench read them): the in-place scale of
    training steps must not touch them (tests.kernel_runner.run calls the public pass)."""
    root, dists = CASES[name]()
    x, m = data(dists, 20)
    _, err = errors(root, x.long(), m, OVERLAP, ref_dtype=torch.float64)
    assert err["node_flows"] < 2e-5 and max(err.values()) < 2e-5, err


def test_partitions_of_a_layer_own_disjoint_node_rows():
    """What the in-place scale relies on: each node row belongs to one node block of one partition, so
    a partition's scale never overwrites flows another partition of the layer still reads."""
    multi = 0
    for name, case in CASES.items():
        root, _ = case()
        pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OVERLAP)
        for layer in pc.plan.sum_layers:
            rows = torch.cat([pt.node_idx.cpu() for pt in pc.tables.layers[layer.index].parts])
            assert rows.unique().numel() == rows.numel(), (name, layer.index)
            multi += len(pc.tables.layers[layer.index].parts) > 1
        assert block_partitions(pc)
    assert multi, "expected a sum layer of several partitions"


def test_option_validation():
    assert KernelOptions(overlap=1).overlap
    with pytest.raises(ValueError, match="overlap"):
        KernelOptions(overlap=2)


@pytest.mark.gpu
def test_overlap_gpu_graph_training_is_bit_identical():
    """Realistic sizes on the GPU: 5 graph-captured EM steps (HCLT-64, PD-32, batch 512) on three
    streams give the same parameters and LLs as one stream, bit for bit."""
    from engine.data import mnist_like
    from engine.kernels.graph import CapturedStep
    from tests.kernel_runner import gpu_cases

    mnist = mnist_like(3000)
    for name in ("hclt64_mnist", "pd32_mnist"):
        root, _ = gpu_cases(mnist)[name]
        out = []
        for opts in (KernelOptions(overlap=False), KernelOptions()):
            pc = engine.compile(copy.deepcopy(root), device="cuda", kernel_options=opts)
            step = CapturedStep(pc, 512, em=(0.1, 0.1))
            for i in range(5):
                step(mnist[i * 512 : (i + 1) * 512].cuda())
            assert step.captured and step.replays >= 3, step.failed
            torch.cuda.synchronize()
            out.append((pc.params.clone(), pc.input_params(0).clone(), step.ll_sum.item()))
        assert torch.equal(out[0][0], out[1][0]), name
        assert torch.equal(out[0][1], out[1][1]), name
        assert out[0][2] == out[1][2], name
