"""Kernel selection: a compile step that names, per partition of the plan, the kernel that runs it.

The names show in `plan.to_dict()` (each partition's "kernel"):
- "torch": the PyTorch reference ops (CPU, or `backend="torch"`).
- "sum_block": padded bs x bs tiles through tl.dot (forward, element flows, parameter flows).
- "sum_sparse": per-node / per-edge kernels, for block sizes below MIN_DOT_BLOCK (tl.dot needs 16).
- "product": the product-layer kernels (forward, recompute, flows).
"""

from __future__ import annotations

import torch

from engine.compiler.plan import LayerPlan
from engine.kernels.options import MIN_DOT_BLOCK


def kernel_for(kind: str, block_size: int) -> str:
    if kind == "product":
        return "product"
    return "sum_block" if block_size >= MIN_DOT_BLOCK else "sum_sparse"


def choose_kernels(plan: LayerPlan, device, backend: str = "triton") -> LayerPlan:
    """Set `Partition.kernel` for every partition (in place; returns the plan)."""
    use_triton = backend == "triton" and (torch.device(device).type == "cuda" or _interpreting())
    for layer in plan.layers:
        for p in layer.partitions:
            p.kernel = kernel_for(layer.kind, p.block_size) if use_triton else "torch"
    return plan


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
