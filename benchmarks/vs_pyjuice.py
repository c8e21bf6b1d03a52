"""Circuit Workbench (Triton backend) against PyJuice on the same card, data and batch size.

    python benchmarks/vs_pyjuice.py --configs hclt:16,32,64,128,256,512 pd:16,32,64,128,256 \
        --out benchmarks/results/vs_pyjuice.json

Per configuration both systems build the same structure family (HCLT or PD 28x28, split (4, 4),
Categorical(256) inputs) on the same 60,000 MNIST-shaped samples (engine.data.mnist_like), then run
epochs of forward + flows + mini-batch EM at batch size 512 (step 0.1, pseudocount 0.1); the two
systems alternate which one runs first. Each system first runs one full warm-up epoch (every batch,
the 96-sample tail included, so all kernel JIT and graph capture happen there), then the timed
epochs. Reported: seconds per epoch (median of the timed epochs), peak GPU memory allocated during the run (above the data),
compile time (engine.compile / juice.compile + .to(device)), and the final mean log-likelihood of each
on the first 10,000 samples (nats), which must agree for equal work. PyJuice runs as a user would
(its defaults: bf16 forward tiles). `--extra-precision bf16` adds our opt-in bf16 column;
`--extra-options block_b=128,num_warps=8 --extra-configs hclt:256` adds a column of ours with other
kernel options on the named configurations.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, ".")
import engine  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.graph import CapturedStep  # noqa: E402
from engine.kernels.sum_block import forward_batch_tile  # noqa: E402
from engine.profiler import DEFAULT_EVERY  # noqa: E402

BATCH, STEP, PSEUDO = 512, 0.1, 0.1


def _pj_version(juice):
    if juice is None:
        return None
    from importlib.metadata import version

    return version("pyjuice")


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def ceilings() -> dict:
    """Measured device-to-device copy bandwidth and matmul rates (median of 10 after warm-up)."""
    def bench(fn, n=10):
        fn()
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        return statistics.median(ts)
    src = torch.randn(512 * 2**20 // 4 * 4, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    out = {"copy_GBps": 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e9}
    src = dst = None  # free the 4 GiB before the matmuls
    n = 8192
    for name, dt, tf32 in (("fp32_ieee", torch.float32, False), ("tf32", torch.float32, True),
                           ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
        out[f"matmul_{name}_TFLOPs"] = 2 * n**3 / bench(lambda: a @ b, 5) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


# ----------------------------------------------------------------------------- our engine
def ours_build(kind, nl, data_gpu):
    if kind == "hclt":
        return engine.structures.hclt(data_gpu, nl, input_dist=Categorical(256), device="cuda")
    return engine.structures.pd((28, 28), nl, (4, 4), input_dist=Categorical(256))


def ours_epoch(pc, step, data_u8, perm):
    t0 = sync_time()
    for i in range(0, perm.numel(), BATCH):
        step(data_u8[perm[i : i + BATCH]].long())
    return sync_time() - t0


def ours_ll(pc, data_u8, n=10000):
    tot = 0.0
    for i in range(0, n, BATCH):
        tot += pc(data_u8[i : i + BATCH].long(), validate=False).double().sum().item()
    return tot / n


# ----------------------------------------------------------------------------- PyJuice
def pj_build(juice, kind, nl, data_gpu):
    dist = juice.distributions.Categorical(num_cats=256)
    if kind == "hclt":
        return juice.structures.HCLT(data_gpu.float(), num_latents=nl, input_dist=dist)
    return juice.structures.PD(data_shape=(28, 28), num_latents=nl, split_intervals=(4, 4), input_dist=dist)


def pj_epoch(pc, data_u8, perm):
    t0 = sync_time()
    for i in range(0, perm.numel(), BATCH):
        x = data_u8[perm[i : i + BATCH]].long()
        pc.init_param_flows(flows_memory=0.0)
        pc(x)
        pc.backward(x, flows_memory=1.0)
        pc.mini_batch_em(step_size=STEP, pseudocount=PSEUDO)
    return sync_time() - t0


def pj_ll(pc, data_u8, n=10000):
    tot = 0.0
    with torch.no_grad():
        for i in range(0, n, BATCH):
            tot += pc(data_u8[i : i + BATCH].long()).double().sum().item()
    return tot / n


# ----------------------------------------------------------------------------- driver
def run_system(name, kind, nl, data_u8, data_gpu, epochs, batches, juice=None, opts=None, profile=False, warmup=0):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    root = pj_build(juice, kind, nl, data_gpu) if juice else ours_build(kind, nl, data_gpu)
    build_s = time.perf_counter() - t0
    t0 = sync_time()
    if juice:
        pc = juice.compile(root, verbose=False)
        pc.to("cuda")
    else:
        pc = engine.compile(root, device="cuda", kernel_options=opts)
    compile_s = sync_time() - t0
    sub = data_u8[: batches * BATCH] if batches else data_u8
    times, res = [], {}
    g = torch.Generator().manual_seed(0)
    step = None if juice else CapturedStep(pc, BATCH, em=(STEP, PSEUDO))
    for e in range(epochs + 1):  # epoch 0: warm-up of `warmup` batches (kernel JIT, graph capture)
        perm = torch.randperm(sub.shape[0], generator=g).cuda()
        if e == 0 and warmup:
            perm = perm[: warmup * BATCH]
        t = pj_epoch(pc, sub, perm) if juice else ours_epoch(pc, step, sub, perm)
        if e == 0:
            res["warmup_s"] = t
            res["ll_after_warmup"] = pj_ll(pc, data_u8) if juice else ours_ll(pc, data_u8)
        else:
            times.append(t)
    scale = data_u8.shape[0] / sub.shape[0]
    torch.cuda.synchronize()
    res.update(system=name, build_s=build_s, compile_s=compile_s,
               epoch_s=statistics.median(times) * scale, epoch_all_s=[t * scale for t in times],
               peak_alloc_GB=(torch.cuda.max_memory_allocated() - base) / 1e9,
               peak_reserved_GB=torch.cuda.max_memory_reserved() / 1e9)
    res["ll"] = pj_ll(pc, data_u8) if juice else ours_ll(pc, data_u8)
    if not juice:
        res["graph_captured"] = step.captured
        res["graph_failure"] = step.failed
        if profile:
            res["profile"] = profile_overhead(pc, sub)
    del pc, root, step
    gc.collect()
    torch.cuda.empty_cache()
    return res


def profile_overhead(pc, sub, n=60):
    """Graph-captured training with the profiler off and on (sampled), the eager cost of a sampled batch,
    and the per-pass breakdown and largest sum layer's achieved rates from eager profiled batches."""
    perm = torch.arange(n * BATCH, device="cuda") % sub.shape[0]
    step = CapturedStep(pc, BATCH, em=(STEP, PSEUDO))

    def run(prof, every=None):
        pc.profile(prof, every=every or DEFAULT_EVERY) if prof else pc.profile(False)
        t0 = sync_time()
        for i in range(n):
            step(sub[perm[i * BATCH : (i + 1) * BATCH]].long())
            if prof:
                pc.profiler.collect()  # non-blocking: resolves finished spans only
        return sync_time() - t0
    run(False)
    off = min(run(False), run(False))
    on = min(run(True), run(True))  # the default sampling (every DEFAULT_EVERY-th batch eager, timed)
    every1 = run(True, every=1)  # every batch eager and timed: the old behaviour
    prof = pc.profile(True, every=1)
    for _ in range(5):
        pc.accumulate_flows(sub[:BATCH].long(), validate=False)
    prof.collect(block=True)
    summ = {(r["layer"], r["pass"]): r["mean_ms"] for r in prof.summary()}
    kinds = {layer.index: layer.kind for layer in pc.plan.layers}
    by_kind: dict = {}
    for (li, p), ms in summ.items():
        by_kind[f"{kinds[li]}/{p}"] = by_kind.get(f"{kinds[li]}/{p}", 0.0) + ms
    pc.profile(False)
    big = max(pc.plan.sum_layers, key=lambda layer: layer.flops)
    fwd_ms = summ.get((big.index, "forward"))
    bwd_ms = summ.get((big.index, "backward"))
    flops_f = big.flops * BATCH
    nb = sum(p.num_node_blocks for p in big.partitions)
    bb = forward_batch_tile(nb, BATCH, pc.backend.options.fwd_block_b, pc.device)  # the forward's batch tile
    bytes_f = big.bytes * BATCH + big.param_bytes * max(1, BATCH // bb)  # params re-read per batch tile
    return {"graph_off_s_per_batch": off / n, "graph_profiled_s_per_batch": on / n,
            "overhead_pct": 100 * (on - off) / off, "profile_every": DEFAULT_EVERY,
            "every1_s_per_batch": every1 / n, "every1_overhead_pct": 100 * (every1 - off) / off,
            "ms_per_batch_by_kind_pass": by_kind,
            "largest_sum_layer": big.index,
            "largest_fwd_ms": fwd_ms, "largest_bwd_ms": bwd_ms,
            "largest_fwd_TFLOPs": flops_f / (fwd_ms / 1e3) / 1e12 if fwd_ms else None,
            "largest_bwd_TFLOPs": 2 * flops_f / (bwd_ms / 1e3) / 1e12 if bwd_ms else None,
            "largest_fwd_GBps": bytes_f / (fwd_ms / 1e3) / 1e9 if fwd_ms else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["hclt:16,32,64,128,256,512", "pd:16,32,64,128,256"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batches", type=int, default=0, help="limit each epoch to this many batches (quick runs)")
    ap.add_argument("--extra-precision", default=None, help="also run ours with this precision (e.g. bf16)")
    ap.add_argument("--no-pyjuice", action="store_true")
    ap.add_argument("--warmup-batches", type=int, default=0, help="0: a full warm-up epoch (default)")
    ap.add_argument("--extra-options", default=None, help="also run ours with these KernelOptions, e.g. block_b=128")
    ap.add_argument("--extra-configs", nargs="*", default=["hclt:256", "pd:128"])
    ap.add_argument("--profile-config", default="hclt:256")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    juice = None
    if not args.no_pyjuice:
        import pyjuice as juice
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "pyjuice": _pj_version(juice),
            "python": platform.python_version(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "batch_size": BATCH, "step_size": STEP, "pseudocount": PSEUDO, "epochs_timed": args.epochs,
            "batches_per_epoch_limit": args.batches or None}
    print(info, flush=True)
    info["ceilings"] = ceilings()
    print(info["ceilings"], flush=True)
    data_u8 = mnist_like(60000).to(torch.uint8).cuda()
    data_gpu = data_u8[:20000].long()
    results = []
    k = 0
    for spec in args.configs:
        kind, sizes = spec.split(":")
        for nl in map(int, sizes.split(",")):
            row = {"config": f"{kind}-{nl}"}
            systems = [("ours", None)] + ([] if juice is None else [("pyjuice", juice)])
            if k % 2:
                systems.reverse()
            for name, j in systems:
                r = run_system(name, kind, nl, data_u8, data_gpu, args.epochs, args.batches, juice=j,
                               profile=(f"{kind}:{nl}" == args.profile_config and j is None),
                               warmup=args.warmup_batches)
                row[name] = r
                print(f"  {row['config']} {name}: " + ", ".join(
                    f"{a}={v:.3f}" for a, v in r.items() if isinstance(v, float)), flush=True)
            if args.extra_precision:
                r = run_system("ours_" + args.extra_precision, kind, nl, data_u8, data_gpu, args.epochs,
                               args.batches, opts=KernelOptions(precision=args.extra_precision))
                row["ours_" + args.extra_precision] = r
                print(f"  {row['config']} ours_{args.extra_precision}: epoch_s={r['epoch_s']:.3f} ll={r['ll']:.3f}")
            if args.extra_options and f"{kind}:{nl}" in args.extra_configs:
                kw = {a: int(v) for a, v in (p.split("=") for p in args.extra_options.split(","))}
                try:
                    r = run_system("ours_opts", kind, nl, data_u8, data_gpu, args.epochs, args.batches,
                                   opts=KernelOptions(**kw), warmup=args.warmup_batches)
                    r["options"] = kw
                except Exception as err:  # noqa: BLE001 - a variant that fails must not lose the run
                    r = {"error": f"{type(err).__name__}: {err}", "options": kw}
                row["ours_opts"] = r
                print(f"  {row['config']} ours {kw}: " + ", ".join(
                    f"{a}={v:.3f}" for a, v in r.items() if isinstance(v, float)), flush=True)
            results.append(row)
            k += 1
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({**info, "results": results}, f, indent=1)
    print_table(results, args.extra_precision)


def print_table(results, extra):
    hdr = f"{'config':9s} | {'s/epoch ours':>12s} {'pyjuice':>8s} {'speedup':>7s} | {'peak GB ours':>12s} {'pj':>6s} | " \
          f"{'compile s ours':>14s} {'pj':>6s} | {'LL ours':>8s} {'pj':>8s}"
    if extra:
        hdr += f" | s/epoch {extra}"
    print(hdr)
    for row in results:
        o, p = row["ours"], row.get("pyjuice", {})
        sp = p.get("epoch_s", float("nan")) / o["epoch_s"]
        line = (f"{row['config']:9s} | {o['epoch_s']:12.3f} {p.get('epoch_s', float('nan')):8.3f} {sp:7.2f} | "
                f"{o['peak_alloc_GB']:12.2f} {p.get('peak_alloc_GB', float('nan')):6.2f} | "
                f"{o['compile_s']:14.2f} {p.get('compile_s', float('nan')):6.2f} | {o['ll']:8.2f} "
                f"{p.get('ll', float('nan')):8.2f}")
        if extra:
            line += f" | {row['ours_' + extra]['epoch_s']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
