"""Circuit Workbench against PyJuice 2.6.3, each timed on the path its own users run.

    python benchmarks/vs_pyjuice.py --configs hclt:16,32,64,128,256,512 pd:16,32,64,128,256 \
        --epochs 2 --cli-config hclt:128 --out benchmarks/results/vs_pyjuice_h200.json

Per configuration (HCLT or PD over 28x28 MNIST-shaped data, `engine.data.mnist_like(60000)`,
Categorical(256) inputs, batch 512, mini-batch EM with step 0.1 and pseudocount 0.1):

- `ours` (the user's path): `engine.optim.fit(pc, train_on_cpu, ...)` exactly as a user calls it;
  fit moves the data to the GPU once and replays CUDA graphs. Epoch 1 is the warm-up (Triton JIT,
  graph capture); `epoch_s` is fit's own per-epoch training time of the later epochs (median);
  `wall_s` is the wall clock between fit's epoch events, i.e. with fit's evaluation of the whole
  training set after each epoch.
- `ours_step`: the graph-captured step alone on GPU-resident batches (the loop inside fit), to
  show what fit's driver costs on top of it.
- `pyjuice`: PyJuice as its tutorial runs it: `juice.optim.MiniBatchEM`, one dry run with
  `record_cudagraph=True`, then `lls = pc(x); lls.mean().backward(); optimizer.step()` per batch,
  its defaults otherwise (bf16 sum tiles). Its circuit is *ours*, converted node vector by node
  vector with our initial parameters (`pyjuice_bridge.to_pyjuice`), so both train the same
  structure from the same start: equal work. Two departures from the tutorial's letter, both for
  equal work and neither touching speed: the dry run's flows are cleared before the first step,
  and `keep_zero_params=True` keeps the identity weights of the pass-through sums PyJuice's
  compiler inserts in PD at zero (see pyjuice_bridge). `init_ll` on both sides shows the start agrees.
- `pyjuice_eager`: PyJuice as the previous harness drove it (no recorded graphs;
  `init_param_flows`, `pc(x)`, `pc.backward`, `mini_batch_em`), timed over `--eager-batches`
  batches after 3 warm-up batches and scaled to an epoch: the column that shows what changed.

Same batches in the same order for all: each epoch's permutation comes from one seeded generator,
and the 96-row tail is dropped on every system (PyJuice's tutorial loader uses drop_last=True; a
short batch would make PyJuice re-allocate and stop replaying its graphs). Log-likelihoods: the
mean over the first 10,000 samples after the same EM steps (`--epochs` epochs of 117 batches).
Peak memory: `max_memory_allocated` above what was allocated before the system was built (ours
includes its resident uint8 copy of the data, 47 MB). `--cli-config hclt:128` also times
`python -m engine train` end to end on the same data against fit called in-process the same way.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine  # noqa: E402
from engine import optim  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.graph import CapturedStep  # noqa: E402

BATCH, STEP, PSEUDO, SEED, LL_ROWS = 512, 0.1, 0.1, 0, 10000
SCHEDULE = optim.EMSchedule(
    batch_size=BATCH,
    step_size=STEP,
    final_step_size=STEP,
    pseudocount=PSEUDO,
    full_batch_epochs=0,
    drop_last=True,
)


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def median_seconds(fn, n: int = 10, warmup: int = 1) -> float:
    """Median seconds of `fn()` over `n` runs after `warmup`, timed with CUDA events."""
    for _ in range(warmup):
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


def ceilings() -> dict:
    """Measured device-to-device copy bandwidth and matmul rates (median of 10 after warm-up)."""
    bench = median_seconds
    src = torch.randn(512 * 2**20 // 4 * 4, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    out = {"copy_GBps": 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e9}
    src = dst = None
    n = 8192
    for name, dt, tf32 in (("tf32", torch.float32, True), ("bf16", torch.bfloat16, False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = torch.randn(n, n, device="cuda", dtype=dt), torch.randn(n, n, device="cuda", dtype=dt)
        out[f"matmul_{name}_TFLOPs"] = 2 * n**3 / bench(lambda: a @ b, 5) / 1e12
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def epoch_orders(n: int, epochs: int) -> list[torch.Tensor]:
    """The row order of each epoch, drawn as fit draws it from a generator seeded with SEED."""
    g = torch.Generator().manual_seed(SEED)
    return [torch.randperm(n, generator=g) for _ in range(epochs)]


def ours_build(kind, nl, data_gpu):
    if kind == "hclt":
        return engine.structures.hclt(data_gpu, nl, input_dist=Categorical(256), device="cuda")
    return engine.structures.pd((28, 28), nl, (4, 4), input_dist=Categorical(256))


def ours_ll(pc, data_u8) -> float:
    return optim.evaluate(pc, data_u8[:LL_ROWS], BATCH)


class Measure:
    """Peak device memory above the allocation at entry, and the seconds spent inside."""

    def __enter__(self):
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        self.base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak_GB = (torch.cuda.max_memory_allocated() - self.base) / 1e9


def run_ours(root, data_cpu, data_u8, epochs, opts=None) -> dict:
    events = []
    with Measure() as m:
        t0 = sync_time()
        pc = engine.compile(root, device="cuda", kernel_options=opts)
        compile_s = sync_time() - t0
        init_ll = ours_ll(pc, data_u8)
        t_fit = time.time()
        hist = optim.fit(
            pc,
            data_cpu,
            epochs=epochs,
            schedule=SCHEDULE,
            callback=events.append,
            generator=torch.Generator().manual_seed(SEED),
        )
        data_GB = data_cpu.numel() * data_cpu.element_size() / 1e9  # fit's resident copy (uint8)
    ends = [t_fit] + [h["time"] for h in hist]
    walls = [b - a for a, b in zip(ends, ends[1:])]
    res = {
        "system": "ours (optim.fit)",
        "compile_s": compile_s,
        "peak_alloc_GB": m.peak_GB,
        "data_GB": data_GB,
        "warmup_s": hist[0]["seconds"],
        "epoch_s": statistics.median(h["seconds"] for h in hist[1:]),
        "wall_s": statistics.median(walls[1:]),
        "eval_s": statistics.median(h["eval_seconds"] for h in hist[1:]),
        "epoch_all_s": [h["seconds"] for h in hist],
        "pass_ll": [h["pass_ll"] for h in hist],
        "init_ll": init_ll,
        "ll": ours_ll(pc, data_u8),
    }
    res["step"] = run_ours_step(pc, data_u8)
    del pc
    return res


def run_ours_step(pc, data_u8) -> dict:
    """The captured step alone over one epoch of GPU-resident uint8 batches (after 3 warm-up)."""
    order = epoch_orders(data_u8.shape[0], 1)[0].cuda()
    nb = data_u8.shape[0] // BATCH
    step = CapturedStep(pc, BATCH, em=(STEP, PSEUDO))
    for i in range(3):
        step(data_u8[order[i * BATCH : (i + 1) * BATCH]])
    t0 = sync_time()
    for i in range(nb):
        step(data_u8[order[i * BATCH : (i + 1) * BATCH]])
    out = {"epoch_s": sync_time() - t0, "captured": step.captured, "failure": step.failed}
    step.release()
    return out


def run_pyjuice(juice, bridge, root, data_u8, epochs, fp32=False) -> dict:
    """PyJuice's tutorial loop; `fp32=True` (a diagnostic, not its default) runs its sum tiles in fp32."""
    orders = epoch_orders(data_u8.shape[0], epochs)
    nb = data_u8.shape[0] // BATCH
    with Measure() as m:
        t0 = sync_time()
        ns = bridge.to_pyjuice(root, juice)
        pc = juice.compile(ns, verbose=False)
        pc.to("cuda")
        compile_s = sync_time() - t0
        if fp32:
            pc.forward = functools.partial(pc.forward, force_use_fp32=True)
        init_ll = pj_ll(bridge, pc, data_u8)
        opt = bridge.make_optimizer(juice, pc, STEP, PSEUDO, keep_zero_params=True)
        first = orders[0][:BATCH].cuda()
        bridge.record_graphs(pc, data_u8[first].long())
        times = []
        for order in orders:
            order = order.cuda()
            batches = (data_u8[order[i * BATCH : (i + 1) * BATCH]].long() for i in range(nb))
            t0 = sync_time()
            bridge.tutorial_epoch(pc, opt, batches)
            times.append(sync_time() - t0)
    res = {
        "system": "pyjuice (tutorial: recorded CUDA graphs, MiniBatchEM)" + (", fp32 tiles" if fp32 else ""),
        "compile_s": compile_s,
        "peak_alloc_GB": m.peak_GB,
        "warmup_s": times[0],
        "epoch_s": statistics.median(times[1:]),
        "epoch_all_s": times,
        "init_ll": init_ll,
        "ll": pj_ll(bridge, pc, data_u8),
    }
    del pc, ns, opt
    return res


