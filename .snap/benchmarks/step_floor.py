"""The floor of one training step: the bytes each pass must move and the FLOPs it must multiply.

`step_floor(plan, B)` counts, from a compiled `LayerPlan`, per pass of one mini-batch EM step:

- `forward`: product and sum layers bottom-up (node values, element values, sum weights);
- `flows`: top-down, the product recompute, the sum layers' element flows and the product flows;
- `param_flows`: the sum weights' flows;
- `inputs`: the input layers' forward and their statistics (data, input params, input rows);
- `em`: the update of sum weights and input params from their flows.

What is counted (float32 = 4 bytes; the data at `data_bytes` per value, 1 for our resident uint8):

- Every tensor a pass touches is read at most once and written at most once *in that pass*. Node
  buffers (node values, node flows) count the distinct node rows the pass touches, times B; the
  element scratch counts per layer (its rows hold another layer's products in the next layer); sum
  weights, weight flows, input params and statistics count once per batch (not per batch tile).
  A fused kernel that never stores the element values would need less: this is the floor of the
  plan's passes as they are, not of every possible schedule.
- Real edges only: padded child blocks of a sum partition and padded product slots are left out.
- FLOPs: the tile matmuls only, 2 per sum weight per example per matmul, one matmul in each of
  forward, element flows and parameter flows. exp/log/max and the products' additions run beside
  the tensor cores and are not counted; nor are index tables, the LL output and the root flows.

`times_ms(floor, ceilings, precision)` turns counts into milliseconds: bytes / the measured copy
bandwidth (read + write bytes per second of a device-to-device copy), FLOPs x MMAs per product /
the measured matmul peak (`tf32x3`, our float32-accurate default: 3 tf32 MMAs per product; `tf32`:
1 at the tf32 peak; `bf16`: 1 at the bf16 peak; `ieee`: the float32 FMA peak). A pass's floor is
max(memory, compute) (perfect overlap); the step's floor is the sum over passes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from engine.compiler.plan import FLOAT_BYTES, PAD_ROWS, Layer, LayerPlan

PASSES = ("forward", "flows", "param_flows", "inputs", "em")
# precision -> (MMAs per product, the ceilings key of the peak it runs at)
PEAKS = {
    "tf32x3": (3, "matmul_tf32_TFLOPs"),
    "tf32": (1, "matmul_tf32_TFLOPs"),
    "bf16": (1, "matmul_bf16_TFLOPs"),
    "ieee": (1, "matmul_fp32_TFLOPs"),
}


@dataclass
class PassCount:
    """One pass: `bytes` moved and matmul `flops` for the whole batch; `by_tensor` splits the bytes."""

    bytes: int = 0
    flops: int = 0
    by_tensor: dict = field(default_factory=dict)

    def add(self, tensor: str, nbytes: int) -> None:
        self.bytes += int(nbytes)
        self.by_tensor[tensor] = self.by_tensor.get(tensor, 0) + int(nbytes)


class _RowSet:
    """Distinct node rows touched in one pass (node buffers count each row once per pass)."""

    def __init__(self, num_rows: int):
        self.mask = np.zeros(num_rows, dtype=bool)

    def add(self, rows: np.ndarray) -> None:
        self.mask[rows] = True

    @property
    def count(self) -> int:
        return int(self.mask.sum())


def _sum_rows(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """(node rows written, distinct real element rows read) of a sum layer."""
    nodes, elems = [], []
    for p in layer.partitions:
        bs = p.block_size
        offs = np.arange(bs)
        nodes.append((p.node_rows[:, None] + offs).ravel())
        real = p.tile_source >= 0 if p.tile_source is not None else p.child_rows >= PAD_ROWS
        elems.append((p.child_rows[real][:, None] + offs).ravel())
    return np.concatenate(nodes), np.unique(np.concatenate(elems))


def _prod_rows(layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """(element rows written, distinct real child node rows read) of a product layer."""
    elems = np.concatenate([p.node_rows for p in layer.partitions])
    kids = np.concatenate([p.child_rows[p.child_rows > 0] for p in layer.partitions])
    return elems, np.unique(kids)


def step_floor(plan: LayerPlan, batch_size: int, data_bytes: int = 1) -> dict[str, PassCount]:
    """Bytes and FLOPs of each pass (`PASSES`) of one training step on `batch_size` examples."""
    B, F = batch_size, FLOAT_BYTES
    out = {name: PassCount() for name in PASSES}
    sums = [layer for layer in plan.layers if layer.kind == "sum"]
    weights = sum(layer.num_edges for layer in sums)  # real sum weights (edges x block size^2)
    rows = {
        (p, t): _RowSet(plan.num_node_rows) for p in PASSES for t in ("mars_r", "mars_w", "flow_r", "flow_w")
    }
    below = {layer.index: plan.layers[layer.index - 1] for layer in sums}

    for layer in plan.layers:  # forward
        if layer.kind == "product":
            elems, kids = _prod_rows(layer)
            rows["forward", "mars_r"].add(kids)
            out["forward"].add("element_mars", F * B * elems.size)
        elif layer.kind == "sum":
            nodes, elems = _sum_rows(layer)
            out["forward"].add("element_mars", F * B * elems.size)
            out["forward"].add("params", F * layer.num_edges)
            rows["forward", "mars_w"].add(nodes)
    out["forward"].flops = 2 * B * weights

    flows, pflows = out["flows"], out["param_flows"]
    for layer in reversed(sums):  # top-down, as LayerPlan.backward_steps
        prod = below[layer.index]
        pelems, kids = _prod_rows(prod)
        nodes, elems = _sum_rows(layer)
        rows["flows", "mars_r"].add(kids)  # recompute: child values in, element values out
        flows.add("element_mars", F * B * pelems.size)
        rows["flows", "flow_r"].add(nodes)  # element flows: node flows, node values, element values
        rows["flows", "mars_r"].add(nodes)
        flows.add("element_mars", F * B * elems.size)
        flows.add("params", F * layer.num_edges)
        flows.add("element_flows", F * B * elems.size)  # written
        flows.add("element_flows", F * B * pelems.size)  # product flows: read, child node flows out
        rows["flows", "flow_w"].add(kids)
        rows["param_flows", "flow_r"].add(nodes)  # weight flows: the same reads, one flow per weight
        rows["param_flows", "mars_r"].add(nodes)
        pflows.add("element_mars", F * B * elems.size)
        pflows.add("params", F * layer.num_edges)
        pflows.add("param_flows", F * layer.num_edges)
    flows.flops = pflows.flops = 2 * B * weights

    inputs = out["inputs"]
    for layer in plan.layers:
        if layer.kind == "input":
            node_rows = np.arange(layer.writes[1], layer.writes[2])
            rows["inputs", "mars_w"].add(node_rows)
            rows["inputs", "flow_r"].add(node_rows)
            inputs.add("data", data_bytes * B * np.unique(layer.input_group.vars).size)
    inputs.add("input_params", F * plan.num_input_params)
    inputs.add("input_stats", F * plan.num_input_params)
    out["em"].add("params", 2 * F * weights)  # read and written
    out["em"].add("param_flows", F * weights)
    out["em"].add("input_params", 2 * F * plan.num_input_params)
    out["em"].add("input_stats", F * plan.num_input_params)

    names = {"mars_r": "node_mars", "mars_w": "node_mars", "flow_r": "node_flows", "flow_w": "node_flows"}
    for (p, t), rs in rows.items():
        if rs.count:
            out[p].add(names[t], F * B * rs.count)
    return out


def to_dict(floor: dict[str, PassCount]) -> dict:
    """JSON-ready: pass -> {bytes, flops, by_tensor}."""
    return {name: asdict(c) for name, c in floor.items()}


ELEMENT_BUFFERS = ("element_mars", "element_flows")  # what fusing products into the sums removes


def times_ms(floor: dict, ceilings: dict, precision: str = "tf32x3", without: tuple[str, ...] = ()) -> dict:
    """Per pass `{memory_ms, compute_ms, floor_ms, bound}` and `step_ms` (sum of the pass floors).

    `floor`: `step_floor`'s result or its `to_dict`; `ceilings`: `copy_GBps` and the matmul peaks in
    TFLOP/s as `vs_pyjuice.ceilings()` measures them (keys in `PEAKS`); `without`: tensors left out of
    the bytes (`ELEMENT_BUFFERS`: the floor of a schedule whose sums compute their products' values
    from node values on the fly and write node flows directly)."""
    if precision not in PEAKS:
        raise ValueError(f"precision must be one of {tuple(PEAKS)}, got {precision!r}")
    mmas, key = PEAKS[precision]
    if key not in ceilings or "copy_GBps" not in ceilings:
        raise ValueError(f"ceilings lack {key!r} or 'copy_GBps' (measured: {sorted(ceilings)})")
    out, total = {}, 0.0
    for name, c in floor.items():
        c = c if isinstance(c, dict) else asdict(c)
        nbytes = c["bytes"] - sum(c["by_tensor"].get(t, 0) for t in without)
        mem = nbytes / (ceilings["copy_GBps"] * 1e9) * 1e3
        comp = mmas * c["flops"] / (ceilings[key] * 1e12) * 1e3
        out[name] = {
            "memory_ms": mem,
            "compute_ms": comp,
            "floor_ms": max(mem, comp),
            "bound": "memory" if mem >= comp else "compute",
        }
        total += max(mem, comp)
    out["step_ms"] = total
    return out
