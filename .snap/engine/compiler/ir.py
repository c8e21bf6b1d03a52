"""Validation and normalisation: node-vector DAG -> an IR of alternating product/sum layers.

After this pass every sum vector's children are product vectors (`ProdIR`), every product's factors
are sum or input vectors (products of products are flattened; a sum over a sum or input gets an
identity product), and the root is one sum node. Nothing here touches parameters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.nodes import CircuitError, InputNodes, NodeVector, ProdNodes, SumNodes


@dataclass(eq=False)
class ProdIR:
    """A product vector over sum/input vectors: `factors[k] = (vector, node_index: [num_nodes])`."""

    num_nodes: int
    factors: list[tuple[NodeVector, np.ndarray]]
    source: NodeVector | None = None  # the user's ProdNodes, or None for an inserted identity

    @property
    def arity(self) -> int:
        return len(self.factors)


@dataclass
class CircuitIR:
    root: SumNodes
    inputs: list[InputNodes]
    sums: list[SumNodes]  # children before parents
    sum_children: dict[int, list[ProdIR]]  # sum uid -> one ProdIR per user child
    depth: dict[int, int] = field(default_factory=dict)  # uid -> depth (inputs 0)
    num_vars: int = 0


def compute_scopes(order: list[NodeVector]) -> dict[int, frozenset]:
    """Scope of every vector; raises CircuitError if a product is not decomposable or a sum not smooth."""
    scopes: dict[int, frozenset] = {}
    for v in order:
        if isinstance(v, InputNodes):
            scopes[v.uid] = v.scope
        elif isinstance(v, ProdNodes):
            seen: set = set()
            for k, c in enumerate(v.children):
                sc = scopes[c.uid]
                overlap = seen & sc
                if overlap:
                    raise CircuitError(
                        f"circuit is not decomposable: a product's children share variables {sorted(overlap)[:5]}"
                    )
                seen |= sc
            scopes[v.uid] = frozenset(seen)
        elif isinstance(v, SumNodes):
            first = scopes[v.children[0].uid]
            for c in v.children[1:]:
                if scopes[c.uid] != first:
                    diff = sorted(first ^ scopes[c.uid])[:5]
                    raise CircuitError(
                        f"circuit is not smooth: a sum's children have different scopes (differ in {diff})"
                    )
            scopes[v.uid] = first
        else:
            raise CircuitError(f"unknown node vector type {type(v).__name__}")
    return scopes


def wrap_root(root: NodeVector) -> SumNodes:
    """The root must be one node; a single product or input node gets a one-child sum on top."""
    if not isinstance(root, NodeVector):
        raise CircuitError(f"root must be a node vector, got {type(root).__name__}")
    if root.num_nodes != 1:
        raise CircuitError(f"the root vector must have exactly one node, got {root.num_nodes}")
    if isinstance(root, SumNodes):
        return root
    return SumNodes([root], 1, block_size=1)


def _flatten_product(p: ProdNodes, memo: dict[int, ProdIR]) -> ProdIR:
    if p.uid in memo:
        return memo[p.uid]
    edges = p.node_edges()
    factors: list[tuple[NodeVector, np.ndarray]] = []
    for k, c in enumerate(p.children):
        if isinstance(c, ProdNodes):
            inner = _flatten_product(c, memo)
            factors.extend((v, idx[edges[:, k]]) for v, idx in inner.factors)
        else:
            factors.append((c, edges[:, k]))
    ir = ProdIR(p.num_nodes, factors, source=p)
    memo[p.uid] = ir
    return ir


def build_ir(root: NodeVector) -> CircuitIR:
    """Validate and normalise the DAG under `root`."""
    root = wrap_root(root)
    order = root.topological()
    scopes = compute_scopes(order)
    memo: dict[int, ProdIR] = {}
    sums = [v for v in order if isinstance(v, SumNodes)]
    inputs = [v for v in order if isinstance(v, InputNodes)]
    sum_children: dict[int, list[ProdIR]] = {}
    for s in sums:
        kids = []
        for c in s.children:
            if isinstance(c, ProdNodes):
                kids.append(_flatten_product(c, memo))
            else:  # sum or input child: identity product keeps layers alternating
                kids.append(ProdIR(c.num_nodes, [(c, np.arange(c.num_nodes))]))
        sum_children[s.uid] = kids
    depth = {v.uid: 0 for v in inputs}
    for s in sums:
        depth[s.uid] = 1 + max(depth[f.uid] for p in sum_children[s.uid] for f, _ in p.factors)
    num_vars = max(scopes[root.uid]) + 1
    return CircuitIR(root, inputs, sums, sum_children, depth, num_vars)
