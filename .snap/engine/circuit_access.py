"""Read access to a CompiledCircuit's executor state for gradients, surgery and evidence.

Those modules need a little more than the public API: the sum partitions' parameter slices, a
vector's node rows, re-running the inner layers after input values changed, and handing forward
buffers to the flows pass. Reaching into the circuit happens here only, so an executor refactor
changes this file and nothing else.
"""

from __future__ import annotations

import torch


def sum_partitions(pc):
    """Every sum partition; each has `weights(flat) -> [nb, bs, width * bs]`, `param_offset`, `num_params`."""
    for layer in pc.plan.sum_layers:
        yield from pc.tables.layers[layer.index].parts


def input_views(pc) -> list:
    """The input layers: each has `dist`, `params: [n, P]`, `stats: [n, S]`, `vars: [n]`, `rows` (a slice)."""
    return list(pc.input_layers)


def node_row(pc, vector) -> int | None:
    """First `node_mars` row of a sum or input vector of this circuit, or None if it has none."""
    return pc.plan.node_row.get(vector.uid)


def rerun_inner_layers(pc, node_mars: torch.Tensor, element_mars: torch.Tensor) -> None:
    """Recompute every product and sum layer from the input rows already in `node_mars`."""
    for step in pc.plan.forward_steps():
        if step.layer.kind != "input":
            pc._forward_step(step, None, None, node_mars, element_mars, "sum")


def set_marginals(pc, node_mars: torch.Tensor, element_mars: torch.Tensor) -> None:
    """Make `pc.backward_flows` run on these forward buffers (as `pc.forward` leaves them)."""
    pc._mars = (node_mars, element_mars)


def tie_gradients(pc, sum_grad: torch.Tensor, input_grads: list) -> None:
    """Give every member of a tied parameter set (`NodeVector.tie_to`) the set's total gradient, in place."""
    ties = pc._ties
    if ties.empty:
        return
    ties.tie_flat(sum_grad)
    for i, g in enumerate(input_grads):
        if g is not None:
            ties.tie_input(i, g)
