"""The layer plan: plain data describing how a compiled circuit executes.

Buffers (per batch element, float32):
- `node_mars: [num_node_rows, B]`: log-values of input and sum nodes. Row 0 is a constant 0 (log 1)
  that padded product edges point at.
- `element_mars: [num_element_rows, B]`: the one *scratch* buffer for product nodes, sized for the
  largest product layer; rows `[0, PAD_ROWS)` hold -inf so padded sum tiles add nothing.
- `params: [num_params]`: sum weights laid out partition by partition as dense tiles
  `[num_node_blocks, width, block_size, block_size]`; padded tiles hold 0 and are masked in EM.

The plan is the one contract between the compiler and the executors: it holds everything an
executor needs (numpy index arrays, where each sum vector's params land, each input group's
distribution) and is immutable (frozen dataclasses); an executor derives its own tables and picks its
kernels, and `with_kernels` gives the copy of the plan that names them. `steps()` is the one
traversal of a training step that the executors, the queries and the workbench's schedule walk.
`to_dict()` gives the JSON summary the workbench draws and the profiler annotates. No torch inside.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import NamedTuple

import numpy as np

PAD_ROWS = 64  # element rows kept at -inf; >= the largest block size
FLOAT_BYTES = 4


@dataclass(frozen=True, eq=False)
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


@dataclass(frozen=True, eq=False)
class InputGroup:
    """Input vectors of one distribution family, executed together."""

    dist_key: tuple
    row_start: int
    num_nodes: int
    vars: np.ndarray  # [num_nodes] variable of each node
    vectors: list[tuple[int, int, int]]  # (vector uid, first node, num nodes) in this group
    dist: object = None  # the family (an engine.distributions.Distribution) shared by the group


@dataclass(frozen=True)
class SumSource:
    """Where a sum vector's `[E, bs, bs]` params land when cut into `b x b` tiles."""

    uid: int
    first_tile: int
    num_tiles: int
    ratio: int  # r = vector block size / tile block size
    tile_size: int


@dataclass(frozen=True, eq=False)
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
    # sum layers: tile size -> the sum vectors whose tiles this layer's partitions index (tile_source)
    sum_sources: dict[int, list[SumSource]] = field(default_factory=dict)

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


@dataclass(frozen=True, eq=False)
class Ties:
    """Slot pairs (source <- copy). `sum_src, sum_dst: [K]` index the flat sum params (each copy slot
    once; a source slot once per copy); `inputs[layer index] = (src, dst)`: `[M]` node indices local
    to that input layer. `num_tied_params`: parameters held by copies (counted once, at the source)."""

    sum_src: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    sum_dst: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    inputs: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    num_tied_params: int = 0

    @property
    def empty(self) -> bool:
        return self.sum_dst.size == 0 and not self.inputs

    def to_dict(self) -> dict:
        return {
            "num_tied_sum_params": int(self.sum_dst.size),
            "num_tied_input_nodes": int(sum(d.size for _, d in self.inputs.values())),
            "num_tied_params": int(self.num_tied_params),
        }


class Step(NamedTuple):
    """One pass over one layer: `partner` is the sum layer a product layer's recompute/backward
    serves, and the product layer below a sum layer's backward (None otherwise)."""

    layer: Layer
    pass_name: str  # "forward" | "recompute" | "backward"
    partner: Layer | None = None


