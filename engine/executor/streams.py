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
On the CPU there are no streams: the same schedule runs in program order (tests check it there).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


class FlowStreams:
    """The two side streams of one device (none on the CPU) and the events between them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.recompute = torch.cuda.Stream(device)
            self.params = torch.cuda.Stream(device)
        else:
            self.recompute = self.params = None

    @classmethod
    def one_stream(cls) -> FlowStreams:
        """No side streams: every launch in program order on the caller's stream (the plain pass)."""
        return cls(torch.device("cpu"))

    def fork(self) -> None:
        """Both side streams start after what the caller's stream has queued (the forward)."""
        if self.cuda:
            main = torch.cuda.current_stream()
            self.recompute.wait_stream(main)
            self.params.wait_stream(main)

    def join(self) -> None:
        """The caller's stream continues only after both side streams' work."""
        if self.cuda:
            main = torch.cuda.current_stream()
            main.wait_stream(self.recompute)
            main.wait_stream(self.params)

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
