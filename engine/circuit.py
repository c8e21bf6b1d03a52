"""CompiledCircuit: a layer plan plus its tensors, executing forward, flows and EM.

Forward stores input and sum node values in `node_mars` and writes each product layer into the one
`element_mars` scratch buffer. The flows pass walks sum layers top-down and *recomputes* the product
layer below each one into the scratch buffer instead of storing every product layer (the PyJuice
memory saving).
"""

from __future__ import annotations

import contextlib
from contextlib import nullcontext
from typing import Callable

import torch

from engine.compiler import DEFAULT_TOLERANCE, compile_circuit
from engine.compiler.plan import PAD_ROWS, LayerPlan, Step
from engine.executor.backend import TORCH_BACKEND, Backend, Tables
from engine.executor.inputs import InputLayer
from engine.executor.stream_schedule import (
    ELEMENT,
    SPARE,
    RecomputeBuffers,
    plan_early_stats,
    recompute_buffers,
)
from engine.executor.streams import FlowStreams, PassEM
from engine.executor.tensors import apply_tensors, gather_sum_params, scatter_sum_params
from engine.executor.ties import TiedSlots
from engine.nodes import NodeVector
from engine.profiler import DEFAULT_EVERY, LayerProfiler

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


def make_backend(backend: str | None, device: torch.device, kernel_options=None) -> Backend:
    """ "torch", "triton" (engine.kernels), or None (Triton on CUDA, else torch)."""
    if backend is None:
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return TORCH_BACKEND
    if backend == "triton":
        from engine.kernels.backend import TritonBackend

        return TritonBackend(kernel_options)
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


