"""CompiledCircuit: a layer plan plus its tensors, executing forward, flows and EM.

Forward stores input and sum node values in `node_mars` and writes each product layer into the one
`element_mars` scratch buffer. The flows pass walks sum layers top-down and *recomputes* the product
layer below each one into the scratch buffer instead of storing every product layer (the PyJuice
memory saving).
"""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace
from typing import Callable

import torch

from engine.compiler import DEFAULT_TOLERANCE, compile_plan
from engine.compiler.plan import PAD_ROWS, LayerPlan
from engine.executor import torch_ops
from engine.executor.tensors import gather_sum_params, partition_tensors, scatter_sum_params
from engine.nodes import NodeVector
from engine.profiler import DEFAULT_EVERY, LayerProfiler

TORCH_BACKEND = SimpleNamespace(
    name="torch",
    sum_forward=torch_ops.sum_forward,
    sum_backward=torch_ops.sum_backward,
    prod_forward=torch_ops.prod_forward,
    prod_backward=torch_ops.prod_backward,
    sum_em_update=torch_ops.sum_em_update,
)


# Step buffers whose every read row is written first are allocated uninitialised (a memset of node
# values, element values and element flows was ~0.7 GB a batch at PD-128). Tests set this to True:
# such buffers are then filled with NaN, so a read of a row nobody wrote shows up as NaN.
POISON_SCRATCH = False


def _rows_written_by_layers(plan: LayerPlan) -> bool:
    """True when input and sum layers write every node row except row 0 (the constant log 1)."""
    covered = torch.zeros(plan.num_node_rows, dtype=torch.bool)
    covered[0] = True
    for layer in plan.layers:
        buf, lo, hi = layer.writes
        if buf == "node_mars":
            covered[lo:hi] = True
    return bool(covered.all())


