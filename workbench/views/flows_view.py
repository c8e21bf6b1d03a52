"""One training step's flows on the session's circuit: flow mass per layer and one sum node's EM update.

The numbers come from `workbench.services.flows.step_flows` (the engine's forward, flows pass and
EM update on one batch of the training data); this view only draws the plain arrays it returns.
"""

from __future__ import annotations

from pathlib import Path

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
import param

from workbench.services import flows
from workbench.state.session import SessionState
from workbench.views._common import KIND_COLORS, NO_WHEEL, fmt_count, learn, plural_n, safe_text
from workbench.views._deferred import DeferWhileHidden

LEARN = """**Flows: how EM learns without autograd.** After the forward pass, one top-down *flows* pass
gives each node the share of every example's probability that runs through it (the root's is 1).
A sum node splits its flow among its children in proportion to `weight x child value`; a product
hands its whole flow to each child. **Left:** the flow per example reaching each layer, coloured by
kind: flow is conserved, so a layer's mass counts the variable groups (scopes) it covers: 1 at the
root, one per variable at the inputs. **Right:** the EM update of one sum node: per child, the old
weight (grey), the child's share of the node's flow summed over the batch (purple) and the new
weight (green), which moves from the old weight toward the flow share by the EM step size. The same
pass, batched per partition, is the `backward` lane of the Schedule tab."""

UPDATE_COLORS = {"old weight": "#9e9e9e", "flow share": "#b279a2", "new weight": "#54a24b"}
NODE_COLUMNS = ["child", "element_row", "old_weight", "flow", "flow_share", "new_weight"]
# Forward FLOPs (x examples) a step may take without asking: ~0.2 s on this 2-core CPU. The 304K-node
# PD-64 has 13.7 MFLOP per example; one step on 65 rows took 34 s on the loaded box (2026-11-30).
AUTO_FLOP = 2e7
MIN_ROWS = 8