def run_pyjuice_eager(juice, bridge, root, data_u8, batches) -> dict:
    """PyJuice as the previous harness drove it: no recorded graphs; `batches` timed, scaled."""
    pc = juice.compile(bridge.to_pyjuice(root, juice), verbose=False)
    pc.to("cuda")
    order = epoch_orders(data_u8.shape[0], 1)[0].cuda()

    def one(i):
        x = data_u8[order[i * BATCH : (i + 1) * BATCH]].long()
        pc.init_param_flows(flows_memory=0.0)
        pc(x)
        pc.backward(x, flows_memory=1.0)
        pc.mini_batch_em(step_size=STEP, pseudocount=PSEUDO)

    for i in range(3):
        one(i)
    t0 = sync_time()
    for i in range(3, 3 + batches):
        one(i)
    per_batch = (sync_time() - t0) / batches
    return {
        "system": "pyjuice (previous harness: eager, no graphs)",
        "batches_timed": batches,
        "epoch_s": per_batch * data_u8.shape[0] / BATCH,
    }


def pj_ll(bridge, pc, data_u8) -> float:
    """PyJuice's mean LL of the first LL_ROWS rows, its sum tiles in float32 (as ours evaluate)."""
    return bridge.pj_lls(pc, data_u8[:LL_ROWS], BATCH).double().mean().item()


