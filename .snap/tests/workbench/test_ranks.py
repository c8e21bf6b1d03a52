"""Data-parallel jobs through the workbench (issue 12), on CPU with gloo ranks (CW_RANKS_ON_CPU=1).

A 2-rank job must train what one process trains with twice the batch and drop-last (the engine's
guarantee, asserted here through JobRunner, the launcher and the store), stream every rank's
per-layer times and all-reduce span, and end as failed with one line when a rank is killed.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import engine
from engine.distributed import ALLREDUCE_LAYER
from workbench.services import ranks
from workbench.services.jobs import JobRunner, JobSpec
from workbench.services.store import RunStore
from workbench.state import RunState

HCLT = {"source": "template", "template": "hclt", "num_latents": 4}
EM = dict(step_size=0.5, final_step_size=0.2, pseudocount=0.1, seed=3)


@pytest.fixture
def runner(tmp_path, monkeypatch):
    monkeypatch.setenv(ranks.RANKS_ON_CPU_ENV, "1")
    monkeypatch.setenv("CW_DIST_TIMEOUT_S", "30")
    r = JobRunner(RunStore(tmp_path / "runs"), stop_timeout=10.0)
    yield r
    r.shutdown()


def _wait_for(pred, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _one_process_reference(batch_size: int, epochs: int, full: int):
    """What one process trains on the same data with batch `batch_size` and drop-last."""
    from engine.data import load_dataset
    from engine.optim import EMSchedule
    from engine.training import TrainConfig, run_training
    from workbench.services.circuits import build

    torch.manual_seed(EM["seed"])
    ds = load_dataset("nltcs")
    root = build(HCLT, ds).root
    schedule = EMSchedule(
        batch_size, EM["step_size"], EM["final_step_size"], EM["pseudocount"], full, drop_last=True
    )
    events = []
    result = run_training(
        root, ds, TrainConfig(epochs=epochs, schedule=schedule, device="cpu"), events.append
    )
    return result.pc, [e for e in events if e["type"] == "epoch"]


def test_two_rank_job_trains_what_one_process_trains_with_double_batch(runner):
    spec = JobSpec(
        circuit=HCLT,
        dataset="nltcs",
        epochs=2,
        full_batch_epochs=1,
        batch_size=64,
        gpus=2,
        threads=2,
        update_interval_s=0.2,
        **EM,
    )
    job = runner.start(spec)
    assert runner.wait(job.job_id, 300), job.status
    assert job.status == "done", job.message
    events = job.drain(0)[0]
    epochs = [e for e in events if e["type"] == "epoch"]
    assert [e["world_size"] for e in epochs] == [2, 2, 2]

    ref_pc, ref_epochs = _one_process_reference(128, 2, 1)
    assert len(ref_epochs) == 3
    for a, b in zip(ref_epochs, epochs):
        for key in ("pass_ll", "train_ll", "valid_ll", "test_ll"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
    pc = engine.load(runner.store.model_path(job.job_id))
    assert torch.allclose(pc.params, ref_pc.params, rtol=1e-4, atol=1e-6)
    for i in range(len(ref_pc.input_layers)):
        assert torch.allclose(pc.input_params(i), ref_pc.input_params(i), rtol=1e-4, atol=1e-6)

    # every rank reported, tagged with its rank; the all-reduce is its own span on each
    joined = {e["rank"]: e for e in events if e["type"] == "rank"}
    assert sorted(joined) == [0, 1] and all(e["device"] == "cpu" for e in joined.values())
    for r in (0, 1):
        records = [x for e in events if e["type"] == "layer_times" and e["rank"] == r for x in e["records"]]
        assert {x["pass"] for x in records} >= {"forward", "backward", "allreduce"}
        allreduce = [x for x in records if x["layer"] == ALLREDUCE_LAYER]
        assert allreduce and all(x["ms"] > 0 and x["calls"] >= 1 for x in allreduce)
        assert any(e["type"] == "memory" and e["rank"] == r for e in events)
    assert {e.get("rank") for e in events if e["type"] in ("batch", "epoch", "plan")} == {0}  # rank 0 reports

    run = RunState.from_store(runner.store, job.job_id)  # the UI's fold: per rank, all-reduce share
    assert sorted(run.ranks) == [0, 1]
    for r in (0, 1):
        share = run.ranks[r]["allreduce_share"]
        assert 0 < share < 1
        assert run.ranks[r]["layer_ms"]
    assert all(x["layer"] != ALLREDUCE_LAYER for x in run.layer_times)  # the per-layer plot keeps plan layers

    from workbench.views.ranks_view import RankPlots

    plots = RankPlots()  # what the Train tab draws for this run: one line and one bar per rank
    plots.update(run)
    assert plots.view.visible and list(plots.step.x_range.factors) == ["0", "1"]
    assert all(a > 0 for a in plots.step_src.data["allreduce"]) and all(
        c > 0 for c in plots.step_src.data["compute"]
    )
    assert "all-reduce share rank 0" in plots.step.title.text
    assert sorted(plots._layer_src) == [0, 1] and all(
        len(src.data["ms"]) > 0 for src in plots._layer_src.values()
    )
    assert all(len(src.data["t"]) > 0 for src in plots._memory_src.values())
    plots.update(RunState(run_id="one-process"))  # a one-process run: the per-rank plots go away
    assert not plots.view.visible


def test_a_killed_rank_fails_the_job_with_one_line_and_leaves_no_process(runner):
    spec = JobSpec(circuit=HCLT, dataset="nltcs", epochs=200, batch_size=32, gpus=2, threads=2, **EM)
    job = runner.start(spec)
    joined = lambda: {e["rank"]: e["pid"] for e in job.drain(0)[0] if e["type"] == "rank"}  # noqa: E731
    assert _wait_for(lambda: len(joined()) == 2 and any(e["type"] == "batch" for e in job.drain(0)[0])), (
        job.status,
        job.message,
    )
    pids = joined()
    worker_pid = job.process.pid
    t0 = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    assert runner.wait(job.job_id, 60), "the job hung after a rank died"
    assert time.monotonic() - t0 < 60
    assert job.status == "failed"
    assert "\n" not in job.message and "Traceback" not in job.message
    assert job.message.startswith("rank 1 exited unexpectedly (killed by SIGKILL)"), job.message
    assert runner.store.status(job.job_id)["status"] == "failed"
    assert _wait_for(lambda: not any(_alive(p) for p in (*pids.values(), worker_pid)), 20), "orphan process"


def test_a_rank_that_fails_on_its_own_names_itself(runner, tmp_path):
    missing = tmp_path / "gone.npy"  # every rank fails to read it: the lowest rank is named
    job = runner.start(JobSpec(circuit=HCLT, dataset=str(missing), epochs=1, gpus=2, threads=2, **EM))
    assert runner.wait(job.job_id, 120)
    assert job.status == "failed" and job.message.startswith("rank 0: "), job.message
    assert "\n" not in job.message


def test_gpus_need_gpus_unless_cpu_ranks_are_allowed(monkeypatch):
    monkeypatch.delenv(ranks.RANKS_ON_CPU_ENV, raising=False)
    assert ranks.visible_gpus() == 0 and not torch.cuda.is_initialized()  # this CI machine: CPU only
    assert ranks.gpu_choices() == [1]  # the Train tab shows no selector
    JobSpec(circuit=HCLT, gpus=1).validate()
    with pytest.raises(ValueError, match="gpus=2 needs 2 CUDA GPUs, but 0 are visible"):
        JobSpec(circuit=HCLT, gpus=2).validate()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="gpus must be a whole number"):
            JobSpec(circuit=HCLT, gpus=bad).validate()
    monkeypatch.setenv(ranks.RANKS_ON_CPU_ENV, "1")
    assert ranks.gpu_choices()[:2] == [1, 2] and len(ranks.gpu_choices()) <= ranks.MAX_CPU_RANKS
    JobSpec(circuit=HCLT, gpus=2, device="cpu").validate()
    with pytest.raises(ValueError, match="at most"):
        JobSpec(circuit=HCLT, gpus=ranks.MAX_CPU_RANKS + 1).validate()


def test_train_tab_offers_gpus_only_when_there_are_several(monkeypatch):
    from workbench.app import configure_panel
    from workbench.state import SessionState
    from workbench.views.training_view import TrainingView

    class _Services:
        runner = store = None

    configure_panel()
    monkeypatch.delenv(ranks.RANKS_ON_CPU_ENV, raising=False)
    view = TrainingView(session=SessionState(_Services()))
    assert not view.gpus.visible and view.gpus.options == [1]
    assert not view.rank_plots.view.visible
    monkeypatch.setenv(ranks.RANKS_ON_CPU_ENV, "1")
    ses = SessionState(_Services())
    view = TrainingView(session=ses)
    assert view.gpus.visible and view.gpus.options[:2] == [1, 2]
    view.gpus.value = 2
    assert ses.job_spec().gpus == 2  # the selector reaches the job's spec


def test_stop_ends_every_rank_and_keeps_the_last_saved_epoch(runner):
    spec = JobSpec(circuit=HCLT, dataset="nltcs", epochs=200, batch_size=32, gpus=2, threads=2, **EM)
    job = runner.start(spec)
    assert _wait_for(lambda: any(e["type"] == "epoch" for e in job.drain(0)[0])), (job.status, job.message)
    pids = [e["pid"] for e in job.drain(0)[0] if e["type"] == "rank"]
    runner.pause(job.job_id)  # ranks train in lockstep: the run says it cannot pause, and trains on
    assert _wait_for(lambda: "cannot pause" in job.message, 10), job.message
    assert job.status == "running"
    runner.stop(job.job_id)
    assert runner.wait(job.job_id, 30)
    assert job.status == "stopped", job.message
    assert engine.load(runner.store.model_path(job.job_id)) is not None  # rank 0's epoch checkpoint
    assert len(pids) == 2 and _wait_for(lambda: not any(_alive(p) for p in (*pids, job.process.pid)), 20)
