"""A family defined outside the engine, in this one file, plugs in and trains: the registry, the
PyTorch path and the Triton kernels (through the interpreter on CPU) take it without engine edits.

The toy family is the geometric distribution on {0, 1, 2, ...}: p(x) = (1 - t)^x t.
"""

from __future__ import annotations

import copy

import torch

import engine
from engine.distributions import Distribution, from_json, register
from engine.distributions._triton import jit, tl
from tests.kernel_runner import compare


@jit
def _geometric_log_prob(prm, n64, nm, xv, P, C):
    t = tl.load(prm + n64 * P, mask=nm, other=0.5)[:, None]
    return xv.to(tl.float32) * tl.log(1.0 - t) + tl.log(t)


@jit
def _geometric_stats_tile(prm, n64, nm, P, xv, miss, f):
    t = tl.load(prm + n64 * P, mask=nm, other=0.5)[:, None]
    x = tl.where(miss, (1.0 - t) / t, xv.to(tl.float32))  # a missing value: its expectation
    return tl.sum(f, 1), tl.sum(f * x, 1), tl.sum(f * 0.0, 1)


@register
class Geometric(Distribution):
    """params[:, 0] = t in (0, 1); statistics: sum of flows, sum of flows times x."""

    name = "test_geometric"
    num_params = 1
    num_stats = 2
    kernel_log_prob = _geometric_log_prob
    kernel_stats_tile = _geometric_stats_tile

    def init_params(self, n):
        return torch.rand(n, 1) * 0.6 + 0.2

    def log_prob(self, params, xv, miss):
        t = params[:, :1]
        return (xv.to(t.dtype) * torch.log1p(-t) + t.log()).masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        t = params[:, :1]
        x = torch.where(miss, ((1 - t) / t).expand_as(flows), xv.to(flows.dtype))
        stats[:, 0] += flows.sum(1)
        stats[:, 1] += (flows * x).sum(1)

    def em_update(self, params, stats, step_size, pseudocount):
        new = (stats[:, :1] + pseudocount) / (stats[:, :1] + stats[:, 1:] + 2 * pseudocount).clamp_min(1e-30)
        return (1 - step_size) * params + step_size * new.clamp(1e-4, 1 - 1e-4)

    def sample(self, params):
        return torch.distributions.Geometric(probs=params[:, 0]).sample().long()

    def mode(self, params):
        return torch.zeros(params.shape[0], dtype=torch.long), params[:, 0].log()


def _mixture(num_vars=3, k=4):
    ins = [engine.inputs(v, k, Geometric()) for v in range(num_vars)]
    return ins, engine.summate(engine.multiply(*ins), num_nodes=1)


def _reference_ll(ins, root, x):
    """float64 log sum_k w_k prod_v t_vk (1 - t_vk)^x_v, from the node vectors' parameters."""
    w = root.params[:, 0, 0].double()
    lp = torch.zeros(x.shape[0], w.numel(), dtype=torch.float64)
    for v, leaf in enumerate(ins):
        t = leaf.params[:, 0].double()
        lp += x[:, v : v + 1].double() * torch.log1p(-t) + t.log()
    return torch.logsumexp(lp + w.log(), 1)


def test_a_family_from_outside_the_engine_round_trips_through_the_registry():
    d = from_json(Geometric().to_json())
    assert isinstance(d, Geometric)


def test_toy_family_trains_on_cpu_against_a_float64_reference():
    torch.manual_seed(0)
    ins, root = _mixture()
    x = torch.distributions.Geometric(probs=torch.tensor([0.3, 0.6, 0.8])).sample((200,)).long()
    pc = engine.compile(root, backend="torch")
    prev = -float("inf")
    for _ in range(6):  # full-batch EM: the training log-likelihood never decreases
        pc.zero_flows()
        ll = pc.accumulate_flows(x).mean().item()
        assert ll >= prev - 1e-5
        prev = ll
        pc.em_step(1.0, 0.0)
    pc.sync_to_nodes()
    assert torch.allclose(pc(x).double(), _reference_ll(ins, root, x), atol=1e-4)


def test_toy_family_em_on_one_leaf_is_the_closed_form_maximum_likelihood():
    x = torch.tensor([[0], [2], [5], [1]])
    pc = engine.compile(engine.inputs(0, 1, Geometric(), params=torch.tensor([[0.5]])), backend="torch")
    pc.zero_flows()
    pc.accumulate_flows(x)
    pc.em_step(1.0, 0.0)
    leaf = pc.sync_to_nodes()
    assert abs(leaf.params.item() - 4 / (4 + 8)) < 1e-6  # t = n / (n + sum x)


def test_toy_family_kernels_match_the_torch_path():
    _, root = _mixture(k=16)
    x = torch.distributions.Geometric(probs=torch.tensor([0.3, 0.6, 0.8])).sample((20,)).long()
    missing = torch.rand(x.shape) < 0.2
    compare(copy.deepcopy(root), x, missing)
