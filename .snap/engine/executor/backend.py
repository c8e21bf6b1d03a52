"""The backend interface: what an executor does with the layer plan, and the PyTorch executor.

An executor derives its own tables from the immutable plan (`prepare`) and names the kernel that runs
each partition (`Tables.kernels`, shown by `plan.with_kernels`). The circuit walks the plan's steps
and calls, per layer: forward (sum / product / input), flows (sum / product), statistics (input) and
the EM update (sum / input). `engine.kernels.backend.TritonBackend` is the other implementation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from engine.compiler.plan import LayerPlan
from engine.executor import torch_ops
from engine.executor.inputs import InputLayer
from engine.executor.tensors import ProdLayerTensors, SumLayerTensors, layer_tensors


@dataclass
class Tables:
    """An executor's derived tables: per layer index (None for input layers), per input layer, and
    the kernel name of each partition (layer index -> one name per partition)."""

    layers: list
    inputs: list = field(default_factory=list)
    kernels: dict[int, list[str]] = field(default_factory=dict)
    em: object = None  # a backend's table for updating every sum layer at once (None: layer by layer)


@dataclass
class GatheredInputs:
    """A batch's data on an input layer's nodes: `xv, miss: [n, B]` (what the statistics read)."""

    xv: torch.Tensor
    miss: torch.Tensor


class Backend(ABC):
    """The calls an executor provides. Tables come from its own `prepare`; flows are probabilities,
    values log-probabilities (shapes in engine/executor/torch_ops.py)."""

    name: str
    # True: training steps run the flows pass on side streams (engine/executor/streams.py), and
    # sum_backward may hand back its parameter flows as deferred launches (`defer`)
    overlaps_flows = False
    early_stats = False  # with overlaps_flows: input statistics of rows final early run during the pass
    em_in_pass = False  # with overlaps_flows: a training step's EM update runs inside the pass (PassEM)
    # with overlaps_flows: the second element buffer lives in node rows already read (recompute_buffers)
    recompute_in_node_rows = False
    # True: the first product layer to reach a node row in the flows pass stores its flows, so
    # node_flows needs no zero fill (only row 0); False: node_flows starts at zero
    first_writes_node_flows = False

    @abstractmethod
    def prepare(self, plan: LayerPlan, inputs: list[InputLayer], device) -> Tables:
        """Derive this executor's tables (on `device`) and name its kernels."""

    @abstractmethod
    def sum_forward(self, table, params, element_mars, node_mars) -> None:
        """node_mars[sum nodes] = log sum_c w_nc exp(element_mars[c])."""

    @abstractmethod
    def sum_forward_max(self, table, params, element_mars, node_mars) -> None:
        """The max-product semiring (MPE): max over children of log w_nc + element_mars[c]."""

    @abstractmethod
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
        """Element flows and parameter flows of one sum layer. `keep_node_flows=False`: the caller
        reads none of this layer's node flows afterwards, so the executor may overwrite them (scratch).
        `defer` (a list): the executor may append its parameter-flow launches as callables instead of
        running them; the caller runs them later (another stream) and keeps them until that work is done."""

    def overwrites_element_flows(self, table) -> bool:
        """True when this sum layer's backward writes every element-flow row below it (no zeroing)."""
        return False

    @abstractmethod
    def prod_forward(self, table, node_mars, element_mars) -> None:
        """element_mars[products] = sum of the children's log-values (also the recompute)."""

    @abstractmethod
    def prod_backward(self, table, element_flows, node_flows) -> None:
        """Each child of a product receives the product's flow."""

    @abstractmethod
    def sum_em_update(self, table, params, param_flows, mask, step_size, pseudocount) -> None:
        """EM update of one sum layer's weights, in place."""

    def sum_em_update_all(self, tables: Tables, layers, params, param_flows, mask, step_size, pseudocount):
        """EM update of every sum layer in place; `layers` is all of the plan's sum layers (the circuit's
        em_step), so a backend may update them together. Here: one layer at a time."""
        for layer in layers:
            self.sum_em_update(tables.layers[layer.index], params, param_flows, mask, step_size, pseudocount)

    @abstractmethod
    def input_forward(self, layer: InputLayer, table, x, missing, out: torch.Tensor):
        """out `[n, B]` = log p(x) per node (0 where missing); returns what `input_stats` reads."""

    @abstractmethod
    def input_stats(
        self, layer: InputLayer, table, cache, flows: torch.Tensor, chunk_rows=0, after=None, lo=0, hi=None
    ) -> int:
        """layer.stats += this batch's flow-weighted statistics (`flows: [n, B]`) of the nodes
        `[lo, end)`, `end <= hi` (default: the layer's end); returns `end`.

        `end` is `hi` or the nearest point below it where the backend may cut the layer (a kernel's
        segment boundary; `lo` must be one, as every `end` returned is): a training step computes the
        rows whose flows are final early and the rest at the end (`CompiledCircuit._flows_pass`).
        `after(a, b)` (optional): called once the stats rows `[a, b)` are final, in order, the ranges
        tiling `[lo, end)`; a backend may compute them in chunks of about `chunk_rows` rows
        (data-parallel EM sums each chunk over ranks while the next computes) or in one piece."""

    @abstractmethod
    def input_em_update(
        self,
        layer: InputLayer,
        table,
        step_size: float,
        pseudocount: float,
        lo: int = 0,
        hi: int | None = None,
    ) -> None:
        """EM update of one input layer's params (of its nodes `[lo, hi)`, default all), in place."""


