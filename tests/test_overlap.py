"""Training steps' flows pass (`KernelOptions.overlap`, engine/executor/streams.py) and the in-place
node scale it relies on.

Training steps write each tiled sum partition's node scale over its own node-flow rows (contiguous
blocks), recompute product layers into two alternating element buffers, and run each sum layer's
parameter flows after the layer's critical-path kernels; the arithmetic is the same, so training is
bit-identical to the plain schedule. On the CPU (Triton interpreter) the schedule runs in program
order: these tests check the buffers, the deferral and the order the listener hears the layers in,
and a recording stand-in for the streams (RecordingStreams) checks the schedule's dependency graph:
every access to rows another stream touched waits for it. The GPU test checks the streams inside a
captured CUDA graph.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import weakref

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import engine  # noqa: E402
import engine.circuit as circuit_mod  # noqa: E402
import engine.kernels.backend as kernel_backend  # noqa: E402
from engine.compiler.plan import PAD_ROWS  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.executor.stream_schedule import ELEMENT, NODE_ROWS, recompute_buffers  # noqa: E402
from engine.executor.streams import FlowStreams  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.sum_block import BlockSumTensors  # noqa: E402
from engine.nodes import inputs, multiply, summate  # noqa: E402
from engine.structures import hclt_from_tree, pd  # noqa: E402
from tests.helpers import fail_on_call  # noqa: E402
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


def long_chain_case():
    """HCLT over a path of 16 variables, 32 latents: deep enough that the 6th and 8th sum layers
    (top-down) are recomputed into node-value rows of the layers above (`recompute_buffers`)."""
    edges = np.array([[v, v + 1] for v in range(15)])
    return hclt_from_tree(edges, 16, 32, Categorical(5)), [Categorical(5)] * 16


CASES = {
    "hclt": hclt_case,
    "pd": pd_case,
    "two_partitions": two_partition_case,
    "chain": chain_case,
    "long_chain": long_chain_case,
}


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


@pytest.mark.parametrize("name", ["chain", "long_chain"])
def test_recompute_buffers_follow_their_places(name):
    """Consecutive sum layers alternate between the forward's element buffer and a second one: the
    spare, or (long chains) node-value rows of sum layers above, as `recompute_buffers` places them,
    with their -inf padding rows written."""
    root, dists = CASES[name]()
    (x, m), _ = batches_for(dists)
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OVERLAP)
    places = recompute_buffers(pc.plan)
    used = []
    real = pc.backend.sum_backward

    def spy(table, params, element_mars, node_mars, *rest, **kw):
        first = (element_mars.storage_offset() - node_mars.storage_offset()) // node_mars.stride(0)
        same = element_mars.untyped_storage().data_ptr() == node_mars.untyped_storage().data_ptr()
        pads = element_mars[:PAD_ROWS]
        used.append((element_mars.data_ptr(), same, first, bool(torch.isneginf(pads).all())))
        return real(table, params, element_mars, node_mars, *rest, **kw)

    pc.backend.sum_backward = spy
    pc.accumulate_flows(x, m, validate=False)
    assert len(used) == len(pc.plan.sum_layers) == len(places.places)
    assert all(a[0] != b[0] for a, b in zip(used, used[1:])), used
    assert len({u[0] for u, p in zip(used, places.places) if p == ELEMENT}) == 1
    for (_, in_nodes, first, padded), place, start in zip(used, places.places, places.starts):
        assert in_nodes == (place == NODE_ROWS) and padded
        if place == NODE_ROWS:
            assert first == start
    assert (NODE_ROWS in places.places) == (name == "long_chain"), places


@pytest.mark.parametrize("opts", [OVERLAP, PLAIN])
def test_a_training_pass_uses_up_the_forward_values(opts):
    """The overlapped pass recomputes into node-value rows already read, so after accumulate_flows the
    forward's values are gone: a second flows pass must ask for a new forward, not answer from them
    (on every schedule alike); after a new forward the flows are right again."""
    root, dists = CASES["long_chain"]()
    (x, m), _ = batches_for(dists)
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=opts)
    pc.accumulate_flows(x, m, validate=False)
    with pytest.raises(RuntimeError, match="call forward before backward_flows"):
        pc.backward_flows(accumulate_params=False)
    ref = engine.compile(copy.deepcopy(root), device=DEVICE, backend="torch").double()
    ref.forward(x, m)
    pc.forward(x, m)
    assert rel(ref.backward_flows(accumulate_params=False), pc.backward_flows(accumulate_params=False)) < 1e-4


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


ALL = object()  # an access to every buffer: the work queued before the pass and after it


class RecordingStreams:
    """FlowStreams' interface on the CPU, recording instead of ordering: each launch is an op on the
    stream current at the time (main, recompute, params) with the buffer rows it reads and writes, and
    fork / join / mark / wait move vector clocks as CUDA's stream waits and events would. `violations`
    then lists every pair of conflicting ops on different streams (same rows, one writes) where the
    later one in program order does not wait for the earlier: the races a GPU would have, found on the
    CPU. `ignore` drops the waits queued on one stream (to check that the check sees the difference)."""

    STREAMS = ("main", "recompute", "params")

    def __init__(self, ignore: str | None = None):
        self.device, self.ignore = None, ignore  # the device: the circuit's (record_flows_pass)
        self.recompute, self.params = "recompute", "params"
        self.clock = {s: {s: 0} for s in self.STREAMS}
        self.current = "main"
        self.ops: list = []  # (name, stream, clock after the op, [(buffer key, rows or None, writes)])
        self.deferred: list = []  # weak references to the deferred launches
        self.alive_at_join: bool | None = None
        self.forked = False

    def record(self, name, accesses) -> None:
        if not self.forked:  # the forward's launches: "before the pass" stands for them
            return
        c = self.clock[self.current]
        c[self.current] += 1
        self.ops.append((name, self.current, dict(c), accesses))

    def _merge(self, stream, clock) -> None:
        c = self.clock[stream]
        for s, n in clock.items():
            c[s] = max(c.get(s, 0), n)

    def fork(self) -> None:
        self.forked = True
        self.record("before the pass", [(ALL, None, True)])  # the forward, the buffers' fills
        for s in (self.recompute, self.params):
            self._merge(s, self.clock["main"])

    def join(self) -> None:
        for s in (self.recompute, self.params):
            self._merge("main", self.clock[s])
        self.alive_at_join = all(ref() is not None for ref in self.deferred)

    @contextlib.contextmanager
    def on(self, stream):
        before, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = before

    def mark(self):
        return dict(self.clock[self.current])

    def wait(self, event) -> None:
        if event is not None and self.current != self.ignore:
            self._merge(self.current, event)

    def violations(self) -> list[tuple[str, str]]:
        def conflict(a, b):
            for ka, ra, wa in a:
                for kb, rb, wb in b:
                    same = ka is ALL or kb is ALL or ka == kb
                    rows = ra is None or rb is None or bool(ra & rb)
                    if same and rows and (wa or wb):
                        return True
            return False

        out = []
        for i, (na, sa, ca, aa) in enumerate(self.ops):
            for nb, sb, cb, ab in self.ops[i + 1 :]:
                if sa != sb and cb.get(sa, 0) < ca[sa] and conflict(aa, ab):
                    out.append((na, nb))
        return out


class _Deferred:
    """A deferred parameter-flow launch that records itself when run (weakly referenced)."""

    def __init__(self, launch, record):
        self.launch, self.record = launch, record

    def __call__(self):
        self.record()
        self.launch()


def record_flows_pass(monkeypatch, root, dists, streams=None, scattered=False) -> RecordingStreams:
    """One training step's flows pass on a recording stand-in for the streams: every backend launch and
    every listener call recorded with the rows it touches (engine.compiler.plan Layer.writes).
    `scattered`: every node block treated as non-contiguous (nothing deferred)."""
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OVERLAP)
    for pt in block_partitions(pc) if scattered else ():
        pt.rows_start = -1
    streams = pc._flow_streams = streams or RecordingStreams()
    streams.device = pc.device  # the circuit keeps streams made for its device
    layer_of = {id(t): i for i, t in enumerate(pc.tables.layers) if t is not None}
    be = pc.backend

    def key(t):
        return t.untyped_storage().data_ptr()

    def rows(layer_index, t=None, pads=False):
        """The rows a layer writes; with `t` (a view), as rows of t's storage (element buffers may be
        node-value rows: accesses meet there); `pads`: from row 0 (the -inf rows written with it)."""
        _, lo, hi = pc.plan.layers[layer_index].writes
        first = 0 if t is None else t.storage_offset() // t.stride(0)
        return frozenset(range(first + (0 if pads else lo), first + hi))

    def reads(layer_index, t):  # the node-value rows a product layer reads (a range around them)
        _, lo, hi = pc.plan.layers[layer_index].reads
        first = t.storage_offset() // t.stride(0)
        return frozenset(range(first + lo, first + hi))

    def slots(parts):
        return frozenset(i for p in parts for i in range(p.param_offset, p.param_offset + p.num_params))

    def view_rows(view, base):  # the node-flow rows a scale slab covers
        first = (view.storage_offset() - base.storage_offset()) // base.stride(0)
        return frozenset(range(first, first + view.shape[0]))

    real = {n: getattr(be, n) for n in ("prod_forward", "sum_backward", "prod_backward", "input_stats")}

    def prod_forward(table, node_mars, element_mars):
        li = layer_of[id(table)]
        acc = [
            (key(element_mars), rows(li, element_mars, pads=True), True),
            (key(node_mars), reads(li, node_mars), False),
        ]
        streams.record("recompute", acc)
        real["prod_forward"](table, node_mars, element_mars)

    def sum_backward(table, params, em, nm, nf, ef, pf, keep_node_flows=True, defer=None):
        li = layer_of[id(table)]
        mine: list = []
        real["sum_backward"](table, params, em, nm, nf, ef, pf, keep_node_flows, mine)
        later = [d.args[0] for d in mine]
        streams.record(
            f"sum {li} element flows",
            [
                (key(em), rows(li - 1, em), False),
                (key(nm), rows(li, nm), False),
                (key(nf), rows(li), True),  # node flows in, the scale over them
                (key(ef), rows(li - 1), True),
                (key(pf), slots([p for p in table.parts if all(p is not q for q in later)]), True),
            ],
        )
        for d in mine:
            pt, scale = d.args[0], d.args[3]
            acc = [(key(em), rows(li - 1, em), False), (key(nf), view_rows(scale, nf), False)]
            acc.append((key(pf), slots([pt]), True))
            run = _Deferred(d, lambda acc=acc: streams.record(f"sum {li} parameter flows", acc))
            streams.deferred.append(weakref.ref(run))
            defer.append(run)

    def prod_backward(table, ef, nf):
        li = layer_of[id(table)]
        written = frozenset(table.flow_rows.tolist())
        streams.record(f"product {li} flows", [(key(ef), rows(li), False), (key(nf), written, True)])
        real["prod_backward"](table, ef, nf)

    def input_stats(layer, table, cache, flows, chunk_rows=0, after=None, lo=0, hi=None):
        i = next(j for j, inp in enumerate(pc.input_layers) if inp is layer)
        first = flows.storage_offset() // flows.stride(0)  # a row slice of node flows

        def launched(a, b):  # each launch recorded with the nodes [a, b) it reads and writes, in order
            acc = [
                (key(flows), frozenset(range(first + a, first + b)), False),
                (("stats", i), frozenset(range(a, b)), True),
            ]
            streams.record(f"input {i} statistics {a}:{b}", acc)
            if after is not None:
                after(a, b)

        return real["input_stats"](layer, table, cache, flows, chunk_rows, launched, lo, hi)

    for name, fn in dict(
        prod_forward=prod_forward,
        sum_backward=sum_backward,
        prod_backward=prod_backward,
        input_stats=input_stats,
    ).items():
        monkeypatch.setattr(be, name, fn)

    def listener(step):  # an all-reduce of the layer's flows, queued on the current stream
        li = step.layer.index
        if step.layer.kind == "sum" and step.pass_name == "backward":
            streams.record(
                f"all-reduce {li}", [(key(pc.param_flows), slots(pc.tables.layers[li].parts), False)]
            )

    def stats_ranges(i):  # the reducer's question: each range of statistics all-reduced once queued
        def reduce(a, b):
            streams.record(
                f"all-reduce statistics {i} {a}:{b}", [(("stats", i), frozenset(range(a, b)), False)]
            )

        return 0, reduce

    pc.flow_listener = listener
    pc.stats_listener = stats_ranges
    (x, m), _ = batches_for(dists)
    pc.zero_flows()
    pc.accumulate_flows(x, m, validate=False)
    streams.record("after the pass (EM, the next step)", [(ALL, None, True)])
    return streams


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_cross_stream_access_waits_for_the_one_before(name, monkeypatch):
    """The dependency graph of the three-stream schedule: every read of rows another stream wrote, and
    every write of rows another stream read or wrote, waits (through events, fork or join) for that
    access; the deferred launches are alive until the join."""
    streams = record_flows_pass(monkeypatch, *CASES[name]())
    kinds = {s for _, s, _, _ in streams.ops}
    assert kinds == set(RecordingStreams.STREAMS), kinds
    assert any("parameter flows" in n for n, *_ in streams.ops)
    assert streams.violations() == []
    assert streams.alive_at_join is True


def test_scattered_blocks_all_reduce_after_their_main_stream_flows(monkeypatch):
    """Nothing deferred (scattered node blocks): the parameter flows run on the main stream, and the
    all-reduce queued on the parameter-flow stream must still wait for them."""
    streams = record_flows_pass(monkeypatch, *CASES["hclt"](), scattered=True)
    assert not any("parameter flows" in n for n, *_ in streams.ops)
    assert any(n.startswith("all-reduce") and s == "params" for n, s, *_ in streams.ops)
    assert streams.violations() == []


@pytest.mark.parametrize("ignore", ["main", "recompute", "params"])
def test_the_dependency_check_sees_a_missing_wait(ignore, monkeypatch):
    """The check above is not vacuous: dropping the waits of any one stream leaves races it reports."""
    streams = record_flows_pass(monkeypatch, *CASES["chain"](), RecordingStreams(ignore))
    assert streams.violations(), ignore


def test_the_dependency_check_sees_a_recompute_into_rows_still_read(monkeypatch):
    """Node-value rows are a recompute buffer only once their readers are done: placing the recompute
    of a sum layer over the rows of the layer just above it (whose backward may still be reading them)
    is a race the check reports; the real places have none (test above)."""
    real = circuit_mod.recompute_buffers

    def too_early(plan, node_rows=True):
        places = real(plan, node_rows)
        sums = [
            s.layer
            for s in plan.backward_steps(inputs=False)
            if s.layer.kind == "sum" and s.pass_name == "backward"
        ]
        starts = [
            sums[j - 1].writes[1] if p == NODE_ROWS else st
            for j, (p, st) in enumerate(zip(places.places, places.starts))
        ]
        return dataclasses.replace(places, starts=tuple(starts))

    monkeypatch.setattr(circuit_mod, "recompute_buffers", too_early)
    streams = record_flows_pass(monkeypatch, *CASES["long_chain"]())
    assert any(a.startswith("sum") and b == "recompute" for a, b in streams.violations()), (
        streams.violations()
    )


def test_a_launch_that_raises_still_joins_the_side_streams(monkeypatch):
    """An error mid-pass (compile error, out of memory, Ctrl-C) must not free the spare buffer or a
    deferred launch's scale and `mus` while a side stream may still use them: the pass joins first."""
    root, dists = CASES["chain"]()
    failing, calls = fail_on_call(kernel_backend.product.prod_backward, 3)
    monkeypatch.setattr(kernel_backend.product, "prod_backward", failing)
    streams = RecordingStreams()
    with pytest.raises(RuntimeError, match="launch failed"):
        record_flows_pass(monkeypatch, root, dists, streams)
    assert calls["n"] == 3 and streams.ops[-1][0] != "after the pass (EM, the next step)"
    assert streams.deferred and streams.alive_at_join is True


