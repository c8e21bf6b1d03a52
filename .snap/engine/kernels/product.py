"""Product-layer kernels: forward (also the recompute into scratch during backward) and flows.

- forward: `element_mars[elem_rows[r]] = sum_k node_mars[child_rows[r, k]]`; one program per
  (PR rows, batch tile): reads width * PR * BB values, writes PR * BB.
- flows: child-major (padded table of the product rows each child feeds, built from the plan), so
  each child row of node_flows is owned by one program: `node_flows[c] += sum element_flows[p]`;
  reads deg * PR * BB flows, read-modify-writes PR * BB. No atomics. The first product layer (in
  the top-down flows pass) that reaches a row stores instead (`flow_first`, see
  backend.mark_first_flow_writers), so node_flows needs no zero-filled allocation.

All partitions of one product layer run as one launch per pass (`merge_layer`: their rows
concatenated, narrower ones padded with row 0, the constant log 1): HCLT-256 has 40 product layers
of 1-3 partitions, each a few-microsecond launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.executor.tensors import ProdLayerTensors
from engine.kernels.options import KernelOptions


@triton.jit
def _prod_fwd_kernel(
    nmars, emars, elem_rows, child_rows, N, B, W, num_bt, PR: tl.constexpr, BB: tl.constexpr
):
    pid = tl.program_id(0)
    rows = (pid // num_bt) * PR + tl.arange(0, PR)
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    rm = rows < N
    m2 = rm[:, None] & (offs_b < B)[None, :]
    acc = tl.zeros([PR, BB], dtype=tl.float32)
    for k in range(W):
        c = tl.load(child_rows + rows.to(tl.int64) * W + k, mask=rm, other=0)
        acc += tl.load(nmars + c[:, None] * B + offs_b[None, :], mask=m2, other=0.0)
    e = tl.load(elem_rows + rows, mask=rm, other=0)
    tl.store(emars + e[:, None] * B + offs_b[None, :], acc, mask=m2)


@triton.jit
def _prod_bwd_kernel(
    eflows, nflows, crows, table, first, N, B, D, num_bt, PR: tl.constexpr, BB: tl.constexpr
):
    pid = tl.program_id(0)
    rows = (pid // num_bt) * PR + tl.arange(0, PR)
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    rm = rows < N
    m2 = rm[:, None] & (offs_b < B)[None, :]
    acc = tl.zeros([PR, BB], dtype=tl.float32)
    for k in range(D):
        p = tl.load(table + rows.to(tl.int64) * D + k, mask=rm, other=-1)
        acc += tl.load(eflows + p[:, None] * B + offs_b[None, :], mask=m2 & (p >= 0)[:, None], other=0.0)
    c = tl.load(crows + rows, mask=rm, other=0)
    ptr = nflows + c[:, None] * B + offs_b[None, :]
    # a row's first product layer in the flows pass stores (node_flows starts uninitialised), later ones add
    again = tl.load(first + rows, mask=rm, other=1) == 0
    tl.store(ptr, tl.load(ptr, mask=m2 & again[:, None], other=0.0) + acc, mask=m2)


@dataclass
class ProdLayerKernelTensors(ProdLayerTensors):
    """A product layer as one launch: its partitions' rows merged, and the child-major flow tables."""

    elem_rows: torch.Tensor  # [n] element rows written (all partitions)
    child_rows: torch.Tensor  # [n, max width] node rows multiplied (narrower rows padded with row 0)
    flow_rows: torch.Tensor  # [nc] child node rows, each owned by one program in the flows pass
    parent_table: torch.Tensor  # [nc, max parents] element rows feeding each child (-1 padded)
    flow_first: torch.Tensor | None = None  # [nc] uint8: 1 where this layer is the first to reach the row


def layer_tensors(base: ProdLayerTensors, long) -> ProdLayerKernelTensors:
    """Merge a product layer's partitions (`long`: makes a device long tensor)."""
    elem_rows, child_rows = merge_layer(base.parts)
    crows, table = child_major_products(elem_rows, child_rows)
    return ProdLayerKernelTensors(base.parts, long(elem_rows), long(child_rows), long(crows), long(table))


def prod_forward(t: ProdLayerKernelTensors, node_mars, element_mars, opts: KernelOptions) -> None:
    elem_rows, child_rows = t.elem_rows, t.child_rows
    N, W = child_rows.shape
    B = node_mars.shape[1]
    nbt = triton.cdiv(B, opts.block_b)
    _prod_fwd_kernel[(triton.cdiv(N, opts.prod_rows) * nbt,)](
        node_mars,
        element_mars,
        elem_rows,
        child_rows,
        N,
        B,
        W,
        nbt,
        PR=opts.prod_rows,
        BB=opts.block_b,
        num_warps=opts.num_warps,
    )


def prod_backward(t: ProdLayerKernelTensors, element_flows, node_flows, opts: KernelOptions) -> None:
    N, D = t.parent_table.shape
    if N == 0:
        return
    B = node_flows.shape[1]
    nbt = triton.cdiv(B, opts.block_b)
    _prod_bwd_kernel[(triton.cdiv(N, opts.prod_rows) * nbt,)](
        element_flows,
        node_flows,
        t.flow_rows,
        t.parent_table,
        t.flow_first,
        N,
        B,
        D,
        nbt,
        PR=opts.prod_rows,
        BB=opts.block_b,
        num_warps=opts.num_warps,
    )


def merge_layer(parts) -> tuple[torch.Tensor, torch.Tensor]:
    """(elem_rows [n], child_rows [n, max width]) of all partitions of one product layer."""
    width = max(pt.child_rows.shape[1] for pt in parts)
    rows = [
        torch.nn.functional.pad(pt.child_rows, (0, width - pt.child_rows.shape[1]), value=0) for pt in parts
    ]
    return torch.cat([pt.elem_rows for pt in parts]), torch.cat(rows)


def child_major_products(elem_rows: torch.Tensor, child_rows: torch.Tensor):
    """(child node rows [nc], table [nc, max parents] of element rows, -1 padded); row 0 dropped."""
    n, w = child_rows.shape
    child = child_rows.cpu().reshape(-1)
    elem = elem_rows.cpu()[:, None].expand(n, w).reshape(-1)
    keep = child > 0  # row 0 is the constant log 1 that padded product slots point at
    child, elem = child[keep], elem[keep]
    order = torch.argsort(child * (elem.max().item() + 1 if elem.numel() else 1) + elem)
    child, elem = child[order], elem[order]
    crows, counts = torch.unique_consecutive(child, return_counts=True)
    D = int(counts.max()) if counts.numel() else 1
    starts = torch.zeros_like(counts)
    starts[1:] = torch.cumsum(counts, 0)[:-1]
    table = torch.full((crows.numel(), D), -1, dtype=torch.long)
    col = torch.arange(child.numel()) - torch.repeat_interleave(starts, counts)
    table[torch.repeat_interleave(torch.arange(crows.numel()), counts), col] = elem
    return crows, table
