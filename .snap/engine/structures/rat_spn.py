"""Random tensorised SPNs (RAT-SPN; Peharz et al., UAI 2019; PyJuice's `RAT_SPN`).

Each repetition draws a random region tree: the scope (all variables) is shuffled and cut into
`num_pieces` near-equal parts, recursively, down to `depth` levels or until a scope has fewer than
`num_pieces` variables. A leaf region is a sum vector over the product of its variables' input
vectors (one input vector per variable, shared by all repetitions); an inner region is a sum vector
over the product of its parts' sum vectors. The root is one sum node over every repetition's top
product.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.dists import Distribution
from engine.nodes import NodeVector, inputs, multiply, summate
from engine.structures._checks import check_block_size, check_dist, positive_int


@dataclass
class _RegionTree:
    """Settings and shared input vectors of one RAT-SPN build."""

    depth: int
    num_pieces: int
    num_latents: int
    block_size: int | None
    rng: np.random.Generator
    leaves: list[NodeVector]  # one input vector per variable

    def product(self, scope: np.ndarray, level: int) -> NodeVector:
        """Product vector of region `scope`: its parts' sum vectors, or its variables' inputs."""
        if level >= self.depth or len(scope) < self.num_pieces:
            return multiply(*(self.leaves[v] for v in sorted(scope)))
        parts = np.array_split(self.rng.permutation(scope), self.num_pieces)
        return multiply(*(self.region(part, level + 1) for part in parts))

    def region(self, scope: np.ndarray, level: int) -> NodeVector:
        """Sum vector of region `scope`; a one-variable region mixes its input vector directly."""
        child = self.leaves[int(scope[0])] if len(scope) == 1 else self.product(scope, level)
        return summate(child, num_nodes=self.num_latents, block_size=self.block_size)


def rat_spn(
    num_vars: int,
    num_latents: int,
    depth: int,
    num_repetitions: int,
    *,
    input_dist: Distribution,
    num_pieces: int = 2,
    block_size: int | None = None,
    seed: int = 0,
) -> NodeVector:
    """RAT-SPN over variables `0..num_vars-1`; returns the root (one sum node).

    `depth` is the number of split levels (0: each repetition is one fully factorised product);
    `num_pieces` parts per split; `seed` drives the random permutations. `block_size` goes to the
    inner sum vectors.
    """
    num_vars = positive_int("num_vars", num_vars)
    num_latents = positive_int("num_latents", num_latents)
    depth = positive_int("depth", depth, minimum=0)
    num_repetitions = positive_int("num_repetitions", num_repetitions)
    num_pieces = positive_int("num_pieces", num_pieces, minimum=2)
    dist = check_dist(input_dist, "rat_spn")
    tree = _RegionTree(
        depth=depth,
        num_pieces=num_pieces,
        num_latents=num_latents,
        block_size=check_block_size(block_size, num_latents),
        rng=np.random.default_rng(seed),
        leaves=[inputs(v, num_latents, dist) for v in range(num_vars)],
    )
    tops = [tree.product(np.arange(num_vars), 0) for _ in range(num_repetitions)]
    return summate(*tops, num_nodes=1)
