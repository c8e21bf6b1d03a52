"""Workbench service metrics: streaming latency and rate, training overhead of streaming, layout speed.

    PYTHONPATH=. .venv/bin/python benchmarks/workbench_metrics.py [--epochs 4] [--latents 32]

Measures, on whatever machine it runs (the worker uses CUDA if it has it; this process never does):
- time from JobRunner.start to the first streamed event, the first batch event and the first epoch;
- event update rate seen by the server while training (events/s, and layer_times updates/s);
- training throughput (examples/s of the mini-batch EM epochs, first epoch excluded as warm-up)
  of a streamed job (profiling on, and off) relative to headless `engine.optim.fit` in-process;
- layout time for an HCLT on 784 variables with 128 latents (~250K nodes): plan, layer overview,
  vector DAG, block level and block matrix.
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def headless_throughput(args) -> dict:
    """engine.optim.fit directly (no callback, no profiling), in a spawned process like the worker's."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_headless_entry, args=(vars(args), q))
    p.start()
    out = q.get(timeout=1800)
    p.join()
    if "error" in out:
        raise RuntimeError(out["error"])
    return out


def _headless_entry(args: dict, q) -> None:
    try:
        import torch

        import engine
        from engine.data import load_dataset
        from engine.optim import fit
        from workbench.services.circuits import build

        if args["threads"]:
            torch.set_num_threads(args["threads"])
        device = args["device"]
        if device == "auto":  # what the worker's "auto" picks
            device = "cuda" if torch.cuda.is_available() else "cpu"
        ds = load_dataset(args["dataset"])
        pc = engine.compile(build(_circuit(args), ds).root, device=device)
        hist = fit(
            pc,
            ds.train.to(device),
            ds.valid.to(device),
            ds.test.to(device),
            args["epochs"],
            _job_spec(args, profile=False).schedule(),  # the very schedule the streamed job uses
        )
        q.put({"device": device, **_epoch_rate(hist, ds.train.shape[0])})
    except Exception as err:  # noqa: BLE001 - report, don't hang the parent
        q.put({"error": repr(err)})


def _job_spec(args, profile: bool):
    """The job both runs train: mini-batch EM epochs only (full-batch epochs would mix two costs)."""
    from workbench.services.jobs import JobSpec

    a = args if isinstance(args, dict) else vars(args)
    return JobSpec(
        circuit=_circuit(a),
        dataset=a["dataset"],
        epochs=a["epochs"],
        batch_size=a["batch_size"],
        full_batch_epochs=0,
        profile=profile,
        threads=a["threads"] or None,
        device=a["device"],
    )


def _circuit(args) -> dict:
    latents = args["latents"] if isinstance(args, dict) else args.latents
    return {"source": "template", "template": "hclt", "num_latents": latents}


def _epoch_rate(epochs: list[dict], n: int) -> dict:
    """Median examples/s over the mini-batch epochs after the first (warm-up)."""
    secs = [e["seconds"] for e in epochs][1:] or [e["seconds"] for e in epochs]
    return {"epoch_seconds": secs, "examples_per_s": n / statistics.median(secs), "num_train": n}


def streamed_job(runner, args, profile: bool) -> dict:
    from engine.data import load_dataset

    n = load_dataset(args.dataset).train.shape[0]
    t0 = time.time()
    job = runner.start(_job_spec(args, profile))
    seen, first, first_batch, first_epoch, polls = 0, None, None, None, []
    while not job.finished:  # a session's periodic callback, at 10 Hz
        events, seen = job.drain(seen)
        now = time.time()
        if events:
            polls.append(now)
        first = first or (now if events else None)
        if first_batch is None and any(e["type"] == "batch" for e in events):
            first_batch = now
        if first_epoch is None and any(e["type"] == "epoch" for e in events):
            first_epoch = now
        time.sleep(0.1)
    all_events, _ = job.drain(0)
    if job.status != "done":
        raise RuntimeError(f"job {job.job_id} ended {job.status}: {job.message}")
    run_events = [e for e in all_events if e["type"] in ("batch", "layer_times", "memory", "epoch")]
    span = run_events[-1]["t"] - run_events[0]["t"]
    epochs = [e for e in all_events if e["type"] == "epoch"]
    lt = [e for e in all_events if e["type"] == "layer_times"]
    return {
        "profile": profile,
        "device": next((e["device"] for e in all_events if e.get("device")), "?"),
        "first_event_s": job.first_event_at - t0,
        "first_batch_s": (first_batch or now) - t0,
        "first_epoch_s": (first_epoch or now) - t0,
        "events": len(all_events),
        "events_per_s": len(run_events) / max(span, 1e-9),
        "layer_time_updates_per_s": len(lt) / max(span, 1e-9),
        "session_updates_per_s": len(polls) / max(polls[-1] - polls[0], 1e-9) if len(polls) > 1 else 0.0,
        **_epoch_rate(epochs, n),
    }


