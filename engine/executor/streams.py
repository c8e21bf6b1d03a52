"""The flows pass on three CUDA streams: what is off its critical path runs beside it.

Top-down, each sum layer's backward waits for the flows of the layer above (node scale, element
flows, the product layer's flows: the critical path). Two pieces do not feed that chain:
- the *recompute* of the product layer below a sum layer reads only forward values, so a side
  stream recomputes the next layers ahead into two alternating element buffers;
- the *parameter flows* of a sum layer are read by nobody until the EM update, so a second side
  stream runs them behind, each as soon as its layer's node scale is ready.
On HCLT most sum layers hold a few node blocks (H200 trace, benchmarks/results/kernel_trace_h200.json:
~60 us a layer of which ~17 parameter flows and ~4-8 recompute), too few programs to fill the card,
so the side work fills idle SMs. The streams fork from the caller's stream and join it again before
`CompiledCircuit._flows_pass` returns (also when a launch raises), so the pass also records into
one CUDA graph (one branch per stream) and every tensor freed after it is free on all three streams.

A buffer is reused only after everything that reads it is done: the recompute into element buffer
k waits for the parameter flows of the layer two above (which ran after that layer's element flows).
The same wait frees the node-value rows of every sum layer from that one up, so the second buffer is
mostly a view of those rows, not a copy of the largest layer (`stream_schedule.recompute_buffers`).
On the CPU there are no streams: the same schedule runs in program order (tests check it there).

With `KernelOptions.em_in_pass` a training step's EM update runs inside the pass too (`PassEM`): a
sum layer's weights are read for the last time by its own parameter flows, an early input range's
parameters by its own statistics, so each update is queued right behind them on the parameter-flow
stream. Data-parallel, an update must wait for its flows' all-reduce; a wait on the parameter-flow
stream would hold the next layers' parameter flows behind NCCL, so those updates run on a fourth
stream (`em`) that waits for each all-reduce instead.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch


class FlowStreams:
    """The side streams of one device (none on the CPU) and the events between them: `recompute`,
    `params` (parameter flows) and `em` (data-parallel EM updates in the pass, forked on request)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._em_forked = False
        if self.cuda:
            self.recompute = torch.cuda.Stream(device)
            self.params = torch.cuda.Stream(device)
            self.em = torch.cuda.Stream(device)
        else:
            self.recompute = self.params = self.em = None

    @classmethod
    def one_stream(cls) -> FlowStreams:
        """No side streams: every launch in program order on the caller's stream (the plain pass)."""
        return cls(torch.device("cpu"))

    def fork(self) -> None:
        """The recompute and parameter-flow streams start after what the caller's stream has queued
        (the forward)."""
        self._em_forked = False
        if self.cuda:
            main = torch.cuda.current_stream()
            self.recompute.wait_stream(main)
            self.params.wait_stream(main)

    def fork_em(self) -> None:
        """The `em` stream starts there too (a pass with data-parallel EM updates in it), and the join
        waits for it."""
        if self.cuda:
            self.em.wait_stream(torch.cuda.current_stream())
            self._em_forked = True

    def join(self) -> None:
        """The caller's stream continues only after the forked side streams' work."""
        if self.cuda:
            main = torch.cuda.current_stream()
            for side in (self.recompute, self.params) + ((self.em,) if self._em_forked else ()):
                main.wait_stream(side)

    def on(self, stream):
        """Queue the block's launches on `stream` (a no-op context on the CPU)."""
        return torch.cuda.stream(stream) if stream is not None else nullcontext()

    def mark(self):
        """An event after what the current stream has queued so far (None on the CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record()
        return ev

    def wait(self, event) -> None:
        """The current stream waits for `event` (nothing to wait for on the CPU or for None)."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)


class PassEM:
    """A training step's EM update made inside its flows pass (`KernelOptions.em_in_pass`), layer by
    layer as each one's last reader is queued: the same kernels on the same flows as `em_step`.

    `listening` (a data-parallel reducer's listeners are set): a layer's flows are final only after
    their all-reduce, whose wait the listener returns (`CompiledCircuit.flow_listener`,
    `stats_listener`); sum layers wait until a wait arrives (their bucket's all-reduce), then run
    on the `em` stream behind it. Sum layers still waiting when the pass ends are left to `finish`,
    which runs after the reducer has waited for every all-reduce. No ties (the circuit runs those
    after the pass)."""

    def __init__(self, pc, step_size: float, pseudocount: float, listening: bool = False):
        self.pc, self.step_size, self.pseudocount = pc, float(step_size), float(pseudocount)
        self.listening = listening
        self.waiting: list = []  # sum layers whose flows are queued but whose all-reduce is not yet issued
        self.updated = 0  # sum layers updated so far (tests: a pass that updated nothing would show)

    def sum_layer(self, layer, wait: Callable[[], None] | None, streams: FlowStreams) -> None:
        """After `layer`'s parameter flows (and its listener), with the parameter-flow stream current."""
        self.waiting.append(layer)
        if wait is None and self.listening:
            return  # its bucket's all-reduce is issued with a later layer
        with streams.on(streams.em) if wait is not None else nullcontext():
            if wait is not None:
                wait()
            self._sum_updates()

    def input_rows(self, i: int, lo: int, hi: int, waits: list, streams: FlowStreams) -> None:
        """After input layer i's statistics of the nodes `[lo, hi)` (`waits`: what the stats listener
        returned for them), on the stream that computed them or, to wait for an all-reduce, on `em`."""
        if hi <= lo:
            return
        waits = [w for w in waits if w is not None]
        with streams.on(streams.em) if waits else nullcontext():
            for w in waits:
                w()
            pc = self.pc
            pc.backend.input_em_update(
                pc.input_layers[i], pc.tables.inputs[i], self.step_size, self.pseudocount, lo, hi
            )

    def finish(self) -> None:
        """After the join (and the reducer's wait): the sum layers no all-reduce was reported for."""
        self._sum_updates()

    def _sum_updates(self) -> None:
        pc = self.pc
        for layer in self.waiting:
            table = pc.tables.layers[layer.index]
            pc.backend.sum_em_update(
                table, pc.params, pc.param_flows, pc.param_mask, self.step_size, self.pseudocount
            )
        self.updated += len(self.waiting)
        self.waiting = []
