"""Categorical over {0, ..., num_cats-1}; params are the probabilities `[n, num_cats]`.

Kernels: the log-probability device function reads `prm[n, x]`; statistics run over *segments*
(runs of at most BN nodes sharing a variable), where `stats[n, c] += sum_b f[n, b] [x_b = c]` is a
matmul of the flows `[BN, BB]` with a one-hot `[BB, CC]` built in registers (tl.dot, tf32x3 or
ieee): no atomics, no contention on popular categories. Options (engine/kernels/options.py) pick
the tile's orientation (`stats_cats_major`: `[CC, BN]`, so the MMA's long side is the categories)
and `stats_split` (two tf32 MMAs instead of tf32x3's three: the one-hot operand is exact in tf32,
so only the flows need a high and a low part). The split: hi = the flow with its 13 low mantissa
bits cleared (exact in tf32), lo = f - hi (exact in float32, at most 13 significant bits, of which
the MMA keeps 11), so each flow enters off by < 2^-21 relative (float32 rounding: 2^-24), always
toward zero if the MMA truncates lo (tests/test_stats_split_and_segments.py). The EM update runs
in place in one pass (read params and stats once, write params once); the PyTorch version allocated
four temporaries the size of the parameters (0.8 GB at HCLT-256), which set the peak memory of a
training step.
"""

from __future__ import annotations

import torch

from engine.distributions._triton import jit, tl, triton
from engine.distributions.base import Distribution, register

MAX_EM_CATS = 1024  # one [BN, C] tile per program; larger category counts use the PyTorch update


@jit
def _log_prob(prm, n64, nm, xv, P, C):
    xv = tl.minimum(tl.maximum(xv, 0), C - 1)
    p = tl.load(prm + n64[:, None] * P + xv, mask=nm[:, None], other=1.0)
    return tl.log(p)  # -inf for a zero probability


