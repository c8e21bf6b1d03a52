"""JobRunner: the one per-server service that trains circuits in worker processes.

Each job is a spawned process (`worker.run_job`) with its own event queue and two events:
`run_event` (cleared = paused; the worker blocks between batches) and `stop_event` (cooperative
stop; the process is terminated if it has not finished `stop_timeout` seconds later). One reader
thread drains every job's queue into that job's event buffer and the run store; sessions pull new
events with `job.drain(since)` from a periodic callback. The server process never touches CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import os
import queue as queue_mod
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.compiler import DEFAULT_TOLERANCE
from engine.optim import EMSchedule
from workbench.services import ranks, worker
from workbench.services.store import TERMINAL, RunStore, fold_status, shareable_spec, without_paths

log = logging.getLogger(__name__)


@dataclass
class JobSpec:
    """Everything a worker needs to train one circuit (plain data; stored as spec.json)."""

    circuit: dict  # services.circuits spec: {"source": "template"|"graph"|"file", ...}
    dataset: str = "nltcs"  # bundled name or path to an uploaded .npy/.npz/.csv
    epochs: int = 10  # mini-batch EM epochs
    batch_size: int = EMSchedule.batch_size  # EM defaults follow engine.optim.EMSchedule
    step_size: float = EMSchedule.step_size
    final_step_size: float = EMSchedule.final_step_size
    pseudocount: float = EMSchedule.pseudocount
    full_batch_epochs: int = EMSchedule.full_batch_epochs
    block_size: int | None = None  # compile block size (None: the vectors' own)
    tolerance: float = DEFAULT_TOLERANCE
    device: str = "auto"  # "auto" (the worker picks cuda if available, else cpu) | "cpu" | "cuda"
    profile: bool = True  # per-layer times (layer_times events)
    profile_interval_s: float = 0.1  # profile one batch per this interval (0: every batch)
    update_interval_s: float = 0.5  # layer_times / memory events at most this often
    batch_interval_s: float = 0.1  # batch progress events at most this often
    threads: int | None = None  # torch threads in the worker (None: torch default)
    seed: int = 0
    name: str = ""
    gpus: int = 1  # data-parallel ranks (services.ranks); batch_size is then per rank
    # continue_run: {"run_id", "epochs_before" (epochs the earlier runs made), "circuit" (their circuit
    # spec, the template a listing names)}; the run's epochs are numbered on from epochs_before
    continues: dict = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ValueError with a readable message for an unusable spec."""
        if not isinstance(self.circuit, dict) or "source" not in self.circuit:
            raise ValueError("job spec needs a circuit spec with a 'source'")
        if self.epochs < 0 or self.full_batch_epochs < 0 or self.epochs + self.full_batch_epochs < 1:
            raise ValueError("train for at least one epoch")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("step_size", "final_step_size", "pseudocount", "tolerance"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not 0 < self.step_size <= 1 or not 0 < self.final_step_size <= 1:
            raise ValueError("step sizes must be in (0, 1]")
        if self.pseudocount < 0:
            raise ValueError("pseudocount must be >= 0")
        if self.tolerance < 0:
            raise ValueError("tolerance must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.block_size is not None and (self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        ranks.check(self.gpus, self.device)

    def to_dict(self) -> dict:
        return asdict(self)

    def schedule(self) -> EMSchedule:
        """The engine's EM schedule for this job."""
        return EMSchedule(
            self.batch_size, self.step_size, self.final_step_size, self.pseudocount, self.full_batch_epochs
        )

    @classmethod
    def from_dict(cls, d: dict) -> "JobSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass(eq=False)
class Job:
    """Server-side handle of one training job; `events` grow as the reader thread drains the queue."""

    job_id: str  # = run id in the store
    spec: JobSpec
    process: object = None
    queue: object = None
    run_event: object = None
    stop_event: object = None
    status: str = "queued"  # queued|starting|running|paused|stopping|done|stopped|failed
    message: str = ""
    started: float = field(default_factory=time.time)
    first_event_at: float | None = None
    stop_deadline: float | None = None
    events: list = field(default_factory=list)
    _base: int = 0  # sequence number of events[0] (old events are trimmed past max_events)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    def drain(self, since: int = 0) -> tuple[list[dict], int]:
        """Events with sequence number >= `since`, and the next `since` to pass.

        Events trimmed from the buffer (very long runs) are skipped; a session that attaches late
        reads history from the store instead (RunState.from_store).
        """
        with self._lock:
            start = max(since - self._base, 0)
            return self.events[start:], self._base + len(self.events)

    def _append(self, events: list[dict], max_events: int) -> None:
        with self._lock:
            self.events.extend(events)
            extra = len(self.events) - max_events
            if extra > 0:
                cut = max(extra, max_events // 4)
                del self.events[:cut]
                self._base += cut


class JobRunner:
    """Starts and controls training jobs; one per server, shared by all sessions."""

    def __init__(
        self,
        store: RunStore | None = None,
        poll_s: float = 0.02,
        stop_timeout: float = 10.0,
        max_events: int = 200_000,
        max_workers: int | None = None,
    ):
        self.store = store if store is not None else RunStore()
        self.poll_s, self.stop_timeout, self.max_events = poll_s, stop_timeout, max_events
        self.max_workers = max_workers or default_max_workers()
        self._ctx = mp.get_context("spawn")
        self.recovered = self.store.recover()  # runs a previous server left unfinished: "interrupted"
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read_loop, name="cw-job-reader", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- control
    def start(self, spec: JobSpec | dict, name: str | None = None, owner: str | None = None) -> Job:
        """Create a run in the store, owned by the holder of token `owner` (None: readable by every
        session), and start its worker process; raises ValueError for a bad spec."""
        spec = JobSpec.from_dict(spec) if isinstance(spec, dict) else spec
        spec.validate()
        run_id = self.store.create(spec.to_dict(), name=name or spec.name or None, owner=owner)
        job = Job(
            run_id,
            JobSpec.from_dict(shareable_spec(spec.to_dict())),  # what sessions see: no server paths
            queue=self._ctx.Queue(),
            run_event=self._ctx.Event(),
            stop_event=self._ctx.Event(),
            status="starting",
        )
        job.run_event.set()
        job.process = self._ctx.Process(
            target=worker.run_job,
            name=f"cw-train-{run_id}",
            daemon=True,
            args=(
                spec.to_dict(),
                str(self.store.model_path(run_id)),
                job.queue,
                job.run_event,
                job.stop_event,
            ),
        )
        with self._lock:
            self._jobs[run_id] = job
            if self._running() < self.max_workers:
                self._launch(job)
            else:  # the reader thread launches it when a worker slot frees
                job.status = "queued"
        if job.status == "queued":
            self._tell_queue()
        return job

    def queue(self) -> list[Job]:
        """Jobs waiting for a free worker, first in line first."""
        with self._lock:
            return [j for j in self._jobs.values() if j.status == "queued" and j.process.pid is None]

    def _tell_queue(self) -> None:
        """Give each queued job a message with its place in line (sessions show it as progress)."""
        for ahead, job in enumerate(self.queue()):
            waiting = (
                f"waiting for a free worker: {ahead} {'run' if ahead == 1 else 'runs'} ahead in the queue; "
                f"{self.max_workers} train at once (CW_MAX_WORKERS)"
            )
            if job.message != waiting:
                self._handle(
                    job, [{"type": "status", "status": "queued", "message": waiting, "t": time.time()}]
                )

    def _running(self) -> int:
        """Workers started and not yet finished (call with the lock held)."""
        return sum(1 for j in self._jobs.values() if j.process.pid is not None and not j.finished)

    def _launch(self, job: Job) -> None:
        """Start the job's worker process (call with the lock held)."""
        with _main_module_hidden():
            job.process.start()
        job.status = "starting"
        self.store.set_status(job.job_id, "starting", pid=job.process.pid, server_pid=os.getpid())

    def _launch_queued(self) -> None:
        """Start queued jobs, oldest first, while worker slots are free; tell the rest their place."""
        launched = False
        with self._lock:
            for job in self._jobs.values():
                if self._running() >= self.max_workers:
                    break
                if job.status == "queued" and job.process.pid is None and not job.stop_event.is_set():
                    self._launch(job)
                    launched = True
        if launched:
            self._tell_queue()

    def continue_run(self, run_id: str, owner: str | None = None) -> Job:
        """A new run, owned by `owner`, training on from the last checkpoint of a stopped or
        interrupted run that `owner` may read.

        Same data and settings, with the epochs the run had left; the EM step-size schedule starts
        again. Raises ValueError when the run cannot continue (still live, no checkpoint, data gone),
        PermissionError when it is another session's unshared run.
        """
        if not self.store.readable(run_id, owner):
            raise PermissionError(f"run {run_id} belongs to another session and is not shared")
        status = self.store.status(run_id).get("status")
        if status not in ("stopped", "interrupted"):
            raise ValueError(f"run {run_id} is {status}; only stopped or interrupted runs can continue")
        model = self.store.model_path(run_id)
        if not model.exists():
            raise ValueError(f"run {run_id} saved no checkpoint to continue from")
        spec = self.store.spec(run_id)
        done, mini = len(self.store.events(run_id, ("epoch",))), int(spec.get("epochs", 0))
        full = int(spec.get("full_batch_epochs", 0)) - max(done - mini, 0)
        if max(mini - done, 0) + max(full, 0) < 1:
            raise ValueError(f"run {run_id} has no epochs left to train")
        before = dict(spec.get("continues") or {})
        spec.update(
            continues={
                "run_id": run_id,
                "epochs_before": int(before.get("epochs_before", 0)) + done,
                "circuit": before.get("circuit") or spec.get("circuit", {}),
            },
            circuit={"source": "file", "path": str(model)},
            dataset=_stored_dataset(str(spec.get("dataset", ""))),
            epochs=max(mini - done, 0),
            full_batch_epochs=max(full, 0),
            name=f"{spec.get('name') or run_id} (continued)",
        )
        return self.start(spec, owner=owner)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        """Jobs started by this server (newest last)."""
        with self._lock:
            return list(self._jobs.values())

    def pause(self, job_id: str) -> None:
        """Ask the worker to block before its next batch (status becomes "paused" when it does)."""
        job = self._require(job_id)
        if not job.finished:
            job.run_event.clear()

    def resume(self, job_id: str) -> None:
        job = self._require(job_id)
        if not job.finished:
            job.run_event.set()

    def stop(self, job_id: str, timeout: float | None = None) -> None:
        """Cooperative stop (the worker saves the model so far); terminate after `timeout` seconds."""
        job = self._require(job_id)
        if job.finished:
            return
        job.stop_event.set()
        job.run_event.set()
        with self._lock:
            never_started = job.process.pid is None
        if never_started:
            self._finish(job, "stopped", "stopped before a worker was free")
            self._tell_queue()
            return
        job.stop_deadline = time.time() + (self.stop_timeout if timeout is None else timeout)
        self._handle(job, [{"type": "status", "status": "stopping", "message": "", "t": time.time()}])

    def wait(self, job_id: str, timeout: float = 60.0) -> bool:
        """Block until the job finished (for tests and scripts); True if it did."""
        job, end = self._require(job_id), time.time() + timeout
        while not job.finished and time.time() < end:
            time.sleep(0.02)
        return job.finished

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop all jobs (each worker saves its model so far) and the reader thread.

        Called at interpreter exit (`get_services` registers it), which `panel serve` reaches on
        SIGTERM. A worker that has not finished within `timeout` is killed and its run marked
        "interrupted", keeping its metrics and last checkpoint.
        """
        if self._closed.is_set():
            return
        for job in self.jobs():
            self.stop(job.job_id, timeout)
        end = time.time() + timeout
        while any(not j.finished for j in self.jobs()) and time.time() < end:
            time.sleep(0.05)
        self._closed.set()
        self._thread.join(timeout=2.0)
        for job in self.jobs():
            if job.process is not None and job.process.is_alive():
                job.process.kill()
                job.process.join(1.0)
            if not job.finished:
                self.store.set_status(
                    job.job_id, "interrupted", "the server shut down before this run finished"
                )
                job.status = "interrupted"

    def _require(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id!r} on this server")
        return job

    # ----------------------------------------------------------------- reader thread
    def _read_loop(self) -> None:
        while not self._closed.is_set():
            busy = False
            self._launch_queued()
            for job in self.jobs():
                if job.finished:
                    _reap(job)
                    continue
                if job.process.pid is None:
                    continue  # queued: no worker yet
                try:
                    busy |= self._poll(job)
                except Exception as err:  # noqa: BLE001 - the reader must outlive any one job
                    log.exception("reading events of job %s failed", job.job_id)
                    self._finish(job, "failed", f"reading worker events failed: {err}")
            if not busy:
                time.sleep(self.poll_s)

    def _poll(self, job: Job) -> bool:
        events = _drain_queue(job.queue)
        if events:
            self._handle(job, events)
        if job.finished:
            return bool(events)
        proc = job.process
        if job.stop_deadline is not None and time.time() > job.stop_deadline and proc.is_alive():
            proc.kill()  # SIGTERM only asks the worker to stop, which it was already asked
            proc.join(1.0)
            self._finish(job, "stopped", "worker terminated after the stop timeout")
        elif not proc.is_alive():
            proc.join(0.1)
            late = _drain_queue(job.queue)
            if late:
                self._handle(job, late)
            if not job.finished:
                self._finish(job, "failed", f"worker exited unexpectedly (exit code {proc.exitcode})")
        return bool(events)

    def _handle(self, job: Job, events: list[dict]) -> None:
        """Record events: store first, then the in-memory job, so `job.finished` implies a stored status."""
        if job.first_event_at is None:
            job.first_event_at = time.time()
        events = [_without_paths(e) for e in events]
        status, message, extra = job.status, job.message, {}
        for e in events:
            if status in TERMINAL:
                continue  # a finished job's status is final (late events are still recorded)
            if e.get("type") == "plan":
                self.store.write_json(job.job_id, "plan.json", e["plan"])
            elif e.get("type") == "status":
                extra.update({k: e[k] for k in ("device", "pid", "setup_seconds") if k in e})
            status, message = fold_status(status, message, e)
        self.store.append_events(job.job_id, [e for e in events if e.get("type") != "plan"])
        if (status, message) != (job.status, job.message) or extra:
            self.store.set_status(job.job_id, status, message, **extra)
        job._append(events, self.max_events)
        job.status, job.message = status, message

    def _finish(self, job: Job, status: str, message: str) -> None:
        self._handle(job, [{"type": "status", "status": status, "message": message, "t": time.time()}])


@contextlib.contextmanager
def _main_module_hidden():
    """Start spawned workers without re-running the parent's `__main__` script in them.

    Spawn normally re-imports the main script in the child (as `__mp_main__`); for `panel serve`
    that is the panel CLI, for a script without a `__main__` guard it would start jobs recursively.
    The worker needs nothing from `__main__`, so its path is hidden while the process starts.
    """
    main = sys.modules.get("__main__")
    saved = main.__dict__.pop("__file__", None) if main is not None else None
    spec = getattr(main, "__spec__", None)
    if main is not None and spec is not None:
        main.__spec__ = None
    try:
        yield
    finally:
        if main is not None and saved is not None:
            main.__file__ = saved
        if main is not None and spec is not None:
            main.__spec__ = spec


def _stored_dataset(name: str) -> str:
    """The dataset a stored spec names: a bundled name, or an upload (stored by file name only)."""
    from engine.data import available_datasets
    from workbench.services.uploads import upload_dir

    if name.lower() in available_datasets():
        return name
    path = upload_dir() / Path(name).name
    if not path.is_file():
        raise ValueError(f"the data file {name} of this run is no longer in the upload folder")
    return str(path)


def _without_paths(event: dict) -> dict:
    """A status, error or done event with no server path in its texts (messages, tracebacks and the
    model path are stored, archived and shown to sessions); other events pass unchanged."""
    if event.get("type") not in ("status", "error", "done"):
        return event
    return {k: without_paths(v) if isinstance(v, str) else v for k, v in event.items()}


def default_max_workers() -> int:
    """Training workers at once: CW_MAX_WORKERS, else one per two cores (at least 2); more wait queued."""
    return int(os.environ.get("CW_MAX_WORKERS") or max(2, (os.cpu_count() or 2) // 2))


def _reap(job: Job) -> None:
    """Collect a finished worker's exit status, so it does not linger as a <defunct> process."""
    proc = job.process
    if proc is not None and proc.exitcode is None:
        proc.is_alive()  # polls waitpid(WNOHANG): reaps the process once it has exited


def _drain_queue(q, limit: int = 10_000) -> list[dict]:
    out = []
    try:
        while len(out) < limit:
            out.append(q.get_nowait())
    except queue_mod.Empty:
        pass
    except (EOFError, OSError, ValueError):  # a terminated worker can leave a broken pipe behind
        pass
    return out
