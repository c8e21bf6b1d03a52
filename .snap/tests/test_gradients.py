"""Flow-based gradients (engine.gradients) against torch autograd through the float64 PyTorch
executor, on circuits with padding, shared vectors, missing values and all three input families;
the Triton backend (interpreter on CPU) gives the same gradients; Adam on them raises the likelihood."""

import copy

import pytest
import torch

import engine
from engine.circuit_access import input_views, sum_partitions
from engine.gradients import GradientTrainer, gradients
from tests.helpers import irregular, mixed_dists, tiny_tree
from tests.kernel_runner import DEVICE, OPTS, data


def _softmax_flat(pc, z):
    """theta = per-node softmax of the flat logits `z` (padding stays 0), differentiably."""
    out = torch.zeros_like(z)
    for pt in sum_partitions(pc):
        zz = pt.weights(z).masked_fill(~pt.weights(pc.param_mask), -torch.inf)
        out = out.clone()
        out[pt.param_offset : pt.param_offset + pt.num_params] = (
            torch.softmax(zz, 2).nan_to_num(0.0).reshape(-1)
        )
    return out


def _free(dist, p):
    if dist.name == "gaussian":
        return torch.stack([p[:, 0], p[:, 1].log()], 1)
    if dist.name in ("bernoulli", "binomial"):
        return p.log() - (1 - p).log()
    return p.log()


def _constrained(dist, t):
    if dist.name == "gaussian":
        return torch.stack([t[:, 0], t[:, 1].exp()], 1)
    if dist.name in ("bernoulli", "binomial"):
        return torch.sigmoid(t)
    return torch.softmax(t, 1)


def _set_input_params(pc, i, value):
    """Swap input layer i's parameter buffer for a tensor that carries autograd history."""
    pc.input_layers[i].params = value


def autograd_reference(root, x, missing):
    """d sum_x log p(x) / d (sum logits, input free params) by autograd, float64, PyTorch executor."""
    pc = engine.compile(copy.deepcopy(root), backend="torch").double()
    z = torch.where(
        pc.param_mask, pc.params.clamp_min(1e-300).log(), torch.zeros_like(pc.params)
    ).requires_grad_()
    frees = [_free(d, pc.input_params(i)).detach().requires_grad_() for i, d in enumerate(pc.input_dists)]
    pc.params = _softmax_flat(pc, z)
    for i, (d, t) in enumerate(zip(pc.input_dists, frees)):
        _set_input_params(pc, i, _constrained(d, t))
    ll = pc(x.double(), missing).sum()
    ll.backward()
    return z.grad * pc.param_mask, [t.grad for t in frees], ll.item()


def compiled(root, backend):
    """The Triton backend runs on the GPU when there is one, else in the interpreter on the CPU."""
    if backend == "triton":
        return engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OPTS)
    return engine.compile(copy.deepcopy(root), backend="torch")


def circuits():
    torch.manual_seed(0)
    return {"tiny_tree": tiny_tree(block_size=2), "irregular": irregular(), "mixed": mixed_dists()}


def batch(root, n=96, seed=1):
    torch.manual_seed(seed)
    pc = engine.compile(root)
    dists = [None] * pc.num_vars
    for view in input_views(pc):
        for v in view.vars.tolist():
            dists[v] = view.dist
    return data(dists, n, missing_rate=0.25)


@pytest.mark.parametrize("name", ["tiny_tree", "irregular", "mixed"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flow_gradients_match_autograd(name, backend):
    root = circuits()[name]
    x, missing = batch(root)
    ref_sum, ref_inputs, ref_ll = autograd_reference(root, x, missing)
    pc = compiled(root, backend)
    g = gradients(pc, x.to(pc.device), missing.to(pc.device), wrt="softmax")
    assert g.log_likelihood == pytest.approx(ref_ll, rel=1e-5)
    scale = ref_sum.abs().max().item()
    torch.testing.assert_close(g.sum_grad.double().cpu(), ref_sum, atol=2e-4 * scale, rtol=1e-3)
    for got, want in zip(g.input_grads, ref_inputs):
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-4 * want.abs().max().item(), rtol=1e-3)


def test_raw_probability_gradients_match_autograd():
    """wrt="probs": d log p / d theta = flow / theta, checked through autograd on theta directly."""
    root = circuits()["tiny_tree"]
    x, missing = batch(root)
    pc = engine.compile(copy.deepcopy(root)).double()
    theta = pc.params.clone().requires_grad_()
    pc.params = theta
    pc(x.double(), missing).sum().backward()
    pc2 = engine.compile(copy.deepcopy(root)).double()
    g = gradients(pc2, x.double(), missing, wrt="probs")
    torch.testing.assert_close(g.sum_grad, theta.grad * pc2.param_mask, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_gradient_training_raises_the_likelihood_and_stays_normalised(optimizer):
    root = circuits()["mixed"]
    x, missing = batch(root, n=256)
    pc = engine.compile(copy.deepcopy(root))
    trainer = GradientTrainer(pc, lr=0.05 if optimizer == "adam" else 0.2, optimizer=optimizer)
    first = trainer.step(x, missing)
    for _ in range(30):
        last = trainer.step(x, missing)
    assert last > first + 0.05
    for pt in sum_partitions(pc):
        rows = pt.weights(pc.params).sum(2)
        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_binomial_gradients_match_autograd(backend):
    from engine.distributions.binomial import Binomial

    torch.manual_seed(3)
    ins = [engine.inputs(0, 4, Binomial(6)), engine.inputs(1, 4, engine.dists.Categorical(3))]
    root = engine.summate(engine.multiply(*ins), num_nodes=1)
    x = torch.stack([torch.randint(0, 7, (64,)), torch.randint(0, 3, (64,))], 1)
    missing = torch.rand(x.shape) < 0.25
    ref_sum, ref_inputs, _ = autograd_reference(root, x, missing)
    pc = compiled(root, backend)
    g = gradients(pc, x.to(pc.device), missing.to(pc.device))
    torch.testing.assert_close(
        g.sum_grad.double().cpu(), ref_sum, atol=2e-4 * ref_sum.abs().max().item(), rtol=1e-3
    )
    for got, want in zip(g.input_grads, ref_inputs):
        torch.testing.assert_close(got.double().cpu(), want, atol=2e-4 * want.abs().max().item(), rtol=1e-3)


def test_a_family_without_a_gradient_rule_is_one_clear_error():
    from engine.distributions.discrete_logistic import DiscreteLogistic

    pc = engine.compile(engine.summate(engine.inputs(0, 2, DiscreteLogistic(16)), num_nodes=1))
    with pytest.raises(ValueError, match="no gradient rule for discrete_logistic"):
        gradients(pc, torch.randint(0, 16, (8, 1)))
