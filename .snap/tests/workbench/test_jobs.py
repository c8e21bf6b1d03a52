"""JobRunner end to end on CPU: a real worker process, streamed events, the store, control, errors."""

import json
import time

import pytest

from workbench.services.jobs import JobRunner, JobSpec
from workbench.services.store import RunStore
from workbench.state import RunState

HCLT = {"source": "template", "template": "hclt", "num_latents": 8}


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    r = JobRunner(RunStore(tmp_path_factory.mktemp("runs")), stop_timeout=5.0)
    yield r
    r.shutdown()


def _wait_for(pred, timeout=60.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


def test_two_epoch_job_streams_events_and_writes_store(runner):
    job = runner.start(JobSpec(circuit=HCLT, dataset="nltcs", epochs=2, full_batch_epochs=0, threads=1))
    run = RunState.for_job(job)
    assert runner.wait(job.job_id, 120), job.status
    assert job.status == "done", job.message
    run.poll()
    assert run.epochs["epoch"] == [1, 2] and run.epochs["valid_ll"][-1] < 0
    assert run.epochs["train_ll"][1] > run.epochs["train_ll"][0]  # EM improves the likelihood
    assert run.layer_times and {r["pass"] for r in run.layer_times} == {"forward", "recompute", "backward"}
    assert run.progress["batch"] == run.progress["num_batches"]
    assert run.device == "cpu" and run.memory  # memory events arrive (zeros on CPU)
    store = runner.store
    d = store.path(job.job_id)
    assert {"spec.json", "status.json", "metrics.jsonl", "plan.json", "model.cwpc"} <= {
        p.name for p in d.iterdir()
    }
    assert store.status(job.job_id)["status"] == "done"
    assert [e["epoch"] for e in store.events(job.job_id, ("epoch",))] == [1, 2]
    assert json.loads((d / "spec.json").read_text())["circuit"] == HCLT
    again = RunState.from_store(store, job.job_id)  # a later session sees the same series
    assert again.epochs == run.epochs and again.status == "done" and again.plan["layers"]
    import engine

    assert engine.load(store.model_path(job.job_id)) is not None


def test_pause_resume_stop(runner):
    job = runner.start(
        JobSpec(circuit=HCLT, dataset="nltcs", epochs=50, batch_size=32, threads=1, batch_interval_s=0.0)
    )
    n_batches = lambda: sum(e["type"] == "batch" for e in job.drain(0)[0])  # noqa: E731
    assert _wait_for(lambda: n_batches() > 0), job.message
    runner.pause(job.job_id)
    assert _wait_for(lambda: job.status == "paused", 10)
    time.sleep(0.1)
    frozen = n_batches()
    time.sleep(0.5)
    assert n_batches() == frozen  # the worker blocks between batches
    runner.resume(job.job_id)
    assert _wait_for(lambda: n_batches() > frozen, 10) and job.status == "running"
    runner.stop(job.job_id)
    assert runner.wait(job.job_id, 20)
    assert job.status == "stopped"
    assert runner.store.model_path(job.job_id).exists()  # a stopped run keeps its model so far
    assert runner.store.status(job.job_id)["status"] == "stopped"


def test_stop_terminates_after_timeout(runner):
    job = runner.start(JobSpec(circuit=HCLT, dataset="nltcs", epochs=50, batch_size=32, threads=1))
    assert _wait_for(lambda: job.status == "running")
    runner.pause(job.job_id)
    job.stop_event.set = lambda: None  # simulate a worker that ignores the cooperative stop
    runner.stop(job.job_id, timeout=0.3)
    assert runner.wait(job.job_id, 10) and job.status == "stopped"
    assert "terminated" in job.message and not job.process.is_alive()


@pytest.mark.parametrize(
    "spec, reason",
    [
        ({"circuit": HCLT, "dataset": "missing-file.npy"}, "not found"),
        ({"circuit": {"source": "graph", "nodes": [], "edges": []}, "dataset": "nltcs"}, "empty"),
        ({"circuit": {**HCLT, "template": "pd", "data_shape": [3, 3]}, "dataset": "nltcs"}, "9 variables"),
    ],
)
def test_worker_errors_come_back_as_events(runner, spec, reason):
    job = runner.start(JobSpec(**spec, epochs=1))
    assert runner.wait(job.job_id, 60)
    assert job.status == "failed" and reason in job.message, job.message
    errors = runner.store.events(job.job_id, ("error",))
    assert errors and reason in errors[0]["message"] and "Traceback" in errors[0]["traceback"]
    assert runner.store.status(job.job_id)["status"] == "failed"


def test_bad_spec_is_refused_before_starting(runner):
    with pytest.raises(ValueError, match="batch_size"):
        runner.start(JobSpec(circuit=HCLT, batch_size=0))
    with pytest.raises(ValueError, match="device"):
        runner.start({"circuit": HCLT, "device": "tpu"})
