"""Per-session partition what-if: the layer plan of the built circuit at a chosen block size and tolerance.

`PlanState` recompiles the plan (no tensors) whenever `root`, `block_size` or `tolerance` change;
views debounce the widgets that set them. Everything it exposes is plain data.
"""

from __future__ import annotations

import time

import param

from workbench.services import plans
from workbench.services.circuits import error_message

BLOCK_SIZES = [None, 1, 2, 4, 8, 16, 32, 64]


class PlanState(param.Parameterized):
    """Layer plan, partitions, padding and predicted cost of the session's circuit."""

    root = param.Parameter(default=None, doc="Root NodeVector to plan (set from BuildState.root)")
    block_size = param.Selector(
        default=None, objects=BLOCK_SIZES, doc="Compile block size (None: each vector's own block size)"
    )
    tolerance = param.Number(
        default=0.5,
        bounds=(0.0, 4.0),
        doc="Partition tolerance: max degree / min degree - 1 within a partition (0.5: the demo's "
        "node blocks of 2 and 3 child blocks share a padded partition, so padding shows at once)",
    )
    batch_size = param.Integer(default=512, bounds=(1, None), doc="Batch size for predicted cost and memory")
    peak_flops = param.Number(
        default=plans.DEFAULT_PEAK_FLOPS, bounds=(1.0, None), doc="Roofline peak compute, FLOP/s"
    )
    bandwidth = param.Number(
        default=plans.DEFAULT_BANDWIDTH, bounds=(1.0, None), doc="Roofline memory bandwidth, bytes/s"
    )
    launch_us = param.Number(
        default=plans.DEFAULT_LAUNCH_US,
        bounds=(0.0, None),
        doc="Fixed cost per partition (kernel launch), microseconds",
    )

    plan = param.Parameter(default=None, constant=True, doc="engine LayerPlan (None until planned)")
    summary = param.Dict(
        default={},
        constant=True,
        doc="plan.to_dict(batch_size) minus layers: counts, memory_bytes, compile_seconds",
    )
    layers = param.List(default=[], constant=True, doc="plan.to_dict()['layers']: one dict per layer")
    sum_layers = param.List(
        default=[],
        constant=True,
        doc="Per sum layer: layer, partitions, padding_ratio, flops, bytes (per batch)",
    )
    padding_ratio = param.Number(default=0.0, constant=True, doc="Padded fraction of all sum edges")
    error = param.String(default="", constant=True, doc="Why planning failed ('' if it succeeded)")
    selected_layer = param.Integer(
        default=None,
        allow_None=True,
        doc="Plan layer picked in any view (a schedule bar, the Partitions layer menu, a layer glyph); "
        "every view highlights it",
    )
    absent = param.String(
        default="No circuit yet: build one in the Build tab.",
        doc="What views say while there is no plan (no build yet, or the last build failed)",
    )
    seconds = param.Number(default=0.0, constant=True, doc="Wall time of the last recompute, s")

    def __init__(self, **params):
        super().__init__(**params)
        self.node_rows: dict[int, int] = {}  # vector uid -> first node_mars row in `plan`
        if self.root is not None:
            self.recompute()

    @param.depends("root", "block_size", "tolerance", "batch_size", watch=True)
    def recompute(self) -> None:
        """Recompile the plan for the current options (called on change; cheap: no tensors)."""
        t0 = time.perf_counter()
        if self.root is None:
            return self._publish(None, "")
        prepared, self._prepared = getattr(self, "_prepared", None), None
        try:
            if (
                prepared is not None
                and prepared[0] is self.root
                and prepared[1] == (self.block_size, self.tolerance)
            ):
                plan, self.node_rows = prepared[2]  # compiled by prepare() in a build thread
                t0 -= prepared[3]  # its compile time counts: "planned in" says what planning took
            else:
                plan, self.node_rows = plans.make_plan_rows(self.root, self.block_size, self.tolerance)
        except (ValueError, TypeError) as err:
            self.node_rows = {}
            return self._publish(None, error_message(err), t0)
        return self._publish(plan, "", t0)

    def prepare(self, root) -> None:
        """Compile `root`'s plan at the current options before `root` is set, off the event loop
        (BuildState.prepare calls this in a build thread); `recompute` then takes it as is."""
        options = (self.block_size, self.tolerance)
        t0 = time.perf_counter()
        try:
            self._prepared = (root, options, plans.make_plan_rows(root, *options), time.perf_counter() - t0)
        except (ValueError, TypeError):
            self._prepared = None  # recompute compiles again and reports the error

    def partitions_of(self, vector, b: int) -> list[tuple[int, int]]:
        """(sum layer, partition) of each node block of sum `vector` cut into `b`-node blocks."""
        if self.plan is None or vector.uid not in self.node_rows:
            return []
        return plans.block_partitions(self.plan, self.node_rows[vector.uid], vector.num_nodes // b, b)

    def _publish(self, plan, error: str, t0: float | None = None) -> None:
        d = plan.to_dict(self.batch_size) if plan is not None else {"layers": []}
        layers = d.pop("layers")
        with param.edit_constant(self):
            self.param.update(
                plan=plan,
                summary=d if plan is not None else {},
                layers=layers,
                sum_layers=plans.sum_layer_summaries(plan, self.batch_size) if plan is not None else [],
                padding_ratio=plans.padding_ratio(plan) if plan is not None else 0.0,
                error=error,
                seconds=0.0 if t0 is None else time.perf_counter() - t0,
            )

    def block_matrix(self, layer: int, max_cells: int = 256) -> plans.BlockMatrix:
        """Block-sparse occupancy of sum layer `layer` (index into plan.layers) for a heat map."""
        if self.plan is None:
            raise ValueError("no plan: build a circuit first")
        return plans.block_matrix(self.plan.layers[layer], max_cells)

    def schedule(self, measured: dict[tuple[int, str], float] | None = None) -> list[dict]:
        """Ordered forward/backward records with predicted (roofline) and measured ms; see plans.schedule."""
        if self.plan is None:
            return []
        return plans.schedule(
            self.plan, self.batch_size, self.peak_flops, self.bandwidth, self.launch_us, measured
        )

    def schedule_of(self, plan: dict, measured: dict[tuple[int, str], float] | None = None) -> list[dict]:
        """`schedule` of another plan given as `plan.to_dict()` (a run's plan event), at the batch size
        it was written for, under this session's device model: lays out a run's own plan."""
        bs = plans.plan_batch_size(plan, self.batch_size)
        return plans.schedule(plan, bs, self.peak_flops, self.bandwidth, self.launch_us, measured)
