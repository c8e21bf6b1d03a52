"""Layering and buffer layout: IR -> input groups, then alternating product / sum layers.

Sum vectors at depth d form sum layer d; the product vectors they read form the product layer
just below, written into the shared element scratch from row PAD_ROWS on. A product vector read
by sums of two depths is placed (and recomputed) in both product layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from engine.compiler.ir import CircuitIR, ProdIR
from engine.compiler.partition import group_by_degree, padded_table
from engine.compiler.plan import PAD_ROWS, InputGroup, Layer, Partition, SumSource
from engine.nodes import SumNodes


@dataclass
class Layout:
    layers: list[Layer] = field(default_factory=list)
    node_row: dict[int, int] = field(default_factory=dict)  # vector uid -> first node_mars row
    num_node_rows: int = 1  # row 0: constant log 1
    num_element_rows: int = PAD_ROWS
    num_params: int = 0


def tile_size_for(s: SumNodes, block_size: int | None) -> int:
    return s.block_size if block_size is None else math.gcd(s.block_size, int(block_size))


def flows_final_depth(ir: CircuitIR) -> dict[int, int]:
    """Input vector uid -> depth of the lowest sum layer reading it (through its product layer).

    The flows pass runs top-down, so an input's flows are final once that layer's product layer is
    done: the higher this depth, the earlier its statistics can be computed."""
    lowest: dict[int, int] = {}
    for s in ir.sums:
        d = ir.depth[s.uid]
        for p in ir.sum_children[s.uid]:
            for v, _ in p.factors:
                lowest[v.uid] = min(lowest.get(v.uid, d), d)
    return lowest


def layout_inputs(ir: CircuitIR, lay: Layout) -> None:
    """One input layer per distribution family; within it, vectors whose flows are final first.

    Rows in order of `flows_final_depth` (deepest reader first, stable) make the rows whose flows
    are final after each product layer of the flows pass a prefix of the layer, so a training step
    can compute (and a data-parallel step all-reduce) those rows' statistics while the layers below
    still run (`LayerPlan.input_flows_ready`)."""
    final = flows_final_depth(ir)
    groups: dict[tuple, list] = {}
    for v in ir.inputs:  # the layers in the order their families first appear, as before
        groups.setdefault(v.dist.key(), []).append(v)
    for vecs in groups.values():
        vecs.sort(key=lambda v: -final.get(v.uid, 0))  # stable: ties keep the topological order
    for key, vecs in groups.items():
        start, vars_, members, n = lay.num_node_rows, [], [], 0
        for v in vecs:
            lay.node_row[v.uid] = start + n
            members.append((v.uid, n, v.num_nodes))
            vars_.append(np.full(v.num_nodes, v.var, dtype=np.int64))
            n += v.num_nodes
        lay.num_node_rows += n
        group = InputGroup(key, start, n, np.concatenate(vars_), members, dist=vecs[0].dist)
        lay.layers.append(
            Layer(
                len(lay.layers),
                "input",
                0,
                n,
                n,
                writes=("node_mars", start, start + n),
                input_group=group,
                vectors=[f"input:{key[0]}x{len(vecs)}"],
            )
        )


def layout_products(prods: list[ProdIR], depth: int, lay: Layout, tolerance: float) -> dict[int, int]:
    """Place one product layer into the scratch buffer; returns id(ProdIR) -> first element row."""
    rows, row = {}, PAD_ROWS
    for p in prods:
        rows[id(p)] = row
        row += p.num_nodes
    lay.num_element_rows = max(lay.num_element_rows, row)
    by_arity: dict[int, list[ProdIR]] = {}
    for p in prods:
        by_arity.setdefault(p.arity, []).append(p)
    arities = np.array(sorted(by_arity))
    parts = []
    for grp in group_by_degree(arities, tolerance):
        members = [p for a in arities[grp] for p in by_arity[int(a)]]
        width = max(p.arity for p in members)
        elem = np.concatenate([rows[id(p)] + np.arange(p.num_nodes) for p in members])
        child = np.zeros((len(elem), width), dtype=np.int64)  # padding -> row 0 (log 1)
        at = 0
        for p in members:
            for k, (vec, idx) in enumerate(p.factors):
                child[at : at + p.num_nodes, k] = lay.node_row[vec.uid] + idx
            at += p.num_nodes
        real = sum(p.arity * p.num_nodes for p in members)
        parts.append(Partition(1, elem, child, real))
    n = row - PAD_ROWS
    edges = sum(p.arity * p.num_nodes for p in prods)
    lay.layers.append(
        Layer(
            len(lay.layers),
            "product",
            depth,
            n,
            edges,
            parts,
            reads=("node_mars", 0, lay.num_node_rows),
            writes=("element_mars", PAD_ROWS, row),
            vectors=[f"product:{len(prods)}"],
        )
    )
    return rows


def _vector_tiles(s: SumNodes, b: int, node_row: int, child_rows: list[tuple[int, int, int]]):
    """Tiles of one sum vector at tile size b: (node row, child element row, source tile id)."""
    r = s.block_size // b
    e, p, q = np.meshgrid(np.arange(s.edge_ids.shape[1]), np.arange(r), np.arange(r), indexing="ij")
    node_blk = s.edge_ids[0][e] * r + p
    child_off = (s.edge_ids[1][e] * r + q) * b  # node offset in the concatenated children
    child_row = np.empty_like(child_off)
    for lo, hi, row in child_rows:
        sel = (child_off >= lo) & (child_off < hi)
        child_row[sel] = row + child_off[sel] - lo
    src = (e * r + p) * r + q
    return (node_row + node_blk * b).ravel(), child_row.ravel(), src.ravel()


def layout_sums(sums: list[SumNodes], depth: int, ir: CircuitIR, elem_rows, lay: Layout, block_size, tol):
    start = lay.num_node_rows
    per_b: dict[int, list] = {}
    sources: dict[int, list[SumSource]] = {}
    for s in sums:
        lay.node_row[s.uid] = lay.num_node_rows
        lay.num_node_rows += s.num_nodes
        b = tile_size_for(s, block_size)
        child_rows, lo = [], 0
        for p in ir.sum_children[s.uid]:
            child_rows.append((lo, lo + p.num_nodes, elem_rows[id(p)]))
            lo += p.num_nodes
        nrow, crow, src = _vector_tiles(s, b, lay.node_row[s.uid], child_rows)
        srcs = sources.setdefault(b, [])
        first = srcs[-1].first_tile + srcs[-1].num_tiles if srcs else 0
        r = s.block_size // b
        srcs.append(SumSource(s.uid, first, s.edge_ids.shape[1] * r * r, r, b))
        per_b.setdefault(b, []).append((nrow, crow, src + first))
    parts = []
    for b, chunks in sorted(per_b.items()):
        nrow, crow, src = (np.concatenate(x) for x in zip(*chunks))
        order = np.lexsort((crow, nrow))
        nrow, crow, src = nrow[order], crow[order], src[order]
        blocks, degree = np.unique(nrow, return_counts=True)
        for grp in group_by_degree(degree, tol):
            members = blocks[np.sort(grp)]
            child = padded_table(nrow, crow, members, 0)
            tsrc = padded_table(nrow, src, members, -1)
            part = Partition(
                b, members, child, int(degree[grp].sum()), tile_source=tsrc, param_offset=lay.num_params
            )
            lay.num_params += part.num_params
            parts.append(part)
    layer_index = len(lay.layers)
    n = lay.num_node_rows - start
    edges = sum(int(s.edge_ids.shape[1]) * s.block_size**2 for s in sums)
    lay.layers.append(
        Layer(
            layer_index,
            "sum",
            depth,
            n,
            edges,
            parts,
            reads=("element_mars", 0, lay.num_element_rows),
            writes=("node_mars", start, start + n),
            vectors=[f"sum:{len(sums)}"],
            sum_sources=sources,
        )
    )


def build_layout(ir: CircuitIR, block_size: int | None, tolerance: float) -> Layout:
    lay = Layout()
    layout_inputs(ir, lay)
    max_depth = max(ir.depth[s.uid] for s in ir.sums)
    by_depth: dict[int, list[SumNodes]] = {}
    for s in ir.sums:
        by_depth.setdefault(ir.depth[s.uid], []).append(s)
    for d in range(1, max_depth + 1):
        sums = by_depth.get(d, [])
        if not sums:
            continue
        prods, seen = [], set()
        for s in sums:
            for p in ir.sum_children[s.uid]:
                if id(p) not in seen:
                    seen.add(id(p))
                    prods.append(p)
        elem_rows = layout_products(prods, d, lay, tolerance)
        layout_sums(sums, d, ir, elem_rows, lay, block_size, tolerance)
    return lay
