"""Chow-Liu trees: pairwise mutual information of discrete variables and its maximum spanning tree.

Joint counts come from one-hot matrix products: for variable chunks I and J, `onehot(x_I).T @
onehot(x_J)` is the `[|I|*K, |J|*K]` table of pair counts. Only chunk pairs with J >= I are computed
(the matrix is symmetric). Cost is N*(V*K)^2/2 multiply-adds: for MNIST (V=784, K=32 bins, N=20,000
rows) that is ~6e12 (measured here: 2,000 rows took 42 s on a loaded 2-core CPU, so 20,000 rows
take several minutes; a GPU via `device="cuda"` needs seconds). On CPU, lower `max_samples` or
`num_bins`. Peak memory: two one-hot chunks (<= 256 MiB each)
plus one count block (<= 32 MiB) and the `[V, V]` result.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import breadth_first_order, minimum_spanning_tree

ONEHOT_CHUNK_BYTES = 1 << 28  # one one-hot chunk [N, chunk_vars*K] float32 is at most 256 MiB
COUNTS_BLOCK_COLS = 2048  # a joint-count block [chunk_vars*K, chunk_vars*K] is at most 32 MiB in float64
MAX_DISCRETE_BINS = 32  # above this many categories, values are binned for the MI estimate


def as_data_matrix(data, name: str = "data") -> torch.Tensor:
    """`data` as a `[N, V]` tensor (N >= 1, V >= 1, finite); ValueError otherwise."""
    x = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data)
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D [num_samples, num_vars] array, got shape {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one row and one column, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x.cpu()


def discretise(x: torch.Tensor, num_cats: int | None, num_bins: int | None) -> tuple[torch.Tensor, int]:
    """Integer codes `[N, V]` in `[0, K)` for the MI estimate, and K.

    Integer data with `num_cats` categories is kept as is when `num_cats <= 32` (and `num_bins` is
    None), else value `c` goes to bin `c * num_bins // num_cats` (default 32 bins). Real-valued data is
    binned uniformly between each variable's min and max.
    """
    integral = not x.is_floating_point() or bool((x == x.round()).all())
    if integral and x.min() >= 0:
        k = int(num_cats) if num_cats is not None else int(x.max()) + 1
        k = max(k, 2)
        if num_bins is None and k > MAX_DISCRETE_BINS:
            num_bins = MAX_DISCRETE_BINS
        if num_bins is None or num_bins >= k:
            return x.long(), k
        return (x.long() * num_bins) // k, num_bins
    bins = num_bins or MAX_DISCRETE_BINS
    xd = x.double()
    lo, hi = xd.min(0).values, xd.max(0).values
    scaled = (xd - lo) / (hi - lo).clamp_min(1e-12)
    return (scaled * bins).long().clamp(0, bins - 1), bins


def _one_hot(codes: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """`codes: [N, c]` -> `[N, c*K]` with a 1 at column `j*K + codes[n, j]`."""
    n, c = codes.shape
    out = torch.zeros(n, c * k, dtype=dtype, device=codes.device)
    out.scatter_(1, codes + torch.arange(c, device=codes.device) * k, 1.0)
    return out


def _entropy(p: torch.Tensor, dims) -> torch.Tensor:
    return -torch.special.xlogy(p, p).sum(dims)


def pairwise_mutual_information(
    codes: torch.Tensor, k: int, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Empirical mutual information (nats) of every variable pair: `codes: [N, V]` in `[0, k)` -> `[V, V]`.

    MI_ij = H_i + H_j - H_ij from joint counts; the diagonal holds H_i.
    """
    n, v = codes.shape
    codes = codes.to(device)
    # float32 sums of 0/1 products are exact while counts stay below 2^24
    dtype = torch.float32 if n < (1 << 24) else torch.float64
    marg = torch.zeros(v, k, dtype=torch.float64, device=device)
    marg.scatter_add_(1, codes.T.contiguous(), torch.ones(v, n, dtype=torch.float64, device=device))
    h = _entropy(marg / n, 1)  # [V]
    chunk = max(1, min(ONEHOT_CHUNK_BYTES // (n * k * 4), COUNTS_BLOCK_COLS // k))
    mi = torch.zeros(v, v, dtype=torch.float64, device=device)
    for a in range(0, v, chunk):
        b = min(a + chunk, v)
        left = _one_hot(codes[:, a:b], k, dtype)  # read N*c*K
        for c in range(a, v, chunk):
            d = min(c + chunk, v)
            right = left if c == a else _one_hot(codes[:, c:d], k, dtype)
            joint = (left.T @ right).double().reshape(b - a, k, d - c, k) / n
            block = h[a:b, None] + h[None, c:d] - _entropy(joint, (1, 3))
            mi[a:b, c:d] = block
            mi[c:d, a:b] = block.T
    return mi.clamp_min(0.0).cpu().numpy()


def maximum_spanning_tree(mi: np.ndarray) -> np.ndarray:
    """Edges `[V-1, 2]` (u < v) of a maximum-weight spanning tree of the complete graph weighted by `mi`."""
    v = mi.shape[0]
    if v == 1:
        return np.zeros((0, 2), dtype=np.int64)
    # positive weights: scipy drops zero entries, and max-MI tree = min-(max - MI + 1) tree
    w = np.triu(mi.max() - mi + 1.0, k=1)
    tree = minimum_spanning_tree(sp.csr_matrix(w)).tocoo()
    edges = np.sort(np.stack([tree.row, tree.col], 1).astype(np.int64), axis=1)
    return edges[np.lexsort((edges[:, 1], edges[:, 0]))]


def _adjacency(edges: np.ndarray, num_vars: int) -> sp.csr_matrix:
    ones = np.ones(len(edges))
    return sp.csr_matrix((ones, (edges[:, 0], edges[:, 1])), shape=(num_vars, num_vars))


def tree_centre(edges: np.ndarray, num_vars: int) -> int:
    """A node of minimum eccentricity: the middle of a longest path (found by two BFS passes)."""
    if num_vars == 1:
        return 0
    adj = _adjacency(edges, num_vars)
    far = breadth_first_order(adj, 0, directed=False, return_predecessors=False)[-1]
    order, pred = breadth_first_order(adj, far, directed=False, return_predecessors=True)
    path = [int(order[-1])]
    while path[-1] != far:
        path.append(int(pred[path[-1]]))
    return path[len(path) // 2]


def root_tree(edges: np.ndarray, num_vars: int, root: int) -> tuple[np.ndarray, list[list[int]]]:
    """BFS order from `root` (parents before children) and each node's children list."""
    order, pred = breadth_first_order(
        _adjacency(edges, num_vars), root, directed=False, return_predecessors=True
    )
    if len(order) != num_vars:
        raise ValueError(f"edges do not span all {num_vars} variables")
    children: list[list[int]] = [[] for _ in range(num_vars)]
    for node in order[1:]:
        children[int(pred[node])].append(int(node))
    return order, children


def chow_liu_tree(
    data,
    num_cats: int | None = None,
    num_bins: int | None = None,
    max_samples: int = 20000,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Edges `[V-1, 2]` of the Chow-Liu tree of `data: [N, V]` (at most `max_samples` random rows)."""
    x = as_data_matrix(data)
    if x.shape[0] > max_samples:
        rows = np.random.default_rng(seed).choice(x.shape[0], max_samples, replace=False)
        x = x[torch.as_tensor(np.sort(rows))]
    codes, k = discretise(x, num_cats, num_bins)
    return maximum_spanning_tree(pairwise_mutual_information(codes, k, device))
