"""Layered drawings of a circuit at three zoom levels, as plain column data.

A circuit of 10^5+ nodes is never drawn node by node. Three levels, each a `Drawing`:

1. `layer_overview(plan)`: one glyph per layer of the plan (input groups, product and sum layers).
2. `vector_dag(index, ranks)`: node vectors whose rank lies in `ranks`; levels holding more than
   `max_per_rank` vectors are aggregated into groups of neighbouring vectors.
3. `block_dag(index, vector_id)`: the node blocks of one vector and the blocks of its children,
   aggregated into bins above `max_blocks`.

Ranks are shared by all levels, so drill-down keeps y: inputs are rank 0, the sum vectors of sum
depth d (the plan's sum layer d) rank 2d, and the product vectors they read rank 2d - 1.
Node columns: id, x, y, label, kind, size (circuit nodes), count (vectors or blocks aggregated).
Edge columns: source, target, weight (vector or block edges aggregated), x0, y0, x1, y1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.compiler.plan import LayerPlan


@dataclass
class Drawing:
    """Plain drawing data (dict-of-lists columns, ready for a ColumnDataSource or hv.Graph)."""

    level: str  # "layers" | "vectors" | "blocks"
    nodes: dict[str, list] = field(default_factory=dict)
    edges: dict[str, list] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def num_nodes(self) -> int:
        return len(self.nodes.get("id", []))

    def node_records(self) -> list[dict]:
        keys = list(self.nodes)
        return [dict(zip(keys, row)) for row in zip(*self.nodes.values())]

    def edge_records(self) -> list[dict]:
        keys = list(self.edges)
        return [dict(zip(keys, row)) for row in zip(*self.edges.values())]


def _columns(nodes: list[dict], edges: list[tuple[str, str, int]], level: str, info: dict) -> Drawing:
    node_keys = ("id", "x", "y", "label", "kind", "size", "count")
    ncols = {k: [n.get(k) for n in nodes] for k in node_keys}
    extra = {k for n in nodes for k in n} - set(node_keys)
    for k in sorted(extra):
        ncols[k] = [n.get(k) for n in nodes]
    pos = {n["id"]: (n["x"], n["y"]) for n in nodes}
    ecols: dict[str, list] = {k: [] for k in ("source", "target", "weight", "x0", "y0", "x1", "y1")}
    for s, t, w in edges:
        (x0, y0), (x1, y1) = pos[s], pos[t]
        for k, v in zip(ecols, (s, t, int(w), x0, y0, x1, y1)):
            ecols[k].append(v)
    return Drawing(level, ncols, ecols, info)


def _spread(n: int, width: float = 1.0) -> np.ndarray:
    """x positions of n glyphs centred on 0, `width` apart."""
    return (np.arange(n) - (n - 1) / 2.0) * width


# ----------------------------------------------------------------------------------------- level 1


def layer_rank(layer) -> int:
    """Rank (y) of a plan layer: inputs 0, product layer of sum depth d 2d-1, sum layer 2d."""
    return 0 if layer.kind == "input" else 2 * layer.depth - (layer.kind == "product")


def layer_overview(plan: LayerPlan) -> Drawing:
    """One glyph per plan layer; edges follow the buffer rows each layer reads."""
    by_rank: dict[int, list] = {}
    for layer in plan.layers:
        by_rank.setdefault(layer_rank(layer), []).append(layer)
    nodes, writer_lo, writer_hi, writer_id = [], [], [], []
    for rank, layers in sorted(by_rank.items()):
        for layer, x in zip(layers, _spread(len(layers))):
            lid = f"L{layer.index}"
            nodes.append(
                {
                    "id": lid,
                    "x": float(x),
                    "y": float(rank),
                    "kind": layer.kind,
                    "size": layer.num_nodes,
                    "count": len(layer.partitions) or 1,
                    "layer": layer.index,
                    "rank": rank,
                    "num_edges": layer.num_edges,
                    "label": f"{layer.kind} layer {layer.index}: {layer.num_nodes:,} nodes",
                }
            )
            if layer.kind != "product" and layer.writes is not None:
                writer_lo.append(layer.writes[1])
                writer_hi.append(layer.writes[2])
                writer_id.append(lid)
    edges = []
    order = np.argsort(writer_lo)
    lo = np.asarray(writer_lo)[order]
    ids = [writer_id[i] for i in order]
    prev_product = None
    for layer in plan.layers:
        lid = f"L{layer.index}"
        if layer.kind == "product":
            rows = np.concatenate(
                [p.child_rows[p.child_rows > 0] for p in layer.partitions] or [np.zeros(0, int)]
            )
            which = np.searchsorted(lo, rows, side="right") - 1
            src, cnt = np.unique(which[which >= 0], return_counts=True)
            edges += [(lid, ids[s], int(c)) for s, c in zip(src, cnt)]
            prev_product = layer
        elif layer.kind == "sum" and prev_product is not None:
            edges.append((lid, f"L{prev_product.index}", layer.num_edges))
    return _columns(
        nodes,
        edges,
        "layers",
        {
            "num_layers": len(plan.layers),
            "num_nodes": sum(la.num_nodes for la in plan.layers),
            "max_rank": max(by_rank) if by_rank else 0,
        },
    )


# ----------------------------------------------------------------------------------------- level 2


class VectorIndex:
    """The node-vector DAG of one root, flattened once into arrays (rank, order, children)."""

    def __init__(self, root):
        self.vectors = root.topological()  # children before parents
        pos = {v.uid: i for i, v in enumerate(self.vectors)}
        n = len(self.vectors)
        self.children = [[pos[c.uid] for c in v.children] for v in self.vectors]
        self.kind = [v.kind for v in self.vectors]
        self.num_nodes = np.array([v.num_nodes for v in self.vectors], dtype=np.int64)
        depth = np.zeros(n, dtype=np.int64)  # sum depth as in the compiler's IR
        rank = np.zeros(n, dtype=np.int64)
        for i, (kind, kids) in enumerate(zip(self.kind, self.children)):
            if kind == "input":
                continue
            d = max(depth[kids]) if kids else 0
            depth[i] = d + 1 if kind == "sum" else d
            rank[i] = 2 * depth[i] if kind == "sum" else 2 * d + 1
        self.depth, self.rank = depth, rank
        self.x = self._order()
        self.ids = [f"v{i}" for i in range(n)]

    def _order(self) -> np.ndarray:
        """x of each vector: inputs by variable, others by the mean x of their children (barycentre)."""
        n = len(self.vectors)
        key = np.zeros(n)
        for i, (v, kids) in enumerate(zip(self.vectors, self.children)):
            key[i] = v.var if v.kind == "input" else (key[kids].mean() if kids else 0.0)
        x = np.zeros(n)
        for r in np.unique(self.rank):
            members = np.flatnonzero(self.rank == r)
            members = members[np.argsort(key[members], kind="stable")]
            x[members] = _spread(len(members))
        return x

    @property
    def max_rank(self) -> int:
        return int(self.rank.max()) if len(self.rank) else 0

    def find(self, vector_id: str) -> int:
        if (
            not vector_id.startswith("v")
            or not vector_id[1:].isdigit()
            or int(vector_id[1:]) >= len(self.vectors)
        ):
            raise KeyError(f"unknown vector {vector_id!r}")
        return int(vector_id[1:])


def vector_dag(index: VectorIndex, ranks: tuple[int, int] | None = None, max_per_rank: int = 64) -> Drawing:
    """Vectors with rank in `ranks` (inclusive; default all), aggregating crowded ranks into groups."""
    lo, hi = ranks if ranks is not None else (0, index.max_rank)
    glyph = np.full(len(index.vectors), -1, dtype=np.int64)  # vector -> glyph index
    nodes: list[dict] = []
    for r in range(lo, hi + 1):
        members = np.flatnonzero(index.rank == r)
        if members.size == 0:
            continue
        members = members[np.argsort(index.x[members], kind="stable")]
        groups = np.array_split(members, min(members.size, max_per_rank))
        xs = _spread(len(groups), max(1.0, members.size / len(groups)))
        for g, x in zip(groups, xs):
            glyph[g] = len(nodes)
            nodes.append(_vector_glyph(index, g, float(x), r))
    pairs = [
        (glyph[p], glyph[c]) for p in np.flatnonzero(glyph >= 0) for c in index.children[p] if glyph[c] >= 0
    ]
    edges = []
    if pairs:
        uniq, cnt = np.unique(np.asarray(pairs), axis=0, return_counts=True)
        edges = [(nodes[a]["id"], nodes[b]["id"], int(c)) for (a, b), c in zip(uniq, cnt)]
    return _columns(
        nodes,
        edges,
        "vectors",
        {
            "ranks": (lo, hi),
            "num_vectors": int((glyph >= 0).sum()),
            "aggregated": any(n["count"] > 1 for n in nodes),
        },
    )


def _vector_glyph(index: VectorIndex, members: np.ndarray, x: float, rank: int) -> dict:
    i = int(members[0])
    size = int(index.num_nodes[members].sum())
    kinds = {index.kind[j] for j in members}
    kind = kinds.pop() if len(kinds) == 1 else "mixed"
    if members.size == 1:
        v = index.vectors[i]
        extra = f" var {v.var}" if v.kind == "input" else ""
        label = f"{v.kind} vector {index.ids[i]}: {v.num_nodes} nodes, block {v.block_size}{extra}"
        return {
            "id": index.ids[i],
            "x": x,
            "y": float(rank),
            "kind": kind,
            "size": size,
            "count": 1,
            "label": label,
            "block_size": v.block_size,
        }
    return {
        "id": f"g{rank}:{i}",
        "x": x,
        "y": float(rank),
        "kind": kind,
        "size": size,
        "count": int(members.size),
        "label": f"{members.size} {kind} vectors: {size:,} nodes",
        "block_size": None,
        "members": [index.ids[j] for j in members[:1000]],
    }


# ----------------------------------------------------------------------------------------- level 3


def tile_size(v, block_size: int | None) -> int:
    """Node-block size of vector `v` in a plan compiled at `block_size` (the compiler's rule: a sum
    vector is cut into gcd(own block size, block_size) tiles; other vectors keep their own)."""
    if v.kind != "sum" or block_size is None:
        return v.block_size
    return math.gcd(v.block_size, int(block_size))


def block_dag(
    index: VectorIndex, vector_id: str, max_blocks: int = 64, block_size: int | None = None
) -> Drawing:
    """Blocks of one vector (y=1) and of its children (y=0), with the block edges between them, at
    the plan's `block_size` (None: the vector's own)."""
    i = index.find(vector_id)
    v = index.vectors[i]
    b = tile_size(v, block_size)
    num_blocks = v.num_nodes // b
    parent_bins = _bins(num_blocks, max_blocks)
    child_sizes = [c.num_nodes // b for c in v.children]  # children cut into the vector's block size
    child_start = np.concatenate([[0], np.cumsum(child_sizes)]).astype(np.int64)
    total_child = int(child_start[-1])
    child_bins = _bins(total_child, max_blocks) if total_child else np.zeros(0, np.int64)
    nodes = _block_glyphs(parent_bins, num_blocks, 1.0, "p", v.kind, b, f"{vector_id} block")
    owner = np.searchsorted(child_start, np.arange(total_child), side="right") - 1
    nodes += _block_glyphs(
        child_bins,
        total_child,
        0.0,
        "c",
        None,
        b,
        "child block",
        kinds=[v.children[o].kind for o in owner] if total_child else [],
        child_of=owner,
    )
    pe, ce = _block_edges(v, child_start, b)
    edges = []
    if pe.size:
        pairs = np.stack([parent_bins[pe], child_bins[ce]], 1)
        uniq, cnt = np.unique(pairs, axis=0, return_counts=True)
        edges = [(f"p{a}", f"c{b}", int(n)) for (a, b), n in zip(uniq, cnt)]
    return _columns(
        nodes,
        edges,
        "blocks",
        {
            "vector": vector_id,
            "kind": v.kind,
            "num_blocks": num_blocks,
            "num_child_blocks": total_child,
            "num_block_edges": int(pe.size),
            "block_size": b,
            "own_block_size": v.block_size,
        },
    )


def _bins(n: int, max_bins: int) -> np.ndarray:
    """Bin of each of n consecutive blocks when at most `max_bins` bins are drawn: [n]."""
    nb = min(n, max_bins)
    return (np.arange(n) * nb // max(n, 1)).astype(np.int64)


def _block_glyphs(bins, n, y, prefix, kind, bs, what, kinds=None, child_of=None) -> list[dict]:
    if n == 0:
        return []
    nb = int(bins.max()) + 1
    counts = np.bincount(bins, minlength=nb)
    firsts = np.searchsorted(bins, np.arange(nb))
    out = []
    for b, x in zip(range(nb), _spread(nb)):
        f, c = int(firsts[b]), int(counts[b])
        k = kind if kinds is None else kinds[f]
        label = f"{what} {f}" if c == 1 else f"{what}s {f}-{f + c - 1}"
        g = {
            "id": f"{prefix}{b}",
            "x": float(x),
            "y": y,
            "kind": k,
            "size": c * bs,
            "count": c,
            "label": label,
        }
        if child_of is not None:
            g["child"] = int(child_of[f])
        out.append(g)
    return out


def _block_edges(v, child_start: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(parent block, child block in the concatenation) of every block edge of vector `v`, with sum
    vectors cut into blocks of `b` nodes (each own-size edge becomes r x r edges, r = own / b)."""
    if v.kind == "sum":
        r = v.block_size // b
        sub = np.arange(r)
        parent = (v.edge_ids[0][:, None, None] * r + sub[None, :, None]).repeat(r, 2).ravel()
        child = (v.edge_ids[1][:, None, None] * r + sub[None, None, :]).repeat(r, 1).ravel()
        return parent, child
    if v.kind == "product":
        nb, k = v.edge_ids.shape
        return np.repeat(np.arange(nb), k), (v.edge_ids + child_start[None, :k]).ravel()
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
