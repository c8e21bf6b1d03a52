"""`KernelOptions.overlap`: a training step's flows pass on three streams (engine/executor/streams.py).

The recompute goes to two alternating element buffers and each sum layer's parameter flows run
after the layer's critical-path kernels; the arithmetic is the same, so training is bit-identical to
the option off. On the CPU (Triton interpreter) the schedule runs in program order: these tests
check the buffers, the deferral and the order the listener hears the layers in; the GPU test checks
the streams inside a captured CUDA graph.
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
import engine.kernels.sum_block as sum_block  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.structures import hclt_from_tree  # noqa: E402
from tests.kernel_runner import DEVICE, OPTS, rel  # noqa: E402
from tests.test_param_split import CASES as SPLIT_CASES  # noqa: E402
from tests.test_scale_in_place import batches_for, train  # noqa: E402

OVERLAP = dataclasses.replace(OPTS, overlap=True)


def chain_case():
    """HCLT over a path of 8 variables: a chain of sum layers, so each element buffer is reused."""
    edges = np.array([[v, v + 1] for v in range(7)])
    return hclt_from_tree(edges, 8, 16, Categorical(5)), [Categorical(5)] * 8


CASES = {**SPLIT_CASES, "chain": chain_case}


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Unwritten scratch rows read as NaN: a buffer the schedule forgot to fill shows up."""
    monkeypatch.setattr(circuit_mod, "POISON_SCRATCH", True)


@pytest.fixture
def deferred(monkeypatch):
    """The number of parameter-flow launches, and how many of them were deferred."""
    seen = {"deferred": 0, "direct": 0}
    real = sum_block.sum_backward_block

    def spy(*args):
        seen["deferred" if args[10] is not None else "direct"] += 1
        return real(*args)

    import engine.kernels.backend as kernel_backend

    monkeypatch.setattr(kernel_backend, "sum_backward_block", spy)
    return seen


@pytest.mark.parametrize("name", sorted(CASES))
def test_overlapped_training_is_bit_identical_and_matches_float64(name, deferred):
    root, dists = CASES[name]()
    batches = batches_for(dists)
    _, ref = train(root, batches, "torch", None, torch.float64)
    _, off = train(root, batches, "triton", OPTS)
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
    for opts in (OPTS, OVERLAP):
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
        for opts in (KernelOptions(), KernelOptions(overlap=True)):
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
