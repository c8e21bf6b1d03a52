"""Data-parallel scaling on one host: ours (`fit(distributed=True)`) and PyJuice's DDP side by side.

    torchrun --nproc-per-node 1 benchmarks/scaling.py --out $OUT/scaling_1.json
    torchrun --nproc-per-node 2 benchmarks/scaling.py --out $OUT/scaling_2.json
    python3 benchmarks/scaling.py --table $OUT/scaling_1.json $OUT/scaling_2.json

Weak scaling: per-GPU batch 512 on 60,000 MNIST-shaped samples (global batch 512 x GPUs, the tail
dropped), mini-batch EM step 0.1, pseudocount 0.1, two epochs (the first the warm-up). Ours is
`engine.optim.fit` as a user calls it under torchrun (one GPU: `distributed=False`); PyJuice 2.6.3
runs its tutorial loop with `MiniBatchEM(ddp=True)` on the same circuit and parameters
(`pyjuice_bridge`), each rank on its slice of the same global batches. The all-reduce's share of
the step: the flow buffers' all-reduce timed alone (median of 50, CUDA events) over the step time
(epoch time / steps).

`--chunk-ab [MIB ...]` (issue 12): also trains ours with the input statistics reduced in chunks of
those sizes (none given: 32 MiB; 0 is one all-reduce after the layer) next to the default
(`engine.distributed.CHUNK_BYTES`, since the 14:17 run 0), in the same processes, alternating which
goes first, and times the statistics launches alone (one launch against the chunked launches, no
collective).

Other in-process A/B flags (2+ GPUs unless said): `--priority-ab` (the flows' all-reduces on an NCCL
group of normal priority instead of the default group, which `distributed.join` makes
high-priority), `--defer-ab` (every all-reduce waited for before the EM update), `--early-ab` (all
input statistics after the flows pass; any number of GPUs), `--options-ab NAME=VALUE[,...]` (other
KernelOptions; any number of GPUs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_pyjuice import (  # noqa: E402
    PSEUDO,
    SEED,
    STEP,
    epoch_orders,
    median_seconds,
    ours_build,
    schedule,
    sync_time,
)

import engine  # noqa: E402
from engine import distributed, optim  # noqa: E402
from engine.compiler import compile_plan  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.executor.stream_schedule import plan_early_stats  # noqa: E402
from engine.kernels import KernelOptions, inputs  # noqa: E402

BATCH = 512  # per GPU


def allreduce_ms(pc, reduce_dtype="fp32", reps=50) -> float:
    """Median ms of one all-reduce of the flow buffers (every rank calls this together)."""
    return 1e3 * median_seconds(distributed.FlowReducer(pc, reduce_dtype), reps, warmup=3)


def stats_kernel_ms(pc, x, sizes: list[int], reps: int = 20) -> dict:
    """Median ms of all input layers' statistics launches on batch `x`: one launch per layer ("one")
    against the chunks that `FlowReducer(chunk_bytes=b)` asks for, per size b in `sizes` (keyed by
    MiB), with no collective: what chunking itself costs (more launches, each with its own tail).
    Adds into the statistics: call after training."""
    pc.zero_flows()
    pc.forward(x, validate=False)
    flows = pc.backward_flows(accumulate_params=False)  # node flows only; the statistics are run here

    def once(rows: dict) -> None:
        for i, inp in enumerate(pc.input_layers):
            extra = (rows[i], lambda lo, hi: None) if i in rows else ()
            pc.backend.input_stats(inp, pc.tables.inputs[i], pc._inputs_cache[i], flows[inp.rows], *extra)

    out = {"one": 1e3 * median_seconds(lambda: once({}), reps, warmup=3), "chunked": {}, "chunks": {}}
    for b in sizes:
        rows = distributed._stats_chunk_rows(pc, b)
        key = f"{b / 2**20:g}"
        out["chunked"][key] = 1e3 * median_seconds(lambda r=rows: once(r), reps, warmup=3)
        out["chunks"][key] = {  # input layer -> launches
            str(i): len(inputs.chunk_ranges(pc.tables.inputs[i].segments[0].cpu(), inp.num_nodes, rows[i]))
            for i, inp in enumerate(pc.input_layers)
            if i in rows
        }
    pc._mars, pc._inputs_cache = None, []
    return out


def has_early_stats(root) -> bool:
    """Whether a training step computes some input statistics during the flows pass (the plan only)."""
    plan, _, _ = compile_plan(root)
    return bool(plan_early_stats(plan))


def run_ours(
    root,
    data_cpu,
    ranks,
    epochs,
    reduce_dtype="fp32",
    overlap=True,
    chunk_bytes=None,
    time_stats=(),
    opts=None,
) -> dict:
    """`chunk_bytes`: the input statistics' chunk size (None: the default, 0: not chunked);
    `time_stats`: chunk sizes to time the statistics launches alone with (`stats_kernel_ms`);
    `opts`: KernelOptions (None: the defaults)."""
    chunk_bytes = distributed.CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    pc = engine.compile(root, device="cuda", kernel_options=opts)
    sched = schedule(BATCH)  # the same EM settings as the single-GPU comparison
    hist = optim.fit(
        pc,
        data_cpu,
        epochs=epochs,
        schedule=sched,
        generator=torch.Generator().manual_seed(SEED),
        distributed=ranks.world > 1,
        reduce_dtype=reduce_dtype,
        reduce_overlap=overlap,
        reduce_chunk_bytes=chunk_bytes,
    )
    steps = data_cpu.shape[0] // (BATCH * ranks.world)
    out = {
        "epoch_s": None,
        "ll": None,
        "steps_per_epoch": steps,
        "reduce_dtype": reduce_dtype,
        "overlap": overlap,
        "reduce_chunk_bytes": chunk_bytes,
        "stats_chunk_rows": {  # input layer -> rows per chunk, as the reducer asks for them
            str(i): r for i, r in distributed._stats_chunk_rows(pc, chunk_bytes).items()
        }
        if ranks.world > 1 and overlap and reduce_dtype == "fp32"
        else {},
    }
    if time_stats:
        out["stats_ms"] = stats_kernel_ms(pc, data_cpu[:BATCH].cuda(), list(time_stats))
    if ranks.world > 1:
        out["allreduce_ms"] = allreduce_ms(pc, reduce_dtype)
    if hist:  # rank 0
        out.update(
            epoch_s=statistics.median(h["seconds"] for h in hist[1:]),
            pass_ll=hist[-1]["pass_ll"],
            train_ll=hist[-1]["train_ll"],
            graph_batches=hist[-1].get("graph_batches"),
        )
        if ranks.world > 1:
            out["allreduce_share"] = out["allreduce_ms"] / 1e3 / (out["epoch_s"] / steps)
    return out


def run_chunk_ab(root, data_cpu, ranks, epochs, sizes) -> dict:
    """`run_ours` once per statistics chunk size in bytes (the --chunk-ab variants), keyed by it."""
    return {str(b): run_ours(root, data_cpu, ranks, epochs, chunk_bytes=b) for b in sizes}


def run_undeferred(root, data_cpu, ranks, epochs) -> dict:
    """`run_ours` with every all-reduce waited for before the EM update (the --defer-ab variant)."""
    distributed.DEFER_STATS = False
    try:
        return run_ours(root, data_cpu, ranks, epochs)
    finally:
        distributed.DEFER_STATS = True


def normal_priority_group():
    """An NCCL group over every rank whose stream has normal priority (every rank calls this together):
    the --priority-ab variant's, since `distributed.join` made the default group high-priority."""
    group = dist.new_group(backend="nccl")
    dist.all_reduce(torch.zeros(1, device="cuda"), group=group)  # connect it outside any graph capture
    return group


