"""Juice.jl's text circuit format `.jpc`: `read_jpc` and `write_jpc`.

The format, as Juice.jl (ProbabilisticCircuits.jl) reads and writes it: `c` lines are comments, one
header line, then one line per node, children before parents; the last line is the root. Node ids
are integers (Juice numbers them 0, 1, ... in file order); variables are numbered from 1; the second
field of every node line is a vtree id that plain circuits leave at 0 and readers ignore::

    jpc N                                   # N node lines follow
    L id vtree lit                          # literal: x_|lit| is true (lit > 0) / false (lit < 0)
    I id vtree var value                    # indicator: 1 when x_var == value (values from 0)
    C id vtree var logp_0 ... logp_{K-1}    # categorical over {0..K-1}, log-probabilities
    B id vtree var N log(p)                 # binomial(N, p) over {0..N} (Juice writes log p)
    G id vtree var mu sigma                 # normal density, sigma the standard deviation
    P id vtree n c_1 ... c_n                # product of the n children
    S id vtree n c_1 logw_1 ... c_n logw_n  # mixture: sum_k exp(logw_k) * c_k

Mapping onto this engine (variables from 0, one 1-node vector per line, see `engine.io.pernode`):
L and I become fixed `Indicator` leaves; C becomes `Categorical(K)`; B becomes `Binomial(N)` (or, when
other lines give the variable more than N + 1 values, a `Categorical` holding the binomial pmf);
G becomes `Gaussian`. A variable's domain size K is the largest any of its lines implies (C length,
I value + 1, B N + 1, 2 for L).

`write_jpc` expands node vectors into per-node lines (block edges into node edges, zero-weight edges
dropped) and writes Categorical, Bernoulli (L for p in {0, 1}, else a 2-way C), Binomial, Gaussian
and indicator leaves. Files Juice compresses (`.jpc.gz`) are read by `engine.load`.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from engine import budget
from engine.io.limits import PSDD_BYTES_PER_BYTE, FileFormatError, read_capped
from engine.io.pernode import (
    PerNodeBuilder,
    binomial_leaf,
    categorical_leaf,
    gaussian_leaf,
    indicator_leaf,
    parse_float,
    parse_ints,
    text_lines,
)
from engine.nodes import CircuitError, InputNodes, NodeVector, ProdNodes, SumNodes

_LEAF_ARITY = {"L": 4, "I": 5, "B": 6, "G": 6}  # exact token counts; C, P and S are variable


def read_jpc(path, data: bytes | None = None, max_depth: int | None = None) -> NodeVector:
    """Root node vector of the `.jpc` text file at `path` (or of its bytes `data`)."""
    path = os.fspath(path)
    data = read_capped(path) if data is None else data
    if budget.exceeds(len(data) * PSDD_BYTES_PER_BYTE):
        raise FileFormatError(f"{path}: this JPC {budget.describe(len(data) * PSDD_BYTES_PER_BYTE)}")
    lines = text_lines(data, path)
    if not lines or lines[0][1][0] != "jpc" or len(lines[0][1]) != 2:
        raise FileFormatError(f"{path}: expected a 'jpc N' header line")
    (count,) = parse_ints(lines[0][1][1:], f"{path}, line {lines[0][0]}")
    body = lines[1:]
    if not body:
        raise FileFormatError(f"{path}: the JPC has no nodes")
    if len(body) != count:
        raise FileFormatError(f"{path}: header says jpc {count} but the file has {len(body)} node lines")
    domains = _domains(body, path)
    b = PerNodeBuilder(path, max_depth)
    node = None
    for lineno, tok in body:
        try:
            node = _node(b, tok, lineno, domains)
        except (FileFormatError, CircuitError):
            raise
        except (
            ValueError,
            OverflowError,
        ) as err:  # a value the leaf families refuse: one line, not a traceback
            raise FileFormatError(f"{path}, line {lineno}: {err}") from err
    return node


def _check_shape(tok: list[str], where: str) -> None:
    kind = tok[0]
    ok = (
        (len(tok) == _LEAF_ARITY[kind])
        if kind in _LEAF_ARITY
        else (kind == "C" and len(tok) >= 6) or (kind in "PS" and len(tok) >= 5 and len(kind) == 1)
    )
    if not ok:
        raise FileFormatError(f"{where}: malformed JPC line {' '.join(tok)!r:.80}")


MAX_VARIABLE = 2**20  # variable numbers and discrete domain sizes past these are refused before
MAX_VALUES = 2**16  # anything is allocated for them (a 24-byte file could ask for gigabytes)


def _domains(body: list, path: str) -> dict[int, int]:
    """Variable (from 1) -> number of values its discrete lines imply; -1 for Gaussian variables."""
    dom: dict[int, int] = {}
    for lineno, tok in body:
        where = f"{path}, line {lineno}"
        _check_shape(tok, where)
        kind = tok[0]
        if kind in "PS":
            continue
        if kind == "L":
            (lit,) = parse_ints(tok[3:4], where)
            var, k = abs(lit), 2
        else:
            (var,) = parse_ints(tok[3:4], where)
            if kind == "I":
                value = parse_ints(tok[4:5], where)[0]
                if value < 0:
                    raise FileFormatError(f"{where}: indicator value {value} must be >= 0")
                k = max(2, value + 1)
            elif kind == "C":
                k = len(tok) - 4
            elif kind == "B":
                k = parse_ints(tok[4:5], where)[0] + 1
                if k < 2:
                    raise FileFormatError(f"{where}: binomial N must be >= 1")
            else:
                k = -1
        if var < 1:
            raise FileFormatError(f"{where}: variable {var} must be >= 1 (JPC variables are numbered from 1)")
        if var > MAX_VARIABLE or k > MAX_VALUES:
            raise FileFormatError(
                f"{where}: variable {var} with {k} values is past this reader's limits "
                f"({MAX_VARIABLE} variables, {MAX_VALUES} values)"
            )
        old = dom.get(var, k)
        if (old < 0) != (k < 0):
            raise FileFormatError(f"{where}: variable {var} has both Gaussian and discrete leaves")
        dom[var] = max(old, k)
    return dom


def _node(b: PerNodeBuilder, tok: list[str], lineno: int, domains: dict[int, int]) -> NodeVector:
    where = b.where(lineno)
    kind = tok[0]
    nid = parse_ints(tok[1:2], where)[0]
    if kind == "P" or kind == "S":
        n = parse_ints(tok[3:4], where)[0]
        rest = tok[4:]
        if n < 1 or len(rest) != (n if kind == "P" else 2 * n):
            raise FileFormatError(
                f"{where}: node {nid} declares {n} children but has {len(rest)} child tokens"
            )
        if kind == "P":
            return b.product(nid, parse_ints(rest, where), lineno, "jpc")
        ids = parse_ints(rest[0::2], where)
        logw = [parse_float(t, "a log-weight", where) for t in rest[1::2]]
        return b.sum(nid, ids, logw, lineno, "jpc")
    if kind == "L":
        lit = parse_ints(tok[3:4], where)[0]
        var = abs(lit)
        return b.leaf(nid, indicator_leaf(var - 1, int(lit > 0), domains[var]), lineno, "jpc")
    var = parse_ints(tok[3:4], where)[0]
    if kind == "I":
        value = parse_ints(tok[4:5], where)[0]
        return b.leaf(nid, indicator_leaf(var - 1, value, domains[var]), lineno, "jpc")
    if kind == "G":
        mu, sigma = (parse_float(t, "a number", where) for t in tok[4:6])
        if not (math.isfinite(mu) and math.isfinite(sigma) and sigma > 0):
            raise FileFormatError(
                f"{where}: gaussian needs a finite mean and sigma > 0, got {mu:g} {sigma:g}"
            )
        return b.leaf(nid, gaussian_leaf(var - 1, mu, sigma), lineno, "jpc")
    if kind == "B":
        n = parse_ints(tok[4:5], where)[0]
        logp = parse_float(tok[5], "a log-probability", where)
        if math.isnan(logp) or logp > 1e-6:
            raise FileFormatError(f"{where}: binomial log(p) {logp:g} must be <= 0")
        p = math.exp(min(logp, 0.0))
        if domains[var] == n + 1:
            return b.leaf(nid, binomial_leaf(var - 1, n, p), lineno, "jpc")
        probs = _binomial_pmf(n, p)
    else:
        logps = [parse_float(t, "a log-probability", where) for t in tok[4:]]
        if any(math.isnan(x) or x > 1e-6 for x in logps):
            raise FileFormatError(f"{where}: categorical log-probabilities must be <= 0")
        probs = [math.exp(min(x, 0.0)) for x in logps]
        if abs(sum(probs) - 1.0) > 1e-3:
            raise FileFormatError(f"{where}: categorical probabilities sum to {sum(probs):.6g}, not 1")
    probs += [0.0] * (domains[var] - len(probs))
    return b.leaf(nid, categorical_leaf(var - 1, probs), lineno, "jpc")


def _binomial_pmf(n: int, p: float) -> list[float]:
    """In log space: math.comb(n, k) overflows a float past n ~ 1030."""
    if p <= 0.0 or p >= 1.0:
        return [float(k == (0 if p <= 0.0 else n)) for k in range(n + 1)]
    lp, lq, lgn = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    return [
        math.exp(lgn - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp + (n - k) * lq)
        for k in range(n + 1)
    ]


# ------------------------------------------------------------------------------------------ write

HEADER = """c written by Circuit Workbench (engine.io.write_jpc) in Juice.jl's jpc text format
c node ids start at 0; nodes appear children before parents; the last node is the root
c variables are numbered from 1; the second field is a vtree id (0: none)
c L id vtree literal | I id vtree var value | C id vtree var {log-probability}+
c B id vtree var N log-p | G id vtree var mu sigma | P id vtree n {child}+ | S id vtree n {child log-weight}+
"""


def _fmt(x: float) -> str:
    if x == -math.inf:
        return "-Inf"  # Julia's spelling; Python's float() reads it too
    return repr(float(x))


class _Numbering:
    """Global 0-based ids for (vector, node) pairs, assigned as lines are written."""

    def __init__(self):
        self.first: dict[int, int] = {}
        self.next = 0

    def add(self, v: NodeVector) -> int:
        self.first[v.uid] = self.next
        self.next += v.num_nodes
        return self.first[v.uid]


def _leaf_lines(v: InputNodes, first: int) -> list[str]:
    var, name = v.var + 1, v.dist.name
    p = v.params.double()
    out = []
    for i in range(v.num_nodes):
        nid = first + i
        if name == "indicator":
            out.append(f"I {nid} 0 {var} {int(p[i, 0])}")
        elif name == "bernoulli" and float(p[i, 0]) in (0.0, 1.0):
            out.append(f"L {nid} 0 {var if p[i, 0] == 1 else -var}")
        elif name == "bernoulli":
            q = float(p[i, 0])
            out.append(f"C {nid} 0 {var} {_fmt(math.log1p(-q))} {_fmt(math.log(q))}")
        elif name == "categorical":
            logs = " ".join(_fmt(math.log(x) if x > 0 else -math.inf) for x in p[i].tolist())
            out.append(f"C {nid} 0 {var} {logs}")
        elif name == "gaussian":
            out.append(f"G {nid} 0 {var} {_fmt(p[i, 0])} {_fmt(p[i, 1])}")
        elif name == "binomial":
            q = float(p[i, 0])
            out.append(f"B {nid} 0 {var} {v.dist.num_trials} {_fmt(math.log(q) if q > 0 else -math.inf)}")
        else:
            raise FileFormatError(f"the JPC format has no line for {name} leaves")
    return out


def _child_ids(v: NodeVector, num: _Numbering) -> np.ndarray:
    """Global id of every node of the concatenated children `[sum of child num_nodes]`."""
    return np.concatenate([num.first[c.uid] + np.arange(c.num_nodes) for c in v.children])


def _prod_lines(v: ProdNodes, first: int, num: _Numbering) -> list[str]:
    edges = v.node_edges()  # [num_nodes, num_children], node index inside each child
    base = np.array([num.first[c.uid] for c in v.children])
    ids = edges + base[None, :]
    k = ids.shape[1]
    return [f"P {first + i} 0 {k} " + " ".join(map(str, row)) for i, row in enumerate(ids.tolist())]


def _sum_lines(v: SumNodes, first: int, num: _Numbering) -> list[str]:
    bs = v.block_size
    child = _child_ids(v, num)
    w = v.params.double().numpy()  # [E, bs(node), bs(child)]
    r = np.arange(bs)
    nodes = np.broadcast_to(v.edge_ids[0][:, None, None] * bs + r[None, :, None], w.shape).ravel()
    kids = np.broadcast_to(child[v.edge_ids[1][:, None, None] * bs + r[None, None, :]], w.shape).ravel()
    w = w.ravel()
    keep = w > 0  # zero-weight edges carry nothing
    nodes, kids, w = nodes[keep], kids[keep], w[keep]
    order = np.argsort(nodes, kind="stable")
    nodes, kids, logw = nodes[order], kids[order].tolist(), np.log(w[order]).tolist()
    bounds = np.searchsorted(nodes, np.arange(v.num_nodes + 1))
    out = []
    for n in range(v.num_nodes):
        lo, hi = bounds[n], bounds[n + 1]
        parts = " ".join(f"{kids[k]} {logw[k]!r}" for k in range(lo, hi))
        out.append(f"S {first + n} 0 {hi - lo} {parts}")
    return out


def write_jpc(root_or_pc, path) -> None:
    """Write a root `NodeVector` or a `CompiledCircuit` (its current parameters) as `.jpc` text."""
    root = _root_of(root_or_pc)
    if root.num_nodes != 1:
        raise FileFormatError(f"a JPC file has one root node; this root vector has {root.num_nodes}")
    num = _Numbering()
    lines: list[str] = []
    with torch.no_grad():
        for v in root.topological():
            first = num.add(v)
            if isinstance(v, InputNodes):
                lines += _leaf_lines(v, first)
            elif isinstance(v, ProdNodes):
                lines += _prod_lines(v, first, num)
            else:
                lines += _sum_lines(v, first, num)
    _write_text(path, HEADER + f"jpc {len(lines)}\n" + "\n".join(lines) + "\n")


def _root_of(obj) -> NodeVector:
    if isinstance(obj, NodeVector):
        return obj
    if hasattr(obj, "sync_to_nodes"):
        return obj.sync_to_nodes()
    raise TypeError(f"expected a root NodeVector or a CompiledCircuit, got {type(obj).__name__}")


def _write_text(path, text: str) -> None:
    """Write to a temporary name in the same folder, then rename (never a half-written file)."""
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