class TorchBackend(Backend):
    """The PyTorch executor: CPU, and the reference the kernels are tested against."""

    name = "torch"

    def prepare(self, plan: LayerPlan, inputs: list[InputLayer], device) -> Tables:
        tables = Tables(layer_tensors(plan), [None] * len(inputs))
        tables.kernels = {
            layer.index: ["torch"] * len(layer.partitions) for layer in plan.layers if layer.partitions
        }
        return tables

    # ----------------------------------------------------------------- sum and product layers
    def sum_forward(self, table: SumLayerTensors, params, element_mars, node_mars) -> None:
        for pt in table.parts:
            torch_ops.sum_forward(pt, params, element_mars, node_mars)

    def sum_forward_max(self, table: SumLayerTensors, params, element_mars, node_mars) -> None:
        for pt in table.parts:
            torch_ops.sum_forward_max(pt, params, element_mars, node_mars)

    def sum_backward(
        self,
        table: SumLayerTensors,
        params,
        element_mars,
        node_mars,
        node_flows,
        element_flows,
        param_flows,
        keep_node_flows: bool = True,
        defer: list | None = None,
    ) -> None:
        for pt in table.parts:  # node flows are only read here, nothing is deferred
            torch_ops.sum_backward(
                pt, params, element_mars, node_mars, node_flows, element_flows, param_flows
            )

    def prod_forward(self, table: ProdLayerTensors, node_mars, element_mars) -> None:
        for pt in table.parts:
            torch_ops.prod_forward(pt, node_mars, element_mars)

    def prod_backward(self, table: ProdLayerTensors, element_flows, node_flows) -> None:
        for pt in table.parts:
            torch_ops.prod_backward(pt, element_flows, node_flows)

    def sum_em_update(
        self, table: SumLayerTensors, params, param_flows, mask, step_size, pseudocount
    ) -> None:
        for pt in table.parts:
            torch_ops.sum_em_update(pt, params, param_flows, mask, step_size, pseudocount)

    # ----------------------------------------------------------------- input layers
    def input_forward(self, layer: InputLayer, table, x, missing, out: torch.Tensor) -> GatheredInputs:
        xv, miss = layer.gather(x, missing)
        out.copy_(layer.dist.log_prob(layer.params, xv, miss))
        return GatheredInputs(xv, miss)

    def input_stats(
        self,
        layer: InputLayer,
        table,
        cache: GatheredInputs,
        flows: torch.Tensor,
        chunk_rows=0,
        after=None,
        lo=0,
        hi=None,
    ) -> int:
        """In one piece, cut anywhere: `after` (if any) is called once, for rows `[lo, hi)`."""
        hi = layer.num_nodes if hi is None else hi
        if hi > lo:
            rows = slice(lo, hi)
            layer.dist.accumulate_stats(
                layer.stats[rows], layer.params[rows], cache.xv[rows], cache.miss[rows], flows[rows]
            )
            if after is not None:
                after(lo, hi)
        return max(lo, hi)

    def input_em_update(
        self,
        layer: InputLayer,
        table,
        step_size: float,
        pseudocount: float,
        lo: int = 0,
        hi: int | None = None,
    ) -> None:
        params, stats = layer.params[lo:hi], layer.stats[lo:hi]
        params.copy_(layer.dist.em_update(params, stats, step_size, pseudocount))


TORCH_BACKEND = TorchBackend()
