"""Where a data-parallel training step's time goes: a kernel timeline of the CUDA-graph step, per rank.

    torchrun --nproc-per-node 1 benchmarks/step_trace.py --configs hclt:256 --out $OUT/trace_1.json
    torchrun --nproc-per-node 2 benchmarks/step_trace.py --configs hclt:256 --out $OUT/trace_2.json
    python3 benchmarks/step_trace.py --compare $OUT/trace_1.json $OUT/trace_2.json

The step `fit(distributed=True)` replays (scaling.py's circuit, per-GPU batch 512, the same EM
settings), captured, warmed up, then replayed `--steps` times under `torch.profiler` with the host
waiting and pausing 2 ms between replays, so each step is one island of kernels. Per step (rank 0):
its length, the kernels' summed time (NCCL apart), every NCCL kernel's start and length, and the
last kernels of the step with their streams: the exposed tail after the flows pass. Against one GPU
the same numbers say whether two GPUs lengthen the step by the exposed all-reduce (the tail) or by
slowing the compute kernels (the summed compute time). Diagnosis only: the epoch times users meet
are scaling.py's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import torch
import torch.distributed as dist

sys.path.insert(0, ".")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_pyjuice import PSEUDO, STEP, ours_build  # noqa: E402

import engine  # noqa: E402
from engine import distributed  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.optim import _Driver  # noqa: E402

BATCH = 512
GAP_S = 0.002


def kernels_of(trace_path: str) -> list[dict]:
    """The chrome trace's GPU kernels: name, stream, start and end in us."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    out = []
    for e in events:
        if e.get("cat") == "kernel" and "dur" in e:
            out.append(
                {
                    "name": e["name"],
                    "stream": e.get("args", {}).get("stream"),
                    "t0": float(e["ts"]),
                    "t1": float(e["ts"]) + float(e["dur"]),
                }
            )
    return sorted(out, key=lambda k: k["t0"])


def islands(kernels: list[dict], gap_us: float = 1000.0) -> list[list[dict]]:
    """Kernels split where nothing ran for `gap_us` (the host's pause between replays)."""
    steps, cur, end = [], [], 0.0
    for k in kernels:
        if cur and k["t0"] - end > gap_us:
            steps.append(cur)
            cur = []
        end = k["t1"] if not cur else max(end, k["t1"])
        cur.append(k)
    if cur:
        steps.append(cur)
    return steps


def is_nccl(name: str) -> bool:
    return "nccl" in name.lower()


def in_flows_pass(name: str) -> bool:
    """A kernel of the forward or flows pass: not NCCL, not an EM update, not the LL bookkeeping
    (PyTorch's own elementwise and reduce kernels at the end of the step)."""
    return not (is_nccl(name) or "em_kernel" in name or name.startswith("void at::"))


def summarise(step: list[dict], tail: int = 24) -> dict | None:
    """One step's numbers (us from its first kernel); None for an island without pass kernels.

    `after_flows_us`: from the end of the flows pass (its last kernel, the input statistics) to the
    step's end: the EM updates, and on several GPUs whatever all-reduce they wait for.
    `last_nccl_delay_us`: from the end of the flows pass to the start of the step's last NCCL kernel
    (the last statistics' all-reduce waits for the pass; a long delay means it queued behind compute)."""
    passes = [k for k in step if in_flows_pass(k["name"])]
    if not passes:
        return None
    t0 = step[0]["t0"]
    t1 = max(k["t1"] for k in step)
    flows_end = max(k["t1"] for k in passes)
    compute = [k for k in step if not is_nccl(k["name"])]
    nccl = [k for k in step if is_nccl(k["name"])]
    by_name = defaultdict(float)
    for k in compute:
        by_name[k["name"][:60]] += k["t1"] - k["t0"]
    return {
        "step_us": t1 - t0,
        "compute_sum_us": sum(k["t1"] - k["t0"] for k in compute),
        "compute_kernels": len(compute),
        "nccl_sum_us": sum(k["t1"] - k["t0"] for k in nccl),  # includes waiting for the other ranks
        "nccl": [(round(k["t0"] - t0, 1), round(k["t1"] - k["t0"], 1)) for k in nccl],
        "flows_end_us": flows_end - t0,
        "after_flows_us": t1 - flows_end,
        "last_nccl_delay_us": (nccl[-1]["t0"] - flows_end) if nccl else None,
        "by_name_us": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
        "tail": [
            (k["name"][:50], k["stream"], round(k["t0"] - t0, 1), round(k["t1"] - k["t0"], 1))
            for k in sorted(step, key=lambda k: k["t1"])[-tail:]
        ],
        "streams": sorted({k["stream"] for k in step}, key=str),
    }