class DelayedStreams(FlowStreams):
    """FlowStreams with one stream slowed down: `slow` ("main", "recompute" or "params") sleeps about
    `cycles` GPU cycles before each of its blocks (main: before each event it records). A wait the
    schedule forgot then lets the other streams run ahead of it, and the numbers change."""

    def __init__(self, device, slow: str, cycles: int = 1_000_000):
        super().__init__(device)
        self.slow, self.cycles = slow, cycles

    @contextlib.contextmanager
    def on(self, stream):
        with super().on(stream):
            if stream is not None and stream is getattr(self, self.slow, None):
                torch.cuda._sleep(self.cycles)
            yield

    def mark(self):
        if self.cuda and self.slow == "main":
            current = torch.cuda.current_stream()
            if current != self.recompute and current != self.params:
                torch.cuda._sleep(self.cycles)
        return super().mark()


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_overlap_gpu_with_one_slow_stream_is_bit_identical(graph):
    """Each stream slowed down in turn (eager steps and a captured graph): EM steps on three streams
    still give the one-stream parameters bit for bit, so no read or reuse of a buffer outruns its writer."""
    from engine.data import mnist_like
    from engine.kernels.graph import CapturedStep
    from tests.kernel_runner import gpu_cases

    mnist = mnist_like(2048)
    root, _ = gpu_cases(mnist)["hclt64_mnist"]

    def trained(opts, slow=None):
        pc = engine.compile(copy.deepcopy(root), device="cuda", kernel_options=opts)
        if slow is not None:
            pc._flow_streams = DelayedStreams(pc.device, slow)
        step = CapturedStep(pc, 512, em=(0.1, 0.1), enabled=graph)
        for i in range(4):
            step(mnist[i * 512 : (i + 1) * 512].cuda())
        assert step.captured == graph, step.failed
        torch.cuda.synchronize()
        assert slow is None or isinstance(pc._flow_streams, DelayedStreams)  # kept, not remade
        return pc.params.clone(), pc.input_params(0).clone(), step.ll_sum.item()

    ref = trained(KernelOptions(overlap=False))
    for slow in ("main", "recompute", "params"):
        got = trained(KernelOptions(), slow)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1]), slow
        assert ref[2] == got[2], slow


