"""Data-parallel EM on CPU (gloo, also on a machine with GPUs), as users launch it: `torchrun -m engine train`.

Two ranks with batch B must train exactly what one process trains with batch 2B on the same global
batches (drop-last), up to float summation order; a rank that dies makes the other exit with a
clear one-line error instead of hanging.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
from engine.distributed import Ranks, shard_batches, shard_rows

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "train",
    "--device",
    "cpu",
    "--data",
    "nltcs",
    "--latents",
    "4",
    "--epochs",
    "2",
    "--full-batch-epochs",
    "1",
    "--step-size",
    "0.5",
    "--final-step-size",
    "0.2",
    "--quiet",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_train(*args: str) -> list[str]:
    """`torchrun --nproc-per-node 2 -m engine train ...` (TRAIN, then `args`) on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        "-m",
        "engine",
        *TRAIN,
        *args,
    ]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CW_DIST_TIMEOUT_S": "30", **extra}
    env.pop("WORLD_SIZE", None)
    return env


def test_shards_of_a_global_batch_are_the_global_batch():
    order = torch.randperm(103)
    parts = [shard_batches(order, 8, Ranks(r, 3)) for r in range(3)]  # global batch 24: 4 of them
    assert all(len(p) == 32 for p in parts)
    for g in range(4):
        together = torch.cat([p[g * 8 : (g + 1) * 8] for p in parts])
        assert torch.equal(together, order[g * 24 : (g + 1) * 24])
    rows = torch.cat([shard_rows(103, Ranks(r, 3)) for r in range(3)])
    assert torch.equal(rows, torch.arange(103))


def test_two_ranks_train_what_one_process_trains_on_the_same_global_batches(tmp_path):
    two, one = tmp_path / "two.cw", tmp_path / "one.cw"
    cmd = _torchrun_train("--batch-size", "64", "--out", str(two), "--metrics", str(tmp_path / "two.jsonl"))
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    r1 = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            *TRAIN,
            "--batch-size",
            "128",
            "--drop-last",
            "--out",
            str(one),
            "--metrics",
            str(tmp_path / "one.jsonl"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(),
    )
    assert r1.returncode == 0, r1.stderr[-3000:]
    m2 = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    m1 = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in m2] == [2, 2, 2] and len(m1) == 3
    for a, b in zip(m1, m2):
        for key in ("pass_ll", "train_ll", "valid_ll", "test_ll"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    p1, p2 = engine.load(one), engine.load(two)  # saved compiled circuits load compiled
    assert torch.allclose(p1.params, p2.params, rtol=1e-4, atol=1e-6)
    assert torch.allclose(p1.input_params(0), p2.input_params(0), rtol=1e-4, atol=1e-6)


def test_ranks_that_compiled_different_circuits_are_stopped(tmp_path):
    port = str(_free_port())
    script = (
        "import sys, torch, engine\nfrom engine import distributed, optim\n"
        "distributed.join('cpu')\nr = int(sys.argv[1])\n"
        "root = engine.structures.hclt(torch.randint(0, 2, (64, 6)), 2 + 2 * r)\n"  # 2 vs 4 latents
        "try:\n    optim.fit(engine.compile(root), torch.randint(0, 2, (64, 6)), epochs=1, distributed=True)\n"
        "except distributed.DistributedError as e:\n    print(e, flush=True)\n"
        "    import os\n    os._exit(7)\n"
    )  # skip gloo's teardown racing the peer's exit
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(r)],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            env={**_env(), **common, "RANK": str(r), "LOCAL_RANK": str(r)},
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [7, 7]
    assert all("different circuits" in out for out in outs)


