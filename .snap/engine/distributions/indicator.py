"""Indicator [x == value]: a fixed literal, as PSDD/Juice literals are. Nothing to learn.

`params[:, 0]` holds each node's value (an integer in 0..num_cats-1); it is structure, not a
parameter: there are no statistics, EM returns the params unchanged, gradients skip the family
(`fixed`). A mismatch scores log 0 = -inf, as every family does for a zero probability (the
flows pass gives such a row no flow).
"""

from __future__ import annotations

import math

import torch

from engine.distributions._triton import jit, tl
from engine.distributions.base import Distribution, register

ZERO_LOG = -math.inf


@jit
def _log_prob(prm, n64, nm, xv, P, C):
    v = tl.load(prm + n64 * P, mask=nm, other=-1.0)[:, None]
    return tl.where(xv.to(tl.float32) == v, 0.0, -float("inf"))  # ZERO_LOG


@register
class Indicator(Distribution):
    """1 if x == params[:, 0] else 0, over values {0, ..., num_cats-1}; never updated."""

    name = "indicator"
    num_params = 1
    num_stats = 0
    fixed = True
    kernel_log_prob = _log_prob

    def __init__(self, num_cats: int = 2):
        if int(num_cats) < 2:
            raise ValueError(f"Indicator needs num_cats >= 2, got {num_cats}")
        self.num_cats = int(num_cats)

    def key(self):
        return (self.name, self.num_cats)

    def to_json(self):
        return {"name": self.name, "num_cats": self.num_cats}

    @classmethod
    def from_json(cls, d):
        return cls(int(d.get("num_cats", 2)))

    def init_params(self, n):
        return (torch.arange(n) % self.num_cats).float()[:, None]

    def check_params(self, params):
        super().check_params(params)
        v = params[:, 0]
        if ((v != v.round()) | (v < 0) | (v >= self.num_cats)).any():
            raise ValueError(f"indicator values must be integers in 0..{self.num_cats - 1}")

    def check_data(self, column, var):
        super().check_data(column, var)
        c = column.double()
        bad = (c != c.round()) | (c < 0) | (c >= self.num_cats)
        if bad.any():
            raise ValueError(
                f"variable {var}: value {c[bad][0].item():g} out of range for Indicator(num_cats={self.num_cats})"
            )

    def log_prob(self, params, xv, miss):
        hit = xv.to(params.dtype) == params[:, :1]
        lp = torch.where(
            hit, torch.zeros((), dtype=params.dtype), torch.full((), ZERO_LOG, dtype=params.dtype)
        )
        return lp.masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        return None  # nothing to learn

    def em_update(self, params, stats, step_size, pseudocount):
        return params

    def sample(self, params):
        return params[:, 0].long()

    def mode(self, params):
        return params[:, 0].long(), torch.zeros(params.shape[0], dtype=params.dtype, device=params.device)

    def value_probs(self, params):
        return torch.nn.functional.one_hot(params[:, 0].long(), self.num_cats).to(params.dtype)