def run_normal_priority(root, data_cpu, ranks, epochs, group) -> dict:
    """`run_ours` with the flows all-reduced on `group` (normal priority): the --priority-ab variant."""
    made = distributed.flow_group
    distributed.flow_group = lambda device="cuda": group
    try:
        return run_ours(root, data_cpu, ranks, epochs)
    finally:
        distributed.flow_group = made


def run_pyjuice(juice, bridge, root, data_u8, ranks, epochs) -> dict:
    pc = juice.compile(bridge.to_pyjuice(root, juice), verbose=False)
    pc.to("cuda")
    opt = juice.optim.MiniBatchEM(
        pc, step_size=STEP, pseudocount=PSEUDO, keep_zero_params=True, ddp=ranks.world > 1
    )
    orders = epoch_orders(data_u8.shape[0], epochs)
    g = BATCH * ranks.world
    steps = data_u8.shape[0] // g
    bridge.record_graphs(pc, data_u8[:BATCH].long())
    times = []
    for order in orders:
        mine = distributed.shard_batches(order, BATCH, ranks).cuda()
        batches = (data_u8[mine[i * BATCH : (i + 1) * BATCH]].long() for i in range(steps))
        if ranks.world > 1:
            dist.barrier()
        t0 = sync_time()
        ll_sum = bridge.tutorial_epoch(pc, opt, batches)
        times.append(sync_time() - t0)
    return {"epoch_s": statistics.median(times[1:]), "epoch_all_s": times, "rank_ll_sum": ll_sum}


