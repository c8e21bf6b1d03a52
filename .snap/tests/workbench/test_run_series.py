"""RunState folds events in place (linear over a long run) with the JobRunner's own status fold."""

import time

from workbench.services.jobs import Job, JobRunner, JobSpec
from workbench.services.store import RunStore
from workbench.state.runs import SERIES, RunState


def _batch(i: int) -> dict:
    return {"type": "batch", "epoch": 1, "batch": i, "num_batches": 10**6, "ll": -1.0, "examples_per_s": 5.0}


def _memory(i: int) -> dict:
    return {
        "type": "memory",
        "t": float(i),
        "allocated": i,
        "reserved": i,
        "peak_allocated": i,
        "peak_reserved": i,
    }


def test_apply_appends_to_the_same_lists_and_triggers_watchers_once_per_call():
    run = RunState()
    lists = {(s, k): id(v) for s in SERIES for k, v in getattr(run, s).items()}
    fired = []
    run.param.watch(
        lambda *events: fired.append(sorted(e.name for e in events)), ["epochs", "batches", "version"]
    )
    n = 2000
    for i in range(1, n + 1):
        run.apply([_batch(i), _memory(i)] + ([{"type": "epoch", "epoch": i}] if i % 100 == 0 else []))
    assert {(s, k): id(v) for s in SERIES for k, v in getattr(run, s).items()} == lists  # no copies
    assert len(run.batches["step"]) == len(run.memory_series["t"]) == n
    assert run.batches["batch"][:3] == [1, 2, 3] and run.epochs["epoch"][-1] == n
    assert run.version == n and len(fired) == n  # one batched watcher call per apply
    assert all("version" in f and "batches" in f for f in fired)
    assert sum("epochs" in f for f in fired) == n // 100  # epochs triggered only when it grew


def test_apply_cost_does_not_grow_with_the_run():
    """The last 500 events cost about what the first 500 did (a copy per call was quadratic)."""
    run = RunState()
    spans = []
    for chunk in range(12):
        t0 = time.perf_counter()
        for i in range(500):
            run.apply([_batch(chunk * 500 + i + 1)])
        spans.append(time.perf_counter() - t0)
    assert spans[-1] < 3 * min(spans[:3]) + 0.05, spans


def test_runner_and_run_state_fold_status_alike(tmp_path):
    events = [
        {"type": "status", "status": "running", "message": "", "device": "cpu"},
        {"type": "error", "message": "log-likelihood became NaN"},
        {"type": "status", "status": "running", "message": "late"},  # after the end: ignored
        {"type": "done", "status": "done"},
    ]
    runner = JobRunner(RunStore(tmp_path))
    try:
        run_id = runner.store.create({"circuit": {"source": "template"}})
        job = Job(run_id, JobSpec(circuit={"source": "template"}), status="starting")
        runner._handle(job, events)
    finally:
        runner.shutdown()
    run = RunState(status="starting")
    run.apply(events)
    assert (job.status, job.message) == (run.status, run.message) == ("failed", "log-likelihood became NaN")
    assert runner.store.status(run_id)["status"] == "failed" and run.device == "cpu"
