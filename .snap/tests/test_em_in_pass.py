"""EM updates inside the flows pass (`KernelOptions.em_in_pass`, `CompiledCircuit.train_step`,
`engine.executor.streams.PassEM`).

A sum layer's weights are read for the last time by its own parameter flows, an early input range's
parameters by its own statistics, so a training step may update each right behind them. The kernels
and the flows are the ones of the update after the pass, so training is bit-identical with the
option on and off; on the CPU (Triton interpreter) the overlapped schedule runs in program order,
so the order of the executor's calls shows where each update ran. Ties, profiled batches and a
reducer that sums only after the pass keep the update at the end. Data-parallel (gloo): each
bucket's layers are updated after its all-reduce, in one process (world of one) and two.
"""

from __future__ import annotations

import copy
import dataclasses
import os

import pytest
import torch

import engine
from engine.dists import Categorical
from engine.structures import hmm
from tests import test_overlap as overlap_tests  # its circuits and recording stand-in for the streams
from tests.kernel_runner import DEVICE, EM, OPTS, data
from tests.test_distributed_chunks import _free_port

ON = dataclasses.replace(OPTS, overlap=True, em_in_pass=True)
OFF = dataclasses.replace(OPTS, overlap=True, em_in_pass=False)


def tied_case():
    """A homogeneous HMM: every transition and emission is tied, so the update stays at the end."""
    return hmm(4, 16, 5, homogeneous=True), [Categorical(5)] * 4


# HCLT over 5 variables (early input statistics), PD, a layer of two tiled partitions, a chain of sum
# layers (several buckets, element buffers reused): test_overlap's circuits
CASES = overlap_tests.CASES
hclt_case = overlap_tests.hclt_case


def batches_for(dists, steps=3):
    out = []
    for seed in range(steps):
        torch.manual_seed(seed)
        x, m = data(dists, 20)
        out.append((x.long().to(DEVICE), m.to(DEVICE)))
    return out


def compiled(root, opts):
    return engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=opts)


def parameters(pc) -> list[torch.Tensor]:
    return [pc.params.clone()] + [pc.input_params(i).clone() for i in range(len(pc.input_layers))]


def record_calls(pc) -> list[tuple]:
    """The executor's calls of a step, in order: (name, layer index or input layer i, rows)."""
    calls, backend = [], pc.backend
    layer_of = {id(t): i for i, t in enumerate(pc.tables.layers) if t is not None}
    input_of = {id(inp): i for i, inp in enumerate(pc.input_layers)}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            if name in ("input_stats", "input_em_update"):
                i = input_of[id(args[0])]
                out = real(*args, **kwargs)
                lo = args[6] if name == "input_stats" and len(args) > 6 else (args[4] if len(args) > 4 else 0)
                hi = out if name == "input_stats" else (args[5] if len(args) > 5 else None)
                calls.append((name, i, (lo, hi)))
                return out
            key = layer_of.get(id(args[0]))
            calls.append((name, key, None))
            return real(*args, **kwargs)

        return wrapper

    for name in (
        "sum_backward",
        "prod_backward",
        "prod_forward",
        "input_stats",
        "sum_em_update",
        "sum_em_update_all",
        "input_em_update",
    ):
        setattr(backend, name, spy(name, getattr(backend, name)))
    return calls


def train(root, dists, opts, steps=3):
    pc = compiled(root, opts)
    before = parameters(pc)
    for x, m in batches_for(dists, steps):
        pc.train_step(x, m, em=EM, validate=False)
    return pc, before, parameters(pc)


@pytest.mark.parametrize("name", sorted(CASES))
def test_updates_in_the_pass_train_bit_identically(name):
    root, dists = CASES[name]()
    _, before, off = train(root, dists, OFF)
    pc, _, on = train(root, dists, ON)
    for a, b, c in zip(before, off, on):
        assert not torch.equal(a, b)  # the update happened
        assert torch.equal(b, c)  # the same kernels on the same flows
    assert len(pc.plan.sum_layers) > 1
    if name == "two_partitions":
        assert max(len(layer.partitions) for layer in pc.plan.sum_layers) > 1
    tiled = [layer for layer in pc.plan.sum_layers if "sum_block" in pc.tables.kernels[layer.index]]
    assert tiled  # the tiled kernels ran, not only the per-node ones


