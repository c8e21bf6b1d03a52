"""Chunked input statistics on CUDA (issue 12): what the interpreter cannot show.

Skipped without CUDA (the `gpu` marker); run on the lent GPUs with `pytest -m gpu`. One GPU: the
chunked launches recorded in a CUDA graph (their chunk tables made in the eager first step) give
the single eager launch's statistics bit for bit. Two GPUs (skipped on one): NCCL with the chunks'
all-reduces in the graphs of `fit` trains bit-identically to the unchunked reduction (two ranks:
every sum is a + b, however the buffers are cut), and so does the default early statistics (HCLT: most
rows computed and all-reduced during the pass) against all of them at the end; `join` makes the
default group's NCCL stream high-priority and the flows use it, a default group of normal priority
gets a second, high-priority group for the flows (`distributed.flow_group`), and both train what
normal priority trains.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

import engine
from engine.dists import Categorical
from engine.kernels.graph import CapturedStep

pytestmark = pytest.mark.gpu


def _setup(n=2048, vars_=64, latents=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, vars_), generator=g)
    return engine.structures.hclt(x, latents, input_dist=Categorical(256)), x


def test_chunked_statistics_in_a_cuda_graph_equal_one_eager_launch():
    root, x = _setup()
    xb = x[:256].cuda()
    pc = engine.compile(copy.deepcopy(root), device="cuda")
    pc.zero_flows()
    pc.accumulate_flows(xb, validate=False)
    one = pc.input_stats(0).clone()
    assert one.abs().sum() > 0

    pc2 = engine.compile(copy.deepcopy(root), device="cuda")
    calls = []
    pc2.stats_listener = lambda i: (256, lambda lo, hi: calls.append((lo, hi)))
    step = CapturedStep(pc2, 256, em=None)
    for _ in range(3):  # eager (builds the chunk tables), capture + replay, replay
        step(xb)
    assert step.captured, step.failed
    n = pc2.input_layers[0].num_nodes  # 64 variables x 32 nodes: segments of 32, chunks of 256 rows
    eager = calls[: len(calls) // 2]
    assert len(eager) > 1 and calls == eager + eager  # the eager step and the capture; replays run no Python
    assert eager[0][0] == 0 and eager[-1][1] == n and all(a[1] == b[0] for a, b in zip(eager, eager[1:]))
    assert all(0 < hi - lo <= 256 for lo, hi in eager)  # chunks of at most 256 rows (early ranges cut too)
    assert torch.equal(pc2.input_stats(0), one)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nccl_worker(rank, port, out, port2):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    import torch.distributed as dist

    from engine import distributed, optim

    distributed.join("cuda")
    root, x = _setup()
    results = {}
    from engine.kernels import KernelOptions

    late = KernelOptions(early_stats=False)  # every statistic after the pass: the reference for the others

    def high(group) -> bool:
        return bool(group._get_backend(torch.device("cuda")).options.is_high_priority_stream)

    def reducer_group():
        return distributed.FlowReducer(engine.compile(copy.deepcopy(root), device="cuda")).group

    # join() made the default group's NCCL stream high-priority: the flows use it, no second communicator
    results["world"] = (
        high(dist.group.WORLD) and distributed.flow_group("cuda") is None and reducer_group() is None
    )

    def train(chunk):
        opts = late if chunk == "late" else None
        pc = engine.compile(copy.deepcopy(root), device="cuda", kernel_options=opts)
        if chunk == "profiled" and rank == 0:  # its sampled batches run the plain pass, rank 1's never do
            pc.profile(every=3)
        sched = optim.EMSchedule(batch_size=128, step_size=0.5, final_step_size=0.1, full_batch_epochs=1)
        hist = optim.fit(
            pc,
            x,
            epochs=2,
            schedule=sched,
            generator=torch.Generator().manual_seed(1),
            distributed=True,
            reduce_chunk_bytes=chunk if isinstance(chunk, int) else 0,
        )
        results[chunk] = {
            "params": pc.params.cpu(),
            "inputs": pc.input_params(0).cpu(),
            "lls": [h["train_ll"] for h in hist],
            "replays": hist[-2].get("graph_batches") if hist else None,
        }

    for chunk in (
        0,
        256 * 256 * 4,
        "late",
        "profiled",
    ):  # unchunked; 8 chunks; all at the end; rank 0 profiled
        train(chunk)
    # a default group of normal priority (made without join's option): the flows get their own group
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port2)  # a fresh rendezvous for the second default group
    distributed.HIGH_PRIORITY = False
    distributed.join("cuda")
    distributed.HIGH_PRIORITY = True
    results["normal_world"] = not high(dist.group.WORLD)
    group = distributed.flow_group("cuda")
    results["second"] = (
        group is not None
        and group is not dist.group.WORLD
        and distributed.flow_group("cuda") is group  # made once
        and high(group)
        and reducer_group() is group
    )
    train("second")
    distributed.HIGH_PRIORITY = False  # the flows on the default group, of normal priority
    train("normal")
    distributed.HIGH_PRIORITY = True
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_train_the_same_with_and_without_chunks(tmp_path):
    import torch.multiprocessing as mp

    ports = [_free_port(), _free_port()]
    while ports[1] == ports[0]:
        ports[1] = _free_port()
    mp.spawn(_nccl_worker, args=(ports[0], str(tmp_path), ports[1]), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    plain, chunked, late = r0[0], r0[256 * 256 * 4], r0["late"]
    for r in (r0, r1):
        assert r["world"] and r["normal_world"] and r["second"], r
    for c in (0, 256 * 256 * 4, "late", "profiled", "second", "normal"):  # the ranks agree
        assert torch.equal(r1[c]["params"], r0[c]["params"]) and torch.equal(r1[c]["inputs"], r0[c]["inputs"])
    assert chunked["replays"] and plain["replays"]  # the chunks' all-reduces ran inside CUDA graphs
    assert torch.equal(plain["params"], chunked["params"]) and torch.equal(plain["inputs"], chunked["inputs"])
    assert plain["lls"] == chunked["lls"] and len(plain["lls"]) == 3
    # early statistics (reduced range by range during the pass) train what the reduction at the end trains
    assert torch.equal(plain["params"], late["params"]) and torch.equal(plain["inputs"], late["inputs"])
    assert plain["lls"] == late["lls"]
    # one rank profiling (its sampled batches on one stream) issues the same collectives: the same training
    prof = r0["profiled"]
    assert torch.equal(plain["params"], prof["params"]) and torch.equal(plain["inputs"], prof["inputs"])
    # stream priority and the communicator only change when NCCL's kernels get SMs, not what they sum
    for c in ("second", "normal"):
        other = r0[c]
        assert torch.equal(plain["params"], other["params"]) and torch.equal(plain["inputs"], other["inputs"])
        assert plain["lls"] == other["lls"]
