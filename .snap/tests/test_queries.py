"""Queries against brute-force enumeration on tiny circuits."""

import pytest
import torch

import engine
from engine import queries
from tests.helpers import all_assignments, deterministic, irregular, mixed_dists, tiny_tree


def _joint(pc, nv, k=3):
    return pc(all_assignments(nv, k)).double().exp().view((k,) * nv)


@pytest.mark.parametrize("make", [tiny_tree, irregular])
def test_conditional_matches_enumeration(make):
    pc = engine.compile(make(), block_size=2)
    nv = pc.num_vars
    joint = _joint(pc, nv)
    x = torch.randint(0, 3, (6, nv))
    missing = torch.rand(6, nv) < 0.5
    missing[0] = True
    post = queries.conditional(pc, x, missing).double()
    assert torch.allclose(post.sum(2), torch.ones(6, nv, dtype=torch.float64), atol=1e-5)
    for b in range(6):
        for v in range(nv):
            if not missing[b, v]:
                assert post[b, v, x[b, v]] == 1
                continue
            # p(x_v = k | observed) by summing the joint over the other missing variables
            idx = [slice(None) if missing[b, u] else int(x[b, u]) for u in range(nv)]
            sub = joint[tuple(idx)]
            free = [u for u in range(nv) if missing[b, u]]
            axis = free.index(v)
            others = tuple(i for i in range(sub.dim()) if i != axis)
            marg = sub.sum(others) if others else sub
            assert torch.allclose(post[b, v], marg / marg.sum(), atol=1e-4)


def test_samples_follow_the_distribution():
    torch.manual_seed(1)
    pc = engine.compile(tiny_tree(num_cats=2, latents=4))
    joint = _joint(pc, 4, 2).view(-1)
    n = 40000
    s = queries.sample(pc, n)
    codes = (s * torch.tensor([8, 4, 2, 1])).sum(1)
    counts = torch.bincount(codes, minlength=16).double()
    expected = joint * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 37.7  # chi-square 15 dof, p = 0.001


def test_conditional_samples_keep_evidence_and_follow_the_posterior():
    torch.manual_seed(2)
    pc = engine.compile(tiny_tree(num_cats=2, latents=4))
    joint = _joint(pc, 4, 2)
    x = torch.tensor([[1, 0, 0, 0]])
    missing = torch.tensor([[False, True, False, True]])
    s = queries.sample(pc, 20000, x, missing)
    assert (s[:, 0] == 1).all() and (s[:, 2] == 0).all()
    post = joint[1, :, 0, :] / joint[1, :, 0, :].sum()
    emp = torch.zeros(2, 2, dtype=torch.float64)
    for a in range(2):
        for b in range(2):
            emp[a, b] = ((s[:, 1] == a) & (s[:, 3] == b)).double().mean()
    assert (emp - post).abs().max() < 0.02


@pytest.mark.parametrize("seed", range(3))
def test_mpe_is_exact_map_on_deterministic_circuits(seed):
    torch.manual_seed(seed)
    pc = engine.compile(deterministic(4, 3))
    joint = _joint(pc, 4)
    x = torch.randint(0, 3, (5, 4))
    missing = torch.rand(5, 4) < 0.6
    out = queries.mpe(pc, x, missing)
    for b in range(5):
        idx = [slice(None) if missing[b, u] else int(x[b, u]) for u in range(4)]
        sub = joint[tuple(idx)]
        best = sub.max()
        got = joint[tuple(int(v) for v in out[b])]
        assert torch.isclose(got, best, rtol=1e-5)
        assert all(out[b, u] == x[b, u] for u in range(4) if not missing[b, u])


def test_mpe_on_imported_psdd_matches_brute_force():
    from pathlib import Path

    from engine.io import read_psdd

    path = Path(__file__).resolve().parents[1] / "assets" / "circuits" / "little_4var.psdd"
    pc = engine.compile(read_psdd(path))
    x = all_assignments(4, 2)
    joint = pc(x).exp()
    best = queries.mpe(pc, num_rows=1)
    assert torch.isclose(pc(best).exp()[0], joint.max(), rtol=1e-5)


def test_query_errors():
    pc = engine.compile(tiny_tree())
    with pytest.raises(ValueError, match="num_samples"):
        queries.sample(pc, 0)
    with pytest.raises(ValueError, match="rows"):
        queries.sample(pc, 3, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        queries.conditional(pc, torch.full((1, 4), 7), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="discrete"):
        queries.conditional(
            engine.compile(mixed_dists()), torch.zeros(1, 3), torch.ones(1, 3, dtype=torch.bool)
        )