def test_train_step_off_is_todays_sequence():
    """Without the option, `train_step` is zero flows, forward + flows, `em_step`, call for call."""
    root, dists = hclt_case()
    (x, m), *_ = batches_for(dists, 1)
    a, b = compiled(root, OFF), compiled(root, OFF)
    a.train_step(x, m, em=EM, validate=False)
    b.zero_flows()
    b.accumulate_flows(x, m, validate=False)
    b.em_step(*EM)
    for p, q in zip(parameters(a), parameters(b)):
        assert torch.equal(p, q)


def test_each_update_runs_right_behind_its_last_reader():
    """Program order on the CPU: each sum layer's update right after its backward (its parameter
    flows), each early input range's right after its statistics, long before the pass ends; no update
    of all layers after it."""
    root, dists = hclt_case()
    pc = compiled(root, ON)
    calls = record_calls(pc)
    (x, m), *_ = batches_for(dists, 1)
    pc.train_step(x, m, em=EM, validate=False)
    names = [c[0] for c in calls]
    assert "sum_em_update_all" not in names
    sums = [layer.index for layer in pc.plan.sum_layers]
    updated = [c[1] for c in calls if c[0] == "sum_em_update"]
    assert sorted(updated) == sorted(sums)  # every sum layer once
    for k, (name, key, _) in enumerate(calls):
        if name == "sum_em_update":
            assert calls[k - 1][:2] == ("sum_backward", key)
    first_update = names.index("sum_em_update")
    assert first_update < names.index("prod_backward")  # the top layer's, before the pass goes on
    inputs_ = [c for c in calls if c[0] in ("input_stats", "input_em_update")]
    stats = [c for c in inputs_ if c[0] == "input_stats"]
    assert len(stats) > len(pc.input_layers)  # HCLT: some rows' statistics came early
    for k, (name, i, rows) in enumerate(inputs_):
        if name == "input_stats":  # each statistics range's update next, on the same rows
            assert inputs_[k + 1] == ("input_em_update", i, rows)
    early = calls.index(stats[0])
    assert early < len(calls) - 1 - names[::-1].index("sum_backward")  # early: before the last sum layer
    for i, inp in enumerate(pc.input_layers):
        rows = [c[2] for c in inputs_ if c[0] == "input_em_update" and c[1] == i]
        assert rows[0][0] == 0 and rows[-1][1] == inp.num_nodes  # every row once, in order
        assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_ties_keep_the_update_after_the_pass():
    root, dists = tied_case()
    pc = compiled(root, ON)
    assert not pc._ties.empty
    calls = record_calls(pc)
    _, _, off = train(root, dists, OFF)
    before = parameters(pc)
    for x, m in batches_for(dists):
        pc.train_step(x, m, em=EM, validate=False)
    names = [c[0] for c in calls]
    assert "sum_em_update" not in names and names.count("sum_em_update_all") == 3
    for a, b, c in zip(before, off, parameters(pc)):
        assert not torch.equal(a, b) and torch.equal(b, c)


def test_profiled_steps_update_after_the_pass():
    root, dists = hclt_case()
    pc = compiled(root, ON)
    calls = record_calls(pc)
    pc.profile(every=1)
    (x, m), *_ = batches_for(dists, 1)
    pc.train_step(x, m, em=EM, validate=False)
    assert [c[0] for c in calls].count("sum_em_update_all") == 1


def test_bad_em_settings_fail_before_any_launch():
    root, dists = hclt_case()
    pc = compiled(root, ON)
    calls = record_calls(pc)
    (x, m), *_ = batches_for(dists, 1)
    before = parameters(pc)
    pc.param_flows.fill_(1.0)  # a step that ran would zero them
    for em, match in (((0.0, 0.1), "step_size"), ((1.5, 0.1), "step_size"), ((0.5, -1.0), "pseudocount")):
        with pytest.raises(ValueError, match=match):
            pc.train_step(x, m, em=em, validate=False)
    assert calls == [] and bool((pc.param_flows == 1.0).all())
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(pc)))


