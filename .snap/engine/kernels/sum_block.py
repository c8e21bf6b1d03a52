"""Block-sparse sum kernels: each partition runs as padded `bs x bs` tiles on the tensor cores.

Layouts (see engine/executor/torch_ops.py): `element_mars, node_mars: [rows, B]` (B contiguous),
a partition's params `W: [nb, bs, width * bs]` at `param_offset` of the flat vector, `child_rows:
[nb, width]` first element row of each child block (padding -> row 0, which is -inf), `node_rows:
[nb]` first node row of each node block.

A node block's `width` child tiles are taken G at a time (G = group_cols // bs, see `group_size`):
one `[bs, G*bs]` weight slab against `[G*bs, BB]` gathered child rows is one larger, better-fed
tl.dot instead of G small ones, and the loop runs G times fewer steps.

Five kernels, and the reference they are tested against is the same-named function in torch_ops:
- forward: log-sum-exp as an *online* max-shift over the child groups (one read of each child
  tile), exp, matmul with the weight slab, log. Node blocks with equal child lists (HCLT: a
  variable's blocks; PD: a region's) run R to a program (`forward_rows`): each child tile is read and
  exponentiated once for R blocks, and the dot has R * bs rows.
- node scale (backward, once per partition): `a = exp(log f - v - mu)` with `mu` the per-column max
  over the node block (or over its row group, `flow_rows`), written to a scratch `[nb * bs, B]`
  (+ `mu: [nb, B]`): both flow kernels read it instead of re-deriving it from values and flows for
  every child tile (one read, no log/exp).
- element flows: *child-major* (a CSR of (node block, k) parents per child block built from the plan),
  so every child tile is written by exactly one program: no atomics, deterministic. G parents at a
  time, rescaled to an online common max. A partition that is the only reader of every row of the product
  layer below (`sole_writer`, see backend.mark_sole_writer) stores its flows outright: the layer's
  rows need no zeroing and no read-back.
- element flows *parent-set-major* (`KernelOptions.elem_sets`): child blocks whose parent lists are
  equal (PD: every product block of a region under that region's sum blocks) form a set; a program
  takes a run of them, reads and rescales the P parents' scale tiles once, and loops over its child
  blocks with one `[bs, P*bs] @ [P*bs, BB]` dot each, instead of re-reading the parents per child block.
  Used where P * bs <= `elem_set_max_rows` (and, at block sizes <= `elem_set_split`, for wider sets
  as launches over slices of the parents that add their flows), with the batch tile cut so the slab
  holds at most `elem_set_slab` floats (registers); still one writer per launch and child tile.
- parameter flows: one program per (node block, or row group of `flow_rows` blocks sharing one
  node-scale max; group of G child blocks) reduces over the whole batch with tl.dot, then adds
  `W * acc` into the parameter flows.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from engine.executor.torch_ops import SumPartitionTensors
from engine.kernels.options import ELEM_SETS, FWD_ROWS, KernelOptions

FWD_MAX_ROWS = 128  # rows of a row-grouped tile (R * block size, forward and flows): 4 x 64 ran 2x slower
SET_MAX_ROWS = 512  # parent-set tables are built up to this many parent rows (P * bs); options pick below
TINY = tl.constexpr(1.2e-38)  # smallest normal float32 is 1.18e-38; Triton types 1e-38 as float64


@triton.jit
def _mm(a, b, PREC: tl.constexpr):
    """a @ b in float32 accumulation; PREC picks tf32x3 / ieee / tf32 / bf16 operands."""
    if PREC == "bf16":
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _tf32_split(x):
    """(hi, lo) with hi = x rounded to tf32's 10 mantissa bits (to nearest, ties away from zero; exact
    as a tf32 operand) and lo = x - hi (exact in float32): the operand split of tf32x3, for an operand
    reused across dots. Rounding, not truncation, keeps |lo| <= 2^-11 |x| and unbiased in sign (a
    review's model of the tensor core: mean relative error -2.7e-7 truncated, 2e-11 rounded). For
    finite x (the slab and the weights lie in [0, 1])."""
    hi = ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def _mm_presplit(a, b_hi, b_lo):
    """a @ b as tf32x3's three tf32 MMAs (small terms first), b split once by the caller."""
    a_hi, a_lo = _tf32_split(a)
    acc = tl.dot(a_lo, b_hi, input_precision="tf32")
    acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


@triton.jit
def _row_group(groups, g, R: tl.constexpr, BS: tl.constexpr):
    """Rows of row group g (`groups[g]`: R node blocks sharing one child list, -1 padding), as the
    grouped forward, node scale and parameter flows tile them: (block of each row, its row within
    the block, real-row mask), `[R * BS]` each; padded rows point at the group's first block."""
    rr = tl.arange(0, R * BS)
    blk = tl.load(groups + g * R + rr // BS)
    return tl.maximum(blk, 0), rr % BS, blk >= 0


@triton.jit
def _sum_fwd_block_kernel(
    prm,
    emars,
    nmars,
    node_rows,
    child_rows,
    B,
    W,
    param_off,
    num_bt,
    groups,
    BS: tl.constexpr,
    BB: tl.constexpr,
    G: tl.constexpr,
    PREC: tl.constexpr,
    R: tl.constexpr,
):
    """R == 1: program (node block i, batch tile). R > 1: program (row group g, batch tile), the
    group's up-to-R node blocks (`groups[g]`, -1 padding) sharing one child list, as one `[R * BS,
    BB]` tile: each child tile is read and exponentiated once for R blocks, and the dot has R * BS rows."""
    pid = tl.program_id(0)
    g = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    q = tl.arange(0, G * BS)  # column of the weight slab = (child block k0 + q // BS, child q % BS)
    if R == 1:
        i = g
        r = tl.arange(0, BS)
        rmask = r < BS
        wrow = prm + param_off + i.to(tl.int64) * BS * W * BS + r * (W * BS)
        nrow = tl.load(node_rows + i) + r
    else:
        blk, r, rmask = _row_group(groups, g, R, BS)
        i = tl.load(groups + g * R)
        wrow = prm + param_off + blk.to(tl.int64) * BS * W * BS + r * (W * BS)
        nrow = tl.load(node_rows + blk) + r
    m = tl.full([BB], float("-inf"), tl.float32)
    acc = tl.zeros([R * BS, BB], dtype=tl.float32)
    for k0 in range(0, W, G):
        kk = k0 + q // BS
        kmask = kk < W
        c0 = tl.load(child_rows + i * W + kk, mask=kmask, other=0)
        # read G * BS * BB child values, once
        el = tl.load(
            emars + (c0 + q % BS)[:, None] * B + offs_b[None, :],
            mask=kmask[:, None] & bmask[None, :],
            other=float("-inf"),
        )
        m_new = tl.maximum(m, tl.max(el, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # the R*BS x G*BS weight slab (L2-resident across the batch tiles of these node blocks)
        w = tl.load(wrow[:, None] + (k0 * BS + q)[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = acc * tl.exp(m - m_safe)[None, :] + _mm(w, tl.exp(el - m_safe[None, :]), PREC)
        m = m_new
    m = tl.where(m == float("-inf"), 0.0, m)
    # write R * BS * BB node values
    tl.store(
        nmars + nrow[:, None] * B + offs_b[None, :],
        tl.log(acc) + m[None, :],
        mask=rmask[:, None] & bmask[None, :],
    )


@triton.jit
def _node_scale_kernel(
    nmars,
    nflows,
    node_rows,
    scale,
    mus,
    B,
    num_bt,
    groups,
    BS: tl.constexpr,
    BB: tl.constexpr,
    R: tl.constexpr,
):
    """scale[i*BS + n] = exp(u - mu), u = log f - v, mu = max_n u (finite or 0); mus[i] = mu. R > 1:
    program per row group (`groups[g]`, -1 padding), mu the max over all its blocks' rows, stored for
    each of them (so the parameter flows of a group may share one exp of the child values)."""
    pid = tl.program_id(0)
    g = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    if R == 1:
        r = tl.arange(0, BS)
        blk = tl.zeros([BS], dtype=tl.int64) + g
        rmask = r < BS
        nrow = tl.load(node_rows + g) + r
    else:
        blk, r, rmask = _row_group(groups, g, R, BS)
        nrow = tl.load(node_rows + blk) + r
    m2 = rmask[:, None] & bmask[None, :]
    ptr = nrow[:, None] * B + offs_b[None, :]
    v = tl.load(nmars + ptr, mask=m2, other=0.0)
    f = tl.load(nflows + ptr, mask=m2, other=0.0)
    ninf = tl.full(f.shape, float("-inf"), tl.float32)  # a python -inf in where() becomes fp64 on 3.6
    u = tl.where((f > 0) & m2, tl.log(tl.maximum(f, TINY)) - v, ninf)
    mu = tl.max(u, 0)
    mu = tl.where(mu == float("-inf"), 0.0, mu)
    tl.store(
        scale + (blk * BS + r).to(tl.int64)[:, None] * B + offs_b[None, :],
        tl.exp(u - mu[None, :]),
        mask=m2,
    )
    if R == 1:
        tl.store(mus + g.to(tl.int64) * B + offs_b, mu, mask=bmask)
    else:
        first = rmask & (r == 0)  # one row per block writes the block's mu
        tl.store(
            mus + blk.to(tl.int64)[:, None] * B + offs_b[None, :],
            tl.zeros([R * BS, BB], dtype=tl.float32) + mu[None, :],
            mask=first[:, None] & bmask[None, :],
        )


@triton.jit
def _sum_bwd_elem_block_kernel(
    prm,
    emars,
    scale,
    mus,
    eflows,
    cblocks,
    ptr,
    par_i,
    par_k,
    B,
    W,
    param_off,
    num_bt,
    BS: tl.constexpr,
    BB: tl.constexpr,
    G: tl.constexpr,
    PREC: tl.constexpr,
    ACCUM: tl.constexpr,
):
    pid = tl.program_id(0)
    c = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    r = tl.arange(0, BS)
    q = tl.arange(0, G * BS)  # (parent slot q // BS, its node q % BS)
    c0 = tl.load(cblocks + c)
    start = tl.load(ptr + c)
    end = tl.load(ptr + c + 1)
    g = tl.arange(0, G)
    big_m = tl.full([BB], float("-inf"), tl.float32)
    acc = tl.zeros([BS, BB], dtype=tl.float32)
    for e0 in range(start, end, G):  # G parents (node block i, slot k) of this child block at a time
        # their node-block maxima [G, BB], folded into an online common max (as the forward pass)
        gmask = (e0 + g) < end
        ig = tl.load(par_i + e0 + g, mask=gmask, other=0)
        mu = tl.load(
            mus + ig[:, None] * B + offs_b[None, :], mask=gmask[:, None] & bmask[None, :], other=float("-inf")
        )
        m_new = tl.maximum(big_m, tl.max(mu, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.reshape(
            tl.broadcast_to(tl.exp(mu - m_safe[None, :])[:, None, :], (G, BS, BB)), (G * BS, BB)
        )
        eq = e0 + q // BS
        emask = eq < end
        iq = tl.load(par_i + eq, mask=emask, other=0)
        kq = tl.load(par_k + eq, mask=emask, other=0)
        a = (
            tl.load(
                scale + (iq * BS + q % BS)[:, None] * B + offs_b[None, :],
                mask=emask[:, None] & bmask[None, :],
                other=0.0,
            )
            * rescale
        )
        # W^T slab [child j, parent node q]: W_i[q % BS, k * BS + j]
        wt = tl.load(
            prm + param_off + (iq * BS * W * BS + (q % BS) * (W * BS) + kq * BS)[None, :] + r[:, None],
            mask=emask[None, :],
            other=0.0,
        )
        acc = acc * tl.exp(big_m - m_safe)[None, :] + _mm(wt, a, PREC)  # [child j, batch]
        big_m = m_new
    big_m = tl.where(big_m == float("-inf"), 0.0, big_m)
    optr = (c0 + r)[:, None] * B + offs_b[None, :]
    el = tl.load(emars + optr, mask=bmask[None, :], other=float("-inf"))
    contrib = tl.exp(tl.log(acc) + el + big_m[None, :])
    if ACCUM:  # read-modify-write: partitions of one layer may share children (run in sequence)
        contrib += tl.load(eflows + optr, mask=bmask[None, :], other=0.0)
    tl.store(eflows + optr, contrib, mask=bmask[None, :])


@triton.jit
def _sum_bwd_elem_sets_kernel(
    prm,
    emars,
    scale,
    mus,
    eflows,
    chunks,
    set_par,
    set_rows,
    set_k,
    B,
    W,
    param_off,
    num_bt,
    P_ALL,
    slot0,
    BS: tl.constexpr,
    BB: tl.constexpr,
    P: tl.constexpr,
    CM: tl.constexpr,
    PREC: tl.constexpr,
    ACCUM: tl.constexpr,
    SPLIT_ONCE: tl.constexpr,
):
    """Element flows of a run of child blocks [lo, hi) that share one parent set (chunk `[lo, hi, set]`):
    its parents in slots [slot0, slot0 + P) of P_ALL have their scale tiles read and rescaled to their
    common max once, then each step of CM child blocks is one `[CM*BS, P*BS] @ [P*BS, BB]` dot against
    that register-held slab. SPLIT_ONCE (tf32x3): the slab's tf32 hi / lo parts are also made once."""
    pid = tl.program_id(0)
    ch = pid // num_bt
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    bmask = offs_b < B
    lo = tl.load(chunks + 3 * ch)
    hi = tl.load(chunks + 3 * ch + 1)
    g = tl.load(chunks + 3 * ch + 2)
    q = tl.arange(0, P * BS)  # (parent slot q // BS, its node q % BS)
    pq = tl.load(set_par + g * P_ALL + slot0 + q // BS)  # -1: no parent in this slot
    pmask = pq >= 0
    pq = tl.where(pmask, pq, 0)
    pb = pmask[:, None] & bmask[None, :]
    mu = tl.load(mus + pq[:, None] * B + offs_b[None, :], mask=pb, other=float("-inf"))
    big_m = tl.max(mu, 0)
    big_m = tl.where(big_m == float("-inf"), 0.0, big_m)
    a = tl.load(scale + (pq * BS + q % BS)[:, None] * B + offs_b[None, :], mask=pb, other=0.0)
    a = a * tl.exp(mu - big_m[None, :])
    if SPLIT_ONCE:  # tf32x3: the slab's hi / lo split once for all child blocks, not per dot
        a_hi, a_lo = _tf32_split(a)
    wq = param_off + pq * (BS * W * BS) + (q % BS) * (W * BS)  # weights of parent node q start here
    j = tl.arange(0, CM * BS)  # (child block c + j // BS, its element j % BS)
    for c in range(lo, hi, CM):
        cj = c + j // BS
        cmask = cj < hi
        if CM == 1:
            kq = tl.load(set_k + c * P_ALL + slot0 + q // BS)  # the child's slot in each parent
            wt = tl.load(prm + (wq + kq * BS)[None, :] + (j % BS)[:, None], mask=pmask[None, :], other=0.0)
        else:
            kq = tl.load(
                set_k + cj[:, None] * P_ALL + slot0 + (q // BS)[None, :], mask=cmask[:, None], other=0
            )
            wt = tl.load(
                prm + wq[None, :] + kq * BS + (j % BS)[:, None],
                mask=cmask[:, None] & pmask[None, :],
                other=0.0,
            )
        if SPLIT_ONCE:
            acc = _mm_presplit(wt, a_hi, a_lo)  # [child element, batch]
        else:
            acc = _mm(wt, a, PREC)
        crow = tl.load(set_rows + cj, mask=cmask, other=0)
        optr = (crow + j % BS)[:, None] * B + offs_b[None, :]
        om = cmask[:, None] & bmask[None, :]
        el = tl.load(emars + optr, mask=om, other=float("-inf"))
        contrib = tl.exp(tl.log(acc) + el + big_m[None, :])
        if ACCUM:
            contrib += tl.load(eflows + optr, mask=om, other=0.0)
        tl.store(eflows + optr, contrib, mask=om)


@triton.jit
def _sum_bwd_param_block_kernel(
    prm,
    pflows,
    emars,
    scale,
    mus,
    child_rows,
    B,
    W,
    param_off,
    num_kg,
    groups,
    BS: tl.constexpr,
    BB: tl.constexpr,
    G: tl.constexpr,
    PREC: tl.constexpr,
    EXP_CLAMP: tl.constexpr,
    R: tl.constexpr,
):
    """R > 1: a row group's blocks (one child list, one node-scale max: `_node_scale_kernel` with the
    same R) as one `[R*BS, G*BS]` tile, each batch step's child values exponentiated once for all."""
    pid = tl.program_id(0)
    g = pid // num_kg
    k0 = (pid % num_kg) * G
    q = tl.arange(0, G * BS)
    kk = k0 + q // BS
    kmask = kk < W
    if R == 1:
        i = g
        r = tl.arange(0, BS)
        blk = tl.zeros([BS], dtype=tl.int64) + g
        rmask = r < BS
    else:
        blk, r, rmask = _row_group(groups, g, R, BS)
        i = tl.load(groups + g * R)
    c0 = tl.load(child_rows + i * W + kk, mask=kmask, other=0)
    if tl.max(c0, 0) > 0:  # padded tiles (child row 0) hold zero weights: nothing to add
        crow = (c0 + q % BS)[:, None] * B
        srow = (blk * BS + r).to(tl.int64)[:, None] * B
        acc = tl.zeros([R * BS, G * BS], dtype=tl.float32)
        for b0 in range(0, B, BB):
            offs_b = b0 + tl.arange(0, BB)
            bmask = offs_b < B
            a = tl.load(scale + srow + offs_b[None, :], mask=rmask[:, None] & bmask[None, :], other=0.0)
            mu = tl.load(mus + i.to(tl.int64) * B + offs_b, mask=bmask, other=0.0)
            el = tl.load(
                emars + crow + offs_b[None, :], mask=kmask[:, None] & bmask[None, :], other=float("-inf")
            )
            e = tl.exp(tl.minimum(el + mu[None, :], EXP_CLAMP))
            acc += _mm(a, tl.trans(e), PREC)  # [node n, child q], reduced over the batch
        wptr = (
            param_off
            + blk.to(tl.int64)[:, None] * BS * W * BS
            + r[:, None] * (W * BS)
            + (k0 * BS + q)[None, :]
        )
        wm = rmask[:, None] & kmask[None, :]
        w = tl.load(prm + wptr, mask=wm, other=0.0)
        # read-modify-write one R*BS x G*BS slab of parameter flows
        tl.store(pflows + wptr, tl.load(pflows + wptr, mask=wm, other=0.0) + w * acc, mask=wm)


# ----------------------------------------------------------------------------------- launchers
def group_size(block_size: int, width: int, group_cols: int) -> int:
    """Child blocks per step: group_cols // bs, a power of two, at most width rounded up, at least 1."""
    g = max(1, group_cols // block_size)
    return min(g, triton.next_power_of_2(max(1, width)))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any fixed number
    return torch.cuda.get_device_properties(device).multi_processor_count


def forward_batch_tile(num_node_blocks: int, B: int, largest: int, device: torch.device) -> int:
    """Batch columns per forward program: `largest`, halved (not below 32) until the partition has
    at least two programs per SM. Wide tiles re-read each weight slab fewer times (PD-128/256 on
    H100: 128 beats 64), but a partition of few node blocks (HCLT-512: 16 a layer) then leaves most
    SMs idle (there 32 beats 64 beats 128; benchmarks/kernel_breakdown.py)."""
    target, bb = 2 * _sm_count(device), largest
    while bb > 32 and num_node_blocks * triton.cdiv(B, bb) < target:
        bb //= 2
    return bb


def forward_rows(pt, opts: KernelOptions) -> tuple[int, int]:
    """(node blocks, largest batch tile) of a block forward program: `fwd_rows_32` blocks at
    `fwd_rows_32_block_b` columns at block size 32, `fwd_rows` at `fwd_rows_block_b` at block sizes
    of at least `fwd_rows_min_block` (the two measured shapes: 4 x 32 and 2 x 64 rows), where the tile
    stays within FWD_MAX_ROWS rows and `row_groups` has a table for it (runs that pad little); else
    one block at `fwd_block_b`."""
    bs = pt.block_size
    if bs == 32:
        r, bb = opts.fwd_rows_32, opts.fwd_rows_32_block_b
    elif bs >= opts.fwd_rows_min_block:
        r, bb = opts.fwd_rows, opts.fwd_rows_block_b
    else:
        r = 1
    if r > 1 and r * bs <= FWD_MAX_ROWS and r in pt.row_groups:
        return r, min(opts.fwd_block_b, bb)
    return 1, opts.fwd_block_b


def flow_rows(pt, opts: KernelOptions) -> int:
    """Node blocks per program of the node scale and the parameter flows (`opts.flow_rows`, where the
    block size lies in `flow_rows_min_block..flow_rows_max_block` and a row-group table exists; else
    1). Both kernels of a partition must agree: the parameter flows share the group's one node-scale max."""
    r, bs = opts.flow_rows, pt.block_size
    ok = opts.flow_rows_min_block <= bs <= opts.flow_rows_max_block and r * bs <= FWD_MAX_ROWS
    return r if ok and r in pt.row_groups else 1


def sum_forward_block(pt, params, element_mars, node_mars, opts: KernelOptions) -> None:
    """node_mars[nodes] = log sum_c w exp(element_mars[c]) for one tiled partition."""
    B = element_mars.shape[1]
    rows, largest = forward_rows(pt, opts)
    groups = pt.row_groups[rows] if rows > 1 else pt.node_rows
    ng = groups.shape[0]
    bb = forward_batch_tile(ng, B, largest, element_mars.device)
    nbt = triton.cdiv(B, bb)
    _sum_fwd_block_kernel[(ng * nbt,)](
        params,
        element_mars,
        node_mars,
        pt.node_rows,
        pt.child_rows,
        B,
        pt.width,
        pt.param_offset,
        nbt,
        groups,
        BS=pt.block_size,
        BB=bb,
        G=group_size(pt.block_size, pt.width, opts.group_cols),
        PREC=opts.precision,
        R=rows,
        num_warps=opts.num_warps,
    )


def sum_backward_block(
    pt,
    params,
    element_mars,
    node_mars,
    node_flows,
    element_flows,
    param_flows,
    opts: KernelOptions,
    exp_clamp: float,
    in_place: bool = False,
    defer: list | None = None,
) -> None:
    """Node scale, element flows (child-major, no atomics), parameter flows (tile reduction over the batch).

    `in_place` (training steps, which read no sum node's flows afterwards): node blocks on contiguous
    rows (`rows_start`, every HCLT and PD partition) write the scale over their own slab of node flows
    instead of a `[nb * bs, B]` scratch: the same kernels (each scale program reads its tile, then
    writes the same addresses), one scratch less at peak. Only then may the parameter flows go to
    `defer` (a list the caller runs later, engine/executor/streams.py): a scratch would not outlive
    this call, node-flow rows do."""
    B = element_mars.shape[1]
    nbt = triton.cdiv(B, opts.block_b)
    bs, nb = pt.block_size, pt.num_node_blocks
    slab = in_place and pt.rows_start >= 0
    if slab:
        scale = node_flows[pt.rows_start : pt.rows_start + nb * bs]
    else:
        scale = torch.empty(nb * bs, B, device=element_mars.device, dtype=element_mars.dtype)
    mus = torch.empty(nb, B, device=element_mars.device, dtype=element_mars.dtype)
    rows = flow_rows(pt, opts)
    groups = pt.row_groups[rows] if rows > 1 else pt.node_rows
    _node_scale_kernel[(groups.shape[0] * nbt,)](
        node_mars,
        node_flows,
        pt.node_rows,
        scale,
        mus,
        B,
        nbt,
        groups,
        BS=bs,
        BB=opts.block_b,
        R=rows,
        num_warps=opts.num_warps,
    )
    nc = pt.cblocks.shape[0]
    sets = nc and opts.elem_sets and pt.set_par is not None
    if sets and (bs <= opts.elem_set_split or pt.set_par.shape[1] * bs <= opts.elem_set_max_rows):
        elem_flows_sets(pt, params, element_mars, scale, mus, element_flows, opts)
    elif nc:
        max_par = pt.max_parents
        ebt = triton.cdiv(B, opts.elem_block_b)
        _sum_bwd_elem_block_kernel[(nc * ebt,)](
            params,
            element_mars,
            scale,
            mus,
            element_flows,
            pt.cblocks,
            pt.cptr,
            pt.par_i,
            pt.par_k,
            B,
            pt.width,
            pt.param_offset,
            ebt,
            BS=bs,
            BB=opts.elem_block_b,
            G=group_size(bs, max_par, opts.group_cols),
            PREC=opts.precision,
            ACCUM=not pt.sole_writer,
            num_warps=opts.num_warps,
        )
    args = (pt, params, element_mars, scale, mus, param_flows, opts, exp_clamp)
    if slab and defer is not None:
        defer.append(functools.partial(param_flows_block, *args))
    else:
        param_flows_block(*args)


def elem_flows_sets(pt, params, element_mars, scale, mus, element_flows, opts: KernelOptions) -> None:
    """Element flows parent-set-major: one program per `opts.elem_sets` child blocks of one parent set
    (`elem_sets_wide` for sets split over launches).

    Sets of more than `elem_set_max_rows` parent rows (block size <= `elem_set_split`) run as launches
    over slices of their parents, each adding its own flows (every set has a parent in slot 0, so the
    first launch covers every child tile and may store outright)."""
    B = element_mars.shape[1]
    bs = pt.block_size
    p_all = pt.set_par.shape[1]
    P = min(p_all, max(1, opts.elem_set_max_rows // bs))
    # sets split over launches take `elem_sets_wide` child blocks a program (0 there: `elem_sets`)
    chunks = pt.set_chunks[(p_all > P and opts.elem_sets_wide) or opts.elem_sets]
    bb = max(16, min(opts.elem_block_b, opts.elem_set_slab // (P * bs)))
    ebt = triton.cdiv(B, bb)
    for slot0 in range(0, p_all, P):
        _sum_bwd_elem_sets_kernel[(chunks.shape[0] * ebt,)](
            params,
            element_mars,
            scale,
            mus,
            element_flows,
            chunks,
            pt.set_par,
            pt.set_rows,
            pt.set_k,
            B,
            pt.width,
            pt.param_offset,
            ebt,
            p_all,
            slot0,
            BS=bs,
            BB=bb,
            P=P,
            CM=max(1, opts.elem_set_rows // bs),
            PREC=opts.precision,
            ACCUM=slot0 > 0 or not pt.sole_writer,
            SPLIT_ONCE=opts.precision == "tf32x3" and bool(opts.elem_split_once),
            num_warps=opts.num_warps,
        )


def param_flows_block(pt, params, element_mars, scale, mus, param_flows, opts, exp_clamp) -> None:
    """param_flows += W * (scale x exp(element_mars + mu)^T), reduced over the batch per weight slab."""
    B = element_mars.shape[1]
    bs = pt.block_size
    g = group_size(bs, pt.width, opts.group_cols)
    nkg = triton.cdiv(pt.width, g)
    rows = flow_rows(pt, opts)
    groups = pt.row_groups[rows] if rows > 1 else pt.node_rows
    _sum_bwd_param_block_kernel[(groups.shape[0] * nkg,)](
        params,
        param_flows,
        element_mars,
        scale,
        mus,
        pt.child_rows,
        B,
        pt.width,
        pt.param_offset,
        nkg,
        groups,
        R=rows,
        BS=bs,
        BB=opts.block_b,
        G=g,
        PREC=opts.precision,
        EXP_CLAMP=exp_clamp,
        num_warps=opts.num_warps,
    )


@dataclass
class BlockSumTensors(SumPartitionTensors):
    """A tiled sum partition: block rows and the child-major CSR of parents per child block."""

    node_rows: torch.Tensor  # [nb] first node row of each node block
    child_rows: torch.Tensor  # [nb, width] first element row of each child block
    cblocks: torch.Tensor  # [nc] child blocks with a real parent
    cptr: torch.Tensor  # [nc + 1] CSR pointers into par_i / par_k
    par_i: torch.Tensor  # [nnz] parent node block
    par_k: torch.Tensor  # [nnz] which child slot of that parent
    max_parents: int
    sole_writer: bool = False  # the only writer of every element row of the product layer below
    rows_start: int = -1  # node_rows[i] == rows_start + i * block_size for all i (contiguous), else -1
    # parent sets (parent_sets); None where P * block_size > SET_MAX_ROWS
    set_par: torch.Tensor | None = None  # [ns, P] parent node blocks of each set, -1 padding
    set_rows: torch.Tensor | None = None  # [nc] first element row of each child block, by set
    set_k: torch.Tensor | None = None  # [nc, P] the child block's slot in each parent of its set
    set_chunks: dict = field(default_factory=dict)  # elem_sets -> [nch, 3] (lo, hi, set) runs
    # R -> [ng, R] runs of consecutive node blocks with equal child lists (-1 padding), R in FWD_ROWS[1:]
    # (PD: a region's sum blocks; HCLT: a variable's), for the row-grouped forward (`forward_rows`) and
    # the row-grouped node scale and parameter flows (`flow_rows`)
    row_groups: dict = field(default_factory=dict)


def block_tensors(
    pt: SumPartitionTensors, node_rows, child_rows, first_real_row: int, long
) -> BlockSumTensors:
    """The tiled kernels' tables for one partition (`long`: makes a device long tensor)."""
    cb, ptr, pi, pk = child_major_blocks(long(child_rows), first_real_row)
    max_parents = int((ptr[1:] - ptr[:-1]).max()) if len(cb) else 1
    rows = torch.as_tensor(node_rows).reshape(-1).cpu()
    contiguous = rows.numel() > 0 and torch.equal(rows - rows[0], torch.arange(rows.numel()) * pt.block_size)
    sets = {}
    if len(cb) and triton.next_power_of_2(max_parents) * pt.block_size <= SET_MAX_ROWS:
        par, srows, sk, chunks = parent_sets(cb, ptr, pi, pk)
        sets = dict(
            set_par=long(par),
            set_rows=long(srows),
            set_k=long(sk),
            set_chunks={n: long(c) for n, c in chunks.items()},
        )
    return BlockSumTensors(
        **vars(pt),
        row_groups={r: long(g) for r, g in row_groups(torch.as_tensor(child_rows).cpu()).items()},
        node_rows=long(node_rows),
        child_rows=long(child_rows),
        cblocks=long(cb),
        cptr=long(ptr),
        par_i=long(pi),
        par_k=long(pk),
        max_parents=max_parents,
        rows_start=int(rows[0]) if contiguous else -1,
        **sets,
    )


def row_groups(child_rows: torch.Tensor, min_fill: float = 0.75) -> dict[int, torch.Tensor]:
    """{R: [ng, R]} the node blocks in runs of at most R consecutive ones with equal child lists
    (`child_rows: [nb, width]`), -1 padding; R in FWD_ROWS[1:], only where the groups are at least
    `min_fill` real blocks (a partition of mostly single blocks would run half-empty tiles) and some
    run is longer than 1."""
    nb = child_rows.shape[0]
    if nb == 0:
        return {}
    change = torch.ones(nb, dtype=torch.bool)
    change[1:] = (child_rows[1:] != child_rows[:-1]).any(1)
    idx = torch.arange(nb)
    run_start = torch.cummax(torch.where(change, idx, torch.zeros_like(idx)), 0).values
    out = {}
    for r in FWD_ROWS[1:]:
        starts = idx[change | ((idx - run_start) % r == 0)]
        if starts.numel() == nb or nb < min_fill * starts.numel() * r:
            continue  # no run longer than 1, or too much padding
        lens = torch.diff(torch.cat([starts, torch.tensor([nb])]))
        off = torch.arange(r)
        g = starts[:, None] + off[None, :]
        out[r] = torch.where(off[None, :] < lens[:, None], g, torch.full_like(g, -1))
    return out


def parent_sets(cblocks, ptr, par_i, par_k):
    """Child blocks grouped by their parent node blocks (each child's CSR list), for the parent-set
    element-flow kernel: (set_par [ns, P] sorted, -1 padding; set_rows [nc]; set_k [nc, P];
    {n: [nch, 3] runs (lo, hi, set) of at most n child blocks of one set, n in ELEM_SETS}).
    Children keep their CSR order within a set; tensor ops throughout (PD-256 has ~25k child blocks,
    and a per-child Python loop here cost 0.47 s of its compile)."""
    nc, counts = len(cblocks), ptr[1:] - ptr[:-1]
    P = triton.next_power_of_2(int(counts.max()))
    child = torch.repeat_interleave(torch.arange(nc), counts)
    slot = torch.arange(len(par_i)) - ptr[:-1][child]
    parents = torch.full((nc, P), -1, dtype=torch.long)
    parents[child, slot] = par_i
    k = torch.zeros(nc, P, dtype=torch.long)
    k[child, slot] = par_k
    set_par, set_of = torch.unique(parents, dim=0, return_inverse=True)
    order = torch.sort(set_of, stable=True).indices
    sizes = torch.bincount(set_of, minlength=len(set_par)).tolist()
    starts = [0, *itertools.accumulate(sizes[:-1])]  # of each set's children in the new order
    chunks = {}
    for n in ELEM_SETS[1:]:
        runs = [
            (a, min(a + n, lo + m), s)
            for s, (lo, m) in enumerate(zip(starts, sizes))
            for a in range(lo, lo + m, n)
        ]
        chunks[n] = torch.tensor(runs, dtype=torch.long)
    return set_par, cblocks[order], k[order], chunks


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