def median_step(steps: list[dict]) -> dict:
    """The step of median length (an odd count's middle one, else the shorter of the two)."""
    ordered = sorted(steps, key=lambda p: p["step_us"])
    return ordered[(len(ordered) - 1) // 2]


def summary(found: list[list[dict]]) -> dict:
    """The medians over the steps found; the first island is dropped (the ranks' first collective
    absorbs their skew from before the profiler started)."""
    keep = [p for p in (summarise(s) for s in found[1:]) if p is not None]
    out = {"steps_found": len(found), "steps_kept": len(keep)}
    for key in ("step_us", "compute_sum_us", "nccl_sum_us", "after_flows_us"):
        out[f"{key}_median"] = statistics.median(p[key] for p in keep)
    delays = [p["last_nccl_delay_us"] for p in keep if p["last_nccl_delay_us"] is not None]
    out["last_nccl_delay_us"] = sorted(round(d, 1) for d in delays)
    out["steps"] = keep
    return out


def trace_config(spec: str, data_u8, ranks, steps: int, out_dir: str) -> dict:
    from torch.profiler import ProfilerActivity, profile

    kind, nl = spec.split(":")
    torch.manual_seed(0)
    root = ours_build(kind, int(nl), data_u8[:20000].long())
    pc = engine.compile(root, device="cuda")
    world = ranks.world > 1
    if world:
        distributed.broadcast_parameters(pc)
    driver = _Driver(pc, BATCH, ranks=ranks if world else None)
    step = driver.step("em", (STEP, PSEUDO))
    rows = data_u8[ranks.rank * BATCH :]
    xs = [rows[(i * ranks.world) * BATCH : (i * ranks.world) * BATCH + BATCH] for i in range(steps + 7)]
    for x in xs[:6]:  # eager, capture, replays
        step(x)
    torch.cuda.synchronize()
    if world:
        dist.barrier()  # the ranks start the profiled replays together (within the host's jitter)
    path = os.path.join(out_dir, f"trace_{kind}{nl}_r{ranks.rank}.json")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for x in xs[6:]:  # one more than asked for: the first island is dropped
            step(x)
            torch.cuda.synchronize()
            time.sleep(GAP_S)
    prof.export_chrome_trace(path)
    out = {"config": f"{kind}-{nl}", "rank": ranks.rank, "graph_replays": step.replays}
    out.update(summary(islands(kernels_of(path))))
    driver.close()
    del pc
    torch.cuda.empty_cache()
    return out


def compare(paths: list[str]) -> None:
    runs = [json.load(open(p)) for p in paths]
    print(
        f"{'config':9s} {'gpus':>4s} {'rank':>4s} | {'step us':>8s} {'compute':>8s} {'nccl':>8s} "
        f"{'after flows':>11s} | last all-reduce's delay after the pass (us)"
    )
    for run in runs:
        for r in run["results"]:
            print(
                f"{r['config']:9s} {run['gpus']:4d} {r.get('rank', 0):4d} | {r['step_us_median']:8.0f} "
                f"{r['compute_sum_us_median']:8.0f} {r['nccl_sum_us_median']:8.0f} "
                f"{r['after_flows_us_median']:11.0f} | {r['last_nccl_delay_us']}"
            )
    if len(runs) == 2:
        first = [[r for r in run["results"] if r.get("rank", 0) == 0] for run in runs]
        for a, b in zip(*first):
            na, nb = median_step(a["steps"])["by_name_us"], median_step(b["steps"])["by_name_us"]
            diffs = sorted(((nb.get(k, 0) - na.get(k, 0), k) for k in set(na) | set(nb)), reverse=True)
            print(f"\n{a['config']}: kernels slower on {runs[1]['gpus']} GPUs (us, the median step, rank 0)")
            for d, k in diffs[:12]:
                print(f"  {d:+8.1f}  {na.get(k, 0):8.1f} -> {nb.get(k, 0):8.1f}  {k}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["hclt:256"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare", nargs="*", default=None)
    args = ap.parse_args()
    if args.compare is not None:
        return compare(args.compare)
    ranks, device = distributed.join("cuda")
    data_u8 = mnist_like(60000).to(torch.uint8).to(device)
    out_dir = os.path.dirname(args.out) if args.out else tempfile.mkdtemp()
    info = {
        "device": torch.cuda.get_device_name(),
        "gpus": ranks.world,
        "torch": torch.__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "nccl_nvls_enable": os.environ.get("NCCL_NVLS_ENABLE"),
        "results": [],
    }
    for spec in args.configs:
        mine = trace_config(spec, data_u8, ranks, args.steps, out_dir)
        every = [None] * ranks.world
        dist.all_gather_object(every, mine)  # every rank's summary: their steps differ by their skew
        info["results"] += every
    if ranks.is_main and args.out:
        with open(args.out, "w") as f:
            json.dump(info, f, indent=1)
        compare([args.out])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