def nccl_rank_hclt(rank, port):
    """Join a two-rank NCCL group as `rank` (one GPU each); returns the data `[2048, 64]` and an HCLT-32
    on it, the same on both ranks (the GPU tests of this file and test_em_in_pass_gpu)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    from engine import distributed
    from engine.structures import hclt

    distributed.join("cuda")
    x = torch.randint(0, 256, (2048, 64), generator=torch.Generator().manual_seed(0))
    return x, hclt(x, 32, input_dist=Categorical(256))


def fit_two_ranks(pc, x) -> dict:
    """Two data-parallel epochs of `fit` on this rank; its parameters and graph replays (CPU)."""
    from engine import optim

    sched = optim.EMSchedule(batch_size=128, step_size=0.5, final_step_size=0.1, full_batch_epochs=1)
    hist = optim.fit(
        pc, x, epochs=2, schedule=sched, generator=torch.Generator().manual_seed(1), distributed=True
    )
    return {
        "params": pc.params.cpu(),
        "inputs": pc.input_params(0).cpu(),
        "replays": hist[-2].get("graph_batches") if hist else None,
    }


def _nccl_slow_params_worker(rank, port, out):
    """One rank of `test_two_gpus_slow_parameter_stream_trains_like_one_stream`."""
    import torch.distributed as dist

    x, root = nccl_rank_hclt(rank, port)
    results = {}
    for slow in (None, "params", "main"):
        opts = KernelOptions(overlap=slow is not None)
        pc = engine.compile(copy.deepcopy(root), device="cuda", kernel_options=opts)
        if slow is not None:
            pc._flow_streams = DelayedStreams(pc.device, slow)
        results[slow] = fit_two_ranks(pc, x)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_two_gpus_slow_parameter_stream_trains_like_one_stream(tmp_path):
    """NCCL all-reduces of sum layers' flows are queued on the parameter-flow stream (FlowReducer's
    listener): with that stream (or the main one) slowed down, 2-GPU EM in CUDA graphs still trains
    bit-identically to the one-stream flows pass, so no bucket is sent before its flows are final."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_nccl_slow_params_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for slow in (None, "params", "main"):
        assert torch.equal(r0[slow]["params"], r1[slow]["params"]), slow  # the ranks agree
        assert r0[slow]["replays"], slow  # the all-reduces ran inside CUDA graphs
        assert torch.equal(r0[slow]["params"], r0[None]["params"]), slow
        assert torch.equal(r0[slow]["inputs"], r0[None]["inputs"]), slow