def test_a_dead_rank_ends_the_others_with_a_clear_error(tmp_path):
    port = str(_free_port())
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    trainer = subprocess.Popen(
        [sys.executable, "-m", "engine", *TRAIN, "--batch-size", "64"],
        cwd=ROOT,
        env={**_env(), **common, "RANK": "0", "LOCAL_RANK": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # rank 1 joins the group, then dies before the first collective (as a crashed or killed rank)
    dying = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os\nfrom engine import distributed\ndistributed.join('cpu')\nos._exit(3)",
        ],
        cwd=ROOT,
        timeout=300,
        env={**_env(), **common, "RANK": "1", "LOCAL_RANK": "1"},
    )
    assert dying.returncode == 3
    t0 = time.monotonic()
    try:
        out, err = trainer.communicate(timeout=120)
    finally:
        trainer.kill()
    assert trainer.returncode == 2, err[-3000:]
    assert "error: rank 0:" in err and "another rank" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 120


def test_bf16_reduction_sends_the_flows_rounded_to_bfloat16():
    """World of one (gloo, in process): the reduced flows are the flows rounded to bfloat16, and
    fp32 leaves them bit-exact."""
    import torch.distributed as dist

    from engine.distributed import FlowReducer
    from engine.structures import hclt

    data = torch.randint(0, 2, (200, 6))
    pc = engine.compile(hclt(data, 4))
    pc.zero_flows()
    pc.accumulate_flows(data[:64])
    before = [t.clone() for t in FlowReducer(pc).tensors]
    assert all(b.abs().sum() > 0 for b in before)  # real flows, not zeros
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        FlowReducer(pc, "fp32")()
        assert all(torch.equal(a, b) for a, b in zip(FlowReducer(pc).tensors, before))
        FlowReducer(pc, "bf16")()
        for a, b in zip(FlowReducer(pc).tensors, before):
            assert torch.equal(a, b.to(torch.bfloat16).float())
        assert any(not torch.equal(a, b) for a, b in zip(FlowReducer(pc).tensors, before))
        assert FlowReducer(pc).group is None  # gloo: the default group (NCCL gets its own, tested on GPUs)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="reduce dtype"):
        FlowReducer(pc, "fp16")


def test_two_ranks_train_with_bf16_reduction(tmp_path):
    cmd = _torchrun_train(
        "--batch-size", "64", "--reduce-dtype", "bf16", "--metrics", str(tmp_path / "bf16.jsonl")
    )
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=_env())
    assert r.returncode == 0, r.stderr[-3000:]
    m = [json.loads(line) for line in (tmp_path / "bf16.jsonl").read_text().splitlines()]
    assert len(m) == 3 and m[-1]["train_ll"] > m[0]["pass_ll"]  # EM on bf16-summed flows still learns


def test_flow_buckets_tile_the_parameter_flows_top_down():
    from engine.distributed import _flow_buckets
    from engine.structures import hclt

    pc = engine.compile(hclt(torch.randint(0, 2, (300, 9)), 6))
    for nbytes in (1, 10**9):  # one bucket per sum layer; one bucket for all of them
        buckets = _flow_buckets(pc, nbytes)
        flows = [
            t
            for (li, _), t in buckets.items()
            if t.data_ptr() >= pc.param_flows.data_ptr()
            and t.data_ptr() < pc.param_flows.data_ptr() + pc.param_flows.numel() * 4
        ]
        assert sum(t.numel() for t in flows) == pc.param_flows.numel()
        starts = sorted(t.data_ptr() for t in flows)
        assert len(set(starts)) == len(starts)  # disjoint slices
    n_sum = len(pc.plan.sum_layers)
    from engine.distributed import FlowReducer

    assert FlowReducer(pc, overlap=True).overlap and not FlowReducer(pc, "bf16", overlap=True).overlap
    assert len(_flow_buckets(pc, 1)) == n_sum  # the statistics are reduced as they are reported
    assert len(_flow_buckets(pc, 10**9)) == 1