class CompiledCircuit(torch.nn.Module):
    """A compiled PC: the layer plan, its parameters and an executor. `pc(x, missing)` -> log p(x) `[B]`
    in nats. `plan` names the kernels of the current executor (`set_backend`)."""

    def __init__(
        self,
        root: NodeVector,
        block_size=None,
        tolerance=DEFAULT_TOLERANCE,
        device="cpu",
        backend: str | None = None,
        kernel_options=None,
    ):
        super().__init__()
        plan, self._vectors = compile_circuit(root, block_size, tolerance)
        self.root, self.plan, self._compiled_plan = root, plan, plan
        self.block_size = block_size
        self.tolerance = tolerance
        params, mask = gather_sum_params(plan, self._vectors)
        self.register_buffer("params", params)
        self.register_buffer("param_mask", mask)
        self.register_buffer("param_flows", torch.zeros_like(params))
        self.input_layers = torch.nn.ModuleList(
            InputLayer(layer, self._vectors) for layer in plan.input_layers
        )
        self._input_index = {inp.layer.index: i for i, inp in enumerate(self.input_layers)}
        self._ties = TiedSlots.from_plan(plan.ties, self._input_index)  # tied slots, reduced in em_step
        self._ties.copy_sources(self)  # a tied set starts from one value: its source's
        self.backend: Backend = TORCH_BACKEND
        self.tables: Tables | None = None
        self.profiler: LayerProfiler | None = None
        self._mars: tuple[torch.Tensor, torch.Tensor] | None = None
        self._inputs_cache: list = []
        self._graph_pool = None  # the CUDA-graph memory pool of this circuit's captured steps (graph.py)
        # called with each Step of a parameter-accumulating flows pass once its flows are final
        # (data-parallel EM starts all-reducing a layer's flows while lower layers still compute); it
        # may return a wait (a callable: the current stream waits for that all-reduce, and with it for
        # the flows of every sum layer reported since the last wait), which an EM update in the pass
        # (`train_step`, PassEM) calls before it reads those flows
        self.flow_listener: Callable[[Step], Callable[[], None] | None] | None = None
        # input layer i -> None or (rows per chunk, after(lo, hi)): that layer's statistics are then
        # computed in node-row chunks, each reported once final (Backend.input_stats); `after` may
        # return a wait for those rows, as the flow listener does
        self.stats_listener: Callable[[int], tuple | None] | None = None
        self._flow_streams: FlowStreams | None = None  # side streams of the overlapped flows pass
        self._early: tuple | None = None  # (plan, its early input statistics): _early_stats
        self._places: tuple | None = None  # (plan, its RecomputeBuffers): _recompute_buffers
        self._all_node_rows_written = _rows_written_by_layers(plan)
        self.num_vars = plan.num_vars
        self.to(device)
        self.set_backend(backend, kernel_options)

    def set_backend(self, backend: str | None = None, kernel_options=None) -> None:
        """Pick the executor: "torch", "triton" (engine.kernels), or None (Triton on CUDA, else torch);
        it derives its tables from the compiled plan, and `self.plan` names its kernels."""
        self.backend = make_backend(backend, self.device, kernel_options)
        self.tables = self.backend.prepare(self._compiled_plan, list(self.input_layers), self.device)
        device = self.device  # executors may build some tables on the host: every table lives here
        apply_tensors(self.tables, lambda t: t.to(device))
        self.plan = self._compiled_plan.with_kernels(self.tables.kernels)

    # ----------------------------------------------------------------- tensors and devices
    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self.tables is not None:
            apply_tensors(self.tables, fn)
        if self._ties is not None:
            apply_tensors(self._ties, fn)
        return self

    @property
    def device(self) -> torch.device:
        return self.params.device

    def _scratch(self, rows: int, bsz: int) -> torch.Tensor:
        """An uninitialised `[rows, bsz]` step buffer (NaN-filled under POISON_SCRATCH)."""
        out = torch.empty(rows, bsz, device=self.device, dtype=self.params.dtype)
        return out.fill_(float("nan")) if POISON_SCRATCH else out

    def input_params(self, i: int) -> torch.Tensor:
        """Input layer `i`'s parameters `[nodes, num_params]`."""
        return self.input_layers[i].params

    def input_stats(self, i: int) -> torch.Tensor:
        """Input layer `i`'s accumulated EM statistics `[nodes, num_stats]`."""
        return self.input_layers[i].stats

    @property
    def input_dists(self) -> list:
        """The distribution family of each input layer."""
        return [inp.dist for inp in self.input_layers]

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
                raise ValueError(
                    f"data contains NaN at observed entries (variable {int(nan.nonzero()[0, 1])})"
                )
            x = torch.where(missing, torch.zeros_like(x), x)
        for inp in self.input_layers:
            inp.check_data(x, missing)
        return x, missing

    # ----------------------------------------------------------------- forward
    def _span(self, layer, pass_name):
        return self.profiler.span(layer.index, layer.kind, pass_name) if self.profiler else nullcontext()

    def _forward_step(self, step: Step, x, missing, node_mars, element_mars, semiring: str) -> None:
        layer, table = step.layer, self.tables.layers[step.layer.index]
        if layer.kind == "product":
            self.backend.prod_forward(table, node_mars, element_mars)
        elif layer.kind == "sum" and semiring == "max":
            self.backend.sum_forward_max(table, self.params, element_mars, node_mars)
        elif layer.kind == "sum":
            self.backend.sum_forward(table, self.params, element_mars, node_mars)
        elif semiring == "max":  # a missing variable takes its most likely value under the node
            inp = self.input_layers[self._input_index[layer.index]]
            xv, miss = inp.gather(x, missing)
            lp = inp.dist.log_prob(inp.params, xv, miss)
            node_mars[inp.rows] = torch.where(miss, inp.dist.mode(inp.params)[1][:, None].expand_as(lp), lp)
        else:
            i = self._input_index[layer.index]
            inp = self.input_layers[i]
            self._inputs_cache.append(
                self.backend.input_forward(inp, self.tables.inputs[i], x, missing, node_mars[inp.rows])
            )

    def forward_mars(
        self, x, missing=None, validate=True, semiring: str = "sum"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run all layers; returns (node_mars [rows, B], element_mars [rows, B]) in log space.

        `semiring="max"`: max-product (sums take their best child, missing inputs their mode), for MPE."""
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
        for step in self.plan.forward_steps():
            with self._span(step.layer, "forward"):
                self._forward_step(step, x, missing, node_mars, element_mars, semiring)
        return node_mars, element_mars

    def forward(self, x, missing=None, validate: bool = True) -> torch.Tensor:
        """log p(x) per example `[B]`; variables where `missing` is True are marginalised."""
        node_mars, element_mars = self.forward_mars(x, missing, validate)
        self._mars = (node_mars, element_mars)
        return node_mars[self.plan.root_row].clone()

    # ----------------------------------------------------------------- flows and EM
    def backward_flows(
        self, accumulate_params: bool = True, keep_node_flows: bool = True, *, em: PassEM | None = None
    ) -> torch.Tensor:
        """Flows pass after `forward`; returns node_flows `[rows, B]` (probabilities).

        `keep_node_flows=False` (training steps: `accumulate_flows`): only parameter flows, input
        statistics and input nodes' rows are wanted, so the executor may overwrite a sum layer's node
        flows once its backward has read them (the tiled kernels put their node scale there, and the
        overlapped schedule of engine/executor/streams.py runs); sum rows are then not flows. Such a
        pass uses up the forward's values (the overlapped one recomputes into node-value rows
        already read): another flows pass needs a new `forward`.
        `em` (`train_step` only, with the overlapped pass): the EM update made inside the pass."""
        if self._mars is None:
            raise RuntimeError(
                "call forward before backward_flows (a training pass, accumulate_flows or train_step, uses up "
                "the forward's values)"
            )
        node_mars, element_mars = self._mars
        if self.backend.first_writes_node_flows:  # each row's first product layer stores
            node_flows = self._scratch(*node_mars.shape)
            node_flows[0] = 0.0
        else:
            node_flows = torch.zeros_like(node_mars)
        # a row of probability 0 (log p = -inf) has no flows: its root flow is 0, not 1 (0/0)
        node_flows[self.plan.root_row] = torch.isfinite(node_mars[self.plan.root_row]).to(node_flows.dtype)
        element_flows = self._scratch(*element_mars.shape)  # each layer's rows are zeroed or overwritten
        param_flows = self.param_flows if accumulate_params else torch.zeros_like(self.param_flows)
        bufs = (node_mars, element_mars, node_flows, element_flows, param_flows)
        listener = self.flow_listener if accumulate_params else None
        overlap = self._overlapped(accumulate_params, keep_node_flows)
        if em is not None and not overlap:
            raise ValueError("an EM update inside the flows pass needs the overlapped training pass")
        try:
            self._flows_pass(*bufs, listener, overlap, accumulate_params, keep_node_flows, em)
        finally:
            if not keep_node_flows:  # node values may be overwritten (recompute_buffers): no second pass
                self._mars, self._inputs_cache = None, []
        return node_flows

    def _overlapped(self, accumulate_params: bool, keep_node_flows: bool) -> bool:
        """Whether a flows pass runs on the side streams (engine/executor/streams.py): a training pass
        (parameter flows, no node flows kept), not profiled, on an executor that overlaps."""
        return (
            accumulate_params
            and not keep_node_flows
            and self.profiler is None
            and self.backend.overlaps_flows
        )

    def _backward_step(
        self,
        step: Step,
        node_mars,
        element_mars,
        node_flows,
        element_flows,
        param_flows,
        keep_node_flows=True,
        defer: list | None = None,
        stats_from: int = 0,
    ) -> None:
        layer, table = step.layer, self.tables.layers[step.layer.index]
        if layer.kind == "sum":
            below = step.partner
            if not self.backend.overwrites_element_flows(table):
                _, lo, hi = below.writes
                element_flows[lo:hi].zero_()
        with self._span(layer, step.pass_name):
            if step.pass_name == "recompute":
                self.backend.prod_forward(table, node_mars, element_mars)
            elif layer.kind == "sum":
                self.backend.sum_backward(
                    table,
                    self.params,
                    element_mars,
                    node_mars,
                    node_flows,
                    element_flows,
                    param_flows,
                    keep_node_flows=keep_node_flows,
                    defer=defer,
                )
            elif layer.kind == "product":
                self.backend.prod_backward(table, element_flows, node_flows)
            else:
                self._input_stats(self._input_index[layer.index], node_flows, stats_from)

    def _input_stats(
        self, i: int, node_flows, lo: int = 0, hi: int | None = None, waits: list | None = None
    ) -> int:
        """Input layer i's statistics of the nodes `[lo, end)`, `end <= hi` (`Backend.input_stats`),
        reported to `stats_listener` (what it returns for each range appended to `waits`, if given);
        returns `end`."""
        inp = self.input_layers[i]
        chunks = self.stats_listener(i) if self.stats_listener is not None else None
        if chunks is not None and waits is not None:
            rows, after = chunks
            chunks = (rows, lambda a, b: waits.append(after(a, b)))
        return self.backend.input_stats(
            inp,
            self.tables.inputs[i],
            self._inputs_cache[i],
            node_flows[inp.rows],
            *(chunks or (0, None)),
            lo,
            hi,
        )

    def _flows_pass(
        self,
        node_mars,
        element_mars,
        node_flows,
        element_flows,
        param_flows,
        listener,
        overlap: bool = True,
        inputs: bool = True,
        keep_node_flows: bool = False,
        em: PassEM | None = None,
    ):
        """The flows pass, top-down: per sum layer the recompute of the product layer below, the sum
        layer's backward and the product layer's backward, then (`inputs`) the input layers' statistics.

        `overlap` (training steps): each product layer is recomputed ahead on one side stream (into two
        alternating element buffers) and each sum layer's parameter flows run behind on another
        (engine/executor/streams.py); the listener hears of a sum layer once its parameter flows are
        queued, with the parameter-flow stream current (work it queues follows them; a tensor it
        allocates there belongs to that stream's pool), and of every other step on the caller's stream.
        With `early_stats` (a kernel option), the input rows whose flows a product layer's backward
        finished (`LayerPlan.input_flows_ready`, merged by `stream_schedule.early_stats`) get their
        statistics on the parameter-flow stream right after it, each range reported to
        `stats_listener` there; the input layer's step computes only the rest. With `em` (PassEM) each
        sum layer's EM update follows its parameter flows and each input range's its statistics
        (data-parallel: on the `em` stream, behind the all-reduce whose wait the listener returned).
        Otherwise the same walk runs every launch in order on the caller's stream (one element buffer,
        nothing deferred): queries that read node flows, profiled batches, the PyTorch executor."""
        streams = self._flow_streams if overlap else FlowStreams.one_stream()
        if overlap and (streams is None or streams.device != self.device):
            streams = self._flow_streams = FlowStreams(self.device)
        places = self._recompute_buffers() if overlap else None
        spare = None
        if places is not None and places.spare_rows:
            spare = self._scratch(places.spare_rows, element_mars.shape[1])
            spare[:PAD_ROWS] = -torch.inf
        freed = [None, None]  # per element buffer: an event after its last reader (parameter flows)
        held = []  # deferred launches and the tensors they read stay alive until the join
        # early statistics in every pass a reducer listens to, overlapped or not (a profiled batch runs the
        # plain pass): each rank must issue the same all-reduces in the same order, whichever batch it samples
        listening = self.stats_listener is not None
        early = self._early_stats() if inputs and self.backend.early_stats and (overlap or listening) else {}
        stats_done = [0] * len(self.input_layers)  # per input layer: its nodes [0, done) have statistics
        streams.fork()
        if em is not None and (em.listening or listening):  # an input range may wait for its all-reduce
            streams.fork_em()
        try:
            j = 0  # sum layers passed: the current one's element buffer is the (j % 2)-th
            ebuf, flows = element_mars, (node_flows, element_flows, param_flows, keep_node_flows)
            for p, step in enumerate(self.plan.backward_steps(inputs=inputs)):
                args = (node_mars, ebuf, *flows)
                if step.pass_name == "recompute":
                    with streams.on(streams.recompute):
                        streams.wait(freed[j % 2])
                        if places is not None:  # its place is free now: its last readers are done
                            ebuf = self._recompute_buffer(places, j, element_mars, spare, node_mars)
                        self._backward_step(step, node_mars, ebuf, *flows)
                        ready = streams.mark()
                    streams.wait(ready)
                elif step.layer.kind == "sum":
                    later: list | None = [] if overlap else None
                    self._backward_step(step, *args, later)
                    scaled = streams.mark()
                    with streams.on(streams.params):
                        streams.wait(scaled)
                        for launch in later or ():
                            launch()
                        # an all-reduce of these flows follows them on this stream
                        wait = listener(step) if listener is not None else None
                        freed[j % 2] = streams.mark()
                        if em is not None:  # the weights' last reader is queued: update them behind it
                            em.sum_layer(step.layer, wait, streams)
                    held += later or ()
                    j += 1
                    continue
                elif step.layer.kind == "input":
                    i = self._input_index[step.layer.index]
                    if em is None:
                        self._backward_step(step, *args, stats_from=stats_done[i])
                    else:  # no profiler in such a pass: no span
                        self._stats_then_em(i, node_flows, stats_done[i], None, em, streams)
                else:
                    self._backward_step(step, *args)
                    if p in early:  # input rows whose flows this product layer finished
                        final = streams.mark()
                        with streams.on(streams.params):
                            streams.wait(final)
                            for i, _, hi in early[p]:
                                with self._span(self.input_layers[i].layer, "backward"):  # merged per batch
                                    stats_done[i] = self._stats_then_em(
                                        i, node_flows, stats_done[i], hi, em, streams
                                    )
                if listener is not None:
                    listener(step)
        except BaseException:
            # a launch raised (a kernel's compile error, out of memory, Ctrl-C): join anyway, or the caching
            # allocator could hand the spare buffer, `mus` or a scale to new tensors while a side stream
            # still writes or reads them; a join that fails too (an invalidated capture) must not hide the error
            with contextlib.suppress(Exception):
                streams.join()
            raise
        streams.join()
        held.clear()

    def _recompute_buffers(self) -> RecomputeBuffers:
        """Where the overlapped pass recomputes each product layer (stream_schedule.recompute_buffers),
        once per plan."""
        if self._places is None or self._places[0] is not self.plan:
            self._places = (
                self.plan,
                recompute_buffers(self.plan, bool(self.backend.recompute_in_node_rows)),
            )
        return self._places[1]

    @staticmethod
    def _recompute_buffer(places: RecomputeBuffers, j: int, element_mars, spare, node_mars) -> torch.Tensor:
        """The element buffer of the j-th sum layer's recompute; a view of node rows gets its -inf
        padding rows here, on the recompute stream, after the wait for its last readers."""
        place = places.places[j]
        if place == ELEMENT:
            return element_mars
        if place == SPARE:
            return spare
        view = node_mars[places.starts[j] : places.starts[j] + places.rows[j]]
        view[:PAD_ROWS] = -torch.inf
        return view

    def _stats_then_em(self, i: int, node_flows, lo: int, hi: int | None, em: PassEM | None, streams) -> int:
        """`_input_stats` of input layer i's nodes `[lo, hi)`, then (`em`) their EM update behind them
        (and behind what the stats listener returned for them); returns the statistics' end."""
        if em is None:
            return self._input_stats(i, node_flows, lo, hi)
        waits: list = []
        end = self._input_stats(i, node_flows, lo, hi, waits)
        em.input_rows(i, lo, end, waits, streams)
        return end

    def _early_stats(self) -> dict[int, list]:
        """The overlapped pass's early input statistics (stream_schedule.early_stats), once per plan."""
        if self._early is None or self._early[0] is not self.plan:
            self._early = (self.plan, plan_early_stats(self.plan))
        return self._early[1]

    @torch.no_grad()
    def zero_flows(self) -> None:
        self.param_flows.zero_()
        for inp in self.input_layers:
            inp.stats.zero_()

    @torch.no_grad()
    def accumulate_flows(self, x, missing=None, validate: bool = True) -> torch.Tensor:
        """Forward, then the flows pass adding this batch's parameter flows; returns log p(x) `[B]`."""
        lls = self.forward(x, missing, validate)
        self.backward_flows(accumulate_params=True, keep_node_flows=False)  # no node flows returned
        return lls

    @torch.no_grad()
    def train_step(
        self,
        x,
        missing=None,
        em: tuple[float, float] | None = None,
        reduce=None,
        zero_flows: bool = True,
        validate: bool = True,
    ) -> torch.Tensor:
        """One training step, the one every driver runs (`CapturedStep`, so `optim.fit`): zero the
        flows, forward, the flows pass adding this batch's flows, `reduce` them (a data-parallel
        `engine.distributed.FlowReducer`: started before the pass, waited for after it), then the EM
        update `em = (step_size, pseudocount)` (None: flows only). Returns log p(x) `[B]`.

        With `KernelOptions.em_in_pass` the update runs inside the overlapped flows pass, each
        layer's as soon as its last reader is queued (`PassEM`), so a step that fails after the first
        update leaves the parameters partly updated (the error says so); otherwise (ties, a profiled batch, a
        reducer that sums only after the pass, the PyTorch executor) `em_step` after it, as before."""
        if em is not None:
            check_em_args(*em)  # before any launch
        if zero_flows:
            self.zero_flows()
        if reduce is not None:
            reduce.start()  # a data-parallel reducer may start summing layers as they finish
        in_pass = self._pass_em(em, reduce)
        try:
            ll = self.forward(x, missing, validate)
            self.backward_flows(accumulate_params=True, keep_node_flows=False, em=in_pass)
        except BaseException as err:
            if reduce is not None:
                reduce.cancel()  # no listener left armed, no half step's works waited on next time
            if in_pass is not None:
                err.add_note(
                    "em_in_pass: this step's EM updates run inside the flows pass, so what was updated before "
                    f"the failure keeps its new parameters ({in_pass.updated} sum layer(s) so far)"
                )
            raise
        finally:
            self._mars, self._inputs_cache = None, []  # the step buffers are not needed after the flows
        if in_pass is not None:
            if reduce is not None:
                reduce()  # every all-reduce of the step waited for: the layers left over read their sums
            in_pass.finish()
            return ll
        pending = reduce(defer_stats=em is not None) if reduce is not None else None
        if em is not None:  # the last statistics' sums may still arrive during the update
            self.em_step(*em, pending=pending)
        return ll

    def _pass_em(self, em, reduce) -> PassEM | None:
        """The EM update to make inside this step's flows pass, or None: it runs after the pass."""
        overlap = self._overlapped(accumulate_params=True, keep_node_flows=False)  # train_step's pass
        listening = self.flow_listener is not None
        summed_in_pass = reduce is None or (listening and self.stats_listener is not None)
        if em is None or not (self.backend.em_in_pass and overlap and self._ties.empty and summed_in_pass):
            return None
        return PassEM(self, *em, listening=listening)

    @torch.no_grad()
    def em_step(self, step_size: float = 1.0, pseudocount: float = 0.0, pending=None) -> None:
        """One EM update from the accumulated flows: new = (1-step) * old + step * normalised flows.

        Tied parameters (`NodeVector.tie_to`) are updated from the flows of all their copies.
        `pending` (data-parallel EM, `engine.distributed.PendingStats`): input statistics whose sums
        over ranks may still be arriving; each input layer's rows are updated once theirs have, so
        the sum-weight update overlaps the last all-reduce."""
        try:
            self._em_step(step_size, pseudocount, pending)
        finally:
            if pending is not None:
                pending.wait_all()  # no all-reduce of this step left in flight after it, even on an error

    def _em_step(self, step_size: float, pseudocount: float, pending) -> None:
        check_em_args(step_size, pseudocount)
        ties = None if self._ties.empty else self._ties
        if pending is not None and ties is not None:
            pending.wait_all()  # tied copies' flows move between layers: everything must be summed first
        saved = ties.before_em(self) if ties is not None else None  # copies' flows into their sources
        self.backend.sum_em_update_all(
            self.tables,
            self.plan.sum_layers,
            self.params,
            self.param_flows,
            self.param_mask,
            step_size,
            pseudocount,
        )
        for i, (inp, table) in enumerate(zip(self.input_layers, self.tables.inputs)):
            pieces = pending.pieces(i) if pending is not None else []
            for lo, hi, wait in pieces:
                wait()
                self.backend.input_em_update(inp, table, step_size, pseudocount, lo, hi)
            if not pieces:
                self.backend.input_em_update(inp, table, step_size, pseudocount)
        if ties is not None:
            ties.after_em(self, saved)  # sources' new values into their copies

    def num_parameters(self) -> int:
        """Learnable parameters: sum weights (no padding) plus input parameters, a tied set counted
        once. Tied copies keep their own slots (memory grows with copies; this count does not)."""
        return self.plan.num_learnable_params

    # ----------------------------------------------------------------- profiling and export
    def profile(
        self,
        enabled: bool = True,
        callback: Callable[[dict], None] | None = None,
        every: int = DEFAULT_EVERY,
        interval_s: float | None = None,
    ) -> LayerProfiler | None:
        """Turn per-layer profiling on (returns the profiler) or off; spans of every `every`-th batch,
        or of one batch per `interval_s` seconds when that is given."""
        self.profiler = LayerProfiler(self.device, callback, every, interval_s) if enabled else None
        return self.profiler

    @torch.no_grad()
    def sync_to_nodes(self) -> NodeVector:
        """Write the current parameters back into the node vectors; returns the root."""
        scatter_sum_params(self.params, self._compiled_plan, self._vectors)
        for inp in self.input_layers:
            inp.sync_to_nodes(self._vectors)
        return self.root

    def extra_repr(self) -> str:
        return (
            f"layers={len(self.plan.layers)}, vars={self.num_vars}, params={self.plan.num_params}, "
            f"backend={self.backend.name}"
        )


def check_em_args(step_size: float, pseudocount: float) -> None:
    """Raise ValueError naming an EM setting that cannot update."""
    if not 0.0 < step_size <= 1.0:
        raise ValueError(f"step_size must be in (0, 1], got {step_size}")
    if pseudocount < 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount}")


def compile(
    root: NodeVector,
    block_size=None,
    device="cpu",
    tolerance: float = DEFAULT_TOLERANCE,
    backend: str | None = None,
    kernel_options=None,
) -> CompiledCircuit:
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
    return CompiledCircuit(
        root,
        block_size=block_size,
        tolerance=tolerance,
        device=dev,
        backend=backend,
        kernel_options=kernel_options,
    )


__all__ = ["CompiledCircuit", "compile", "LayerPlan", "PAD_ROWS"]
