"""EM updates inside the flows pass (`KernelOptions.em_in_pass`) on CUDA: graph-captured steps on one
GPU and data-parallel EM on two, with each stream slowed down in turn, train bit-identically to the
update after the pass, so no update outruns the last reader of its weights or its all-reduce.

Skipped without CUDA (the `gpu` marker); run on the lent GPU with `pytest -m gpu`.
"""

from __future__ import annotations

import copy

import pytest
import torch

import engine
from engine.kernels import KernelOptions
from tests.test_distributed_chunks import _free_port
from tests.test_overlap import DelayedStreams, fit_two_ranks, nccl_rank_hclt

pytestmark = pytest.mark.gpu

EM = (0.1, 0.1)


@pytest.mark.parametrize("graph", [False, True])
def test_updates_in_the_pass_on_a_gpu_are_bit_identical(graph):
    """HCLT-64 and PD-32 on MNIST-shaped data, 4 steps of batch 512 (eager or replayed): the same
    parameters and LLs as the update after the pass, also with one stream slowed down."""
    from engine.data import mnist_like
    from engine.kernels.graph import CapturedStep
    from tests.kernel_runner import gpu_cases

    mnist = mnist_like(2048)
    cases = gpu_cases(mnist)

    def trained(root, opts, slow=None):
        pc = engine.compile(copy.deepcopy(root), device="cuda", kernel_options=opts)
        if slow is not None:
            pc._flow_streams = DelayedStreams(pc.device, slow)
        step = CapturedStep(pc, 512, em=EM, enabled=graph)
        for i in range(4):
            step(mnist[i * 512 : (i + 1) * 512].cuda())
        assert step.captured == graph, step.failed
        torch.cuda.synchronize()
        return pc.params.clone(), pc.input_params(0).clone(), step.ll_sum.item()

    for name in ("hclt64_mnist", "pd32_mnist"):
        root, _ = cases[name]
        ref = trained(root, KernelOptions())
        start = engine.compile(copy.deepcopy(root), device="cuda").params
        assert not torch.equal(start, ref[0])
        for slow in (None, "main", "recompute", "params"):
            got = trained(root, KernelOptions(em_in_pass=True), slow)
            assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]), (name, slow)
            assert ref[2] == got[2], (name, slow)


def _nccl_worker(rank, port, out):
    """One rank of `test_two_gpus_update_each_bucket_after_its_all_reduce`."""
    import torch.distributed as dist

    from engine import distributed

    x, root = nccl_rank_hclt(rank, port)
    results = {}
    buckets = distributed._flow_buckets
    for name, in_pass, slow, bucket in (
        ("end", False, None, distributed.BUCKET_BYTES),
        ("in_pass", True, None, distributed.BUCKET_BYTES),  # HCLT-32's flows: one bucket
        ("em_slow", True, "em", 1),  # a bucket per sum layer, the update stream slowed down
        ("params_slow", True, "params", 1),
    ):
        distributed._flow_buckets = lambda pc, _, b=bucket: buckets(pc, b)  # read by FlowReducer()
        pc = engine.compile(
            copy.deepcopy(root), device="cuda", kernel_options=KernelOptions(em_in_pass=in_pass)
        )
        if slow is not None:
            pc._flow_streams = DelayedStreams(pc.device, slow)
        results[name] = fit_two_ranks(pc, x)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_update_each_bucket_after_its_all_reduce(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_nccl_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for name in ("end", "in_pass", "em_slow", "params_slow"):
        assert torch.equal(r0[name]["params"], r1[name]["params"]), name  # the ranks agree
        assert r0[name]["replays"], name  # the all-reduces and updates ran inside CUDA graphs
        assert torch.equal(r0[name]["params"], r0["end"]["params"]), name
        assert torch.equal(r0[name]["inputs"], r0["end"]["inputs"]), name
