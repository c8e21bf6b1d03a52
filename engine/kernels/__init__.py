"""Triton kernels for the layer plan (GPU; CPU only under TRITON_INTERPRET=1 for tests).

`backend.attach(pc)` selects a kernel per partition (`select.choose_kernels`) and returns the
`TRITON_BACKEND` namespace; `graph.CapturedStep` replays forward + flows (+ EM) as CUDA graphs.
"""

from engine.kernels.options import KernelOptions

__all__ = ["KernelOptions"]
