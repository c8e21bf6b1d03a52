"""Export a circuit as PSDD text (and its vtree) when it has a PSDD's shape: `write_psdd`.

A circuit is written when, node by node, it is what `read_psdd` builds: binary leaves (Bernoulli,
2-way Categorical or indicator); every sum either over products of exactly two children (a decision
node, elements `(prime, sub, theta)`) or over leaves of one variable (a `T` node with
p_true = sum_k theta_k * p_k); products only under sums; and structured decomposability: all
products over the same variables split them the same way (prime scope, sub scope). The vtree is
read off those splits. Determinism of primes is not checked: a non-deterministic circuit is written
as a structured-decomposable PC in PSDD syntax, which `read_psdd` and Juice.jl read, but which is not
a PSDD in the strict sense. Anything else raises `FileFormatError` naming the first offending node.
"""

from __future__ import annotations

import math

import torch

from engine.io.jpc import _root_of, _write_text
from engine.io.limits import FileFormatError
from engine.nodes import InputNodes, NodeVector, ProdNodes, SumNodes


def _p_true(v: InputNodes, i: int) -> float:
    name = v.dist.name
    p = v.params[i].double()
    if name == "bernoulli":
        return float(p[0])
    if name == "categorical" and v.dist.num_cats == 2:
        return float(p[1] / p.sum())
    if name == "indicator" and getattr(v.dist, "num_cats", 2) == 2:
        return float(p[0])
    raise FileFormatError(f"PSDD export: a {name} leaf over variable {v.var} is not binary")


class _Exporter:
    def __init__(self):
        self.lines: list[tuple] = []  # ("L"|"T", var, p) or ("D", scope, [(prime, sub, w)])
        self.ids: dict[tuple[int, int], int] = {}  # (vector uid, node) -> psdd node id
        self.scope: dict[int, frozenset] = {}  # psdd node id -> variables
        self.splits: dict[frozenset, tuple[frozenset, frozenset]] = {}

    def _emit(self, line: tuple, scope: frozenset) -> int:
        self.lines.append(line)
        self.scope[len(self.lines) - 1] = scope
        return len(self.lines) - 1

    def node(self, v: NodeVector, i: int) -> int:
        """PSDD id of node `i` of vector `v` (children first, iteratively built by `run`)."""
        return self.ids[(v.uid, i)]

    def run(self, root: NodeVector) -> int:
        for v in root.topological():
            if isinstance(v, InputNodes):
                for i in range(v.num_nodes):
                    self.ids[(v.uid, i)] = self._emit(("T", v.var, _p_true(v, i)), frozenset([v.var]))
            elif isinstance(v, SumNodes):
                for i, elems in enumerate(self._sum_elements(v)):
                    self.ids[(v.uid, i)] = self._sum(elems)
            elif v is root:  # a product at the top: a decision node with one element
                self.ids[(v.uid, 0)] = self._sum([(v, 0, 1.0)])
            else:
                for c in v.children:
                    if isinstance(c, ProdNodes):
                        raise FileFormatError("PSDD export: a product has a product child (flatten it first)")
        return self.ids[(root.uid, 0)]

    def _sum_elements(self, v: SumNodes) -> list[list[tuple]]:
        """Per node of `v`: [(child vector, child node, weight)] with positive weights."""
        bs = v.block_size
        owners = []
        for c in v.children:
            owners += [(c, k) for k in range(c.num_nodes)]
        per_node: list[list[tuple]] = [[] for _ in range(v.num_nodes)]
        w = v.params.double()
        for e, (i, j) in enumerate(v.edge_ids.T.tolist()):
            for r in range(bs):
                for c in range(bs):
                    if w[e, r, c] > 0:
                        per_node[i * bs + r].append((*owners[j * bs + c], float(w[e, r, c])))
        return per_node

    def _sum(self, elems: list[tuple]) -> int:
        kinds = {type(c) for c, _, _ in elems}
        if kinds == {InputNodes}:
            vars_ = {c.var for c, _, _ in elems}
            if len(vars_) != 1:
                raise FileFormatError("PSDD export: a sum over leaves of different variables")
            p = sum(w * _p_true(c, k) for c, k, w in elems) / sum(w for _, _, w in elems)
            return self._emit(("T", vars_.pop(), min(max(p, 0.0), 1.0)), frozenset(vars_ | {elems[0][0].var}))
        if kinds != {ProdNodes}:
            raise FileFormatError("PSDD export: a sum must have only products or only leaves as children")
        out, scope = {}, None
        for c, k, w in elems:
            edges = c.node_edges()[k]
            if len(c.children) != 2:
                raise FileFormatError(
                    f"PSDD export: a product has {len(c.children)} children (a PSDD needs 2)"
                )
            prime, sub = (self.node(ch, int(e)) for ch, e in zip(c.children, edges))
            sp, ss = self.scope[prime], self.scope[sub]
            split = self.splits.setdefault(sp | ss, (sp, ss))
            if split != (sp, ss):
                raise FileFormatError(
                    "PSDD export: the circuit is not structured-decomposable (two products over "
                    f"variables {sorted(sp | ss)[:6]} split them differently)"
                )
            out[(prime, sub)] = out.get((prime, sub), 0.0) + w
            scope = sp | ss
        return self._emit(("D", scope, list(out.items())), scope)

    def vtree(self, root_scope: frozenset) -> tuple[list[str], dict[frozenset, int]]:
        """vtree lines (children before parents) and scope -> vtree id."""
        lines, ids = [], {}
        stack = [(root_scope, False)]
        while stack:
            s, expanded = stack.pop()
            if s in ids:
                continue
            if len(s) == 1:
                ids[s] = len(lines)
                lines.append(f"L {ids[s]} {next(iter(s)) + 1}")
            elif expanded:
                left, right = self.splits[s]
                ids[s] = len(lines)
                lines.append(f"I {ids[s]} {ids[left]} {ids[right]}")
            else:
                if s not in self.splits:
                    raise FileFormatError(f"PSDD export: no product splits variables {sorted(s)[:6]}")
                left, right = self.splits[s]
                stack += [(s, True), (right, False), (left, False)]
        return lines, ids


