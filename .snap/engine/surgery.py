"""Structure surgery: prune block edges by flow, grow by duplicating nodes, several heads in one pass.

- `prune(pc_or_root, keep_fraction, x)`: PyJuice's prune-by-score idea at this engine's granularity,
  the *block edge* (a bs x bs tile: the unit the kernels skip). An edge's score is its parameter
  flow summed over the tile (the expected number of times the data uses it); the top
  `keep_fraction` of all block edges are kept, plus each node block's best edge so no node is left
  without children. Kept weights are renormalised per node, so the result is a normalised circuit.
  (Zeroing single weights inside a tile would not prune: EM's pseudocount revives them.)
- `grow(pc_or_root, noise)`: every vector below the root doubles (nodes n..2n-1 copy nodes 0..n-1);
  a sum node splits each weight in half between a child and its copy, so with `noise=0` the
  distribution is unchanged; `noise > 0` then perturbs weights and input parameters (log-normal
  factors / Gaussian shifts) so the copies can diverge under training.
- `multi_root(*heads)` + `head_log_probs(pc, heads, x)`: several heads over the same variables in
  one compiled circuit, all evaluated by one forward pass (see the function for why a wrapper).

All functions return a new root; the input circuit is left untouched. Tied vectors (`NodeVector.tie_to`)
stay tied: prune scores a tied set by its total flow and keeps one edge set for all its members.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from engine.circuit_access import node_row
from engine.nodes import (
    CircuitError,
    InputNodes,
    NodeVector,
    ProdNodes,
    SumNodes,
    inputs,
    multiply,
    summate,
    tie_source,
)

# ----------------------------------------------------------------------------------- helpers


def _root_and_pc(pc_or_root):
    if isinstance(pc_or_root, NodeVector):
        return pc_or_root, None
    if hasattr(pc_or_root, "sync_to_nodes"):
        return pc_or_root.sync_to_nodes(), pc_or_root
    raise TypeError(f"expected a root NodeVector or a CompiledCircuit, got {type(pc_or_root).__name__}")


def _copy_input(v: InputNodes, params=None) -> InputNodes:
    out = inputs(
        v.var,
        v.num_nodes if params is None else params.shape[0],
        v.dist,
        params=v.params.clone() if params is None else params,
        block_size=v.block_size,
    )
    out.name = v.name
    return out


@torch.no_grad()
def edge_flows(pc) -> dict[int, torch.Tensor]:
    """Sum vector uid -> its accumulated parameter flows `[E, bs, bs]` (same layout as its params).

    Reads them through the public `sync_to_nodes` (flows swapped into `pc.params`, then restored).
    """
    saved = pc.params.clone()
    try:
        pc.params.copy_(pc.param_flows)
        root = pc.sync_to_nodes()
        out = {s.uid: s.params.clone() for s in root.topological() if isinstance(s, SumNodes)}
    finally:
        pc.params.copy_(saved)
        pc.sync_to_nodes()
    return out


# ------------------------------------------------------------------------------------- prune


def prune(pc_or_root, keep_fraction: float, x=None, missing=None) -> NodeVector:
    """New root keeping the top `keep_fraction` of block edges by flow (see the module docstring).

    Flows come from the batch `x` (a fresh compile if a root is given), or from a CompiledCircuit's
    already accumulated flows when `x` is None.
    """
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    root, pc = _root_and_pc(pc_or_root)
    if pc is None or x is not None:
        if x is None:
            raise ValueError(
                "prune needs data x to score edges (or a CompiledCircuit with accumulated flows)"
            )
        import copy

        from engine.circuit import compile as compile_pc

        # a deep copy keeps vector uids, so flows map back onto `root` without touching it
        pc = compile_pc(copy.deepcopy(root), device=pc.device if pc is not None else "cpu")
        pc.zero_flows()
        pc.accumulate_flows(x, missing)
    flows = edge_flows(pc)
    if all(float(f.sum()) == 0.0 for f in flows.values()):
        raise ValueError("no parameter flows accumulated: pass x, or run pc.accumulate_flows first")
    sums = [v for v in root.topological() if isinstance(v, SumNodes)]
    groups = _tie_groups(sums)
    for members in groups:  # a tied set is scored by its total flow
        total = sum(flows[m.uid] for m in members)
        flows.update({m.uid: total for m in members})
    keep = _choose_edges(sums, flows, keep_fraction)
    for members in groups:  # and keeps one edge set, so its members stay tied
        k = np.logical_or.reduce([keep[m.uid] for m in members])
        keep.update({m.uid: k for m in members})
    return _rebuild(root, lambda v, kids: _pruned_sum(v, kids, keep[v.uid]))


def _tie_groups(vectors: list[NodeVector]) -> list[list[NodeVector]]:
    """Tied sets (`NodeVector.tie_to`) of two or more among `vectors`."""
    by: dict[int, list[NodeVector]] = {}
    for v in vectors:
        by.setdefault(tie_source(v).uid, []).append(v)
    return [m for m in by.values() if len(m) > 1]


def _choose_edges(sums: list[SumNodes], flows: dict, keep_fraction: float) -> dict[int, np.ndarray]:
    scores = [flows[s.uid].double().sum((1, 2)).cpu().numpy() for s in sums]  # [E] per vector
    flat = np.concatenate(scores)
    n_keep = max(1, math.ceil(keep_fraction * flat.size))
    threshold = np.sort(flat)[::-1][n_keep - 1]
    budget = n_keep
    keep = {}
    for s, sc in zip(sums, scores):
        k = sc > threshold
        best = np.zeros(sc.size, dtype=bool)  # each node block keeps its highest-flow edge
        order = np.lexsort((-sc, s.edge_ids[0]))
        first = np.r_[True, np.diff(s.edge_ids[0][order]) != 0]
        best[order[first]] = True
        keep[s.uid] = k | best
        budget -= int(k.sum())
    for s, sc in zip(sums, scores):  # ties at the threshold fill what is left of the budget
        ties = np.flatnonzero((sc == threshold) & ~keep[s.uid])[: max(budget, 0)]
        keep[s.uid][ties] = True
        budget -= ties.size
    return keep


def _pruned_sum(s: SumNodes, kids: list[NodeVector], keep: np.ndarray) -> SumNodes:
    edges, params = s.edge_ids[:, keep], s.params[torch.as_tensor(keep)]
    ranges = s.child_block_ranges()
    used = [k for k, (lo, hi) in enumerate(ranges) if ((edges[1] >= lo) & (edges[1] < hi)).any()]
    shift = np.zeros(ranges[-1][1], dtype=np.int64)  # old child block -> new child block
    start = 0
    for k in used:
        lo, hi = ranges[k]
        shift[lo:hi] = np.arange(hi - lo) + start
        start += hi - lo
    new_edges = np.stack([edges[0], shift[edges[1]]])
    out = summate(
        *(kids[k] for k in used),
        num_nodes=s.num_nodes,
        edge_ids=new_edges,
        block_size=s.block_size,
        params=params.clone(),
    )
    out.name = s.name
    return out


def _rebuild(root: NodeVector, make_sum, make_input=_copy_input, make_prod=None) -> NodeVector:
    """Copy the DAG children first; sums are built by `make_sum(old, new_children)`. Tied vectors stay
    tied: each new member ties to its set's first new member (whose parameters the set takes)."""
    new: dict[int, NodeVector] = {}
    leads: dict[int, NodeVector] = {}  # tie source uid -> first new member
    for v in root.topological():
        kids = [new[c.uid] for c in v.children]
        if isinstance(v, InputNodes):
            out = make_input(v)
        elif isinstance(v, ProdNodes):
            out = (
                make_prod(v, kids)
                if make_prod
                else multiply(*kids, edge_ids=v.edge_ids, block_size=v.block_size)
            )
            out.name = v.name
        else:
            out = make_sum(v, kids)
        if not isinstance(v, ProdNodes):
            lead = leads.setdefault(tie_source(v).uid, out)
            if lead is not out:
                out.tie_to(lead)
        new[v.uid] = out
    return new[root.uid]