def test_flows_only_steps_and_the_option_validation():
    root, dists = hclt_case()
    pc = compiled(root, ON)
    before = parameters(pc)
    (x, m), *_ = batches_for(dists, 1)
    pc.train_step(x, m, validate=False)  # no EM: flows only
    assert pc.param_flows.abs().sum() > 0
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(pc)))
    with pytest.raises(ValueError, match="em_in_pass"):
        dataclasses.replace(OPTS, em_in_pass=2)


# ----------------------------------------------------------------- data-parallel (gloo)
def _reduced_train(root, dists, opts, steps=3, **reducer):
    from engine.distributed import FlowReducer

    pc = compiled(root, opts)
    red = FlowReducer(pc, **reducer)
    for x, m in batches_for(dists, steps):
        pc.train_step(x, m, em=EM, reduce=red, validate=False)
    assert pc.flow_listener is None and pc.stats_listener is None  # nothing left armed
    return pc, parameters(pc)


def test_a_world_of_one_updates_each_bucket_after_its_all_reduce():
    """In one process (gloo, world 1): one bucket per sum layer, or one for all; the updates wait for
    the all-reduces' waits and give the update after the pass bit for bit, also with the statistics
    reduced in chunks; a reducer that sums only after the pass (bf16) keeps the update there."""
    import torch.distributed as dist

    from engine import distributed

    root, dists = hclt_case()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        _, off = _reduced_train(root, dists, OFF)
        for bucket_bytes in (1, 10**9):
            waited = []
            real = distributed.FlowReducer._on_step

            def on_step(self, step, _real=real):
                wait = _real(self, step)
                return None if wait is None else (lambda: (waited.append(step.layer.index), wait()))

            distributed.FlowReducer._on_step = on_step
            try:
                pc, on = _reduced_train(root, dists, ON, bucket_bytes=bucket_bytes)
            finally:
                distributed.FlowReducer._on_step = real
            assert all(torch.equal(a, b) for a, b in zip(off, on))
            n = len(pc.plan.sum_layers)
            assert len(waited) == 3 * (n if bucket_bytes == 1 else 1)  # every bucket's wait, each step
        pc, chunked = _reduced_train(root, dists, ON, chunk_bytes=16 * 7 * 4)  # statistics in chunks
        assert distributed.FlowReducer(pc, chunk_bytes=16 * 7 * 4).chunk_rows  # of 16 rows: real chunks
        assert all(torch.equal(a, b) for a, b in zip(off, chunked))
        _, bf16 = _reduced_train(root, dists, ON, dtype="bf16")
        _, bf16_off = _reduced_train(root, dists, OFF, dtype="bf16")
        assert all(torch.equal(a, b) for a, b in zip(bf16, bf16_off))
    finally:
        dist.destroy_process_group()


