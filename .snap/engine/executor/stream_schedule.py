"""When each step of a training step runs on three CUDA streams: the rule of engine/executor/streams.py
as a list schedule, with no torch, for the engine's docs and the workbench's Schedule tab.

`CompiledCircuit._flows_pass` queues a training step's flows pass on three streams:
- **main**: the forward, then top-down per sum layer its node scale and element flows (the part of
  the sum layer's backward that the layer below waits for), the product layer's backward, and at the
  end the input layers' statistics;
- **recompute**: each product layer recomputed *ahead* into one of two element-value buffers,
  alternating per sum layer; the recompute for the i-th sum layer (top-down) reuses the buffer of
  sum layer i-2, so it waits for that layer's parameter flows (its last reader, queued after its
  element flows);
- **param flows**: each sum layer's parameter flows *behind*, once its node scale is written.
The side streams start after the forward (the fork) and the step ends when all three are done (the
join). A step starts when its stream is free and what it waits for is done: each stream runs its
steps in queue order, like the GPU does. Streams are assumed not to slow each other (HCLT's small
layers leave most SMs idle), so the makespan is a lower bound of the overlapped step.

Profiled batches, `backward_flows()` and the CPU executor run the plain one-stream order instead
(`one_stream`): each step after the previous one.

A sum layer's backward is one step in the plan (and one measured span), so its time is split: a
fraction `param_share` is the parameter flows, the rest node scale + element flows. Default 1/2 by
FLOPs: element flows and parameter flows each do one tile matmul per weight per example (node scale
is per node, not per weight: small beside either).

Early input statistics (`early_stats`, the Triton executor's default): right after the product
layer's backward that finished some input rows' flows, main records an event and the parameter-flows
stream waits for it and computes those rows' statistics; the input layer's own step at the end of
the pass does only the rest. Its time is split by rows: a launch of `hi - lo` of the layer's `n`
nodes costs `(hi - lo) / n` of the input step's time (the statistics are per node and example).
That shortens the main chain, but the parameter-flows stream runs in queue order: a launch queued
before a later sum layer's parameter flows holds them back (and, through the buffer rule, a
recompute), so the step may end later, by at most the time moved.

EM updates inside the pass (`KernelOptions.em_in_pass`, `streams.PassEM`) are not steps of the plan
and are not drawn here: each sum layer's update is queued on the parameter-flows stream right after
its parameter flows, each early statistics range's after that range, the rest at the end of main
(data-parallel: on a fourth stream behind each all-reduce). The makespan above leaves them out, as
it leaves out the update after the pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # no engine import at run time: importable without torch
    from engine.compiler.plan import Step

MAIN, RECOMPUTE, PARAMS = "main", "recompute", "param flows"
STATISTICS = "statistics"  # the part name of an input layer's statistics computed early
STREAMS = (MAIN, RECOMPUTE, PARAMS)
PARAM_SHARE = 0.5  # parameter flows' share of a sum layer's backward (FLOPs: one matmul of two)
NUM_ELEMENT_BUFFERS = 2  # element-value buffers the recompute alternates between


EARLY_STATS_PARTS = 8  # an early statistics launch covers at least 1/8 of its input layer's nodes


def early_stats(ready, sizes: Sequence[int], parts: int = EARLY_STATS_PARTS) -> dict[int, list]:
    """Backward position `p` -> `[(input layer i, lo, hi)]`: the input statistics a training step
    computes on the parameter-flows stream right after step `p` of `plan.backward_steps()`, the rows
    whose flows are final by then (`ready`: `plan.input_flows_ready()`; `sizes[i]`: layer i's nodes).

    Ranges are merged until one holds `1/parts` of its layer (fewer, fuller launches; a collective
    each under data-parallel EM); the layer's last range, and any short rest before it, stays for the
    input layer's own step at the end of the pass. HCLT: the rows of variables whose subtree is
    higher than one layer come early (60% of the input nodes of the benchmarks' MNIST HCLT, in 4
    launches; 50-67% on the bundled sets); PD reads every input node in its
    lowest layer, so nothing comes early there."""
    out: dict[int, list] = {}
    start: dict[int, int] = {}
    for p, i, lo, hi in ready:
        a = start.setdefault(i, lo)
        if hi < sizes[i] and p >= 0 and (hi - a) * parts >= sizes[i]:
            out.setdefault(p, []).append((i, a, hi))
            start[i] = hi
    return out


def plan_early_stats(plan, parts: int = EARLY_STATS_PARTS) -> dict[int, list]:
    """`early_stats` of a plan (anything with `input_flows_ready()` and `input_layers`): the launches
    the executor makes, the Schedule tab draws and the benchmarks ask about."""
    return early_stats(plan.input_flows_ready(), [layer.num_nodes for layer in plan.input_layers], parts)


ELEMENT, SPARE, NODE_ROWS = "element", "spare", "node rows"  # where a recompute writes (RecomputeBuffers)


@dataclass(frozen=True)
class RecomputeBuffers:
    """Where the overlapped flows pass recomputes each product layer: one entry per sum layer in
    top-down order (the order of `plan.backward_steps()`).

    Even entries use the forward's element buffer (`ELEMENT`). Odd ones need a second buffer, since
    the recompute runs ahead while the layer before still reads the first. Its place: `NODE_ROWS`,
    rows `[start, start + rows)` of the node values, when that many rows belong to sum layers whose
    every reader is done by then (a training pass keeps no node flows, and the recompute into a
    buffer already waits for the parameter flows of the layer two before, the last reader of the
    rows of every layer above), else `SPARE`, a buffer of `spare_rows` rows of its own. Each entry's
    `rows` counts the -inf padding rows (`PAD_ROWS`) that a view must get before its recompute.
    HCLT and PD lay their sum layers out top-down from the end of the node rows, so only the top
    few layers, a few hundred rows each, need the spare, not a copy of the largest layer."""

    places: tuple[str, ...]
    starts: tuple[int, ...]  # first node row of a NODE_ROWS place; 0 otherwise
    rows: tuple[int, ...]
    spare_rows: int


def _longest_run(ranges: list[tuple[int, int]]) -> tuple[int, int]:
    """(start, length) of the longest run of rows covered by the union of `[lo, hi)` ranges."""
    best, cur = (0, 0), None
    for lo, hi in sorted(ranges):
        if cur is not None and lo <= cur[1]:
            cur = (cur[0], max(cur[1], hi))
        else:
            cur = (lo, hi)
        if cur[1] - cur[0] > best[1]:
            best = (cur[0], cur[1] - cur[0])
    return best


def recompute_buffers(plan, node_rows: bool = True) -> RecomputeBuffers:
    """`RecomputeBuffers` of a plan (anything with `backward_steps()` whose sum layers write
    `("node_mars", lo, hi)` and product layers `(..., PAD_ROWS, hi)`); `node_rows=False`: every odd
    layer in a spare as large as the largest of them (the two-buffer layout before node rows)."""
    sums = [
        s for s in plan.backward_steps(inputs=False) if s.layer.kind == "sum" and s.pass_name == "backward"
    ]
    places, starts, rows, spare = [], [], [], 0
    for i, s in enumerate(sums):
        need = s.partner.writes[2]  # padding rows + the product layer's rows
        place, start = ELEMENT, 0
        if i % 2:
            done = [t.layer.writes[1:] for t in sums[: i - 1] if t.layer.writes[0] == "node_mars"]
            start, free = _longest_run(done) if node_rows else (0, 0)
            place = NODE_ROWS if free >= need else SPARE
        if place == SPARE:
            spare, start = max(spare, need), 0
        places.append(place)
        starts.append(start)
        rows.append(need)
    return RecomputeBuffers(tuple(places), tuple(starts), tuple(rows), spare)


@dataclass(frozen=True)
class Slot:
    """One piece of work on one stream. `step`: index into the step list; `part`: the step's pass,
    "param flows" for the parameter-flows part of a sum layer's backward, or "statistics" for an input
    layer's statistics computed early (`rows`: its nodes `[lo, hi)`, local to the layer); times in ms
    from the step's start; `waits`: indices (into the returned slots) of the slots it waits for on
    other streams."""

    step: int
    layer: int
    kind: str
    part: str
    stream: str
    start: float
    end: float
    waits: tuple[int, ...] = ()
    rows: tuple[int, int] | None = None

    @property
    def ms(self) -> float:
        return self.end - self.start


def _check(steps: Sequence[Step], ms: Sequence[float], param_share: float | Sequence[float]) -> list[float]:
    """Validate; returns one parameter-flows share per step."""
    if len(steps) != len(ms):
        raise ValueError(f"{len(steps)} steps but {len(ms)} costs: one cost (ms) per step")
    bad = next((i for i, t in enumerate(ms) if not t >= 0), None)  # also catches NaN
    if bad is not None:
        raise ValueError(f"step {bad} has cost {ms[bad]!r} ms: costs must be >= 0")
    shares = [param_share] * len(steps) if isinstance(param_share, (int, float)) else list(param_share)
    if len(shares) != len(steps):
        raise ValueError(f"{len(steps)} steps but {len(shares)} param_share values")
    bad = next((i for i, f in enumerate(shares) if not 0.0 <= f <= 1.0), None)
    if bad is not None:
        raise ValueError(f"param_share must be in [0, 1], got {shares[bad]!r} (step {bad})")
    return [float(f) for f in shares]


def one_stream(steps: Sequence[Step], ms: Sequence[float]) -> list[Slot]:
    """The plain order (profiled batches, `backward_flows()`, CPU): every step on `main`, end to end."""
    _check(steps, ms, PARAM_SHARE)
    out, t = [], 0.0
    for i, (s, c) in enumerate(zip(steps, ms)):
        out.append(Slot(i, s.layer.index, s.layer.kind, s.pass_name, MAIN, t, t + float(c)))
        t += float(c)
    return out


def _early_at(steps: Sequence[Step], early: dict[int, list] | None) -> tuple[dict, dict]:
    """`early` (`early_stats`: backward position -> `[(input layer i, lo, hi)]`) as step indices:
    (product backward step -> `[(input step, lo, hi)]`, input step -> fraction of its nodes moved)."""
    if not early:
        return {}, {}
    first = next((k for k, s in enumerate(steps) if s.pass_name != "forward"), len(steps))
    inputs = [k for k, s in enumerate(steps) if s.layer.kind == "input" and s.pass_name == "backward"]
    at: dict[int, list] = {}
    moved: dict[int, float] = {}
    for p, launches in sorted(early.items()):
        k = first + p
        step = steps[k] if 0 <= p and k < len(steps) else None
        if step is None or step.layer.kind != "product" or step.pass_name != "backward":
            raise ValueError(f"early statistics after backward step {p}: not a product layer's backward")
        for i, lo, hi in launches:
            if not 0 <= i < len(inputs):
                raise ValueError(f"early statistics of input layer {i}: the steps have {len(inputs)}")
            n = steps[inputs[i]].layer.num_nodes
            if not 0 <= lo < hi <= n:
                raise ValueError(f"early statistics of nodes [{lo}, {hi}) of input layer {i} ({n} nodes)")
            at.setdefault(k, []).append((inputs[i], lo, hi))
            moved[inputs[i]] = moved.get(inputs[i], 0.0) + (hi - lo) / n
    return at, moved


def three_streams(
    steps: Sequence[Step],
    ms: Sequence[float],
    param_share: float | Sequence[float] = PARAM_SHARE,
    early: dict[int, list] | None = None,
) -> list[Slot]:
    """Slots of a training step on three streams, in queue order (a sum layer's backward gives two:
    its main part, then its parameter flows). `steps`: `plan.steps()` (or any steps in that order:
    forward, then per sum layer recompute / backward / product backward, then input layers);
    `ms[i]`: step i's time on one stream; `param_share`: one share for all sum layers, or one per
    step (e.g. from a kernel trace that times parameter flows apart). `early`: `early_stats(...)` of
    the plan (positions in `backward_steps()`): each launch a "statistics" slot on the parameter-flows
    stream after its product layer's backward, taking its share of the input step's time off main.
    None or {}: every input statistic at the end, on main."""
    shares = _check(steps, ms, param_share)
    early_at, moved = _early_at(steps, early)
    free = dict.fromkeys(STREAMS, 0.0)
    out: list[Slot] = []
    fork = None  # the last forward slot: the side streams start after it
    ready = None  # the recompute slot the next sum layer's backward reads
    freed: list[int | None] = [None] * NUM_ELEMENT_BUFFERS  # per buffer: its last reader's slot
    k = 0  # the element buffer of the current sum layer

    def put(i: int, part: str, stream: str, cost: float, waits: list[int | None], rows=None) -> int:
        waits = tuple(w for w in waits if w is not None)
        start = max([free[stream], *(out[w].end for w in waits)])
        layer = steps[i].layer
        out.append(Slot(i, layer.index, layer.kind, part, stream, start, start + cost, waits, rows))
        free[stream] = start + cost
        return len(out) - 1

    for i, (s, c) in enumerate(zip(steps, ms)):
        c = float(c)
        if s.pass_name == "forward":
            fork = put(i, "forward", MAIN, c, [])
        elif s.pass_name == "recompute":
            ready = put(i, "recompute", RECOMPUTE, c, [fork, freed[k]])
        elif s.layer.kind == "sum":
            scaled = put(i, "backward", MAIN, c * (1.0 - shares[i]), [ready])
            freed[k] = put(i, PARAMS, PARAMS, c * shares[i], [scaled])
            ready, k = None, k ^ 1
        else:  # a product layer's backward (then the input statistics it made final), an input layer's
            final = put(i, "backward", MAIN, c * max(0.0, 1.0 - moved.get(i, 0.0)), [])
            for j, lo, hi in early_at.get(i, ()):
                cost = float(ms[j]) * (hi - lo) / steps[j].layer.num_nodes
                put(j, STATISTICS, PARAMS, cost, [final], (lo, hi))
    return out


def makespan(slots: Sequence[Slot]) -> float:
    """The step's time (ms): the join waits for every stream."""
    return max((s.end for s in slots), default=0.0)
