"""CUDA-graph capture of one step: a training step (zero flows, forward, flows, optional EM update)
or a forward-only evaluation step.

Hundreds of small launches per batch (one or more per partition and pass) cost more CPU time than
the GPU needs for a small circuit; replaying them as one CUDA graph removes that. Shapes must be
fixed: one batch size per `CapturedStep`. Anything else falls back to eager execution, as do the
batches that a sampled profiler times (its events need eager launches); the profiler's other
batches replay the graph, which is captured with the profiler detached and so holds no events:

    step = CapturedStep(pc, batch_size=512, em=(step_size, pseudocount))
    for xb in batches:
        lls = step(xb)      # [B] log-likelihoods (a view into the graph's static output)
    mean = step.ll_sum.item() / n   # each step adds sum(lls) into `ll_sum` on the device; read it once

The first call runs eagerly (it compiles the Triton kernels and does real work) unless
`capture_first` says the kernels are compiled already; the next call captures the graph and
replays it; later calls only copy the batch into the static input and replay. All graphs of one
circuit share one memory pool: each writes its step buffers before reading them, so a training
graph and an evaluation graph of the same circuit cost the step memory once, not twice.
"""

from __future__ import annotations

import torch


def _graph_pool(pc):
    """The circuit's one CUDA-graph memory pool, made on first use."""
    pool = pc._graph_pool
    if pool is None:
        pool = pc._graph_pool = torch.cuda.graph_pool_handle()
    return pool


class CapturedStep:
    """Graph-replayed `pc.train_step(x, em=em, reduce=reduce)` (zero flows, forward, flows, reduce, EM
    update) for batches of `batch_size`, or `pc(x)` alone with `forward_only=True`. Every call adds `sum(log p(x))` into `ll_sum`
    (float64, on the circuit's device) so a caller reads the running total only when it wants it."""

    def __init__(
        self,
        pc,
        batch_size: int,
        em: tuple[float, float] | None = None,
        zero_flows: bool = True,
        forward_only: bool = False,
        capture_first: bool = False,
        enabled: bool = True,
        reduce=None,
    ):
        self.pc, self.batch_size, self.em, self.zero = pc, int(batch_size), em, zero_flows
        self.reduce = reduce  # engine.distributed.FlowReducer: start() before the flows, called after them
        self.forward_only = forward_only
        self.capture_first = capture_first
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.eager_calls = 0
        self.replays = 0  # calls that replayed the graph (the rest ran eagerly)
        self._missing_set = False  # static_m holds a mask that must be cleared before a mask-free batch
        self.failed: str | None = None if enabled else "graphs disabled"
        self.ll_sum = torch.zeros((), dtype=torch.float64, device=pc.device)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _eager(self, x, missing):
        pc = self.pc
        if self.forward_only:
            ll = pc(x, missing, validate=False)
            # no flows follow an evaluation batch: keeping its values (an eager tail batch's, 150 MB at
            # HCLT-256 batch 128) until the next forward would put them under the next epoch's peak
            pc._mars, pc._inputs_cache = None, []
        else:  # the circuit's one training step (EM inside the flows pass when its options say so)
            ll = pc.train_step(x, missing, self.em, self.reduce, self.zero, validate=False)
        self.ll_sum += ll.sum(dtype=torch.float64)
        return ll

    def _usable(self, x) -> bool:
        return self.pc.device.type == "cuda" and x.shape[0] == self.batch_size and self.failed is None

    def _capture(self, x, missing) -> None:
        pc = self.pc
        self.static_x = torch.empty_like(x)
        self.static_m = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
        pc._mars, pc._inputs_cache = None, []  # free the eager step's buffers before capturing
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        prof, pc.profiler = pc.profiler, None  # no profiler events inside the graph
        try:
            with torch.cuda.graph(graph, pool=_graph_pool(pc)):
                self.static_ll = self._eager(self.static_x, self.static_m)
        except Exception as err:  # noqa: BLE001 - any capture failure means: stay eager
            self.failed = f"{type(err).__name__}: {err}"
            if self.reduce is not None:
                self.reduce.cancel()  # no half-recorded all-reduce may be waited on by the next eager step
            return
        finally:
            pc.profiler = prof
            pc._mars, pc._inputs_cache = None, []  # the graph's buffers go back to the shared pool
        self.graph = graph

    def release(self) -> None:
        """Drop the graph (its step buffers return to the circuit's pool); the next call captures anew.

        `static_ll`, the returned log-likelihoods, also lives in that pool: read or clone it before
        another graph of the same circuit replays."""
        self.graph = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        x = x.to(self.pc.device, non_blocking=True)
        if missing is not None:
            missing = missing.to(self.pc.device, non_blocking=True)
        prof = self.pc.profiler
        sampled = prof is not None and prof.next_is_sampled()
        warm = self.capture_first or self.eager_calls > 0
        if not self._usable(x) or sampled or (self.graph is None and not warm):
            self.eager_calls += 1
            return self._eager(x, missing)
        if self.graph is None:
            self._capture(x, missing)
            if self.graph is None:
                self.eager_calls += 1
                return self._eager(x, missing)
        if prof is not None:
            prof.skip_batch()  # a batch the profiler does not sample: count it, replay
        self.replays += 1
        self.static_x.copy_(x, non_blocking=True)
        if missing is not None:
            self.static_m.copy_(missing, non_blocking=True)
            self._missing_set = True
        elif self._missing_set:
            self.static_m.zero_()
            self._missing_set = False
        self.graph.replay()
        return self.static_ll
