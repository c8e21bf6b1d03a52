"""Chow-Liu trees in Juice's `.clt` text format (the Circuit-Model-Zoo's `clts/`): `read_clt`.

The format, as Juice.jl's `parse_clt` reads it (binary variables numbered from 1)::

    n                        # number of variables
    r                        # number of roots (a forest: r trees)
    v p                      # r lines: root v with p(x_v = 1) = p
    v u p1 p0                # n - r lines: v's parent is u, p(x_v = 1 | x_u = 1) = p1, ... | x_u = 0) = p0

Circuit (as `engine.structures.chow_liu` builds one): for each variable v a 2-node vector
T_v[b] = sum_a p(x_v = a | parent = b) * [x_v = a] * prod_{children c} T_c[a], a product over the
tree roots' mixtures at the top. Exact: p(x) = prod_v p(x_v | x_parent(v)).
"""

from __future__ import annotations

import math
import os

from engine.io.limits import FileFormatError, read_capped
from engine.io.pernode import indicator_vector, parse_float, parse_ints, text_lines
from engine.nodes import NodeVector, multiply, summate


def looks_like_clt(data: bytes) -> bool:
    """True when the first two lines are single integers (no other circuit format starts so)."""
    head = data[:256].split(b"\n")
    if len(head) < 3:
        return False
    return all(len(t := h.split()) == 1 and t[0].isdigit() for h in head[:2])


def read_clt(path, data: bytes | None = None) -> NodeVector:
    """Root node vector of the Chow-Liu tree (or forest) in the `.clt` file at `path`."""
    path = os.fspath(path)
    data = read_capped(path) if data is None else data
    lines = text_lines(data, path, comment=None)
    if len(lines) < 3:
        raise FileFormatError(f"{path}: a .clt file needs 'n', 'roots' and at least one variable line")
    (n,), (r,) = (parse_ints(tok, f"{path}, line {ln}") for ln, tok in lines[:2])
    if n < 1 or not 1 <= r <= n:
        raise FileFormatError(f"{path}: need n >= 1 variables and 1 <= roots <= n, got n={n} roots={r}")
    body = lines[2:]
    if len(body) != n:
        raise FileFormatError(f"{path}: expected {n} variable lines, found {len(body)}")
    parent: dict[int, int] = {}
    cpt: dict[int, tuple[float, float]] = {}  # v -> (p(x_v=1 | parent 0), p(x_v=1 | parent 1))
    for k, (ln, tok) in enumerate(body):
        where = f"{path}, line {ln}"
        want = 2 if k < r else 4
        if len(tok) != want:
            raise FileFormatError(f"{where}: expected {want} fields ({'v p' if k < r else 'v parent p1 p0'})")
        v = parse_ints(tok[:1], where)[0]
        probs = [parse_float(t, "a probability", where) for t in tok[(1 if k < r else 2) :]]
        if any(not (0.0 <= p <= 1.0) or math.isnan(p) for p in probs):
            raise FileFormatError(f"{where}: probabilities must lie in [0, 1]")
        if not 1 <= v <= n or v in cpt:
            raise FileFormatError(f"{where}: variable {v} out of range 1..{n} or listed twice")
        if k < r:
            parent[v], cpt[v] = 0, (probs[0], probs[0])
        else:
            parent[v] = parse_ints(tok[1:2], where)[0]
            if not 1 <= parent[v] <= n or parent[v] == v:
                raise FileFormatError(f"{where}: parent {parent[v]} of variable {v} out of range or itself")
            cpt[v] = (probs[1], probs[0])
    return _build(parent, cpt, path)


def _build(parent: dict[int, int], cpt: dict, path: str) -> NodeVector:
    children: dict[int, list[int]] = {v: [] for v in parent}
    for v, u in parent.items():
        if u:
            children[u].append(v)
    roots = [v for v, u in parent.items() if u == 0]
    order, stack = [], list(roots)
    while stack:  # parents before children
        v = stack.pop()
        order.append(v)
        stack.extend(children[v])
    if len(order) != len(parent):
        raise FileFormatError(f"{path}: the parent links contain a cycle (not a forest)")
    mix: dict[int, NodeVector] = {}
    tops = []
    for v in reversed(order):  # children first
        ind = indicator_vector(v - 1, [0, 1], 2)
        prod = multiply(ind, *(mix[c] for c in children[v]), block_size=2) if children[v] else ind
        p0, p1 = cpt[v]
        if parent[v]:  # node b conditions on parent value b; column a picks x_v = a
            mix[v] = summate(prod, num_nodes=2, block_size=2, params=[[[1 - p0, p0], [1 - p1, p1]]])
        else:
            tops.append(summate(prod, num_nodes=1, block_size=1, params=[[[1 - p0]], [[p0]]]))
    return tops[0] if len(tops) == 1 else multiply(*tops, block_size=1)
