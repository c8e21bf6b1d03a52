"""Posteriors under hard and soft evidence, as PyJuice's `conditional(..., target_vars, soft_evidence)`.

Hard evidence: `x` with `missing` (True = not observed). Soft (virtual) evidence: for missing
discrete variables, a likelihood vector lambda_v(k) >= 0 over the values; each input node over v then
takes the value u_n = sum_k phi_nk lambda_v(k) instead of 1, so the circuit computes
p~(x_obs) = sum_{x_mis} p(x) prod_v lambda_v(x_v). One forward and one flows pass give every
posterior, since p is multilinear in the leaves and each term holds one leaf per variable:

    p(x_v = k | evidence) ∝ sum_{n over v} flow_n * phi_nk * lambda_v(k) / u_n

(with no soft evidence u_n = 1 and lambda = 1: the flow-times-probability rule of
`engine.queries.conditional`). Observed variables get a one-hot row; soft evidence on an observed
variable is ignored (the hard value wins). `target_vars` picks the rows returned.

Shapes: `x, missing: [B, V]`; `soft_evidence: [B, V, K]` (K = most values of any variable; ones = no
evidence) or a dict `{var: [B, K_v] or [K_v]}`; the result is `[B, len(target_vars) or V, K]`.
"""

from __future__ import annotations

import torch

from engine.circuit_access import input_views, rerun_inner_layers, set_marginals
from engine.queries import _prepare  # the one batch check of every query


def _max_values(views) -> int:
    return max(v.dist.value_probs(v.params).shape[1] for v in views)


def _soft_tensor(soft, bsz: int, num_vars: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(lambda `[B, V, K]` float64, has_soft `[V]` bool) from a tensor or a {var: vector} dict."""
    lam = torch.ones(bsz, num_vars, k, dtype=torch.float64, device=device)
    has = torch.zeros(num_vars, dtype=torch.bool, device=device)
    if isinstance(soft, dict):
        for v, vec in soft.items():
            if not 0 <= int(v) < num_vars:
                raise ValueError(f"soft_evidence names variable {v}, outside 0..{num_vars - 1}")
            vec = torch.as_tensor(vec, dtype=torch.float64, device=device)
            vec = vec.expand(bsz, -1) if vec.dim() == 1 else vec
            if vec.dim() != 2 or vec.shape[0] != bsz or vec.shape[1] > k:
                raise ValueError(
                    f"soft_evidence for variable {v} must be [K] or [{bsz}, K] with K <= {k}, "
                    f"got {tuple(vec.shape)}"
                )
            lam[:, int(v), : vec.shape[1]] = vec
            lam[:, int(v), vec.shape[1] :] = 0.0
            has[int(v)] = True
    else:
        t = torch.as_tensor(soft, dtype=torch.float64, device=device)
        if t.shape != (bsz, num_vars, k):
            raise ValueError(f"soft_evidence must have shape {(bsz, num_vars, k)}, got {tuple(t.shape)}")
        lam, has = t.clone(), torch.ones(num_vars, dtype=torch.bool, device=device)
    if not torch.isfinite(lam).all() or (lam < 0).any():
        raise ValueError("soft_evidence must hold finite, non-negative likelihoods")
    return lam, has


def _apply_soft(pc, views, node_mars, lam, use):
    """Overwrite input rows with log u_n = log sum_k phi_nk lambda_v(k) where `use[b, v]`; returns the
    per-layer u `[n, B]` (1 elsewhere) for the posterior's division."""
    us = []
    for v in views:
        probs = v.dist.value_probs(v.params).double()  # [n, Kd]
        kd = probs.shape[1]
        lv = lam[:, v.vars, :kd]  # [B, n, Kd]
        u = torch.einsum("bnk,nk->nb", lv, probs)  # [n, B]
        on = use[:, v.vars].T  # [n, B]
        if on.any():  # a node the evidence rules out gets log 0 = -inf; the root check catches a zero example
            rows = node_mars[v.rows]
            node_mars[v.rows] = torch.where(on, u.log().to(rows.dtype), rows)
        us.append(torch.where(on, u, torch.ones_like(u)))
    return us


@torch.no_grad()
def conditional(pc, x, missing, target_vars=None, soft_evidence=None) -> torch.Tensor:
    """Posterior of each target variable given the evidence: `[B, num_targets, K]` (see module doc)."""
    if any(not v.dist.discrete for v in input_views(pc)):
        raise ValueError(
            "conditional supports discrete input distributions only (this circuit has continuous inputs)"
        )
    x, missing = _prepare(pc, x, missing)
    views = input_views(pc)
    k = _max_values(views)
    bsz = x.shape[0]
    targets = (
        torch.arange(pc.num_vars, device=pc.device)
        if target_vars is None
        else torch.as_tensor(target_vars, dtype=torch.long, device=pc.device).reshape(-1)
    )
    if targets.numel() and (targets.min() < 0 or targets.max() >= pc.num_vars):
        raise ValueError(f"target_vars must lie in 0..{pc.num_vars - 1}")
    node_mars, element_mars = pc.forward_mars(x, missing, validate=False)
    lam = torch.ones(bsz, pc.num_vars, k, dtype=torch.float64, device=pc.device)
    us = [torch.ones(1, 1, dtype=torch.float64, device=pc.device)] * len(views)
    if soft_evidence is not None:
        lam, has = _soft_tensor(soft_evidence, bsz, pc.num_vars, k, pc.device)
        use = missing & has[None, :]
        us = _apply_soft(pc, views, node_mars, lam, use)
        rerun_inner_layers(pc, node_mars, element_mars)
        lam = torch.where(use[:, :, None], lam, torch.ones_like(lam))
    if not torch.isfinite(node_mars[pc.plan.root_row]).all():
        raise ValueError("the evidence has probability zero for some example")
    set_marginals(pc, node_mars, element_mars)
    flows = pc.backward_flows(accumulate_params=False)
    out = torch.zeros(bsz, pc.num_vars, k, device=pc.device, dtype=torch.float64)
    for v, u in zip(views, us):
        probs = v.dist.value_probs(v.params).double()  # [n, Kd]
        kd = probs.shape[1]
        f = flows[v.rows].double()
        f = torch.where(u > 0, f / u, torch.zeros_like(f))  # [n, B]; a ruled-out node has no flow
        contrib = f[:, :, None] * probs[:, None, :] * lam[:, v.vars, :kd].permute(1, 0, 2)  # [n, B, Kd]
        padded = torch.zeros(contrib.shape[0], bsz, k, device=pc.device, dtype=torch.float64)
        padded[:, :, :kd] = contrib
        out.index_add_(1, v.vars, padded.permute(1, 0, 2))
    out = out / out.sum(2, keepdim=True).clamp_min(1e-300)
    observed = torch.nn.functional.one_hot(x.long().clamp(0, k - 1), k).double()
    out = torch.where(missing[:, :, None], out, observed)
    return out[:, targets].float()
