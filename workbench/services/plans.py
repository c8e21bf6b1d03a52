"""Plan what-ifs: compile the layer plan only (no tensors), block-sparse occupancy, layer schedule.

All outputs are plain data (dicts, lists, numpy arrays) for views to draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.compiler import compile_plan
from engine.compiler.plan import PAD_ROWS, Layer, LayerPlan
from engine.executor import stream_schedule as engine_streams

# Roofline defaults: a single CPU core-ish machine; views let the user set an H100 (~50e12, 3.35e12).
DEFAULT_PEAK_FLOPS = 1e11  # FLOP/s
DEFAULT_BANDWIDTH = 2e10  # bytes/s
DEFAULT_LAUNCH_US = 5.0  # fixed cost per partition (kernel launch / op dispatch), microseconds


def make_plan(root, block_size: int | None, tolerance: float) -> LayerPlan:
    """The layer plan of `root` at these options (raises ValueError/CircuitError)."""
    plan, _, _ = compile_plan(root, block_size, tolerance)
    return plan


def make_plan_rows(root, block_size: int | None, tolerance: float) -> tuple[LayerPlan, dict[int, int]]:
    """The layer plan and the first node_mars row of every vector (uid -> row), to find the
    partition that holds a vector's node blocks."""
    plan, _, lay = compile_plan(root, block_size, tolerance)
    return plan, dict(lay.node_row)


def block_partitions(plan: LayerPlan, first_row: int, num_blocks: int, b: int) -> list[tuple[int, int]]:
    """(sum layer index, partition index) of each of a sum vector's `num_blocks` node blocks of `b`
    nodes starting at node_mars row `first_row`; (-1, -1) where none is found."""
    rows = first_row + b * np.arange(num_blocks)
    out = [(-1, -1)] * num_blocks
    for layer in plan.sum_layers:
        lo, hi = layer.writes[1], layer.writes[2]
        if not lo <= first_row < hi:
            continue
        for k, p in enumerate(layer.partitions):
            hit = np.flatnonzero(np.isin(rows, p.node_rows))
            for i in hit:
                out[int(i)] = (layer.index, k)
        break
    return out


def plan_signature(layers: list[dict]) -> tuple:
    """What makes two plans run the same kernels: per layer its kind, sizes and partition shapes
    (`layers`: plan.to_dict()['layers']). Equal signatures: measured times of one apply to the other."""
    return tuple(
        (
            la["kind"],
            la["num_nodes"],
            la["num_edges"],
            tuple((p["block_size"], p["num_node_blocks"], p["width"]) for p in la.get("partitions", [])),
        )
        for la in layers
    )


def sum_layer_summaries(plan: LayerPlan, batch_size: int) -> list[dict]:
    """Per sum layer: index, depth, nodes, edges, partitions (with padding), FLOPs and bytes per batch."""
    out = []
    for layer in plan.sum_layers:
        d = layer.to_dict()
        parts = d["partitions"]
        real = sum(p["num_edges"] for p in parts)
        padded = sum(p["padded_edges"] for p in parts)
        out.append(
            {
                "layer": layer.index,
                "depth": layer.depth,
                "num_nodes": layer.num_nodes,
                "num_edges": layer.num_edges,
                "num_partitions": len(parts),
                "partitions": parts,
                "padding_ratio": 0.0 if padded == 0 else 1.0 - real / padded,
                "flops": layer.flops * batch_size,
                "bytes": layer.bytes * batch_size + layer.param_bytes,
                "param_bytes": layer.param_bytes,
            }
        )
    return out


def padding_ratio(plan: LayerPlan) -> float:
    """Fraction of padded sum edges over the whole plan."""
    real = padded = 0
    for layer in plan.sum_layers:
        for p in layer.partitions:
            s = p.summary("sum")
            real, padded = real + s["num_edges"], padded + s["padded_edges"]
    return 0.0 if padded == 0 else 1.0 - real / padded


# ----------------------------------------------------------------------------------------- block matrix


