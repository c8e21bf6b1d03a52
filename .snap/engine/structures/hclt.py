"""Hidden Chow-Liu Trees (Liu & Van den Broeck, NeurIPS 2021; PyJuice's `HCLT`).

A Chow-Liu tree over the observed variables is learnt from data; each variable `v` then gets a
latent `z_v` with `num_latents` states, the latents follow the tree, and `x_v` depends only on
`z_v`. As a circuit, bottom-up over the rooted tree:

    msg_v  = input_v                                          (a leaf of the tree)
    prod_v = multiply(msg_c for every child c, input_v)       (an inner tree node)
    msg_v  = summate(prod_v, num_nodes=num_latents)           (non-root v)
    root   = summate(prod_root, num_nodes=1)

exactly PyJuice's construction (a leaf's inputs join its parent's product, so sums sit only at inner
tree nodes), so side-by-side benchmarks do equal work; the circuit has O(V) node vectors whatever
`num_latents` is.
"""

from __future__ import annotations

import numpy as np
import torch

from engine.dists import Categorical, Distribution
from engine.nodes import NodeVector, inputs, multiply, summate
from engine.structures._checks import check_block_size, check_dist, positive_int
from engine.structures.chow_liu import as_data_matrix, chow_liu_tree, root_tree, tree_centre


def _default_dist(x: torch.Tensor) -> Categorical:
    if x.is_floating_point() and not bool((x == x.round()).all()):
        raise ValueError("data is real-valued: pass input_dist= (e.g. engine.dists.Gaussian())")
    if x.min() < 0:
        raise ValueError(f"data must be non-negative category ids, found {int(x.min())}")
    return Categorical(num_cats=max(2, int(x.max()) + 1))


def _check_data_fits(x: torch.Tensor, dist: Distribution) -> None:
    if isinstance(dist, Categorical):
        xd = x.double()
        bad = (xd < 0) | (xd >= dist.num_cats) | (xd != xd.round())
        if bad.any():
            var = int(bad.any(0).nonzero()[0])
            raise ValueError(
                f"data column {var} has values outside {{0, ..., {dist.num_cats - 1}}} "
                f"of input_dist Categorical(num_cats={dist.num_cats})"
            )


def hclt_from_tree(
    edges: np.ndarray,
    num_vars: int,
    num_latents: int,
    input_dist: Distribution,
    root_var: int | None = None,
    block_size: int | None = None,
) -> NodeVector:
    """HCLT circuit over a given tree: `edges: [num_vars-1, 2]` undirected variable pairs."""
    num_vars = positive_int("num_vars", num_vars)
    num_latents = positive_int("num_latents", num_latents)
    dist = check_dist(input_dist, "hclt")
    bs = check_block_size(block_size, num_latents)
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    if len(edges) != num_vars - 1 or (edges.size and (edges.min() < 0 or edges.max() >= num_vars)):
        raise ValueError(f"a tree over {num_vars} variables needs {num_vars - 1} edges in [0, {num_vars})")
    if root_var is None:
        root_var = tree_centre(edges, num_vars)
    elif not 0 <= int(root_var) < num_vars:
        raise ValueError(f"root_var must be in [0, {num_vars}), got {root_var}")
    order, children = root_tree(edges, num_vars, int(root_var))

    msgs: dict[int, NodeVector] = {}
    for v in (int(u) for u in order[::-1]):  # children before parents
        leaf = inputs(v, num_latents, dist)
        if not children[v] and v != root_var:
            msgs[v] = leaf  # a leaf variable's inputs multiply straight into its parent's product
            continue
        prod = multiply(*(msgs.pop(c) for c in children[v]), leaf) if children[v] else leaf
        if v == root_var:
            return summate(prod, num_nodes=1)
        msgs[v] = summate(prod, num_nodes=num_latents, block_size=bs)
    raise AssertionError("unreachable: the BFS order always contains the root")


def hclt(
    data,
    num_latents: int,
    input_dist: Distribution | None = None,
    num_bins: int | None = None,
    chow_liu_samples: int = 20000,
    root_var: int | None = None,
    block_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> NodeVector:
    """Hidden Chow-Liu Tree learnt from `data: [N, V]`; returns the root (one sum node).

    `input_dist` defaults to `Categorical(num_cats=max(data) + 1)`. Mutual information uses at most
    `chow_liu_samples` random rows (`seed`), computed on `device`; categorical variables with more
    than 32 categories are binned into `num_bins` (default 32) for that estimate only. The tree is
    rooted at `root_var`, or at the tree's centre. `block_size` goes to the latent sum vectors.
    """
    x = as_data_matrix(data)
    num_latents = positive_int("num_latents", num_latents)
    chow_liu_samples = positive_int("chow_liu_samples", chow_liu_samples, minimum=2)
    if num_bins is not None:
        num_bins = positive_int("num_bins", num_bins, minimum=2)
    dist = _default_dist(x) if input_dist is None else check_dist(input_dist, "hclt")
    _check_data_fits(x, dist)
    if root_var is not None and not 0 <= int(root_var) < x.shape[1]:
        raise ValueError(f"root_var must be in [0, {x.shape[1]}), got {root_var}")
    num_cats = dist.num_cats if isinstance(dist, Categorical) else None
    edges = chow_liu_tree(
        x, num_cats=num_cats, num_bins=num_bins, max_samples=chow_liu_samples, seed=seed, device=device
    )
    return hclt_from_tree(edges, x.shape[1], num_latents, dist, root_var=root_var, block_size=block_size)
