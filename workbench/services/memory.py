"""Memory timeline of one training step: which buffers are live at each step of the schedule.

Three policies over the same schedule (`plans.schedule` order), from the plan's buffer sizes:

- **recompute** (what the engine does): product layers write one shared element scratch buffer,
  sized for the largest product layer; the flows pass recomputes each product layer into it just
  before the backward of the sum layer above.
- **store**: every product layer keeps its own element values from the forward pass until its
  backward, the way an autograd framework keeps activations.
- **three streams** (GPU training: engine/executor/stream_schedule.py): recompute as above, but the
  flows pass recomputes each product layer *ahead* into a second element-value buffer as well (the
  two alternate per sum layer). That second buffer takes node-value rows whose readers are done
  where they fit (`recompute_buffers`), so only its spare, sized for the top layers that do not fit,
  is held on top from the first backward step on. The node scale is written over the node-flow
  rows: no scratch of its own.

Node values, node flows and parameters are the same under all three. Sizes in bytes (float32).
"""

from __future__ import annotations

from engine.compiler.plan import PAD_ROWS, LayerPlan
from engine.executor.stream_schedule import recompute_buffers

FLOAT_BYTES = 4
BUFFERS = ["parameters", "node values", "node flows", "element values", "element flows"]


def _product_rows(plan: LayerPlan) -> dict[int, int]:
    """Element rows each product layer writes (padding rows excluded)."""
    return {la.index: la.writes[2] - la.writes[1] for la in plan.layers if la.kind == "product"}


def memory_timeline(plan: LayerPlan, records: list[dict], batch_size: int) -> dict[str, list[dict]]:
    """Live bytes per buffer after each schedule step, for each policy.

    `records`: `plans.schedule(plan, ...)` output (step order, "layer", "pass"). Returns
    {"recompute": [...], "store": [...], "three streams": [...]}, one dict per record: step, layer, pass, one key per
    `BUFFERS` entry (bytes) and "total" (bytes).
    """
    per_row = FLOAT_BYTES * batch_size
    params = FLOAT_BYTES * (2 * plan.num_params + 2 * plan.num_input_params)  # weights + their flows
    prod = _product_rows(plan)
    scratch = (PAD_ROWS + max(prod.values(), default=0)) * per_row
    spare = recompute_buffers(plan).spare_rows * per_row  # what the overlapped pass allocates on top
    out: dict[str, list[dict]] = {"recompute": [], "store": [], "three streams": []}
    stored: dict[int, int] = {}  # store policy: product layer -> bytes kept
    backward = False
    for r in records:
        backward = backward or r["pass"] != "forward"
        if r["layer"] in prod and r["pass"] == "forward":
            stored[r["layer"]] = prod[r["layer"]] * per_row
        common = {
            "parameters": params,
            "node values": plan.num_node_rows * per_row,
            "node flows": plan.num_node_rows * per_row if backward else 0,
            "element flows": scratch if backward else 0,
        }
        keys = {"step": r["step"], "layer": r["layer"], "pass": r["pass"]}
        out["recompute"].append({**keys, **common, "element values": scratch})
        two = scratch + spare if backward else scratch  # the spare exists in the flows pass
        out["three streams"].append({**keys, **common, "element values": two})
        out["store"].append({**keys, **common, "element values": PAD_ROWS * per_row + sum(stored.values())})
        if r["layer"] in prod and r["pass"] == "backward":
            stored.pop(r["layer"], None)  # its flows are passed down: its values are no longer needed
    for rows in out.values():
        for d in rows:
            d["total"] = sum(d[b] for b in BUFFERS)
    return out


def peak(rows: list[dict]) -> int:
    """Peak live bytes of one policy's timeline."""
    return max((d["total"] for d in rows), default=0)


def peak_saving(timeline: dict[str, list[dict]]) -> tuple[int, int]:
    """(peak bytes with recompute, peak bytes when every product layer is stored)."""
    return peak(timeline["recompute"]), peak(timeline["store"])
