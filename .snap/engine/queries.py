"""Queries on a compiled circuit: conditionals, sampling and MPE.

- `conditional`: p(x_v | observed) for every missing discrete variable, from ONE forward and ONE
  flows pass: the flow into input node n times its probability of value k, summed over the
  variable's input nodes, is the posterior of x_v = k.
- `sample`: top-down ancestral sampling; each sum picks a child with probability proportional to
  w_nc * p_c(evidence), so samples follow p(x_missing | x_observed).
- `mpe`: the forward pass in the max-product semiring, then a top-down argmax; exact MAP on
  deterministic circuits.

The top-down selection walks the plan's own backward steps (`LayerPlan.backward_steps`).
"""

from __future__ import annotations

import torch


def _prepare(pc, x, missing, num_rows: int | None = None):
    if x is None:
        if num_rows is None:
            raise ValueError("x is required")
        x = torch.zeros(num_rows, pc.num_vars, dtype=torch.long)
        missing = torch.ones_like(x, dtype=torch.bool)
    x = torch.as_tensor(x)
    if x.dim() == 1:  # one example given as a vector
        x = x[None]
        missing = None if missing is None else torch.as_tensor(missing).reshape(1, -1)
    if missing is None:
        missing = torch.zeros(x.shape, dtype=torch.bool)
    return pc.check_data(x.to(pc.device), torch.as_tensor(missing).to(pc.device))


@torch.no_grad()
def conditional(pc, x, missing, target_vars=None, soft_evidence=None) -> torch.Tensor:
    """Posterior of each target variable (default: all) given hard evidence (`x` where `missing` is
    False) and optional soft evidence: `[B, num_targets, K]`, K = most categories; observed
    variables get a one-hot row. One forward and one flows pass (see `engine.evidence`)."""
    from engine import evidence

    return evidence.conditional(pc, x, missing, target_vars, soft_evidence)


def _select_children(pc, table, sel, elem_sel, element_mars, choose) -> None:
    """Mark in `elem_sel` the child that `choose(logits) -> index` picks for each selected sum node."""
    for pt in table.parts:
        pos, s = sel[pt.node_idx].nonzero(as_tuple=True)
        if pos.numel() == 0:
            continue
        blk, i = pos // pt.block_size, pos % pt.block_size
        logw = pt.weights(pc.params)[blk, i].clamp_min(0).log()  # [P, width*bs]
        rows = pt.child_idx[blk]  # [P, width*bs]
        k = choose(logw + element_mars[rows, s[:, None]])
        elem_sel[rows.gather(1, k[:, None]).squeeze(1), s] = True


def _select_factors(table, sel, elem_sel) -> None:
    """Select every factor of each selected product."""
    for pt in table.parts:
        es = elem_sel[pt.elem_rows]  # [n, B]
        w = pt.child_rows.shape[1]
        cnt = torch.zeros(sel.shape, dtype=torch.int32, device=sel.device)
        cnt.index_add_(0, pt.child_rows.reshape(-1), es.repeat_interleave(w, 0).int())
        sel |= cnt > 0


def _top_down(pc, node_mars, element_mars, choose) -> torch.Tensor:
    """Select one child per active sum node (`choose(logits) -> index`); returns node selection [R, B]."""
    sel = torch.zeros(node_mars.shape, dtype=torch.bool, device=pc.device)
    sel[pc.plan.root_row] = True
    elem_sel = torch.zeros(element_mars.shape, dtype=torch.bool, device=pc.device)
    for step in pc.plan.backward_steps(inputs=False):
        table = pc.tables.layers[step.layer.index]
        if step.pass_name == "recompute":
            pc.backend.prod_forward(table, node_mars, element_mars)
            elem_sel.zero_()
        elif step.layer.kind == "sum":
            _select_children(pc, table, sel, elem_sel, element_mars, choose)
        else:
            _select_factors(table, sel, elem_sel)
    sel[0] = False
    return sel


def _fill_inputs(pc, sel, x, missing, pick) -> torch.Tensor:
    out = x.clone().double()
    for inp in pc.input_layers:
        node, s = sel[inp.rows].nonzero(as_tuple=True)
        vars_ = inp.vars[node]
        values = pick(inp.dist, inp.params[node]).double()
        fill = missing[s, vars_]
        out[s[fill], vars_[fill]] = values[fill]
    return out if any(not d.discrete for d in pc.input_dists) else out.long()


@torch.no_grad()
def sample(pc, num_samples: int, x=None, missing=None) -> torch.Tensor:
    """`[num_samples, num_vars]` samples; with `x` ([1 or num_samples, V]) missing entries are drawn
    from p(missing | observed) and observed entries are kept."""
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if x is not None:
        x = torch.as_tensor(x)
        if x.dim() == 1:
            x = x[None]
            missing = None if missing is None else torch.as_tensor(missing).reshape(1, -1)
        if x.dim() == 2 and x.shape[0] == 1:
            x = x.expand(num_samples, -1)
            missing = None if missing is None else torch.as_tensor(missing).expand(num_samples, -1)
        elif x.dim() != 2 or x.shape[0] != num_samples:
            raise ValueError(f"x must have 1 or num_samples={num_samples} rows, got shape {tuple(x.shape)}")
    x, missing = _prepare(pc, x, missing, num_samples)
    node_mars, element_mars = pc.forward_mars(x, missing, validate=False)

    def gumbel_argmax(logits):
        g = -torch.log(-torch.log(torch.rand_like(logits).clamp(1e-20, 1.0)))
        return (logits + g).argmax(1)

    sel = _top_down(pc, node_mars, element_mars, gumbel_argmax)
    return _fill_inputs(pc, sel, x, missing, lambda d, p: d.sample(p))


@torch.no_grad()
def mpe(pc, x=None, missing=None, num_rows: int = 1) -> torch.Tensor:
    """Max-product completion of the missing entries `[B, num_vars]` (observed entries kept)."""
    x, missing = _prepare(pc, x, missing, num_rows)
    node_mars, element_mars = pc.forward_mars(x, missing, validate=False, semiring="max")
    sel = _top_down(pc, node_mars, element_mars, lambda logits: logits.argmax(1))
    return _fill_inputs(pc, sel, x, missing, lambda d, p: d.mode(p)[0])
