"""The training driver (`engine.optim.fit`) against the plain eager EM loop it replaces.

The reference loop below is the textbook one: per batch zero flows, forward + flows, EM step, the
batches drawn from the same permutation. The driver must follow the same trajectory exactly on
the CPU, whatever its event pacing, data placement (resident or streamed) or tail handling.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import irregular

import engine
from engine import optim
from engine.feed import DataFeed, narrowest_exact
from engine.training import TrainConfig, check_output_path, json_line, run_training

BS = 64


def _data(n=300, seed=1):
    return torch.randint(0, 3, (n, 5), generator=torch.Generator().manual_seed(seed))


def _reference(pc, x, epochs, schedule, seed, stop_after=None):
    """The plain loop: returns per-epoch pass LLs; stops after `stop_after` batches if given."""
    g = torch.Generator().manual_seed(seed)
    lls, done = [], 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(x.shape[0], generator=g)
        stop = x.shape[0] // schedule.batch_size * schedule.batch_size if schedule.drop_last else x.shape[0]
        total, seen = 0.0, 0
        for i in range(0, stop, schedule.batch_size):
            if stop_after is not None and done == stop_after:
                return lls
            idx = order[i : i + schedule.batch_size]
            pc.zero_flows()
            total += pc.accumulate_flows(x[idx], validate=False).double().sum().item()
            pc.em_step(schedule.step_at(epoch, epochs), schedule.pseudocount)
            seen, done = seen + len(idx), done + 1
        lls.append(total / seen)
    return lls


def _pair():
    root = irregular()
    return engine.compile(copy.deepcopy(root)), engine.compile(copy.deepcopy(root))


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("budget", [None, 0])  # resident, and streamed in small chunks
def test_fit_follows_the_plain_em_loop_exactly(drop_last, budget):
    x = _data()  # 300 rows: a 44-row tail at batch 64
    sched = optim.EMSchedule(
        batch_size=BS, step_size=0.8, final_step_size=0.2, full_batch_epochs=0, drop_last=drop_last
    )
    ours, ref = _pair()
    hist = optim.fit(
        ours,
        x,
        epochs=3,
        schedule=sched,
        generator=torch.Generator().manual_seed(7),
        data_budget_bytes=budget,
    )
    want = _reference(ref, x, 3, sched, seed=7)
    assert [h["pass_ll"] for h in hist] == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert torch.equal(ours.params, ref.params)
    assert torch.equal(ours.input_params(0), ref.input_params(0))
    assert all(h["phase"] == "minibatch" and h["epochs"] == 3 for h in hist)


def test_streamed_feed_yields_the_rows_in_order_across_chunks():
    x = torch.arange(50 * 3).reshape(50, 3)
    feed = DataFeed(x, torch.device("cpu"), budget_bytes=0, chunk_bytes=7 * 3 * 8)  # 7-row chunks: 1 batch
    assert feed.streamed
    order = torch.randperm(50)
    got = torch.cat([b.clone() for b in feed.batches(order, 6)])
    assert torch.equal(got, x[order])
    assert torch.cat([b.clone() for b in feed.batches(order, 6, drop_last=True)]).shape[0] == 48


def test_narrowest_exact_keeps_values():
    assert narrowest_exact(torch.tensor([[0, 255]])).dtype == torch.uint8
    assert narrowest_exact(torch.tensor([[-1, 300]])).dtype == torch.int16
    assert narrowest_exact(torch.tensor([[0, 1 << 20]])).dtype == torch.int32
    assert narrowest_exact(torch.tensor([[0.5]], dtype=torch.float64)).dtype == torch.float32


def test_full_batch_epochs_match_flows_of_the_whole_set():
    x = _data(200)
    ours, ref = _pair()
    hist = optim.fit(
        ours, x, epochs=0, schedule=optim.EMSchedule(batch_size=BS, full_batch_epochs=2, pseudocount=0.05)
    )
    for h in hist:
        ref.zero_flows()
        ll = sum(ref.accumulate_flows(x[i : i + BS]).double().sum().item() for i in range(0, 200, BS)) / 200
        ref.em_step(1.0, 0.05)
        assert h["pass_ll"] == pytest.approx(ll, rel=1e-12) and h["phase"] == "full_batch"
    assert torch.equal(ours.params, ref.params)


def test_batch_events_are_periodic_and_add_up_to_the_pass():
    x = _data(640)  # 10 batches
    pc, _ = _pair()
    every, sparse = [], []
    sched = optim.EMSchedule(batch_size=BS, full_batch_epochs=0)
    optim.fit(pc, x, epochs=1, schedule=sched, callback=every.append, event_interval_s=0.0)
    batches = [e for e in every if e["type"] == "batch"]
    assert [e["batch"] for e in batches] == list(range(1, 11))
    assert sum(e["ll"] for e in batches) / 10 == pytest.approx(every[-1]["pass_ll"], rel=1e-9)
    optim.fit(pc, x, epochs=2, schedule=sched, callback=sparse.append, event_interval_s=3600.0)
    # an hour between events: only each epoch's last batch reports (that sync ends the epoch anyway)
    assert [(e["epoch"], e["batch"]) for e in sparse if e["type"] == "batch"] == [(1, 10), (2, 10)]


def test_pause_is_not_epoch_time_and_stop_ends_mid_epoch(monkeypatch):
    x = _data(640)
    sched = optim.EMSchedule(batch_size=BS, step_size=0.5, final_step_size=0.5, full_batch_epochs=0)
    clock = {"t": 0.0, "calls": 0}

    def fake_clock() -> float:  # 1 ms per reading; a pause jumps it by 100 s
        clock["t"] += 1e-3
        return clock["t"]

    def pause_once() -> bool:
        clock["calls"] += 1
        if clock["calls"] == 3:
            clock["t"] += 100.0  # a paused gate blocks inside should_stop
        return False

    monkeypatch.setattr(optim.time, "perf_counter", fake_clock)
    pc, _ = _pair()
    hist = optim.fit(pc, x, epochs=1, schedule=sched, should_stop=pause_once)
    assert hist[0]["paused_seconds"] >= 100.0 and hist[0]["seconds"] < 1.0
    monkeypatch.undo()

    ours, ref = _pair()
    calls = {"n": 0}

    def stop_at_4() -> bool:
        calls["n"] += 1
        return calls["n"] > 4  # batches 1-4 run, the 5th is never started

    hist = optim.fit(
        ours, x, epochs=2, schedule=sched, should_stop=stop_at_4, generator=torch.Generator().manual_seed(3)
    )
    _reference(ref, x, 2, sched, seed=3, stop_after=4)
    assert hist == [] and torch.equal(ours.params, ref.params)


def test_evaluation_is_not_profiled_and_cpu_runs_replay_no_graphs():
    x = _data(640)  # 10 training batches
    pc, _ = _pair()
    pc.profile(True, interval_s=0.0)  # every training batch
    events = []
    hist = optim.fit(
        pc,
        x,
        x[:128],
        epochs=1,
        schedule=optim.EMSchedule(batch_size=BS, full_batch_epochs=0),
        callback=events.append,
    )
    forward = [e for e in events if e["type"] == "layer_time" and e["pass"] == "forward"]
    assert len(forward) == 10 * len({e["layer"] for e in forward})  # train + valid evaluation: not counted
    assert hist[0]["graph_batches"] == 0


def test_profiler_does_not_retake_a_sampling_decision_on_skipped_batches():
    from engine.profiler import LayerProfiler

    prof = LayerProfiler(torch.device("cpu"), interval_s=3600.0)
    assert prof.next_is_sampled() and prof.start_batch()
    sampled_at = prof._last_sampled
    for _ in range(3):
        prof.skip_batch()
    assert prof.batches == 4 and not prof.active and prof._last_sampled == sampled_at


def test_fit_refuses_an_empty_training_set():
    with pytest.raises(ValueError, match="no rows"):
        optim.fit(_pair()[0], _data(10)[:0], epochs=1)


def test_empty_splits_report_no_log_likelihood():
    x = _data(200)
    hist = optim.fit(
        _pair()[0], x, x[:0], x[:0], epochs=1, schedule=optim.EMSchedule(batch_size=BS, full_batch_epochs=0)
    )
    assert hist[0]["valid_ll"] is None and hist[0]["test_ll"] is None and hist[0]["train_ll"] < 0


def test_non_finite_training_stops_with_a_clear_error():
    x = _data(200)
    with pytest.raises(ValueError, match="pseudocount"):
        optim.fit(_pair()[0], x, epochs=1, schedule=optim.EMSchedule(pseudocount=math.nan))
    pc, _ = _pair()
    pc.params.fill_(math.nan)
    with pytest.raises(optim.NonFiniteError, match="diverged"):
        optim.fit(pc, x, epochs=1, schedule=optim.EMSchedule(batch_size=BS, full_batch_epochs=0))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_finiteness_check_finds_one_bad_value(bad):
    t = torch.rand(4096, 3)
    assert optim.all_finite(t) and optim.all_finite(t[:0])
    t[1234, 2] = bad
    assert not optim.all_finite(t) and not optim.all_finite(t.double()) and not optim.all_finite(t.T)
    pc, _ = _pair()
    pc.input_params(0)[0, 0] = bad
    with pytest.raises(optim.NonFiniteError, match="input layer 0 parameters"):
        optim.check_finite_parameters(pc, 3)


def test_evaluation_keeps_no_step_buffers_between_epochs():
    """An evaluation batch needs no flows: its node values (an eager tail batch's on a GPU) must not stay
    alive under the next epoch's training steps (they were that epoch's memory peak)."""
    x = _data(200)  # batches of BS and a tail: the tail runs eagerly
    pc, _ = _pair()
    seen = []
    optim.fit(
        pc,
        x,
        epochs=2,
        schedule=optim.EMSchedule(batch_size=BS, full_batch_epochs=0),
        callback=lambda e: seen.append(pc._mars) if e["type"] == "epoch" else None,
    )
    assert len(seen) == 2 and all(m is None for m in seen)
    assert optim.evaluate(pc, x, BS) < 0 and pc._mars is None


def test_profiler_interval_sampling_is_time_based():
    x = _data(640)
    pc, _ = _pair()
    prof = pc.profile(True, interval_s=3600.0)  # only the first batch of the run is timed
    events = []
    optim.fit(
        pc, x, epochs=2, schedule=optim.EMSchedule(batch_size=BS, full_batch_epochs=0), callback=events.append
    )
    forward_spans = [e for e in events if e["type"] == "layer_time" and e["pass"] == "forward"]
    layers_per_batch = len({e["layer"] for e in forward_spans})
    # 20 training batches counted (evaluation is not profiled), only the first one timed
    assert prof.batches == 20 and len(forward_spans) == layers_per_batch
    pc.profile(True, interval_s=0.0)  # every batch
    events.clear()
    optim.minibatch_em_epoch(pc, x, batch_size=BS, callback=events.append)
    assert (
        len([e for e in events if e["type"] == "layer_time" and e["pass"] == "forward"])
        == 10 * layers_per_batch
    )


def test_run_training_checks_the_output_path_before_training(tmp_path):
    from engine.data import load_dataset

    ds = load_dataset("nltcs")
    root = engine.structures.hclt(ds.train[:200], num_latents=2, input_dist=engine.dists.Categorical(2))
    trained = []
    with pytest.raises(OSError, match="folder"):
        run_training(root, ds, TrainConfig(epochs=1), callback=trained.append, out=tmp_path)
    assert trained == []  # refused before the first batch
    with pytest.raises(OSError, match="folder"):
        check_output_path(tmp_path)


def test_json_line_writes_null_for_non_finite_values():
    line = json_line({"type": "epoch", "ll": math.nan, "nested": {"x": math.inf}, "ok": 1.5})
    assert json.loads(line) == {"type": "epoch", "ll": None, "nested": {"x": None}, "ok": 1.5}
