"""Zero probability is -inf (issue 14 item 3): exact against enumeration, and flows and EM stay finite
when a batch holds impossible rows, on the PyTorch path and through the Triton kernels."""

import copy

import pytest
import torch

import engine
from engine.dists import Bernoulli, Categorical
from tests.helpers import all_assignments, reference_probs
from tests.kernel_runner import compare


def _with_zeros(latents=4, block_size=None):
    """((x0 x1) (x2 x3)) over 3 values; some leaves rule values out, some sum weights are 0, so
    every row with x0 = 0 or x1 = 1 has probability 0."""
    torch.manual_seed(0)
    ins = []
    for v in range(4):
        p = torch.rand(latents, 3) + 0.1
        p[: latents // 2, v % 3] = 0.0  # half the nodes of each variable rule one value out
        ins.append(engine.inputs(v, latents, Categorical(3), params=p / p.sum(1, keepdim=True)))
    w = torch.rand(1, latents, latents) + 0.1
    w[:, :, latents // 2 :] = 0.0  # the left sum reads only products of nodes that rule a value out
    s01 = engine.summate(engine.multiply(ins[0], ins[1]), num_nodes=latents, block_size=latents, params=w)
    s23 = engine.summate(engine.multiply(ins[2], ins[3]), num_nodes=latents, block_size=block_size)
    return engine.summate(engine.multiply(s01, s23), num_nodes=1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_log_likelihood_is_minus_inf_exactly_where_enumeration_gives_zero(backend):
    root = _with_zeros()
    x = all_assignments(4, 3)
    ref = reference_probs(root, x)
    assert (ref == 0).any() and (ref > 0).any()
    ll = engine.compile(root, backend=backend).forward(x).double()
    assert torch.equal(torch.isneginf(ll), ref == 0)
    assert torch.allclose(ll[ref > 0].exp(), ref[ref > 0], rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_impossible_rows_add_no_flows_and_em_stays_finite(backend):
    root = _with_zeros()
    x = all_assignments(4, 3)
    possible = reference_probs(root, x) > 0
    pc = engine.compile(copy.deepcopy(root), backend=backend)
    pc.zero_flows()
    pc.accumulate_flows(x)
    ref = engine.compile(copy.deepcopy(root), backend=backend)
    ref.zero_flows()
    ref.accumulate_flows(x[possible])
    assert torch.isfinite(pc.param_flows).all() and torch.isfinite(pc.input_stats(0)).all()
    assert torch.allclose(pc.param_flows, ref.param_flows, atol=1e-5)
    assert torch.allclose(pc.input_stats(0), ref.input_stats(0), atol=1e-5)
    pc.em_step(1.0, 0.0)
    assert torch.isfinite(pc.params).all() and torch.isfinite(pc.input_params(0)).all()
    assert torch.allclose(pc.input_params(0).sum(1), torch.ones(pc.input_params(0).shape[0]), atol=1e-5)
    assert abs(pc(x).exp().sum().item() - 1) < 1e-5  # still normalised after EM with pseudocount 0


@pytest.mark.parametrize("latents", [4, 16])
def test_kernels_match_torch_with_impossible_rows(latents):
    """Sparse (block size 4) and tiled (16) sum kernels, -inf in the same places, flows equal."""
    root = _with_zeros(latents, block_size=latents)
    x = all_assignments(4, 3)[::2]
    compare(root, x, torch.rand(x.shape) < 0.1)


def test_bernoulli_literals_zero_and_one():
    lit = [engine.inputs(v, 2, Bernoulli(), params=torch.tensor([[0.0], [1.0]])) for v in range(2)]
    root = engine.summate(engine.multiply(*lit), num_nodes=1)
    x = all_assignments(2, 2)
    ll = engine.compile(root)(x).double()
    ref = reference_probs(root, x)
    assert torch.equal(torch.isneginf(ll), ref == 0) and torch.allclose(ll.exp(), ref)


def test_categorical_em_keeps_a_node_without_flow_or_pseudocount():
    d = Categorical(3)
    p = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    stats = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 0.0]])
    new = d.em_update(p, stats, 1.0, 0.0)
    assert torch.equal(new[0], p[0]) and torch.allclose(new[1], torch.tensor([0.25, 0.75, 0.0]))


def test_fit_reports_minus_inf_for_a_validation_row_of_probability_zero():
    """Evaluation is not training: a held-out row the circuit rules out gives valid_ll = -inf, and
    training goes on (a -inf training LL still stops it as diverged)."""
    from engine import optim

    p = torch.tensor([[0.5, 0.5, 0.0]])
    root = engine.summate(
        engine.multiply(engine.inputs(0, 1, Categorical(3), params=p), engine.inputs(1, 1, Categorical(3))),
        num_nodes=1,
    )
    train = torch.tensor([[0, 1], [1, 2]] * 20)
    hist = optim.fit(
        engine.compile(root),
        train,
        valid=torch.tensor([[2, 0], [0, 0]]),
        epochs=1,
        schedule=optim.EMSchedule(pseudocount=0.0, full_batch_epochs=1),
    )
    assert hist[-1]["valid_ll"] == -float("inf") and hist[-1]["train_ll"] > -2
    with pytest.raises(optim.NonFiniteError, match="diverged"):
        optim.fit(
            engine.compile(root),
            torch.tensor([[2, 0]] * 8),
            epochs=1,
            schedule=optim.EMSchedule(pseudocount=0.0, full_batch_epochs=0),
        )
