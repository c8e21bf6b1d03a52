"""What is allocated at the peak of the user's training call, by the engine line that allocated it.

    python benchmarks/memory_peak.py --configs hclt:256@128 hclt:256@512 --out $OUT/memory_peak.json

Per configuration and batch size: what `vs_pyjuice.py` measures as ours (compile, the first
log-likelihood, one epoch of `optim.fit` on a uint8 copy of the 60,000 MNIST-shaped rows) under
`torch.cuda.memory._record_memory_history` (`--epochs`, default 2 as vs_pyjuice.py runs); the allocator's trace is replayed to find the moment of
most bytes allocated (blocks count until their free completes, as `max_memory_allocated` counts
them), and the blocks live then are summed by the innermost frame in engine/ or benchmarks/. Used to
find what puts a peak above PyJuice's; a diagnosis, not a timing (recording slows allocations).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_pyjuice import SEED, ours_build, ours_ll, schedule  # noqa: E402

import engine  # noqa: E402
from engine import optim  # noqa: E402
from engine.data import mnist_like  # noqa: E402

OURS = ("/engine/", "/benchmarks/")


def where(frames: list[dict]) -> str:
    """The innermost frame of ours (file:line function), else the innermost frame."""
    for f in frames:
        if any(k in f.get("filename", "") for k in OURS):
            path = f["filename"]
            short = path[path.rfind("/engine/") + 1 :] if "/engine/" in path else os.path.basename(path)
            return f"{short}:{f['line']} {f['name']}"
    return f"{frames[0]['filename']}:{frames[0]['line']}" if frames else "?"


def peak_blocks(trace: list[dict]) -> tuple[int, int, dict[str, int]]:
    """(peak bytes, trace index, bytes by allocation site) from one device's trace."""
    live: dict[int, tuple[int, str]] = {}
    total = best = at = 0
    best_live: dict[int, tuple[int, str]] = {}
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], where(ev.get("frames") or []))
            total += ev["size"]
            if total > best:
                best, at, best_live = total, i, dict(live)
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            total -= live.pop(ev["addr"])[0]
    sites: dict[str, int] = {}
    for size, site in best_live.values():
        sites[site] = sites.get(site, 0) + size
    return best, at, dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def run(kind: str, nl: int, bs: int, data_u8, epochs: int) -> dict:
    data_cpu = data_u8.clone()  # what the user hands fit; the first LL reads a GPU copy (vs_pyjuice.py)
    data_u8 = data_u8.cuda()
    root = ours_build(kind, nl, data_u8[:20000].long())  # outside the region, as in vs_pyjuice
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    pc = engine.compile(root, device="cuda")
    ours_ll(pc, data_u8, bs)
    optim.fit(
        pc, data_cpu, epochs=epochs, schedule=schedule(bs), generator=torch.Generator().manual_seed(SEED)
    )
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated() - base
    dev = torch.cuda.current_device()
    trace = snap["device_traces"][dev]
    peak, at, sites = peak_blocks(trace)
    frames = trace[at].get("frames") or [] if trace else []
    stack = [where([f]) for f in frames if any(k in f.get("filename", "") for k in OURS)]
    del pc, root
    return {
        "config": f"{kind}:{nl}",
        "batch": bs,
        "max_memory_allocated_GB": measured / 1e9,
        "trace_peak_GB": peak / 1e9,
        "trace_index": at,
        "sites_MB": {k: v / 1e6 for k, v in sites.items()},
        "peak_alloc_stack": stack[:12],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--configs", nargs="+", default=["hclt:256@128", "hclt:256@512"], help="kind:latents@batch"
    )
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    data_u8 = mnist_like(60000).to(torch.uint8)
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "results": [],
    }
    for spec in args.configs:
        cfg, bs = spec.split("@")
        kind, nl = cfg.split(":")
        row = run(kind, int(nl), int(bs), data_u8, args.epochs)
        info["results"].append(row)
        print(
            f"\n{row['config']} batch {row['batch']}: max_memory_allocated {row['max_memory_allocated_GB']:.3f} GB, "
            f"trace peak {row['trace_peak_GB']:.3f} GB at event {row['trace_index']}",
            flush=True,
        )
        for site, mb in list(row["sites_MB"].items())[: args.top]:
            print(f"  {mb:10.1f} MB  {site}")
        print("  the allocation that made the peak, innermost first: " + " <- ".join(row["peak_alloc_stack"]))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
