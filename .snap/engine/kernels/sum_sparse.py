"""Sparse sum kernels for partitions too irregular for tiles (block size < 16: tl.dot needs >= 16).

They work per node and per edge, with no matmul:
- forward: one program per (node, batch tile) walks the node's `width * bs` children in chunks of
  CH with an online max-shift; reads width*bs*BB child values, writes BB node values.
- element flows: child-major CSR over the real edges (built from the plan): one program per
  (element row, batch tile) does an online log-sum-exp of log w + log f_n - v_n over its parents,
  then writes exp(lse + el) (read-modify-write; no atomics).
- parameter flows: one program per chunk of CH edges reduces exp(log f_n - v_n + el_c) over the
  batch, then adds w * sum into the parameter flows (each edge owned by one program).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.executor.torch_ops import SumPartitionTensors
from engine.kernels.options import KernelOptions

TINY = tl.constexpr(1.2e-38)  # smallest normal float32 is 1.18e-38; Triton types 1e-38 as float64


@triton.jit
def _sum_fwd_sparse_kernel(
    prm,
    emars,
    nmars,
    node_idx,
    child_idx,
    B,
    L,
    param_off,
    num_bt,
    BS: tl.constexpr,
    CH: tl.constexpr,
    BB: tl.constexpr,
):
    pid = tl.program_id(0)
    node = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    blk = node // BS
    m = tl.full([BB], float("-inf"), tl.float32)
    acc = tl.zeros([BB], dtype=tl.float32)
    for c0 in range(0, L, CH):
        cc = c0 + tl.arange(0, CH)
        cm = cc < L
        crow = tl.load(child_idx + blk.to(tl.int64) * L + cc, mask=cm, other=0)
        w = tl.load(prm + param_off + node.to(tl.int64) * L + cc, mask=cm, other=0.0)
        el = tl.load(
            emars + crow[:, None] * B + offs_b[None, :],
            mask=cm[:, None] & bmask[None, :],
            other=float("-inf"),
        )  # read CH * BB child values
        m_new = tl.maximum(m, tl.max(el, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.sum(w[:, None] * tl.exp(el - m_safe[None, :]), 0)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    row = tl.load(node_idx + node)
    tl.store(nmars + row * B + offs_b, tl.log(acc) + m, mask=bmask)  # write BB node values


@triton.jit
def _sum_bwd_elem_sparse_kernel(
    prm, emars, nmars, nflows, eflows, crows, ptr, e_node, e_param, B, num_bt, BB: tl.constexpr
):
    pid = tl.program_id(0)
    c = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    start = tl.load(ptr + c)
    end = tl.load(ptr + c + 1)
    m = tl.full([BB], float("-inf"), tl.float32)
    acc = tl.zeros([BB], dtype=tl.float32)
    for e in range(start, end):  # parents of this element row: reads 2 * BB node values each
        n = tl.load(e_node + e)
        w = tl.load(prm + tl.load(e_param + e))
        v = tl.load(nmars + n * B + offs_b, mask=bmask, other=0.0)
        f = tl.load(nflows + n * B + offs_b, mask=bmask, other=0.0)
        ninf = tl.full(f.shape, float("-inf"), tl.float32)  # a python -inf in where() becomes fp64 on 3.6
        t = tl.where(f > 0, tl.log(tl.maximum(f, TINY)) - v + tl.log(tl.maximum(w, TINY)), ninf)
        t = tl.where(w > 0, t, ninf)
        m_new = tl.maximum(m, t)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.exp(t - m_safe)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    row = tl.load(crows + c)
    el = tl.load(emars + row * B + offs_b, mask=bmask, other=float("-inf"))
    old = tl.load(eflows + row * B + offs_b, mask=bmask, other=0.0)
    tl.store(eflows + row * B + offs_b, old + tl.exp(tl.log(acc) + m + el), mask=bmask)


@triton.jit
def _sum_bwd_param_sparse_kernel(
    prm,
    pflows,
    emars,
    nmars,
    nflows,
    e_node,
    e_child,
    e_param,
    E,
    B,
    CH: tl.constexpr,
    BB: tl.constexpr,
    EXP_CLAMP: tl.constexpr,
):
    ee = tl.program_id(0) * CH + tl.arange(0, CH)
    em = ee < E
    n = tl.load(e_node + ee, mask=em, other=0)
    c = tl.load(e_child + ee, mask=em, other=0)
    p = tl.load(e_param + ee, mask=em, other=0)
    acc = tl.zeros([CH], dtype=tl.float32)
    for b0 in range(0, B, BB):
        offs_b = b0 + tl.arange(0, BB)
        m2 = em[:, None] & (offs_b < B)[None, :]
        v = tl.load(nmars + n[:, None] * B + offs_b[None, :], mask=m2, other=0.0)
        f = tl.load(nflows + n[:, None] * B + offs_b[None, :], mask=m2, other=0.0)
        el = tl.load(emars + c[:, None] * B + offs_b[None, :], mask=m2, other=float("-inf"))
        t = tl.minimum(tl.log(tl.maximum(f, TINY)) - v + el, EXP_CLAMP)
        acc += tl.sum(tl.where(f > 0, tl.exp(t), 0.0), 1)
    w = tl.load(prm + p, mask=em, other=0.0)
    tl.store(pflows + p, tl.load(pflows + p, mask=em, other=0.0) + w * acc, mask=em)


# ----------------------------------------------------------------------------------- launchers
def sum_forward_sparse(pt, params, element_mars, node_mars, opts: KernelOptions) -> None:
    B = element_mars.shape[1]
    nbt = triton.cdiv(B, opts.block_b)
    L = pt.width * pt.block_size
    _sum_fwd_sparse_kernel[(pt.num_node_blocks * pt.block_size * nbt,)](
        params,
        element_mars,
        node_mars,
        pt.node_idx,
        pt.child_idx,
        B,
        L,
        pt.param_offset,
        nbt,
        BS=pt.block_size,
        CH=opts.sparse_children,
        BB=opts.block_b,
        num_warps=opts.num_warps,
    )


def sum_backward_sparse(
    pt,
    params,
    element_mars,
    node_mars,
    node_flows,
    element_flows,
    param_flows,
    opts: KernelOptions,
    exp_clamp: float,
) -> None:
    B = element_mars.shape[1]
    nbt = triton.cdiv(B, opts.block_b)
    nc = pt.crows.shape[0]
    if nc:
        _sum_bwd_elem_sparse_kernel[(nc * nbt,)](
            params,
            element_mars,
            node_mars,
            node_flows,
            element_flows,
            pt.crows,
            pt.cptr,
            pt.e_node_c,
            pt.e_param_c,
            B,
            nbt,
            BB=opts.block_b,
            num_warps=opts.num_warps,
        )
    E = pt.e_node.shape[0]
    if E:
        _sum_bwd_param_sparse_kernel[(triton.cdiv(E, opts.sparse_children),)](
            params,
            param_flows,
            element_mars,
            node_mars,
            node_flows,
            pt.e_node,
            pt.e_child,
            pt.e_param,
            E,
            B,
            CH=opts.sparse_children,
            BB=opts.block_b,
            EXP_CLAMP=exp_clamp,
            num_warps=opts.num_warps,
        )


@dataclass
class SparseSumTensors(SumPartitionTensors):
    """A sum partition run per node and per edge: its real edges node-major and child-major."""

    e_node: torch.Tensor  # [E] node row of each real edge (node-major)
    e_child: torch.Tensor  # [E] element row
    e_param: torch.Tensor  # [E] index into the flat params
    crows: torch.Tensor  # [nc] element rows with a real parent
    cptr: torch.Tensor  # [nc + 1] CSR pointers into e_node_c / e_param_c
    e_node_c: torch.Tensor  # [E] child-major node rows
    e_param_c: torch.Tensor  # [E] child-major param indices


def sparse_tensors(pt: SumPartitionTensors, first_real_row: int, long) -> SparseSumTensors:
    """The sparse kernels' tables for one partition (`long`: makes a device long tensor)."""
    edges = {k: long(v) for k, v in sparse_edges(pt, first_real_row).items()}
    return SparseSumTensors(**vars(pt), **edges)


def sparse_edges(pt, first_real_row: int) -> dict[str, torch.Tensor]:
    """Real edges of a partition, node-major (param kernel) and a child-major CSR (element kernel)."""
    nb, bs, L = pt.num_node_blocks, pt.block_size, pt.width * pt.block_size
    child = pt.child_idx.cpu()[:, None, :].expand(nb, bs, L).reshape(-1)
    node = pt.node_idx.cpu()[:, None].expand(nb * bs, L).reshape(-1)
    param = pt.param_offset + torch.arange(nb * bs * L)
    keep = child >= first_real_row
    node, child, param = node[keep], child[keep], param[keep]
    order = torch.argsort(child * (nb * bs * L) + (param - pt.param_offset), stable=True)
    crows, counts = torch.unique_consecutive(child[order], return_counts=True)
    ptr = torch.zeros(crows.numel() + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(counts, 0)
    return {
        "e_node": node,
        "e_child": child,
        "e_param": param,
        "crows": crows,
        "cptr": ptr,
        "e_node_c": node[order],
        "e_param_c": param[order],
    }
