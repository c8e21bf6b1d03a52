"""Turning plain circuit descriptions into engine roots, with readable errors instead of tracebacks.

Three ways in, each a plain dict so it can be stored as JSON and sent to a worker process:

    {"source": "template", "template": "hclt", "num_latents": 16, ...}   # see TEMPLATE_DEFAULTS
    {"source": "graph", "nodes": [...], "edges": [...]}                   # see build_graph
    {"source": "file", "path": "uploads/abc.cwpc"}                        # engine.load

`build(spec, dataset)` never raises for a bad circuit: it returns a `BuildResult` whose `error` says
what is wrong ("circuit is not smooth: ...", "circuit is not decomposable: ...").
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from engine.nodes import CircuitError, NodeVector, inputs, multiply, summate

# The one spec -> circuit translator, shared with the CLI; re-exported for the workbench's state.
from engine.structures.templates import (
    DIST_NAMES,
    TEMPLATE_DEFAULTS,
    TEMPLATES,
    build_template,
    template_vars,
)
from engine.structures.templates import input_dist as make_dist
from workbench.services import circuit_limits

__all__ = ["DIST_NAMES", "TEMPLATES", "TEMPLATE_DEFAULTS", "BuildResult", "build", "describe", "make_dist"]

MAX_CIRCUIT_FILE_BYTES = int(os.environ.get("CW_MAX_CIRCUIT_MB", "256")) * 2**20


@dataclass
class BuildResult:
    """Outcome of a build: `root` on success, otherwise `error` (one readable line)."""

    root: NodeVector | None = None
    error: str | None = None
    seconds: float = 0.0
    info: dict = field(default_factory=dict)  # num_vectors, num_nodes, num_vars, ...

    @property
    def ok(self) -> bool:
        return self.root is not None and self.error is None


def describe(root: NodeVector) -> dict:
    """Counts for a status line: vectors and nodes by kind, variables, block edges."""
    order = root.topological()
    counts = {"input": 0, "product": 0, "sum": 0}
    nodes = dict(counts)
    vars_: set[int] = set()
    for v in order:
        counts[v.kind] += 1
        nodes[v.kind] += v.num_nodes
        if v.kind == "input":
            vars_.add(v.var)
    return {
        "num_vectors": len(order),
        "num_nodes": sum(nodes.values()),
        "vectors_by_kind": counts,
        "nodes_by_kind": nodes,
        "num_vars": len(vars_),
    }


def build(spec: dict, dataset=None) -> BuildResult:
    """Build the circuit `spec` describes (see module docstring); `dataset` feeds data-driven templates."""
    t0 = time.perf_counter()
    try:
        source = spec.get("source", "template")
        if source == "template":
            circuit_limits.check_template({**TEMPLATE_DEFAULTS, **spec}, template_vars(spec, dataset))
            root = build_template(spec, dataset)
        elif source == "graph":
            circuit_limits.check_graph(spec)
            root = build_graph(spec)
        elif source == "file":
            root = load_circuit_file(spec["path"])
        else:
            raise CircuitError(f"unknown circuit source {source!r} (template, graph or file)")
        circuit_limits.check_depth(root)
        return BuildResult(root=root, seconds=time.perf_counter() - t0, info=describe(root))
    except (ValueError, KeyError, TypeError, IndexError, OSError, ArithmeticError, RecursionError) as err:
        return BuildResult(error=error_message(err), seconds=time.perf_counter() - t0)
    except MemoryError:
        return BuildResult(error="not enough memory to build this circuit", seconds=time.perf_counter() - t0)


def error_message(err: BaseException) -> str:
    """One readable line for the UI: the exception's message, prefixed with its kind when unclear."""
    msg = str(err).strip() or type(err).__name__
    if isinstance(err, KeyError):
        return f"missing field {msg}"
    if isinstance(err, (CircuitError, ValueError)):
        return msg
    return f"{type(err).__name__}: {msg}"


# ----------------------------------------------------------------------------------------- templates


# ----------------------------------------------------------------------------------------- graphs


