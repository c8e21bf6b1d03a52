"""Circuit Workbench against PyJuice 2.6.3, each timed on the path its own users run.

    python benchmarks/vs_pyjuice.py --configs hclt:16,32,64,128,256,512 --epochs 2 \
        --extra-precision bf16 tf32 --eager-batches 0 --curve hclt:256 --cli-config hclt:128 \
        --out results/vs_pyjuice_hclt_h200.json      # ~410 s on an H200 (--estimate)
    python benchmarks/vs_pyjuice.py --configs ... --estimate       # expected seconds only (no GPU)
    python benchmarks/vs_pyjuice.py --table results/a.json ...     # README tables from saved JSON

Per configuration (HCLT or PD over 28x28 MNIST-shaped data, `engine.data.mnist_like(60000)`,
Categorical(256) inputs) and batch size (`--batch-sizes`, default 512, for `--configs`; also
`--curve-batch-sizes`, default 128..4096, for the `--curve` configs; mini-batch EM with step 0.1 and
pseudocount 0.1 per step at every batch size, on both systems; the tail dropped on both). Main runs
come first, then curve points; a run whose expected seconds no longer fit in `--budget-s` is
skipped and listed in the JSON's `skipped`, so a call ends inside the device tool's limit:

- `ours` (the user's path): `engine.optim.fit(pc, train_on_cpu, ...)` exactly as a user calls it;
  fit moves the data to the GPU once and replays CUDA graphs. Epoch 1 is the warm-up (Triton JIT,
  graph capture); `epoch_s` is fit's own per-epoch training time of the later epochs (median);
  `wall_s` is the wall clock between fit's epoch events, i.e. with fit's evaluation of the whole
  training set after each epoch. `floor`: bytes and FLOPs per pass of one step (`step_floor.py`).
- `ours_step`: the graph-captured step alone on GPU-resident batches (the loop inside fit), to
  show what fit's driver costs on top of it.
- `ours_<precision>` (`--extra-precision bf16 tf32`): the same as `ours` with opt-in tile precision.
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
and the tail is dropped on every system (PyJuice's tutorial loader uses drop_last=True; a short
batch would make PyJuice re-allocate and stop replaying its graphs). `em` in each row records both
systems' EM settings and steps per epoch (checked equal). Log-likelihoods: the mean over the first
10,000 samples after the same EM steps. Peak memory: `max_memory_allocated` above what was
allocated before the system was built, each system's resident copy of the training data counted
inside its own region (ours: fit's uint8 copy of what the user handed it; PyJuice: the uint8 array
on the GPU its batches are gathered from, copied from the same CPU tensor inside its region; 47 MB
each). `--cli-config hclt:128` also times `python -m engine train` end to end against fit.
"""

from __future__ import annotations

import argparse
import collections
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

T_IMPORT = time.time()  # run as a script, the --budget-s clock starts before the heavy imports

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_floor  # noqa: E402
import vs_pyjuice_table  # noqa: E402
from vs_pyjuice_plan import estimate_seconds, parse_configs, plan_runs  # noqa: E402

import engine  # noqa: E402
from engine import optim  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.graph import CapturedStep  # noqa: E402

BATCH, STEP, PSEUDO, SEED, LL_ROWS, NUM_ROWS = 512, 0.1, 0.1, 0, 10000, 60000
DEV = "cuda"  # our side only; a CPU stand-in (tests) sets "cpu"; PyJuice's side needs CUDA


def schedule(batch_size: int) -> optim.EMSchedule:
    """Constant mini-batch EM step STEP and pseudocount PSEUDO per step at every batch size, tail dropped."""
    return optim.EMSchedule(
        batch_size=batch_size,
        step_size=STEP,
        final_step_size=STEP,
        pseudocount=PSEUDO,
        full_batch_epochs=0,
        drop_last=True,
    )