@dataclass
class BlockMatrix:
    """Occupancy of one sum layer's block-sparse edge matrix, ready for a heat map.

    `values: [rows, cols]` float32 in [0, 1]: the fraction of each cell that holds real edges.
    A cell covers `row_unit` node rows by `col_unit` element rows (1 cell = 1 node block x 1 child
    block of the smallest block size when not downsampled). `partition: [rows]` int, the partition
    index of each row's first node block (-1 where no block starts).
    """

    values: np.ndarray
    partition: np.ndarray
    row_unit: float
    col_unit: float
    node_rows: tuple[int, int]  # node_mars row range of the layer
    child_rows: tuple[int, int]  # element_mars row range its children occupy
    downsampled: bool
    num_blocks: int  # real node-block x child-block pairs


def block_matrix(layer: Layer, max_cells: int = 256) -> BlockMatrix:
    """Node block x child block occupancy of sum `layer`, aggregated to at most `max_cells` per side."""
    if layer.kind != "sum":
        raise ValueError(f"layer {layer.index} is a {layer.kind} layer; block matrices exist for sum layers")
    unit = min(p.block_size for p in layer.partitions)
    r0, r1 = layer.writes[1], layer.writes[2]
    rows, cols, sizes, pids = [], [], [], []
    for k, p in enumerate(layer.partitions):
        ch = p.child_rows
        real = ch >= PAD_ROWS
        nr = np.broadcast_to(p.node_rows[:, None], ch.shape)[real]
        rows.append(nr)
        cols.append(ch[real])
        sizes.append(np.full(nr.size, p.block_size, dtype=np.int64))
        pids.append(np.full(p.node_rows.size, k))
    rows, cols, sizes = np.concatenate(rows), np.concatenate(cols), np.concatenate(sizes)
    c0 = int(cols.min()) if cols.size else PAD_ROWS
    c1 = int((cols + sizes).max()) if cols.size else PAD_ROWS + unit
    h, w = max(1, -(-(r1 - r0) // unit)), max(1, -(-(c1 - c0) // unit))
    nh, nw = min(h, max_cells), min(w, max_cells)
    ru, cu = (r1 - r0) / nh, (c1 - c0) / nw
    # each (node block, child block) pair covers bs x bs rows; spread its area over the cells it hits
    # (a pair lands in one cell when downsampled, since bins are >= unit and pairs are aligned)
    vals = np.zeros((nh, nw), dtype=np.float64)
    ri = np.minimum(((rows - r0) / ru).astype(np.int64), nh - 1)
    ci = np.minimum(((cols - c0) / cu).astype(np.int64), nw - 1)
    span_r = np.maximum(1, np.round(sizes / ru).astype(np.int64))
    span_c = np.maximum(1, np.round(sizes / cu).astype(np.int64))
    area = sizes.astype(np.float64) ** 2 / (span_r * span_c)
    if (span_r == 1).all() and (span_c == 1).all():
        np.add.at(vals, (ri, ci), area)
    else:
        for a in range(int(span_r.max())):
            for b in range(int(span_c.max())):
                m = (a < span_r) & (b < span_c)
                np.add.at(vals, (np.minimum(ri[m] + a, nh - 1), np.minimum(ci[m] + b, nw - 1)), area[m])
    vals /= ru * cu
    part = np.full(nh, -1, dtype=np.int64)
    all_rows = np.concatenate([p.node_rows for p in layer.partitions])
    pi = np.concatenate(pids)
    part[np.minimum(((all_rows - r0) / ru).astype(np.int64), nh - 1)] = pi
    return BlockMatrix(
        np.clip(vals, 0, 1).astype(np.float32),
        part,
        ru,
        cu,
        (r0, r1),
        (c0, c1),
        nh < h or nw < w,
        int(rows.size),
    )


# ----------------------------------------------------------------------------------------- schedule


def _pass_cost(layer: Layer, pass_name: str, batch_size: int) -> tuple[int, int]:
    """(FLOPs, bytes) of one layer in one pass for a batch; backward of a sum layer ~ 2 matmuls."""
    flops, bytes_ = layer.flops * batch_size, layer.bytes * batch_size + layer.param_bytes
    if pass_name == "backward" and layer.kind in ("sum", "input"):
        # sum: element flows and parameter flows (two matmuls) and writes param flows
        return 2 * flops, 2 * bytes_ + layer.param_bytes
    return flops, bytes_


def _stored_flows_ready(d: dict) -> tuple[tuple[int, int, int, int], ...]:
    """`d["input_flows_ready"]` (`[[p, i, lo, hi], ...]`, `LayerPlan.input_flows_ready()`) as tuples;
    () for a dict written before plans stored it (older runs): then no input statistics come early."""
    try:
        ready = tuple(tuple(int(x) for x in r) for r in d.get("input_flows_ready") or ())
    except (TypeError, ValueError) as err:
        raise ValueError(f"plan dict input_flows_ready is malformed: {err!r}") from None
    bad = next((r for r in ready if len(r) != 4), None)
    if bad is not None:
        raise ValueError(f"plan dict input_flows_ready holds {list(bad)}: expected [p, i, lo, hi]")
    return ready


def plan_from_dict(d: dict | list) -> LayerPlan:
    """A skeleton `LayerPlan` from `plan.to_dict()` (or its `layers` list): kinds, sizes, buffer rows
    and per-example costs, with partition *summaries* (dicts) instead of index tables. Enough for the
    one traversal (`steps()`), `schedule` and the memory timeline of a plan compiled elsewhere (a run's
    plan event), not for running it. Its `input_flows_ready()` answers the stored ranges (none, so no
    early input statistics, for a dict without them: a run from before plans stored them). Raises
    ValueError naming what is missing."""
    if isinstance(d, list):
        d = {"layers": d}
    if not isinstance(d, dict) or not isinstance(d.get("layers"), list) or not d["layers"]:
        raise ValueError("plan dict has no layers (expected plan.to_dict())")
    ready = _stored_flows_ready(d)
    layers = []
    for i, la in enumerate(d["layers"]):
        try:
            layers.append(
                Layer(
                    index=int(la["index"]),
                    kind=str(la["kind"]),
                    depth=int(la.get("depth", 0)),
                    num_nodes=int(la["num_nodes"]),
                    num_edges=int(la["num_edges"]),
                    partitions=list(la.get("partitions", [])),
                    reads=tuple(la["reads"]) if la.get("reads") else None,
                    writes=tuple(la["writes"]) if la.get("writes") else None,
                    flops=int(la.get("flops_per_example", 0)),
                    bytes=int(la.get("bytes_per_example", 0)),
                    param_bytes=int(la.get("param_bytes", 0)),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"plan dict layer {i} is malformed: {err!r}") from None
        if layers[-1].kind not in ("input", "product", "sum"):
            raise ValueError(f"plan dict layer {i} has unknown kind {layers[-1].kind!r}")
    plan = LayerPlan(
        layers=layers,
        num_vars=int(d.get("num_vars", 0)),
        num_node_rows=int(d.get("num_node_rows", 0)),
        num_element_rows=int(d.get("num_element_rows", 0)),
        num_params=int(d.get("num_params", 0)),
        num_input_params=int(d.get("num_input_params", 0)),
        root_row=-1,
        block_size=d.get("block_size"),
        tolerance=float(d.get("tolerance", 0.0)),
    )
    # no index tables to find the ready rows from: fill the plan's cached answer with the stored one
    # (a cached_property reads the instance dict first, so `input_flows_ready()` returns it)
    plan.__dict__["_flows_ready"] = ready
    return plan


def plan_batch_size(d: dict, default: int) -> int:
    """The batch size `plan.to_dict(batch_size)` was written for (its memory estimate's), else `default`."""
    return int((d.get("memory_bytes") or {}).get("batch_size") or default) if isinstance(d, dict) else default


def pass_order(plan: LayerPlan) -> list[tuple[Layer, str]]:
    """Execution order of a training step, as the executor runs it: the plan's own traversal
    (`LayerPlan.steps()`: forward bottom-up, then per sum layer top-down the recompute of the product
    layer below it, its backward and that product layer's backward, then the input layers)."""
    return [(step.layer, step.pass_name) for step in plan.steps()]


def schedule(
    plan: LayerPlan | dict,
    batch_size: int = 512,
    peak_flops: float = DEFAULT_PEAK_FLOPS,
    bandwidth: float = DEFAULT_BANDWIDTH,
    launch_us: float = DEFAULT_LAUNCH_US,
    measured: dict[tuple[int, str], float] | None = None,
) -> list[dict]:
    """Ordered records of one training step (forward then backward).

    Each record: {"step", "layer", "kind", "pass", "flops", "bytes", "launches" (partitions, at
    least 1), "predicted_ms", "bound"
    ("compute"|"memory"), "measured_ms" (mean ms from profiling, or None)}. predicted_ms =
    max(flops / peak_flops, bytes / bandwidth) + launch_us per partition (roofline). `plan` may be
    `plan.to_dict()` (a run's plan event): it is laid out by `plan_from_dict`'s skeleton.
    """
    if isinstance(plan, dict):
        plan = plan_from_dict(plan)
    measured = measured or {}
    out = []
    for step, (layer, pass_name) in enumerate(pass_order(plan)):
        flops, bytes_ = _pass_cost(layer, pass_name, batch_size)
        t_c, t_m = flops / peak_flops, bytes_ / bandwidth
        launches = max(1, len(layer.partitions))
        out.append(
            {
                "step": step,
                "layer": layer.index,
                "kind": layer.kind,
                "pass": pass_name,
                "flops": int(flops),
                "bytes": int(bytes_),
                "launches": launches,
                "predicted_ms": 1e3 * max(t_c, t_m) + launches * launch_us * 1e-3,
                "bound": "compute" if t_c >= t_m else "memory",
                "measured_ms": measured.get((layer.index, pass_name)),
            }
        )
    return out


# ------------------------------------------------------------------------------- three-stream schedule

STREAM_LANES = {
    engine_streams.MAIN: "main chain",
    engine_streams.RECOMPUTE: "recompute ahead",
    engine_streams.PARAMS: "param flows behind",
}


def early_launches(plan: LayerPlan) -> dict[int, list]:
    """The input statistics a GPU training step computes early (`stream_schedule.early_stats`, the
    executor's own rule): backward position -> `[(input layer i, lo, hi)]`; {} when none (PD)."""
    return engine_streams.plan_early_stats(plan)


def stream_schedule(
    plan: LayerPlan | dict,
    records: list[dict],
    key: str = "predicted_ms",
    num_streams: int = 3,
    param_share: float = engine_streams.PARAM_SHARE,
) -> list[dict] | None:
    """When each step of `records` (`schedule(plan, ...)` output, one per `plan.steps()` step) runs,
    timed by `records[i][key]` (ms), on one stream (`num_streams=1`: profiled batches, the CPU) or three
    (`num_streams=3`: GPU training, engine/executor/stream_schedule.py's list schedule).

    One dict per slot, in queue order: {"step" (record index), "layer", "kind", "pass" ("forward",
    "recompute", "backward", "param flows": the parameter-flows part, `param_share` of a sum layer's
    backward, or "statistics": an input layer's statistics computed early, see below), "stream"
    ("main", "recompute", "param flows"), "lane" (`STREAM_LANES` name), "start_ms", "end_ms", "ms",
    "rows" ([lo, hi): a "statistics" slot's input nodes; else None), "after" (a "statistics" slot: the
    product layer whose backward made those rows' flows final; else None)}. None when a record has no
    time under `key` (a step not measured).

    Three streams also place the early input statistics (`early_launches`): rows whose flows are final
    before the pass ends get their share of the input step's time on the parameter-flows stream right
    after that product layer's backward; the input step on main keeps the rest. A plan dict without
    stored ready ranges (a run from before plans stored them) has none early."""
    if isinstance(plan, dict):
        plan = plan_from_dict(plan)
    steps = plan.steps()
    if len(steps) != len(records):
        raise ValueError(
            f"{len(records)} records for a plan of {len(steps)} steps: schedule() of another plan"
        )
    ms = [r.get(key) for r in records]
    if any(t is None for t in ms):
        return None
    if num_streams == 3:
        slots = engine_streams.three_streams(steps, ms, param_share, early_launches(plan))
    elif num_streams == 1:
        slots = engine_streams.one_stream(steps, ms)
    else:
        raise ValueError(f"num_streams must be 1 or 3, got {num_streams}")
    return [
        {
            "step": x.step,
            "layer": x.layer,
            "kind": x.kind,
            "pass": x.part,
            "stream": x.stream,
            "lane": STREAM_LANES[x.stream],
            "start_ms": x.start,
            "end_ms": x.end,
            "ms": x.ms,
            "rows": list(x.rows) if x.rows is not None else None,
            "after": slots[x.waits[0]].layer if x.part == engine_streams.STATISTICS else None,
        }
        for x in slots
    ]


def step_ms(slots: list[dict] | None) -> float:
    """A training step's time (ms) under `stream_schedule`'s slots: the last stream to finish."""
    return max((s["end_ms"] for s in slots or ()), default=0.0)