class CompiledCircuit(torch.nn.Module):
    """A compiled PC. `pc(x, missing)` -> log p(x) `[B]` in nats."""

    def __init__(self, root: NodeVector, block_size=None, tolerance=DEFAULT_TOLERANCE, device="cpu",
                 backend: str | None = None, kernel_options=None):
        super().__init__()
        plan, ir, lay = compile_plan(root, block_size, tolerance)
        self.root, self.plan, self._ir, self._layout = root, plan, ir, lay
        self.block_size = block_size
        self.tolerance = tolerance
        self._sums = {s.uid: s for s in ir.sums}
        self._inputs = {v.uid: v for v in ir.inputs}
        self.parts = partition_tensors(plan)
        params, mask = gather_sum_params(plan, lay, self._sums)
        self.register_buffer("params", params)
        self.register_buffer("param_mask", mask)
        self.register_buffer("param_flows", torch.zeros_like(params))
        self.input_layers = [layer for layer in plan.layers if layer.kind == "input"]
        self.input_dists = [self._inputs[layer.input_group.vectors[0][0]].dist for layer in self.input_layers]
        for i, layer in enumerate(self.input_layers):
            g = layer.input_group
            p = torch.cat([self._inputs[uid].params for uid, _, _ in g.vectors])
            self.register_buffer(f"input_params_{i}", p)
            self.register_buffer(f"input_stats_{i}", torch.zeros(g.num_nodes, self.input_dists[i].num_stats))
            self.register_buffer(f"input_vars_{i}", torch.as_tensor(g.vars, dtype=torch.long))
        self.backend = TORCH_BACKEND
        self.profiler: LayerProfiler | None = None
        self._mars: tuple[torch.Tensor, torch.Tensor] | None = None
        self._all_node_rows_written = _rows_written_by_layers(plan)
        self.num_vars = plan.num_vars
        self.to(device)
        self.set_backend(backend, kernel_options)

    def set_backend(self, backend: str | None = None, kernel_options=None) -> None:
        """Pick the executor: "torch", "triton" (engine.kernels), or None (Triton on CUDA, else torch)."""
        if backend is None:
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend == "torch":
            self.backend = TORCH_BACKEND
            for layer in self.plan.layers:  # the plan names the kernels that run each partition now
                for p in layer.partitions:
                    p.kernel = "torch"
        elif backend == "triton":
            from engine.kernels.backend import attach

            self.backend = attach(self, kernel_options)
        else:
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")

    # ----------------------------------------------------------------- tensors and devices
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self.parts = [[_apply_dataclass(p, fn) for p in layer] for layer in self.parts]
        return self

    @property
    def device(self) -> torch.device:
        return self.params.device

    def _scratch(self, rows: int, bsz: int) -> torch.Tensor:
        """An uninitialised `[rows, bsz]` step buffer (NaN-filled under POISON_SCRATCH)."""
        out = torch.empty(rows, bsz, device=self.device, dtype=self.params.dtype)
        return out.fill_(float("nan")) if POISON_SCRATCH else out

    def input_params(self, i: int) -> torch.Tensor:
        return getattr(self, f"input_params_{i}")

    def input_stats(self, i: int) -> torch.Tensor:
        """Input layer `i`'s accumulated EM statistics `[nodes, num_stats]`."""
        return getattr(self, f"input_stats_{i}")

    def _set_input_params(self, i: int, value: torch.Tensor) -> None:
        getattr(self, f"input_params_{i}").copy_(value)

    # ----------------------------------------------------------------- data checks
    def check_data(self, x, missing=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate `x: [B, num_vars]` (and `missing`), raising ValueError that names the problem."""
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.num_vars:
            raise ValueError(f"data must have shape (batch, {self.num_vars}), got {tuple(x.shape)}")
        if missing is None:
            missing = torch.zeros(x.shape, dtype=torch.bool)
        missing = torch.as_tensor(missing, device=x.device)
        if missing.shape != x.shape or missing.dtype != torch.bool:
            raise ValueError(f"missing must be a bool tensor of shape {tuple(x.shape)}")
        if x.is_floating_point():
            nan = torch.isnan(x) & ~missing
            if nan.any():
                raise ValueError(f"data contains NaN at observed entries (variable {int(nan.nonzero()[0, 1])})")
            x = torch.where(missing, torch.zeros_like(x), x)
        for i, layer in enumerate(self.input_layers):
            for var in torch.unique(getattr(self, f"input_vars_{i}")).tolist():
                col = x[:, var][~missing[:, var]]
                self.input_dists[i].check_data(col.cpu(), var)
        return x, missing

    # ----------------------------------------------------------------- forward
    def _span(self, layer, pass_name):
        return self.profiler.span(layer.index, layer.kind, pass_name) if self.profiler else nullcontext()

    def _input_forward(self, i, layer, x, missing, node_mars):
        g, dist = layer.input_group, self.input_dists[i]
        vars_ = getattr(self, f"input_vars_{i}")
        if hasattr(self.backend, "input_forward"):  # kernels read x directly (no [nodes, B] gather)
            rows = node_mars[g.row_start : g.row_start + g.num_nodes]
            return self.backend.input_forward(dist, self.input_params(i), vars_, x, missing, rows)
        xv, miss = x[:, vars_].T, missing[:, vars_].T
        if dist.discrete:
            xv = xv.long()
        node_mars[g.row_start : g.row_start + g.num_nodes] = dist.log_prob(self.input_params(i), xv, miss)
        return xv, miss

    def forward_mars(self, x, missing=None, validate=True) -> tuple[torch.Tensor, torch.Tensor]:
        """Run all layers; returns (node_mars [rows, B], element_mars [rows, B]) in log space."""
        x = torch.as_tensor(x, device=self.device)
        if validate:
            x, missing = self.check_data(x, missing)
        elif missing is None:
            missing = torch.zeros(x.shape, dtype=torch.bool, device=self.device)
        missing = missing.to(self.device)
        bsz = x.shape[0]
        if self.profiler is not None:
            self.profiler.start_batch()
        if self._all_node_rows_written:
            node_mars = self._scratch(self.plan.num_node_rows, bsz)
            node_mars[0] = 0.0  # the constant log 1 that padded product slots read
        else:
            node_mars = torch.zeros(self.plan.num_node_rows, bsz, device=self.device, dtype=self.params.dtype)
        # each sum layer reads only rows its product layer wrote, and the -inf padding rows
        element_mars = self._scratch(self.plan.num_element_rows, bsz)
        element_mars[:PAD_ROWS] = -torch.inf
        self._inputs_cache = []
        for layer in self.plan.layers:
            with self._span(layer, "forward"):
                if layer.kind == "input":
                    i = self.input_layers.index(layer)
                    self._inputs_cache.append(self._input_forward(i, layer, x, missing, node_mars))
                elif layer.kind == "product":
                    for pt in self.parts[layer.index]:
                        self.backend.prod_forward(pt, node_mars, element_mars)
                else:
                    for pt in self.parts[layer.index]:
                        self.backend.sum_forward(pt, self.params, element_mars, node_mars)
        return node_mars, element_mars

    def forward(self, x, missing=None, validate: bool = True) -> torch.Tensor:
        """log p(x) per example `[B]`; variables where `missing` is True are marginalised."""
        node_mars, element_mars = self.forward_mars(x, missing, validate)
        self._mars = (node_mars, element_mars)
        return node_mars[self.plan.root_row].clone()

    # ----------------------------------------------------------------- flows and EM
    def backward_flows(self, accumulate_params: bool = True) -> torch.Tensor:
        """Flows pass after `forward`; returns node_flows `[rows, B]` (probabilities)."""
        if self._mars is None:
            raise RuntimeError("call forward (or accumulate_flows) before backward_flows")
        node_mars, element_mars = self._mars
        if getattr(self.backend, "first_writes_node_flows", False):  # each row's first product layer stores
            node_flows = self._scratch(*node_mars.shape)
            node_flows[0] = 0.0
        else:
            node_flows = torch.zeros_like(node_mars)
        node_flows[self.plan.root_row] = 1.0
        element_flows = self._scratch(*element_mars.shape)  # each layer's rows are zeroed or overwritten
        param_flows = self.param_flows if accumulate_params else torch.zeros_like(self.param_flows)
        layers = self.plan.layers
        for li in range(len(layers) - 1, -1, -1):
            layer = layers[li]
            if layer.kind != "sum":
                continue
            below = layers[li - 1]  # the product layer this sum layer reads
            with self._span(below, "recompute"):
                for pt in self.parts[below.index]:
                    self.backend.prod_forward(pt, node_mars, element_mars)
            _, lo, hi = below.writes
            overwrites = getattr(self.backend, "overwrites_element_flows", None)
            if overwrites is None or not overwrites(self.parts[layer.index]):
                element_flows[lo:hi].zero_()
            with self._span(layer, "backward"):
                for pt in self.parts[layer.index]:
                    self.backend.sum_backward(pt, self.params, element_mars, node_mars, node_flows, element_flows, param_flows)
            with self._span(below, "backward"):
                for pt in self.parts[below.index]:
                    self.backend.prod_backward(pt, element_flows, node_flows)
        if accumulate_params:
            for i, layer in enumerate(self.input_layers):
                with self._span(layer, "backward"):
                    g = layer.input_group
                    flows = node_flows[g.row_start : g.row_start + g.num_nodes]
                    if hasattr(self.backend, "input_stats"):
                        self.backend.input_stats(self.input_dists[i], getattr(self, f"input_stats_{i}"),
                                                 self.input_params(i), getattr(self, f"input_vars_{i}"),
                                                 self._inputs_cache[i], flows)
                        continue
                    xv, miss = self._inputs_cache[i]
                    self.input_dists[i].accumulate_stats(
                        getattr(self, f"input_stats_{i}"), self.input_params(i), xv, miss, flows
                    )
        return node_flows

    @torch.no_grad()
    def zero_flows(self) -> None:
        self.param_flows.zero_()
        for i in range(len(self.input_layers)):
            getattr(self, f"input_stats_{i}").zero_()

    @torch.no_grad()
    def accumulate_flows(self, x, missing=None, validate: bool = True) -> torch.Tensor:
        """Forward, then the flows pass adding this batch's parameter flows; returns log p(x) `[B]`."""
        lls = self.forward(x, missing, validate)
        self.backward_flows(accumulate_params=True)
        return lls

    @torch.no_grad()
    def em_step(self, step_size: float = 1.0, pseudocount: float = 0.0) -> None:
        """One EM update from the accumulated flows: new = (1-step) * old + step * normalised flows."""
        if not 0.0 < step_size <= 1.0:
            raise ValueError(f"step_size must be in (0, 1], got {step_size}")
        if pseudocount < 0:
            raise ValueError(f"pseudocount must be >= 0, got {pseudocount}")
        for layer in self.plan.sum_layers:
            for pt in self.parts[layer.index]:
                self.backend.sum_em_update(pt, self.params, self.param_flows, self.param_mask, step_size, pseudocount)
        for i, dist in enumerate(self.input_dists):
            if getattr(self.backend, "input_em_update", None) is not None and self.backend.input_em_update(
                    dist, self.input_params(i), getattr(self, f"input_stats_{i}"), step_size, pseudocount):
                continue  # updated in place by a kernel
            new = dist.em_update(self.input_params(i), getattr(self, f"input_stats_{i}"), step_size, pseudocount)
            self._set_input_params(i, new)

    # ----------------------------------------------------------------- profiling and export
    def profile(self, enabled: bool = True, callback: Callable[[dict], None] | None = None,
                every: int = DEFAULT_EVERY, interval_s: float | None = None) -> LayerProfiler | None:
        """Turn per-layer profiling on (returns the profiler) or off; spans of every `every`-th batch,
        or of one batch per `interval_s` seconds when that is given."""
        self.profiler = LayerProfiler(self.device, callback, every, interval_s) if enabled else None
        return self.profiler

    @torch.no_grad()
    def sync_to_nodes(self) -> NodeVector:
        """Write the current parameters back into the node vectors; returns the root."""
        scatter_sum_params(self.params, self.plan, self._layout, self._sums)
        for i, layer in enumerate(self.input_layers):
            p = self.input_params(i).detach().float().cpu()
            for uid, first, n in layer.input_group.vectors:
                self._inputs[uid].params = p[first : first + n].clone()
        return self.root

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.plan.layers)}, vars={self.num_vars}, params={self.plan.num_params}, "
            f"backend={self.backend.name}"
        )


def _apply_dataclass(obj, fn):
    for k, v in vars(obj).items():
        if isinstance(v, torch.Tensor):
            setattr(obj, k, fn(v))
    return obj


def compile(root: NodeVector, block_size=None, device="cpu", tolerance: float = DEFAULT_TOLERANCE,
            backend: str | None = None, kernel_options=None) -> CompiledCircuit:
    """Compile the circuit under `root` into an executable `CompiledCircuit` on `device`.

    `backend`: "torch", "triton", or None (Triton kernels on CUDA, PyTorch otherwise);
    `kernel_options`: an `engine.kernels.KernelOptions` (precision, block sizes) for Triton.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available (use device='cpu')")
    return CompiledCircuit(root, block_size=block_size, tolerance=tolerance, device=dev, backend=backend,
                           kernel_options=kernel_options)


__all__ = ["CompiledCircuit", "compile", "LayerPlan", "PAD_ROWS"]
