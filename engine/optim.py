"""The training driver: mini-batch EM, then full-batch EM; one loop for every caller.

`fit` is what `python -m engine train`, the workbench's worker and the benchmarks run, so the
speed measured is the speed a user gets. On a GPU it keeps the data on the device
(`engine.feed`), replays every full batch's step as a CUDA graph (`engine.kernels.graph`), adds the
log-likelihoods up on the device and synchronises only when an event is due: a progress event
every `event_interval_s` and the end of each pass (stop and pause requests are checked on the host
before each batch, without a sync). Tail batches and the batches a sampled profiler times run
eagerly. On the CPU the same loop is the plain PyTorch path. Every mini-batch step is the circuit's
one training step, `CompiledCircuit.train_step` (zero flows, forward + flows, EM update; with
`KernelOptions.em_in_pass` the update runs inside the flows pass), replayed or not.

Mini-batch EM with a decaying step size learns fast; full-batch EM (step 1, flows of the whole
training set) then converges without noise and never decreases the training likelihood.
Events go to `callback(dict)`:

    {"type": "batch", "epoch": 1, "batch": 30, "num_batches": 118, "ll": -6.1, "examples_per_s": ...}
        every `event_interval_s` seconds and at each epoch's last batch; "ll" is the mean
        log-likelihood (nats) of the batches since the previous batch event
    {"type": "epoch", "epoch": 1, "phase": "minibatch" | "full_batch", "epochs": 20,
     "minibatch_epochs": 10, "full_batch_epochs": 10, "seconds": ..., "paused_seconds": ...,
     "eval_seconds": ..., "pass_ll": ..., "train_ll": ..., "valid_ll": ..., "test_ll": ..., "time": ...}
        seconds: the training pass alone (paused time and the evaluation excluded); pass_ll: the
        mean log-likelihood seen during the pass; train/valid/test_ll: evaluated after the epoch;
        time: the wall clock (unix seconds) when the epoch and its evaluation ended; graph_batches:
        how many of the pass's batches replayed a CUDA graph (0 on the CPU)
    plus the profiler's "layer_time" / "memory" events when `pc.profile()` is on, collected at
    batch events (without waiting) and at the end of each epoch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from engine.feed import DataFeed, batch_order, default_budget, num_batches
from engine.kernels.graph import CapturedStep

Callback = Callable[[dict], None]
EVENT_INTERVAL_S = 0.5  # progress events (each one a device sync) at most this often


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite log-likelihood or parameter; the message says where."""


@dataclass(frozen=True)
class EMSchedule:
    """Anneal mini-batch EM, then finish with full-batch EM.

    Defaults chosen on nltcs and plants (HCLT, 32 latents): steps 0.5 -> 0.05 or 0.1 -> 0.01 gave
    worse test LL after 10 + 10 epochs than 1.0 -> 0.1; full-batch EM gained ~1.3 nats on plants.
    `drop_last` skips each mini-batch epoch's short tail batch (as PyTorch's DataLoader does).
    """

    batch_size: int = 512
    step_size: float = 1.0  # mini-batch step at the first epoch
    final_step_size: float = 0.1  # mini-batch step at the last mini-batch epoch (cosine decay)
    pseudocount: float = 0.1
    full_batch_epochs: int = 10  # full-batch EM epochs appended after the mini-batch epochs
    drop_last: bool = False

    def step_at(self, epoch: int, epochs: int) -> float:
        if epochs <= 1:
            return self.step_size
        t = (epoch - 1) / (epochs - 1)
        return self.final_step_size + 0.5 * (self.step_size - self.final_step_size) * (
            1 + math.cos(math.pi * t)
        )

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot train."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        for name in ("step_size", "final_step_size"):
            v = getattr(self, name)
            if not (0.0 < v <= 1.0):
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        if not (0.0 <= self.pseudocount < math.inf):
            raise ValueError(f"pseudocount must be a finite number >= 0, got {self.pseudocount}")
        if self.full_batch_epochs < 0:
            raise ValueError(f"full_batch_epochs must be >= 0, got {self.full_batch_epochs}")


