"""Discretised logistic over {0, ..., num_cats-1} (8-bit pixels: num_cats=256), as PyJuice's.

Value k owns the interval [k - 1/2, k + 1/2] of a logistic(mu, s) density, the end values own the
tails: p(k) = sigmoid((k + 1/2 - mu) / s) - sigmoid((k - 1/2 - mu) / s), with the first CDF term 1 for
k = num_cats-1 and the second 0 for k = 0. Computed stably in log space as
log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a)). `params[:, 0] = mu` and `params[:, 1] = s`
are in value units (PyJuice's `val_range` is an affine relabelling of the same family).

Statistics (as PyJuice's): sum f, sum f x, sum f x^2 (a missing value adds its continuous-logistic
moments mu and mu^2 + s^2 pi^2 / 3). The M-step matches moments: mu = mean, s = std * sqrt(3) / pi
(std floored at `min_std`), approximate for the discretised density, so EM is not exactly monotone.
"""

from __future__ import annotations

import math

import torch

from engine.distributions._triton import jit, tl
from engine.distributions.base import Distribution, register

_VAR_PER_S2 = math.pi**2 / 3  # variance of a logistic with scale s, over s^2


@jit
def _log_sigmoid(z):
    return tl.minimum(z, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(z)))


@jit
def _log_prob(prm, n64, nm, xv, P, C):
    mu = tl.load(prm + n64 * P, mask=nm, other=0.0)[:, None]
    s = tl.load(prm + n64 * P + 1, mask=nm, other=1.0)[:, None]
    x = xv.to(tl.float32)
    a = (x + 0.5 - mu) / s
    b = (x - 0.5 - mu) / s
    lo_end = xv <= 0
    hi_end = xv >= C - 1
    la = tl.where(hi_end, 0.0, _log_sigmoid(a))
    lb = tl.where(lo_end, 0.0, _log_sigmoid(-b))
    gap = tl.where(lo_end | hi_end, 0.0, tl.log(tl.maximum(1.0 - tl.exp(-1.0 / s), 1e-30)))
    return la + lb + gap


@jit
def _stats_tile(prm, n64, nm, P, xv, miss, f):
    mu = tl.load(prm + n64 * P, mask=nm, other=0.0)[:, None]
    s = tl.load(prm + n64 * P + 1, mask=nm, other=1.0)[:, None]
    x = tl.where(miss, mu, xv.to(tl.float32))
    x2 = tl.where(miss, mu * mu + 3.289868133696453 * s * s, x * x)  # pi^2 / 3
    return tl.sum(f, 1), tl.sum(f * x, 1), tl.sum(f * x2, 1)


@register
class DiscreteLogistic(Distribution):
    """Discretised logistic over {0..num_cats-1}; params[:, 0] = mu, params[:, 1] = s > 0."""

    name = "discrete_logistic"
    num_params = 2
    num_stats = 3
    kernel_log_prob = _log_prob
    kernel_stats_tile = _stats_tile

    def __init__(self, num_cats: int = 256, min_std: float = 0.5):
        if int(num_cats) < 2:
            raise ValueError(f"DiscreteLogistic needs num_cats >= 2, got {num_cats}")
        self.num_cats = int(num_cats)
        self.min_std = float(min_std)

    def key(self):
        return (self.name, self.num_cats, self.min_std)

    def kernel_constant(self) -> int:
        return self.num_cats

    def to_json(self):
        return {"name": self.name, "num_cats": self.num_cats, "min_std": self.min_std}

    @classmethod
    def from_json(cls, d):
        return cls(int(d["num_cats"]), float(d.get("min_std", 0.5)))

    def init_params(self, n):
        c = self.num_cats
        return torch.stack(
            [torch.rand(n) * (c - 1), torch.full((n,), c / 8.0) * (0.75 + 0.5 * torch.rand(n))], 1
        )

    def check_params(self, params):
        super().check_params(params)
        if (params[:, 1] <= 0).any():
            raise ValueError("discrete_logistic scales s must be > 0")

    def check_data(self, column, var):
        super().check_data(column, var)
        c = column.double()
        bad = (c != c.round()) | (c < 0) | (c >= self.num_cats)
        if bad.any():
            raise ValueError(
                f"variable {var}: value {c[bad][0].item():g} out of range for "
                f"DiscreteLogistic(num_cats={self.num_cats})"
            )

    def log_prob(self, params, xv, miss):
        mu, s = params[:, :1], params[:, 1:]
        x = xv.to(params.dtype)
        a, b = (x + 0.5 - mu) / s, (x - 0.5 - mu) / s
        la = torch.where(xv >= self.num_cats - 1, 0.0, torch.nn.functional.logsigmoid(a))
        lb = torch.where(xv <= 0, 0.0, torch.nn.functional.logsigmoid(-b))
        gap = torch.log1p(-torch.exp(-1.0 / s)).expand_as(la)
        gap = torch.where((xv <= 0) | (xv >= self.num_cats - 1), 0.0, gap)
        return (la + lb + gap).masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        mu, s = params[:, :1], params[:, 1:]
        x = torch.where(miss, mu.expand_as(flows), xv.to(flows.dtype))
        x2 = torch.where(miss, (mu * mu + _VAR_PER_S2 * s * s).expand_as(flows), x * x)
        stats[:, 0] += flows.sum(1)
        stats[:, 1] += (flows * x).sum(1)
        stats[:, 2] += (flows * x2).sum(1)

    def em_update(self, params, stats, step_size, pseudocount):
        mu, s = params[:, 0], params[:, 1]
        m2_old = mu * mu + _VAR_PER_S2 * s * s
        w = (stats[:, 0] + pseudocount).clamp_min(1e-30)
        m1 = (stats[:, 1] + pseudocount * mu) / w
        m2 = (stats[:, 2] + pseudocount * m2_old) / w
        m1 = (1 - step_size) * mu + step_size * m1
        m2 = (1 - step_size) * m2_old + step_size * m2
        std = (m2 - m1 * m1).clamp_min(self.min_std**2).sqrt()
        new = torch.stack([m1, std / math.sqrt(_VAR_PER_S2)], 1)
        return torch.where((w > 1e-12)[:, None], new, params)  # no data and no prior: keep the node

    def value_probs(self, params):
        k = torch.arange(self.num_cats, device=params.device)
        xv = k[None, :].expand(params.shape[0], -1)
        return self.log_prob(params, xv, torch.zeros_like(xv, dtype=torch.bool)).exp()

    def sample(self, params):
        u = torch.rand(params.shape[0], device=params.device).clamp(1e-7, 1 - 1e-7)
        x = params[:, 0] + params[:, 1] * (u.log() - (-u).log1p())
        return x.round().clamp(0, self.num_cats - 1).long()

    def mode(self, params):
        p, v = self.value_probs(params).max(1)
        return v, p.clamp_min(1e-38).log()