def sync_time() -> float:
    if DEV == "cuda":
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
    """Measured device-to-device copy bandwidth (read + write bytes) and 8192^3 matmul rates: fp32
    without tensor cores (`ieee`'s floor), tf32 and bf16 (median of 5 after warm-up)."""
    bench = median_seconds
    src = torch.randn(512 * 2**20 // 4 * 4, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    out = {"copy_GBps": 2 * src.numel() * 4 / bench(lambda: dst.copy_(src)) / 1e9}
    src = dst = None
    n = 8192
    for name, dt, tf32 in (
        ("fp32", torch.float32, False),
        ("tf32", torch.float32, True),
        ("bf16", torch.bfloat16, False),
    ):
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
        return engine.structures.hclt(data_gpu, nl, input_dist=Categorical(256), device=DEV)
    return engine.structures.pd((28, 28), nl, (4, 4), input_dist=Categorical(256))


def ours_ll(pc, data_u8, bs) -> float:
    return optim.evaluate(pc, data_u8[:LL_ROWS], bs)


class Measure:
    """Peak device memory above the allocation at entry, and the seconds spent inside."""

    def __enter__(self):
        gc.collect()
        self.peak_GB = None  # not measured off the GPU
        if DEV == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if DEV == "cuda":
            torch.cuda.synchronize()
            self.peak_GB = (torch.cuda.max_memory_allocated() - self.base) / 1e9


def run_ours(root, data_cpu, data_u8, epochs, bs, opts=None) -> dict:
    """fit as a user calls it at batch size `bs`; `data_cpu` is what the user hands it."""
    events, sched = [], schedule(bs)
    with Measure() as m:
        t0 = sync_time()
        pc = engine.compile(root, device=DEV, kernel_options=opts)
        compile_s = sync_time() - t0
        init_ll = ours_ll(pc, data_u8, bs)
        t_fit = time.time()
        hist = optim.fit(
            pc,
            data_cpu,
            epochs=epochs,
            schedule=sched,
            callback=events.append,
            generator=torch.Generator().manual_seed(SEED),
        )
        data_GB = data_cpu.numel() * data_cpu.element_size() / 1e9  # fit's resident copy (uint8)
    ends = [t_fit] + [h["time"] for h in hist]
    walls = [b - a for a, b in zip(ends, ends[1:])]
    batches = [e["num_batches"] for e in events if e.get("type") == "batch"]
    res = {
        "system": "ours (optim.fit)",
        "precision": (opts or KernelOptions()).precision,
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
        "ll": ours_ll(pc, data_u8, bs),
        "em": {
            "batch_size": sched.batch_size,
            "steps_per_epoch": max(batches) if batches else None,
            "step_sizes": [sched.step_at(e, epochs) for e in range(1, epochs + 1)],
            "pseudocount": sched.pseudocount,
            "drop_last": sched.drop_last,
        },
        "floor": step_floor.to_dict(step_floor.step_floor(pc.plan, bs)),
    }
    res["step"] = run_ours_step(pc, data_u8, bs)
    del pc
    return res


def run_ours_step(pc, data_u8, bs) -> dict:
    """The captured step alone over one epoch of GPU-resident uint8 batches (after 3 warm-up)."""
    order = epoch_orders(data_u8.shape[0], 1)[0].to(DEV)
    nb = data_u8.shape[0] // bs
    step = CapturedStep(pc, bs, em=(STEP, PSEUDO))
    for i in range(3):
        step(data_u8[order[i * bs : (i + 1) * bs]])
    t0 = sync_time()
    for i in range(nb):
        step(data_u8[order[i * bs : (i + 1) * bs]])
    out = {"epoch_s": sync_time() - t0, "batches": nb, "captured": step.captured, "failure": step.failed}
    step.release()
    return out


def run_pyjuice(juice, bridge, root, data_cpu, epochs, bs, fp32=False) -> dict:
    """PyJuice's tutorial loop at batch size `bs`; `fp32=True` (a diagnostic, not its default) runs its
    sum tiles in fp32. Its batches come from a GPU copy of `data_cpu` made inside its own region."""
    orders = epoch_orders(data_cpu.shape[0], epochs)
    nb = data_cpu.shape[0] // bs
    with Measure() as m:
        data_dev = data_cpu.to("cuda")  # the user's resident data, counted as fit's copy is
        t0 = sync_time()
        ns = bridge.to_pyjuice(root, juice)
        pc = juice.compile(ns, verbose=False)
        pc.to("cuda")
        compile_s = sync_time() - t0
        if fp32:
            pc.forward = functools.partial(pc.forward, force_use_fp32=True)
        init_ll = pj_ll(bridge, pc, data_dev, bs)
        opt = bridge.make_optimizer(juice, pc, STEP, PSEUDO, keep_zero_params=True)
        first = orders[0][:bs].cuda()
        bridge.record_graphs(pc, data_dev[first].long())
        times = []
        for order in orders:
            order = order.cuda()
            batches = (data_dev[order[i * bs : (i + 1) * bs]].long() for i in range(nb))
            t0 = sync_time()
            bridge.tutorial_epoch(pc, opt, batches)
            times.append(sync_time() - t0)
    res = {
        "system": "pyjuice (tutorial: recorded CUDA graphs, MiniBatchEM)" + (", fp32 tiles" if fp32 else ""),
        "compile_s": compile_s,
        "peak_alloc_GB": m.peak_GB,
        "data_GB": data_dev.numel() * data_dev.element_size() / 1e9,
        "warmup_s": times[0],
        "epoch_s": statistics.median(times[1:]),
        "epoch_all_s": times,
        "init_ll": init_ll,
        "ll": pj_ll(bridge, pc, data_dev, bs),
        "em": {
            "batch_size": bs,
            "steps_per_epoch": nb,
            "step_sizes": [opt.step_size] * epochs,
            "pseudocount": opt.pseudocount,
            "niters_per_update": opt.niters_per_update,
            "keep_zero_params": opt.keep_zero_params,
        },
    }
    del pc, ns, opt, data_dev
    return res


def run_pyjuice_eager(juice, bridge, root, data_u8, batches, bs) -> dict:
    """PyJuice as the previous harness drove it: no recorded graphs; `batches` timed, scaled."""
    nb = data_u8.shape[0] // bs
    batches = min(batches, nb - 3)
    pc = juice.compile(bridge.to_pyjuice(root, juice), verbose=False)
    pc.to("cuda")
    order = epoch_orders(data_u8.shape[0], 1)[0].cuda()

    def one(i):
        x = data_u8[order[i * bs : (i + 1) * bs]].long()
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
        "epoch_s": per_batch * nb,
    }