def _two_rank_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist

    from engine import optim

    dist.init_process_group("gloo", rank=rank, world_size=2)
    from engine.circuit import CompiledCircuit

    after_pass = []  # updates made after the flows pass (em_step), per mode
    real_em_step = CompiledCircuit.em_step
    CompiledCircuit.em_step = lambda self, *a, **k: (after_pass.append(1), real_em_step(self, *a, **k))[1]
    root, dists = hclt_case()
    torch.manual_seed(0)
    x, _ = data(dists, 64)
    results = {}
    for name, opts in (("off", OFF), ("on", ON)):
        pc = compiled(root, opts)
        before = parameters(pc)
        sched = optim.EMSchedule(batch_size=8, step_size=0.5, final_step_size=0.5, full_batch_epochs=0)
        optim.fit(
            pc,
            x.long(),
            epochs=1,
            schedule=sched,
            generator=torch.Generator().manual_seed(2),
            distributed=True,
        )
        results[name] = parameters(pc)
        results[name + "_before"] = before
        results[name + "_after_pass"] = len(after_pass)
        after_pass.clear()
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_train_bit_identically_with_updates_in_the_pass(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["off_after_pass"] == 64 // 16 and r0["on_after_pass"] == 0  # 4 global batches of 16
    for a, b, c, d, start in zip(r0["off"], r0["on"], r1["off"], r1["on"], r0["on_before"]):
        assert not torch.equal(start, b)  # trained
        assert torch.equal(a, b) and torch.equal(b, d) and torch.equal(c, d)  # on = off, ranks agree


# ----------------------------------------------------------------- the schedule's dependency graph
class RecordingEmStreams(overlap_tests.RecordingStreams):
    """The recording stand-in for the streams (tests/test_overlap.py) with the fourth, `em` stream."""

    STREAMS = ("main", "recompute", "params", "em")

    def __init__(self):
        super().__init__()
        self.em, self.em_forked = "em", False

    def fork(self) -> None:
        super().fork()
        self.em_forked = False

    def fork_em(self) -> None:
        self._merge("em", self.clock["main"])
        self.em_forked = True

    def join(self) -> None:
        super().join()
        if self.em_forked:
            self._merge("main", self.clock["em"])


def _record_updates(pc, streams, listening: bool) -> None:
    """Record what the updates touch and who reads the weights they write (the element flows, the
    deferred parameter flows, the statistics); `listening`: the listeners' all-reduces return waits
    (modelled as events after them on their stream), else the single-process pass (no listeners)."""
    be = pc.backend
    layer_of = {id(t): i for i, t in enumerate(pc.tables.layers) if t is not None}
    input_of = {id(inp): i for i, inp in enumerate(pc.input_layers)}
    weights = ("weights", pc.params.untyped_storage().data_ptr())
    flows = pc.param_flows.untyped_storage().data_ptr()

    def slots(parts):
        return frozenset(i for p in parts for i in range(p.param_offset, p.param_offset + p.num_params))

    real = {n: getattr(be, n) for n in ("sum_backward", "input_stats", "sum_em_update", "input_em_update")}

    def sum_backward(table, *args, keep_node_flows=True, defer=None):
        li = layer_of[id(table)]
        streams.record(f"sum {li} element flows read weights", [(weights, slots(table.parts), False)])
        before = len(defer) if defer is not None else 0
        real["sum_backward"](table, *args, keep_node_flows, defer)
        for k in range(before, len(defer) if defer is not None else 0):
            launch, pt = defer[k], defer[k].launch.args[0]

            def run(launch=launch, pt=pt):
                streams.record(f"sum {li} parameter flows read weights", [(weights, slots([pt]), False)])
                launch()

            defer[k] = run

    def input_stats(layer, table, cache, fl, chunk_rows=0, after=None, lo=0, hi=None):
        i = input_of[id(layer)]
        rows = frozenset(range(lo, layer.num_nodes if hi is None else hi))
        streams.record(f"input {i} statistics read parameters", [(("input params", i), rows, False)])
        return real["input_stats"](layer, table, cache, fl, chunk_rows, after, lo, hi)

    def sum_em_update(table, params, param_flows, *args):
        s = slots(table.parts)
        streams.record(f"sum {layer_of[id(table)]} EM", [(weights, s, True), (flows, s, False)])
        real["sum_em_update"](table, params, param_flows, *args)

    def input_em_update(layer, table, step_size, pseudocount, lo=0, hi=None):
        i, rows = input_of[id(layer)], frozenset(range(lo, layer.num_nodes if hi is None else hi))
        streams.record(f"input {i} EM", [(("input params", i), rows, True), (("stats", i), rows, False)])
        real["input_em_update"](layer, table, step_size, pseudocount, lo, hi)

    for name, fn in dict(
        sum_backward=sum_backward,
        input_stats=input_stats,
        sum_em_update=sum_em_update,
        input_em_update=input_em_update,
    ).items():
        setattr(be, name, fn)
    flow_listener, stats_listener = pc.flow_listener, pc.stats_listener
    if not listening:
        pc.flow_listener = pc.stats_listener = None
        return

    def waited(event):
        return lambda: streams.wait(event)

    def on_step(step):
        flow_listener(step)
        return waited(streams.mark()) if step.layer.kind == "sum" else None

    def on_stats(i):
        rows, after = stats_listener(i)
        return rows, lambda a, b: (after(a, b), waited(streams.mark()))[1]

    pc.flow_listener, pc.stats_listener = on_step, on_stats


@pytest.mark.parametrize("listening", [False, True])
@pytest.mark.parametrize("name", ["hclt", "chain", "two_partitions"])
def test_every_update_waits_for_the_readers_and_writers_of_its_rows(name, listening, monkeypatch):
    """On the recording streams: each update writes weights (or input parameters) only after every
    read of them on another stream (element flows on main, parameter flows, statistics), reads flows
    and statistics only after they are final (and all-reduced, `listening`), and the join waits for it."""
    from engine.circuit import CompiledCircuit

    streams = RecordingEmStreams()
    monkeypatch.setattr(overlap_tests, "OVERLAP", ON)
    train_step = CompiledCircuit.train_step

    def step_instead(pc, x, missing=None, validate=True):  # record_flows_pass's step, with the update
        _record_updates(pc, streams, listening)
        return train_step(pc, x, missing, em=EM, zero_flows=False, validate=validate)

    monkeypatch.setattr(CompiledCircuit, "accumulate_flows", step_instead)
    overlap_tests.record_flows_pass(monkeypatch, *CASES[name](), streams)
    ops = {(n.split(" ", 2)[0] + " " + n.split(" ")[-1], s) for n, s, _, _ in streams.ops if n.endswith("EM")}
    if listening:  # behind the all-reduces' waits; the input's late rows too
        assert ("sum EM", "em") in ops and ("input EM", "em") in ops
    else:
        assert ("sum EM", "params") in ops and ("input EM", "main") in ops
    assert ("input EM", "params") in ops or name != "hclt" or listening  # HCLT: early rows' updates
    assert streams.violations() == []
    assert streams.alive_at_join is True


def test_a_step_that_fails_late_says_the_parameters_are_partly_updated():
    """The input statistics fail after the sum layers' in-pass updates: the error keeps its type and
    says that those layers keep this step's update (with the option off they are untouched)."""
    from tests.helpers import fail_on_call

    root, dists = overlap_tests.hclt_case()
    x, m = data(dists, 20)
    for opts in (OFF, ON):
        pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=opts)
        before = pc.params.clone()
        pc.backend.input_stats, _ = fail_on_call(pc.backend.input_stats, 1, "statistics failed")
        with pytest.raises(RuntimeError, match="statistics failed") as err:
            pc.train_step(x.long(), m, em=EM, validate=False)
        notes = "".join(getattr(err.value, "__notes__", []))
        if opts.em_in_pass:
            assert "em_in_pass" in notes and not torch.equal(before, pc.params)
        else:
            assert notes == "" and torch.equal(before, pc.params)