def cli_vs_fit(kind, nl, data_u8, epochs=3) -> dict:
    """`python -m engine train` end to end against `fit` in this process: same file, same schedule."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mnist_like.npz")
        x = data_u8.cpu().numpy()
        np.savez(path, train=x, valid=x[:2000], test=x[2000:4000])
        metrics = os.path.join(tmp, "m.jsonl")
        t0 = time.time()
        cmd = [
            sys.executable,
            "-m",
            "engine",
            "train",
            "--structure",
            kind,
            "--data",
            path,
            "--latents",
            str(nl),
            "--epochs",
            str(epochs),
            "--full-batch-epochs",
            "0",
            "--step-size",
            str(STEP),
            "--final-step-size",
            str(STEP),
            "--pseudocount",
            str(PSEUDO),
            "--batch-size",
            str(BATCH),
            "--metrics",
            metrics,
            "--quiet",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        total = time.time() - t0
        if proc.returncode:
            return {"error": proc.stderr[-2000:]}
        rows = [json.loads(line) for line in open(metrics)]
        cli_walls = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
        from engine.cli import build_structure
        from engine.data import load_dataset

        ds = load_dataset(path)
        torch.manual_seed(0)
        pc = engine.compile(build_structure(kind, ds, nl, 0, "cuda"), device="cuda")
        sched = optim.EMSchedule(
            batch_size=BATCH, step_size=STEP, final_step_size=STEP, pseudocount=PSEUDO, full_batch_epochs=0
        )
        hist = optim.fit(pc, ds.train, ds.valid, ds.test, epochs=epochs, schedule=sched)
    fit_walls = [b["time"] - a["time"] for a, b in zip(hist, hist[1:])]
    return {
        "config": f"{kind}-{nl}",
        "epochs": epochs,
        "cli_total_s": total,
        "cli_wall_per_epoch_s": statistics.median(cli_walls),
        "cli_epoch_s": [r["seconds"] for r in rows],
        "fit_wall_per_epoch_s": statistics.median(fit_walls),
        "fit_epoch_s": [h["seconds"] for h in hist],
        "ratio": statistics.median(cli_walls) / statistics.median(fit_walls),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["hclt:16,32,64,128,256,512", "pd:16,32,64,128,256"])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per system; the first is the warm-up")
    ap.add_argument(
        "--eager-batches", type=int, default=30, help="batches timed for the pyjuice_eager column"
    )
    ap.add_argument("--extra-precision", default=None, help="also run ours with this precision (e.g. bf16)")
    ap.add_argument("--no-pyjuice", action="store_true")
    ap.add_argument("--cli-config", default=None, help="e.g. hclt:128: also time the CLI end to end")
    ap.add_argument(
        "--pj-fp32-configs",
        nargs="*",
        default=[],
        help="e.g. pd:16: also run PyJuice's loop with fp32 sum tiles (is a LL gap bf16's?)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    juice = bridge = None
    if not args.no_pyjuice:
        import pyjuice as juice
        import pyjuice_bridge as bridge
    from importlib.metadata import version

    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "pyjuice": None if juice is None else version("pyjuice"),
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "batch_size": BATCH,
        "step_size": STEP,
        "pseudocount": PSEUDO,
        "epochs": args.epochs,
        "tail": "dropped on every system (drop_last)",
        "command": " ".join(sys.argv),
    }
    print(info, flush=True)
    info["ceilings"] = ceilings()
    print(info["ceilings"], flush=True)
    data_u8 = mnist_like(60000).to(torch.uint8)
    data_cpu = data_u8.clone()  # what a user hands fit
    data_u8 = data_u8.cuda()
    tree_data = data_u8[:20000].long()
    results = []

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**info, "results": results}, f, indent=1)

    for k, (kind, nl) in enumerate(
        (s.split(":")[0], int(n)) for s in args.configs for n in s.split(":")[1].split(",")
    ):
        root = ours_build(kind, nl, tree_data)
        row = {"config": f"{kind}-{nl}"}
        order = ["ours", "pyjuice"] if k % 2 == 0 else ["pyjuice", "ours"]
        for name in order:
            if name == "ours":
                row["ours"] = run_ours(root, data_cpu, data_u8, args.epochs)
            elif juice is not None:
                try:
                    row["pyjuice"] = run_pyjuice(juice, bridge, root, data_u8, args.epochs)
                except Exception as err:  # noqa: BLE001 - a failing peer must not lose the run
                    row["pyjuice"] = {"error": f"{type(err).__name__}: {err}"}
            print(f"  {row['config']} {name}: {_short(row.get(name))}", flush=True)
        if juice is not None and args.eager_batches:
            try:
                row["pyjuice_eager"] = run_pyjuice_eager(juice, bridge, root, data_u8, args.eager_batches)
            except Exception as err:  # noqa: BLE001
                row["pyjuice_eager"] = {"error": f"{type(err).__name__}: {err}"}
        if juice is not None and f"{kind}:{nl}" in args.pj_fp32_configs:
            row["pyjuice_fp32"] = run_pyjuice(juice, bridge, root, data_u8, args.epochs, fp32=True)
            print(f"  {row['config']} pyjuice fp32: {_short(row['pyjuice_fp32'])}", flush=True)
        if args.extra_precision:
            row["ours_" + args.extra_precision] = run_ours(
                root, data_cpu, data_u8, args.epochs, KernelOptions(precision=args.extra_precision)
            )
        results.append(row)
        save()
    if args.cli_config:
        kind, nl = args.cli_config.split(":")
        info["cli_vs_fit"] = cli_vs_fit(kind, int(nl), data_u8)
        print("cli vs fit:", info["cli_vs_fit"], flush=True)
        save()
    print_table(results, args.extra_precision)


def _short(r) -> str:
    if not r:
        return "-"
    return ", ".join(f"{a}={v:.3f}" for a, v in r.items() if isinstance(v, float))


def print_table(results, extra=None):
    hdr = (
        f"{'config':9s} | {'fit s/ep':>8s} {'step':>6s} {'fit/step':>8s} | {'PJ tut':>7s} {'x':>5s} | "
        f"{'PJ eager':>8s} {'x':>5s} | {'peak GB':>7s} {'PJ':>5s} | {'LL ours':>8s} {'PJ':>8s} {'gap%':>5s}"
    )
    print(hdr + (f" | {extra}" if extra else ""))
    nan = float("nan")
    for row in results:
        o, p, e = row["ours"], row.get("pyjuice", {}), row.get("pyjuice_eager", {})
        pe, ee = p.get("epoch_s", nan), e.get("epoch_s", nan)
        gap = 100 * abs(o["ll"] - p.get("ll", nan)) / abs(p.get("ll", nan))
        line = (
            f"{row['config']:9s} | {o['epoch_s']:8.3f} {o['step']['epoch_s']:6.3f} "
            f"{o['epoch_s'] / o['step']['epoch_s']:8.2f} | {pe:7.3f} {pe / o['epoch_s']:5.2f} | "
            f"{ee:8.3f} {ee / o['epoch_s']:5.2f} | {o['peak_alloc_GB']:7.2f} {p.get('peak_alloc_GB', nan):5.2f} | "
            f"{o['ll']:8.2f} {p.get('ll', nan):8.2f} {gap:5.2f}"
        )
        if extra:
            line += f" | {row['ours_' + extra]['epoch_s']:.3f}"
        print(line)


if __name__ == "__main__":
    main()
