"""Structure builders: valid scopes, expected shapes, a learnt Chow-Liu tree, and normalisation.

Normalisation is checked twice: with an independent float64 node-by-node evaluator written here, and
with `engine.compile`, by summing p(x) over every joint assignment.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import engine
from engine.dists import Bernoulli, Categorical, Gaussian
from engine.nodes import InputNodes, ProdNodes, SumNodes
from engine.structures import chow_liu, hclt, hclt_from_tree, hmm, pairwise_mutual_information, pd, rat_spn


def scopes_of(root) -> dict[int, frozenset]:
    """Scope per vector uid; asserts products are decomposable and sums smooth."""
    scopes: dict[int, frozenset] = {}
    for v in root.topological():
        if isinstance(v, InputNodes):
            scopes[v.uid] = frozenset([v.var])
            continue
        child = [scopes[c.uid] for c in v.children]
        if isinstance(v, ProdNodes):
            assert sum(map(len, child)) == len(frozenset().union(*child)), "product not decomposable"
        else:
            assert all(s == child[0] for s in child), "sum not smooth"
        scopes[v.uid] = frozenset().union(*child)
    return scopes


def check_valid(root, num_vars: int) -> None:
    assert isinstance(root, SumNodes) and root.num_nodes == 1
    assert scopes_of(root)[root.uid] == frozenset(range(num_vars))


def reference_log_prob(root, x: torch.Tensor) -> torch.Tensor:
    """log p(x) for `x: [B, V]`, evaluated vector by vector in float64 with dense sum weights."""
    vals: dict[int, torch.Tensor] = {}  # uid -> [num_nodes, B]
    for v in root.topological():
        if isinstance(v, InputNodes):
            xv = x[:, v.var].expand(v.num_nodes, -1)
            vals[v.uid] = v.dist.log_prob(v.params.double(), xv, torch.zeros_like(xv, dtype=torch.bool))
        elif isinstance(v, ProdNodes):
            idx = torch.as_tensor(v.node_edges())
            vals[v.uid] = sum(vals[c.uid][idx[:, k]] for k, c in enumerate(v.children))
        else:
            bs, child = v.block_size, torch.cat([vals[c.uid] for c in v.children])
            w = torch.zeros(v.num_nodes, child.shape[0], dtype=torch.float64)
            for e, (i, j) in enumerate(v.edge_ids.T):
                w[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs] = v.params[e].double()
            top = child.max(0).values.clamp_min(-1e300)  # [B]: log-sum-exp as a stable matmul
            vals[v.uid] = (w @ (child - top).exp()).log() + top
    return vals[root.uid][0]


def all_assignments(num_vars: int, num_cats: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_cats), repeat=num_vars)), dtype=torch.long)


def assert_normalised(root, num_vars: int, num_cats: int) -> None:
    x = all_assignments(num_vars, num_cats)
    ref = torch.logsumexp(reference_log_prob(root, x), 0).exp().item()
    assert abs(ref - 1) < 1e-6, f"reference evaluator: sum p(x) = {ref}"
    total = torch.logsumexp(engine.compile(root)(x).double(), 0).exp().item()
    assert abs(total - 1) < 1e-4, f"compiled circuit: sum p(x) = {total}"


def noisy_copy(parent: np.ndarray, rng, num_cats: int, noise: float) -> np.ndarray:
    flip = rng.random(parent.shape) < noise
    return np.where(flip, rng.integers(0, num_cats, parent.shape), parent)


def tree_data(num_rows: int = 4000, seed: int = 0) -> tuple[np.ndarray, set]:
    """Six 3-category variables from the tree 0-1, 1-2, 1-3, 3-4, 0-5 (noisier edges further down)."""
    rng = np.random.default_rng(seed)
    cols = {0: rng.integers(0, 3, num_rows)}
    edges = [(0, 1, 0.1), (1, 2, 0.3), (1, 3, 0.2), (3, 4, 0.4), (0, 5, 0.25)]
    for parent, child, noise in edges:
        cols[child] = noisy_copy(cols[parent], rng, 3, noise)
    return np.stack([cols[v] for v in range(6)], 1), {(p, c) for p, c, _ in edges}


# ---- HCLT and Chow-Liu trees ----


def test_chow_liu_recovers_generating_tree():
    data, edges = tree_data()
    learnt = chow_liu.chow_liu_tree(data)
    assert {tuple(e) for e in learnt.tolist()} == edges


def test_mutual_information_matches_bincount_reference(monkeypatch):
    monkeypatch.setattr(chow_liu, "ONEHOT_CHUNK_BYTES", 1)  # one variable per chunk: exercise tiling
    data, _ = tree_data(500)
    mi = pairwise_mutual_information(torch.as_tensor(data), 3)
    for i, j in [(0, 1), (2, 4), (5, 3)]:
        joint = np.bincount(data[:, i] * 3 + data[:, j], minlength=9).reshape(3, 3) / len(data)
        pi, pj = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        ref = (joint[nz] * np.log(joint[nz] / (pi * pj)[nz])).sum()
        assert mi[i, j] == pytest.approx(ref, abs=1e-9) and mi[j, i] == pytest.approx(ref, abs=1e-9)


def test_many_categories_are_binned_for_mi():
    rng = np.random.default_rng(1)
    x0 = rng.integers(0, 256, 3000)
    data = np.stack([x0, np.clip(x0 + rng.integers(-3, 4, 3000), 0, 255), rng.integers(0, 256, 3000)], 1)
    codes, k = chow_liu.discretise(torch.as_tensor(data), 256, None)
    assert k == 32 and int(codes.max()) < 32
    assert {tuple(e) for e in chow_liu.chow_liu_tree(data, num_cats=256).tolist()} >= {(0, 1)}


def test_hclt_structure_and_normalisation():
    data, _ = tree_data(2000)
    root = hclt(data, num_latents=4)
    check_valid(root, 6)
    kinds = [v.kind for v in root.topological()]
    # PyJuice's HCLT: sums only at inner tree nodes (the tree 0-1, 1-2, 1-3, 3-4, 0-5 has leaves 2, 4, 5)
    assert kinds.count("input") == 6 and kinds.count("sum") == 3
    assert_normalised(root, 6, 3)


def test_hclt_root_var_and_block_size():
    data, _ = tree_data(2000)
    root = hclt(data, num_latents=4, root_var=4, block_size=2)
    (prod,) = root.children
    assert prod.children[-1].var == 4  # the root variable's inputs come last, as in PyJuice
    assert all(v.block_size == 2 for v in root.topological() if v.kind == "sum" and v is not root)


def test_hclt_gaussian_and_single_variable():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    x[:, 1] += 3 * x[:, 0]
    root = hclt(x, num_latents=2, input_dist=Gaussian())
    check_valid(root, 4)
    assert_normalised(hclt(np.array([[0], [1], [2]]), num_latents=3), 1, 3)


def test_hclt_from_tree_builds_mnist_size_quickly():
    edges = np.stack([np.arange(783), np.arange(1, 784)], 1)
    root = hclt_from_tree(edges, 784, 2, Bernoulli(), root_var=0)
    # a chain rooted at 0: 784 inputs; sums and products at the 783 inner nodes (783 is the only leaf)
    assert len(root.topological()) == 784 + 783 + 783


# ---- PD ----


def test_pd_small_grid_structure_and_normalisation():
    root = pd((4, 4), 2, (2, 2), input_dist=Categorical(2))
    check_valid(root, 16)
    kinds = [v.kind for v in root.topological()]
    # boxes: 4x4, two 2x4, two 4x2, four 2x2 cells; products: 2 + 4 splits + 4 cell products
    assert (kinds.count("sum"), kinds.count("product"), kinds.count("input")) == (9, 10, 16)
    assert_normalised(root, 16, 2)


def test_pd_counts_on_a_3x3_cell_grid():
    root = pd((12, 6), 2, (4, 2), input_dist=Bernoulli())
    check_valid(root, 72)
    kinds = [v.kind for v in root.topological()]
    # 3x3 cells: 36 boxes; splits: sum over boxes of (a-1)+(b-1) = 48; plus 9 cell products
    assert (kinds.count("sum"), kinds.count("product"), kinds.count("input")) == (36, 57, 72)


def test_pd_sparse_sum_edges_and_depth_limit():
    root = pd((4, 6), 4, (1, 2), input_dist=Bernoulli(), max_prod_block_conns=2, block_size=2, seed=3)
    check_valid(root, 24)
    for v in root.topological():
        if v.kind == "sum" and v is not root and len(v.children) > 2:
            ranges = v.child_block_ranges()
            for block in range(v.num_blocks):
                kids = v.edge_ids[1][v.edge_ids[0] == block]
                picked = {k for k, (s, e) in enumerate(ranges) if ((kids >= s) & (kids < e)).any()}
                assert len(picked) == 2
    shallow = pd((2, 4), 2, (1, 1), input_dist=Categorical(2), max_split_depth=1)
    check_valid(shallow, 8)
    assert_normalised(shallow, 8, 2)
    assert len(shallow.children) == 4  # the root's 1 + 3 splits; below them, leaf regions of pixels
    assert max(len(v.children) for v in shallow.topological() if v.kind == "product") == 6


# ---- RAT-SPN and HMM ----


def test_rat_spn_structure_and_normalisation():
    root = rat_spn(6, 4, depth=2, num_repetitions=2, input_dist=Categorical(3), seed=1)
    check_valid(root, 6)
    assert len(root.children) == 2 and all(c.kind == "product" for c in root.children)
    assert sum(v.kind == "input" for v in root.topological()) == 6
    assert_normalised(root, 6, 3)
    three = rat_spn(7, 2, depth=1, num_repetitions=1, input_dist=Bernoulli(), num_pieces=3)
    check_valid(three, 7)
    assert len(three.children[0].children) == 3


def test_rat_spn_depth_zero_is_a_mixture_of_factorisations():
    root = rat_spn(5, 3, depth=0, num_repetitions=1, input_dist=Categorical(2))
    check_valid(root, 5)
    assert [c.kind for c in root.children[0].children] == ["input"] * 5
    assert_normalised(root, 5, 2)


def test_hmm_structure_and_normalisation():
    root = hmm(5, 4, 3)
    check_valid(root, 5)
    kinds = [v.kind for v in root.topological()]
    assert (kinds.count("input"), kinds.count("sum"), kinds.count("product")) == (5, 5, 4)
    assert_normalised(root, 5, 3)
    assert_normalised(hmm(1, 2, 2), 1, 2)


# ---- argument checks ----


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: hclt(np.zeros((5, 3), dtype=int), num_latents=0), "num_latents must be >= 1"),
        (lambda: hclt(np.zeros(5, dtype=int), num_latents=2), "must be a 2-D"),
        (lambda: hclt(np.full((5, 3), 4), 2, input_dist=Categorical(3)), "column 0 has values outside"),
        (lambda: hclt(np.zeros((5, 3), dtype=int), 2, root_var=3), "root_var must be in"),
        (lambda: hclt(np.zeros((5, 3), dtype=int), 4, block_size=3), "block_size 3 does not divide"),
        (lambda: hclt(np.full((5, 3), 0.5), 2), "pass input_dist="),
        (lambda: hclt(np.zeros((5, 3), dtype=int), 2, input_dist="categorical"), "Distribution instance"),
        (lambda: pd((4, 5), 2, (2, 2), input_dist=Bernoulli()), "split_intervals[1] = 2 does not divide"),
        (lambda: pd((4, 4), 2, (2, 2, 2), input_dist=Bernoulli()), "must have 2 entries"),
        (lambda: pd((4, 4), 2, 2, input_dist=None), "pd needs input_dist="),
        (lambda: pd((4, 4), 2, 2, input_dist=Bernoulli(), max_split_depth=-1), "max_split_depth must be"),
        (lambda: rat_spn(6, 2, 1, 0, input_dist=Bernoulli()), "num_repetitions must be >= 1"),
        (lambda: rat_spn(6, 2, 1, 1, input_dist=Bernoulli(), num_pieces=1), "num_pieces must be >= 2"),
        (lambda: rat_spn(6, 2.5, 1, 1, input_dist=Bernoulli()), "num_latents must be an integer"),
        (lambda: hmm(0, 2, 3), "seq_length must be >= 1"),
        (lambda: hmm(4, 2, 1), "num_emits must be >= 2"),
        (lambda: hclt_from_tree([[0, 1]], 3, 2, Bernoulli()), "needs 2 edges"),
    ],
)
def test_bad_arguments_raise_value_error(build, message):
    with pytest.raises(ValueError) as err:
        build()
    assert message in str(err.value)
