"""The Train tab's multi-GPU parts (issue 12): the "GPUs" selector and per-rank live plots.

The selector is shown only when the server offers more than one rank (`services.ranks.gpu_choices`:
several visible GPUs, or CW_RANKS_ON_CPU=1 as a testing aid). A data-parallel run streams every
rank's layer times and memory (`RunState.ranks`); three plots show them: each rank's step split
into compute and the all-reduce (its share in the title), each rank's time per layer, and each
rank's device memory. They are hidden for one-process runs. Redraws stream or swap small columns,
as `live_plots` does, so no figure is rebuilt.
"""

from __future__ import annotations

import panel as pn
from bokeh.models import ColumnDataSource, FactorRange
from bokeh.palettes import Category10_10

from workbench.views.live_plots import _figure

PARTS = {"compute": "#72b7b2", "allreduce": "#e45756"}  # the step's two parts, stacked per rank


def gpu_selector(training) -> pn.widgets.Select:
    """The "GPUs" select bound to `training.gpus`; hidden unless more than one rank is offered."""
    from workbench.services.ranks import gpu_choices

    choices = gpu_choices()
    return pn.widgets.Select.from_param(
        training.param.gpus, options=choices, name="GPUs", width=90, visible=len(choices) > 1
    )


def _color(rank: int) -> str:
    return Category10_10[rank % len(Category10_10)]


class RankPlots:
    """Per-rank step split, per-layer times and memory of a data-parallel run; `update(run)` redraws."""

    def __init__(self):
        self.step_src = ColumnDataSource({"rank": [], **{p: [] for p in PARTS}})
        self.step = _figure(
            "Per-rank step: compute and all-reduce (ms)",
            "rank",
            "ms per step",
            x_range=FactorRange(factors=[]),
        )
        self.step.vbar_stack(
            list(PARTS),
            x="rank",
            width=0.6,
            source=self.step_src,
            color=list(PARTS.values()),
            legend_label=["compute", "all-reduce"],
        )
        self.step.y_range.start = 0
        self.layers = _figure("Per-rank time per layer (ms per step, all passes)", "layer", "ms")
        self.memory = _figure("Per-rank device memory", "time since the first sample (s)", "memory (MB)")
        self._layer_src: dict[int, ColumnDataSource] = {}
        self._memory_src: dict[int, ColumnDataSource] = {}
        self._sent: dict[int, int] = {}
        self._run_id: str | None = None
        self._t0: float | None = None
        self.view = pn.Column(
            pn.Row(
                pn.pane.Bokeh(self.step, sizing_mode="stretch_width"),
                pn.pane.Bokeh(self.layers, sizing_mode="stretch_width"),
            ),
            pn.pane.Bokeh(self.memory, sizing_mode="stretch_width"),
            visible=False,
            sizing_mode="stretch_width",
        )
        self._rank_sources(0)  # every data-parallel run has a rank 0: its legends exist before the
        # page draws them (a Legend added to a drawn figure has no view in BokehJS: "cannot find a view")

    def _rank_sources(self, r: int) -> None:
        """Line renderers of a rank seen for the first time."""
        if r in self._layer_src:
            return
        self._layer_src[r] = ColumnDataSource({"layer": [], "ms": []})
        self._memory_src[r] = ColumnDataSource({"t": [], "allocated": []})
        self._sent[r] = 0
        self.layers.line(
            "layer", "ms", source=self._layer_src[r], color=_color(r), line_width=2, legend_label=f"rank {r}"
        )
        self.layers.scatter("layer", "ms", source=self._layer_src[r], color=_color(r), size=5)
        self.memory.line(
            "t",
            "allocated",
            source=self._memory_src[r],
            color=_color(r),
            line_width=2,
            legend_label=f"rank {r}",
        )

    def update(self, run) -> None:
        """Show `run`'s per-rank series (hidden when it has none: a one-process run)."""
        ranks = run.ranks if run is not None else {}
        self.view.visible = bool(ranks)
        if not ranks:
            return
        if run.run_id != self._run_id:  # another run: empty every series
            self._run_id, self._t0 = run.run_id, None
            for src in (*self._layer_src.values(), *self._memory_src.values()):
                src.data = {k: [] for k in src.data}
            self._sent = dict.fromkeys(self._sent, 0)
        order = sorted(ranks)
        factors = [str(r) for r in order]
        if list(self.step.x_range.factors) != factors:
            self.step.x_range.factors = factors
        self.step_src.data = {
            "rank": factors,
            "compute": [sum(ranks[r]["layer_ms"].values()) for r in order],
            "allreduce": [ranks[r]["allreduce_ms"] for r in order],
        }
        shares = ", ".join(f"rank {r} {100 * ranks[r]['allreduce_share']:.0f}%" for r in order)
        self.step.title.text = f"Per-rank step (ms): all-reduce share {shares}"
        cpu = all(ranks[r].get("device") == "cpu" for r in order)
        self.memory.title.text = (
            "Per-rank device memory: none on CPU (gloo ranks)" if cpu else "Per-rank device memory"
        )
        for r in order:
            self._rank_sources(r)
            per_layer: dict[int, float] = {}
            for (layer, _), ms in ranks[r]["layer_ms"].items():
                per_layer[layer] = per_layer.get(layer, 0.0) + ms
            layers = sorted(per_layer)
            self._layer_src[r].data = {"layer": layers, "ms": [per_layer[x] for x in layers]}
            mem = ranks[r]["memory_series"]
            if self._t0 is None and mem["t"]:
                self._t0 = mem["t"][0]
            n, sent = len(mem["t"]), self._sent[r]
            if n > sent:
                self._memory_src[r].stream(
                    {
                        "t": [t - (self._t0 or 0.0) for t in mem["t"][sent:]],
                        "allocated": [v / 1e6 for v in mem["allocated"][sent:]],
                    }
                )
                self._sent[r] = n