def build_graph(spec: dict) -> NodeVector:
    """Node vectors from a drawn graph; raises CircuitError naming the node at fault.

    `spec["nodes"]`: [{"id": str, "kind": "input"|"product"|"sum", "num_nodes": int,
    "block_size": int|None, "var": int (inputs), "dist": "categorical"|"bernoulli"|"gaussian",
    "num_cats": int}]; `spec["edges"]`: [{"parent": id, "child": id}] (children keep list order).
    The root is the one node without parents. Smoothness and decomposability are checked here.
    """
    nodes = {str(n["id"]): n for n in spec.get("nodes", [])}
    if not nodes:
        raise CircuitError("the graph is empty: add at least one input and one sum node")
    children: dict[str, list[str]] = {nid: [] for nid in nodes}
    has_parent: set[str] = set()
    for e in spec.get("edges", []):
        p, c = str(e["parent"]), str(e["child"])
        for end in (p, c):
            if end not in nodes:
                raise CircuitError(f"edge {p} -> {c} refers to unknown node {end!r}")
        children[p].append(c)
        has_parent.add(c)
    roots = [nid for nid in nodes if nid not in has_parent]
    if len(roots) != 1:
        what = (
            "no node without parents (is there a cycle?)" if not roots else f"several: {', '.join(roots[:5])}"
        )
        raise CircuitError(f"the graph needs exactly one root node; found {what}")
    built = _build_nodes(nodes, children, roots[0])
    root = built[roots[0]]
    from engine.compiler import validate

    validate(root)  # raises "circuit is not smooth/decomposable: ..." and root-size errors
    return root


def _build_nodes(nodes: dict, children: dict, root: str) -> dict[str, NodeVector]:
    built: dict[str, NodeVector] = {}
    state: dict[str, int] = {}  # 1 = on the stack, 2 = built
    stack = [(root, False)]
    while stack:
        nid, expanded = stack.pop()
        if expanded:
            built[nid] = _make_vector(nodes[nid], [built[c] for c in children[nid]])
            state[nid] = 2
            continue
        if state.get(nid) == 2:
            continue
        if state.get(nid) == 1:
            raise CircuitError(f"the graph has a cycle through node {nid!r}")
        state[nid] = 1
        stack.append((nid, True))
        for c in children[nid]:
            if state.get(c) == 1:
                raise CircuitError(f"the graph has a cycle through node {c!r}")
            if state.get(c) != 2:
                stack.append((c, False))
    return built


def _make_vector(n: dict, kids: list[NodeVector]) -> NodeVector:
    nid, kind = n["id"], n.get("kind")
    bs = n.get("block_size") or None
    try:
        if kind == "input":
            if kids:
                raise CircuitError("an input node cannot have children")
            dist = make_dist(n.get("dist", "categorical"), n.get("num_cats", 2))
            return inputs(int(n["var"]), int(n["num_nodes"]), dist, block_size=bs)
        if not kids:
            raise CircuitError(f"a {kind} node needs at least one child")
        if kind == "product":
            return multiply(*kids, block_size=bs)
        if kind == "sum":
            return summate(*kids, num_nodes=int(n["num_nodes"]), block_size=bs)
        raise CircuitError(f"unknown kind {kind!r} (input, product or sum)")
    except (ValueError, KeyError, TypeError, OverflowError) as err:
        raise CircuitError(f"node {nid!r}: {error_message(err)}") from err


# ----------------------------------------------------------------------------------------- files


def load_circuit_file(path, max_bytes: int | None = None) -> NodeVector:
    """Root of a native (`engine.save`) or `.psdd` file; FileFormatError/CircuitError with a reason."""
    import engine
    from engine.io import FileFormatError

    limit = MAX_CIRCUIT_FILE_BYTES if max_bytes is None else max_bytes
    if os.path.isfile(path) and os.path.getsize(path) > limit:
        raise FileFormatError(f"{os.path.basename(path)}: file is too large (limit {limit // 2**20} MiB)")
    obj = engine.load(path, max_depth=circuit_limits.MAX_DEPTH)  # deep-chain text refused while read
    if isinstance(obj, NodeVector):
        return obj
    return obj.sync_to_nodes() if hasattr(obj, "sync_to_nodes") else obj.root
