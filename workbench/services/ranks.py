"""Data-parallel jobs: one training job on N GPUs (or N gloo ranks on the CPU, a testing aid).

The worker process (`worker.run_job`) of a job with `gpus > 1` becomes a small launcher, doing what
`torchrun --nproc-per-node N -m engine train` does: it starts N rank processes with torchrun's
environment (MASTER_ADDR=127.0.0.1, a free MASTER_PORT, RANK, LOCAL_RANK, WORLD_SIZE); each joins
the group (`engine.distributed.join`) and calls `run_training(..., TrainConfig(distributed=True))`
on the same circuit spec and seed, as the CLI under torchrun does. A rank is a plain subprocess
(`python -m workbench.services.ranks SPEC MODEL`), since the daemonic worker may not have
multiprocessing children; it writes its events as JSON lines on its stdout, tagged `"rank": r`:

    every rank:  {"type": "rank", "rank", "pid", "device", "world_size"}                 (once, joined)
                 {"type": "layer_times", "rank", "records": [...]}, {"type": "memory", "rank", ...}
                 (the all-reduce is the record of layer engine.distributed.ALLREDUCE_LAYER)
    rank 0 also: status, plan, batch and epoch events, as a one-process worker sends them

The launcher forwards them to the job's queue. A rank that fails ends the job as failed with one
line naming the rank that died first (its peers then fail in their next collective with a
`DistributedError`, which follows as the consequence); the rest are killed, so nothing is left
behind. Stop ends the ranks (they train in lockstep and cannot stop one by one: `fit` refuses
`should_stop` with `distributed=True`); the model of the last checkpointed epoch is kept.

GPUs are counted in a short-lived subprocess, never in the server: `torch.cuda.device_count()`
reads NVML without initialising CUDA in torch >= 2.x, but falls back to `cudaGetDeviceCount` (a
driver init in the server) when NVML is unavailable; a child process makes either harmless.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

RANKS_ON_CPU_ENV = "CW_RANKS_ON_CPU"  # testing aid: offer N gloo ranks on the CPU without GPUs
MAX_CPU_RANKS = 4
FAIL_GRACE_S = 10.0  # after the first rank failed: time for its peers to report their error and exit
STOP_GRACE_S = 3.0  # after SIGTERM: time before the ranks are killed
POLL_S = 0.05


# ------------------------------------------------------------------------- what the machine offers
@functools.lru_cache(maxsize=1)
def visible_gpus() -> int:
    """CUDA GPUs the ranks would see (CUDA_VISIBLE_DEVICES applies); 0 without a CUDA build of torch.

    Counted once per server in a child process, so the server itself never touches the CUDA driver.
    """
    import torch

    if not torch.backends.cuda.is_built():
        return 0
    try:
        r = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else 0
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def cpu_ranks_allowed() -> bool:
    return os.environ.get(RANKS_ON_CPU_ENV, "") not in ("", "0")


def gpu_choices() -> list[int]:
    """The "GPUs" a job may ask for: [1] alone means the Train tab shows no selector."""
    n = visible_gpus()
    if n > 1:
        return list(range(1, n + 1))
    if cpu_ranks_allowed():
        return list(range(1, max(2, min(MAX_CPU_RANKS, os.cpu_count() or 1)) + 1))
    return [1]


def check(gpus, device: str) -> None:
    """Raise ValueError naming the problem when `gpus` ranks cannot run on `device`."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be a whole number >= 1, got {gpus!r}")
    if gpus == 1:
        return
    n = visible_gpus()
    if device == "cpu" or n == 0:
        if not cpu_ranks_allowed():
            raise ValueError(
                f"gpus={gpus} needs {gpus} CUDA GPUs, but {n} {'is' if n == 1 else 'are'} "
                f"visible (set {RANKS_ON_CPU_ENV}=1 to test ranks on the CPU)"
            )
        if gpus > MAX_CPU_RANKS:
            raise ValueError(f"at most {MAX_CPU_RANKS} ranks on the CPU, got gpus={gpus}")
    elif gpus > n:
        raise ValueError(f"gpus={gpus} but only {n} GPUs are visible")


def rank_device(spec: dict) -> str:
    """What each rank trains on: its own GPU (LOCAL_RANK), or the CPU (gloo)."""
    return "cpu" if spec.get("device") == "cpu" or visible_gpus() < int(spec.get("gpus", 1)) else "auto"


