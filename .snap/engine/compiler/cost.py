"""Analytic cost model: FLOPs and bytes moved per layer, per batch element (forward pass).

A sum partition is a batched matmul `[nb, bs, width*bs] x [nb, width*bs, B]` after a max-shift and
exp of its children, then a log: read width*bs child values per node block, write bs node values;
its tile params (nb*width*bs*bs floats) are read once per batch. The backward pass does about two
such matmuls (element flows and parameter flows).
"""

from __future__ import annotations

from dataclasses import replace

from engine.compiler.plan import FLOAT_BYTES, Layer


def annotate(layer: Layer) -> Layer:
    """A copy of `layer` with `flops`, `bytes` and `param_bytes` filled in."""
    flops = bytes_ = params = 0
    for p in layer.partitions:
        nb, w, bs = p.num_node_blocks, p.width, p.block_size
        if layer.kind == "sum":
            flops += 2 * nb * w * bs * bs + nb * w * bs + 2 * nb * bs  # matmul + exp + log/add
            bytes_ += FLOAT_BYTES * (nb * w * bs + nb * bs)
            params += FLOAT_BYTES * nb * w * bs * bs
        elif layer.kind == "product":
            flops += nb * max(w - 1, 0)
            bytes_ += FLOAT_BYTES * (nb * w + nb)
    if layer.kind == "input":
        flops = layer.num_nodes
        bytes_ = FLOAT_BYTES * 2 * layer.num_nodes
    return replace(layer, flops=int(flops), bytes=int(bytes_), param_bytes=int(params))
