"""Size limits for circuits built inside the server, checked before a single node is allocated.

A Compose graph with `num_nodes=1e8` took 6.1 GB and 26 s in the server process, freezing every
session; an HCLT with 100,000 latents asks for terabytes. The estimate counts float32 parameters
(dense sums: nodes x child nodes; templates: about latents^2 per variable) twice (parameters and
their flows) against the memory budget (`engine.budget`, CW_MEMORY_BUDGET_MB). Depth is capped too:
a 5,000-deep PSDD chain compiles to 10,000 layers and 1.4 GB.
"""

from __future__ import annotations

import os

from engine import budget
from engine.nodes import CircuitError

MAX_VECTOR_NODES = int(os.environ.get("CW_MAX_VECTOR_NODES", str(1 << 20)))  # nodes in one vector
MAX_DEPTH = int(os.environ.get("CW_MAX_CIRCUIT_DEPTH", "4096"))  # vectors on the longest path
BYTES_PER_PARAM = 4 * 2  # float32 parameter and its flow
TEMPLATE_SUMS_PER_VAR = {"hclt": 1, "hmm": 1, "pd": 4, "rat_spn": 2}  # k x k sum blocks per variable


def check_template(spec: dict, num_vars: int) -> None:
    """Refuse a template whose parameters would pass the memory budget (CircuitError)."""
    k = _count(spec.get("num_latents", 16), "num_latents")
    reps = int(spec.get("num_repetitions", 1)) if spec.get("template") == "rat_spn" else 1
    params = k * k * max(num_vars, 1) * TEMPLATE_SUMS_PER_VAR.get(spec.get("template"), 4) * max(reps, 1)
    _check_params(params, f"{spec.get('template')} with {k} latents over {num_vars} variables")


def check_graph(spec: dict) -> None:
    """Refuse a drawn graph with a huge vector or whose dense sums would pass the memory budget."""
    nodes = {str(n.get("id")): n for n in spec.get("nodes", []) if isinstance(n, dict)}
    children: dict[str, list[str]] = {nid: [] for nid in nodes}
    for e in spec.get("edges", []):
        if isinstance(e, dict) and str(e.get("parent")) in children:
            children[str(e["parent"])].append(str(e.get("child")))
    sizes = _vector_sizes(nodes, children)
    params = 0
    for nid, n in nodes.items():
        if n.get("kind") == "sum":
            params += sizes[nid] * sum(sizes.get(c, 0) for c in children[nid])
        elif n.get("kind") == "input":
            params += sizes[nid] * max(_count(n.get("num_cats", 2), "num_cats"), 2)
    _check_params(params, "this graph")


def check_depth(root) -> int:
    """Longest path in vectors from `root` to an input; CircuitError past MAX_DEPTH."""
    depth: dict[int, int] = {}
    for v in root.topological():  # children first
        depth[v.uid] = 1 + max((depth[c.uid] for c in v.children), default=0)
    d = depth[root.uid]
    if d > MAX_DEPTH:
        raise CircuitError(
            f"the circuit is {d} vectors deep; the limit is {MAX_DEPTH} (CW_MAX_CIRCUIT_DEPTH), since every "
            f"level becomes a layer the server compiles and draws"
        )
    return d


def _vector_sizes(nodes: dict, children: dict) -> dict[str, int]:
    """Nodes per vector: declared for inputs and sums, the largest child's for products (cycles count 0)."""
    sizes: dict[str, int] = {}
    visiting: set[str] = set()
    for start in nodes:
        stack = [(start, False)]
        while stack:
            nid, expanded = stack.pop()
            if nid in sizes or nid not in nodes:
                continue
            n = nodes[nid]
            if n.get("kind") != "product":
                sizes[nid] = _count(n.get("num_nodes", 1), f"node {nid!r} num_nodes")
            elif expanded:
                sizes[nid] = max((sizes.get(c, 0) for c in children[nid]), default=0)
            elif nid not in visiting:
                visiting.add(nid)
                stack.append((nid, True))
                stack.extend((c, False) for c in children[nid] if c not in visiting)
    return sizes


def _count(value, what: str) -> int:
    """A positive whole number no larger than MAX_VECTOR_NODES."""
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        raise CircuitError(f"{what} must be a whole number, got {value!r:.40}") from None
    if n < 1:
        raise CircuitError(f"{what} must be at least 1, got {n}")
    if n > MAX_VECTOR_NODES:
        raise CircuitError(f"{what} is {n:,}; the limit is {MAX_VECTOR_NODES:,} (CW_MAX_VECTOR_NODES)")
    return n


def _check_params(params: int, what: str) -> None:
    need = params * BYTES_PER_PARAM
    if budget.exceeds(need):
        raise CircuitError(f"{what} has about {params:,} parameters and {budget.describe(need)}")
