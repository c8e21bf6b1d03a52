"""Build node vectors from per-node text formats (Juice `.jpc`, `.spn`, `.clt`).

These formats define one circuit node per line, children before parents. Each node becomes a 1-node
vector (block_size 1) shared as in the file's DAG, the mapping the PSDD importer uses; a later
compile pass packs them into layers. Scopes are tracked as bit masks (bit v = variable v) so a
product that is not decomposable or a sum that is not smooth is reported with its line number.
"""

from __future__ import annotations

import math

from engine.dists import Bernoulli, Categorical, Gaussian
from engine.io.limits import FileFormatError
from engine.nodes import CircuitError, NodeVector, inputs, multiply, summate

WEIGHT_SUM_TOL = 1e-3  # a sum node's weights must sum to 1 within this (files print few decimals)


def indicator_leaf(var: int, value: int, num_cats: int) -> NodeVector:
    """Leaf that is 1 when x_var == value, else 0: fixed, learns nothing under EM."""
    return indicator_vector(var, [value], num_cats)


def indicator_vector(var: int, values: list[int], num_cats: int) -> NodeVector:
    """`len(values)` indicator leaves over `var` (node i is 1 when x_var == values[i])."""
    Indicator = _indicator_family()
    n = len(values)
    if Indicator is not None:
        return inputs(var, n, Indicator(num_cats), params=[[float(v)] for v in values], block_size=n)
    if num_cats == 2:  # as the PSDD importer: a Bernoulli with p = 0 or 1
        return inputs(var, n, Bernoulli(), params=[[float(v)] for v in values], block_size=n)
    one_hot = [[1.0 if k == v else 0.0 for k in range(num_cats)] for v in values]
    return inputs(var, n, Categorical(num_cats), params=one_hot, block_size=n)


def _indicator_family():
    """The fixed Indicator family when this engine has one, else None (then Bernoulli/Categorical)."""
    try:
        from engine.distributions.indicator import Indicator
    except ImportError:
        return None
    return Indicator


def categorical_leaf(var: int, probs: list[float]) -> NodeVector:
    total = sum(probs)
    return inputs(var, 1, Categorical(len(probs)), params=[[p / total for p in probs]], block_size=1)


def binomial_leaf(var: int, num_trials: int, p: float) -> NodeVector:
    from engine.distributions.binomial import Binomial

    return inputs(var, 1, Binomial(num_trials), params=[[p]], block_size=1)


def gaussian_leaf(var: int, mu: float, sigma: float) -> NodeVector:
    return inputs(var, 1, Gaussian(min_std=min(1e-2, sigma)), params=[[mu, sigma]], block_size=1)


class PerNodeBuilder:
    """Collects nodes by file id; `product` / `sum` check decomposability and smoothness."""

    def __init__(self, path: str, max_depth: int | None = None):
        self.path = path
        self.max_depth = max_depth  # refuse a file deeper than this while reading it, before it costs memory
        self.nodes: dict[int, NodeVector] = {}
        self.scopes: dict[int, int] = {}
        self.depths: dict[int, int] = {}

    def where(self, lineno: int) -> str:
        return f"{self.path}, line {lineno}"

    def child(self, cid: int, nid: int, lineno: int) -> NodeVector:
        if cid not in self.nodes:
            raise FileFormatError(f"{self.where(lineno)}: node {nid} refers to undefined node {cid}")
        return self.nodes[cid]

    def define(self, nid: int, node: NodeVector, scope: int, lineno: int, label: str) -> NodeVector:
        if nid in self.nodes:
            raise FileFormatError(f"{self.where(lineno)}: node id {nid} defined twice")
        depth = 1 + max((self.depths[c.uid] for c in node.children), default=0)
        if self.max_depth is not None and depth > self.max_depth:
            raise CircuitError(
                f"{self.where(lineno)}: node {nid} makes the circuit {depth} nodes deep; "
                f"the limit here is {self.max_depth}"
            )
        node.name = f"{label} {nid}"
        self.nodes[nid], self.scopes[nid], self.depths[node.uid] = node, scope, depth
        return node

    def leaf(self, nid: int, node: NodeVector, lineno: int, label: str) -> NodeVector:
        return self.define(nid, node, 1 << node.var, lineno, label)

    def product(self, nid: int, child_ids: list[int], lineno: int, label: str) -> NodeVector:
        if not child_ids:
            raise FileFormatError(f"{self.where(lineno)}: product node {nid} has no children")
        scope = 0
        for c in child_ids:
            self.child(c, nid, lineno)
            if scope & self.scopes[c]:
                raise CircuitError(
                    f"{self.where(lineno)}: product node {nid} is not decomposable "
                    f"(its children share variables)"
                )
            scope |= self.scopes[c]
        node = multiply(*(self.nodes[c] for c in child_ids), block_size=1)
        return self.define(nid, node, scope, lineno, label)

    def sum(
        self, nid: int, child_ids: list[int], log_weights: list[float], lineno: int, label: str
    ) -> NodeVector:
        """Sum node with weights exp(log_weights); duplicates merged, zero weights dropped."""
        if not child_ids:
            raise FileFormatError(f"{self.where(lineno)}: sum node {nid} has no children")
        weights: dict[int, float] = {}
        for c, lw in zip(child_ids, log_weights):
            self.child(c, nid, lineno)
            if math.isnan(lw) or lw > 1e-6:
                raise FileFormatError(
                    f"{self.where(lineno)}: sum node {nid} has log-weight {lw:g} (must be <= 0)"
                )
            weights[c] = weights.get(c, 0.0) + math.exp(lw)
        total = sum(weights.values())
        if abs(total - 1.0) > WEIGHT_SUM_TOL:
            raise FileFormatError(f"{self.where(lineno)}: sum node {nid}'s weights sum to {total:.6g}, not 1")
        scopes = {self.scopes[c] for c in weights}
        if len(scopes) != 1:
            raise CircuitError(
                f"{self.where(lineno)}: sum node {nid} is not smooth (children have different scopes)"
            )
        kept = [(c, w) for c, w in weights.items() if w > 0]
        node = summate(
            *(self.nodes[c] for c, _ in kept),
            num_nodes=1,
            block_size=1,
            params=[[[w / total]] for _, w in kept],
        )
        return self.define(nid, node, scopes.pop(), lineno, label)


def parse_float(token: str, what: str, where: str) -> float:
    try:
        return float(token)
    except ValueError:
        raise FileFormatError(f"{where}: expected {what}, got {token!r:.40}") from None


def parse_ints(tokens: list[str], where: str) -> list[int]:
    try:
        return [int(t) for t in tokens]
    except ValueError:
        raise FileFormatError(f"{where}: expected integers, got {' '.join(tokens)!r:.80}") from None


def text_lines(data: bytes, path: str, comment: str | None = "c") -> list[tuple[int, list[str]]]:
    """(1-based line number, tokens) of every non-blank line that is not a comment."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path}: not a text file ({e})") from None
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        tok = line.split()
        if tok and tok[0] != comment:
            out.append((i, tok))
    return out
