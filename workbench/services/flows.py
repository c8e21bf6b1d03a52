"""One training step's flows on the session's circuit, as plain arrays for the Flows view.

EM on a PC needs no autograd: after the forward pass, one top-down *flows* pass gives every node
the share of each example's probability that passes through it (the root's flow is 1). A sum
node hands its flow to its children in proportion to `w_c p_c / p_n`; a product node hands its
whole flow to each child. Summed over the batch, the flow through edge (n, c) is that edge's
*parameter flow*, and EM's new weight is the node's parameter flows normalised (plus a
pseudocount), mixed with the old weight by the step size:

    new_nc = (1 - step) * old_nc + step * (flow_nc + pc / deg) / sum_c' (flow_nc' + pc / deg)

`step_flows` runs the engine (torch executor, CPU) on one batch of the training data; the returned
`StepFlows` holds numpy arrays only, so views never touch torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

MAX_BATCH = 256  # examples in the step: enough for stable flow shares, quick on a 2-core CPU


@dataclass
class NodeUpdate:
    """The EM update of one sum node: per child (real edges only), arrays of shape [K]."""

    layer: int
    partition: int
    node: int  # index of the node within its sum layer (0-based, in node_mars row order)
    row: int  # node_mars row
    child_rows: np.ndarray  # [K] element_mars rows of the children (product nodes)
    old: np.ndarray  # [K] weights before the update
    flow: np.ndarray  # [K] parameter flows summed over the batch (expected counts)
    new: np.ndarray  # [K] weights after the update
    node_flow: float  # the node's own flow summed over the batch (= flow.sum(), up to rounding)


@dataclass
class StepFlows:
    """Flows of one forward + flows pass + EM update on `batch_size` training examples."""

    layers: list[dict]  # per layer: layer, kind, depth, num_nodes, mass (mean flow per example)
    log_likelihood: float  # mean log p(x) of the batch, nats
    batch_size: int
    step_size: float
    pseudocount: float
    seconds: float
    node_updates: dict[tuple[int, int], NodeUpdate] = field(default_factory=dict)  # (layer, node)
    top_nodes: dict[int, int] = field(default_factory=dict)  # sum layer -> node with the most flow

    def update(self, layer: int, node: int) -> NodeUpdate:
        """The EM update of `node` (index within sum `layer`)."""
        return self.node_updates[(layer, node)]


def _recording_backend(element_mass: dict[int, float], table_layer: dict[int, int]):
    """The torch executor, with product backward recording the flow mass of each product layer."""
    from engine.executor.backend import TorchBackend

    class Recording(TorchBackend):
        def prod_backward(self, table, element_flows, node_flows):
            layer = table_layer[id(table)]
            mass = sum(float(element_flows[pt.elem_rows].sum()) for pt in table.parts)
            element_mass[layer] = element_mass.get(layer, 0.0) + mass
            return super().prod_backward(table, element_flows, node_flows)

    return Recording()


def step_flows(
    root,
    data,
    block_size: int | None = None,
    tolerance: float = 0.5,
    step_size: float = 1.0,
    pseudocount: float = 0.1,
    batch_size: int = MAX_BATCH,
    max_nodes_per_layer: int = 256,
) -> StepFlows:
    """Run one EM step of `root` (compiled at `block_size`, `tolerance`) on the first `batch_size`
    rows of `data` ([N, num_vars] array or tensor) and return its flows as plain arrays.

    Node updates are kept for at most `max_nodes_per_layer` nodes per sum layer (the first ones and
    the one with the most flow), so a 300K-node circuit returns a bounded amount of data.
    """
    import torch

    from engine.circuit import CompiledCircuit

    t0 = time.perf_counter()
    x = torch.as_tensor(np.asarray(data)[:batch_size])
    pc = CompiledCircuit(root, block_size=block_size, tolerance=tolerance, backend="torch")
    table_layer = {id(t): i for i, t in enumerate(pc.tables.layers)}
    element_mass: dict[int, float] = {}
    pc.backend = _recording_backend(element_mass, table_layer)
    with torch.no_grad():
        pc.zero_flows()
        ll = pc.forward(x)
        node_flows = pc.backward_flows(accumulate_params=True)
        old = pc.params.clone()
        pc.em_step(step_size, pseudocount)
    n = x.shape[0]
    layers = []
    for layer in pc.plan.layers:
        if layer.kind == "product":
            mass = element_mass.get(layer.index, 0.0)
        else:
            _, lo, hi = layer.writes
            mass = float(node_flows[lo:hi].sum())
        layers.append(
            {
                "layer": layer.index,
                "kind": layer.kind,
                "depth": layer.depth,
                "num_nodes": layer.num_nodes,
                "mass": mass / max(n, 1),
            }
        )
    out = StepFlows(layers, float(ll.mean()), int(n), step_size, pseudocount, 0.0)
    for layer in pc.plan.sum_layers:
        _collect_updates(out, pc, layer, node_flows, old, max_nodes_per_layer)
    out.seconds = time.perf_counter() - t0
    return out


def _collect_updates(out: StepFlows, pc, layer, node_flows, old, cap: int) -> None:
    """NodeUpdate of the first `cap` nodes of sum `layer` and of the node with the most flow."""
    _, lo, hi = layer.writes
    per_node = node_flows[lo:hi].sum(1).double().cpu().numpy()  # [num_nodes], summed over the batch
    top = int(per_node.argmax()) if per_node.size else 0
    out.top_nodes[layer.index] = top
    wanted = set(range(min(cap, per_node.size))) | {top}
    for k, pt in enumerate(pc.tables.layers[layer.index].parts):
        rows = pt.node_idx.cpu().numpy() - lo  # [nb * bs] node index within the layer
        hit = np.flatnonzero(np.isin(rows, list(wanted)))
        if not hit.size:
            continue
        w_old, w_new = pt.weights(old), pt.weights(pc.params)  # [nb, bs, width * bs]
        pf, mk = pt.weights(pc.param_flows), pt.weights(pc.param_mask)
        child = pt.child_idx.cpu().numpy()  # [nb, width * bs]
        bs = pt.block_size
        for i in hit:
            b, j = divmod(int(i), bs)
            real = mk[b, j].cpu().numpy().astype(bool)
            node = int(rows[i])
            out.node_updates[(layer.index, node)] = NodeUpdate(
                layer=layer.index,
                partition=k,
                node=node,
                row=int(lo + node),
                child_rows=child[b][real],
                old=w_old[b, j].double().cpu().numpy()[real],
                flow=pf[b, j].double().cpu().numpy()[real],
                new=w_new[b, j].double().cpu().numpy()[real],
                node_flow=float(per_node[node]),
            )