# -------------------------------------------------------------------------------------- grow


def grow(pc_or_root, noise: float = 0.1, seed: int | None = None) -> NodeVector:
    """New root where every vector below the root has twice the nodes (see the module docstring)."""
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    root, _ = _root_and_pc(pc_or_root)
    if root.num_nodes != 1:
        raise CircuitError(f"grow needs a one-node root, got {root.num_nodes} nodes")
    if not isinstance(root, SumNodes):
        root = summate(root, num_nodes=1)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    rootid = root.uid

    def make_input(v):
        p = torch.cat([v.params, _perturb_input(v.dist, v.params, noise, gen)])
        return _copy_input(v, p)

    def make_prod(v, kids):
        offs = np.array([c.num_nodes // v.block_size for c in v.children])  # copy block offsets
        edges = np.concatenate([v.edge_ids, v.edge_ids + offs[None, :]])
        return multiply(*kids, edge_ids=edges, block_size=v.block_size)

    def make_sum(v, kids):
        return _grown_sum(v, kids, top=v.uid == rootid, noise=noise, gen=gen)

    return _rebuild(root, make_sum, make_input, make_prod)


def _grown_sum(s: SumNodes, kids, top: bool, noise: float, gen) -> SumNodes:
    nb = s.num_blocks
    shift = s.child_block_ranges()  # child k's blocks double: originals, then copies
    old_child = s.edge_ids[1]
    new_orig = np.empty_like(old_child)
    new_copy = np.empty_like(old_child)
    for lo, hi in shift:
        m = (old_child >= lo) & (old_child < hi)
        new_orig[m] = 2 * lo + (old_child[m] - lo)
        new_copy[m] = 2 * lo + (hi - lo) + (old_child[m] - lo)
    half = s.params / 2
    rows = [s.edge_ids[0]] if top else [s.edge_ids[0], s.edge_ids[0] + nb]
    edge_rows, edge_cols, params = [], [], []
    for r in rows:
        edge_rows += [r, r]
        edge_cols += [new_orig, new_copy]
        params += [half, half]
    p = torch.cat(params)
    if noise > 0:
        p = p * torch.exp(noise * torch.randn(p.shape, generator=gen))
    edges = np.stack([np.concatenate(edge_rows), np.concatenate(edge_cols)])
    out = summate(
        *kids,
        num_nodes=s.num_nodes if top else 2 * s.num_nodes,
        edge_ids=edges,
        block_size=s.block_size,
        params=p,
    )
    out.name = s.name
    return out


def _perturb_input(dist, params: torch.Tensor, noise: float, gen) -> torch.Tensor:
    """A perturbed copy of input params `[n, num_params]` (unchanged when noise == 0)."""
    p = params.clone()
    if noise == 0 or dist.num_params == 0 or getattr(dist, "fixed", False):
        return p
    eps = noise * torch.randn(p.shape, generator=gen)
    if dist.name == "categorical":
        q = p * eps.exp()
        return q / q.sum(1, keepdim=True)
    if dist.name == "bernoulli":
        logit = (p.clamp(1e-6, 1 - 1e-6).log() - (1 - p).clamp(1e-6, 1).log()) + eps
        return torch.sigmoid(logit).where((p > 0) & (p < 1), p)  # literals (p = 0 or 1) stay
    if dist.name == "gaussian":
        return torch.stack([p[:, 0] + eps[:, 0] * p[:, 1], p[:, 1] * eps[:, 1].exp()], 1)
    return p  # families without a perturbation rule are copied exactly


# --------------------------------------------------------------------------------- multi-root


def multi_root(*heads: NodeVector) -> SumNodes:
    """One-node root mixing all nodes of `heads` uniformly, so one compile holds every head.

    The compiler needs a one-node root (`engine.compiler.ir.wrap_root`); this root only makes the
    heads reachable. Read the heads with `head_log_probs`. Each head must be a sum or input vector
    (products are not stored in node rows); heads must share their scope.
    """
    if not heads:
        raise CircuitError("multi_root needs at least one head")
    for h in heads:
        if not isinstance(h, (SumNodes, InputNodes)):
            raise CircuitError(f"a head must be a sum or input vector, got {type(h).__name__}")
    n = sum(h.num_nodes for h in heads)
    edges = np.stack([np.zeros(n, dtype=np.int64), np.arange(n)])
    return summate(*heads, num_nodes=1, edge_ids=edges, block_size=1, params=torch.full((n, 1, 1), 1.0 / n))


@torch.no_grad()
def head_log_probs(pc, heads: list[NodeVector], x, missing=None) -> torch.Tensor:
    """log p_h(x) of every node of every head `[B, sum of head sizes]`, from ONE forward pass."""
    node_mars, _ = pc.forward_mars(x, missing)
    rows = []
    for h in heads:
        start = node_row(pc, h)
        if start is None:
            raise CircuitError("a head is not part of this compiled circuit (compile multi_root(*heads))")
        rows.append(node_mars[start : start + h.num_nodes])
    return torch.cat(rows).T.contiguous()