def pj_ll(bridge, pc, data_dev, bs) -> float:
    """PyJuice's mean LL of the first LL_ROWS rows, its sum tiles in float32 (as ours evaluate)."""
    return bridge.pj_lls(pc, data_dev[:LL_ROWS], bs).double().mean().item()


def em_mismatch(row: dict) -> str | None:
    """What differs between the systems' EM settings in `row` (None when equal)."""
    ours, pj = row["ours"].get("em"), row.get("pyjuice", {}).get("em")
    if not ours or not pj:
        return None
    diffs = [k for k in ("batch_size", "steps_per_epoch", "step_sizes", "pseudocount") if ours[k] != pj[k]]
    if pj.get("niters_per_update", 1) != 1:
        diffs.append("niters_per_update")
    return ", ".join(diffs) or None


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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=["hclt:16,32,64,128,256,512", "pd:16,32,64,128,256"])
    ap.add_argument(
        "--batch-sizes", nargs="+", type=int, default=[BATCH], help="each config at each (a batch-size curve)"
    )
    ap.add_argument(
        "--curve", nargs="*", default=[], help="configs (as --configs) also run at every --curve-batch-sizes"
    )
    ap.add_argument("--curve-batch-sizes", nargs="+", type=int, default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--epochs", type=int, default=2, help="epochs per system; the first is the warm-up")
    ap.add_argument(
        "--eager-batches", type=int, default=30, help="batches timed for the pyjuice_eager column (0: none)"
    )
    ap.add_argument(
        "--extra-precision",
        nargs="*",
        default=[],
        choices=["bf16", "tf32", "ieee"],
        help="also run ours with these opt-in precisions (each its own column)",
    )
    ap.add_argument(
        "--extra-options",
        nargs="*",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also run ours with these KernelOptions (e.g. fuse_scale=1), each its own 'ours_opts:<spec>' entry",
    )
    ap.add_argument("--no-pyjuice", action="store_true")
    ap.add_argument("--cli-config", default=None, help="e.g. hclt:128: also time the CLI end to end")
    ap.add_argument(
        "--pj-fp32-configs",
        nargs="*",
        default=[],
        help="e.g. pd:16: also run PyJuice's loop with fp32 sum tiles (is a LL gap bf16's?)",
    )
    ap.add_argument("--out", default=None, help="JSON file written after every row")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="skip (and list) a run whose expected seconds no longer fit in this wall-clock budget",
    )
    ap.add_argument("--estimate", action="store_true", help="print the expected seconds and exit (no GPU)")
    ap.add_argument("--table", nargs="+", metavar="FILE.json", help="print README tables from saved JSON")
    return ap


