"""Block-sparse sum kernels: each partition runs as padded `bs x bs` tiles on the tensor cores.

Layouts (see engine/executor/torch_ops.py): `element_mars, node_mars: [rows, B]` (B contiguous),
a partition's params `W: [nb, bs, width * bs]` at `param_offset` of the flat vector, `child_rows:
[nb, width]` first element row of each child block (padding -> row 0, which is -inf), `node_rows:
[nb]` first node row of each node block.

Three kernels, one launcher each, and the reference they are tested against is the same-named
function in torch_ops:
- forward: log-sum-exp as an *online* max-shift over the width child blocks (one read of each child
  tile), exp, matmul with the weight tile, log.
- element flows: *child-major* (a CSR of (node block, k) parents per child block built from the plan),
  so every child tile is written by exactly one program: no atomics, deterministic.
- parameter flows: one program per (node block, child block) tile reduces over the whole batch with
  tl.dot, then adds `W * acc` into the parameter flows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.options import KernelOptions

NEG_INF = float("-inf")

TINY = tl.constexpr(1.2e-38)  # smallest normal float32 is 1.18e-38; Triton types 1e-38 as float64

@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b in float32 accumulation; PREC picks tf32x3 / ieee / tf32 / bf16 operands."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _node_scale(nmars, nflows, n0, B, offs_b, bmask, BS: tl.constexpr):
    """For node block rows n0..n0+BS: a = exp(u - mu), u = log f - v, mu = max_n u (finite or 0).

    Reads 2 * BS * BB floats (values and flows of the node block)."""
    r = tl.arange(0, BS)
    ptr = (n0 + r)[:, None] * B + offs_b[None, :]
    v = tl.load(nmars + ptr, mask=bmask[None, :], other=0.0)
    f = tl.load(nflows + ptr, mask=bmask[None, :], other=0.0)
    ninf = tl.full(f.shape, float("-inf"), tl.float32)  # a python -inf in where() becomes fp64 on 3.6
    u = tl.where(f > 0, tl.log(tl.maximum(f, TINY)) - v, ninf)
    mu = tl.max(u, 0)
    mu = tl.where(mu == float("-inf"), 0.0, mu)
    return tl.exp(u - mu[None, :]), mu


@triton.jit
def _sum_fwd_block_kernel(prm, emars, nmars, node_rows, child_rows, B, W, param_off, num_bt,
                          BS: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    r = tl.arange(0, BS)
    wbase = prm + param_off + i.to(tl.int64) * BS * W * BS
    m = tl.full([BB], float("-inf"), tl.float32)
    acc = tl.zeros([BS, BB], dtype=tl.float32)
    for k in range(W):
        c0 = tl.load(child_rows + i * W + k)
        # read BS * BB child values, once
        el = tl.load(emars + (c0 + r)[:, None] * B + offs_b[None, :], mask=bmask[None, :], other=float("-inf"))
        m_new = tl.maximum(m, tl.max(el, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # read the BS x BS weight tile (L2-resident across the batch tiles of this node block)
        w = tl.load(wbase + r[:, None] * (W * BS) + k * BS + r[None, :])
        acc = acc * tl.exp(m - m_safe)[None, :] + _mm(w, tl.exp(el - m_safe[None, :]), PREC)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    n0 = tl.load(node_rows + i)
    # write BS * BB node values
    tl.store(nmars + (n0 + r)[:, None] * B + offs_b[None, :], tl.log(acc) + m[None, :], mask=bmask[None, :])


@triton.jit
def _sum_bwd_elem_block_kernel(prm, emars, nmars, nflows, eflows, node_rows, cblocks, ptr, par_i, par_k,
                               B, W, param_off, num_bt,
                               BS: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    c = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    r = tl.arange(0, BS)
    c0 = tl.load(cblocks + c)
    start = tl.load(ptr + c)
    end = tl.load(ptr + c + 1)
    big_m = tl.full([BB], float("-inf"), tl.float32)
    acc = tl.zeros([BS, BB], dtype=tl.float32)
    for e in range(start, end):  # every parent (node block i, slot k) of this child block
        i = tl.load(par_i + e)
        k = tl.load(par_k + e)
        a, mu = _node_scale(nmars, nflows, tl.load(node_rows + i), B, offs_b, bmask, BS)
        w = tl.load(prm + param_off + i.to(tl.int64) * BS * W * BS + r[:, None] * (W * BS) + k * BS + r[None, :])
        s = _mm(tl.trans(w), a, PREC)  # [child j, batch]
        m_new = tl.maximum(big_m, mu)
        acc = acc * tl.exp(big_m - m_new)[None, :] + s * tl.exp(mu - m_new)[None, :]
        big_m = m_new
    optr = (c0 + r)[:, None] * B + offs_b[None, :]
    el = tl.load(emars + optr, mask=bmask[None, :], other=float("-inf"))
    contrib = tl.exp(tl.log(acc) + el + big_m[None, :])
    # read-modify-write BS * BB flows: partitions of one layer may share children (run in sequence)
    old = tl.load(eflows + optr, mask=bmask[None, :], other=0.0)
    tl.store(eflows + optr, old + contrib, mask=bmask[None, :])


@triton.jit
def _sum_bwd_param_block_kernel(prm, pflows, emars, nmars, nflows, node_rows, child_rows, B, W, param_off,
                                BS: tl.constexpr, BB: tl.constexpr, PREC: tl.constexpr, EXP_CLAMP: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // W
    k = pid % W
    c0 = tl.load(child_rows + i * W + k)
    if c0 > 0:  # padded tiles (child row 0) hold zero weights: nothing to add
        r = tl.arange(0, BS)
        n0 = tl.load(node_rows + i)
        acc = tl.zeros([BS, BS], dtype=tl.float32)
        for b0 in range(0, B, BB):
            offs_b = b0 + tl.arange(0, BB)
            bmask = offs_b < B
            a, mu = _node_scale(nmars, nflows, n0, B, offs_b, bmask, BS)
            el = tl.load(emars + (c0 + r)[:, None] * B + offs_b[None, :], mask=bmask[None, :], other=float("-inf"))
            e = tl.exp(tl.minimum(el + mu[None, :], EXP_CLAMP))
            acc += _mm(a, tl.trans(e), PREC)  # [node n, child j], reduced over the batch
        wptr = param_off + i.to(tl.int64) * BS * W * BS + r[:, None] * (W * BS) + k * BS + r[None, :]
        w = tl.load(prm + wptr)
        # read-modify-write one BS x BS tile of parameter flows
        tl.store(pflows + wptr, tl.load(pflows + wptr) + w * acc)


# ----------------------------------------------------------------------------------- launchers
def sum_forward_block(pt, params, element_mars, node_mars, opts: KernelOptions) -> None:
    """node_mars[nodes] = log sum_c w exp(element_mars[c]) for one tiled partition."""
    B = element_mars.shape[1]
    nbt = triton.cdiv(B, opts.block_b)
    grid = (pt.num_node_blocks * nbt,)
    _sum_fwd_block_kernel[grid](
        params, element_mars, node_mars, pt.node_rows, pt.child_rows, B, pt.width, pt.param_offset, nbt,
        BS=pt.block_size, BB=opts.block_b, PREC=opts.precision, num_warps=opts.num_warps,
    )


def sum_backward_block(pt, params, element_mars, node_mars, node_flows, element_flows, param_flows,
                       opts: KernelOptions, exp_clamp: float) -> None:
    """Element flows (child-major, no atomics) then parameter flows (tile reduction over the batch)."""
    B = element_mars.shape[1]
    nbt = triton.cdiv(B, opts.block_b)
    nc = pt.cblocks.shape[0]
    if nc:
        _sum_bwd_elem_block_kernel[(nc * nbt,)](
            params, element_mars, node_mars, node_flows, element_flows, pt.node_rows, pt.cblocks, pt.cptr,
            pt.par_i, pt.par_k, B, pt.width, pt.param_offset, nbt,
            BS=pt.block_size, BB=opts.block_b, PREC=opts.precision, num_warps=opts.num_warps,
        )
    _sum_bwd_param_block_kernel[(pt.num_node_blocks * pt.width,)](
        params, param_flows, element_mars, node_mars, node_flows, pt.node_rows, pt.child_rows, B, pt.width,
        pt.param_offset, BS=pt.block_size, BB=opts.block_b, PREC=opts.precision, EXP_CLAMP=exp_clamp,
        num_warps=opts.num_warps,
    )


def child_major_blocks(child_rows: torch.Tensor, first_real_row: int):
    """CSR of parents per child block: (cblocks [nc], ptr [nc+1], par_i [nnz], par_k [nnz]).

    Padding slots (child row < first_real_row) are dropped."""
    nb, w = child_rows.shape
    flat = child_rows.reshape(-1).cpu()
    keep = flat >= first_real_row
    slots = torch.arange(nb * w)[keep]
    rows = flat[keep]
    order = torch.argsort(rows * (nb * w) + slots)  # by child row, then slot: a fixed sum order
    rows, slots = rows[order], slots[order]
    cblocks, counts = torch.unique_consecutive(rows, return_counts=True)
    ptr = torch.zeros(cblocks.numel() + 1, dtype=torch.long)
    ptr[1:] = torch.cumsum(counts, 0)
    return cblocks, ptr, slots // w, slots % w
