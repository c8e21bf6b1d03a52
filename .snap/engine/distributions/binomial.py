"""Binomial(N, p) over {0, ..., N} (Juice's `B` leaves); params[:, 0] = p. PyTorch only: the
Triton backend runs these methods too (no device function: lgamma would need libdevice).

Statistics: sum f and sum f x (a missing value adds its expectation N p), so the M-step is
p = sum f x / (N sum f), with a pseudocount that pulls toward the current p.
"""

from __future__ import annotations

import torch

from engine.distributions.base import Distribution, register


@register
class Binomial(Distribution):
    """Number of successes in `num_trials` trials; params[:, 0] = success probability p."""

    name = "binomial"
    num_params = 1
    num_stats = 2

    def __init__(self, num_trials: int):
        if int(num_trials) < 1:
            raise ValueError(f"Binomial needs num_trials >= 1, got {num_trials}")
        self.num_trials = int(num_trials)

    def key(self):
        return (self.name, self.num_trials)

    def to_json(self):
        return {"name": self.name, "num_trials": self.num_trials}

    @classmethod
    def from_json(cls, d):
        return cls(int(d["num_trials"]))

    def init_params(self, n):
        return torch.rand(n, 1) * 0.8 + 0.1

    def check_params(self, params):
        super().check_params(params)
        if (params < 0).any() or (params > 1).any():
            raise ValueError("binomial params must lie in [0, 1]")

    def check_data(self, column, var):
        super().check_data(column, var)
        c = column.double()
        bad = (c != c.round()) | (c < 0) | (c > self.num_trials)
        if bad.any():
            raise ValueError(
                f"variable {var}: value {c[bad][0].item():g} out of range for "
                f"Binomial(num_trials={self.num_trials})"
            )

    def _log_choose(self, x: torch.Tensor) -> torch.Tensor:
        n = torch.tensor(float(self.num_trials), dtype=x.dtype, device=x.device)
        return torch.lgamma(n + 1) - torch.lgamma(x + 1) - torch.lgamma(n - x + 1)

    def log_prob(self, params, xv, miss):
        p = params[:, :1]
        x = xv.to(params.dtype).clamp(0, self.num_trials)
        lp = self._log_choose(x) + torch.xlogy(x, p) + torch.xlogy(self.num_trials - x, 1 - p)
        return lp.masked_fill(miss, 0.0)  # -inf for a zero probability (p = 0 or 1)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        x = torch.where(miss, (self.num_trials * params[:, :1]).expand_as(flows), xv.to(flows.dtype))
        stats[:, 0] += flows.sum(1)
        stats[:, 1] += (flows * x).sum(1)

    def em_update(self, params, stats, step_size, pseudocount):
        p = params[:, 0]
        w = (stats[:, 0] + pseudocount) * self.num_trials
        new = (stats[:, 1] + pseudocount * self.num_trials * p) / w.clamp_min(1e-30)
        new = torch.where(w > 1e-12, new.clamp(0, 1), p)
        return ((1 - step_size) * p + step_size * new)[:, None]

    def grad_from_stats(self, params, stats, wrt: str):
        """d sum_x log p / d logit(p) = S_1 - N p S_0 ("softmax"), or over p(1 - p) ("probs")."""
        p = params[:, :1]
        g = stats[:, 1:2] - self.num_trials * p * stats[:, :1]
        return g if wrt == "softmax" else g / (p * (1 - p)).clamp_min(1e-38)

    def value_probs(self, params):
        k = torch.arange(self.num_trials + 1, device=params.device)[None].expand(params.shape[0], -1)
        return self.log_prob(params, k, torch.zeros_like(k, dtype=torch.bool)).exp()

    def sample(self, params):
        return torch.distributions.Binomial(self.num_trials, probs=params[:, 0]).sample().long()

    def mode(self, params):
        p, v = self.value_probs(params).max(1)
        return v, p.clamp_min(1e-38).log()