def _log(x: float) -> str:
    return repr(math.log(x)) if x > 0 else "-inf"


def write_psdd(root_or_pc, path, vtree_path=None) -> None:
    """Write the circuit as PSDD text at `path` (and its vtree at `vtree_path` if given)."""
    root = _root_of(root_or_pc)
    if root.num_nodes != 1:
        raise FileFormatError(f"a PSDD has one root node; this root vector has {root.num_nodes}")
    ex = _Exporter()
    with torch.no_grad():
        top = ex.run(root)
    vt_lines, vt_ids = ex.vtree(ex.scope[top])
    out = []
    for nid, line in enumerate(ex.lines):
        if line[0] == "T":
            var, p = line[1], line[2]
            leaf = vt_ids[frozenset([var])]
            if p in (0.0, 1.0):
                out.append(f"L {nid} {leaf} {var + 1 if p == 1.0 else -(var + 1)}")
            else:
                out.append(f"T {nid} {leaf} {var + 1} {_log(p)}")
        else:
            elems = " ".join(f"{p} {s} {_log(w)}" for (p, s), w in line[2])
            if line[1] not in vt_ids:
                raise FileFormatError(
                    f"PSDD export: node over variables {sorted(line[1])[:6]} is off the vtree"
                )
            out.append(f"D {nid} {vt_ids[line[1]]} {len(line[2])} {elems}")
    head = "c written by Circuit Workbench (engine.io.write_psdd); nodes children first, last is the root\n"
    _write_text(path, head + f"psdd {len(out)}\n" + "\n".join(out) + "\n")
    if vtree_path is not None:
        _write_text(vtree_path, f"vtree {len(vt_lines)}\n" + "\n".join(vt_lines) + "\n")
