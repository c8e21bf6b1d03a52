"""Poon-Domingos (PD) structure for images and grids (Poon & Domingos 2011; PyJuice's `PD`).

Regions are axis-aligned boxes of the grid `data_shape` (variables numbered row-major). A box is
split in two at every multiple of `split_intervals[axis]` strictly inside it, along every axis; each
split is a product of the two halves' sum vectors, and the box's sum vector mixes those products.
Boxes are memoised, so the result is a DAG with one sum vector per box. A box with no split point
inside (one grid cell), or below `max_split_depth` nested splits, is a *leaf region*: the product of its
pixels' input vectors under a sum vector. For 28x28 with (4, 4): 784 boxes, 3,136 split products.

As in PyJuice, a sum vector with more than `max_prod_block_conns` products connects each node block
to a random `max_prod_block_conns` of them (all of their blocks); a leaf region's sum connects node
block i to block i of the pixel product only (block-diagonal). The root is one node over all splits.
Unlike PyJuice, every pixel has one input vector shared by all leaf regions that contain it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from engine.dists import Distribution
from engine.nodes import NodeVector, inputs, largest_pow2_divisor, multiply, summate
from engine.structures._checks import check_block_size, check_dist, positive_int

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (start, stop) per axis
DEFAULT_MAX_BLOCK = 32  # PyJuice's PD uses node blocks of at most 32


def _as_tuple(name: str, value, num_axes: int) -> tuple[int, ...]:
    vals = (value,) * num_axes if np.isscalar(value) else tuple(value)
    if len(vals) != num_axes:
        raise ValueError(f"{name} must have {num_axes} entries (one per axis), got {value!r}")
    return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(vals))


class _PDBuilder:
    """Builds one PD circuit; holds the memo of boxes and the shared pixel inputs."""

    def __init__(self, shape, intervals, num_latents, dist, max_conns, bs, rng):
        self.shape, self.intervals = shape, intervals
        self.num_latents, self.dist, self.bs = num_latents, dist, bs
        self.max_conns, self.rng = max_conns, rng
        self.strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
        self.memo: dict[tuple[Box, int], NodeVector] = {}
        self.pixels: dict[int, NodeVector] = {}

    def pixel(self, var: int) -> NodeVector:
        if var not in self.pixels:
            self.pixels[var] = inputs(var, self.num_latents, self.dist)
        return self.pixels[var]

    def box_vars(self, box: Box) -> list[int]:
        grids = np.meshgrid(*(np.arange(s, e) for s, e in zip(*box)), indexing="ij")
        return sorted(int(v) for v in sum(g * st for g, st in zip(grids, self.strides)).ravel())

    def splits(self, box: Box) -> list[tuple[Box, Box]]:
        out = []
        for axis, (s, e) in enumerate(zip(*box)):
            step = self.intervals[axis]
            for sp in range((s // step + 1) * step, e, step):
                lo_stop, hi_start = list(box[1]), list(box[0])
                lo_stop[axis] = hi_start[axis] = sp
                out.append(((box[0], tuple(lo_stop)), (tuple(hi_start), box[1])))
        return out

    def leaf_region(self, box: Box, num_nodes: int) -> NodeVector:
        prod = multiply(*(self.pixel(v) for v in self.box_vars(box)))
        if num_nodes == 1:
            return summate(prod, num_nodes=1)
        nb = num_nodes // self.bs
        return summate(prod, num_nodes=num_nodes, edge_ids=np.tile(np.arange(nb), (2, 1)), block_size=self.bs)

    def region(self, box: Box, budget: int, num_nodes: int) -> NodeVector:
        """Sum vector of `box` split at most `budget` more levels (memoised by box and useful budget)."""
        cells = sum((e - 1) // step - s // step for s, e, step in zip(*box, self.intervals))
        key = (box, min(budget, cells))  # a budget beyond the box's split-chain length changes nothing
        if key in self.memo:
            return self.memo[key]
        splits = self.splits(box) if budget > 0 else []
        if not splits:
            ns = self.leaf_region(box, num_nodes)
        else:
            prods = [
                multiply(
                    self.region(lo, budget - 1, self.num_latents),
                    self.region(hi, budget - 1, self.num_latents),
                )
                for lo, hi in splits
            ]
            ns = self.mixture(prods, num_nodes)
        self.memo[key] = ns
        return ns

    def mixture(self, prods: list[NodeVector], num_nodes: int) -> NodeVector:
        if num_nodes == 1:
            return summate(*prods, num_nodes=1)
        if self.max_conns is None or len(prods) <= self.max_conns:
            return summate(*prods, num_nodes=num_nodes, block_size=self.bs)
        nb = num_nodes // self.bs
        picks = np.argsort(self.rng.random((nb, len(prods))), axis=1)[:, : self.max_conns]  # [nb, k]
        child_blocks = picks[:, :, None] * nb + np.arange(nb)[None, None, :]  # [nb, k, nb]
        parents = np.broadcast_to(np.arange(nb)[:, None, None], child_blocks.shape)
        edge_ids = np.stack([parents.ravel(), child_blocks.ravel()])
        return summate(*prods, num_nodes=num_nodes, edge_ids=edge_ids, block_size=self.bs)


def pd(
    data_shape: Sequence[int],
    num_latents: int,
    split_intervals: int | Sequence[int],
    *,
    input_dist: Distribution,
    max_split_depth: int | None = None,
    max_prod_block_conns: int | None = 4,
    block_size: int | None = None,
    seed: int = 0,
) -> NodeVector:
    """PD circuit over a grid `data_shape` (e.g. (H, W); variable `h*W + w`); returns the root.

    `split_intervals` (an int or one per axis) must divide `data_shape`. `max_split_depth` caps the
    number of nested splits (1: only the root box is split; 0: the root is a leaf region); `max_prod_block_conns=None` makes every sum fully connected.
    `block_size` defaults to the largest power of two <= 32 dividing `num_latents`; `seed` drives
    the random sparse sum edges.
    """
    if np.isscalar(data_shape) or len(data_shape) < 1:
        raise ValueError(f"data_shape must be a sequence such as (28, 28), got {data_shape!r}")
    shape = _as_tuple("data_shape", data_shape, len(data_shape))
    intervals = _as_tuple("split_intervals", split_intervals, len(shape))
    for axis, (n, step) in enumerate(zip(shape, intervals)):
        if n % step:
            raise ValueError(f"split_intervals[{axis}] = {step} does not divide data_shape[{axis}] = {n}")
    num_latents = positive_int("num_latents", num_latents)
    dist = check_dist(input_dist, "pd")
    if max_split_depth is not None:
        max_split_depth = positive_int("max_split_depth", max_split_depth, minimum=0)
    if max_prod_block_conns is not None:
        max_prod_block_conns = positive_int("max_prod_block_conns", max_prod_block_conns)
    bs = check_block_size(block_size, num_latents) or largest_pow2_divisor(num_latents, DEFAULT_MAX_BLOCK)
    rng = np.random.default_rng(seed)
    builder = _PDBuilder(shape, intervals, num_latents, dist, max_prod_block_conns, bs, rng)
    budget = (
        sum(n // step for n, step in zip(shape, intervals)) if max_split_depth is None else max_split_depth
    )
    return builder.region((tuple(0 for _ in shape), shape), budget, num_nodes=1)
