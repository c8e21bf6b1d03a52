"""Bernoulli over {0, 1}; params[:, 0] = p(x = 1). Statistics: flows at x = 0 and at x = 1
(a missing value adds its flow split by the node's own probabilities)."""

from __future__ import annotations

import torch

from engine.distributions._triton import jit, tl
from engine.distributions.base import Distribution, register


@jit
def _log_prob(prm, n64, nm, xv, P, C):
    p1 = tl.load(prm + n64 * P, mask=nm, other=0.5)[:, None]
    return tl.log(tl.where(xv == 1, p1, 1.0 - p1))  # -inf for a zero probability


@jit
def _stats_tile(prm, n64, nm, P, xv, miss, f):
    p1 = tl.load(prm + n64 * P, mask=nm, other=0.0)
    fm = tl.sum(tl.where(miss, f, 0.0), 1)
    a0 = tl.sum(tl.where((~miss) & (xv == 0), f, 0.0), 1) + fm * (1.0 - p1)
    a1 = tl.sum(tl.where((~miss) & (xv == 1), f, 0.0), 1) + fm * p1
    return a0, a1, fm * 0.0


@register
class Bernoulli(Distribution):
    """Bernoulli over {0, 1}; params[:, 0] = p(x = 1)."""

    name = "bernoulli"
    num_params = 1
    num_stats = 2
    kernel_log_prob = _log_prob
    kernel_stats_tile = _stats_tile

    def init_params(self, n):
        return torch.rand(n, 1) * 0.9 + 0.05

    def check_params(self, params):
        super().check_params(params)
        if (params < 0).any() or (params > 1).any():
            raise ValueError("bernoulli params must lie in [0, 1]")

    def check_data(self, column, var):
        super().check_data(column, var)
        c = column.double()
        bad = (c != 0) & (c != 1)
        if bad.any():
            raise ValueError(
                f"variable {var}: value {c[bad][0].item():g} out of range for Bernoulli (0 or 1)"
            )

    def value_probs(self, params):
        p1 = params[:, :1]
        return torch.cat([1 - p1, p1], 1)

    def log_prob(self, params, xv, miss):
        """-inf where the value has probability 0."""
        lp = self.value_probs(params).log().gather(1, xv.long().clamp(0, 1))
        return lp.masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        stats.scatter_add_(1, xv.long().clamp(0, 1), flows.masked_fill(miss, 0.0))
        stats.add_(flows.masked_fill(~miss, 0.0).sum(1, keepdim=True) * self.value_probs(params))

    def em_update(self, params, stats, step_size, pseudocount):
        counts = stats + pseudocount / 2
        total = counts.sum(1, keepdim=True)
        new = counts[:, 1:] / total.clamp_min(1e-30)
        return torch.where(total > 1e-30, (1 - step_size) * params + step_size * new, params)

    def sample(self, params):
        return torch.bernoulli(params[:, 0]).long()

    def mode(self, params):
        p = self.value_probs(params)
        v = p.argmax(1)
        return v, p.max(1).values.log()