@jit
def _hi(v):
    """v with its 13 low mantissa bits cleared: exactly representable in tf32."""
    return (v.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@jit
def _stats_kernel(
    stats,
    prm,
    xt,
    mt,
    flows,
    seg_start,
    seg_len,
    seg_var,
    B,
    C,
    num_ct,
    BN: tl.constexpr,
    CC: tl.constexpr,
    BB: tl.constexpr,
    PREC: tl.constexpr,
    CATS_MAJOR: tl.constexpr,
    SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    s = pid // num_ct
    cc = (pid % num_ct) * CC + tl.arange(0, CC)
    n0 = tl.load(seg_start + s)
    cnt = tl.load(seg_len + s)
    var = tl.load(seg_var + s)
    rn = tl.arange(0, BN)
    nm = rn < cnt
    if CATS_MAJOR:
        acc = tl.zeros([CC, BN], dtype=tl.float32)  # acc^T: [category, node]
    else:
        acc = tl.zeros([BN, CC], dtype=tl.float32)
    msum = tl.zeros([BN], dtype=tl.float32)
    for b0 in range(0, B, BB):
        offs_b = b0 + tl.arange(0, BB)
        bm = offs_b < B
        f = tl.load(
            flows + (n0 + rn)[:, None] * B + offs_b[None, :], mask=nm[:, None] & bm[None, :], other=0.0
        )
        xv = tl.minimum(tl.maximum(tl.load(xt + var * B + offs_b, mask=bm, other=0), 0), C - 1)
        miss = tl.load(mt + var * B + offs_b, mask=bm, other=1) != 0
        if CATS_MAJOR:
            onehot = ((cc[:, None] == xv[None, :]) & (~miss)[None, :]).to(tl.float32)  # [CC, BB], exact
            ft = tl.trans(f)
            if SPLIT and PREC != "ieee":
                hi = _hi(ft)
                acc += tl.dot(onehot, hi, input_precision="tf32")
                acc += tl.dot(onehot, ft - hi, input_precision="tf32")
            elif PREC == "ieee":
                acc += tl.dot(onehot, ft, input_precision="ieee")
            else:
                acc += tl.dot(onehot, ft, input_precision="tf32x3")
        else:
            onehot = ((xv[:, None] == cc[None, :]) & (~miss)[:, None]).to(tl.float32)  # [BB, CC], exact
            if SPLIT and PREC != "ieee":
                hi = _hi(f)
                acc += tl.dot(hi, onehot, input_precision="tf32")
                acc += tl.dot(f - hi, onehot, input_precision="tf32")
            elif PREC == "ieee":
                acc += tl.dot(f, onehot, input_precision="ieee")
            else:
                acc += tl.dot(f, onehot, input_precision="tf32x3")
        msum += tl.sum(tl.where(miss[None, :], f, 0.0), 1)
    ptr = (n0 + rn).to(tl.int64)[:, None] * C + cc[None, :]
    m2 = nm[:, None] & (cc < C)[None, :]
    if CATS_MAJOR:
        acc = tl.trans(acc)
    p = tl.load(prm + ptr, mask=m2, other=0.0)
    tl.store(stats + ptr, tl.load(stats + ptr, mask=m2, other=0.0) + acc + msum[:, None] * p, mask=m2)


@jit
def _em_kernel(prm, stats, N, C, step, pseudocount, BN: tl.constexpr, CC: tl.constexpr):
    n = tl.program_id(0) * BN + tl.arange(0, BN)
    cc = tl.arange(0, CC)
    m2 = (n < N)[:, None] & (cc < C)[None, :]
    ptr = n.to(tl.int64)[:, None] * C + cc[None, :]
    # read BN * C statistics and parameters, write BN * C parameters
    st = tl.load(stats + ptr, mask=m2, other=0.0)
    tot = tl.sum(st, 1) + pseudocount
    new = (st + pseudocount / C) / tl.maximum(tot, 1e-30)[:, None]
    w = tl.load(prm + ptr, mask=m2, other=0.0)
    keep = (tot <= 1e-30)[:, None]  # no flow and no pseudocount: keep the node
    tl.store(prm + ptr, tl.where(keep, w, (1.0 - step) * w + step * new), mask=m2)


@register
class Categorical(Distribution):
    """Categorical over {0, ..., num_cats-1}; params are the probabilities."""

    name = "categorical"
    config = ("num_cats",)
    kernel_log_prob = _log_prob

    def __init__(self, num_cats: int):
        if int(num_cats) < 2:
            raise ValueError(f"Categorical needs num_cats >= 2, got {num_cats}")
        self.num_cats = int(num_cats)
        self.num_params = self.num_stats = self.num_cats

    def init_params(self, n):
        p = torch.rand(n, self.num_cats) + 0.01
        return p / p.sum(1, keepdim=True)

    def check_params(self, params):
        super().check_params(params)
        if (params < 0).any() or ((params.sum(1) - 1).abs() > 1e-3).any():
            raise ValueError("categorical params must be non-negative and sum to 1 per node")

    def check_data(self, column, var):
        super().check_data(column, var)
        c = column.double()
        bad = (c != c.round()) | (c < 0) | (c >= self.num_cats)
        if bad.any():
            v = c[bad][0].item()
            raise ValueError(
                f"variable {var}: value {v:g} out of range for Categorical(num_cats={self.num_cats})"
            )

    def log_prob(self, params, xv, miss):
        """-inf where the value has probability 0."""
        lp = params.log().gather(1, xv.long().clamp(0, self.num_cats - 1))
        return lp.masked_fill(miss, 0.0)

    def accumulate_stats(self, stats, params, xv, miss, flows):
        obs_flows = flows.masked_fill(miss, 0.0)
        stats.scatter_add_(1, xv.long().clamp(0, self.num_cats - 1), obs_flows)
        stats.add_(flows.masked_fill(~miss, 0.0).sum(1, keepdim=True) * params)

    def em_update(self, params, stats, step_size, pseudocount):
        counts = stats + pseudocount / self.num_cats
        total = counts.sum(1, keepdim=True)
        new = counts / total.clamp_min(1e-30)
        return torch.where(total > 1e-30, (1 - step_size) * params + step_size * new, params)

    def sample(self, params):
        return torch.multinomial(params.clamp_min(0), 1).squeeze(1)

    def mode(self, params):
        p, v = params.max(1)
        return v, p.log()

    def value_probs(self, params):
        return params

    # ------------------------------------------------------------------ kernels
    def kernel_constant(self) -> int:
        return self.num_cats

    def kernel_stats(self, stats, params, vars_, xt, mt, flows, segments, opts) -> bool:
        """Per segment of nodes sharing a variable: flows x one-hot through tl.dot (no atomics).
        float32 only (the tile split is a float32 bit mask): other dtypes take the PyTorch update."""
        if not all(t.dtype == torch.float32 for t in (stats, params, flows)):
            return False
        B = flows.shape[1]
        C = self.num_cats
        CC = max(16, min(opts.stats_cats, triton.next_power_of_2(C)))
        nct = triton.cdiv(C, CC)
        starts, lens, svars = segments
        prec = "ieee" if opts.precision == "ieee" else "tf32x3"
        _stats_kernel[(starts.numel() * nct,)](
            stats,
            params,
            xt,
            mt,
            flows,
            starts,
            lens,
            svars,
            B,
            C,
            nct,
            BN=opts.stats_nodes,
            CC=CC,
            BB=opts.stats_block_b,
            PREC=prec,
            CATS_MAJOR=bool(opts.stats_cats_major),
            SPLIT=bool(opts.stats_split),
            num_warps=opts.stats_warps or opts.num_warps,
        )
        return True

    def kernel_em_update(self, params, stats, step_size, pseudocount, opts) -> bool:
        if (
            self.num_cats > MAX_EM_CATS
            or params.dtype != torch.float32
            or not params.is_contiguous()
            or not stats.is_contiguous()
        ):
            return False
        N, C = params.shape
        CC = max(16, triton.next_power_of_2(C))
        BN = max(1, 2048 // CC)
        _em_kernel[(triton.cdiv(N, BN),)](
            params,
            stats,
            N,
            C,
            float(step_size),
            float(pseudocount),
            BN=BN,
            CC=CC,
            num_warps=opts.num_warps,
        )
        return True
