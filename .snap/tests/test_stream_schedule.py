"""engine/executor/stream_schedule.py: the three-stream list schedule of a training step.

Checked on a small compiled plan with random step costs: each stream serial, every wait honoured,
the buffer-reuse rule, bounds against the one-stream sum and the main chain; and against an
independent reference: the launches and waits that `CompiledCircuit._flows_pass` itself
queues (recorded through a stand-in for FlowStreams) replayed as per-stream FIFO queues.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.compiler import compile_plan
from engine.dists import Categorical
from engine.executor import stream_schedule as ss
from engine.structures import hclt_from_tree

PATH_EDGES = np.array([[i, i + 1] for i in range(6)])  # a path of 7 variables: a chain of sum layers


def chain_root():
    return hclt_from_tree(PATH_EDGES, 7, 4, Categorical(3), root_var=0)  # rooted at an end: deepest


@pytest.fixture(scope="module")
def plan():
    p, _, _ = compile_plan(chain_root(), None, 0.5)
    assert len(p.sum_layers) >= 4  # enough for each element buffer to be reused
    return p


def random_ms(n: int, seed: int) -> list[float]:
    return list(np.random.default_rng(seed).uniform(0.01, 1.0, n))


def by_stream(slots):
    return {s: [x for x in slots if x.stream == s] for s in ss.STREAMS}


@pytest.mark.parametrize("seed", range(5))
def test_streams_are_serial_waits_are_honoured_and_bounds_hold(plan, seed):
    steps = plan.steps()
    ms = random_ms(len(steps), seed)
    slots = ss.three_streams(steps, ms)
    n_sum = sum(s.pass_name == "backward" and s.layer.kind == "sum" for s in steps)
    assert len(slots) == len(steps) + n_sum  # a sum layer's backward: main part + parameter flows
    for lane in by_stream(slots).values():
        for a, b in zip(lane, lane[1:]):
            assert b.start >= a.end - 1e-12  # one stream runs one step at a time, in queue order
    for x in slots:
        assert all(x.start >= slots[w].end - 1e-12 for w in x.waits)
        share = ss.PARAM_SHARE if x.part == ss.PARAMS else 1.0
        if x.kind == "sum" and x.part == "backward":
            share = 1.0 - ss.PARAM_SHARE  # node scale + element flows
        assert x.ms == pytest.approx(ms[x.step] * share)
    main = sum(x.ms for x in slots if x.stream == ss.MAIN)
    span = ss.makespan(slots)
    assert main - 1e-9 <= span <= sum(ms) + 1e-9
    assert ss.makespan(ss.one_stream(steps, ms)) == pytest.approx(sum(ms))
    assert span < sum(ms)  # random costs: some side work overlaps


def test_dependency_rules(plan):
    steps = plan.steps()
    slots = ss.three_streams(steps, random_ms(len(steps), 7))
    last_forward = max(i for i, x in enumerate(slots) if x.part == "forward")
    recomputes = [i for i, x in enumerate(slots) if x.part == "recompute"]
    mains = [i for i, x in enumerate(slots) if x.kind == "sum" and x.part == "backward"]
    params = [i for i, x in enumerate(slots) if x.part == ss.PARAMS]
    assert len(recomputes) == len(mains) == len(params) == len(plan.sum_layers)
    for j, (r, m, p) in enumerate(zip(recomputes, mains, params)):
        assert slots[r].stream == ss.RECOMPUTE and slots[p].stream == ss.PARAMS and slots[m].stream == ss.MAIN
        assert slots[m].layer == slots[p].layer == steps[slots[r].step].partner.index
        assert r in slots[m].waits  # the sum layer reads the element values recomputed for it
        assert m in slots[p].waits  # parameter flows need the layer's node scale
        assert slots[r].start >= slots[last_forward].end  # side streams fork after the forward
        if j >= 2:  # buffer reuse: wait for the last reader of the buffer, two sum layers up
            assert params[j - 2] in slots[r].waits
            assert slots[r].start >= slots[params[j - 2]].end
        else:
            assert slots[r].waits == (last_forward,)
    # slow parameter flows hold the recompute back through the buffer rule, not through the main chain
    ms = [1.0 if s.pass_name == "backward" and s.layer.kind == "sum" else 0.01 for s in steps]
    slots = ss.three_streams(steps, ms, param_share=0.9)
    r2 = [x for x in slots if x.part == "recompute"][2]
    p0 = [x for x in slots if x.part == ss.PARAMS][0]
    assert r2.start == pytest.approx(p0.end)


def test_bad_input_is_named(plan):
    steps = plan.steps()
    with pytest.raises(ValueError, match="one cost"):
        ss.three_streams(steps, [1.0])
    with pytest.raises(ValueError, match="step 3 has cost"):
        ss.three_streams(steps, [1.0] * 3 + [float("nan")] + [1.0] * (len(steps) - 4))
    with pytest.raises(ValueError, match="param_share"):
        ss.three_streams(steps, [1.0] * len(steps), param_share=1.5)


def _sum_steps(plan):
    return [
        s for s in plan.backward_steps(inputs=False) if s.layer.kind == "sum" and s.pass_name == "backward"
    ]


@pytest.mark.parametrize("latents", [16, 32])
def test_recompute_buffers_use_only_rows_whose_readers_are_done(latents):
    """Odd sum layers (top-down) take node-value rows only inside the rows of the sum layers at least
    two before (their last readers are waited for), the rest a spare as large as the largest of them;
    even ones the forward's element buffer."""
    root = hclt_from_tree(np.array([[v, v + 1] for v in range(15)]), 16, latents, Categorical(3), root_var=0)
    plan, _, _ = compile_plan(root, None, 0.5)
    b = ss.recompute_buffers(plan)
    sums = _sum_steps(plan)
    assert len(b.places) == len(b.starts) == len(b.rows) == len(sums)
    for j, (s, place, start, rows) in enumerate(zip(sums, b.places, b.starts, b.rows)):
        assert rows == s.partner.writes[2]
        assert (place == ss.ELEMENT) == (j % 2 == 0)
        if place == ss.NODE_ROWS:
            done = set()
            for t in sums[: j - 1]:
                done |= set(range(*t.layer.writes[1:]))
            assert set(range(start, start + rows)) <= done, (j, start, rows)
    spared = [r for p, r in zip(b.places, b.rows) if p == ss.SPARE]
    assert b.spare_rows == max(spared, default=0)
    assert ss.NODE_ROWS in b.places  # a path of 16 variables is deep enough
    off = ss.recompute_buffers(plan, node_rows=False)
    assert ss.NODE_ROWS not in off.places and off.spare_rows == max(b.rows[1::2])