def parse_options(text: str) -> KernelOptions:
    """`NAME=VALUE[,NAME=VALUE]` -> KernelOptions (`precision` a word, the rest integers)."""
    kw = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        if not sep or not key or not val:
            raise SystemExit(f"--options-ab: {part!r} is not NAME=VALUE")
        try:
            kw[key] = val if key == "precision" else int(val)
        except ValueError:
            raise SystemExit(f"--options-ab: {key} needs an integer, got {val!r}") from None
    try:
        return KernelOptions(**kw)
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--options-ab: {err}") from None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["hclt:256", "hclt:512", "pd:128", "pd:256"])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-pyjuice", action="store_true")
    ap.add_argument(
        "--overlap-ab",
        action="store_true",
        help="also time ours with the flows all-reduced after the flows pass instead of bucket by "
        "bucket during it (2+ GPUs), in the same run, in alternating order",
    )
    ap.add_argument(
        "--bf16-reduce",
        action="store_true",
        help="also time ours with the flows summed in bfloat16 (2+ GPUs), in the same run",
    )
    ap.add_argument(
        "--chunk-ab",
        nargs="*",
        type=float,
        default=None,
        metavar="MIB",
        help="also time ours with the input statistics reduced in chunks of these MiB (0: one "
        "all-reduce after the layer; no value: 32) besides the default chunk size (2+ GPUs), in the "
        "same processes, in alternating order; every run also times the statistics launches alone, "
        "chunked and not",
    )
    ap.add_argument(
        "--early-ab",
        action="store_true",
        help="also time ours with the input statistics all computed after the flows pass "
        "(KernelOptions(early_stats=False)) on any number of GPUs, in the same processes, in alternating order",
    )
    ap.add_argument(
        "--defer-ab",
        action="store_true",
        help="also time ours with every all-reduce waited for before the EM update starts "
        "(engine.distributed.DEFER_STATS = False) on 2+ GPUs, in the same processes, in alternating order",
    )
    ap.add_argument(
        "--priority-ab",
        action="store_true",
        help="also time ours with the flows all-reduced on an NCCL group of normal priority (the default "
        "group, made by distributed.join, has high priority) on 2+ GPUs, in the same processes, "
        "in alternating order",
    )
    ap.add_argument(
        "--options-ab",
        default=None,
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also time ours with these KernelOptions (e.g. early_stats=0,elem_block_b=128) on any number "
        "of GPUs, "
        "in the same processes, in alternating order",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--table", nargs="*", default=None, help="print the table of these result files")
    args = ap.parse_args()
    if args.table is not None:
        return print_table([json.load(open(f)) for f in args.table])
    ranks, device = distributed.join("cuda")
    juice = bridge = None
    if not args.no_pyjuice:
        import pyjuice as juice
        import pyjuice_bridge as bridge
    normal_group = normal_priority_group() if args.priority_ab and ranks.world > 1 else None
    data_u8 = mnist_like(60000).to(torch.uint8)
    data_cpu = data_u8.clone()
    data_u8 = data_u8.to(device)
    info = {
        "device": torch.cuda.get_device_name(),
        "gpus": ranks.world,
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "per_gpu_batch": BATCH,
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "results": [],
    }
    for spec in args.configs:
        t_config = time.perf_counter()
        kind, nl = spec.split(":")
        torch.manual_seed(0)  # the same circuit and initial parameters on every rank
        root = ours_build(kind, int(nl), data_u8[:20000].long())
        sizes = [int(m * 2**20) for m in (args.chunk_ab or [32])] if args.chunk_ab is not None else []
        timed = sorted({distributed.CHUNK_BYTES, *sizes} - {0}) if args.chunk_ab is not None else ()
        multi = ranks.world > 1
        chunks = sizes if multi else []
        extra = parse_options(args.options_ab) if args.options_ab else None
        base = (root, data_cpu, ranks, args.epochs)
        # variants timed beside the default in the same processes, in alternating order:
        # (row key, key saying which went first, its words when the variant did, run)
        one, ab = "variant first", []
        if args.overlap_ab and multi:  # "ours" is the default (overlapped); this is the plain one
            ab.append(("ours_plain_reduce", None, None, partial(run_ours, *base, overlap=False)))
        if args.early_ab and has_early_stats(root):  # PD: no row is final early, the runs would be equal
            late = KernelOptions(early_stats=False)
            ab.append(("ours_early_off", "early_ab_order", one, partial(run_ours, *base, opts=late)))
        if args.defer_ab and multi:
            ab.append(("ours_undeferred", "defer_ab_order", one, partial(run_undeferred, *base)))
        if extra is not None:
            ab.append(("ours_options", "options_ab_order", one, partial(run_ours, *base, opts=extra)))
        if args.priority_ab and multi:
            normal = partial(run_normal_priority, *base, normal_group)
            ab.append(("ours_normal_priority", "priority_ab_order", one, normal))
        if chunks:
            ab.append(
                ("ours_chunk_ab", "chunk_ab_order", "variants first", partial(run_chunk_ab, *base, chunks))
            )
        odd = len(info["results"]) % 2 == 1  # alternate which goes first: the default, or the variants
        first = {key: run() for key, _, _, run in ab} if odd else {}
        row = {
            "config": f"{kind}-{nl}",
            "ours": run_ours(root, data_cpu, ranks, args.epochs, time_stats=timed),
        }
        for key, order, words, run in ab:
            row[key] = first[key] if odd else run()
            if order is not None:
                row[order] = words if odd else "default first"
        if extra is not None:
            row["options_ab"] = args.options_ab
        if args.bf16_reduce and multi:
            row["ours_bf16_reduce"] = run_ours(root, data_cpu, ranks, args.epochs, "bf16")
        if juice is not None:
            row["pyjuice"] = run_pyjuice(juice, bridge, root, data_u8, ranks, args.epochs)
        row["wall_s"] = round(time.perf_counter() - t_config, 1)  # build, all runs and timings of this row
        if ranks.is_main:
            print(row, flush=True)
        info["results"].append(row)
        torch.cuda.empty_cache()
        if ranks.is_main and args.out:  # after every configuration: a call cut short keeps the rows done
            info["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1)
    dist.destroy_process_group()


def print_table(runs):
    runs = sorted(runs, key=lambda r: r["gpus"])
    base = {r["config"]: r for r in runs[0]["results"]}
    print(
        f"{'config':9s} {'GPUs':>4s} | {'ours s/ep':>9s} {'scale':>5s} {'allred%':>7s} | {'PJ s/ep':>8s} "
        f"{'scale':>5s} | {'ours vs PJ':>10s} | {'bf16-red s/ep':>13s} {'scale':>5s} {'allred%':>7s} {'train LL':>9s}"
    )
    for run in runs:
        for row in run["results"]:
            o, p = row["ours"], row.get("pyjuice", {})
            b = base[row["config"]]
            nan = float("nan")
            so = b["ours"]["epoch_s"] / o["epoch_s"]
            sp = b.get("pyjuice", {}).get("epoch_s", nan) / p.get("epoch_s", nan)
            share = 100 * o.get("allreduce_share", 0.0)
            print(
                f"{row['config']:9s} {run['gpus']:4d} | {o['epoch_s']:9.3f} {so:5.2f} {share:7.1f} | "
                f"{p.get('epoch_s', nan):8.3f} {sp:5.2f} | {p.get('epoch_s', nan) / o['epoch_s']:10.2f}",
                end="",
            )
            v = row.get("ours_plain_reduce") or row.get("ours_overlap")
            if v:
                print(
                    f" | overlap={v['overlap']} {v['epoch_s']:.3f} s/ep, scaling {b['ours']['epoch_s'] / v['epoch_s']:.2f}, "
                    f"train LL {v['train_ll']:.4f}",
                    end="",
                )
            h = row.get("ours_bf16_reduce")
            if h:
                print(
                    f" | {h['epoch_s']:13.3f} {b['ours']['epoch_s'] / h['epoch_s']:5.2f} "
                    f"{100 * h.get('allreduce_share', 0.0):7.1f} {h['train_ll']:9.4f} (fp32 {o['train_ll']:.4f})",
                    end="",
                )
            u = row.get("ours_undeferred")
            if u:
                print(
                    f" | EM after every all-reduce: {u['epoch_s']:.3f} s/ep, scaling "
                    f"{b['ours']['epoch_s'] / u['epoch_s']:.2f}, train LL {u['train_ll']:.4f}",
                    end="",
                )
            x = row.get("ours_options")
            if x:
                x1 = (b.get("ours_options") or b["ours"])["epoch_s"]
                print(
                    f" | {row['options_ab']}: {x['epoch_s']:.3f} s/ep, scaling {x1 / x['epoch_s']:.2f}, "
                    f"train LL {x['train_ll']:.4f}",
                    end="",
                )
            n = row.get("ours_normal_priority")
            if n:
                print(
                    f" | normal-priority NCCL: {n['epoch_s']:.3f} s/ep, scaling "
                    f"{b['ours']['epoch_s'] / n['epoch_s']:.2f}, train LL {n['train_ll']:.4f}",
                    end="",
                )
            e = row.get("ours_early_off")
            if e:
                e1 = (b.get("ours_early_off") or b["ours"])["epoch_s"]  # 1 GPU without the A/B: the default
                print(
                    f" | statistics all at the end: {e['epoch_s']:.3f} s/ep, scaling {e1 / e['epoch_s']:.2f}, "
                    f"train LL {e['train_ll']:.4f} (early {o['train_ll']:.4f})",
                    end="",
                )
            ab = row.get("ours_chunk_ab", {})
            if ab:  # "ours" ran with the default chunk size
                mib = o.get("reduce_chunk_bytes", 0) / 2**20
                print(f" | chunks {mib:g} MiB: train LL {o['train_ll']:.4f}", end="")
            for key, c in ab.items():
                print(
                    f" | chunks {int(key) / 2**20:g} MiB: {c['epoch_s']:.3f} s/ep, scaling "
                    f"{b['ours']['epoch_s'] / c['epoch_s']:.2f}, train LL {c['train_ll']:.4f}",
                    end="",
                )
            st = o.get("stats_ms")
            if st:
                launches = {k: sum(v.values()) for k, v in st["chunks"].items()}
                print(
                    f" | stats kernel alone: one launch {st['one']:.3f} ms"
                    + "".join(
                        f", {k} MiB {v:.3f} ms ({launches[k]} launches)" for k, v in st["chunked"].items()
                    ),
                    end="",
                )
            print()


if __name__ == "__main__":
    main()