def batch_for(flops_per_example: float, batch_size: int) -> tuple[int, bool]:
    """(examples in the step, whether it runs without asking): the training batch size, at most
    MAX_BATCH, fewer for large circuits; below MIN_ROWS a button runs it."""
    fit = int(AUTO_FLOP // max(flops_per_example, 1))
    rows = max(MIN_ROWS, min(batch_size, flows.MAX_BATCH, fit))
    return rows, fit >= MIN_ROWS


def _hide_inner_labels(plot, element) -> None:
    """Name only the children on the x axis: the three bars of a child are told apart by the legend
    (their own labels ran into each other)."""
    plot.state.xaxis[0].major_label_text_font_size = "0px"


class FlowsView(DeferWhileHidden, pn.viewable.Viewer):
    """Sum-layer and node pickers, the per-layer flow mass and the chosen node's EM update."""

    session = param.ClassSelector(class_=SessionState)

    def __init__(self, **params):
        super().__init__(**params)
        self.layer = pn.widgets.Select(name="Layer of the sum node", options={}, width=260)
        self.node = pn.widgets.IntInput(name="Node in layer", value=0, start=0, end=0, width=140)
        self.top_btn = pn.widgets.Button(name="Node with the most flow", width=200)
        self.run_btn = pn.widgets.Button(
            name="Run one EM step", button_type="primary", width=200, visible=False
        )
        self.run_btn.on_click(lambda e: self.recompute(force=True))
        self.info = pn.pane.Markdown("", margin=(0, 10))
        self.mass = pn.pane.HoloViews(sizing_mode="stretch_width", height=330)
        self.update_plot = pn.pane.HoloViews(sizing_mode="stretch_width", height=330)
        self.formula = pn.pane.Markdown("", margin=(0, 10))
        self.table = pn.widgets.Tabulator(
            pd.DataFrame(columns=NODE_COLUMNS),
            show_index=False,
            disabled=True,
            height=220,
            sizing_mode="stretch_width",
        )
        self.result: flows.StepFlows | None = None
        self._setting = False
        plan, t = self.session.plan, self.session.training
        plan.param.watch(lambda *e: self.when_shown("step", self.recompute), ["plan", "absent"])
        t.param.watch(lambda *e: self.when_shown("step", self.recompute), ["step_size", "pseudocount"])
        plan.param.watch(lambda e: self._follow_selection(e.new), "selected_layer")
        self.layer.param.watch(lambda e: self._on_layer(e.new), "value")
        self.node.param.watch(lambda e: self.when_shown("node", self.draw_node), "value")
        self.top_btn.on_click(lambda e: self._pick_top())
        self.recompute()

    # ------------------------------------------------------------------ data
    def _why_not(self) -> str:
        """Why no step can run ('' when it can)."""
        ses = self.session
        if ses.plan.plan is None:
            return ses.plan.absent
        if ses.build.mismatch:
            return f"No flows: {safe_text(ses.build.mismatch)}."
        if ses.build.data.load() is None:
            return f"No flows: the dataset cannot be loaded ({safe_text(ses.build.data.error)})."
        return ""

    def recompute(self, force: bool = False) -> None:
        """Run one EM step of the current plan on the first rows of the training data (a large
        circuit waits for the button: the step runs in the server, and would hold the page)."""
        why = self._why_not()
        ses = self.session
        fpe = sum(la["flops_per_example"] for la in ses.plan.layers)
        n, auto = batch_for(fpe, ses.plan.batch_size)
        self.run_btn.visible = not why and not auto
        if not why and not auto and not force:
            self.run_btn.name = f"Run one EM step on {n} rows"
            why = (
                f"A large circuit: one EM step on {n} rows is about {fmt_count(3 * fpe * n)}FLOP, which "
                "takes a while on a CPU, so it runs when you press the button."
            )
        if why:
            self.result = None
            self.info.object, self.formula.object = why, ""
            self.mass.object = self.update_plot.object = None
            self.layer.options = {}
            self.table.value = pd.DataFrame(columns=NODE_COLUMNS)
            return
        try:
            self.result = flows.step_flows(
                ses.build.root,
                ses.build.data.load().train,
                ses.plan.block_size,
                ses.plan.tolerance,
                step_size=ses.training.step_size,
                pseudocount=ses.training.pseudocount,
                batch_size=n,
            )
        except ValueError as err:  # e.g. another dataset chosen since the build: its rows do not fit
            self.result = None
            self.info.object = f"No flows: {safe_text(err)}. Build the circuit for this dataset."
            self.mass.object = self.update_plot.object = None
            return
        self._set_layers()
        self.mass.object = self._mass_plot()
        self.draw_node()

    def _set_layers(self) -> None:
        r = self.result
        sums = [la for la in r.layers if la["kind"] == "sum"]
        options = {
            f"layer {la['layer']} (depth {la['depth']}, {plural_n(la['num_nodes'], 'node')})": la["layer"]
            for la in sums
        }
        sel = self.session.plan.selected_layer
        keep = self.layer.value if self.layer.value in options.values() else None
        chosen = sel if sel in options.values() else keep if keep is not None else sums[-1]["layer"]
        self._setting = True
        try:
            self.layer.options = options
            self.layer.value = chosen
            self._bound_node(chosen, self.result.top_nodes.get(chosen, 0))
        finally:
            self._setting = False

    def _bound_node(self, layer: int, value: int) -> None:
        count = max(node for (la, node) in self.result.node_updates if la == layer)
        self.node.param.update(end=count, value=min(value, count))

    def _on_layer(self, layer) -> None:
        if self._setting or layer is None or self.result is None:
            return
        self._setting = True
        try:
            self._bound_node(layer, self.result.top_nodes.get(layer, 0))
        finally:
            self._setting = False
        self.when_shown("node", self.draw_node)
        self.session.plan.selected_layer = layer  # linked: the other tabs highlight it

    def _follow_selection(self, layer) -> None:
        if layer is not None and layer in self.layer.options.values() and layer != self.layer.value:
            self.layer.value = layer

    def _pick_top(self) -> None:
        if self.result is not None and self.layer.value is not None:
            self.node.value = self.result.top_nodes.get(self.layer.value, 0)

    # ------------------------------------------------------------------ drawing
    def _mass_plot(self):
        r = self.result
        df = pd.DataFrame(r.layers)
        df["name"] = [f"{k[0].upper()}{i}" for k, i in zip(df["kind"], df["layer"])]
        sel = self.session.plan.selected_layer
        df["alpha"] = [1.0 if sel is None or la == sel else 0.35 for la in df["layer"]]
        return hv.Bars(df, "name", ["mass", "kind", "layer", "num_nodes", "alpha"]).opts(
            color="kind",
            cmap=KIND_COLORS,
            alpha="alpha",
            title=f"Flow per example reaching each layer (batch of {r.batch_size})",
            xlabel="layer, bottom-up (I: input, P: product, S: sum)",
            ylabel="flow per example (scopes covered)",
            tools=["hover"],
            responsive=True,
            height=320,
            show_legend=False,
            **NO_WHEEL,
        )

    def draw_node(self) -> None:
        r, layer = self.result, self.layer.value
        if r is None or layer is None:
            return
        u = r.node_updates.get((layer, int(self.node.value)))
        if u is None:
            self.update_plot.object = None
            self.formula.object = f"Node {self.node.value} of layer {layer} is not kept (too many nodes)."
            return
        share = u.flow / max(u.flow.sum(), 1e-30)
        rows = [
            (str(k), what, float(v))
            for k in range(u.flow.size)
            for what, v in (("old weight", u.old[k]), ("flow share", share[k]), ("new weight", u.new[k]))
        ]
        value = hv.Dimension("value", values=list(UPDATE_COLORS))  # old, share, new: in that order
        self.update_plot.object = hv.Bars(rows, ["child", value], "weight").opts(
            color="value",
            cmap=UPDATE_COLORS,
            title=f"EM update of node {u.node} of sum layer {layer} (partition {u.partition})",
            xlabel="child (product node) of the sum node",
            ylabel="weight / share of the node's flow",
            tools=["hover"],
            responsive=True,
            height=320,
            legend_position="top_right",
            show_legend=True,
            hooks=[_hide_inner_labels],
            **NO_WHEEL,
        )
        self.table.value = pd.DataFrame(
            {
                "child": np.arange(u.flow.size),
                "element_row": u.child_rows,
                "old_weight": u.old.round(4),
                "flow": u.flow.round(3),
                "flow_share": share.round(4),
                "new_weight": u.new.round(4),
            },
            columns=NODE_COLUMNS,
        )
        self._describe(u)

    def _describe(self, u: flows.NodeUpdate) -> None:
        r, ses = self.result, self.session
        data = Path(ses.build.data.dataset).name
        self.info.object = (
            f"One EM step on the first **{r.batch_size}** training rows of `{safe_text(data)}` "
            f"(mean log-likelihood **{r.log_likelihood:.3f} nats**), computed by the engine in "
            f"{r.seconds:.2f} s at the Partitions tab's block size and tolerance."
        )
        self.formula.object = (
            f"Node {u.node} received flow **{u.node_flow:.4g}** over the batch "
            f"({u.node_flow / r.batch_size:.3f} per example) through {u.flow.size} children. "
            f"new = (1 - step) x old + step x (flow + pc / {u.flow.size}) / (sum of flows + pc), with "
            f"step **{r.step_size:g}** and pseudocount pc **{r.pseudocount:g}** (the Train tab's EM step "
            f"size at the first epoch and pseudocount); the largest change is "
            f"{fmt_count(float(np.abs(u.new - u.old).max()))}."
        )

    def __panel__(self):
        controls = pn.Row(self.layer, self.node, self.top_btn, self.run_btn, align="end")
        return pn.Column(
            learn(LEARN),
            self.info,
            controls,
            pn.Row(self.mass, self.update_plot),
            self.formula,
            self.table,
            sizing_mode="stretch_width",
        )
