"""Input layers as modules: one per input group of the plan, holding its parameters, EM statistics
and the variable of each node; and the one gather of the data onto a layer's nodes."""

from __future__ import annotations

import torch

from engine.compiler.plan import Layer
from engine.nodes import NodeVector


def gather(vars_: torch.Tensor, x: torch.Tensor, missing: torch.Tensor, discrete: bool):
    """Each node's observed value `xv: [n, B]` (long if `discrete`) and missing flag `miss: [n, B]`
    from data `x, missing: [B, num_vars]` (reads n * B values)."""
    xv, miss = x[:, vars_].T, missing[:, vars_].T
    return (xv.long() if discrete else xv), miss.bool()


class InputLayer(torch.nn.Module):
    """One input group: `params: [n, num_params]`, `stats: [n, num_stats]`, `vars: [n]`."""

    def __init__(self, layer: Layer, vectors: dict[int, NodeVector]):
        super().__init__()
        g = layer.input_group
        self.layer, self.dist = layer, g.dist
        self.row_start, self.num_nodes = g.row_start, g.num_nodes
        self.register_buffer("params", torch.cat([vectors[uid].params for uid, _, _ in g.vectors]))
        self.register_buffer("stats", torch.zeros(g.num_nodes, self.dist.num_stats))
        self.register_buffer("vars", torch.as_tensor(g.vars, dtype=torch.long))

    @property
    def rows(self) -> slice:
        """This layer's rows of node_mars / node_flows."""
        return slice(self.row_start, self.row_start + self.num_nodes)

    def gather(self, x: torch.Tensor, missing: torch.Tensor):
        """`(xv, miss)`: the data on this layer's nodes, `[n, B]` each."""
        return gather(self.vars, x, missing, self.dist.discrete)

    def check_data(self, x: torch.Tensor, missing: torch.Tensor) -> None:
        """Raise ValueError naming the first variable with an observed value outside the support."""
        for var in torch.unique(self.vars).tolist():
            col = x[:, var][~missing[:, var]]
            self.dist.check_data(col.cpu(), var)

    @torch.no_grad()
    def sync_to_nodes(self, vectors: dict[int, NodeVector]) -> None:
        p = self.params.detach().float().cpu()
        for uid, first, n in self.layer.input_group.vectors:
            vectors[uid].params = p[first : first + n].clone()

    def extra_repr(self) -> str:
        return f"dist={self.dist.key()}, nodes={self.num_nodes}"
