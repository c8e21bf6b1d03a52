"""Import of PSDD files (the UCLA-StarAI PSDD package / Juice.jl text format).

Syntax, from the files' own comment headers; `c` lines are comments, nodes come bottom-up::

    psdd N                                  # number of node lines that follow
    L id vtree literal                      # indicator of literal +v / -v (variables from 1)
    T id vtree var log(p_true)              # Bernoulli leaf (also: log(p_false) log(p_true))
    D id vtree n {prime sub log(theta)}*    # decision node: sum_k theta_k * prime_k * sub_k

    vtree N / L id var / I id left right    # the vtree file (optional here)

Mapping onto node vectors (every PSDD node becomes a 1-node vector, block_size 1, shared as in the
DAG): a literal is a fixed `Indicator` of value 1 or 0 for variable v-1 (never changed by EM, so
the PSDD's logical support survives training); `T` is a learnable `Bernoulli` with
p = exp(log p_true); a decision node is a `SumNodes` over one `ProdNodes(prime, sub)` per element with
weights exp(log theta). Zero-weight elements are dropped; duplicate (prime, sub) pairs are merged.
"""

from __future__ import annotations

import math
import os

from engine import budget
from engine.distributions.indicator import Indicator
from engine.dists import Bernoulli
from engine.io.limits import PSDD_BYTES_PER_BYTE, FileFormatError, read_capped
from engine.io.pernode import text_lines
from engine.nodes import CircuitError, NodeVector, inputs, multiply, summate

WEIGHT_SUM_TOL = 1e-3  # decision-node weights must sum to 1 within this (files print 6 decimals)


def read_psdd(path, vtree_path=None) -> NodeVector:
    """Root node vector of the PSDD in `path` (its last node); with `vtree_path`, the vtree is read
    too and every node's vtree id and every leaf's variable are checked against it."""
    path = os.fspath(path)
    data = read_capped(path)
    if budget.exceeds(len(data) * PSDD_BYTES_PER_BYTE):
        raise FileFormatError(f"{path}: this PSDD {budget.describe(len(data) * PSDD_BYTES_PER_BYTE)}")
    lines = text_lines(data, path)
    vtree = read_vtree(vtree_path) if vtree_path is not None else None
    count = _header(lines, "psdd", path)
    body = lines[1:]
    # The header counts *SDD* nodes, which writers tally differently (elements included or not);
    # in every file we have seen it is at least the number of PSDD node lines, never fewer.
    if len(body) > count:
        raise FileFormatError(f"{path}: header says psdd {count} but the file has {len(body)} node lines")
    return _PsddBuilder(path, vtree).build(body)


def read_vtree(path) -> dict[int, tuple]:
    """vtree id -> ("L", var) or ("I", left, right); variables stay numbered from 1 as in the file."""
    path = os.fspath(path)
    lines = text_lines(read_capped(path), path)
    count = _header(lines, "vtree", path)
    nodes: dict[int, tuple] = {}
    for lineno, tok in lines[1:]:
        if tok[0] == "L" and len(tok) == 3:
            vid, var = _ints(tok[1:], lineno, path)
            if var < 1:
                raise FileFormatError(f"{path}, line {lineno}: variable {var} must be >= 1")
            entry: tuple = ("L", var)
        elif tok[0] == "I" and len(tok) == 4:
            vid, left, right = _ints(tok[1:], lineno, path)
            for c in (left, right):
                if c not in nodes:
                    raise FileFormatError(
                        f"{path}, line {lineno}: vtree node {vid} refers to undefined node {c}"
                    )
            entry = ("I", left, right)
        else:
            raise FileFormatError(f"{path}, line {lineno}: malformed vtree line {' '.join(tok)!r:.80}")
        if vid in nodes:
            raise FileFormatError(f"{path}, line {lineno}: vtree node id {vid} defined twice")
        nodes[vid] = entry
    if len(nodes) != count:
        raise FileFormatError(f"{path}: header says vtree {count} but the file defines {len(nodes)} nodes")
    return nodes