@dataclass(frozen=True, eq=False)
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
    node_row: dict[int, int] = field(default_factory=dict)  # vector uid -> its first node_mars row
    ties: Ties = field(default_factory=Ties)  # tied parameter slots (engine/compiler/ties.py)
    num_fixed_input_params: int = (
        0  # of fixed families (Indicator): held, never learnt; untied ones and sources
    )

    @property
    def num_learnable_params(self) -> int:
        """Sum weights (real edges, no padding) plus input parameters of learnt families, each tied set
        counted once. Tied copies keep their own slots, so `num_params` and memory still grow with copies."""
        sums = sum(layer.num_edges for layer in self.layers if layer.kind == "sum")
        return int(sums + self.num_input_params - self.ties.num_tied_params - self.num_fixed_input_params)

    @property
    def sum_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind == "sum"]

    @property
    def input_layers(self) -> list[Layer]:
        return [layer for layer in self.layers if layer.kind == "input"]

    def forward_steps(self) -> tuple[Step, ...]:
        """Every layer bottom-up."""
        return self._traversal[0]

    def backward_steps(self, inputs: bool = True) -> tuple[Step, ...]:
        """Top-down: per sum layer, recompute the product layer below it (into the scratch buffer),
        the sum layer's backward, then that product layer's backward; then (`inputs`) the input layers."""
        return self._traversal[1] + (self._traversal[2] if inputs else ())

    def steps(self) -> tuple[Step, ...]:
        """A training step in execution order: `forward_steps()` then `backward_steps()`."""
        return self.forward_steps() + self.backward_steps()

    @cached_property
    def _traversal(self) -> tuple[tuple[Step, ...], tuple[Step, ...], tuple[Step, ...]]:
        """(forward, top-down over sum and product layers, input layers), built once per plan."""
        forward = tuple(Step(layer, "forward") for layer in self.layers)
        down = []
        for li in range(len(self.layers) - 1, 0, -1):
            layer, below = self.layers[li], self.layers[li - 1]
            if layer.kind == "sum":
                down += [
                    Step(below, "recompute", layer),
                    Step(layer, "backward", below),
                    Step(below, "backward", layer),
                ]
        return forward, tuple(down), tuple(Step(layer, "backward") for layer in self.input_layers)

    def input_flows_ready(self) -> tuple[tuple[int, int, int, int], ...]:
        """`(p, i, lo, hi)`: after step `p` of `backward_steps()` (a product layer's backward) the
        nodes `[lo, hi)` of input layer `i` (of `input_layers`, local node indices) have their final
        flows, so their statistics may be computed before the flows pass ends. Per layer the ranges
        tile `[0, n)` in order; `p` grows along them. Only the layer's longest *prefix* of final rows
        counts, so the ranges are coarse unless rows are laid out in the order their flows finish
        (the compiler's `layout_inputs` does; rows no product reads are final at once, `p = -1`)."""
        return self._flows_ready

    @cached_property
    def _flows_ready(self) -> tuple[tuple[int, int, int, int], ...]:
        inputs = self.input_layers
        final = [np.full(layer.num_nodes, -1, dtype=np.int64) for layer in inputs]
        for p, step in enumerate(self.backward_steps(inputs=False)):
            if step.layer.kind != "product" or step.pass_name != "backward":
                continue
            rows = np.concatenate([part.child_rows.reshape(-1) for part in step.layer.partitions])
            for f, layer in zip(final, inputs):
                _, lo, hi = layer.writes
                hit = rows[(rows >= lo) & (rows < hi)] - lo
                f[hit] = p  # positions only grow: the last reader wins
        out = []
        for i, f in enumerate(final):
            if f.size == 0:
                continue
            ready = np.maximum.accumulate(f)  # a row is usable once every row before it is final
            cuts = np.flatnonzero(np.diff(ready)) + 1
            bounds = [0, *cuts.tolist(), f.size]
            out += [(int(ready[a]), i, a, b) for a, b in zip(bounds, bounds[1:])]
        return tuple(out)

    def with_kernels(self, names: dict[int, list[str]]) -> LayerPlan:
        """A copy naming, per layer index, the kernel that runs each partition (the rest unchanged)."""
        layers = []
        for layer in self.layers:
            ks = names.get(layer.index)
            if ks is not None:
                parts = [replace(p, kernel=k) for p, k in zip(layer.partitions, ks, strict=True)]
                layer = replace(layer, partitions=parts)
            layers.append(layer)
        return replace(self, layers=layers)

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
            "num_learnable_params": self.num_learnable_params,
            "ties": self.ties.to_dict(),
            "num_nodes": sum(layer.num_nodes for layer in self.layers),
            "num_edges": sum(layer.num_edges for layer in self.layers),
            "compile_seconds": round(self.compile_seconds, 6),
            "pass_seconds": {k: round(v, 6) for k, v in self.pass_seconds.items()},
            "memory_bytes": {"batch_size": batch_size, **self.memory_bytes(batch_size)},
            "layers": [layer.to_dict() for layer in self.layers],
            "input_flows_ready": [list(r) for r in self.input_flows_ready()],  # (p, i, lo, hi) each
        }
