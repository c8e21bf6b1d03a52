"""Pure PyTorch execution of one partition: the CPU path and the reference for the GPU kernels.

Shapes: `node_mars, node_flows: [num_node_rows, B]`, `element_mars, element_flows:
[num_element_rows, B]`, a sum partition's tile params viewed as `W: [nb, bs, width * bs]`
(node i of a block, then child block k, then child j inside it). Values are log-probabilities;
flows are probabilities in [0, 1] (normalised per example: the root's flow is 1), computed with
max-shifts in log space so nothing overflows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EXP_CLAMP = 80.0  # exp(80) ~ 5.5e34 < float32 max: guards parameter flows of ~0 weights


@dataclass
class SumPartitionTensors:
    block_size: int
    num_node_blocks: int
    width: int
    param_offset: int
    node_idx: torch.Tensor  # [nb * bs] node_mars rows written
    child_idx: torch.Tensor  # [nb, width * bs] element_mars rows read

    @property
    def num_params(self) -> int:
        return self.num_node_blocks * self.width * self.block_size**2

    def weights(self, params: torch.Tensor) -> torch.Tensor:
        """This partition's slice of the flat params as `[nb, bs, width * bs]`."""
        nb, bs = self.num_node_blocks, self.block_size
        return params[self.param_offset : self.param_offset + self.num_params].view(nb, bs, -1)


@dataclass
class ProdPartitionTensors:
    elem_rows: torch.Tensor  # [n] element_mars rows written
    child_rows: torch.Tensor  # [n, width] node_mars rows multiplied (padding: row 0 = log 1)


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def sum_forward(pt: SumPartitionTensors, params, element_mars, node_mars) -> None:
    """node_mars[nodes] = log sum_c w_nc exp(element_mars[c]): max-shift, exp, bmm, log."""
    el = element_mars[pt.child_idx]  # read nb * width * bs values per example
    m = _finite_or_zero(el.amax(1, keepdim=True))
    out = torch.bmm(pt.weights(params), (el - m).exp()).log() + m  # write nb * bs per example
    node_mars[pt.node_idx] = out.reshape(-1, el.shape[-1])


def sum_backward(
    pt: SumPartitionTensors, params, element_mars, node_mars, node_flows, element_flows, param_flows
):
    """Element flows += w_nc f_n p_c / p_n; parameter flows += the same summed over the batch."""
    el = element_mars[pt.child_idx]  # [nb, width*bs, B]
    nb, bs = pt.num_node_blocks, pt.block_size
    v = node_mars[pt.node_idx].view(nb, bs, -1)
    f = node_flows[pt.node_idx].view(nb, bs, -1)
    u = torch.where(f > 0, f.clamp_min(1e-38).log() - v, torch.full_like(v, -torch.inf))
    mu = _finite_or_zero(u.amax(1, keepdim=True))
    a = (u - mu).exp()  # [nb, bs, B]
    w = pt.weights(params)
    s = torch.bmm(w.transpose(1, 2), a)  # [nb, width*bs, B]
    contrib = (s.log() + el + mu).exp()
    element_flows.index_add_(0, pt.child_idx.reshape(-1), contrib.reshape(-1, el.shape[-1]))
    g = torch.bmm(a, (el + mu).clamp(max=EXP_CLAMP).exp().transpose(1, 2))  # [nb, bs, width*bs]
    pt.weights(param_flows).add_(w * g)


def prod_forward(pt: ProdPartitionTensors, node_mars, element_mars) -> None:
    """element_mars[e] = sum of its children's log-values (read width rows, write one)."""
    element_mars[pt.elem_rows] = node_mars[pt.child_rows].sum(1)


def prod_backward(pt: ProdPartitionTensors, element_flows, node_flows) -> None:
    """Each child of a product receives the product's flow."""
    f = element_flows[pt.elem_rows]  # [n, B]
    for k in range(pt.child_rows.shape[1]):  # one scatter per factor: no [n * width, B] copy
        node_flows.index_add_(0, pt.child_rows[:, k], f)


def sum_em_update(pt: SumPartitionTensors, params, param_flows, mask, step_size: float, pseudocount: float):
    """EM on one partition: normalise flows (+ pseudocount spread over real children) per node."""
    w, pf, mk = pt.weights(params), pt.weights(param_flows), pt.weights(mask).to(params.dtype)
    degree = mk.sum(2, keepdim=True).clamp_min(1)
    counts = (pf + pseudocount / degree) * mk
    new = counts / counts.sum(2, keepdim=True).clamp_min(1e-30)
    keep = counts.sum(2, keepdim=True) <= 1e-30  # no flow and no pseudocount: keep old weights
    w.copy_(torch.where(keep, w, (1 - step_size) * w + step_size * new))


def sum_forward_max(
    pt: SumPartitionTensors, params, element_mars, node_mars, chunk_elems: int = 1 << 24
) -> None:
    """Max-product: node_mars[nodes] = max_c (log w_nc + element_mars[c]) (for MPE)."""
    logw = pt.weights(params).clamp_min(0).log()  # [nb, bs, width*bs]; padding -> -inf
    bsz = element_mars.shape[1]
    per_block = logw.shape[1] * logw.shape[2] * bsz
    step = max(1, chunk_elems // max(per_block, 1))
    out = []
    for s in range(0, pt.num_node_blocks, step):
        el = element_mars[pt.child_idx[s : s + step]]  # [c, width*bs, B]
        out.append((logw[s : s + step, :, :, None] + el[:, None]).amax(2))
    node_mars[pt.node_idx] = torch.cat(out).reshape(-1, bsz)