def test_recompute_buffers_of_a_learnt_hclt_need_only_a_small_spare():
    """The memory point: in an HCLT learnt from data the product layers grow toward the bottom, and
    those large layers find room in node rows; the spare holds the top layers' rows only."""
    from engine.data import mnist_like

    x = mnist_like(2000)[:, 300:400].long() // 64
    plan, _, _ = compile_plan(
        engine.structures.hclt(x, 16, input_dist=Categorical(4), device="cpu"), None, 0.5
    )
    b = ss.recompute_buffers(plan)
    assert b.places[:2] == (ss.ELEMENT, ss.SPARE)
    assert b.spare_rows * 2 < max(b.rows) == plan.num_element_rows


def test_module_imports_without_torch():
    """Views import it: it must load where torch cannot be imported."""
    path = Path(ss.__file__)
    code = (
        "import sys, importlib.util; sys.modules['torch'] = None; "
        f"spec = importlib.util.spec_from_file_location('m', {str(path)!r}); "
        "m = sys.modules['m'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); print(m.STREAMS)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "param flows" in out.stdout
    assert importlib.util.find_spec("engine.executor.stream_schedule") is not None


# ------------------------------------------------------------- reference: what the engine queues


class RecordingStreams:
    """Stands in for FlowStreams: records each stream's launches and waits instead of running them."""

    def __init__(self, device, queues):
        self.device, self.queues = device, queues
        self.recompute, self.params, self.current = ss.RECOMPUTE, ss.PARAMS, ss.MAIN

    def _ops(self, stream):
        return sum(1 for q in self.queues[stream] if q[0] == "op")

    def fork(self):
        for s in (self.recompute, self.params):
            self.queues[s].append(("wait", (ss.MAIN, self._ops(ss.MAIN))))

    def join(self):
        pass

    @contextmanager
    def on(self, stream):
        prev, self.current = self.current, stream
        yield
        self.current = prev

    def mark(self):
        return (self.current, self._ops(self.current))

    def wait(self, event):
        if event is not None:
            self.queues[self.current].append(("wait", event))

    def launch(self, label):
        self.queues[self.current].append(("op", label))


def replay(queues, cost):
    """FIFO queues with waits on 'the first n launches of stream s' -> {label: (start, end)}."""
    t = dict.fromkeys(queues, 0.0)
    ends = {s: [] for s in queues}
    pos = dict.fromkeys(queues, 0)
    times, blocked = {}, dict.fromkeys(queues, 0.0)
    while any(pos[s] < len(q) for s, q in queues.items()):
        moved = False
        for s, q in queues.items():
            while pos[s] < len(q):
                what, arg = q[pos[s]]
                if what == "wait":
                    other, n = arg
                    if len(ends[other]) < n:
                        break  # not yet known: come back after the other stream moves
                    blocked[s] = max(blocked[s], ends[other][n - 1] if n else 0.0)
                else:
                    start = max(t[s], blocked[s])
                    t[s] = start + cost[arg]
                    ends[s].append(t[s])
                    times[arg] = (start, t[s])
                pos[s] += 1
                moved = True
        assert moved, "the recorded waits form a cycle"
    return times


def label(x: ss.Slot) -> tuple:
    """What a slot stands for: (layer, part), and an early statistics launch's last row."""
    return (x.layer, x.part) if x.rows is None else (x.layer, x.part, x.rows[1])


@pytest.mark.parametrize("early", [False, True], ids=["stats-at-end", "early-stats"])
@pytest.mark.parametrize("seed", range(3))
def test_model_matches_the_queues_the_engine_builds(seed, early, monkeypatch):
    pc = engine.compile(chain_root(), device="cpu", backend="torch")
    plan = pc.plan
    steps = plan.steps()
    ms = random_ms(len(steps), 100 + seed)
    queues = {s: [] for s in ss.STREAMS}
    rec = RecordingStreams(pc.device, queues)
    for s in plan.forward_steps():  # the forward is queued on the caller's stream before the fork
        rec.launch((s.layer.index, "forward"))

    def fake_step(step, *bufs_and_flags, stats_from=0):
        defer = bufs_and_flags[6] if len(bufs_and_flags) > 6 else None
        rec.launch((step.layer.index, step.pass_name))
        if defer is not None and step.layer.kind == "sum":
            defer.append(lambda i=step.layer.index: rec.launch((i, ss.PARAMS)))

    def fake_stats(i, node_flows, lo=0, hi=None):  # an early launch: the executor calls it directly
        rec.launch((plan.input_layers[i].index, ss.STATISTICS, hi))
        return hi

    monkeypatch.setattr(pc.backend, "early_stats", early)  # the Triton executor's default; torch's is off
    pc._flow_streams = rec
    pc._backward_step = fake_step
    pc._input_stats = fake_stats
    rows = plan.num_element_rows
    bufs = [torch.zeros(plan.num_node_rows, 2), torch.zeros(rows, 2)]
    pc._flows_pass(bufs[0], bufs[1], torch.zeros_like(bufs[0]), torch.zeros_like(bufs[1]), None, None)

    launches = ss.plan_early_stats(plan)
    assert bool(launches) and len(queues[ss.PARAMS]) > 0
    slots = ss.three_streams(steps, ms, early=launches if early else None)
    assert any(x.part == ss.STATISTICS for x in slots) == early
    cost = {label(x): x.ms for x in slots}
    times = replay(queues, cost)
    assert len(times) == len(slots)
    for x in slots:
        assert label(x) in times, f"the engine queued no {x.part} of layer {x.layer}"
        start, end = times[label(x)]
        assert x.start == pytest.approx(start) and x.end == pytest.approx(end)
        assert label(x) in [lab for op, lab in queues[x.stream] if op == "op"]


def test_per_step_param_shares(plan):
    steps = plan.steps()
    ms = random_ms(len(steps), 11)
    shares = list(np.random.default_rng(12).uniform(0, 1, len(steps)))
    slots = ss.three_streams(steps, ms, shares)
    for x in slots:
        if x.part == ss.PARAMS:
            assert x.ms == pytest.approx(ms[x.step] * shares[x.step])
        elif x.kind == "sum" and x.part == "backward":
            assert x.ms == pytest.approx(ms[x.step] * (1 - shares[x.step]))
    with pytest.raises(ValueError, match="param_share values"):
        ss.three_streams(steps, ms, shares[:-1])
    with pytest.raises(ValueError, match=r"got -0.5 \(step 2\)"):
        ss.three_streams(steps, ms, shares[:2] + [-0.5] + shares[3:])


# ------------------------------------------------------------- early input statistics


def early_of(plan) -> dict:
    return ss.plan_early_stats(plan)


def test_without_early_launches_the_slots_are_the_plain_three_streams(plan):
    steps = plan.steps()
    ms = random_ms(len(steps), 21)
    plain = ss.three_streams(steps, ms)
    assert ss.three_streams(steps, ms, early=None) == plain == ss.three_streams(steps, ms, early={})
    assert all(x.rows is None and x.part != ss.STATISTICS for x in plain)
    inputs = [x for x in plain if x.kind == "input" and x.part == "backward"]
    assert all(x.end == x.start + ms[x.step] for x in inputs)  # every statistic at the end, on main


@pytest.mark.parametrize("seed", range(5))
def test_early_statistics_follow_their_product_layer_on_the_param_stream(plan, seed):
    steps = plan.steps()
    ms = random_ms(len(steps), 30 + seed)
    early = early_of(plan)
    first = len(plan.forward_steps())
    slots = ss.three_streams(steps, ms, early=early)
    stats = [x for x in slots if x.part == ss.STATISTICS]
    assert len(stats) == sum(len(v) for v in early.values()) > 0
    for (p, launches), x in zip(
        ((p, la) for p, ls in sorted(early.items()) for la in ls), stats, strict=True
    ):
        after = slots[x.waits[0]]
        assert x.waits == (slots.index(after),) and (after.step, after.part) == (first + p, "backward")
        assert after.kind == "product" and after.stream == ss.MAIN
        assert x.stream == ss.PARAMS and x.start >= after.end - 1e-12
        i, lo, hi = launches
        n = plan.input_layers[i].num_nodes
        assert steps[x.step].layer is plan.input_layers[i] and x.rows == (lo, hi)
        assert x.ms == pytest.approx(ms[x.step] * (hi - lo) / n)
    for lane in by_stream(slots).values():
        for a, b in zip(lane, lane[1:]):
            assert b.start >= a.end - 1e-12  # the parameter-flows stream still runs in queue order
    # main's input step keeps only the rows not done early; the work is the same, split
    for x in (x for x in slots if x.kind == "input" and x.part == "backward"):
        moved = sum(y.rows[1] - y.rows[0] for y in stats if y.step == x.step)
        assert x.stream == ss.MAIN and x.ms == pytest.approx(
            ms[x.step] * (1 - moved / steps[x.step].layer.num_nodes)
        )
        assert moved > 0
    assert sum(x.ms for x in slots) == pytest.approx(sum(ms))
    # streams taken as not slowing each other: moving work off main costs at most the moved time
    # (the FIFO param stream may hold a later sum layer's parameter flows back by it) ...
    span, plain = ss.makespan(slots), ss.makespan(ss.three_streams(steps, ms))
    assert span <= plain + sum(x.ms for x in stats) + 1e-9
    assert span >= sum(x.ms for x in slots if x.stream == ss.MAIN) - 1e-9


def test_early_statistics_shorten_a_step_whose_input_statistics_weigh(plan):
    """HCLT-like costs (input statistics a large share of the step, side streams light): the rows
    done early leave the main chain, so the step ends sooner by about the moved time."""
    steps = plan.steps()
    for seed in range(20):
        ms = random_ms(len(steps), 50 + seed)
        ms = [
            10 * t if s.layer.kind == "input" and s.pass_name == "backward" else t for s, t in zip(steps, ms)
        ]
        slots = ss.three_streams(steps, ms, early=early_of(plan))
        plain = ss.makespan(ss.three_streams(steps, ms))
        moved = sum(x.ms for x in slots if x.part == ss.STATISTICS)
        assert ss.makespan(slots) < plain - 0.5 * moved


def test_bad_early_launches_are_named(plan):
    steps = plan.steps()
    ms = [1.0] * len(steps)
    n = plan.input_layers[0].num_nodes
    with pytest.raises(ValueError, match="backward step 1: not a product layer's backward"):
        ss.three_streams(steps, ms, early={1: [(0, 0, 1)]})  # step 1 is a sum layer's backward
    with pytest.raises(ValueError, match="backward step -1"):
        ss.three_streams(steps, ms, early={-1: [(0, 0, 1)]})
    with pytest.raises(ValueError, match="input layer 3: the steps have 1"):
        ss.three_streams(steps, ms, early={2: [(3, 0, 1)]})
    with pytest.raises(ValueError, match=rf"nodes \[0, {n + 1}\) of input layer 0 \({n} nodes\)"):
        ss.three_streams(steps, ms, early={2: [(0, 0, n + 1)]})