def first_keyword(data: bytes) -> str | None:
    """First token after `c` comment lines if the bytes look like PSDD/vtree text, else None.

    Scans line by line, so a long comment header (files often carry kilobytes of them) is skipped.
    """
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        tok = data[start : min(end, start + 4096)].split()
        start = end + 1
        if tok and tok[0] != b"c":
            try:
                return tok[0].decode("ascii")
            except UnicodeDecodeError:
                return None
    return None


def _header(lines: list, keyword: str, path: str) -> int:
    if not lines or lines[0][1][0] != keyword:
        raise FileFormatError(f"{path}: expected a '{keyword} N' header line")
    lineno, tok = lines[0]
    if len(tok) != 2:
        raise FileFormatError(f"{path}, line {lineno}: malformed header {' '.join(tok)!r:.80}")
    (count,) = _ints(tok[1:], lineno, path)
    return count


def _ints(tokens: list[str], lineno: int, path: str) -> list[int]:
    try:
        return [int(t) for t in tokens]
    except ValueError:
        raise FileFormatError(
            f"{path}, line {lineno}: expected integers, got {' '.join(tokens)!r:.80}"
        ) from None


def _log_prob(token: str, lineno: int, path: str) -> float:
    """A log-probability: a float <= 0 (tiny positive rounding is allowed), -inf for zero."""
    try:
        x = float(token)
    except ValueError:
        raise FileFormatError(
            f"{path}, line {lineno}: expected a log-probability, got {token!r:.40}"
        ) from None
    if math.isnan(x) or x > 1e-6:
        raise FileFormatError(f"{path}, line {lineno}: {token!r:.40} is not a log-probability (must be <= 0)")
    return min(x, 0.0)


