"""The training worker: runs in its own (spawned) process, the only place that may touch CUDA.

`run_job` builds the circuit and trains it with `engine.training.run_training`, the same call the
CLI makes (so the workbench trains at the CLI's speed, CUDA graphs included), sending events over
a multiprocessing queue. The training driver emits batch progress every `batch_interval_s` (each
event is one device sync); layer times are aggregated here and sent a few times per second.

Events (all dicts with "type" and "t", the worker's unix time):
    {"type": "status", "status": "starting"|"running"|"paused"|"stopping", "message": str, ...}
    {"type": "plan", "plan": plan.to_dict(batch_size)}                                (once)
    {"type": "batch", "epoch", "batch", "num_batches", "ll", "examples_per_s"}        (periodic)
    {"type": "layer_times", "epoch", "batch", "records": [{"layer", "kind", "pass", "ms", "calls"}]}
        ms = mean milliseconds per call over the window since the last layer_times event
    {"type": "memory", "allocated", "reserved", "peak_allocated", "peak_reserved"}    (bytes)
    {"type": "epoch", "epoch", "phase", "epochs", "train_ll", "valid_ll", "test_ll", "seconds", ...}
        the driver's epoch event (engine.optim): nats/example; seconds exclude pauses
    {"type": "done", "status": "done"|"stopped", "model": path, "seconds": float}     (last)
    {"type": "error", "message": str, "traceback": str}                               (last)
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback

PARENT_POLL_S = 0.5  # how often a worker checks that its server is still alive
EXIT_GRACE_S = 30.0  # after the server died or SIGTERM: time to save the model before a hard exit
CHECKPOINT_INTERVAL_S = 10.0  # at most one epoch-end checkpoint per this many seconds


class EventStreamer:
    """Callback for the training driver: sums layer_time events into per-(layer, pass) means and
    sends them, with the latest memory reading, at most every `interval_s`; other events pass on.

    Which batches are profiled is the profiler's business (`pc.profile(interval_s=...)`: one batch
    per interval, the rest replay the CUDA graph); batch events already come at the driver's pace.
    """

    def __init__(self, send, interval_s: float = 0.5):
        self.send, self.interval_s = send, interval_s
        self._sums: dict[tuple[int, str], list] = {}  # (layer, pass) -> [kind, total ms, calls]
        self._memory: dict | None = None
        self._last_flush = 0.0
        self._where = (0, 0)

    def __call__(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "layer_time":
            acc = self._sums.setdefault((event["layer"], event["pass"]), [event["kind"], 0.0, 0])
            acc[1] += event["ms"]
            acc[2] += 1
        elif kind == "memory":
            self._memory = event
        elif kind == "batch":
            self._where = (event["epoch"], event["batch"])
            self.send(event)
            if time.time() - self._last_flush >= self.interval_s:
                self.flush()
        elif kind == "epoch":
            self.flush()
            self.send(event)
        else:
            self.send(event)

    def flush(self) -> None:
        """Send the aggregated layer times and latest memory reading, then reset the window."""
        self._last_flush = time.time()
        if self._sums:
            records = [
                {"layer": layer, "kind": k, "pass": p, "ms": total / calls, "calls": calls}
                for (layer, p), (k, total, calls) in sorted(self._sums.items())
            ]
            self.send(
                {"type": "layer_times", "epoch": self._where[0], "batch": self._where[1], "records": records}
            )
            self._sums = {}
        if self._memory is not None:
            self.send(self._memory)
            self._memory = None


def _gate(send, run_event, stop_event):
    """`should_stop` for fit: blocks while paused (between batches), True once stop is requested."""

    def should_stop() -> bool:
        if not run_event.is_set() and not stop_event.is_set():
            send({"type": "status", "status": "paused", "message": ""})
            while not run_event.wait(0.1):
                if stop_event.is_set():
                    break
            if not stop_event.is_set():
                send({"type": "status", "status": "running", "message": ""})
        return stop_event.is_set()

    return should_stop


def run_job(spec: dict, model_path: str, queue, run_event, stop_event) -> None:
    """Process entry point: train the job `spec` (JobSpec.to_dict()), save to `model_path`."""

    def send(event: dict) -> None:
        queue.put({**event, "t": time.time()})

    t0 = time.time()
    if multiprocessing.parent_process() is not None:  # a spawned worker, not a test calling us in-process
        _watch_lifecycle(queue, run_event, stop_event)
    send({"type": "status", "status": "starting", "message": "loading data", "pid": os.getpid()})
    try:
        train = _train
        if int(spec.get("gpus") or 1) > 1:  # data-parallel: this process launches the ranks
            from workbench.services.ranks import train
        train(spec, model_path, send, run_event, stop_event, t0)
    except BaseException as err:  # noqa: BLE001 - every failure must reach the server as an event
        from workbench.services.circuits import error_message

        message = _without_server_paths(error_message(err), spec, model_path)
        send({"type": "error", "message": message, "traceback": traceback.format_exc()})
    finally:
        queue.close()
        queue.join_thread()


def _without_server_paths(message: str, spec: dict, model_path: str) -> str:
    """The message with the job's file paths cut to their names: errors are shown to every session."""
    circuit = spec.get("circuit") if isinstance(spec.get("circuit"), dict) else {}
    for path in (spec.get("dataset"), circuit.get("path"), model_path):
        if isinstance(path, str) and os.path.dirname(path):
            message = message.replace(path, os.path.basename(path))
    return message