def _overlap_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist

    from engine import distributed, optim
    from engine.structures import hclt

    issued = []
    on_step = distributed.FlowReducer._on_step
    distributed.FlowReducer._on_step = lambda self, step: (issued.append(step), on_step(self, step))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 2, (256, 8), generator=g)
    results = []
    for overlap in (False, True):
        torch.manual_seed(1)
        pc = engine.compile(hclt(data, 4))
        sched = optim.EMSchedule(batch_size=32, step_size=0.5, final_step_size=0.5, full_batch_epochs=1)
        optim.fit(
            pc,
            data,
            epochs=2,
            schedule=sched,
            generator=torch.Generator().manual_seed(2),
            distributed=True,
            reduce_overlap=overlap,
        )
        results.append(torch.cat([pc.params, pc.input_params(0).reshape(-1)]))
        assert bool(issued) == overlap  # the layer-by-layer path ran only when asked for
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_overlapped_reduction_trains_exactly_what_the_plain_one_trains(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_overlap_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0[0], r1[0]) and torch.equal(r0[1], r1[1])  # ranks agree
    assert torch.equal(r0[0], r0[1])  # overlap changes when the sums are made, not what they are


def test_a_cancelled_reduction_leaves_nothing_armed():
    from engine.distributed import FlowReducer
    from engine.structures import hclt

    pc = engine.compile(hclt(torch.randint(0, 2, (100, 5)), 3))
    r = FlowReducer(pc, overlap=True)
    r.start()
    assert pc.flow_listener is not None
    r._pending.append(object())  # a work handle of a capture that failed midway
    r.cancel()
    assert pc.flow_listener is None and not r._armed and r._pending == []


def test_flow_group_is_one_high_priority_nccl_group_per_default_group(monkeypatch):
    """The flows' own group (engine.distributed.flow_group) without NCCL: its creation stubbed, the
    rules around it real. Made once per default group with a high-priority stream option, warmed up on
    the flows' device; CPU flows, HIGH_PRIORITY off, a default group without NCCL and one already of
    high priority keep the default group; a set-up failure names the group and the switch that turns
    it off."""
    import torch.distributed as dist

    from engine import distributed as d

    made, warmed = [], []

    class Options:
        def __init__(self, is_high_priority_stream=False):
            self.is_high_priority_stream = is_high_priority_stream

    real_zeros = torch.zeros
    monkeypatch.setattr(dist, "ProcessGroupNCCL", type("FakeNCCL", (), {"Options": Options}), raising=False)
    monkeypatch.setattr(dist, "new_group", lambda **kw: made.append(kw) or object())
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: warmed.append((t.device_hint, group)))

    def zeros(*shape, device=None, **kw):  # a CPU tensor that remembers the device it was asked for
        t = real_zeros(*shape, **kw)
        t.device_hint = str(device)
        return t

    monkeypatch.setattr(torch, "zeros", zeros)
    monkeypatch.setattr(d, "_FLOW_GROUPS", {})
    for attempt in range(2):  # a default group destroyed and made again gets a new flows group
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            monkeypatch.setattr(d, "_default_has_nccl", lambda: False)
            assert d.flow_group("cuda:1") is None  # no NCCL in the default group
            monkeypatch.setattr(d, "_default_has_nccl", lambda: True)
            assert d.flow_group("cpu") is None  # CPU flows: gloo's business
            monkeypatch.setattr(d, "HIGH_PRIORITY", False)
            assert d.flow_group("cuda:1") is None
            monkeypatch.setattr(d, "HIGH_PRIORITY", True)
            monkeypatch.setattr(d, "_default_is_high_priority", lambda: True)
            assert d.flow_group("cuda:1") is None  # join() made the default group high-priority
            monkeypatch.setattr(d, "_default_is_high_priority", lambda: False)
            g = d.flow_group("cuda:1")
            assert g is not None and d.flow_group("cuda:1") is g  # made once
            assert len(made) == attempt + 1 and len(warmed) == attempt + 1
            assert made[-1]["backend"] == "nccl" and made[-1]["pg_options"].is_high_priority_stream
            assert warmed[-1] == ("cuda:1", g)  # warmed up on the flows' device, in its own group
        finally:
            dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        monkeypatch.setattr(d, "_default_is_high_priority", lambda: False)

        def refuse(**kw):
            raise RuntimeError("NCCL error: out of memory")

        monkeypatch.setattr(dist, "new_group", refuse)
        with pytest.raises(d.DistributedError, match="high-priority NCCL group.*CW_DIST_HIGH_PRIORITY=0"):
            d.flow_group("cuda:0")
    finally:
        dist.destroy_process_group()
