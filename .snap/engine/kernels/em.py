"""Fused mini-batch EM update of the sum weights (reference: torch_ops.sum_em_update).

Every node row holds its `width * bs` weights contiguously (`[nb, bs, width * bs]` per partition at
its offset of the flat vector). The kernel normalises RN rows per program in two passes over each
row: (1) degree = number of real children and the masked flow sum; (2) new weights. Reads params,
flows and mask once each in pass 2 and flows + mask in pass 1: about 13 bytes per weight moved.

All partitions of all sum layers run in one launch per class (chunk length, whether every tile is
16-aligned) (`EmTable`: a tile list of (first weight, rows, row length)); HCLT-128 had 40 launches of
~3 us each, most of them for layers of a few hundred rows, where the launch and not the bytes set the
time. Partitions own disjoint weight ranges (engine/compiler/layout.py), so no two programs of a
launch touch one weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.options import KernelOptions

RN = 16  # node rows per program


@triton.jit
def _sum_em_kernel(
    prm,
    pflows,
    mask,
    tile_base,
    tile_rows,
    tile_len,
    step,
    pseudocount,
    RN: tl.constexpr,
    CL: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    t = tl.program_id(0)
    base0 = tl.load(tile_base + t)
    R = tl.load(tile_rows + t)
    L = tl.load(tile_len + t)
    if ALIGNED:  # what Triton infers for a launch argument divisible by 16: vectorised row loads
        base0 = tl.multiple_of(base0, 16)
        L = tl.multiple_of(L, 16)
    rows = tl.arange(0, RN)
    rm = rows < R
    base = base0 + rows.to(tl.int64) * L
    deg = tl.zeros([RN], dtype=tl.float32)
    tot = tl.zeros([RN], dtype=tl.float32)
    for c0 in range(0, L, CL):
        cc = c0 + tl.arange(0, CL)
        m2 = rm[:, None] & (cc < L)[None, :]
        mk = tl.load(mask + base[:, None] + cc[None, :], mask=m2, other=0).to(tl.float32)
        pf = tl.load(pflows + base[:, None] + cc[None, :], mask=m2, other=0.0)
        deg += tl.sum(mk, 1)
        tot += tl.sum(pf * mk, 1)
    degc = tl.maximum(deg, 1.0)
    tot = tot + pseudocount * deg / degc
    keep = tot <= 1e-30
    inv = 1.0 / tl.maximum(tot, 1e-30)
    for c0 in range(0, L, CL):
        cc = c0 + tl.arange(0, CL)
        m2 = rm[:, None] & (cc < L)[None, :]
        ptr = base[:, None] + cc[None, :]
        mk = tl.load(mask + ptr, mask=m2, other=0).to(tl.float32)
        pf = tl.load(pflows + ptr, mask=m2, other=0.0)
        w = tl.load(prm + ptr, mask=m2, other=0.0)
        new = (pf + pseudocount / degc[:, None]) * mk * inv[:, None]
        w = tl.where(keep[:, None], w, (1.0 - step) * w + step * new)
        tl.store(prm + ptr, w, mask=m2)


def _chunk_len(row_len: int) -> int:
    return max(16, min(256, triton.next_power_of_2(row_len)))


@dataclass
class EmTable:
    """Row tiles of the partitions updated together, per launch class (chunk length CL, whether every
    row starts at a multiple of 16 weights) -> (first weight `[T]` int64, rows `[T]` int32 (<= RN),
    row length `[T]` int32)."""

    tiles: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def em_table(partitions, device) -> EmTable:
    """The tiles of every partition (objects with param_offset, num_node_blocks, block_size, width)."""
    acc: dict[tuple[int, bool], list[tuple[int, int, int]]] = {}
    for pt in partitions:
        R, L = pt.num_node_blocks * pt.block_size, pt.width * pt.block_size
        if R * L == 0:
            continue  # no weights: no tile (an empty class would have no tile tensors)
        out = acc.setdefault((_chunk_len(L), pt.param_offset % 16 == 0 and L % 16 == 0), [])
        for r0 in range(0, R, RN):
            out.append((pt.param_offset + r0 * L, min(RN, R - r0), L))
    tiles = {}
    for cl, rows in acc.items():
        t = torch.tensor(rows, dtype=torch.long).T.contiguous()  # rows of t: contiguous columns
        tiles[cl] = (t[0].to(device), t[1].to(torch.int32).to(device), t[2].to(torch.int32).to(device))
    return EmTable(tiles)


def sum_em_update_all(table: EmTable, params, param_flows, mask, step_size, pseudocount, opts: KernelOptions):
    """The EM update of every partition in `table`, in place: one launch per (chunk length, aligned)."""
    for (cl, aligned), (base, rows, lens) in table.tiles.items():
        _sum_em_kernel[(base.numel(),)](
            params,
            param_flows,
            mask.view(torch.uint8),
            base,
            rows,
            lens,
            float(step_size),
            float(pseudocount),
            RN=RN,
            CL=cl,
            ALIGNED=aligned,
            num_warps=opts.num_warps,
        )