def _watch_lifecycle(queue, run_event, stop_event) -> None:
    """Stop cooperatively (the model so far is saved) when the server dies or sends SIGTERM, then exit.

    A daemon thread polls the parent pid: a worker whose server was SIGKILLed is re-parented and would
    otherwise train on unobserved. The SIGTERM handler only sets a flag, since taking the
    multiprocessing events' locks inside a signal handler could deadlock against the training thread.
    """
    parent = os.getppid()
    asked = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: asked.set())

    def watch() -> None:
        while os.getppid() == parent and not asked.wait(PARENT_POLL_S):
            pass
        if os.getppid() != parent:
            queue.cancel_join_thread()  # nobody reads the queue any more: do not wait to flush it
        stop_event.set()
        run_event.set()
        time.sleep(EXIT_GRACE_S)
        os._exit(3)

    threading.Thread(target=watch, name="cw-lifecycle", daemon=True).start()


class Checkpointer:
    """Training callback wrapper: saves the model at epoch ends, so a crash keeps the last epoch's model.

    Saves at most every `interval_s` seconds (a large model takes a while to write); the file is
    written atomically by `engine.save`. `pc` is set once the circuit is compiled.
    """

    def __init__(self, callback, model_path: str, interval_s: float = CHECKPOINT_INTERVAL_S):
        self.callback, self.model_path, self.interval_s = callback, model_path, interval_s
        self.pc = None
        self._last = float("-inf")

    def __call__(self, event: dict) -> None:
        self.callback(event)
        if (
            event.get("type") == "epoch"
            and self.pc is not None
            and time.monotonic() - self._last >= self.interval_s
        ):
            import engine

            self.pc.sync_to_nodes()
            engine.save(self.pc, self.model_path)
            self._last = time.monotonic()


def announce_running(send, pc, batch_size: int, device: str, t0: float, **extra) -> None:
    """The compiled circuit's plan event, then the "running" status (the single- and multi-rank jobs)."""
    send({"type": "plan", "plan": pc.plan.to_dict(batch_size)})
    send(
        {
            "type": "status",
            "status": "running",
            "message": "",
            "device": device,
            "setup_seconds": time.time() - t0,
            **extra,
        }
    )


def default_threads() -> int:
    """CPU threads for training: all cores but one, which stays free for the server and the browser.

    Measured with benchmarks/workbench_ui_metrics.py on a 2-core machine: with every core training,
    the UI's redraws took the worker's time and UI-attached throughput fell to a third of headless.
    """
    return max(1, (os.cpu_count() or 1) - 1)


def train_config(spec: dict, device: str, drop_last: bool = False, **overrides):
    """A run spec's EM schedule and training settings as a checked `TrainConfig` (one translation for
    the single-process worker and the ranks of a multi-GPU run); `overrides` replace fields."""
    from engine.compiler import DEFAULT_TOLERANCE
    from engine.optim import EMSchedule
    from engine.training import TrainConfig

    schedule = EMSchedule(
        int(spec["batch_size"]),
        float(spec["step_size"]),
        float(spec["final_step_size"]),
        float(spec["pseudocount"]),
        int(spec["full_batch_epochs"]),
        drop_last=drop_last,
    )
    fields = dict(
        epochs=int(spec["epochs"]),
        schedule=schedule,
        device=device,
        block_size=spec.get("block_size"),
        tolerance=float(spec.get("tolerance", DEFAULT_TOLERANCE)),
        profile=bool(spec.get("profile", True)),
        profile_interval_s=float(spec.get("profile_interval_s", 0.1)),
        event_interval_s=float(spec.get("batch_interval_s", 0.1)),
    )
    cfg = TrainConfig(**{**fields, **overrides})
    cfg.check()
    return cfg


def _train(spec, model_path, send, run_event, stop_event, t0) -> None:
    import torch

    from engine.data import load_dataset
    from engine.training import pick_device, run_training
    from workbench.services.circuits import build

    torch.set_num_threads(int(spec.get("threads") or default_threads()))
    torch.manual_seed(int(spec.get("seed", 0)))
    device = pick_device(spec.get("device", "auto"))
    batch_size = int(spec["batch_size"])
    cfg = train_config(spec, device)
    ds = load_dataset(spec["dataset"])
    send({"type": "status", "status": "starting", "message": "building circuit", "device": device})
    res = build(spec["circuit"], ds)
    if not res.ok:
        raise ValueError(res.error)
    streamer = EventStreamer(send, float(spec.get("update_interval_s", 0.5)))
    saver = Checkpointer(streamer, model_path)

    def on_compiled(pc) -> None:
        saver.pc = pc
        announce_running(send, pc, batch_size, device, t0)

    result = run_training(
        res.root, ds, cfg, saver, _gate(send, run_event, stop_event), out=model_path, on_compiled=on_compiled
    )
    streamer.flush()
    send(
        {
            "type": "done",
            "status": "stopped" if result.stopped or stop_event.is_set() else "done",
            "model": model_path,
            "seconds": time.time() - t0,
        }
    )
