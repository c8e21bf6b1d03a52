"""engine.evidence.conditional against brute-force enumeration: hard evidence, target subsets and
soft (virtual) evidence on tiny circuits, on the PyTorch and the Triton (interpreter) backends."""

import copy
import itertools

import pytest
import torch

import engine
from engine.dists import Bernoulli, Categorical
from engine.evidence import conditional
from tests.helpers import irregular, tiny_tree
from tests.kernel_runner import DEVICE


def mixed_cards():
    """Bernoulli and 3-way Categorical variables in one circuit (padding of the value axis)."""
    ins = [
        engine.inputs(0, 4, Bernoulli()),
        engine.inputs(1, 4, Categorical(3)),
        engine.inputs(2, 4, Bernoulli()),
    ]
    s01 = engine.summate(engine.multiply(ins[0], ins[1]), num_nodes=4, block_size=2)
    return engine.summate(engine.multiply(s01, ins[2]), num_nodes=1)


CARDS = {"tiny_tree": [3] * 4, "irregular": [3] * 5, "mixed": [2, 3, 2]}
MAKERS = {
    "tiny_tree": lambda: tiny_tree(latents=4, block_size=2),
    "irregular": irregular,
    "mixed": mixed_cards,
}


def brute_force(root, cards, x, missing, lam):
    """float64 posteriors `[B, V, K]` by summing the joint over every completion, weighted by lambda."""
    pc = engine.compile(copy.deepcopy(root)).double()
    grid = torch.tensor(list(itertools.product(*(range(c) for c in cards))))
    with torch.no_grad():
        joint = pc(grid).double().exp()  # [N]
    k = max(cards)
    out = torch.zeros(x.shape[0], len(cards), k, dtype=torch.float64)
    for b in range(x.shape[0]):
        w = joint.clone()
        for v in range(len(cards)):
            if missing[b, v]:
                w = w * lam[b, v, grid[:, v]]
            else:
                w = w * (grid[:, v] == x[b, v])
        for v in range(len(cards)):
            out[b, v].index_add_(0, grid[:, v], w)
    return out / out.sum(2, keepdim=True)


def evidence(cards, n, seed, soft=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.randint(0, c, (n,), generator=g) for c in cards], 1)
    missing = torch.rand(x.shape, generator=g) < 0.5
    k = max(cards)
    lam = torch.ones(n, len(cards), k, dtype=torch.float64)
    if soft:
        lam = torch.rand(n, len(cards), k, generator=g, dtype=torch.float64) + 0.05
    for v, c in enumerate(cards):
        lam[:, v, c:] = 0.0  # values a variable does not have
    return x, missing, lam


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_soft_and_hard_evidence_match_enumeration(name, backend):
    torch.manual_seed(0)
    root, cards = MAKERS[name](), CARDS[name]
    x, missing, lam = evidence(cards, 12, seed=1)
    device = DEVICE if backend == "triton" else "cpu"  # Triton: the GPU, else the interpreter
    pc = engine.compile(copy.deepcopy(root), device=device, backend=backend)
    got = conditional(pc, x.to(device), missing.to(device), soft_evidence=lam.float().to(device))
    torch.testing.assert_close(
        got.double().cpu(), brute_force(root, cards, x, missing, lam), atol=2e-5, rtol=1e-4
    )


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_hard_evidence_only_matches_enumeration_and_the_query_module(name):
    torch.manual_seed(1)
    root, cards = MAKERS[name](), CARDS[name]
    x, missing, lam = evidence(cards, 16, seed=2, soft=False)
    pc = engine.compile(copy.deepcopy(root))
    got = conditional(pc, x, missing)
    torch.testing.assert_close(got.double(), brute_force(root, cards, x, missing, lam), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got, engine.queries.conditional(pc, x, missing), atol=1e-6, rtol=0)


def test_target_vars_and_a_dict_of_soft_evidence():
    torch.manual_seed(2)
    root, cards = MAKERS["irregular"](), CARDS["irregular"]
    x, missing, _ = evidence(cards, 8, seed=3, soft=False)
    missing[:, [1, 3]] = True
    soft = {1: torch.tensor([0.2, 1.0, 0.0]), 3: torch.rand(8, 3) + 0.1}
    lam = torch.ones(8, 5, 3, dtype=torch.float64)
    lam[:, 1] = soft[1].double()
    lam[:, 3] = soft[3].double()
    pc = engine.compile(copy.deepcopy(root))
    got = conditional(pc, x, missing, target_vars=[4, 1], soft_evidence=soft)
    want = brute_force(root, cards, x, missing, lam)[:, [4, 1]]
    assert got.shape == (8, 2, 3)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    assert (got[:, 1, 2] == 0).all()  # the likelihood vector rules value 2 out


@pytest.mark.parametrize(
    "bad,fragment",
    [
        ({9: [1.0, 1.0]}, "outside"),
        ({0: [1.0, -1.0, 1.0]}, "non-negative"),
        (torch.ones(3, 5, 2), "must have shape"),
    ],
)
def test_bad_soft_evidence_is_one_clear_error(bad, fragment):
    pc = engine.compile(irregular())
    x = torch.zeros(3, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=fragment):
        conditional(pc, x, torch.ones(3, 5, dtype=torch.bool), soft_evidence=bad)


def test_soft_evidence_that_rules_out_some_leaves_but_not_the_example():
    """Indicator leaves and a likelihood vector with a zero: the ruled-out leaves get log 0, the
    example keeps probability 0.3 (it was refused as 'probability zero')."""
    from engine.dists import Indicator

    def leaf(var, value):
        return engine.inputs(var, 1, Indicator(2), params=[[float(value)]])

    root = engine.summate(
        engine.multiply(leaf(0, 0), leaf(1, 0)),
        engine.multiply(leaf(0, 1), leaf(1, 1)),
        num_nodes=1,
        params=[[[0.3]], [[0.7]]],
    )
    pc = engine.compile(root)
    x, m = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool)
    post = conditional(pc, x, m, soft_evidence={0: [1.0, 0.0]})
    torch.testing.assert_close(post[0], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="probability zero"):
        conditional(pc, x, m, soft_evidence={0: [0.0, 0.0]})
