"""Input distributions: log-probabilities, EM sufficient statistics, sampling and modes.

Every method is vectorised over an *input layer*: all input nodes of one family, with
`params: [n, num_params]`, the observed value of each node's variable `xv: [n, B]` and a boolean
`miss: [n, B]` (True = marginalised: the node's value is log 1 = 0).
"""

from __future__ import annotations

import math

import torch


class Distribution:
    """Base class; subclasses define one univariate family."""

    name = "abstract"
    num_params = 0
    num_stats = 0
    discrete = True

    def key(self) -> tuple:
        """Input nodes whose distributions share a key are executed in one layer."""
        return (self.name,)

    def to_json(self) -> dict:
        return {"name": self.name}

    def init_params(self, n: int) -> torch.Tensor:
        raise NotImplementedError

    def check_params(self, params: torch.Tensor) -> None:
        if not torch.isfinite(params).all():
            raise ValueError(f"{self.name} params must be finite")

    def check_data(self, column: torch.Tensor, var: int) -> None:
        """Raise ValueError naming `var` if an observed value is outside the support."""
        if not torch.isfinite(column.double()).all():
            raise ValueError(f"variable {var}: data contains NaN or inf")

    def log_prob(self, params, xv, miss) -> torch.Tensor:
        raise NotImplementedError

    def accumulate_stats(self, stats, params, xv, miss, flows) -> None:
        """stats: [n, num_stats] += the flow-weighted sufficient statistics of this batch."""
        raise NotImplementedError

    def em_update(self, params, stats, step_size: float, pseudocount: float) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, params) -> torch.Tensor:
        raise NotImplementedError

    def mode(self, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Most likely value of each node and its log-probability (density for continuous)."""
        raise NotImplementedError


class Categorical(Distribution):
    """Categorical over {0, ..., num_cats-1}; params are the probabilities."""

    name = "categorical"

    def __init__(self, num_cats: int):
        if int(num_cats) < 2:
            raise ValueError(f"Categorical needs num_cats >= 2, got {num_cats}")
        self.num_cats = int(num_cats)
        self.num_params = self.num_stats = self.num_cats

    def key(self):
        return (self.name, self.num_cats)

    def to_json(self):
        return {"name": self.name, "num_cats": self.num_cats}

    def init_params(self, n):
        p = torch.rand(n, self.num_cats) + 0.01
        return p / p.sum(1, keepdim=True)

    def check_params(self, params):
        super().check_params(params)
        if (params < 0).any() or ((params.sum(1) - 1).abs() > 1e-3).any():
            raise ValueError("categorical params must be non-negative and sum to 1 per node")

    def check_data(self, column, var):
        super().check_data(column, var)
        c = column.double()
        bad = (c != c.round()) | (c < 0) | (c >= self.num_cats)
        if bad.any():
            v = c[bad][0].item()
            raise ValueError(f"variable {var}: value {v:g} out of range for Categorical(num_cats={self.num_cats})")

    def log_prob(self, params, xv, miss):
        lp = params.clamp_min(1e-38).log().gather(1, xv.long().clamp(0, self.num_cats - 1))
        return lp.masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        obs_flows = flows.masked_fill(miss, 0.0)
        stats.scatter_add_(1, xv.long().clamp(0, self.num_cats - 1), obs_flows)
        stats.add_(flows.masked_fill(~miss, 0.0).sum(1, keepdim=True) * params)

    def em_update(self, params, stats, step_size, pseudocount):
        counts = stats + pseudocount / self.num_cats
        new = counts / counts.sum(1, keepdim=True).clamp_min(1e-30)
        return (1 - step_size) * params + step_size * new

    def sample(self, params):
        return torch.multinomial(params.clamp_min(0), 1).squeeze(1)

    def mode(self, params):
        p, v = params.max(1)
        return v, p.clamp_min(1e-38).log()


class Bernoulli(Distribution):
    """Bernoulli over {0, 1}; params[:, 0] = p(x = 1)."""

    name = "bernoulli"
    num_params = 1
    num_stats = 2

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
            raise ValueError(f"variable {var}: value {c[bad][0].item():g} out of range for Bernoulli (0 or 1)")

    def _probs(self, params):
        p1 = params[:, :1]
        return torch.cat([1 - p1, p1], 1)

    def log_prob(self, params, xv, miss):
        lp = self._probs(params).clamp_min(1e-38).log().gather(1, xv.long().clamp(0, 1))
        return lp.masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        stats.scatter_add_(1, xv.long().clamp(0, 1), flows.masked_fill(miss, 0.0))
        stats.add_(flows.masked_fill(~miss, 0.0).sum(1, keepdim=True) * self._probs(params))

    def em_update(self, params, stats, step_size, pseudocount):
        counts = stats + pseudocount / 2
        new = counts[:, 1:] / counts.sum(1, keepdim=True).clamp_min(1e-30)
        return (1 - step_size) * params + step_size * new

    def sample(self, params):
        return torch.bernoulli(params[:, 0]).long()

    def mode(self, params):
        p = self._probs(params)
        v = p.argmax(1)
        return v, p.max(1).values.clamp_min(1e-38).log()


class Gaussian(Distribution):
    """Normal density; params[:, 0] = mean, params[:, 1] = standard deviation (> min_std)."""

    name = "gaussian"
    num_params = 2
    num_stats = 3
    discrete = False

    def __init__(self, min_std: float = 1e-2):
        self.min_std = float(min_std)

    def key(self):
        return (self.name, self.min_std)

    def to_json(self):
        return {"name": self.name, "min_std": self.min_std}

    def init_params(self, n):
        return torch.stack([torch.randn(n), torch.rand(n) * 0.5 + 0.75], 1)

    def check_params(self, params):
        super().check_params(params)
        if (params[:, 1] <= 0).any():
            raise ValueError("gaussian standard deviations must be > 0")

    def log_prob(self, params, xv, miss):
        mu, sd = params[:, :1], params[:, 1:]
        z = (xv.to(params.dtype) - mu) / sd
        lp = -0.5 * z * z - sd.log() - 0.5 * math.log(2 * math.pi)
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
        return params[:, 0], -params[:, 1].log() - 0.5 * math.log(2 * math.pi)


def from_json(d: dict) -> Distribution:
    """Rebuild a distribution from `to_json()` output; unknown names raise ValueError."""
    name = d.get("name")
    if name == "categorical":
        return Categorical(int(d["num_cats"]))
    if name == "bernoulli":
        return Bernoulli()
    if name == "gaussian":
        return Gaussian(float(d.get("min_std", 1e-2)))
    raise ValueError(f"unknown input distribution {name!r}")
