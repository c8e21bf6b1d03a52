"""Normal density; params[:, 0] = mean, params[:, 1] = standard deviation (> min_std).
Statistics: sum f, sum f x, sum f x^2 (a missing value adds its expectations under the node)."""

from __future__ import annotations

import math

import torch

from engine.distributions._triton import jit, tl
from engine.distributions.base import Distribution, register

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@jit
def _log_prob(prm, n64, nm, xv, P, C):
    mu = tl.load(prm + n64 * P, mask=nm, other=0.0)[:, None]
    sd = tl.load(prm + n64 * P + 1, mask=nm, other=1.0)[:, None]
    z = (xv - mu) / sd
    return -0.5 * z * z - tl.log(sd) - 0.9189385332046727  # log sqrt(2 pi)


@jit
def _stats_tile(prm, n64, nm, P, xv, miss, f):
    mu = tl.load(prm + n64 * P, mask=nm, other=0.0)[:, None]
    sd = tl.load(prm + n64 * P + 1, mask=nm, other=1.0)[:, None]
    x = tl.where(miss, mu, xv)
    x2 = tl.where(miss, mu * mu + sd * sd, xv * xv)
    return tl.sum(f, 1), tl.sum(f * x, 1), tl.sum(f * x2, 1)


@register
class Gaussian(Distribution):
    """Normal density; params[:, 0] = mean, params[:, 1] = standard deviation (> min_std)."""

    name = "gaussian"
    num_params = 2
    num_stats = 3
    discrete = False
    config = ("min_std",)
    kernel_log_prob = _log_prob
    kernel_stats_tile = _stats_tile

    def __init__(self, min_std: float = 1e-2):
        self.min_std = float(min_std)

    def init_params(self, n):
        return torch.stack([torch.randn(n), torch.rand(n) * 0.5 + 0.75], 1)

    def check_params(self, params):
        super().check_params(params)
        if (params[:, 1] <= 0).any():
            raise ValueError("gaussian standard deviations must be > 0")

    def log_prob(self, params, xv, miss):
        mu, sd = params[:, :1], params[:, 1:]
        z = (xv.to(params.dtype) - mu) / sd
        lp = -0.5 * z * z - sd.log() - _LOG_SQRT_2PI
        return lp.masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        mu, sd = params[:, :1], params[:, 1:]
        x = torch.where(miss, mu.expand_as(flows), xv.to(flows.dtype))
        x2 = torch.where(miss, (mu * mu + sd * sd).expand_as(flows), x * x)
        stats[:, 0] += flows.sum(1)
        stats[:, 1] += (flows * x).sum(1)
        stats[:, 2] += (flows * x2).sum(1)

    def em_update(self, params, stats, step_size, pseudocount):
        w = (stats[:, 0] + pseudocount).clamp_min(1e-30)
        mu = (stats[:, 1] + pseudocount * params[:, 0]) / w
        var = (stats[:, 2] + pseudocount * (params[:, 0] ** 2 + params[:, 1] ** 2)) / w - mu * mu
        sd = var.clamp_min(self.min_std**2).sqrt()
        new = torch.stack([mu, sd], 1)
        new = torch.where((w > 1e-12)[:, None], new, params)  # no data and no prior: keep the node
        return (1 - step_size) * params + step_size * new

    def sample(self, params):
        return params[:, 0] + params[:, 1] * torch.randn_like(params[:, 0])

    def mode(self, params):
        return params[:, 0], -params[:, 1].log() - _LOG_SQRT_2PI
