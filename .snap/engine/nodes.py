"""Node vectors: the user-facing circuit DAG, PyJuice style.

A circuit is a DAG of *node vectors*. Each vector holds `num_nodes` nodes of one kind (input, product
or sum), grouped into *node blocks* of `block_size` consecutive nodes. Edges are stored at block
level, so a fully connected 512x512 sum vector costs one block edge per tile, not 262,144 entries.

- `InputNodes`: `num_nodes` univariate leaves over one variable, all of one distribution family.
- `ProdNodes`: block `i` multiplies, elementwise, block `edge_ids[i, k]` of each child `k`.
- `SumNodes`: block edge `(i, j)` connects every node of node block `i` to every node of child
  block `j` (blocks of the concatenated children); `params: [num_block_edges, bs, bs]`.
"""

from __future__ import annotations

import copy
import itertools
from typing import Sequence

import numpy as np
import torch

from engine.dists import Distribution

MAX_DEFAULT_BLOCK = 64
_ids = itertools.count()


def largest_pow2_divisor(n: int, cap: int = MAX_DEFAULT_BLOCK) -> int:
    """Largest power of two that divides `n`, at most `cap`."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


class CircuitError(ValueError):
    """A circuit that cannot be a valid probabilistic circuit (the message names the reason)."""


class NodeVector:
    """Base class: `num_nodes` nodes of one kind, in blocks of `block_size`."""

    kind = "abstract"

    def __init__(self, children: Sequence["NodeVector"], num_nodes: int, block_size: int):
        if int(num_nodes) < 1:
            raise CircuitError(f"num_nodes must be >= 1, got {num_nodes}")
        if block_size < 1 or num_nodes % block_size:
            raise CircuitError(
                f"block_size {block_size} does not divide num_nodes {num_nodes} of a {self.kind} vector"
            )
        for c in children:
            if not isinstance(c, NodeVector):
                raise CircuitError(f"children must be node vectors, got {type(c).__name__}")
        self.children: list[NodeVector] = list(children)
        self.num_nodes = int(num_nodes)
        self.block_size = int(block_size)
        self.uid = next(_ids)
        self.name: str | None = None
        self.tied_to: NodeVector | None = None  # the vector whose parameters this one shares (tie_to)

    @property
    def num_blocks(self) -> int:
        return self.num_nodes // self.block_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_nodes={self.num_nodes}, block_size={self.block_size})"

    def __deepcopy__(self, memo: dict) -> "NodeVector":
        """Copy the DAG under this vector children first, without recursion (a 1000-step HMM is a
        chain deeper than Python's recursion limit); shared tensors and ties stay shared."""
        if id(self) in memo:
            return memo[id(self)]
        order = [v for v in self.topological() if id(v) not in memo]
        for v in order:
            memo[id(v)] = type(v).__new__(type(v))
        for v in order:
            new = memo[id(v)]
            for key, val in v.__dict__.items():
                if key == "children":
                    new.children = [memo[id(c)] for c in val]
                else:  # tied_to outside this DAG copies its own DAG the same way
                    setattr(new, key, copy.deepcopy(val, memo))
        return memo[id(self)]

    def tie_to(self, source: "NodeVector") -> "NodeVector":
        """Share `source`'s parameters (PyJuice's `tie_params`); returns self.

        Both must be sum vectors of the same shape (num_nodes, block_size, edge_ids, child sizes) or
        input vectors of the same size and family (variables may differ). A tie to a copy goes to
        its source. The compiled circuit keeps a slot per copy (memory grows with copies), sums the
        copies' flows into the source before each EM update and copies the result back, so the
        learnable set does not grow (`CompiledCircuit.num_parameters`)."""
        if not isinstance(source, NodeVector):
            raise CircuitError(f"tie_to needs a node vector, got {type(source).__name__}")
        root = tie_source(source)  # the whole chain: ties never form a cycle
        if root is self:
            raise CircuitError("a node vector cannot be tied to itself (directly or through a chain of ties)")
        if self.tied_to is not None and self.tied_to is not root:
            raise CircuitError("this node vector is already tied to another vector")
        mine, theirs = self._tie_signature(), root._tie_signature()
        if mine is None or theirs is None:
            raise CircuitError(f"only sum and input vectors have parameters to tie, not {self.kind} vectors")
        if mine != theirs:
            raise CircuitError(f"cannot tie a {mine} vector to a {theirs} vector: shapes or families differ")
        if isinstance(self, SumNodes) and not np.array_equal(self.edge_ids, root.edge_ids):
            raise CircuitError("cannot tie sum vectors whose block edges (edge_ids) differ")
        self.tied_to = root
        self.params = root.params
        return self

    def _tie_signature(self) -> tuple | None:
        """What two vectors must share to be tied (None: nothing to tie)."""
        return None

    def topological(self) -> list["NodeVector"]:
        """All vectors reachable from this one, children before parents (iterative, no recursion)."""
        order, seen, stack = [], set(), [(self, False)]
        while stack:
            v, expanded = stack.pop()
            if expanded:
                order.append(v)
                continue
            if v.uid in seen:
                continue
            seen.add(v.uid)
            stack.append((v, True))
            stack.extend((c, False) for c in reversed(v.children) if c.uid not in seen)
        return order


class InputNodes(NodeVector):
    """`num_nodes` leaves over variable `var`; `params: [num_nodes, dist.num_params]`."""

    kind = "input"

    def __init__(self, var: int, num_nodes: int, dist: Distribution, params=None, block_size=None):
        if not isinstance(dist, Distribution):
            raise CircuitError(f"dist must be an engine.dists distribution, got {type(dist).__name__}")
        if int(var) < 0:
            raise CircuitError(f"variable index must be >= 0, got {var}")
        bs = block_size or largest_pow2_divisor(num_nodes)
        super().__init__([], num_nodes, bs)
        self.var = int(var)
        self.dist = dist
        if params is None:
            params = dist.init_params(self.num_nodes)
        params = torch.as_tensor(params, dtype=torch.float32)
        if params.shape != (self.num_nodes, dist.num_params):
            raise CircuitError(
                f"input params must have shape {(self.num_nodes, dist.num_params)}, got {tuple(params.shape)}"
            )
        dist.check_params(params)
        self.params = params.clone()

    @property
    def scope(self) -> frozenset:
        return frozenset((self.var,))

    def _tie_signature(self) -> tuple:
        return ("input", self.num_nodes, self.dist.key())


class ProdNodes(NodeVector):
    """Products; `edge_ids: [num_blocks, num_children]` picks one block of each child per block."""

    kind = "product"

    def __init__(self, children, edge_ids=None, block_size=None):
        if len(children) < 1:
            raise CircuitError("multiply needs at least one child")
        if edge_ids is None:
            sizes = {c.num_nodes for c in children}
            if len(sizes) != 1:
                raise CircuitError(
                    f"multiply without edge_ids needs children of equal num_nodes, got {sorted(sizes)}"
                )
            n = sizes.pop()
            bs = block_size or min(largest_pow2_divisor(n), *(c.block_size for c in children))
            edge_ids = np.repeat(np.arange(n // bs)[:, None], len(children), axis=1)
        else:
            edge_ids = np.asarray(edge_ids, dtype=np.int64)
            bs = block_size or min(c.block_size for c in children)
            if edge_ids.ndim != 2 or edge_ids.shape[1] != len(children):
                raise CircuitError(
                    f"multiply edge_ids must be [num_blocks, {len(children)}], got {edge_ids.shape}"
                )
        for k, c in enumerate(children):
            if c.num_nodes % bs:
                raise CircuitError(f"block_size {bs} does not divide child {k}'s num_nodes {c.num_nodes}")
            col = edge_ids[:, k]
            if col.size and (col.min() < 0 or col.max() >= c.num_nodes // bs):
                raise CircuitError(f"multiply edge_ids column {k} out of range [0, {c.num_nodes // bs})")
        super().__init__(children, edge_ids.shape[0] * bs, bs)
        self.edge_ids = edge_ids

    def node_edges(self) -> np.ndarray:
        """Node-level edges `[num_nodes, num_children]`: node index inside each child."""
        bs = self.block_size
        off = np.arange(bs)
        return (self.edge_ids[:, None, :] * bs + off[None, :, None]).reshape(self.num_nodes, -1)


class SumNodes(NodeVector):
    """Mixtures; `edge_ids: [2, E]` block edges (node block, child block), `params: [E, bs, bs]`.

    Child blocks index the concatenation of all children, each cut into blocks of `block_size`.
    Parameters are normalised over each node's children.
    """

    kind = "sum"

    def __init__(self, children, num_nodes, edge_ids=None, block_size=None, params=None):
        if len(children) < 1:
            raise CircuitError("summate needs at least one child")
        sizes = [c.num_nodes for c in children]
        bs = block_size or min(
            largest_pow2_divisor(int(num_nodes)), *(largest_pow2_divisor(s) for s in sizes)
        )
        for k, s in enumerate(sizes):
            if s % bs:
                raise CircuitError(f"summate block_size {bs} does not divide child {k}'s num_nodes {s}")
        super().__init__(children, num_nodes, bs)
        num_child_blocks = sum(sizes) // bs
        if edge_ids is None:
            nb = self.num_blocks
            edge_ids = np.stack(
                [np.repeat(np.arange(nb), num_child_blocks), np.tile(np.arange(num_child_blocks), nb)]
            )
        edge_ids = np.asarray(edge_ids, dtype=np.int64)
        if edge_ids.ndim != 2 or edge_ids.shape[0] != 2:
            raise CircuitError(f"summate edge_ids must be [2, num_edges], got {edge_ids.shape}")
        if edge_ids.size == 0:
            raise CircuitError("summate edge_ids is empty")
        if edge_ids[0].min() < 0 or edge_ids[0].max() >= self.num_blocks:
            raise CircuitError(f"summate edge_ids[0] out of range [0, {self.num_blocks})")
        if edge_ids[1].min() < 0 or edge_ids[1].max() >= num_child_blocks:
            raise CircuitError(f"summate edge_ids[1] out of range [0, {num_child_blocks})")
        order = np.lexsort((edge_ids[1], edge_ids[0]))
        edge_ids = edge_ids[:, order]
        pairs = edge_ids[0] * num_child_blocks + edge_ids[1]
        if np.any(np.diff(pairs) == 0):
            raise CircuitError("summate edge_ids has duplicate block edges")
        if np.unique(edge_ids[0]).size != self.num_blocks:
            raise CircuitError("summate edge_ids leaves some node block without children")
        self.edge_ids = edge_ids
        if params is None:  # random init: finite and positive by construction, no checks needed
            params = torch.rand(edge_ids.shape[1], bs, bs).add_(0.01)
            self.params = normalize_sum_params(params, edge_ids[0], self.num_blocks, fast=True)
            return
        else:
            params = torch.as_tensor(params, dtype=torch.float32)
            if params.dim() == 3 and params.shape[0] == order.size:
                params = params[torch.as_tensor(order)]  # follow the sorted edge order
        if params.shape != (edge_ids.shape[1], bs, bs):
            raise CircuitError(
                f"summate params must have shape {(edge_ids.shape[1], bs, bs)}, got {tuple(params.shape)}"
            )
        if not torch.isfinite(params).all() or (params < 0).any():
            raise CircuitError("summate params must be finite and non-negative")
        self.params = normalize_sum_params(params, edge_ids[0], self.num_blocks)

    def _tie_signature(self) -> tuple:
        return ("sum", self.num_nodes, self.block_size, tuple(c.num_nodes for c in self.children))

    def child_block_ranges(self) -> list[tuple[int, int]]:
        """For each child, its range of child-block ids in the concatenation."""
        out, start = [], 0
        for c in self.children:
            n = c.num_nodes // self.block_size
            out.append((start, start + n))
            start += n
        return out


def tie_source(v: NodeVector) -> NodeVector:
    """The vector at the end of `v`'s tie chain (v itself when untied)."""
    seen = 0
    while v.tied_to is not None:
        v, seen = v.tied_to, seen + 1
        if seen > 1_000_000:
            raise CircuitError("tie chain does not end (a cycle of tied vectors)")
    return v


def normalize_sum_params(
    params: torch.Tensor, node_block: np.ndarray, num_blocks: int, fast=False
) -> torch.Tensor:
    """Normalise `[E, bs, bs]` tile params so each node's weights over all its children sum to 1."""
    row_sums = torch.zeros(num_blocks, params.shape[1], dtype=torch.float64)
    row_sums.index_add_(0, torch.as_tensor(node_block), params.sum(2, dtype=torch.float64))
    if (row_sums <= 0).any():
        raise CircuitError("a sum node has all-zero weights")
    if fast:  # random init: float32 scaling in place (GBs for HCLT-512; exactness irrelevant)
        return params.mul_((1.0 / row_sums).float()[torch.as_tensor(node_block)][:, :, None])
    # user params: divide in float64 so already-normalised weights round-trip bit for bit
    return (params.double() / row_sums[torch.as_tensor(node_block)][:, :, None]).float()


def inputs(
    var: int,
    num_nodes: int,
    dist: Distribution,
    params=None,
    block_size=None,
    tie_to: InputNodes | None = None,
) -> InputNodes:
    """`num_nodes` input nodes over variable `var` with distribution `dist`; `tie_to`: an input
    vector whose parameters these share (see `NodeVector.tie_to`)."""
    v = InputNodes(var, num_nodes, dist, params=params, block_size=block_size)
    return v if tie_to is None else v.tie_to(tie_to)


def multiply(*children: NodeVector, edge_ids=None, block_size=None) -> ProdNodes:
    """Product vector; without `edge_ids`, node `i` multiplies node `i` of every child."""
    return ProdNodes(children, edge_ids=edge_ids, block_size=block_size)


def summate(
    *children: NodeVector,
    num_nodes: int,
    edge_ids=None,
    block_size=None,
    params=None,
    tie_to: SumNodes | None = None,
) -> SumNodes:
    """Sum vector of `num_nodes` nodes; without `edge_ids`, fully connected to all children.

    `tie_to`: a sum vector of the same shape whose parameters this one shares (its edges and block
    size are the defaults; see `NodeVector.tie_to`)."""
    if tie_to is not None:
        edge_ids = tie_to.edge_ids if edge_ids is None else edge_ids
        block_size = block_size or tie_to.block_size
    v = SumNodes(children, num_nodes, edge_ids=edge_ids, block_size=block_size, params=params)
    return v if tie_to is None else v.tie_to(tie_to)
