"""The training driver on a CUDA device: graph replay, resident and streamed data, tails, events.

Skipped without CUDA (the `gpu` marker); run on the lent GPU with `pytest -m gpu`. The reference is
the same driver with graphs off on the same GPU (every step eager): replay must reproduce it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import engine
from engine import optim
from engine.dists import Categorical

pytestmark = pytest.mark.gpu


def _setup(n=3000, vars_=64, latents=32):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, vars_), generator=g)
    root = engine.structures.hclt(x, latents, input_dist=Categorical(256))
    return root, x


def _fit(root, x, **kw):
    pc = engine.compile(copy.deepcopy(root), device="cuda")
    sched = optim.EMSchedule(batch_size=256, step_size=0.5, final_step_size=0.1, full_batch_epochs=1)
    events = []
    hist = optim.fit(
        pc,
        x,
        x[:500],
        epochs=3,
        schedule=sched,
        callback=events.append,
        generator=torch.Generator().manual_seed(1),
        **kw,
    )
    return pc, hist, events


@pytest.mark.parametrize("budget", [None, 0])  # resident, streamed through pinned chunks
def test_graph_replay_follows_the_eager_driver(budget):
    root, x = _setup()  # 3000 rows: an eager 184-row tail every mini-batch epoch
    eager, h_eager, _ = _fit(root, x, graphs=False)
    fast, h_fast, events = _fit(root, x, data_budget_bytes=budget)
    for a, b in zip(h_eager, h_fast):
        assert b["pass_ll"] == pytest.approx(a["pass_ll"], rel=1e-5)
        assert b["valid_ll"] == pytest.approx(a["valid_ll"], rel=1e-5)
    assert torch.allclose(eager.params, fast.params, rtol=1e-4, atol=1e-6)
    assert [h["phase"] for h in h_fast] == ["minibatch"] * 3 + ["full_batch"]
    # replayed: every full batch but the first of the run (eager, compiles the kernels); never the tail
    assert all(h["graph_batches"] >= 3000 // 256 - 1 for h in h_fast)
    assert all(h["graph_batches"] == 0 for h in h_eager)
    assert any(e["type"] == "batch" for e in events)


def test_fit_keeps_data_on_the_device_in_uint8_and_does_not_leak_graph_memory():
    root, x = _setup()
    pc = engine.compile(copy.deepcopy(root), device="cuda")
    sched = optim.EMSchedule(batch_size=256, full_batch_epochs=0)
    optim.fit(pc, x, epochs=1, schedule=sched)
    torch.cuda.synchronize()
    after_one = torch.cuda.memory_allocated()
    optim.fit(pc, x, epochs=3, schedule=sched)  # new step size each epoch: a graph re-captured each time
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= after_one + (1 << 20)
    feed = optim.DataFeed(x, pc.device)
    assert feed.resident is not None and feed.resident.dtype == torch.uint8
