"""The training worker: runs in its own (spawned) process, the only place that may touch CUDA.

`run_job` builds the circuit, compiles it, trains with `engine.optim.fit` and sends events over a
multiprocessing queue. Layer times are aggregated in the worker and sent a few times per second,
batch progress at most every `batch_interval_s`, so streaming costs the training loop very little.

Events (all dicts with "type" and "t", the worker's unix time):
    {"type": "status", "status": "starting"|"running"|"paused"|"stopping", "message": str, ...}
    {"type": "plan", "plan": plan.to_dict(batch_size)}                                (once)
    {"type": "batch", "epoch", "batch", "num_batches", "ll", "examples_per_s"}        (throttled)
    {"type": "layer_times", "epoch", "batch", "records": [{"layer", "kind", "pass", "ms", "calls"}]}
        ms = mean milliseconds per call over the window since the last layer_times event
    {"type": "memory", "allocated", "reserved", "peak_allocated", "peak_reserved"}    (bytes)
    {"type": "epoch", "epoch", "train_ll", "valid_ll", "test_ll", "seconds"}          (nats/example)
    {"type": "done", "status": "done"|"stopped", "model": path, "seconds": float}     (last)
    {"type": "error", "message": str, "traceback": str}                               (last)
"""

from __future__ import annotations

import os
import time
import traceback


class EventStreamer:
    """Callback for `engine.optim.fit`: aggregates layer_time events, throttles batch events.

    With profiling on, it also *samples* which batches are profiled: the profiler is attached for
    the next batch only when `profile_interval_s` has passed since the last profiled one (0: every
    batch). Per-layer spans cost a few microseconds each, about 9% of a 13 ms CPU batch of a small
    HCLT when every batch is profiled (benchmarks/workbench_metrics.py); sampling keeps the
    layer-time series while bringing that cost near zero.
    """

    def __init__(
        self,
        send,
        pc=None,
        interval_s: float = 0.5,
        batch_interval_s: float = 0.1,
        profile_interval_s: float = 0.0,
    ):
        self.send, self.pc = send, pc
        self.interval_s, self.batch_interval_s = interval_s, batch_interval_s
        self.profile_interval_s = profile_interval_s
        self._profiler = pc.profiler if pc is not None else None
        self._last_profiled = time.perf_counter()
        self._sums: dict[tuple[int, str], list] = {}  # (layer, pass) -> [kind, total ms, calls]
        self._memory: dict | None = None
        self._last_flush = self._last_batch = 0.0
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
            now = time.time()
            last = event["batch"] == event["num_batches"]
            if last or now - self._last_batch >= self.batch_interval_s:
                self._last_batch = now
                self.send(event)
            if now - self._last_flush >= self.interval_s:
                self.flush()
            self._sample_next_batch()
        elif kind == "epoch":
            self.flush()
            if self._profiler is not None:
                self._profiler.collect()  # drop the evaluation passes' spans: not training steps
            self.send(event)
        else:
            self.send(event)

    def _sample_next_batch(self) -> None:
        if self._profiler is None or self.profile_interval_s <= 0:
            return
        now = time.perf_counter()
        on = now - self._last_profiled >= self.profile_interval_s
        if on:
            self._last_profiled = now
        self.pc.profiler = self._profiler if on else None

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
    send({"type": "status", "status": "starting", "message": "loading data", "pid": os.getpid()})
    try:
        _train(spec, model_path, send, run_event, stop_event, t0)
    except BaseException as err:  # noqa: BLE001 - every failure must reach the server as an event
        from workbench.services.circuits import error_message

        send({"type": "error", "message": error_message(err), "traceback": traceback.format_exc()})
    finally:
        queue.close()
        queue.join_thread()


def default_threads() -> int:
    """CPU threads for training: all cores but one, which stays free for the server and the browser.

    Measured with benchmarks/workbench_ui_metrics.py on a 2-core machine: with every core training,
    the UI's redraws took the worker's time and UI-attached throughput fell to a third of headless.
    """
    return max(1, (os.cpu_count() or 1) - 1)


def _train(spec, model_path, send, run_event, stop_event, t0) -> None:
    import torch

    import engine
    from engine.data import load_dataset
    from engine.optim import EMSchedule, fit
    from workbench.services.circuits import build

    torch.set_num_threads(int(spec.get("threads") or default_threads()))
    torch.manual_seed(int(spec.get("seed", 0)))
    device = spec.get("device", "auto")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ds = load_dataset(spec["dataset"])
    send({"type": "status", "status": "starting", "message": "building circuit", "device": device})
    res = build(spec["circuit"], ds)
    if not res.ok:
        raise ValueError(res.error)
    pc = engine.compile(
        res.root,
        block_size=spec.get("block_size"),
        device=device,
        tolerance=float(spec.get("tolerance", 0.25)),
    )
    send({"type": "plan", "plan": pc.plan.to_dict(int(spec["batch_size"]))})
    if spec.get("profile", True):
        pc.profile(True)
    streamer = EventStreamer(
        send,
        pc,
        float(spec.get("update_interval_s", 0.5)),
        float(spec.get("batch_interval_s", 0.1)),
        float(spec.get("profile_interval_s", 0.1)),
    )
    schedule = EMSchedule(
        int(spec["batch_size"]),
        float(spec["step_size"]),
        float(spec["final_step_size"]),
        float(spec["pseudocount"]),
        int(spec["full_batch_epochs"]),
    )
    should_stop = _gate(send, run_event, stop_event)
    send(
        {
            "type": "status",
            "status": "running",
            "message": "",
            "device": device,
            "setup_seconds": time.time() - t0,
        }
    )
    fit(
        pc,
        ds.train.to(device),
        ds.valid.to(device),
        ds.test.to(device),
        int(spec["epochs"]),
        schedule,
        callback=streamer,
        should_stop=should_stop,
    )
    streamer.flush()
    stopped = stop_event.is_set()
    pc.profile(False)
    pc.sync_to_nodes()
    engine.save(pc, model_path)
    send(
        {
            "type": "done",
            "status": "stopped" if stopped else "done",
            "model": model_path,
            "seconds": time.time() - t0,
        }
    )
