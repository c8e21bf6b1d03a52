"""Triton kernels for the layer plan (GPU; CPU only under TRITON_INTERPRET=1 for tests).

`backend.TritonBackend` is the Triton executor (the interface in engine/executor/backend.py): it
derives its tables from the layer plan and names a kernel per partition (`select.choose_kernels`);
`graph.CapturedStep` replays forward + flows (+ EM) as CUDA graphs.
"""

from engine.kernels.options import KernelOptions

__all__ = ["KernelOptions"]
