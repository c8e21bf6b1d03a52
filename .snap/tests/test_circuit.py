"""Compiled circuits against brute-force enumeration and autograd (float64 references)."""

import pytest
import torch

import engine
from engine import optim
from tests.helpers import all_assignments, irregular, mixed_dists, tiny_tree

CIRCUITS = {"tree": lambda: tiny_tree(), "tree_bs2": lambda: tiny_tree(block_size=2), "irregular": irregular}


@pytest.mark.parametrize("name", CIRCUITS)
@pytest.mark.parametrize("block_size", [None, 1, 2])
@pytest.mark.parametrize("tolerance", [0.0, 0.25, 2.0])
def test_normalised_and_marginals(name, block_size, tolerance):
    root = CIRCUITS[name]()
    pc = engine.compile(root, block_size=block_size, tolerance=tolerance)
    nv = pc.num_vars
    x = all_assignments(nv, 3)
    ll = pc(x).double()
    assert abs(ll.exp().sum().item() - 1) < 1e-5
    joint = ll.exp().view((3,) * nv)
    for v in range(nv):
        missing = torch.zeros_like(x, dtype=torch.bool)
        missing[:, v] = True
        marg = pc(x, missing).double().exp().view((3,) * nv)
        ref = joint.sum(v, keepdim=True).expand_as(joint)
        assert torch.allclose(marg, ref, rtol=1e-4, atol=1e-7)
    assert pc(x[:1], torch.ones_like(x[:1], dtype=torch.bool)).abs().item() < 1e-5


def test_block_size_and_tolerance_do_not_change_the_function():
    root = irregular()
    x = all_assignments(5, 3)
    ref = engine.compile(root, block_size=1, tolerance=0).forward(x)
    for bs in (2, 4, 8):
        for tol in (0.0, 0.5, 10.0):
            assert torch.allclose(engine.compile(root, block_size=bs, tolerance=tol)(x), ref, atol=1e-5)


def test_plan_partitions_and_padding():
    pc = engine.compile(irregular(), tolerance=0.0)
    plan = pc.plan.to_dict()
    kinds = [layer["kind"] for layer in plan["layers"]]
    assert kinds[0] == "input" and set(kinds[1:]) == {"product", "sum"}
    for a, b in zip(kinds[1:], kinds[2:]):
        assert a != b  # product and sum layers alternate
    for layer in plan["layers"]:
        for p in layer["partitions"]:
            assert 0.0 <= p["padding_ratio"] < 1.0
            if layer["kind"] == "sum":
                assert p["padded_edges"] >= p["num_edges"]
    # tolerance 0 -> no padding at all; a huge tolerance -> one partition per block size and layer
    assert all(p["padding_ratio"] == 0 for layer in plan["layers"] for p in layer["partitions"])
    loose = engine.compile(irregular(), tolerance=100.0).plan.to_dict()
    for layer in loose["layers"]:
        if layer["kind"] == "sum":
            sizes = [p["block_size"] for p in layer["partitions"]]
            assert len(sizes) == len(set(sizes))
    import json

    json.dumps(plan)  # plain JSON
    mem = plan["memory_bytes"]
    assert mem["total"] == sum(v for k, v in mem.items() if k not in ("total", "batch_size"))


def test_flows_equal_autograd_gradients_times_params():
    root = irregular()
    pc = engine.compile(root, block_size=2)
    x = torch.randint(0, 3, (64, 5))
    missing = torch.rand(64, 5) < 0.2
    pc.zero_flows()
    pc.accumulate_flows(x, missing)
    params = pc.params.detach().clone().requires_grad_()
    inp = pc.input_params(0).detach().clone().requires_grad_()
    pc.params, pc.input_layers[0].params = params, inp
    node_mars, _ = pc.forward_mars(x, missing)
    node_mars[pc.plan.root_row].sum().backward()
    assert torch.allclose(params.grad * params.detach(), pc.param_flows, atol=1e-4, rtol=1e-4)
    assert pc.param_flows[~pc.param_mask].abs().sum() == 0  # padding never gets flow
    # input statistics: on fully observed data they are the gradients times the probabilities
    pc.zero_flows()
    pc.accumulate_flows(x)
    inp.grad = None
    node_mars, _ = pc.forward_mars(x)
    node_mars[pc.plan.root_row].sum().backward()
    assert torch.allclose(inp.grad * inp.detach(), pc.input_stats(0), atol=1e-4, rtol=1e-4)


def test_full_batch_em_never_decreases_training_ll():
    pc = engine.compile(irregular())
    x = torch.randint(0, 3, (300, 5))
    prev = -float("inf")
    for _ in range(8):
        ll = optim.full_batch_em_epoch(pc, x, batch_size=128, pseudocount=0.0)
        assert ll >= prev - 1e-5
        prev = ll
    pc2 = engine.compile(irregular())
    hist = optim.fit(pc2, x, epochs=2, schedule=optim.EMSchedule(batch_size=64, full_batch_epochs=1))
    assert [h["epoch"] for h in hist] == [1, 2, 3] and all(h["train_ll"] < 0 for h in hist)


def test_em_keeps_parameters_normalised_and_sync_to_nodes_round_trips():
    root = tiny_tree(block_size=2)
    pc = engine.compile(root, block_size=1)
    x = torch.randint(0, 3, (200, 4))
    pc.zero_flows()
    pc.accumulate_flows(x)
    pc.em_step(0.7, 0.5)
    pc.sync_to_nodes()
    again = engine.compile(root, block_size=2)
    assert torch.allclose(again(x), pc(x), atol=1e-5)
    x_all = all_assignments(4, 3)
    assert abs(pc(x_all).exp().sum().item() - 1) < 1e-5


def test_mixed_distributions_with_gaussian():
    pc = engine.compile(mixed_dists())
    x = torch.tensor([[1.0, 2.0, 0.3], [0.0, 0.0, -1.2]])
    ll = pc(x)
    assert torch.isfinite(ll).all()
    # marginalising the Gaussian gives the discrete marginal, which sums to 1 over its 6 values
    xs = torch.tensor([[a, b, 0.0] for a in range(2) for b in range(3)])
    missing = torch.zeros_like(xs, dtype=torch.bool)
    missing[:, 2] = True
    assert abs(pc(xs, missing).exp().sum().item() - 1) < 1e-5
    pc.zero_flows()
    pc.accumulate_flows(torch.cat([x, x + torch.tensor([0.0, 0.0, 0.5])]))
    pc.em_step(1.0, 0.1)
    assert torch.isfinite(pc(x)).all()


def test_random_inputs_never_nan_on_deeper_circuit():
    from engine.dists import Categorical
    from engine.structures import rat_spn

    pc = engine.compile(rat_spn(12, 8, 3, 2, input_dist=Categorical(4)))
    x = torch.randint(0, 4, (32, 12))
    assert torch.isfinite(pc(x)).all()
