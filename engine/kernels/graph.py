"""CUDA-graph capture of one training step: zero flows, forward, flows pass, optional EM update.

Hundreds of small launches per batch (one or more per partition and pass) cost more CPU time than
the GPU needs for a small circuit; replaying them as one CUDA graph removes that. Shapes must be
fixed: one batch size per `CapturedStep`. Anything else falls back to eager execution, as do the
batches that a sampled profiler times (its events need eager launches); the profiler's other
batches replay the graph, which is captured with the profiler detached and so holds no events:

    step = CapturedStep(pc, batch_size=512, em=(step_size, pseudocount))
    for xb in batches:
        lls = step(xb)      # [B] log-likelihoods (a view into the graph's static output)

The first call runs eagerly (it compiles the Triton kernels and does real work); the second captures
the graph and replays it; later calls only copy the batch into the static input and replay.
"""

from __future__ import annotations

import torch


class CapturedStep:
    """Graph-replayed `zero_flows(); accumulate_flows(x); em_step(*em)` for batches of `batch_size`."""

    def __init__(self, pc, batch_size: int, em: tuple[float, float] | None = None, zero_flows: bool = True):
        self.pc, self.batch_size, self.em, self.zero = pc, int(batch_size), em, zero_flows
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0
        self.failed: str | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _eager(self, x, missing):
        pc = self.pc
        if self.zero:
            pc.zero_flows()
        ll = pc.accumulate_flows(x, missing, validate=False)
        if self.em is not None:
            pc.em_step(*self.em)
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
            with torch.cuda.graph(graph):
                self.static_ll = self._eager(self.static_x, self.static_m)
        except Exception as err:  # noqa: BLE001 - any capture failure means: stay eager
            self.failed = f"{type(err).__name__}: {err}"
            return
        finally:
            pc.profiler = prof
        self.graph = graph

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, missing: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        x = x.to(self.pc.device, non_blocking=True)
        if missing is not None:
            missing = missing.to(self.pc.device, non_blocking=True)
        prof = self.pc.profiler
        sampled = prof is not None and prof.next_is_sampled()
        if not self._usable(x) or sampled or (self.graph is None and self.calls == 1):
            return self._eager(x, missing)
        if self.graph is None:
            self._capture(x, missing)
            if self.graph is None:
                return self._eager(x, missing)
        if prof is not None:
            prof.start_batch()  # a batch the profiler does not sample: count it, replay
        self.static_x.copy_(x, non_blocking=True)
        if missing is None:
            self.static_m.zero_()
        else:
            self.static_m.copy_(missing, non_blocking=True)
        self.graph.replay()
        return self.static_ll
