"""Early input statistics (issues 11, 12): the rows of an input layer whose flows are final before the
flows pass ends are laid out first, the plan says after which step they are final, and a training
step computes (data-parallel EM: all-reduces) their statistics then, on the parameter-flow stream.

Checked against an independent derivation from the node DAG (each input vector's lowest reading
sum layer), on HCLTs over random trees and on PD; the overlapped pass's launches, their streams and
the reducer's reports are recorded; two gloo ranks train what one process trains.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import socket

import numpy as np
import pytest
import torch

import engine
from engine.dists import Categorical
from engine.executor.stream_schedule import EARLY_STATS_PARTS, early_stats
from engine.nodes import InputNodes, ProdNodes, SumNodes
from engine.structures import hclt_from_tree, pd
from tests.helpers import fail_on_call
from tests.kernel_runner import OPTS, data
from tests.test_overlap import CASES, record_flows_pass


def random_tree(n: int, seed: int) -> np.ndarray:
    """Edges of a random tree on n variables (parent index < child index)."""
    rng = np.random.default_rng(seed)
    return np.array([[int(rng.integers(0, v)), v] for v in range(1, n)])


def lowest_reader_depth(root) -> dict[int, int]:
    """Input vector uid -> depth of the lowest sum above it, from the node DAG (no compiler code):
    a sum's depth is 1 + the deepest sum or input below its products (inputs: 0)."""
    order = root.topological()
    depth: dict[int, int] = {}

    def below(v) -> list:  # the sum / input vectors a sum's child reads (products flattened)
        return [w for c in v.children for w in below(c)] if isinstance(v, ProdNodes) else [v]

    lowest: dict[int, int] = {}
    for v in order:
        if isinstance(v, InputNodes):
            depth[v.uid] = 0
        elif isinstance(v, SumNodes):
            kids = [w for c in v.children for w in below(c)]
            depth[v.uid] = 1 + max(depth[w.uid] for w in kids)
            for w in kids:
                if isinstance(w, InputNodes):
                    lowest[w.uid] = min(lowest.get(w.uid, depth[v.uid]), depth[v.uid])
    return lowest


def product_backward_position(plan, depth: int) -> int:
    """Position in backward_steps() of the backward of the product layer under sum layer `depth`."""
    for p, s in enumerate(plan.backward_steps()):
        if s.pass_name == "backward" and s.layer.kind == "product" and s.partner.depth == depth:
            return p
    raise AssertionError(f"no product layer under depth {depth}")


def circuits():
    yield "hclt-chain", hclt_from_tree(np.array([[v, v + 1] for v in range(5)]), 6, 16, Categorical(5))
    for seed in range(3):
        yield f"hclt-random-{seed}", hclt_from_tree(random_tree(12, seed), 12, 16, Categorical(4))
    yield "pd", pd((4, 4), 16, (2, 2), input_dist=Categorical(4))


@pytest.mark.parametrize("name,root", list(circuits()), ids=[n for n, _ in circuits()])
def test_ready_ranges_match_the_node_dag(name, root):
    """Each range's rows are final by its step (their lowest reader's product layer is done) and the
    step is the earliest at which the whole prefix is; the layout puts rows in finishing order, so
    there is one range per distinct lowest reader."""
    pc = engine.compile(copy.deepcopy(root))
    plan = pc.plan
    lowest = lowest_reader_depth(pc.root)
    (layer,) = plan.input_layers
    final = np.empty(layer.num_nodes, dtype=np.int64)  # per node: where its flows become final
    for uid, first, n in layer.input_group.vectors:
        final[first : first + n] = product_backward_position(plan, lowest[uid])
    ranges = plan.input_flows_ready()
    assert ranges[0][2] == 0 and ranges[-1][3] == layer.num_nodes
    for (p, i, lo, hi), nxt in zip(ranges, ranges[1:] + ((None, 0, layer.num_nodes, None),)):
        assert i == 0 and lo < hi and nxt[2] == hi  # contiguous, in order
        assert final[lo:hi].max() <= p  # final by then
        assert final[:hi].max() == p  # and not earlier: the whole prefix waits for its last row
    assert np.all(np.diff(final) >= 0)  # the layout: finishing order
    assert len(ranges) == len({lowest[uid] for uid, _, _ in layer.input_group.vectors})
    if name.startswith("hclt"):
        assert len(ranges) > 1  # leaves, their parents, ...: some rows finish early
    else:
        assert len(ranges) == 1  # PD reads every input in its lowest layer