def layout_timing(num_vars: int = 784, num_latents: int = 128) -> dict:
    from engine.compiler import compile_plan
    from engine.dists import Categorical
    from engine.structures import hclt_from_tree
    from workbench.services import layout, plans
    from workbench.services.circuits import describe

    rng = np.random.default_rng(0)
    edges = np.array([[rng.integers(0, i), i] for i in range(1, num_vars)])
    t = time.perf_counter()
    root = hclt_from_tree(edges, num_vars, num_latents, Categorical(256))
    build_s = time.perf_counter() - t
    out = {"num_nodes": describe(root)["num_nodes"], "build_s (engine, not layout)": build_s}
    t0 = time.perf_counter()
    plan, _, _ = compile_plan(root)
    out["compile_plan_s"] = time.perf_counter() - t0
    steps = [
        ("vector_index_s", lambda: layout.VectorIndex(root)),
    ]
    idx = None
    for name, fn in steps:
        t = time.perf_counter()
        idx = fn()
        out[name] = time.perf_counter() - t
    for name, fn in (
        ("layer_overview_s", lambda: layout.layer_overview(plan)),
        ("vector_dag_all_s", lambda: layout.vector_dag(idx)),
        ("block_dag_s", lambda: layout.block_dag(idx, idx.ids[-2])),
        ("block_matrix_s", lambda: plans.block_matrix(plan.sum_layers[0], 256)),
    ):
        t = time.perf_counter()
        fn()
        out[name] = time.perf_counter() - t
    out["layout_total_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="nltcs")
    p.add_argument("--latents", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--threads", type=int, default=0, help="torch threads in both runs (0: torch default)")
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="worker and headless device"
    )
    p.add_argument("--repeats", type=int, default=2, help="interleaved repetitions of the three runs")
    p.add_argument("--skip-layout", action="store_true")
    p.add_argument("--out", default="benchmarks/results/workbench_metrics.json")
    args = p.parse_args()

    from workbench.services.jobs import JobRunner
    from workbench.services.store import RunStore

    results: dict = {"args": vars(args)}
    results["layout"] = {} if args.skip_layout else layout_timing()
    with tempfile.TemporaryDirectory() as d:
        runner = JobRunner(RunStore(d))
        try:  # interleaved, so slow drift of a shared machine hits all three alike
            for _ in range(args.repeats):
                for key, fn in (
                    ("streamed", lambda: streamed_job(runner, args, profile=True)),
                    ("headless", lambda: headless_throughput(args)),
                    ("streamed_noprofile", lambda: streamed_job(runner, args, profile=False)),
                ):
                    results.setdefault(key + "_runs", []).append(fn())
        finally:
            runner.shutdown()
    for key in ("streamed", "headless", "streamed_noprofile"):
        runs = results[key + "_runs"]
        secs = [s for r in runs for s in r["epoch_seconds"]]
        results[key] = {
            **runs[0],
            "epoch_seconds": secs,
            "examples_per_s": runs[0]["num_train"] / statistics.median(secs),
        }
    h = results["headless"]["examples_per_s"]
    results["throughput_ratio"] = results["streamed"]["examples_per_s"] / h
    results["throughput_ratio_noprofile"] = results["streamed_noprofile"]["examples_per_s"] / h
    _print_table(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


def _print_table(r: dict) -> None:
    s, sn, lay = r["streamed"], r["streamed_noprofile"], r["layout"]
    rows = [
        ("start -> first streamed event", f"{s['first_event_s']:.3f} s"),
        ("start -> first batch event", f"{s['first_batch_s']:.2f} s"),
        ("start -> first epoch event", f"{s['first_epoch_s']:.2f} s"),
        ("events/s while training", f"{s['events_per_s']:.1f}"),
        ("layer_times updates/s", f"{s['layer_time_updates_per_s']:.2f}"),
        ("session updates/s (10 Hz poll)", f"{s['session_updates_per_s']:.1f}"),
        ("device (worker / headless)", f"{s.get('device', '?')} / {r['headless'].get('device', '?')}"),
        ("headless examples/s", f"{r['headless']['examples_per_s']:.0f}"),
        ("streamed examples/s (profiling on)", f"{s['examples_per_s']:.0f}"),
        ("streamed examples/s (profiling off)", f"{sn['examples_per_s']:.0f}"),
        ("throughput ratio streamed/headless", f"{r['throughput_ratio']:.3f} (target >= 0.95)"),
        ("ratio, profiling off", f"{r['throughput_ratio_noprofile']:.3f}"),
    ]
    if lay:
        rows += [
            (
                f"layout, {lay['num_nodes']:,}-node HCLT (plan+draw)",
                f"{lay['layout_total_s']:.3f} s (target < 2 s)",
            ),
            ("  of which compile_plan", f"{lay['compile_plan_s']:.3f} s"),
        ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{w}}  {b}")


if __name__ == "__main__":
    main()