# ------------------------------------------------------------------------- launcher (in the worker)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int, threads: int) -> dict:
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(world),
        "OMP_NUM_THREADS": str(threads),
        "CW_RANK_PARENT": str(os.getpid()),
    }
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def _pump(rank: int, stream, events: queue_mod.Queue) -> None:
    """Reader thread: one rank's JSON event lines -> (rank, event); a non-JSON line is ignored."""
    for line in stream:
        try:
            events.put((rank, json.loads(line)))
        except ValueError:
            continue


def _tail(rank: int, stream, lines: collections.deque) -> None:
    for line in stream:
        lines.append(line.rstrip())


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Launch:
    """The N rank processes of one job and what they reported."""

    def __init__(self, spec: dict, model_path: str, send):
        from workbench.services.worker import default_threads

        self.world = int(spec["gpus"])
        self.send = send
        self.events: queue_mod.Queue = queue_mod.Queue()
        self.errors: dict[int, dict] = {}  # rank -> its error event
        self.stderr = [collections.deque(maxlen=40) for _ in range(self.world)]
        cpu = rank_device(spec) == "cpu"
        threads = max(1, int(spec.get("threads") or default_threads()) // self.world) if cpu else 1
        self._dir = tempfile.mkdtemp(prefix="cw-ranks-")
        spec_path = os.path.join(self._dir, "spec.json")
        with open(spec_path, "w") as f:
            json.dump({**spec, "threads": threads, "device": "cpu" if cpu else "auto"}, f)
        port = _free_port()
        self.procs = []
        for r in range(self.world):
            p = subprocess.Popen(
                [sys.executable, "-m", "workbench.services.ranks", spec_path, model_path],
                env=_rank_env(r, self.world, port, threads),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.procs.append(p)
            for target, stream, arg in ((_pump, p.stdout, self.events), (_tail, p.stderr, self.stderr[r])):
                threading.Thread(target=target, args=(r, stream, arg), daemon=True).start()

    def forward(self) -> None:
        """Send the ranks' events so far to the job; keep their error events for the final message."""
        while True:
            try:
                rank, e = self.events.get_nowait()
            except queue_mod.Empty:
                return
            if e.get("type") == "error":
                self.errors.setdefault(rank, e)
            elif e.get("type") != "done":
                self.send({**e, "rank": rank})

    def failure(self) -> str | None:
        """The one-line reason the job failed, or None while no rank failed."""
        codes = [p.poll() for p in self.procs]
        failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
        if not failed and not self.errors:
            return None
        # the root cause: a rank that failed on its own, not one whose collective failed after it
        own = [r for r in failed if self.errors.get(r, {}).get("kind") != "DistributedError"]
        own += [r for r in self.errors if self.errors[r].get("kind") != "DistributedError" and r not in own]
        first = own[0] if own else (failed or list(self.errors))[0]
        if first in self.errors:
            text = self.errors[first]["message"]
            msg = text if text.startswith(f"rank {first}") else f"rank {first}: {text}"
        else:
            msg = f"rank {first} exited unexpectedly ({_how(codes[first])})"
        peers = [self.errors[r]["message"] for r in self.errors if r != first]
        if peers:
            msg += f"; then {peers[0][:240]}"
        return " ".join(msg.split())

    def wait(self, stop_event, run_event) -> str:
        """Forward events until the ranks end: "done", "stopped", or a failure message."""
        told_pause = False
        failed_at, failure = None, None
        while True:
            self.forward()
            if stop_event.is_set():
                self.end()
                self.forward()
                return "stopped"
            if not run_event.is_set() and not told_pause:
                told_pause = True
                self.send(
                    {
                        "type": "status",
                        "status": "running",
                        "message": f"a run on {self.world} ranks cannot pause (they train in lockstep); "
                        "Stop keeps the model of the last saved epoch",
                    }
                )
            if all(p.poll() is not None for p in self.procs):
                time.sleep(POLL_S)  # the reader threads may still hold the last lines
                self.forward()
                return self.failure() or "done"
            if failed_at is None:
                failure = self.failure()
                if failure is not None:
                    failed_at = time.monotonic()
            elif time.monotonic() - failed_at > FAIL_GRACE_S:  # the peers did not notice: end them
                self.end()
                self.forward()
                return self.failure() or failure
            time.sleep(POLL_S)

    def end(self) -> None:
        """SIGTERM every rank still running, SIGKILL after STOP_GRACE_S, and reap them all."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def close(self) -> None:
        self.end()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


def train(spec, model_path, send, run_event, stop_event, t0) -> None:
    """`worker._train` for `spec["gpus"] > 1`: launch the ranks, forward their events, end the job."""
    check(int(spec["gpus"]), spec.get("device", "auto"))
    send({"type": "status", "status": "starting", "message": f"starting {spec['gpus']} ranks"})
    launch = Launch(spec, model_path, send)
    try:
        outcome = launch.wait(stop_event, run_event)
    finally:
        launch.close()
    if outcome in ("done", "stopped"):
        send({"type": "done", "status": outcome, "model": model_path, "seconds": time.time() - t0})
    else:
        send(
            {
                "type": "error",
                "message": outcome,
                "traceback": "\n".join(
                    f"rank {r}: {line}" for r, lines in enumerate(launch.stderr) for line in lines
                ),
            }
        )


# ------------------------------------------------------------------------- one rank (its own process)
def _watch_parent(parent: int) -> None:
    """Exit when the launcher is gone (killed worker): a rank must never train on unobserved."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(4)

    threading.Thread(target=watch, name="cw-rank-parent", daemon=True).start()


def _train_rank(spec: dict, model_path: str, send) -> None:
    import torch

    from engine import distributed
    from engine.data import load_dataset
    from engine.training import run_training
    from workbench.services.circuits import build
    from workbench.services.worker import Checkpointer, EventStreamer, announce_running, train_config

    torch.set_num_threads(int(spec.get("threads") or 1))
    torch.manual_seed(int(spec.get("seed", 0)))
    ranks, device = distributed.join(spec.get("device", "auto"))
    main = ranks.is_main
    send({"type": "rank", "pid": os.getpid(), "device": device, "world_size": ranks.world})
    t0 = time.time()
    batch_size = int(spec["batch_size"])
    # equal batches on every rank; the profiler is switched on in on_compiled with every rank's callback
    cfg = train_config(spec, device, drop_last=True, profile=False, profile_interval_s=None, distributed=True)
    ds = load_dataset(spec["dataset"])
    if main:
        send({"type": "status", "status": "starting", "message": "building circuit", "device": device})
    res = build(spec["circuit"], ds)
    if not res.ok:
        raise ValueError(res.error)
    interval = float(spec.get("update_interval_s", 0.5))
    streamer = EventStreamer(send, interval)
    saver = Checkpointer(streamer, model_path)

    def spans(e: dict) -> None:  # the profiler's own callback: every rank, every collected event
        streamer(e)
        if time.time() - streamer._last_flush >= interval:
            streamer.flush()

    def on_compiled(pc) -> None:
        if spec.get("profile", True):
            pc.profile(True, callback=spans, interval_s=float(spec.get("profile_interval_s", 0.1)))
        if main:
            saver.pc = pc
            announce_running(send, pc, batch_size, device, t0, world_size=ranks.world)

    def on_event(e: dict) -> None:  # rank 0's driver events; profiler events came through `spans`
        if e.get("type") not in ("layer_time", "memory"):
            saver(e)

    run_training(
        res.root,
        ds,
        cfg,
        on_event if main else None,
        out=model_path if main else None,
        on_compiled=on_compiled,
    )
    streamer.flush()


def main(argv: list[str]) -> None:
    """A rank: `python -m workbench.services.ranks SPEC_JSON MODEL_PATH` under torchrun's environment."""
    out = os.fdopen(os.dup(1), "w", buffering=1)  # events only: anything printed goes to stderr
    os.dup2(2, 1)
    lock = threading.Lock()

    def send(event: dict) -> None:
        with lock:
            out.write(json.dumps({**event, "t": time.time()}) + "\n")

    if os.environ.get("CW_RANK_PARENT"):
        _watch_parent(int(os.environ["CW_RANK_PARENT"]))
    signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
    code = 0
    try:
        with open(argv[0]) as f:
            spec = json.load(f)
        _train_rank(spec, argv[1], send)
    except BaseException as err:  # noqa: BLE001 - every failure reaches the launcher as one event
        from workbench.services.circuits import error_message

        msg = " ".join(error_message(err).split())
        kind = type(err).__name__
        if kind == "DistributedError":
            msg = str(err).strip()
        send({"type": "error", "message": msg, "kind": kind})
        code = 1
    out.flush()
    os._exit(code)  # skip gloo's teardown, which can race a peer that already exited


if __name__ == "__main__":
    main(sys.argv[1:])
