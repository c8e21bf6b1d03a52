"""Gradients of the log-likelihood from flows (no autograd), and SGD/Adam on them.

One forward and one flows pass (`pc.accumulate_flows`, either backend) leave the *parameter flow*
of every sum edge, F_nc = sum_x theta_nc p_c(x) (d log p(x) / d p_n(x)), and every input node's
EM statistics. Since F_nc = theta_nc * d log p / d theta_nc, the gradient is the flow over the
parameter; with a node's total flow F_n = sum_c F_nc (a node's weights sum to 1) the usual
reparametrisations follow without dividing:

- `"softmax"`: theta_n = softmax(z_n) over the node's children: d/dz_nc = F_nc - theta_nc * F_n.
- `"probs"`: d/dtheta_nc = F_nc / theta_nc (0 where theta_nc = 0), the raw derivative.

Inputs (their statistics S are flow-weighted counts; a missing value adds flow * probabilities,
which cancels below): Categorical / Bernoulli logits d/dz_k = S_k - phi_k sum_j S_j (Binomial's own
`grad_from_stats`: S_1 - N p S_0); Gaussian
(mean, log std): d/dmu = (S_1 - mu S_0) / sd^2, d/dlog sd = (S_2 - 2 mu S_1 + mu^2 S_0) / sd^2 - S_0.
A family can supply its own rule as a method `grad_from_stats(params, stats, wrt)`; families with
no parameters to learn (`num_params == 0` or a `fixed` attribute) get no gradient.

Tied parameters (`NodeVector.tie_to`): every slot of a tied set holds the set's total gradient, so
an optimiser stepping all slots alike keeps the copies equal.

Shapes: `sum_grad` is flat like `pc.params` `[num_params]` (padding entries 0); `input_grads[i]` is
`[nodes, num_params]` of input layer i. Gradients are of sum_x log p(x) over the batch, in nats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.circuit_access import input_views, sum_partitions, tie_gradients


@dataclass
class Gradients:
    """d sum_x log p(x) / d theta for one batch (see the module docstring for `wrt`)."""

    sum_grad: torch.Tensor  # [num_params], tile layout of pc.params
    input_grads: list  # per input layer: [nodes, num_params] or None (fixed family)
    log_likelihood: float  # sum over the batch, nats


def sum_grad_from_flows(pc, wrt: str = "softmax") -> torch.Tensor:
    """Sum-edge gradients `[num_params]` from the accumulated `pc.param_flows`."""
    g = torch.zeros_like(pc.params)
    for pt in sum_partitions(pc):
        f, w = pt.weights(pc.param_flows), pt.weights(pc.params)  # [nb, bs, width * bs]
        if wrt == "softmax":
            out = f - w * f.sum(2, keepdim=True)
        elif wrt == "probs":
            out = torch.where(w > 0, f / w.clamp_min(1e-38), torch.zeros_like(f))
        else:
            raise ValueError(f"wrt must be 'softmax' or 'probs', got {wrt!r}")
        pt.weights(g).copy_(out * pt.weights(pc.param_mask))
    return g


def input_grad_from_stats(dist, params: torch.Tensor, stats: torch.Tensor, wrt: str = "softmax"):
    """`[n, num_params]` gradient of one input layer, or None for a family with nothing to learn."""
    own = getattr(dist, "grad_from_stats", None)
    if own is not None:
        return own(params, stats, wrt)
    if dist.num_params == 0 or getattr(dist, "fixed", False):
        return None
    if dist.name == "categorical":
        if wrt == "softmax":
            return stats - params * stats.sum(1, keepdim=True)
        return torch.where(params > 0, stats / params.clamp_min(1e-38), torch.zeros_like(stats))
    if dist.name == "bernoulli":
        p = params[:, :1]
        if wrt == "softmax":  # logit of p
            return stats[:, 1:] - p * stats.sum(1, keepdim=True)
        return stats[:, 1:] / p.clamp_min(1e-38) - stats[:, :1] / (1 - p).clamp_min(1e-38)
    if dist.name == "gaussian":
        mu, sd = params[:, 0], params[:, 1]
        s0, s1, s2 = stats[:, 0], stats[:, 1], stats[:, 2]
        d_mu = (s1 - mu * s0) / sd**2
        d_logsd = (s2 - 2 * mu * s1 + mu * mu * s0) / sd**2 - s0
        return torch.stack([d_mu, d_logsd if wrt == "softmax" else d_logsd / sd], 1)
    raise ValueError(f"no gradient rule for {dist.name} inputs (give the family a grad_from_stats method)")


@torch.no_grad()
def gradients(pc, x, missing=None, wrt: str = "softmax") -> Gradients:
    """Forward + flows on the batch `x: [B, num_vars]`; the gradients of sum_x log p(x).

    Clears the circuit's accumulated flows and statistics first (as EM's zero_flows does).
    `wrt="softmax"`: sum logits and input logits / (mean, log std); `"probs"`: the raw parameters.
    """
    pc.zero_flows()
    ll = pc.accumulate_flows(x, missing)
    ins = [input_grad_from_stats(v.dist, v.params, v.stats, wrt) for v in input_views(pc)]
    sums = sum_grad_from_flows(pc, wrt)
    tie_gradients(pc, sums, ins)  # a tied parameter's gradient is the total over its copies
    return Gradients(sums, ins, float(ll.double().sum()))


class GradientTrainer:
    """SGD or Adam on softmax logits (sums, Categorical/Bernoulli) and (mean, log std) (Gaussian).

    Holds unconstrained tensors, asks `gradients` for d log-likelihood, steps torch's optimiser on
    the negative mean log-likelihood, and writes the constrained parameters back into `pc`.
    """

    def __init__(self, pc, lr: float = 0.05, optimizer: str = "adam"):
        self.pc = pc
        mask = pc.param_mask
        self.sum_logits = torch.where(mask, pc.params.clamp_min(1e-30).log(), torch.zeros_like(pc.params))
        self.input_logits = [self._to_free(v.dist, v.params) for v in input_views(pc)]
        tensors = [self.sum_logits] + [t for t in self.input_logits if t is not None]
        for t in tensors:
            t.requires_grad_(True)
        if optimizer == "adam":
            self.opt = torch.optim.Adam(tensors, lr=lr)
        elif optimizer == "sgd":
            self.opt = torch.optim.SGD(tensors, lr=lr)
        else:
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")

    @staticmethod
    def _to_free(dist, params):
        if (
            input_grad_from_stats(
                dist,
                params,
                torch.zeros(params.shape[0], dist.num_stats, dtype=params.dtype, device=params.device),
            )
            is None
        ):
            return None
        if dist.name == "gaussian":
            return torch.stack([params[:, 0], params[:, 1].log()], 1).detach().clone()
        if dist.name in ("bernoulli", "binomial"):  # one probability: its logit
            p = params[:, :1].clamp(1e-6, 1 - 1e-6)
            return (p.log() - (1 - p).log()).detach().clone()
        return params.clamp_min(1e-30).log().detach().clone()

    def step(self, x, missing=None) -> float:
        """One optimiser step on the batch; returns its mean log-likelihood (nats) before the step."""
        g = gradients(self.pc, x, missing, "softmax")
        n = x.shape[0]
        self.sum_logits.grad = -g.sum_grad / n
        for t, gi in zip(self.input_logits, g.input_grads):
            if t is not None:
                t.grad = -gi / n
        self.opt.step()
        self._write_back()
        return g.log_likelihood / n

    @torch.no_grad()
    def _write_back(self) -> None:
        pc = self.pc
        for pt in sum_partitions(pc):
            z = pt.weights(self.sum_logits).masked_fill(~pt.weights(pc.param_mask), -torch.inf)
            pt.weights(pc.params).copy_(torch.softmax(z, 2).nan_to_num(0.0))
        for v, t in zip(input_views(pc), self.input_logits):
            if t is None:
                continue
            d = v.dist
            if d.name == "gaussian":
                new = torch.stack([t[:, 0], t[:, 1].exp().clamp_min(d.min_std)], 1)
            elif d.name in ("bernoulli", "binomial"):
                new = torch.sigmoid(t)
            else:
                new = torch.softmax(t, 1)
            v.params.copy_(new)
