#!/usr/bin/env python
"""Convert a PyJuice circuit file (a pickle) to Juice's text `.jpc`, which Circuit Workbench reads.

Run it INSIDE a PyJuice environment, on a file you trust (unpickling runs code; the engine itself
never unpickles):

    python scripts/pyjuice_to_jpc.py model.jpc model.text.jpc

Supported leaves: Categorical (C lines), Bernoulli (2-way C), Gaussian (G), Literal / Indicator (I).
Tied node vectors are written with their source's parameters. The text format is described in
engine/io/jpc.py. This script does not import the engine, so it runs without it.
"""

from __future__ import annotations

import argparse
import math
import sys


def _log(x: float) -> str:
    return repr(math.log(x)) if x > 0 else "-Inf"


def _block_size(ns) -> int:
    return int(getattr(ns, "block_size", None) or getattr(ns, "group_size"))


def _var(ns) -> int:
    scope = list(ns.scope.to_list() if hasattr(ns.scope, "to_list") else ns.scope)
    if len(scope) != 1:
        raise SystemExit(
            f"pyjuice_to_jpc: a multivariate input vector ({len(scope)} variables) has no JPC line"
        )
    return int(scope[0]) + 1


def _params(ns):
    src = ns.get_source_ns() if getattr(ns, "is_tied", lambda: False)() else ns
    return src.get_params()


def _leaf_lines(ns, first: int) -> list[str]:
    kind, var, n = type(ns.dist).__name__, _var(ns), ns.num_nodes
    if kind in ("Literal", "Indicator"):
        value = int(getattr(ns.dist, "lit", getattr(ns.dist, "value", 1)))
        return [f"I {first + i} 0 {var} {value}" for i in range(n)]
    p = _params(ns).detach().double().cpu().reshape(n, -1)
    if kind == "Categorical":
        return [
            f"C {first + i} 0 {var} " + " ".join(_log(q) for q in row.tolist()) for i, row in enumerate(p)
        ]
    if kind == "Bernoulli":
        return [f"C {first + i} 0 {var} {_log(1 - q)} {_log(q)}" for i, q in enumerate(p[:, 0].tolist())]
    if kind == "Gaussian":
        return [f"G {first + i} 0 {var} {row[0]!r} {row[1]!r}" for i, row in enumerate(p.tolist())]
    raise SystemExit(f"pyjuice_to_jpc: {kind} leaves have no JPC line")


def _prod_lines(ns, first: int, ids: dict) -> list[str]:
    bs = _block_size(ns)
    edges = ns.edge_ids.cpu().tolist()  # [num_node_blocks, num_children]
    out = []
    for b, row in enumerate(edges):
        for r in range(bs):
            kids = []
            for c, cb in zip(ns.chs, row):
                cbs = _block_size(c)
                kids.append(ids[id(c)] + cb * cbs + (r % cbs))
            out.append(f"P {first + b * bs + r} 0 {len(kids)} " + " ".join(map(str, kids)))
    return out


def _sum_lines(ns, first: int, ids: dict) -> list[str]:
    dense = (
        ns.get_params(as_matrix=True) if not ns.is_tied() else ns.get_source_ns().get_params(as_matrix=True)
    )
    dense = dense.detach().double().cpu()  # [num_nodes, num_child_nodes]
    child_ids = []
    for c in ns.chs:
        child_ids += [ids[id(c)] + k for k in range(c.num_nodes)]
    out = []
    for n, row in enumerate(dense.tolist()):
        parts = [f"{child_ids[k]} {_log(w)}" for k, w in enumerate(row) if w > 0]
        out.append(f"S {first + n} 0 {len(parts)} " + " ".join(parts))
    return out


def convert(root) -> str:
    ids: dict[int, int] = {}
    lines: list[str] = []
    for ns in root:  # PyJuice iterates a circuit children first
        first = len(lines)
        ids[id(ns)] = first
        if ns.is_input():
            lines += _leaf_lines(ns, first)
        elif ns.is_prod():
            lines += _prod_lines(ns, first, ids)
        else:
            lines += _sum_lines(ns, first, ids)
    if root.num_nodes != 1:
        raise SystemExit(f"pyjuice_to_jpc: the root vector has {root.num_nodes} nodes; JPC has one root")
    return (
        "c converted from PyJuice by scripts/pyjuice_to_jpc.py\n"
        + f"jpc {len(lines)}\n"
        + "\n".join(lines)
        + "\n"
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="PyJuice file written by pyjuice.io.save (a pickle: trust it)")
    ap.add_argument("dst", help="text .jpc to write")
    args = ap.parse_args(argv)
    try:
        import pyjuice as juice
    except ImportError:
        print("pyjuice_to_jpc: run this inside a PyJuice environment (pip install pyjuice)", file=sys.stderr)
        return 2
    root = juice.io.load(args.src) if hasattr(juice, "io") else juice.load(args.src)
    with open(args.dst, "w", encoding="ascii") as f:
        f.write(convert(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
