"""Workbench multi-GPU jobs (issue 12): epoch time on 1 and N ranks through JobRunner, and the
all-reduce's share of each rank's profiled step, as the Train tab shows them.

    python benchmarks/workbench_ranks.py --gpus 2 --data bnetflix --latents 256 --epochs 4
    CW_RANKS_ON_CPU=1 python benchmarks/workbench_ranks.py --gpus 2 --latents 4 --device cpu   # CPU check

Prints one JSON line per run: gpus, median mini-batch epoch seconds (the first epoch, with compiles
and CUDA-graph capture, left out), final train LL, and per-rank all-reduce share. The batch size is
per rank, so N ranks train N times the rows per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile


def main() -> None:
    from workbench.services.jobs import JobRunner, JobSpec
    from workbench.services.store import RunStore
    from workbench.state import RunState

    p = argparse.ArgumentParser()
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--data", default="bnetflix")
    p.add_argument("--template", default="hclt")
    p.add_argument("--latents", type=int, default=256)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    runner = JobRunner(RunStore(tempfile.mkdtemp(prefix="cw-ranks-bench-")))
    try:
        for gpus in sorted({1, args.gpus}):
            spec = JobSpec(
                circuit={"source": "template", "template": args.template, "num_latents": args.latents},
                dataset=args.data,
                epochs=args.epochs,
                full_batch_epochs=0,
                batch_size=args.batch_size,
                device=args.device,
                gpus=gpus,
                profile_interval_s=1.0,
            )
            job = runner.start(spec)
            if not runner.wait(job.job_id, 3600) or job.status != "done":
                print(json.dumps({"gpus": gpus, "status": job.status, "message": job.message}))
                continue
            run = RunState.from_store(runner.store, job.job_id)
            seconds = run.epochs["seconds"][1:] or run.epochs["seconds"]
            print(
                json.dumps(
                    {
                        "gpus": gpus,
                        "template": args.template,
                        "latents": args.latents,
                        "data": args.data,
                        "batch_per_rank": args.batch_size,
                        "epoch_s_median": statistics.median(seconds),
                        "train_ll": run.epochs["train_ll"][-1],
                        "device": run.device,
                        "allreduce_share": {
                            r: round(st["allreduce_share"], 4) for r, st in sorted(run.ranks.items())
                        },
                        "allreduce_ms": {
                            r: round(st["allreduce_ms"], 4) for r, st in sorted(run.ranks.items())
                        },
                    }
                ),
                flush=True,
            )
    finally:
        runner.shutdown()


if __name__ == "__main__":
    main()
