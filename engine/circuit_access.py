"""Read access to a CompiledCircuit's executor state for gradients, surgery and evidence.

Those modules need a little more than the public API (the sum partitions' parameter slices, input
layers' rows and variables, a vector's node rows, re-running the inner layers after the input
values changed). Reaching into the circuit happens here only, so a refactor of the executor changes
this file and nothing else. Both executor layouts are handled: per-layer `pc.parts` with
`input_vars_{i}` buffers, and per-layer `pc.tables` with `InputLayer` modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputView:
    """One input layer: its family, `params: [n, P]`, `stats: [n, S]`, `vars: [n]`, node rows."""

    dist: object
    params: torch.Tensor
    stats: torch.Tensor
    vars: torch.Tensor
    rows: slice


def _tables(pc):
    return getattr(pc, "tables", None)


def sum_partitions(pc):
    """Every sum partition; each has `weights(flat) -> [nb, bs, width * bs]`, `param_offset`, `num_params`."""
    for layer in pc.plan.sum_layers:
        t = _tables(pc)
        yield from (t.layers[layer.index].parts if t is not None else pc.parts[layer.index])


def input_views(pc) -> list[InputView]:
    out = []
    for i, layer in enumerate(pc.input_layers):
        if hasattr(layer, "rows"):  # InputLayer module
            out.append(InputView(layer.dist, layer.params, layer.stats, layer.vars, layer.rows))
        else:
            g = layer.input_group
            out.append(InputView(pc.input_dists[i], pc.input_params(i), pc.input_stats(i),
                                 getattr(pc, f"input_vars_{i}"), slice(g.row_start, g.row_start + g.num_nodes)))
    return out


def node_row(pc, vector) -> int | None:
    """First `node_mars` row of a sum or input vector of this circuit, or None if it has none."""
    rows = getattr(pc.plan, "node_row", None)
    if rows is None:
        rows = pc._layout.node_row
    return rows.get(vector.uid)


def rerun_inner_layers(pc, node_mars: torch.Tensor, element_mars: torch.Tensor) -> None:
    """Recompute every product and sum layer from the input rows already in `node_mars`."""
    t = _tables(pc)
    if t is not None:
        for step in pc.plan.forward_steps():
            if step.layer.kind != "input":
                pc._forward_step(step, None, None, node_mars, element_mars, "sum")
        return
    for layer in pc.plan.layers:
        if layer.kind == "product":
            for pt in pc.parts[layer.index]:
                pc.backend.prod_forward(pt, node_mars, element_mars)
        elif layer.kind == "sum":
            for pt in pc.parts[layer.index]:
                pc.backend.sum_forward(pt, pc.params, element_mars, node_mars)


def set_marginals(pc, node_mars: torch.Tensor, element_mars: torch.Tensor) -> None:
    """Make `pc.backward_flows` run on these forward buffers (as `pc.forward` leaves them)."""
    pc._mars = (node_mars, element_mars)
