"""Block-sparse sum layers: a copy of a circuit whose sum vectors keep a random share of block edges.

Template circuits (HCLT, PD, RAT-SPN, HMM) connect every node block of a sum vector to every child
block, so all node blocks of a sum layer have the same number of child blocks: the compiler makes
one partition with no padding, and the block-size / tolerance trade-off has nothing to act on.
Pruned or learnt circuits are not like that. `block_sparse` cuts each sum vector into blocks of at
most `block_size` nodes and keeps, for every node block, a Binomial(degree, density) share (at
least one) of its child blocks, so degrees vary and partitions and padding appear, as they do in
PyJuice's block-sparse layers. The result is a new DAG; inputs are shared with the original.
"""

from __future__ import annotations

import math

import numpy as np

from engine.nodes import NodeVector, multiply, summate, tie_source
from engine.structures._checks import positive_int


def block_sparse(root: NodeVector, density: float, block_size: int = 4, seed: int = 0) -> NodeVector:
    """A copy of `root` whose sum vectors keep about `density` (0, 1] of their block edges; tied sum
    vectors (`NodeVector.tie_to`) keep one random edge subset and stay tied."""
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    block_size = positive_int("block_size", block_size)
    if density == 1.0:
        return root
    rng = np.random.default_rng(seed)
    new: dict[int, NodeVector] = {}
    tied: dict[int, NodeVector] = {}  # tie source uid -> the first sparse member: the others copy its edges
    for v in root.topological():  # children before parents
        kids = [new[c.uid] for c in v.children]
        if v.kind == "input":
            new[v.uid] = v
        elif v.kind == "product":
            same = all(a is b for a, b in zip(kids, v.children))
            new[v.uid] = v if same else multiply(*kids, edge_ids=v.edge_ids, block_size=v.block_size)
        elif tie_source(v).uid in tied:  # a tied sum keeps its set's one edge pattern and parameters
            new[v.uid] = summate(*kids, num_nodes=v.num_nodes, tie_to=tied[tie_source(v).uid])
        else:
            new[v.uid] = tied[tie_source(v).uid] = _sparse_sum(
                v, kids, density, math.gcd(v.block_size, block_size), rng
            )
    return new[root.uid]


def _sparse_sum(v, kids: list[NodeVector], density: float, b: int, rng) -> NodeVector:
    """Sum vector `v` over `kids`, re-cut into blocks of `b` nodes, each keeping a random edge subset."""
    r = v.block_size // b
    sub = np.arange(r)
    # every (node block, child block) edge at v's block size becomes r x r edges at block size b
    parent = (v.edge_ids[0][:, None, None] * r + sub[None, :, None]).repeat(r, 2).ravel()
    child = (v.edge_ids[1][:, None, None] * r + sub[None, None, :]).repeat(r, 1).ravel()
    order = np.lexsort((rng.random(parent.size), parent))  # random order within each node block
    parent, child = parent[order], child[order]
    starts = np.searchsorted(parent, np.arange(v.num_nodes // b))
    degree = np.diff(np.append(starts, parent.size))
    keep_n = np.maximum(1, rng.binomial(degree, density))
    rank = np.arange(parent.size) - starts[parent]
    keep = rank < keep_n[parent]
    edge_ids = np.stack([parent[keep], child[keep]])
    return summate(*kids, num_nodes=v.num_nodes, edge_ids=edge_ids, block_size=b)