def main(argv=None, started: float | None = None):
    """`started`: the time.time() the --budget-s clock counts from (default: now)."""
    started = time.time() if started is None else started
    args = build_parser().parse_args(argv)
    if args.table:
        print(vs_pyjuice_table.render([vs_pyjuice_table.load(p) for p in args.table]))
        return
    if args.epochs < 2:
        raise SystemExit(f"--epochs must be >= 2 (the first is the warm-up), got {args.epochs}")
    runs = plan_runs(args)
    if any(bs < 1 or NUM_ROWS // bs < 4 for _, _, bs, _ in runs):
        raise SystemExit(f"batch sizes must be in 1..{NUM_ROWS // 4}, got {sorted({r[2] for r in runs})}")
    est = estimate_seconds(runs, args)
    print(
        f"expected: {est['total_s']:.0f} s (per run: "
        + ", ".join(f"{k} {v:.0f}" for k, v in est["per_run_s"].items())
        + ")",
        flush=True,
    )
    if args.estimate:
        return
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vs_pyjuice.py needs a CUDA GPU (--table and --estimate run without one)")
    juice = bridge = None
    if not args.no_pyjuice:
        import pyjuice as juice
        import pyjuice_bridge as bridge
    from importlib.metadata import version

    info = {
        "device": torch.cuda.get_device_name() if DEV == "cuda" else DEV,
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "pyjuice": None if juice is None else version("pyjuice"),
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "batch_sizes": args.batch_sizes,
        "curve": {"configs": args.curve, "batch_sizes": args.curve_batch_sizes},
        "step_size": STEP,
        "pseudocount": PSEUDO,
        "epochs": args.epochs,
        "tail": "dropped on every system (drop_last)",
        "memory": "each system's resident uint8 training data inside its own region",
        "command": " ".join(sys.argv),
        "expected_s": est["total_s"],
    }
    print(info, flush=True)
    info["ceilings"] = ceilings()
    print(info["ceilings"], flush=True)
    data_u8 = mnist_like(NUM_ROWS).to(torch.uint8)
    data_cpu = data_u8.clone()  # what a user hands fit (and PyJuice's copies come from)
    data_u8 = data_u8.to(DEV)
    tree_data = data_u8[:20000].long()
    results = []

    def save():
        info["elapsed_s"] = time.time() - started
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**info, "results": results}, f, indent=1)

    info["skipped"] = []

    def fits(name: str, expected: float) -> bool:
        left = args.budget_s - (time.time() - started)
        if expected <= left:
            return True
        info["skipped"].append(name)
        print(f"  skipped {name}: expected {expected:.0f} s, {left:.0f} s left of --budget-s", flush=True)
        return False

    roots, left = {}, collections.Counter((kind, nl) for kind, nl, _, _ in runs)
    for k, (kind, nl, bs, main_run) in enumerate(runs):
        name, c = f"{kind}-{nl}@{bs}", (kind, nl)
        left[c] -= 1
        if not fits(name, est["per_run_s"][name]):
            continue
        t0 = time.time()
        root = roots[c] if c in roots else ours_build(kind, nl, tree_data)
        if left[c]:
            roots[c] = root  # kept while a later run needs it
        else:
            roots.pop(c, None)
        results.append(run_row(args, juice, bridge, root, kind, nl, bs, k, main_run, data_cpu, data_u8))
        results[-1]["seconds"] = time.time() - t0  # against expected_s: calibrates H200_REF
        results[-1]["expected_s"] = est["per_run_s"][name]
        save()
    if args.cli_config and fits("cli_vs_fit", est["cli_s"]):
        kind, nl = parse_configs([args.cli_config])[0]
        info["cli_vs_fit"] = cli_vs_fit(kind, nl, data_u8)
        print("cli vs fit:", info["cli_vs_fit"], flush=True)
    save()
    print(f"elapsed {info['elapsed_s']:.0f} s (expected {est['total_s']:.0f} s)")
    print(vs_pyjuice_table.render([{**info, "results": results}]))