def test_early_launches_merge_small_ranges_and_leave_the_last_to_the_input_step():
    ready = [(3, 0, 0, 10), (5, 0, 10, 12), (7, 0, 12, 40), (9, 0, 40, 64), (9, 1, 0, 8), (11, 1, 8, 16)]
    got = early_stats(ready, [64, 16], parts=4)  # at least 64 / 4 = 16 rows of layer 0, 4 of layer 1
    assert got == {7: [(0, 0, 40)], 9: [(1, 0, 8)]}  # 0..12 too short alone; 40..64 and 8..16: the end
    assert early_stats([(38, 0, 0, 100)], [100]) == {}  # one range (PD): all at the end
    assert early_stats(ready, [64, 16], parts=1) == {}  # nothing but whole layers is early enough


def _hclt():
    return CASES["chain"]()


def test_training_steps_compute_early_statistics_on_the_parameter_flow_stream(monkeypatch):
    streams = record_flows_pass(monkeypatch, *_hclt())
    stats = [
        (name, stream)
        for name, stream, _, _ in streams.ops
        if "statistics" in name and "all-reduce" not in name
    ]
    early = [n for n, s in stats if s == "params"]
    assert early and stats[-1][1] == "main"  # some rows during the pass, the rest in the input step
    spans = [tuple(int(v) for v in n.rsplit(" ", 1)[1].split(":")) for n, _ in stats]
    assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # tiling, in order
    root, dists = _hclt()
    pc = engine.compile(copy.deepcopy(root), backend="triton", kernel_options=OPTS)
    assert spans[-1][1] == pc.input_layers[0].num_nodes
    n = pc.input_layers[0].num_nodes
    assert all((b - a) * EARLY_STATS_PARTS >= n for a, b in spans[:-1])


def test_early_statistics_can_be_turned_off(monkeypatch):
    import tests.test_overlap as t

    monkeypatch.setattr(t, "OVERLAP", dataclasses.replace(t.OVERLAP, early_stats=False))
    streams = record_flows_pass(monkeypatch, *_hclt())
    stats = [s for name, s, _, _ in streams.ops if "statistics" in name]
    assert stats and set(stats) == {"main"}


