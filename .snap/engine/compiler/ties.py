"""Tied parameters in the layer plan: which parameter slots copy which (PyJuice's `tie_params`).

A tied copy keeps its own slots in the flat sum parameters and in its input layer, so no forward or
flows kernel changes; the plan lists, per tie, the source slot and the copy slot. An executor sums
the copies' flows (or statistics) into their sources before the EM update and copies the updated
sources back (engine/executor/ties.py). Memory grows with the number of copies; the learnable set
does not. Plain numpy, as the rest of the plan.
"""

from __future__ import annotations

import numpy as np

from engine.compiler.plan import Ties
from engine.nodes import CircuitError, InputNodes, NodeVector, SumNodes, tie_source


def _groups(vectors: list[NodeVector]) -> list[tuple[NodeVector, list[NodeVector]]]:
    """(leader, copies) per tie group among `vectors`; the leader is the group's first compiled member
    (the user's source when it is part of the circuit)."""
    by_root: dict[int, list[NodeVector]] = {}
    for v in vectors:
        by_root.setdefault(tie_source(v).uid, []).append(v)
    out = []
    for root_uid, members in by_root.items():
        if len(members) < 2:
            continue
        leader = next((m for m in members if m.uid == root_uid), members[0])
        out.append((leader, [m for m in members if m is not leader]))
    return out


def sum_slots(layers, s: SumNodes) -> np.ndarray:
    """Flat parameter slot of every weight of sum vector `s`, in its tile order `[num_tiles, b, b]`."""
    for layer in layers:
        for b, srcs in layer.sum_sources.items():
            src = next((x for x in srcs if x.uid == s.uid), None)
            if src is None:
                continue
            slots = np.full((src.num_tiles, b, b), -1, dtype=np.int64)
            for p in layer.partitions:
                if p.block_size != b:
                    continue
                ts = p.tile_source
                i, k = np.nonzero((ts >= src.first_tile) & (ts < src.first_tile + src.num_tiles))
                w = p.width
                base = p.param_offset + i * b * w * b + k * b  # tile (i, k) starts here, rows w * b apart
                tile = np.arange(b)[:, None] * (w * b) + np.arange(b)[None, :]  # [b, b] offsets in a tile
                slots[ts[i, k] - src.first_tile] = base[:, None, None] + tile[None]
            if (slots < 0).any():
                raise CircuitError("internal: a tied sum vector's tiles are not all laid out")
            return slots
    raise CircuitError("internal: a tied sum vector has no layer")


def build_ties(layers, sums: list[SumNodes], inputs: list[InputNodes]) -> Ties:
    """The plan's tie table from the laid-out layers and the circuit's vectors."""
    src, dst, tied = [], [], 0
    for leader, copies in _groups(sums):
        lead = sum_slots(layers, leader).ravel()
        for c in copies:
            src.append(lead)
            dst.append(sum_slots(layers, c).ravel())
            tied += lead.size
    where = {}  # input vector uid -> (layer index, first local node)
    for layer in layers:
        if layer.input_group is not None:
            for uid, first, _ in layer.input_group.vectors:
                where[uid] = (layer.index, first)
    per_layer: dict[int, tuple[list, list]] = {}
    for leader, copies in _groups(inputs):
        li, lo = where[leader.uid]
        for c in copies:
            lj, co = where[c.uid]
            if lj != li:
                raise CircuitError("internal: tied input vectors landed in different input layers")
            s, d = per_layer.setdefault(li, ([], []))
            s.append(lo + np.arange(c.num_nodes))
            d.append(co + np.arange(c.num_nodes))
            tied += c.params.numel()
    return Ties(_cat(src), _cat(dst), {li: (_cat(s), _cat(d)) for li, (s, d) in per_layer.items()}, tied)


def _cat(xs: list) -> np.ndarray:
    return np.concatenate(xs).astype(np.int64) if xs else np.zeros(0, dtype=np.int64)
