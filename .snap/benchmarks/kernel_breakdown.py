"""Where one training step's GPU time goes, per kernel, for kernel-option variants (no PyJuice).

    python benchmarks/kernel_breakdown.py --configs pd:128 hclt:512 \
        --variants default num_warps=8 --out $OUT/breakdown.json

Per configuration and variant: the graph-captured step (forward + flows + mini-batch EM, batch 512,
60,000 MNIST-shaped samples as in vs_pyjuice.py) in ms a batch (median of 3 runs of 20 batches),
and one eager step under `torch.profiler`, its CUDA kernel time summed by kernel name. A variant is
`default` or comma-separated `KernelOptions` fields (`num_warps=8,block_b=32`). Used to pick what to
optimise and to A/B a kernel change before the side-by-side run; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys

import torch

sys.path.insert(0, ".")
from vs_pyjuice import BATCH, PSEUDO, STEP, ours_build  # noqa: E402  (same structures and schedule)

import engine  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.graph import CapturedStep  # noqa: E402


def parse_variant(text: str) -> KernelOptions:
    if text == "default":
        return KernelOptions()
    kw = {}
    for part in text.split(","):
        key, val = part.split("=")
        kw[key] = val if key == "precision" else int(val)
    return KernelOptions(**kw)


def time_graph(step, data, n=20, repeats=3) -> float:
    xs = [data[i * BATCH : (i + 1) * BATCH].long() for i in range(n)]
    for x in xs[:3]:
        step(x)
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for x in xs:
            step(x)
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / n)
    return statistics.median(out)


def kernel_table(pc, data, trace: list | None = None) -> dict[str, dict]:
    """CUDA kernel time of one eager step, summed by kernel name; `trace` (if given) receives every
    launch in order as (name, us): which layer's launch is which follows from the plan's step order."""
    from torch.profiler import ProfilerActivity, profile

    x = data[:BATCH].long()
    for _ in range(2):
        pc.train_step(x, em=(STEP, PSEUDO), validate=False)  # the step fit runs (em_in_pass included)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        pc.train_step(x, em=(STEP, PSEUDO), validate=False)  # the step fit runs (em_in_pass included)
        torch.cuda.synchronize()
    if trace is not None:
        kernels = [
            ev
            for ev in prof.events()
            if str(getattr(ev, "device_type", "")).endswith("CUDA") and (ev.device_time or 0) > 0
        ]
        kernels.sort(key=lambda ev: ev.time_range.start)
        trace.extend((ev.name[:40], round(ev.device_time, 2)) for ev in kernels)
    rows: dict[str, dict] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if us <= 0:
            continue
        name = ev.key if len(ev.key) < 60 else ev.key[:57] + "..."
        rows[name] = {"ms": us / 1e3, "calls": ev.count}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["ms"]))


def layer_table(pc, data, batches: int = 5) -> list[dict]:
    """Mean eager ms per (layer, pass) over `batches` profiled steps, largest first (launch gaps
    included: small layers show their latency, not only their kernels)."""
    x = data[:BATCH].long()
    prof = pc.profile(every=1)
    for _ in range(batches + 1):
        pc.train_step(x, em=(STEP, PSEUDO), validate=False)  # the step fit runs (em_in_pass included)
        if prof.batches == 1:
            prof.collect(block=True)
            prof.totals.clear()
            prof.counts.clear()
    prof.collect(block=True)
    pc.profile(False)
    kinds = {layer.index: layer.kind for layer in pc.plan.layers}
    rows = [dict(r, kind=kinds.get(r["layer"], "?")) for r in prof.summary()]
    return sorted(rows, key=lambda r: -r["mean_ms"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["pd:128", "hclt:512"])
    ap.add_argument("--variants", nargs="+", default=["default"])
    ap.add_argument("--out")
    ap.add_argument("--layers", action="store_true", help="also per-layer eager times (profiler spans)")
    ap.add_argument("--trace", action="store_true", help="also every kernel launch of one step, in order")
    args = ap.parse_args()
    data = mnist_like(60000).to(torch.uint8).cuda()
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "batch_size": BATCH,
        "results": [],
    }
    print({k: v for k, v in info.items() if k != "results"}, flush=True)
    for spec in args.configs:
        kind, nl = spec.split(":")
        root = ours_build(kind, int(nl), data[:20000].long())  # the tree data of vs_pyjuice.py
        for variant in args.variants:
            opts = parse_variant(variant)
            row = {"config": spec, "variant": variant}
            try:
                pc = engine.compile(root, device="cuda", kernel_options=opts)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                step = CapturedStep(pc, BATCH, em=(STEP, PSEUDO))
                row["graph_ms_per_batch"] = time_graph(step, data)
                row["graph_captured"] = step.captured
                row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9  # data + circuit + step
                row["step_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9  # the step's buffers
                step = None  # free the graph's pool before the eager profile
                trace = [] if args.trace else None
                row["kernels"] = kernel_table(pc, data, trace)
                if trace is not None:
                    row["trace"] = trace
                row["eager_kernel_ms"] = sum(r["ms"] for r in row["kernels"].values())
                if args.layers:
                    row["layers"] = layer_table(pc, data)
            except Exception as err:  # noqa: BLE001 - one failing variant must not lose the others
                row["error"] = f"{type(err).__name__}: {err}"
            info["results"].append(row)
            print(
                f"\n{spec} [{variant}]: "
                + (
                    row.get("error")
                    or f"graph {row['graph_ms_per_batch']:.2f} ms/batch, eager kernels {row['eager_kernel_ms']:.2f} ms"
                    f", peak {row['peak_gb']:.3f} GB (step {row['step_peak_gb'] * 1e3:.1f} MB)"
                ),
                flush=True,
            )
            for name, r in list(row.get("kernels", {}).items())[:12]:
                print(f"  {r['ms']:8.3f} ms {r['calls']:5d}x  {name}")
            if row.get("layers"):
                by_pass: dict[str, float] = {}
                for r in row["layers"]:
                    key = f"{r['kind']}/{r['pass']}"
                    by_pass[key] = by_pass.get(key, 0.0) + r["mean_ms"]
                print(
                    "  eager ms by kind/pass: "
                    + ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_pass.items()))
                )
                for r in row["layers"][:10]:
                    print(f"    layer {r['layer']:3d} {r['kind']:8s} {r['pass']:10s} {r['mean_ms']:7.3f} ms")
            pc = step = None  # noqa: F841 - drop both before the next variant compiles
            gc.collect()
            torch.cuda.empty_cache()
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
