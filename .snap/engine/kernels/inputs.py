"""Input-layer kernels, generic over the family: each distribution hands its Triton device functions
(engine/distributions/*.py) to the kernels here, so a new family needs no change in this file.

The data is read as `x^T: [num_vars, B]` (and `missing^T`), indexed by each node's variable, so no
`[num_nodes, B]` gather of the data is ever materialised (1.6 GB at HCLT-512, batch 512).

- forward: one program per (BN nodes, BB batch columns): reads BN*BB data values (cached: nodes of
  one variable share them) and BN*BB parameters, writes BN*BB log-probabilities into node_mars.
  With `input_fwd` (default): one program per (input_rows nodes of one variable, input_cols batch
  columns), which reads each data row once a step and keeps its parameter rows in L1.
- tile statistics (families with at most 3 statistics): per-node reductions over the batch, one
  program per BN nodes; the family's `kernel_stats_tile` gives each batch tile's increments.
  Families with a specialised statistics kernel (Categorical) launch their own.
"""

from __future__ import annotations

import bisect

import torch
import triton
import triton.language as tl

from engine.kernels.options import KernelOptions


@triton.jit
def _input_fwd_kernel(
    prm, xt, mt, vars_, out, N, B, P, C, num_bt, LOG_PROB: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr
):
    pid = tl.program_id(0)
    n = (pid // num_bt) * BN + tl.arange(0, BN)
    offs_b = (pid % num_bt) * BB + tl.arange(0, BB)
    nm = n < N
    m2 = nm[:, None] & (offs_b < B)[None, :]
    var = tl.load(vars_ + n, mask=nm, other=0)
    dptr = var[:, None] * B + offs_b[None, :]
    miss = tl.load(mt + dptr, mask=m2, other=1) != 0
    n64 = n.to(tl.int64)
    xv = tl.load(xt + dptr, mask=m2, other=0)
    lp = LOG_PROB(prm, n64, nm, xv, P, C)
    tl.store(out + n64[:, None] * B + offs_b[None, :], tl.where(miss, 0.0, lp), mask=m2)


@triton.jit
def _input_fwd_seg_kernel(
    prm,
    xt,
    mt,
    seg_start,
    seg_len,
    seg_var,
    out,
    B,
    P,
    C,
    num_rc,
    cols_per_prog,
    LOG_PROB: tl.constexpr,
    RN: tl.constexpr,
    BB: tl.constexpr,
):
    """RN rows of one segment (nodes of one variable) over `cols_per_prog` batch columns, BB at a time:
    the rows' parameters stay in L1 while the program walks the batch, where `_input_fwd_kernel`'s
    programs each fetch their own L2 sectors per element (H200, Categorical: 0.17 against 0.28 ms at
    HCLT-128; a tl.gather from a register tile of log-parameters took 0.34, benchmarks/NOTES.md)."""
    pid = tl.program_id(0)
    s = pid // num_rc
    r0 = (pid % num_rc) * RN
    cnt = tl.load(seg_len + s)
    if r0 >= cnt:
        return
    n64 = tl.load(seg_start + s).to(tl.int64) + r0 + tl.arange(0, RN)
    nm = r0 + tl.arange(0, RN) < cnt
    var = tl.load(seg_var + s).to(tl.int64)
    c0 = tl.program_id(1) * cols_per_prog
    for b0 in range(c0, tl.minimum(c0 + cols_per_prog, B), BB):
        offs_b = b0 + tl.arange(0, BB)
        bm = offs_b < B
        # the segment's nodes share one variable: BB data values and missing flags, read once
        xv = tl.load(xt + var * B + offs_b, mask=bm, other=0)
        miss = tl.load(mt + var * B + offs_b, mask=bm, other=1) != 0
        lp = LOG_PROB(prm, n64, nm, tl.broadcast_to(xv[None, :], (RN, BB)), P, C)
        tl.store(
            out + n64[:, None] * B + offs_b[None, :],
            tl.where(miss[None, :], 0.0, lp),
            mask=nm[:, None] & bm[None, :],
        )


@triton.jit
def _tile_stats_kernel(
    stats,
    prm,
    xt,
    mt,
    flows,
    vars_,
    N,
    B,
    P,
    STATS_TILE: tl.constexpr,
    S: tl.constexpr,
    BN: tl.constexpr,
    BB: tl.constexpr,
):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    nm = n < N
    n64 = n.to(tl.int64)
    var = tl.load(vars_ + n, mask=nm, other=0)
    a0 = tl.zeros([BN], dtype=tl.float32)
    a1 = tl.zeros([BN], dtype=tl.float32)
    a2 = tl.zeros([BN], dtype=tl.float32)
    for b0 in range(0, B, BB):  # read BN * BB flows, data values and missing flags per step
        offs_b = b0 + tl.arange(0, BB)
        m2 = nm[:, None] & (offs_b < B)[None, :]
        f = tl.load(flows + n64[:, None] * B + offs_b[None, :], mask=m2, other=0.0)
        dptr = var[:, None] * B + offs_b[None, :]
        miss = tl.load(mt + dptr, mask=m2, other=1) != 0
        xv = tl.load(xt + dptr, mask=m2, other=0)
        t0, t1, t2 = STATS_TILE(prm, n64, nm, P, xv, miss, f)
        a0 += t0
        a1 += t1
        a2 += t2
    s0 = stats + n64 * S  # read-modify-write S values per node
    tl.store(s0, tl.load(s0, mask=nm, other=0.0) + a0, mask=nm)
    if S > 1:
        tl.store(s0 + 1, tl.load(s0 + 1, mask=nm, other=0.0) + a1, mask=nm)
    if S > 2:
        tl.store(s0 + 2, tl.load(s0 + 2, mask=nm, other=0.0) + a2, mask=nm)


# ----------------------------------------------------------------------------------- launchers
def supports(dist) -> bool:
    """True when the family defines a log-probability device function."""
    return dist.kernel_log_prob is not None


def prepare_data(dist, x: torch.Tensor, missing: torch.Tensor):
    """x^T and missing^T, contiguous `[num_vars, B]`: int32 (discrete) or float32, and uint8."""
    xt = x.T.contiguous()
    xt = xt.to(torch.int32) if dist.discrete else xt.to(torch.float32)
    return xt, missing.T.contiguous().to(torch.uint8)


def input_forward(dist, params, vars_, xt, mt, out, opts: KernelOptions, segs=None, max_len: int = 0) -> None:
    """out `[N, B]` (a node_mars slice) = log p(x_var(n)) per node, 0 where missing. With `segs` (the
    layer's `segments(vars_, max_len)` on the device) and `opts.input_fwd`: programs of `input_rows`
    nodes of one segment walking `input_cols` batch columns (`_input_fwd_seg_kernel`)."""
    N, B = out.shape
    if segs is not None and opts.input_fwd:
        starts, lens, svars = segs
        nrc = triton.cdiv(max_len, opts.input_rows)
        cols = max(opts.input_block_b, opts.input_cols)
        _input_fwd_seg_kernel[(starts.numel() * nrc, triton.cdiv(B, cols))](
            params,
            xt,
            mt,
            starts,
            lens,
            svars,
            out,
            B,
            params.shape[1],
            dist.kernel_constant(),
            nrc,
            cols,
            LOG_PROB=dist.kernel_log_prob,
            RN=opts.input_rows,
            BB=opts.input_block_b,
            num_warps=opts.num_warps,
        )
        return
    nbt = triton.cdiv(B, opts.block_b)
    _input_fwd_kernel[(triton.cdiv(N, opts.input_nodes) * nbt,)](
        params,
        xt,
        mt,
        vars_,
        out,
        N,
        B,
        params.shape[1],
        dist.kernel_constant(),
        nbt,
        LOG_PROB=dist.kernel_log_prob,
        BN=opts.input_nodes,
        BB=opts.block_b,
        num_warps=opts.num_warps,
    )


def tile_stats(dist, stats, params, vars_, xt, mt, flows, opts: KernelOptions) -> None:
    """stats `[N, S <= 3]` += flow-weighted statistics through the family's `kernel_stats_tile`."""
    N, B = flows.shape
    _tile_stats_kernel[(triton.cdiv(N, opts.input_nodes),)](
        stats,
        params,
        xt,
        mt,
        flows,
        vars_,
        N,
        B,
        params.shape[1],
        STATS_TILE=dist.kernel_stats_tile,
        S=stats.shape[1],
        BN=opts.input_nodes,
        BB=opts.block_b,
        num_warps=opts.num_warps,
    )


def segments(vars_: torch.Tensor, max_len: int):
    """Runs of consecutive nodes with one variable, cut into pieces of <= max_len: (start, len, var)."""
    v = vars_.cpu()
    n = v.numel()
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = v[1:] != v[:-1]
    idx = torch.arange(n)
    run_start = torch.cummax(torch.where(change, idx, torch.zeros_like(idx)), 0).values
    cut = change | ((idx - run_start) % max_len == 0)
    starts = idx[cut]
    lens = torch.diff(torch.cat([starts, torch.tensor([n])]))
    return starts, lens, v[starts]


def input_stats(dist, stats, params, vars_, xt, mt, flows, segs, opts: KernelOptions) -> bool:
    """stats `[N, num_stats]` += flow-weighted sufficient statistics; False if the family has no kernel."""
    return dist.kernel_stats(stats, params, vars_, xt, mt, flows, segs, opts)


def chunk_ranges(
    seg_starts: torch.Tensor, n: int, rows: int, lo: int = 0, hi: int | None = None
) -> list[tuple[int, int, int, int]]:
    """Consecutive segments grouped into chunks of about `rows` node rows (whole segments, so at most
    `rows + stats_nodes - 1`; `rows <= 0`: one chunk): `(first segment, end segment, a, b)` each,
    the node ranges `[a, b)` tiling `[lo, end)` in order, `end` the last segment boundary at or below
    `hi` (default `n`; empty when none lies above `lo`). `lo` must be a segment boundary.
    `seg_starts`: the host segment starts (`segments`)."""
    bounds = seg_starts.tolist() + [n]
    hi = n if hi is None else hi
    first = bisect.bisect_left(bounds, lo)
    if first == len(bounds) or bounds[first] != lo:
        raise ValueError(f"statistics rows must start at a segment boundary, got {lo}")
    last = bisect.bisect_right(bounds, hi) - 1  # the end segment: its start bounds the range
    out, a = [], first
    while a < last:
        b = last if rows <= 0 else max(a + 1, bisect.bisect_left(bounds, bounds[a] + rows, a + 1, last))
        out.append((a, b, bounds[a], bounds[b]))
        a = b
    return out


def chunk_segments(segs, first: int, end: int, lo: int):
    """The segments `[first, end)` with their starts relative to node `lo`, for a launch on the rows
    `[lo, ...)`: one `[end - first]` subtraction on the device (the lengths and variables are views)."""
    starts, lens, svars = segs
    return starts[first:end] - lo, lens[first:end], svars[first:end]


def input_stats_chunked(
    dist, stats, params, vars_, xt, mt, flows, chunks, opts: KernelOptions, after
) -> bool:
    """`input_stats` as one launch per chunk `(lo, hi, segments of the rows lo..hi)`, on the row slices
    `[lo, hi)` of stats, params, vars and flows (contiguous views), calling `after(lo, hi)` once a
    chunk's statistics rows are final (each launch writes only its own rows: a segment lies inside
    one chunk). The launches are queued in order, so on a GPU `after` sees them queued, not finished;
    a collective it enqueues on the same stream order waits for them. False, with nothing done and
    `after` not called, when the family has no kernel (the first chunk decides: it depends only on
    the family and the dtypes)."""
    for k, (lo, hi, segs) in enumerate(chunks):
        rows = slice(lo, hi)
        done = dist.kernel_stats(stats[rows], params[rows], vars_[rows], xt, mt, flows[rows], segs, opts)
        if not done:
            if k:
                raise RuntimeError(
                    f"{dist.name}: the statistics kernel refused chunk {k} after running chunk 0"
                )
            return False
        after(lo, hi)
    return True


def input_em_update(dist, params, stats, step_size: float, pseudocount: float, opts: KernelOptions) -> bool:
    """In-place EM update of a layer's params from its stats; False (nothing done) without a kernel."""
    return dist.kernel_em_update(params, stats, step_size, pseudocount, opts)
