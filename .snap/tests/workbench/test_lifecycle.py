"""A served workbench stopped with SIGTERM or killed with SIGKILL leaves no stale runs or orphan workers.

The server is a real `panel serve` process serving a tiny app (written here) that starts one long
training job through the shared services, as the workbench's Train tab does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from workbench.services.jobs import JobRunner
from workbench.services.store import RunStore, _pid_alive
from workbench.state.runs import RunState

REPO = Path(__file__).resolve().parents[2]
APP = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import panel as pn
from workbench.services import get_services
from workbench.services.jobs import JobSpec

services = get_services()
if not services.runner.jobs():
    spec = JobSpec(circuit={{"source": "template", "template": "hclt", "num_latents": 8}}, dataset="nltcs",
                   epochs=10000, full_batch_epochs=0, batch_size=64, threads=1)
    services.runner.start(spec)
pn.pane.Markdown("started").servable()
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(pred, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _serve_training(tmp_path: Path) -> tuple[subprocess.Popen, Path, str]:
    """A panel server whose one session started a training job; returns (server, runs dir, run id)."""
    runs = tmp_path / "runs"
    app = tmp_path / "trainapp.py"
    app.write_text(APP)
    port = _free_port()
    env = {**os.environ, "CW_RUNS_DIR": str(runs)}
    server = subprocess.Popen(
        [
            str(REPO / ".venv" / "bin" / "panel"),
            "serve",
            str(app),
            "--port",
            str(port),
            "--address",
            "127.0.0.1",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/trainapp"

    def page() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return r.status == 200
        except OSError:
            return server.poll() is not None

    _wait(page, 120, "the server to answer")
    assert server.poll() is None
    run_dir = _wait(lambda: next((d for d in runs.glob("2*") if d.is_dir()), None), 60, "a run directory")

    def epochs() -> bool:
        text = (run_dir / "metrics.jsonl").read_text()
        return '"type": "epoch"' in text and (run_dir / "model.cwpc").exists()

    _wait(epochs, 180, "a first epoch and its checkpoint")
    return server, runs, run_dir.name


def _status(runs: Path, run_id: str) -> dict:
    return json.loads((runs / run_id / "status.json").read_text())


@pytest.mark.slow
def test_sigterm_stops_the_worker_and_saves_the_run(tmp_path):
    server, runs, run_id = _serve_training(tmp_path)
    worker = _status(runs, run_id)["pid"]
    assert _pid_alive(worker)
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    status = _status(runs, run_id)
    assert status["status"] == "stopped", status  # the worker saved its model and said so
    assert not _pid_alive(worker)
    assert (runs / run_id / "model.cwpc").exists()
    import engine

    engine.load(runs / run_id / "model.cwpc")  # a complete, loadable model


@pytest.mark.slow
def test_sigkill_leaves_no_orphan_and_restart_marks_the_run_interrupted(tmp_path):
    server, runs, run_id = _serve_training(tmp_path)
    worker = _status(runs, run_id)["pid"]
    epochs_before = (runs / run_id / "metrics.jsonl").read_text().count('"type": "epoch"')
    server.kill()
    server.wait(30)
    _wait(lambda: not _pid_alive(worker), 30, "the orphaned worker to exit")
    assert _status(runs, run_id)["status"] == "running"  # nobody was left to record the end
    runner = JobRunner(RunStore(runs))  # the next server start
    try:
        assert runner.recovered == [run_id]
        status = _status(runs, run_id)
        assert status["status"] == "interrupted" and "checkpoint" in status["message"], status
        kept = RunStore(runs).events(run_id, ("epoch",))
        assert len(kept) >= epochs_before >= 1
        assert JobRunner(RunStore(runs)).recovered == []  # recovery happens once
    finally:
        runner.shutdown()


def test_recover_leaves_runs_of_a_live_server_alone(tmp_path):
    store = RunStore(tmp_path)
    mine = store.create({"circuit": {}})  # created by this (live) process
    other = store.create({"circuit": {}})
    store.set_status(other, "running", server_pid=2**22 + 12345)  # no such process
    assert store.recover() == [other]
    assert store.status(mine)["status"] == "queued" and store.status(other)["status"] == "interrupted"


def test_jobs_past_the_worker_bound_wait_queued_then_run(tmp_path):
    from workbench.services.jobs import JobSpec

    runner = JobRunner(RunStore(tmp_path), max_workers=1)
    spec = JobSpec(
        circuit={"source": "template", "template": "hclt", "num_latents": 4},
        dataset="nltcs",
        epochs=1,
        full_batch_epochs=0,
        threads=1,
    )
    try:
        first, second, third = runner.start(spec), runner.start(spec), runner.start(spec)
        assert second.status == "queued" and "waiting for a free worker: 0 runs ahead" in second.message
        assert "1 run ahead in the queue" in third.message and runner.queue() == [second, third]
        assert runner.store.status(second.job_id)["status"] == "queued"
        live = RunState.for_job(third)
        live.poll()
        assert live.status == "queued" and "1 run ahead" in live.message  # what the Train tab shows
        runner.stop(third.job_id)
        assert third.status == "stopped" and third.process.pid is None
        assert runner.wait(first.job_id, 120) and first.status == "done", first.message
        assert runner.wait(second.job_id, 120) and second.status == "done", second.message
        assert second.process.pid is not None and third.process.pid is None  # the stopped one never ran
        for job in (first, second):  # the reader thread polls finished workers every few ms: reaped soon
            stat = Path(f"/proc/{job.process.pid}/stat")

            def zombie() -> bool:
                try:
                    return stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"
                except FileNotFoundError:
                    return False

            deadline = time.time() + 20  # a loaded 2-core CI box (a full-suite run missed 1 s once)
            while zombie() and time.time() < deadline:
                time.sleep(0.1)
            assert not zombie()  # reaped
    finally:
        runner.shutdown()


def test_a_diverging_run_is_marked_failed_and_its_metrics_stay_json(tmp_path):
    """Inputs with a 1e-30 standard deviation make every log-likelihood -inf on the first batch."""
    import numpy as np

    import engine
    from engine.dists import Gaussian
    from engine.nodes import inputs, multiply, summate
    from workbench.services.jobs import JobSpec

    g = Gaussian(min_std=1e-30)
    a = inputs(0, 2, g, params=[[0.0, 1e-30], [1.0, 1e-30]])
    b = inputs(1, 2, g, params=[[0.0, 1.0], [1.0, 1.0]])
    engine.save(summate(multiply(a, b), num_nodes=1), tmp_path / "c.cwpc")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(400, 2)) * 1e3)
    runner = JobRunner(RunStore(tmp_path / "runs"))
    try:
        spec = JobSpec(
            circuit={"source": "file", "path": str(tmp_path / "c.cwpc")},
            dataset=str(tmp_path / "x.npy"),
            epochs=2,
            full_batch_epochs=0,
            threads=1,
        )
        job = runner.start(spec)
        assert runner.wait(job.job_id, 120)
        assert job.status == "failed" and "diverged" in job.message, job.message
        assert runner.store.status(job.job_id)["status"] == "failed"

        def no_bare_constants(token):
            raise AssertionError(f"metrics.jsonl holds a bare {token}")

        for line in (tmp_path / "runs" / job.job_id / "metrics.jsonl").read_text().splitlines():
            json.loads(line, parse_constant=no_bare_constants)
    finally:
        runner.shutdown()


def test_a_stopped_run_continues_from_its_checkpoint_with_the_epochs_left(tmp_path):
    from workbench.services.jobs import JobSpec

    runner = JobRunner(RunStore(tmp_path / "runs"))
    try:
        spec = JobSpec(
            circuit={"source": "template", "template": "hclt", "num_latents": 4},
            dataset="nltcs",
            epochs=40,
            full_batch_epochs=1,
            batch_size=64,
            threads=1,
        )
        job = runner.start(spec)
        _wait(lambda: len(runner.store.events(job.job_id, ("epoch",))) >= 3, 120, "three epochs")
        runner.stop(job.job_id)
        assert runner.wait(job.job_id, 60) and job.status == "stopped"
        done = len(runner.store.events(job.job_id, ("epoch",)))
        assert 3 <= done < 40
        with pytest.raises(ValueError, match="only stopped or interrupted"):
            runner.continue_run(runner.start({**spec.to_dict(), "epochs": 1, "full_batch_epochs": 0}).job_id)
        after = runner.continue_run(job.job_id)
        assert after.spec.epochs == 40 - done and after.spec.full_batch_epochs == 1
        assert after.spec.circuit == {"source": "file", "path": "model.cwpc"}  # shown without its folder
        _wait(lambda: runner.store.events(after.job_id, ("epoch",)), 120, "a first continued epoch")
        runner.stop(after.job_id)
        assert runner.wait(after.job_id, 120) and after.status == "stopped", after.message
        assert runner.store.events(after.job_id, ("epoch",))[0]["train_ll"] > -7.0  # nltcs: -6.0 when trained
        runner.store.model_path(job.job_id).unlink()
        with pytest.raises(ValueError, match="saved no checkpoint"):
            runner.continue_run(job.job_id)
    finally:
        runner.shutdown()