@dataclass(frozen=True)
class PassResult:
    """One pass over the data: mean log-likelihood (nats) of the examples seen, and its timing."""

    ll: float
    examples: int
    seconds: float
    paused_seconds: float
    stopped: bool


class _Driver:
    """The state of one `fit`: the circuit, its captured steps, the event clock and the callbacks."""

    def __init__(
        self,
        pc,
        batch_size: int,
        callback: Callback | None = None,
        should_stop: Callable[[], bool] | None = None,
        event_interval_s: float = EVENT_INTERVAL_S,
        graphs: bool = True,
        ranks=None,
        reduce_dtype: str = "fp32",
        reduce_overlap: bool = True,
        reduce_chunk_bytes: int | None = None,
    ):
        self.pc, self.batch_size = pc, int(batch_size)
        self.callback, self.should_stop = callback, should_stop
        self.event_interval_s, self.graphs = event_interval_s, graphs
        self.steps: dict[str, CapturedStep] = {}
        self.warm = False  # a step ran eagerly on a full pass: the kernels are compiled, capture at once
        self.ranks = ranks  # engine.distributed.Ranks when data-parallel, else None
        self.reducer = None
        self.replays = 0  # batches of the last training pass that replayed a CUDA graph
        if ranks is not None:
            from engine import distributed

            chunk = distributed.CHUNK_BYTES if reduce_chunk_bytes is None else reduce_chunk_bytes
            self.reducer = distributed.FlowReducer(pc, reduce_dtype, reduce_overlap, chunk_bytes=chunk)

    def step(self, kind: str, em: tuple[float, float] | None = None) -> CapturedStep:
        """The captured step of `kind` ("em", "accumulate", "forward"); remade when `em` changes,
        since the step size is part of the recorded graph."""
        st = self.steps.get(kind)
        if st is None or st.em != em:
            if st is not None:
                self.warm |= st.eager_calls > 0
                st.release()
            st = CapturedStep(
                self.pc,
                self.batch_size,
                em=em,
                zero_flows=kind == "em",
                forward_only=kind == "forward",
                capture_first=self.warm,
                enabled=self.graphs,
                reduce=self.reducer if kind == "em" else None,
            )
            self.steps[kind] = st
        return st

    def close(self) -> None:
        for st in self.steps.values():
            st.release()
        self.steps.clear()
        self.pc._mars, self.pc._inputs_cache = None, []

    def emit(self, event: dict, block: bool = False) -> None:
        callback = self.callback if self.ranks is None or self.ranks.is_main else None  # rank 0 reports
        prof = self.pc.profiler
        if prof is not None:
            for e in prof.collect(block=block):
                if callback is not None:
                    callback({**e, "epoch": event.get("epoch"), "batch": event.get("batch")})
        if callback is not None:
            callback(event)

    def run_pass(
        self,
        feed: DataFeed,
        order: torch.Tensor,
        step: CapturedStep,
        epoch: int,
        drop_last: bool = False,
        report: bool = True,
    ) -> PassResult:
        """Run `step` over the batches of `order`; events every `event_interval_s` when `report`."""
        bs = self.batch_size
        total_batches = num_batches(len(order), bs, drop_last)
        step.ll_sum.zero_()
        replays0 = step.replays
        t0 = last_t = time.perf_counter()
        paused = last_paused = 0.0
        seen = last_seen = 0
        last_sum = 0.0
        for b, xb in enumerate(feed.batches(order, bs, drop_last), start=1):
            if self.should_stop is not None:
                t = time.perf_counter()
                stop = self.should_stop()
                paused += time.perf_counter() - t
                if stop:
                    return PassResult(math.nan, seen, time.perf_counter() - t0 - paused, paused, True)
            step(xb)
            seen += xb.shape[0]
            now = time.perf_counter()
            if b == total_batches or (report and now - last_t >= self.event_interval_s):
                total = step.ll_sum.item()  # the one sync: waits for the steps queued so far
                ll = (total - last_sum) / max(seen - last_seen, 1)
                if self.ranks is None:  # data-parallel: checked once the ranks' sums agree (below)
                    _check_finite_ll(ll, epoch, b, zero_ok=not report)
                if report:
                    now = time.perf_counter()
                    busy = max(now - last_t - (paused - last_paused), 1e-9)
                    self.emit(
                        {
                            "type": "batch",
                            "epoch": epoch,
                            "batch": b,
                            "num_batches": total_batches,
                            "ll": ll,
                            "examples_per_s": (seen - last_seen) / busy,
                        }
                    )
                last_t, last_sum, last_seen, last_paused = time.perf_counter(), total, seen, paused
        self.warm |= step.eager_calls > 0 and seen >= bs
        seconds = time.perf_counter() - t0 - paused
        if self.ranks is not None:  # the pass's LL over every rank's rows: the same number on all ranks
            last_sum, seen = self._all_sum([last_sum, seen])
            seen = int(seen)
            _check_finite_ll(last_sum / max(seen, 1), epoch, total_batches, zero_ok=not report)
        if report:
            self.replays = step.replays - replays0
        return PassResult(last_sum / seen if seen else math.nan, seen, seconds, paused, False)

    def _all_sum(self, values: list[float]) -> list[float]:
        from engine import distributed

        return distributed.all_sum(values, self.pc.device)

    def _order(self, n: int, shuffle: bool, generator=None) -> torch.Tensor:
        """The epoch's row order; data-parallel: rank 0's, and only this rank's share of it."""
        if self.ranks is None:
            return batch_order(n, shuffle, generator)
        from engine import distributed

        if not shuffle:
            return distributed.shard_rows(n, self.ranks)
        order = distributed.broadcast_order(batch_order(n, True, generator), self.pc.device)
        return distributed.shard_batches(order, self.batch_size, self.ranks)

    @torch.no_grad()
    def minibatch_epoch(
        self,
        feed: DataFeed,
        epoch: int,
        step_size: float,
        pseudocount: float,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
    ) -> PassResult:
        step = self.step("em", (float(step_size), float(pseudocount)))
        return self.run_pass(feed, self._order(feed.n, True, generator), step, epoch, drop_last)

    @torch.no_grad()
    def full_batch_epoch(self, feed: DataFeed, epoch: int, pseudocount: float) -> PassResult:
        self.pc.zero_flows()
        res = self.run_pass(feed, self._order(feed.n, False), self.step("accumulate"), epoch)
        if res.stopped:
            return res
        t0 = time.perf_counter()
        if self.reducer is not None:
            self.reducer()  # the whole set's flows: every rank's share summed
        self.pc.em_step(1.0, pseudocount)
        if self.pc.device.type == "cuda":
            torch.cuda.synchronize(self.pc.device)  # wait for the update: it belongs to this epoch's time
        return PassResult(
            res.ll, res.examples, res.seconds + time.perf_counter() - t0, res.paused_seconds, False
        )

    @torch.no_grad()
    def evaluate(self, feed: DataFeed) -> float:
        """Mean log-likelihood (nats per example) of the feed's rows; not profiled (per-layer times
        describe training steps, and a sampled evaluation batch would run eagerly)."""
        prof, self.pc.profiler = self.pc.profiler, None
        try:
            return self.run_pass(feed, self._order(feed.n, False), self.step("forward"), 0, report=False).ll
        finally:
            self.pc.profiler = prof


