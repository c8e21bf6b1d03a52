"""Partitioning node blocks by number of children, so padded dense tables waste little.

PyJuice's observation: a sum layer becomes a handful of dense `[node blocks, width]` tables if
node blocks with similar numbers of child blocks are grouped. We sort by degree and grow each
group while its largest degree stays within `(1 + tolerance)` of its smallest, so a partition
pads at most `tolerance / (1 + tolerance)` of its slots. Larger tolerance: fewer, more padded
partitions (fewer kernel launches); zero: one partition per distinct degree.
"""

from __future__ import annotations

import math

import numpy as np


def group_by_degree(degrees: np.ndarray, tolerance: float) -> list[np.ndarray]:
    """Split indices `0..len(degrees)-1` into groups of similar degree (each sorted by degree)."""
    if tolerance < 0:
        raise ValueError(f"partition tolerance must be >= 0, got {tolerance}")
    order = np.argsort(degrees, kind="stable")
    sorted_deg = degrees[order]
    groups, i, n = [], 0, len(order)
    while i < n:
        lo = int(sorted_deg[i])
        limit = max(lo, math.floor(lo * (1.0 + tolerance) + 1e-9))
        j = int(np.searchsorted(sorted_deg, limit, side="right"))
        groups.append(order[i:j])
        i = j
    return groups


def padded_table(owner: np.ndarray, values: np.ndarray, members: np.ndarray, pad) -> np.ndarray:
    """Rows of `values` grouped by `owner` for the owners in `members`, right-padded with `pad`.

    `owner` must be sorted ascending (entries of one owner contiguous).
    Returns `[len(members), max count]`.
    """
    starts = np.searchsorted(owner, members, side="left")
    ends = np.searchsorted(owner, members, side="right")
    counts = ends - starts
    width = int(counts.max()) if len(counts) else 0
    table = np.full((len(members), width), pad, dtype=values.dtype)
    col = np.arange(width)[None, :]
    valid = col < counts[:, None]
    idx = (starts[:, None] + col)[valid]
    table[valid] = values[idx]
    return table
