"""Every structure on an enumerable size: marginals, conditionals, EM and flows against references."""

import pytest
import torch

import engine
from engine import optim, queries, structures
from engine.dists import Categorical
from tests.helpers import all_assignments

K = 3


def _build(name):
    data = torch.randint(0, K, (200, 6))
    return {
        "hclt": lambda: structures.hclt(data, 4, input_dist=Categorical(K)),
        "pd": lambda: structures.pd((2, 3), 4, (1, 1), input_dist=Categorical(K)),
        "rat_spn": lambda: structures.rat_spn(6, 4, 2, 2, input_dist=Categorical(K)),
        "hmm": lambda: structures.hmm(6, 4, K),
    }[name]()


@pytest.fixture(params=["hclt", "pd", "rat_spn", "hmm"])
def pc(request):
    return engine.compile(_build(request.param), block_size=2)


def test_joint_marginals_and_conditionals(pc):
    x = all_assignments(6, K)
    joint = pc(x).double().exp()
    assert abs(joint.sum().item() - 1) < 1e-4
    joint = joint.view((K,) * 6)
    v = int(torch.randint(0, 6, ()))
    missing = torch.zeros_like(x, dtype=torch.bool)
    missing[:, v] = True
    marg = pc(x, missing).double().exp().view((K,) * 6)
    assert torch.allclose(marg, joint.sum(v, keepdim=True).expand_as(joint), rtol=1e-4, atol=1e-8)
    rows = torch.randint(0, x.shape[0], (4,))
    miss = torch.rand(4, 6) < 0.5
    post = queries.conditional(pc, x[rows], miss)
    assert torch.allclose(post.sum(2), torch.ones(4, 6), atol=1e-5)


def test_full_batch_em_is_monotone_and_flows_match_autograd(pc):
    data = torch.randint(0, K, (256, 6))
    prev = -float("inf")
    for _ in range(4):
        ll = optim.full_batch_em_epoch(pc, data, batch_size=128, pseudocount=0.0)
        assert ll >= prev - 1e-5
        prev = ll
    pc.zero_flows()
    pc.accumulate_flows(data)
    params = pc.params.detach().clone().requires_grad_()
    pc.params = params
    node_mars, _ = pc.forward_mars(data)
    node_mars[pc.plan.root_row].sum().backward()
    assert torch.allclose(params.grad * params.detach(), pc.param_flows, rtol=1e-3, atol=1e-3)
