"""The Triton executor: the backend interface (engine/executor/backend.py) through the kernels.

`prepare` derives typed tables from the plan (child-major CSRs for the flows, sparse edge lists,
merged product layers, variable segments of input layers) and names each partition's kernel
(`select.choose_kernels`). Families without a kernel (`Distribution.kernel_log_prob` None) and the
max-product semiring run the PyTorch ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from engine.compiler.plan import PAD_ROWS, Layer, LayerPlan
from engine.executor import torch_ops
from engine.executor.backend import Tables, TorchBackend
from engine.executor.inputs import InputLayer, gather
from engine.executor.tensors import SumLayerTensors, layer_tensors
from engine.kernels import em, inputs, product
from engine.kernels.options import KernelOptions
from engine.kernels.product import ProdLayerKernelTensors
from engine.kernels.select import check_runnable, choose_kernels
from engine.kernels.sum_block import BlockSumTensors, block_tensors, sum_backward_block, sum_forward_block
from engine.kernels.sum_sparse import (
    SparseSumTensors,
    sparse_tensors,
    sum_backward_sparse,
    sum_forward_sparse,
)


@dataclass
class SumLayerKernelTensors(SumLayerTensors):
    """A sum layer whose one tiled partition writes every element-flow row below it (no zeroing)."""

    sole_writer: bool = False
    em: object = None  # em.EmTable of this layer's partitions


@dataclass
class InputKernelTable:
    """Runs of at most `stats_nodes` nodes sharing a variable: (start, length, variable) `[S]` each."""

    segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    max_len: int  # the segments' length limit (the options' stats_nodes when the table was built)
    chunks: dict = field(default_factory=dict)  # chunk rows -> chunked statistics launches (input_stats)


@dataclass
class TransposedInputs:
    """A batch as the input kernels read it: `xt, mt: [num_vars, B]` (see inputs.prepare_data)."""

    xt: torch.Tensor
    mt: torch.Tensor


class TritonBackend(TorchBackend):
    name = "triton"
    first_writes_node_flows = True

    def __init__(self, options: KernelOptions | None = None):
        self.options = options or KernelOptions()

    # ----------------------------------------------------------------- tables
    def prepare(self, plan: LayerPlan, inputs_: list[InputLayer], device) -> Tables:
        check_runnable(device)
        long = partial(torch.as_tensor, dtype=torch.long, device=device)
        base = layer_tensors(plan)
        tables = Tables([None] * len(plan.layers), kernels=choose_kernels(plan))
        for layer in plan.layers:
            if layer.kind == "product" and layer.partitions:
                tables.layers[layer.index] = product.layer_tensors(base[layer.index], long)
            elif layer.kind == "sum":
                tables.layers[layer.index] = _sum_layer(
                    layer, base[layer.index], tables.kernels[layer.index], long
                )
            if layer.kind == "sum" and layer.index > 0:
                mark_sole_writer(plan.layers[layer.index - 1], tables.layers[layer.index])
        mark_first_flow_writers(plan, tables.layers, device)
        for layer in plan.sum_layers:
            tables.layers[layer.index].em = em.em_table(tables.layers[layer.index].parts, device)
        tables.em = em.em_table(
            [pt for lay in plan.sum_layers for pt in tables.layers[lay.index].parts], device
        )
        tables.inputs = [
            InputKernelTable(
                tuple(t.to(device) for t in inputs.segments(inp.vars, self.options.stats_nodes)),
                self.options.stats_nodes,
            )
            for inp in inputs_
        ]
        return tables

    # ----------------------------------------------------------------- sum and product layers
    def sum_forward(self, table, params, element_mars, node_mars) -> None:
        for pt in table.parts:
            if isinstance(pt, BlockSumTensors):
                sum_forward_block(pt, params, element_mars, node_mars, self.options)
            elif isinstance(pt, SparseSumTensors):
                sum_forward_sparse(pt, params, element_mars, node_mars, self.options)
            else:
                torch_ops.sum_forward(pt, params, element_mars, node_mars)

    def sum_backward(
        self,
        table,
        params,
        element_mars,
        node_mars,
        node_flows,
        element_flows,
        param_flows,
        keep_node_flows: bool = True,
        defer: list | None = None,
    ) -> None:
        """Training steps (`keep_node_flows=False`) put tiled partitions' node scale over their own
        node-flow rows (sum_backward_block `in_place`), and only those partitions' parameter flows
        may go to `defer`."""
        for pt in table.parts:
            args = (pt, params, element_mars, node_mars, node_flows, element_flows, param_flows)
            if isinstance(pt, BlockSumTensors):
                sum_backward_block(*args, self.options, torch_ops.EXP_CLAMP, not keep_node_flows, defer)
            elif isinstance(pt, SparseSumTensors):
                sum_backward_sparse(*args, self.options, torch_ops.EXP_CLAMP)
            else:
                torch_ops.sum_backward(*args)

    @property
    def overlaps_flows(self) -> bool:
        return bool(self.options.overlap)

    @property
    def early_stats(self) -> bool:
        return bool(self.options.early_stats)

    @property
    def recompute_in_node_rows(self) -> bool:
        return bool(self.options.recompute_in_node_rows)

    @property
    def em_in_pass(self) -> bool:
        return bool(self.options.em_in_pass)

    def overwrites_element_flows(self, table: SumLayerKernelTensors) -> bool:
        return table.sole_writer

    def prod_forward(self, table: ProdLayerKernelTensors, node_mars, element_mars) -> None:
        product.prod_forward(table, node_mars, element_mars, self.options)

    def prod_backward(self, table: ProdLayerKernelTensors, element_flows, node_flows) -> None:
        product.prod_backward(table, element_flows, node_flows, self.options)

    def sum_em_update(self, table, params, param_flows, mask, step_size, pseudocount) -> None:
        """One layer over its own tile list (`table.em`): per row the arithmetic of `sum_em_update_all`,
        so a training step that updates layer by layer inside the pass (`PassEM`) is bit-identical."""
        em.sum_em_update_all(table.em, params, param_flows, mask, step_size, pseudocount, self.options)

    def sum_em_update_all(self, tables, layers, params, param_flows, mask, step_size, pseudocount):
        """All sum layers at once (`layers` is always all of the plan's, see the base class): one launch
        per row-length class over the tile list `prepare` built (em.EmTable), not one per partition."""
        em.sum_em_update_all(tables.em, params, param_flows, mask, step_size, pseudocount, self.options)

    # ----------------------------------------------------------------- input layers
    def input_forward(self, layer: InputLayer, table: InputKernelTable, x, missing, out) -> TransposedInputs:
        """Kernels read x^T by each node's variable (no `[n, B]` gather); other families: PyTorch."""
        xt, mt = inputs.prepare_data(layer.dist, x, missing)
        if inputs.supports(layer.dist):
            inputs.input_forward(
                layer.dist, layer.params, layer.vars, xt, mt, out, self.options, table.segments, table.max_len
            )
        else:
            xv, miss = layer.gather(x, missing)
            out.copy_(layer.dist.log_prob(layer.params, xv, miss))
        return TransposedInputs(xt, mt)

    def input_stats(
        self,
        layer: InputLayer,
        table: InputKernelTable,
        cache: TransposedInputs,
        flows,
        chunk_rows=0,
        after=None,
        lo=0,
        hi=None,
    ) -> int:
        """The whole layer without `after`: one statistics launch. Otherwise the nodes `[lo, end)`,
        `end` the last segment boundary at or below `hi`, in one launch per chunk of about
        `chunk_rows` node rows (0: one chunk; whole segments, `inputs.chunk_ranges`), `after(a, b)`
        after each, so a data-parallel reducer can sum chunk k while chunk k+1 computes. The chunk
        tables are made once per `(chunk_rows, lo, hi)` and kept in the layer's table (not while a
        CUDA graph is being captured: there they are remade inside the graph)."""
        n = layer.num_nodes
        hi = n if hi is None else hi
        args = (layer.dist, layer.stats, layer.params, layer.vars, cache.xt, cache.mt, flows)
        if after is None and (lo, hi) == (0, n):
            if inputs.input_stats(*args, table.segments, self.options):
                return n
            chunks = [(0, n, None)]
        else:
            key = (int(chunk_rows), lo, hi)
            chunks = table.chunks[key] if key in table.chunks else self._stats_chunks(layer, table, key)
            if not chunks:
                return lo
            if inputs.input_stats_chunked(*args, chunks, self.options, after or (lambda a, b: None)):
                return chunks[-1][1]
        a, b = chunks[0][0], chunks[-1][1]  # no kernel for this family: PyTorch on the same rows
        xv, miss = gather(layer.vars[a:b], cache.xt.T, cache.mt.T, layer.dist.discrete)
        layer.dist.accumulate_stats(layer.stats[a:b], layer.params[a:b], xv, miss, flows[a:b])
        if after is not None:
            after(a, b)
        return b

    def _stats_chunks(self, layer: InputLayer, table: InputKernelTable, key: tuple[int, int, int]) -> list:
        """`[(a, b, segments of rows a..b, rebased to a)]` tiling `[lo, end)` (see `input_stats`)."""
        rows, lo, hi = key
        host_starts = inputs.segments(
            torch.as_tensor(layer.layer.input_group.vars), self.options.stats_nodes
        )[0]
        chunks = [
            (a, b, inputs.chunk_segments(table.segments, s, e, a))
            for s, e, a, b in inputs.chunk_ranges(host_starts, layer.num_nodes, rows, lo, hi)
        ]
        dev = table.segments[0].device
        if not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            table.chunks[key] = chunks
        return chunks

    def input_em_update(
        self,
        layer: InputLayer,
        table,
        step_size: float,
        pseudocount: float,
        lo: int = 0,
        hi: int | None = None,
    ) -> None:
        rows = slice(lo, hi)  # whole rows of [n, k] tensors: contiguous
        if not inputs.input_em_update(
            layer.dist, layer.params[rows], layer.stats[rows], step_size, pseudocount, self.options
        ):
            super().input_em_update(layer, table, step_size, pseudocount, lo, hi)


def _sum_layer(layer: Layer, base: SumLayerTensors, kernels: list[str], long) -> SumLayerKernelTensors:
    parts = []
    for p, pt, kernel in zip(layer.partitions, base.parts, kernels, strict=True):
        if kernel == "sum_block":
            parts.append(block_tensors(pt, p.node_rows, p.child_rows, PAD_ROWS, long))
        elif kernel == "sum_sparse":
            parts.append(sparse_tensors(pt, PAD_ROWS, long))
        else:
            parts.append(pt)
    return SumLayerKernelTensors(parts)


def mark_sole_writer(below: Layer, table: SumLayerKernelTensors) -> None:
    """A sum layer of one tiled partition whose child blocks tile the product layer's rows exactly."""
    pts = table.parts
    if len(pts) != 1 or not isinstance(pts[0], BlockSumTensors) or below.kind != "product":
        return
    pt = pts[0]
    _, lo, hi = below.writes
    cb = pt.cblocks.cpu()
    starts = torch.arange(lo, hi, pt.block_size)
    pt.sole_writer = table.sole_writer = bool(
        (hi - lo) % pt.block_size == 0
        and cb.numel() == starts.numel()
        and torch.equal(torch.sort(cb).values, starts)
    )


def mark_first_flow_writers(plan: LayerPlan, tables: list, device) -> None:
    """Flag, per child-major row of each product layer, whether it is the first layer of the top-down
    flows pass to reach that node row (it stores; later layers add). Every node row except row 0 and
    the root is some product's child, so node_flows can start uninitialised."""
    seen = torch.zeros(plan.num_node_rows, dtype=torch.bool)
    for step in plan.backward_steps(inputs=False):
        if step.pass_name != "backward" or step.layer.kind != "product":
            continue
        t = tables[step.layer.index]
        if t is None or t.flow_first is not None:
            continue
        rows = t.flow_rows.cpu()
        t.flow_first = (~seen[rows]).to(torch.uint8).to(device)
        seen[rows] = True


TRITON_BACKEND = TritonBackend()