def test_early_and_late_statistics_are_bit_identical():
    """Cut into ranges or not, each segment's statistics are the same arithmetic."""
    root, dists = _hclt()
    (x, m) = data(dists, 64)
    out = []
    for early in (True, False):
        opts = dataclasses.replace(OPTS, overlap=True, early_stats=early)
        pc = engine.compile(copy.deepcopy(root), backend="triton", kernel_options=opts)
        pc.zero_flows()
        pc.accumulate_flows(x, m, validate=False)
        out.append((pc.input_stats(0).clone(), pc.param_flows.clone()))
    assert out[0][0].abs().sum() > 0
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(batch: int, distributed_: bool):
    from engine import optim

    torch.manual_seed(0)  # the same circuit, parameters and data in every process
    root, dists = _hclt()
    x, _ = data(dists, 96)
    pc = engine.compile(copy.deepcopy(root), backend="triton", kernel_options=OPTS)
    sched = optim.EMSchedule(
        batch_size=batch, step_size=0.5, final_step_size=0.3, full_batch_epochs=1, drop_last=True
    )
    hist = optim.fit(
        pc, x, epochs=1, schedule=sched, generator=torch.Generator().manual_seed(2), distributed=distributed_
    )
    params = torch.cat([pc.params, pc.input_params(0).reshape(-1)])
    return params, [(h["pass_ll"], h["train_ll"]) for h in hist], pc.input_layers[0].num_nodes


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist

    from engine import distributed

    reported = []
    on_range = distributed.FlowReducer._on_stats_chunk
    distributed.FlowReducer._on_stats_chunk = lambda self, i, lo, hi: (
        reported.append((lo, hi)),
        on_range(self, i, lo, hi),
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    params, lls, n = _train(16, True)
    torch.save({"params": params, "lls": lls, "reported": reported, "n": n}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_reduce_early_statistics_and_train_what_one_process_trains(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"]) and r0["reported"] == r1["reported"]
    steps = 96 // 32
    per_step = len(r0["reported"]) // steps
    assert per_step > 1 and len(r0["reported"]) == steps * per_step  # early ranges, then the rest
    one = r0["reported"][:per_step]
    assert one[0][0] == 0 and one[-1][1] == r0["n"] and all(a[1] == b[0] for a, b in zip(one, one[1:]))
    params, lls, _ = _train(32, False)
    assert torch.allclose(r0["params"], params, rtol=1e-4, atol=1e-6)
    for a, b in zip(lls, r0["lls"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


class _Work:
    """A stand-in for an all-reduce's work handle: records when the EM update waits for it."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait(self):
        self.log.append(("wait", self.name))


def test_em_update_waits_for_each_statistics_range_just_before_its_rows(monkeypatch):
    """Data-parallel EM hands the update the statistics still arriving: the sum weights are updated
    first, then each input layer's rows once their all-reduces are waited for (early ranges together,
    the last range last), giving exactly the plain update."""
    from engine.distributed import PendingStats

    root, dists = _hclt()
    x, m = data(dists, 32)
    pcs = []
    for _ in range(2):
        pc = engine.compile(copy.deepcopy(root), backend="triton", kernel_options=OPTS)
        pc.zero_flows()
        pc.accumulate_flows(x, m, validate=False)
        pcs.append(pc)
    plain, split = pcs
    plain.em_step(0.5, 0.1)
    n = split.input_layers[0].num_nodes
    log: list = []
    works = [((0, 0, 16), _Work("a", log)), ((0, 16, 40), _Work("b", log)), ((0, 40, n), _Work("c", log))]
    be = split.backend
    sums, inputs_ = be.sum_em_update_all, be.input_em_update
    monkeypatch.setattr(be, "sum_em_update_all", lambda *a: (log.append(("sum EM",)), sums(*a)))
    monkeypatch.setattr(
        be,
        "input_em_update",
        lambda layer, t, s, p, lo=0, hi=None: (
            log.append(("input EM", lo, hi)),
            inputs_(layer, t, s, p, lo, hi),
        ),
    )
    before = split.input_params(0).clone()
    split.em_step(0.5, 0.1, pending=PendingStats(works))
    assert log[:6] == [
        ("sum EM",),
        ("wait", "a"),
        ("wait", "b"),
        ("input EM", 0, 40),
        ("wait", "c"),
        ("input EM", 40, n),
    ]
    assert torch.equal(split.params, plain.params)
    assert torch.equal(split.input_params(0), plain.input_params(0))
    assert not torch.equal(split.input_params(0), before)  # a real update ran


def test_reducer_hands_the_statistics_still_arriving_to_the_em_update(monkeypatch):
    import torch.distributed as dist

    from engine import distributed

    root, dists = _hclt()
    x, m = data(dists, 32)
    pc = engine.compile(copy.deepcopy(root), backend="triton", kernel_options=OPTS)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        r = distributed.FlowReducer(pc)
        got = []
        for defer, switch in ((True, True), (False, True), (True, False)):
            monkeypatch.setattr(distributed, "DEFER_STATS", switch)
            pc.zero_flows()
            r.start()
            pc.accumulate_flows(x, m, validate=False)
            got.append(r(defer_stats=defer))
        pending = got[0]
        n = pc.input_layers[0].num_nodes
        spans = [(lo, hi) for lo, hi, _ in pending.pieces(0)]
        assert len(spans) == 2 and spans[0][0] == 0 and spans[0][1] == spans[1][0] and spans[1][1] == n
        assert got[1] is None and got[2] is None  # not asked for, or switched off: all waited for
    finally:
        dist.destroy_process_group()


def _world_of_one():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist


def _chain_step(n: int):
    """The chain HCLT compiled for the kernels, a batch of n rows for it, and a gloo world of one."""
    root, dists = _hclt()
    x, m = data(dists, n)
    return engine.compile(copy.deepcopy(root), backend="triton", kernel_options=OPTS), x, m, _world_of_one()


def test_a_profiled_batch_issues_the_same_collectives_as_any_other(monkeypatch):
    """Ranks sample their profiled batches on their own clocks, and a profiled batch runs the plain
    one-stream pass: it must still all-reduce the same buffers in the same order (review finding)."""
    from engine import distributed

    pc, x, m, dist = _chain_step(32)
    try:
        r = distributed.FlowReducer(pc)
        seq: list = []
        real = dist.all_reduce
        monkeypatch.setattr(
            dist, "all_reduce", lambda t, *a, **k: (seq.append(tuple(t.shape)), real(t, *a, **k))[1]
        )

        def step(profiled: bool) -> list:
            seq.clear()
            pc.profile(profiled, every=1)
            pc.zero_flows()
            r.start()
            pc.accumulate_flows(x, m, validate=False)
            pc.em_step(0.5, 0.1, pending=r(defer_stats=True))
            return list(seq)

        plain, profiled = step(False), step(True)
        assert len(plain) > 2 and profiled == plain
        events = [e for e in pc.profiler.collect(block=True) if e["type"] == "layer_time"]
        inp = pc.input_layers[0].layer.index
        mine = [e for e in events if e["layer"] == inp and e["pass"] == "backward"]
        assert len(mine) == 1 and mine[0]["ms"] > 0  # early pieces and the rest: one event per batch
    finally:
        pc.profile(False)
        dist.destroy_process_group()


def test_a_step_that_raises_leaves_no_reduction_armed(monkeypatch):
    from engine import distributed
    from engine.kernels.graph import CapturedStep

    pc, x, m, dist = _chain_step(16)
    try:
        r = distributed.FlowReducer(pc)
        step = CapturedStep(pc, 16, em=(0.5, 0.1), reduce=r)
        failing, _ = fail_on_call(pc.backend.prod_backward, 3)
        monkeypatch.setattr(pc.backend, "prod_backward", failing)
        with pytest.raises(RuntimeError, match="launch failed"):
            step(x, m)
        assert pc.flow_listener is None and pc.stats_listener is None and r._pending == []
        lls = step(x, m)  # the next step trains as if nothing happened
        assert torch.isfinite(lls).all()
    finally:
        dist.destroy_process_group()


def test_an_em_update_that_raises_still_waits_for_the_statistics():
    from engine.distributed import PendingStats

    root, _ = _hclt()
    pc = engine.compile(copy.deepcopy(root), backend="triton", kernel_options=OPTS)
    log: list = []
    pending = PendingStats([((0, 0, pc.input_layers[0].num_nodes), _Work("all", log))])
    with pytest.raises(ValueError, match="step_size"):
        pc.em_step(2.0, 0.1, pending=pending)
    assert log == [("wait", "all")]


def test_input_layers_keep_the_order_their_families_first_appear():
    """Only the rows inside a family's layer follow the flows' finishing order; the layers themselves
    (input_params(i), profiler layer indices) stay in first-appearance order."""
    from engine.dists import Bernoulli, Gaussian
    from engine.nodes import inputs, multiply, summate

    g0, b1, g2, b3 = (
        inputs(0, 16, Gaussian()),
        inputs(1, 16, Bernoulli()),
        inputs(2, 16, Gaussian()),
        inputs(3, 16, Bernoulli()),
    )
    low = summate(multiply(g2, b3), num_nodes=16, block_size=16)  # depth 1: read last in the flows pass
    mid = summate(multiply(low, b1), num_nodes=16, block_size=16)
    root = summate(multiply(mid, g0), num_nodes=1)
    pc = engine.compile(root)
    first = next(v for v in pc.root.topological() if isinstance(v, InputNodes))
    assert pc.input_layers[0].dist.name == first.dist.name
    for inp in pc.input_layers:  # inside a layer: the variable read higher up comes first
        vars_ = inp.vars.tolist()
        assert vars_[0] in (0, 1) and vars_[-1] in (2, 3)
