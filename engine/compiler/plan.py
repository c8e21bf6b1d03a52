"""The layer plan: plain data describing how a compiled circuit executes.

Buffers (per batch element, float32):
- `node_mars: [num_node_rows, B]`: log-values of input and sum nodes. Row 0 is a constant 0 (log 1)
  that padded product edges point at.
- `element_mars: [num_element_rows, B]`: the one *scratch* buffer for product nodes, sized for the
  largest product layer; rows `[0, PAD_ROWS)` hold -inf so padded sum tiles add nothing.
- `params: [num_params]`: sum weights laid out partition by partition as dense tiles
  `[num_node_blocks, width, block_size, block_size]`; padded tiles hold 0 and are masked in EM.

The plan holds numpy index arrays for the executors and `to_dict()` gives the JSON summary the
workbench draws and the profiler annotates. No torch inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD_ROWS = 64  # element rows kept at -inf; >= the largest block size
FLOAT_BYTES = 4


@dataclass(eq=False)
class Partition:
    """A group of node blocks with the same block size, padded to the same number of children.

    For sum layers `node_rows[i]` is the first node_mars row of node block i and
    `child_rows[i, k]` the first element_mars row of its k-th child block (padding -> row 0).
    For product layers blocks have size 1: `node_rows` are element rows, `child_rows` node rows.
    """

    block_size: int
    node_rows: np.ndarray  # [num_node_blocks]
    child_rows: np.ndarray  # [num_node_blocks, width]
    num_real_children: int  # real (unpadded) child blocks over all node blocks
    kernel: str = "torch"
    param_offset: int = 0  # sum partitions: start of the tile params in the flat vector
    tile_source: np.ndarray | None = None  # sum: [nb, width] index into the layer's source tiles (-1 pad)

    @property
    def num_node_blocks(self) -> int:
        return int(self.node_rows.shape[0])

    @property
    def width(self) -> int:
        return int(self.child_rows.shape[1])

    @property
    def padding_ratio(self) -> float:
        total = self.num_node_blocks * self.width
        return 0.0 if total == 0 else 1.0 - self.num_real_children / total

    @property
    def num_params(self) -> int:
        return self.num_node_blocks * self.width * self.block_size**2

    def summary(self, kind: str) -> dict:
        bs = self.block_size
        edges = self.num_real_children * bs * bs if kind == "sum" else self.num_real_children
        padded = self.num_node_blocks * self.width * (bs * bs if kind == "sum" else 1)
        return {
            "block_size": bs,
            "num_node_blocks": self.num_node_blocks,
            "width": self.width,
            "num_edges": int(edges),
            "padded_edges": int(padded),
            "padding_ratio": round(self.padding_ratio, 6),
            "kernel": self.kernel,
        }


@dataclass(eq=False)
class InputGroup:
    """Input vectors of one distribution family, executed together."""

    dist_key: tuple
    row_start: int
    num_nodes: int
    vars: np.ndarray  # [num_nodes] variable of each node
    vectors: list[tuple[int, int, int]]  # (vector uid, first node, num nodes) in this group


@dataclass(eq=False)
class Layer:
    index: int
    kind: str  # "input" | "product" | "sum"
    depth: int
    num_nodes: int
    num_edges: int
    partitions: list[Partition] = field(default_factory=list)
    reads: tuple[str, int, int] | None = None  # (buffer, start row, end row)
    writes: tuple[str, int, int] | None = None
    flops: int = 0  # per batch element, forward
    bytes: int = 0  # per batch element, forward (params counted once per batch: see cost.py)
    param_bytes: int = 0
    input_group: InputGroup | None = None
    vectors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = {
            "index": self.index,
            "kind": self.kind,
            "depth": self.depth,
            "num_nodes": self.num_nodes,
            "num_edges": self.num_edges,
            "reads": list(self.reads) if self.reads else None,
            "writes": list(self.writes) if self.writes else None,
            "flops_per_example": self.flops,
            "bytes_per_example": self.bytes,
            "param_bytes": self.param_bytes,
            "partitions": [p.summary(self.kind) for p in self.partitions],
        }
        if self.input_group is not None:
            d["dist"] = list(self.input_group.dist_key)
            d["num_vars"] = int(np.unique(self.input_group.vars).size)
        return d


@dataclass(eq=False)
class LayerPlan:
    layers: list[Layer]
    num_vars: int
    num_node_rows: int
    num_element_rows: int
    num_params: int
    num_input_params: int
    root_row: int
    block_size: int | None
    tolerance: float
    compile_seconds: float = 0.0
    pass_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def sum_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind == "sum"]

    def memory_bytes(self, batch_size: int) -> dict[str, int]:
        """Estimated device memory for training at `batch_size` (bytes)."""
        per = FLOAT_BYTES * batch_size
        est = {
            "node_mars": self.num_node_rows * per,
            "node_flows": self.num_node_rows * per,
            "element_scratch": 2 * self.num_element_rows * per,  # values + flows
            "params": 2 * FLOAT_BYTES * self.num_params,  # weights + parameter flows
            "input_params": 2 * FLOAT_BYTES * self.num_input_params,
        }
        est["total"] = sum(est.values())
        return est

    def to_dict(self, batch_size: int = 512) -> dict:
        """JSON-serialisable summary (no index arrays)."""
        return {
            "format": "layer-plan",
            "version": 1,
            "num_vars": self.num_vars,
            "block_size": self.block_size,
            "tolerance": self.tolerance,
            "num_node_rows": self.num_node_rows,
            "num_element_rows": self.num_element_rows,
            "num_params": self.num_params,
            "num_input_params": self.num_input_params,
            "num_nodes": sum(layer.num_nodes for layer in self.layers),
            "num_edges": sum(layer.num_edges for layer in self.layers),
            "compile_seconds": round(self.compile_seconds, 6),
            "pass_seconds": {k: round(v, 6) for k, v in self.pass_seconds.items()},
            "memory_bytes": {"batch_size": batch_size, **self.memory_bytes(batch_size)},
            "layers": [layer.to_dict() for layer in self.layers],
        }
