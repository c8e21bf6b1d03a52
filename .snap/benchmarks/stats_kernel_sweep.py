"""The categorical statistics kernel alone, over its tile options, at HCLT's input-layer shapes.

    python benchmarks/stats_kernel_sweep.py --latents 128 256 --out $OUT/stats_sweep.json

HCLT on 784 MNIST-shaped variables with 256 categories has 784 x latents input nodes; one training
step accumulates `stats[n, c] += sum_b f[n, b] [x_b = c]` over the batch (512). On an H200 this one
kernel took 0.78 ms (HCLT-128) and 1.55 ms (HCLT-256) of the step (benchmarks/kernel_breakdown.py,
2026-11-30), against ~0.35 ms of tf32x3 MMA work at HCLT-256. Each variant is timed on the same
random flows and data (median of 20 launches, CUDA events) and checked against float64 PyTorch;
only the kernel is compiled per variant, so the sweep costs seconds, not whole-circuit builds.
Prints a table (fastest first) and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys

import torch

sys.path.insert(0, ".")
from engine.distributions.categorical import Categorical  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels import inputs as input_kernels  # noqa: E402

VARS, CATS, BATCH = 784, 256, 512


def case(latents: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vars_ = torch.arange(VARS).repeat_interleave(latents)
    x = torch.randint(0, CATS, (BATCH, VARS), generator=g)
    missing = torch.zeros(BATCH, VARS, dtype=torch.bool)
    flows = torch.rand(vars_.numel(), BATCH, generator=g) ** 4  # many small flows, some near 1
    params = torch.rand(vars_.numel(), CATS, generator=g) + 0.01
    params /= params.sum(1, keepdim=True)
    return [t.to(device) for t in (vars_, x, missing, flows, params)]


def reference(dist, vars_, x, missing, flows, params) -> torch.Tensor:
    stats = torch.zeros(params.shape, dtype=torch.float64, device=params.device)
    dist.accumulate_stats(stats, params.double(), x.T[vars_], missing.T[vars_], flows.double())
    return stats


def time_variant(dist, opts, vars_, x, missing, flows, params, reps: int = 20) -> tuple[float, torch.Tensor]:
    xt, mt = input_kernels.prepare_data(dist, x, missing)
    segs = tuple(t.to(flows.device) for t in input_kernels.segments(vars_, opts.stats_nodes))
    stats = torch.zeros_like(params)
    dist.kernel_stats(stats, params, vars_, xt, mt, flows, segs, opts)  # compile + the checked result
    out = stats.clone()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dist.kernel_stats(stats, params, vars_, xt, mt, flows, segs, opts)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), out


def variants():
    grid = itertools.product((False, True), (False, True), (32, 64), (32, 64), (128, 256), (4, 8))
    for cats_major, split, bn, bb, cc, warps in grid:
        yield KernelOptions(
            stats_nodes=bn,
            stats_block_b=bb,
            stats_cats=cc,
            stats_cats_major=cats_major,
            stats_split=split,
            stats_warps=warps,
        )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", nargs="+", type=int, default=[128, 256])
    ap.add_argument("--out")
    args = ap.parse_args()
    dist = Categorical(CATS)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "results": [],
    }
    fields = ("stats_cats_major", "stats_split", "stats_nodes", "stats_block_b", "stats_cats", "stats_warps")
    for nl in args.latents:
        data = case(nl, "cuda")
        ref = reference(dist, *data)
        rows = []
        for opts in variants():
            row = {"latents": nl, **{f: getattr(opts, f) for f in fields}}
            try:
                ms, got = time_variant(dist, opts, *data)
                row["ms"] = ms
                row["rel_err"] = float((got.double() - ref).norm() / ref.norm())
            except Exception as err:  # noqa: BLE001 - a variant out of shared memory must not stop the sweep
                row["error"] = f"{type(err).__name__}: {str(err)[:120]}"
            rows.append(row)
        rows.sort(key=lambda r: r.get("ms", float("inf")))
        print(f"\nHCLT-{nl} input layer: {VARS * nl} nodes x {CATS} categories, batch {BATCH}")
        for r in rows[:12] + [r for r in rows if r.get("error")][:3]:
            label = " ".join(f"{f.replace('stats_', '')}={int(r[f])}" for f in fields)
            print(
                f"  {label:70s} " + (f"{r['ms']:.3f} ms  err {r['rel_err']:.1e}" if "ms" in r else r["error"])
            )
        default = next(
            r
            for r in rows
            if all(r[f] == getattr(KernelOptions(), f) or (f == "stats_warps" and r[f] == 4) for f in fields)
        )
        print(f"  the default: {default.get('ms', float('nan')):.3f} ms")
        info["results"] += rows
        if args.out:
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
