"""Kernel selection: which kernel runs each partition of the plan under the Triton executor.

The names show in `pc.plan.to_dict()` (each partition's "kernel"; the PyTorch executor names "torch"):
- "sum_block": padded bs x bs tiles through tl.dot (forward, element flows, parameter flows).
- "sum_sparse": per-node / per-edge kernels, for block sizes below MIN_DOT_BLOCK (tl.dot needs 16).
- "product": the product-layer kernels (forward, recompute, flows).
"""

from __future__ import annotations

import os

import torch

from engine.compiler.plan import LayerPlan
from engine.kernels.options import MIN_DOT_BLOCK


def kernel_for(kind: str, block_size: int) -> str:
    if kind == "product":
        return "product"
    return "sum_block" if block_size >= MIN_DOT_BLOCK else "sum_sparse"


def choose_kernels(plan: LayerPlan) -> dict[int, list[str]]:
    """Layer index -> the kernel name of each of its partitions."""
    return {
        layer.index: [kernel_for(layer.kind, p.block_size) for p in layer.partitions]
        for layer in plan.layers
        if layer.partitions
    }


def check_runnable(device) -> None:
    """Triton kernels need a CUDA device, or Triton's interpreter (TRITON_INTERPRET=1) on CPU."""
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            "backend 'triton' needs a CUDA device (or TRITON_INTERPRET=1 set before importing "
            "Triton); use backend='torch' on CPU"
        )