def _check_finite_ll(ll: float, epoch: int, batch: int, zero_ok: bool = False) -> None:
    """`zero_ok` (evaluation passes): a row of probability 0 makes the mean -inf, which is an answer,
    not a divergence; NaN and +inf still are."""
    if not (math.isfinite(ll) or (zero_ok and ll == -math.inf)):
        raise NonFiniteError(
            f"training diverged at epoch {epoch}, batch {batch}: the mean log-likelihood "
            f"is {ll} (check the pseudocount, step size and data)"
        )


def _feeds(pc, splits: dict, budget: int | None) -> dict:
    """One DataFeed per non-empty split (None for a missing or empty one: its LL is reported as None),
    all splits together within one device budget (default: a quarter of free GPU memory)."""
    left = default_budget(pc.device) if budget is None else budget
    feeds = {}
    for name, data in splits.items():
        if data is None or data.shape[0] == 0:
            feeds[name] = None
            continue
        feeds[name] = DataFeed(data, pc.device, left)
        if not feeds[name].streamed:
            left -= feeds[name].nbytes
    return feeds


def all_finite(t: torch.Tensor) -> bool:
    """Whether no element of `t` is NaN or infinite, from its min and max: one reduction and no
    temporary as large as `t` (`isfinite(t).all()` allocated 360 MB at HCLT-256 and was that
    epoch's memory peak). Max and min propagate NaN."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite_parameters(pc, epoch: int) -> None:
    """Raise NonFiniteError when a sum weight or input parameter is NaN or infinite."""
    tensors = [("sum weights", pc.params)] + [
        (f"input layer {i} parameters", pc.input_params(i)) for i in range(len(pc.input_layers))
    ]
    for what, t in tensors:
        if not all_finite(t):
            raise NonFiniteError(
                f"training diverged at epoch {epoch}: the {what} are no longer finite "
                "(check the pseudocount, step size and data)"
            )


@torch.no_grad()
def evaluate(pc, data: torch.Tensor, batch_size: int = 512, missing=None) -> float:
    """Mean log-likelihood (nats per example) over `data` (graph-replayed forward on a GPU)."""
    if missing is not None:
        total, n = 0.0, data.shape[0]
        for i in range(0, n, batch_size):
            ll = pc(data[i : i + batch_size].to(pc.device), missing[i : i + batch_size], validate=False)
            total += ll.double().sum().item()
        return total / max(n, 1)
    driver = _Driver(pc, batch_size)
    try:
        return driver.evaluate(DataFeed(data, pc.device))
    finally:
        driver.close()


@torch.no_grad()
def minibatch_em_epoch(
    pc,
    data,
    batch_size=512,
    step_size=0.1,
    pseudocount=0.1,
    epoch=0,
    callback=None,
    should_stop: Callable[[], bool] | None = None,
) -> float:
    """One pass of mini-batch EM; returns the mean training log-likelihood seen during the pass."""
    driver = _Driver(pc, batch_size, callback, should_stop)
    try:
        return driver.minibatch_epoch(DataFeed(data, pc.device), epoch, step_size, pseudocount).ll
    finally:
        driver.close()


@torch.no_grad()
def full_batch_em_epoch(pc, data, batch_size=512, pseudocount=0.1, epoch=0, callback=None) -> float:
    """Accumulate flows over all of `data`, then one EM step of size 1; returns the pre-step mean LL."""
    driver = _Driver(pc, batch_size, callback)
    try:
        return driver.full_batch_epoch(DataFeed(data, pc.device), epoch, pseudocount).ll
    finally:
        driver.close()


def fit(
    pc,
    train,
    valid=None,
    test=None,
    epochs: int = 10,
    schedule: EMSchedule = EMSchedule(),
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
    *,
    event_interval_s: float = EVENT_INTERVAL_S,
    generator: torch.Generator | None = None,
    data_budget_bytes: int | None = None,
    graphs: bool = True,
    distributed: bool = False,
    reduce_dtype: str = "fp32",
    reduce_overlap: bool = True,
    reduce_chunk_bytes: int | None = None,
) -> list[dict]:
    """Train with `epochs` mini-batch EM epochs then `schedule.full_batch_epochs` full-batch epochs.

    `train/valid/test: [N, num_vars]` (CPU or device tensors). `generator` draws the mini-batch
    orders (default: the global RNG); `data_budget_bytes` caps the device copy of each split
    (default: a quarter of free GPU memory; a larger split is streamed); `graphs=False` runs every
    step eagerly (for comparisons). `distributed=True` trains data-parallel over the initialised
    torch.distributed group (`engine.distributed`): `schedule.batch_size` rows per rank and step,
    rank 0's parameters and batch order, flows summed over ranks, global log-likelihoods, events
    and history on rank 0 only (other ranks return []); each mini-batch epoch drops its tail (the
    rows past a whole number of global batches); `reduce_dtype="bf16"` sends the flows in bfloat16
    (half the bytes, ~3 significant digits); `reduce_overlap` (default) all-reduces each bucket of
    sum layers' flows as soon as the flows pass has finished them (fp32; 2-5% faster 2-GPU epochs on
    H200s, the same sums); with it, an input layer's statistics larger than `reduce_chunk_bytes`
    (default `engine.distributed.CHUNK_BYTES`: 0, off; measured no gain on 2 H200s) are computed and
    all-reduced in chunks of that size, each reduced while the next computes. Returns the per-epoch metrics (the "epoch"
    events). Raises `NonFiniteError` when the log-likelihood or the parameters stop being finite.
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    schedule.check()
    if not (0.0 <= event_interval_s < math.inf):
        raise ValueError(f"event_interval_s must be a finite number >= 0, got {event_interval_s}")
    for split in (valid, test):
        if split is not None:
            pc.check_data(split)
    if train.shape[0] == 0:
        raise ValueError("the training data has no rows")
    pc.check_data(train)  # validated once here, not per batch
    feeds = _feeds(pc, {"train": train, "valid": valid, "test": test}, data_budget_bytes)
    ranks = None
    if distributed:
        from engine import distributed as dist_mod

        ranks = dist_mod.current()
        if should_stop is not None:
            raise ValueError("should_stop is not supported with distributed=True (ranks must stop together)")
        dist_mod.broadcast_parameters(pc)
    driver = _Driver(
        pc,
        schedule.batch_size,
        callback,
        should_stop,
        event_interval_s,
        graphs,
        ranks,
        reduce_dtype,
        reduce_overlap,
        reduce_chunk_bytes,
    )
    history = []
    total = epochs + schedule.full_batch_epochs
    bar = _progress(total) if progress and (ranks is None or ranks.is_main) else None
    try:
        for epoch in range(1, total + 1):
            if epoch <= epochs:
                res = driver.minibatch_epoch(
                    feeds["train"],
                    epoch,
                    schedule.step_at(epoch, epochs),
                    schedule.pseudocount,
                    schedule.drop_last,
                    generator,
                )
            else:
                res = driver.full_batch_epoch(feeds["train"], epoch, schedule.pseudocount)
            if res.stopped or (should_stop is not None and should_stop()):
                break
            check_finite_parameters(pc, epoch)
            t0 = time.perf_counter()
            lls = {f"{name}_ll": None if f is None else driver.evaluate(f) for name, f in feeds.items()}
            metrics = {
                "type": "epoch",
                "epoch": epoch,
                "phase": "minibatch" if epoch <= epochs else "full_batch",
                "epochs": total,
                "minibatch_epochs": epochs,
                "full_batch_epochs": schedule.full_batch_epochs,
                "seconds": res.seconds,
                "paused_seconds": res.paused_seconds,
                "eval_seconds": time.perf_counter() - t0,
                "pass_ll": res.ll if res.examples else None,
                **lls,
                "graph_batches": driver.replays,
                "time": time.time(),
            }
            if ranks is not None:
                metrics["world_size"] = ranks.world
            if ranks is None or ranks.is_main:
                history.append(metrics)
            driver.emit(metrics, block=True)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    train=f"{metrics['train_ll']:.3f}",
                    valid="-" if valid is None else f"{metrics['valid_ll']:.3f}",
                )
    finally:
        driver.close()
        if bar is not None:
            bar.close()
    return history


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="epoch", desc="EM")