def test_input_updates_that_wait_for_a_stats_listener_run_on_a_forked_and_joined_stream():
    """A stats listener that returns waits, with no flow listener: the input rows' updates go to the
    `em` stream, which must start after the caller's stream and be joined back (else a race with the
    next step, or an unjoined stream in a CUDA graph)."""
    from contextlib import contextmanager

    from engine.executor.streams import FlowStreams

    log = []

    class Recording(FlowStreams):
        def __init__(self, device):
            super().__init__(device)
            self.recompute, self.params, self.em = "recompute", "params", "em"

        def fork(self):
            log.append("fork")
            self._em_forked = False

        def fork_em(self):
            log.append("fork_em")
            self._em_forked = True

        def join(self):
            log.append("join with em" if self._em_forked else "join")

        @contextmanager
        def on(self, stream):
            log.append(f"on {stream}")
            yield

        def mark(self):
            return None

        @staticmethod
        def wait(event):
            pass

    root, dists = overlap_tests.hclt_case()
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=ON)
    pc._flow_streams = Recording(pc.device)
    pc.stats_listener = lambda i: (0, lambda lo, hi: lambda: None)  # each range: a wait to honour
    x, m = data(dists, 20)
    pc.train_step(x.long(), m, em=EM, validate=False)
    assert "on em" in log and log.index("fork_em") < log.index("on em") and log[-1] == "join with em"
