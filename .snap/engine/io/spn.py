"""Sum-product networks in Juice's `.spn` text dialect: `read_spn`.

The format, as Juice.jl reads and writes it: a domain line giving each variable's number of values,
then one node per line (ids implicit: 0, 1, ... in file order; the last node is the root), then EOF::

    (2 2 2)                      # three variables, two values each (Juice supports only 2)
    v var value                  # indicator [x_var == value]; variables and values from 0
    * c_1 ... c_n                # product of earlier nodes
    + c_1 logw_1 ... c_n logw_n  # mixture, log-weights
    EOF

Domains larger than 2 are accepted here (an indicator over that many values).
"""

from __future__ import annotations

import os

from engine.io.limits import FileFormatError, read_capped
from engine.io.pernode import PerNodeBuilder, indicator_leaf, parse_float, parse_ints, text_lines
from engine.nodes import NodeVector


def looks_like_spn(data: bytes) -> bool:
    return data.lstrip()[:1] == b"("


def read_spn(path, data: bytes | None = None, max_depth: int | None = None) -> NodeVector:
    """Root node vector of the `.spn` file at `path` (or of its bytes `data`)."""
    path = os.fspath(path)
    data = read_capped(path) if data is None else data
    lines = text_lines(data, path, comment=None)
    if not lines:
        raise FileFormatError(f"{path}: file is empty")
    ln, tok = lines[0]
    dom_text = " ".join(tok)
    if not (dom_text.startswith("(") and dom_text.endswith(")")):
        raise FileFormatError(f"{path}, line {ln}: expected a domain line like '(2 2 2)'")
    domains = parse_ints(dom_text[1:-1].split(), f"{path}, line {ln}")
    if not domains or min(domains) < 2:
        raise FileFormatError(f"{path}, line {ln}: every variable needs a domain of at least 2 values")
    b = PerNodeBuilder(path, max_depth)
    node, nid, ended = None, 0, False
    for ln, tok in lines[1:]:
        where = f"{path}, line {ln}"
        if tok == ["EOF"]:
            ended = True
            break
        kind, rest = tok[0], tok[1:]
        if kind == "v" and len(rest) == 2:
            var, value = parse_ints(rest, where)
            if not 0 <= var < len(domains) or not 0 <= value < domains[max(var, 0)]:
                raise FileFormatError(f"{where}: indicator v {var} {value} outside the domain line")
            node = b.leaf(nid, indicator_leaf(var, value, domains[var]), ln, "spn")
        elif kind == "*" and rest:
            node = b.product(nid, parse_ints(rest, where), ln, "spn")
        elif kind == "+" and rest and len(rest) % 2 == 0:
            logw = [parse_float(t, "a log-weight", where) for t in rest[1::2]]
            node = b.sum(nid, parse_ints(rest[0::2], where), logw, ln, "spn")
        else:
            raise FileFormatError(f"{where}: malformed SPN line {' '.join(tok)!r:.80}")
        nid += 1
    if node is None:
        raise FileFormatError(f"{path}: the SPN has no nodes")
    if not ended:
        raise FileFormatError(f"{path}: missing the final EOF line (truncated file?)")
    return node
