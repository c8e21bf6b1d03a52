"""Triton, when installed: `jit` and `tl` for the device functions each family file defines.

Without Triton (CPU-only installs off Linux x86-64) `jit` marks nothing and `tl` is None: the device
functions are never called there, since only the Triton backend launches kernels.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # pragma: no cover - triton ships with the Linux x86-64 install
    triton = tl = None

    def jit(fn):
        return fn


__all__ = ["jit", "tl", "triton"]