def run_row(args, juice, bridge, root, kind, nl, bs, k, main_run, data_cpu, data_u8) -> dict:
    """Both systems on one configuration at batch size `bs`, alternating which goes first with `k`;
    a main run (not only a curve point) also gets the eager, fp32 and opt-in precision columns."""
    row = {"config": f"{kind}-{nl}", "batch_size": bs, "main": main_run}
    for name in ["ours", "pyjuice"] if k % 2 == 0 else ["pyjuice", "ours"]:
        if name == "ours":
            row["ours"] = run_ours(root, data_cpu, data_u8, args.epochs, bs)
        elif juice is not None:
            try:
                row["pyjuice"] = run_pyjuice(juice, bridge, root, data_cpu, args.epochs, bs)
            except Exception as err:  # noqa: BLE001 - a failing peer must not lose the run
                row["pyjuice"] = {"error": f"{type(err).__name__}: {err}"}
        if name in row:
            print(f"  {row['config']} @{bs} {name}: {_short(row[name])}", flush=True)
    row["em_mismatch"] = em_mismatch(row)
    if row["em_mismatch"]:
        print(f"  {row['config']} @{bs}: EM settings differ: {row['em_mismatch']}", flush=True)
    if not main_run:
        return row
    if juice is not None and args.eager_batches:
        try:
            row["pyjuice_eager"] = run_pyjuice_eager(juice, bridge, root, data_u8, args.eager_batches, bs)
        except Exception as err:  # noqa: BLE001
            row["pyjuice_eager"] = {"error": f"{type(err).__name__}: {err}"}
    if juice is not None and f"{kind}:{nl}" in args.pj_fp32_configs:
        row["pyjuice_fp32"] = run_pyjuice(juice, bridge, root, data_cpu, args.epochs, bs, fp32=True)
        print(f"  {row['config']} @{bs} pyjuice fp32: {_short(row['pyjuice_fp32'])}", flush=True)
    for p in args.extra_precision:
        row["ours_" + p] = run_ours(root, data_cpu, data_u8, args.epochs, bs, KernelOptions(precision=p))
        print(f"  {row['config']} @{bs} ours {p}: {_short(row['ours_' + p])}", flush=True)
    for spec in args.extra_options:
        kw = {k: int(v) for k, v in (part.split("=") for part in spec.split(","))}
        row["ours_opts:" + spec] = run_ours(root, data_cpu, data_u8, args.epochs, bs, KernelOptions(**kw))
        print(f"  {row['config']} @{bs} ours {spec}: {_short(row['ours_opts:' + spec])}", flush=True)
    return row


def _short(r) -> str:
    if not r:
        return "-"
    return ", ".join(f"{a}={v:.3f}" for a, v in r.items() if isinstance(v, float))


if __name__ == "__main__":
    main(started=T_IMPORT)