class _PsddBuilder:
    """Builds node vectors line by line, tracking each node's scope to check smoothness."""

    def __init__(self, path: str, vtree: dict | None):
        self.path, self.vtree = path, vtree
        self.nodes: dict[int, NodeVector] = {}
        # Scopes as bit masks (bit v-1 = variable v): a chain of n decision nodes costs n^2 bits, not
        # n^2 set entries (frozensets took 850 MB for a 5,000-deep, 400 KB file).
        self.scopes: dict[int, int] = {}
        self.products: dict[tuple[int, int], NodeVector] = {}

    def build(self, body: list) -> NodeVector:
        if not body:
            raise FileFormatError(f"{self.path}: the PSDD has no nodes")
        last = None
        for lineno, tok in body:
            kind = tok[0]
            if kind == "L" and len(tok) == 4:
                last = self._literal(tok, lineno)
            elif kind == "T" and len(tok) in (5, 6):
                last = self._true_node(tok, lineno)
            elif kind == "D" and len(tok) >= 4:
                last = self._decision(tok, lineno)
            else:
                raise FileFormatError(
                    f"{self.path}, line {lineno}: malformed PSDD line {' '.join(tok)!r:.80}"
                )
        return self.nodes[last]

    def _define(self, nid: int, vtree_id: int, node: NodeVector, scope: int, lineno: int, var=None):
        if nid in self.nodes:
            raise FileFormatError(f"{self.path}, line {lineno}: node id {nid} defined twice")
        if self.vtree is not None:
            vt = self.vtree.get(vtree_id)
            if vt is None:
                raise FileFormatError(
                    f"{self.path}, line {lineno}: node {nid} refers to undefined vtree node {vtree_id}"
                )
            if var is not None and vt != ("L", var):
                raise FileFormatError(
                    f"{self.path}, line {lineno}: node {nid} is over variable {var} but vtree node {vtree_id} is {vt}"
                )
        node.name = f"psdd {nid}"
        self.nodes[nid], self.scopes[nid] = node, scope
        return nid

    def _leaf(self, nid, vtree_id, var, p_true, lineno):
        if var < 1:
            raise FileFormatError(f"{self.path}, line {lineno}: variable {var} must be >= 1")
        node = inputs(var - 1, 1, Bernoulli(), params=[[p_true]], block_size=1)
        return self._define(nid, vtree_id, node, 1 << (var - 1), lineno, var=var)

    def _literal(self, tok, lineno):
        nid, vtree_id, lit = _ints(tok[1:], lineno, self.path)
        if lit == 0:
            raise FileFormatError(f"{self.path}, line {lineno}: literal 0 is not a variable")
        var = abs(lit)
        node = inputs(var - 1, 1, Indicator(2), params=[[1.0 if lit > 0 else 0.0]], block_size=1)
        return self._define(nid, vtree_id, node, 1 << (var - 1), lineno, var=var)

    def _true_node(self, tok, lineno):
        nid, vtree_id, var = _ints(tok[1:4], lineno, self.path)
        logs = [_log_prob(t, lineno, self.path) for t in tok[4:]]
        if len(logs) == 1:
            p = math.exp(logs[0])
        else:  # log(p_false) log(p_true)
            z = math.exp(logs[0]) + math.exp(logs[1])
            if z <= 0:
                raise FileFormatError(f"{self.path}, line {lineno}: both probabilities are zero")
            p = math.exp(logs[1]) / z
        return self._leaf(nid, vtree_id, var, min(max(p, 0.0), 1.0), lineno)

    def _decision(self, tok, lineno):
        nid, vtree_id, n = _ints(tok[1:4], lineno, self.path)
        if n < 1 or len(tok) != 4 + 3 * n:
            raise FileFormatError(
                f"{self.path}, line {lineno}: decision node {nid} declares {n} elements but has "
                f"{len(tok) - 4} element tokens (expected {3 * max(n, 0)}, and n >= 1)"
            )
        weights: dict[tuple[int, int], float] = {}
        for k in range(n):
            prime, sub = _ints(tok[4 + 3 * k : 6 + 3 * k], lineno, self.path)
            for c in (prime, sub):
                if c not in self.nodes:
                    raise FileFormatError(
                        f"{self.path}, line {lineno}: node {nid} refers to undefined node {c}"
                    )
            w = math.exp(_log_prob(tok[6 + 3 * k], lineno, self.path))
            weights[(prime, sub)] = weights.get((prime, sub), 0.0) + w
        total = sum(weights.values())
        if abs(total - 1.0) > WEIGHT_SUM_TOL:
            raise FileFormatError(
                f"{self.path}, line {lineno}: decision node {nid}'s weights sum to {total:.6g}, not 1"
            )
        scope = self._check_elements(nid, list(weights), lineno)
        kept = [(e, w) for e, w in weights.items() if w > 0]
        prods = [self._product(*e) for e, _ in kept]
        params = [[[w / total]] for _, w in kept]
        node = summate(*prods, num_nodes=1, block_size=1, params=params)
        return self._define(nid, vtree_id, node, scope, lineno)

    def _check_elements(self, nid: int, elements: list, lineno: int) -> int:
        """Scope bit mask of decision node `nid`; CircuitError if an element is not decomposable or the
        elements' scopes differ (not smooth)."""
        scopes = []
        for prime, sub in elements:
            sp, ss = self.scopes[prime], self.scopes[sub]
            if sp & ss:
                raise CircuitError(
                    f"{self.path}, line {lineno}: PSDD decision node {nid} is not decomposable: prime {prime} "
                    f"and sub {sub} share variables {_variables(sp & ss)[:5]} (numbered from 1)"
                )
            scopes.append(sp | ss)
        for s in scopes[1:]:
            if s != scopes[0]:
                raise CircuitError(
                    f"{self.path}, line {lineno}: PSDD decision node {nid} is not smooth: its elements have "
                    f"scopes {_variables(scopes[0])} and {_variables(s)} (variables numbered from 1)"
                )
        return scopes[0]

    def _product(self, prime: int, sub: int) -> NodeVector:
        key = (prime, sub)
        if key not in self.products:
            self.products[key] = multiply(self.nodes[prime], self.nodes[sub], block_size=1)
        return self.products[key]


def _variables(mask: int, limit: int = 20) -> list[int]:
    """The first `limit` variables (numbered from 1) of a scope bit mask, for error messages."""
    out, v = [], 1
    while mask and len(out) < limit:
        if mask & 1:
            out.append(v)
        mask >>= 1
        v += 1
    return out
