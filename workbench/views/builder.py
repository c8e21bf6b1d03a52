"""Build a circuit: a template with its parameters, a composed graph of node vectors, or a file.

The view only edits `BuildState` (template spec, graph spec, file path, dataset) and calls its
`build()`; the build service turns any invalid circuit into one readable line, shown in an alert.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import panel as pn
import param

from workbench.services.background import build_pool, run_then
from workbench.services.uploads import CIRCUIT_SUFFIXES
from workbench.state.circuit import BuildState
from workbench.views._common import collapsing_tabs, learn, plural, plural_n, safe_text, set_status, status

LEARN = """**Build a circuit.** A PC here is a DAG of *node vectors*: input vectors (leaves over one
variable), product vectors (factorisations) and sum vectors (mixtures), each cut into *node blocks*.
Templates (HCLT, PD, RAT-SPN, HMM) generate thousands of vectors with regular block structure, which is
what lets a compiler batch them into a few dense layers. A circuit must be *smooth* (a sum's children
share a scope) and *decomposable* (a product's children have disjoint scopes) to be a valid PC."""

# Only the fields a template reads with a dataset chosen (the workbench always has one): RAT-SPN's
# num_vars and HMM's seq_length / num_emits / input_dist come from the data, so they are not shown.
TEMPLATE_FIELDS = {
    "hclt": ["num_latents", "sum_density", "input_dist", "chow_liu_samples", "seed"],
    "pd": [
        "num_latents",
        "sum_density",
        "input_dist",
        "data_shape",
        "split_intervals",
        "max_split_depth",
        "seed",
    ],
    "rat_spn": ["num_latents", "sum_density", "input_dist", "depth", "num_repetitions", "num_pieces", "seed"],
    "hmm": ["num_latents", "homogeneous", "sum_density", "seed"],
}
TEMPLATE_LABELS = {"HCLT": "hclt", "PD": "pd", "RAT-SPN": "rat_spn", "HMM": "hmm"}
NODE_COLUMNS = ["id", "kind", "num_nodes", "block_size", "var", "dist", "num_cats"]
EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "assets" / "circuits"
CHECKED_FIELDS = ("num_latents", "data_shape")  # typed values the view checks itself
HELP = {  # a line under a template's fields, for a choice its name alone does not explain
    "hmm": "**Homogeneous**: every time step shares one transition matrix and one emission table "
    "(tied parameters), so the number of learnable parameters does not grow with the sequence length; "
    "unticked, each step learns its own.",
}


def parse_grid(text: str) -> list[int]:
    """'28 x 28', '28x28', '[28, 28]' or '28, 28' -> [28, 28]; ValueError naming the problem."""
    parts = [p for p in re.split(r"[\sx×,\[\]()]+", str(text).strip().lower()) if p]
    if len(parts) != 2:
        raise ValueError("write two sizes, height x width (e.g. 28 x 28)")
    if not all(p.isdigit() for p in parts):
        raise ValueError("sizes must be whole numbers (e.g. 28 x 28)")
    h, w = int(parts[0]), int(parts[1])
    if h < 1 or w < 1:
        raise ValueError("sizes must be at least 1")
    return [h, w]


class DataPicker(pn.viewable.Viewer):
    """Bundled dataset selector plus an .npy/.csv upload."""

    build = param.ClassSelector(class_=BuildState)

    def __init__(self, **params):
        super().__init__(**params)
        data = self.build.data
        self.select = pn.widgets.Select(name="Dataset", options=data.choices(), value=data.dataset, width=180)
        self.upload = pn.widgets.FileInput(accept=".npy,.npz,.csv", name="Upload data", width=280)
        self.info = pn.pane.Markdown("", margin=(5, 10))
        self.alert = status()
        self.select.param.watch(self._on_select, "value")
        self.upload.param.watch(self._on_upload, "value")
        self._describe()

    def _on_select(self, event) -> None:
        self.build.data.dataset = event.new
        self._describe()

    def _on_upload(self, event) -> None:
        if not event.new:
            return
        from workbench.services import uploads

        res = uploads.save_data_upload(self.upload.filename, event.new)
        if not res.ok:
            set_status(self.alert, f"Upload rejected: {safe_text(res.error)}", "danger")
            return
        name = str(res.path)
        self.select.options = (
            [*self.select.options, name] if name not in self.select.options else self.select.options
        )
        self.select.value = name

    def _describe(self) -> None:
        ds = self.build.data.load()
        if ds is None:
            set_status(self.alert, f"Dataset: {safe_text(self.build.data.error)}", "danger")
            self.info.object = ""
            return
        set_status(self.alert, "")
        s = self.build.data.summary
        self.info.object = (
            f"`{s.get('name')}`: {s.get('kind')}, **{s.get('num_vars')}** variables, "
            f"{s.get('num_train')} / {s.get('num_valid')} / {s.get('num_test')} train/valid/test rows"
        )

    def __panel__(self):
        return pn.Column(pn.Row(self.select, self.upload), self.info, self.alert)


class GraphComposer(pn.viewable.Viewer):
    """Compose a circuit from node vectors and edges with tables and small forms."""

    build = param.ClassSelector(class_=BuildState)

    def __init__(self, **params):
        super().__init__(**params)
        g = self.build.graph
        self.nodes_table = pn.widgets.Tabulator(
            self._nodes_df(),
            show_index=False,
            height=220,
            sizing_mode="stretch_width",
            selectable=1,
            editors={
                "id": None,
                "kind": None,
                "dist": {"type": "list", "values": ["categorical", "bernoulli", "gaussian"]},
            },
        )
        self.edges_table = pn.widgets.Tabulator(
            self._edges_df(),
            show_index=False,
            height=160,
            selectable=1,
            editors={"parent": None, "child": None},
            width=260,
        )
        self.kind = pn.widgets.RadioButtonGroup(options=["input", "product", "sum"], value="input", width=220)
        self.num_nodes = pn.widgets.IntInput(name="num_nodes", value=4, start=1, width=100)
        self.var = pn.widgets.IntInput(name="var (input)", value=0, start=0, width=100)
        self.add = pn.widgets.Button(name="Add node vector", button_type="primary", width=150)
        self.parent = pn.widgets.Select(name="parent", width=110)
        self.child = pn.widgets.Select(name="child", width=110)
        self.connect = pn.widgets.Button(name="Connect", width=90)
        self.remove_node = pn.widgets.Button(name="Remove selected node", button_type="light", width=170)
        self.remove_edge = pn.widgets.Button(name="Remove selected edge", button_type="light", width=170)
        self.example = pn.widgets.Button(name="Load example", button_type="light", width=120)
        self.clear = pn.widgets.Button(name="Clear", button_type="light", width=80)
        self.add.on_click(self._on_add)
        self.connect.on_click(lambda e: self._connect())
        self.remove_node.on_click(self._on_remove_node)
        self.remove_edge.on_click(self._on_remove_edge)
        self.example.on_click(lambda e: self._load_example())
        self.clear.on_click(lambda e: self.build.graph.clear())
        self.nodes_table.on_edit(self._on_edit)
        g.param.watch(self._refresh, ["nodes", "edges"])
        self._refresh()

    def _nodes_df(self) -> pd.DataFrame:
        rows = [{c: n.get(c) for c in NODE_COLUMNS} for n in self.build.graph.nodes]
        df = pd.DataFrame(rows, columns=NODE_COLUMNS, dtype=object)  # object: ints stay ints beside blanks
        return df.where(df.notna(), None)

    def _edges_df(self) -> pd.DataFrame:
        return pd.DataFrame(self.build.graph.edges, columns=["parent", "child"])

    def _refresh(self, *events) -> None:
        self.nodes_table.value = self._nodes_df()
        self.edges_table.value = self._edges_df()
        ids = [n["id"] for n in self.build.graph.nodes]
        self.parent.options = [i for i, n in zip(ids, self.build.graph.nodes) if n["kind"] != "input"]
        self.child.options = ids

    def _on_add(self, event) -> None:
        fields = {"var": self.var.value} if self.kind.value == "input" else {}
        nid = self.build.graph.add_node(self.kind.value, self.num_nodes.value, **fields)
        if self.kind.value != "input":
            self.parent.value = nid

    def _connect(self) -> None:
        if self.parent.value and self.child.value and self.parent.value != self.child.value:
            self.build.graph.connect(self.parent.value, self.child.value)

    def _on_edit(self, event) -> None:
        row = self.nodes_table.value.iloc[event.row]
        value = event.value
        if event.column in ("num_nodes", "var", "num_cats"):
            value = int(value)
        if event.column == "block_size":
            value = int(value) if value not in (None, "", 0) and value == value else None
        self.build.graph.update_node(row["id"], **{event.column: value})

    def _on_remove_node(self, event) -> None:
        for i in self.nodes_table.selection:
            self.build.graph.remove_node(self.nodes_table.value.iloc[i]["id"])

    def _on_remove_edge(self, event) -> None:
        for i in self.edges_table.selection:
            e = self.edges_table.value.iloc[i]
            self.build.graph.disconnect(e["parent"], e["child"])

    def _load_example(self) -> None:
        ex = type(self.build.graph).example()
        self.build.graph.param.update(nodes=ex.nodes, edges=ex.edges)

    def __panel__(self):
        add_row = pn.Row(self.kind, self.num_nodes, self.var, self.add, align="end")
        edge_row = pn.Row(self.parent, self.child, self.connect, align="end")
        return pn.Column(
            pn.pane.Markdown(
                "Node vectors (edit sizes, block sizes, variables in the table). "
                "The root is the one vector without parents.",
                margin=(0, 10),
            ),
            add_row,
            self.nodes_table,
            pn.Row(self.remove_node, self.example, self.clear),
            pn.Row(pn.Column(edge_row, self.remove_edge), self.edges_table),
        )


class FileImport(pn.viewable.Viewer):
    """Import an engine circuit file or a .psdd (upload, or one of the bundled examples)."""

    build = param.ClassSelector(class_=BuildState)

    def __init__(self, **params):
        super().__init__(**params)
        examples = sorted(p.name for p in EXAMPLE_DIR.glob("*.psdd")) if EXAMPLE_DIR.exists() else []
        self.example = pn.widgets.Select(name="Bundled example", options=["", *examples], width=220)
        self.upload = pn.widgets.FileInput(accept=",".join(CIRCUIT_SUFFIXES), width=240)
        self.alert = status()
        self.example.param.watch(self._on_example, "value")
        self.upload.param.watch(self._on_upload, "value")

    def _on_example(self, event) -> None:
        if event.new:
            self.build.file_path = str(EXAMPLE_DIR / event.new)
            set_status(self.alert, f"Selected {safe_text(event.new)}; press **Build**.", "info")

    def _on_upload(self, event) -> None:
        if not event.new:
            return
        from workbench.services import uploads

        res = uploads.save_circuit_upload(self.upload.filename, event.new)
        if not res.ok:
            set_status(self.alert, f"Upload rejected: {safe_text(res.error)}", "danger")
            return
        self.build.file_path = str(res.path)
        set_status(self.alert, f"Uploaded {safe_text(self.upload.filename)}; press **Build**.", "info")

    def __panel__(self):
        return pn.Column(
            pn.pane.Markdown(
                "Native circuit files (`engine.save`), PSDDs (`.psdd`) or Juice's `.jpc` / `.clt` / `.spn`.",
                margin=(0, 10),
            ),
            pn.Row(self.example, self.upload),
            self.alert,
        )


class BuilderView(pn.viewable.Viewer):
    """Template / compose / import, a Build button and the build's outcome."""

    build = param.ClassSelector(class_=BuildState)
    plan = param.Parameter(
        default=None, doc="The session's PlanState: the report's learnable parameter count"
    )

    def __init__(self, **params):
        super().__init__(**params)
        spec = self.build.template
        self.data = DataPicker(build=self.build)
        self.help = pn.pane.Markdown("", margin=(0, 10), styles={"color": "#555"})
        label = {v: k for k, v in TEMPLATE_LABELS.items()}[spec.template]
        self.template = pn.widgets.RadioButtonGroup(
            name="Template", options=list(TEMPLATE_LABELS), value=label
        )
        self.template.param.watch(lambda e: setattr(spec, "template", TEMPLATE_LABELS[e.new]), "value")
        self.template_params = pn.Column()
        self._make_checked_inputs()
        spec.param.watch(lambda e: self._show_template_params(), "template")
        self._show_template_params()
        self.composer = GraphComposer(build=self.build)
        self.importer = FileImport(build=self.build)
        self.sources = collapsing_tabs(
            ("Template", pn.Column(self.template, self.template_params)),
            ("Compose", self.composer),
            ("Import", self.importer),
        )
        self.button = pn.widgets.Button(name="Build circuit", button_type="success", width=160)
        self.button.on_click(self._on_build)
        self.outcome = status()
        if self.build.result is None:
            if pn.state.curdoc is not None and pn.state.curdoc.session_context is not None:
                pn.state.onload(self.build_demo)  # after the page is shown: the wait is visible
            else:
                self.build_demo()

    def _show_template_params(self) -> None:
        """The template's fields; num_latents and PD's data_shape get checked inputs (a value out of
        range or unreadable is said, not silently replaced), the rest come from pn.Param."""
        spec = self.build.template
        fields = TEMPLATE_FIELDS[spec.template]
        rest = [f for f in fields if f not in CHECKED_FIELDS and f != "homogeneous"]
        checked = [self._checked[f] for f in CHECKED_FIELDS if f in fields]
        if "homogeneous" in fields:
            checked.append(self.homogeneous)
        self._follow_spec()
        self.help.object = HELP.get(spec.template, "")
        self.help.visible = spec.template in HELP
        self.template_params[:] = [
            pn.Row(
                *checked,
                pn.Param(
                    spec,
                    parameters=rest,
                    widgets={"seed": pn.widgets.IntInput},
                    show_name=False,
                    default_layout=pn.Row,
                ),
            ),
            self.help,
            self.field_alert,
        ]

    def _make_checked_inputs(self) -> None:
        """Inputs without browser-side clamping, so the server sees what was typed and can say why
        it does not fit (a clamped spinner would snap back silently)."""
        lo, hi = self.build.template.param.num_latents.bounds
        self._latent_bounds = (lo, hi)
        latents = pn.widgets.IntInput(name="Num latents", value=self.build.template.num_latents, width=120)
        shape = pn.widgets.TextInput(name="Data shape (H x W)", width=150)
        latents.param.watch(lambda e: self._on_latents(e.new), "value")
        shape.param.watch(lambda e: self._on_shape(e.new), "value")
        self._checked = {"num_latents": latents, "data_shape": shape}
        # a one-box CheckBoxGroup, not a Checkbox: Bokeh draws a Checkbox's text as a <div> beside the
        # box, so clicking the word did nothing; the group wraps box and word in one <label>
        self.homogeneous = pn.widgets.CheckBoxGroup(options=["Homogeneous"], value=[], margin=(28, 10, 5, 10))
        self.homogeneous.param.watch(
            lambda e: setattr(self.build.template, "homogeneous", "Homogeneous" in e.new), "value"
        )
        self.build.template.param.watch(
            lambda e: setattr(self.homogeneous, "value", ["Homogeneous"] if e.new else []), "homogeneous"
        )
        self._invalid: dict[str, str] = {}  # field -> why the typed value cannot be used
        self._clamping = False  # the view itself is writing a clamped value back
        self.field_alert = status()
        spec = self.build.template
        spec.param.watch(lambda e: self._follow_spec(), ["num_latents", "data_shape", "template"])

    def _follow_spec(self) -> None:
        """Show the spec's values (another template's num_latents, PD's grid fitted to new data)."""
        spec = self.build.template
        self._checked["num_latents"].value = spec.num_latents
        self._checked["data_shape"].value = " x ".join(str(d) for d in spec.data_shape)

    def _on_latents(self, value) -> None:
        lo, hi = self._latent_bounds
        if self._clamping:
            return
        if value is None:
            self._flag("num_latents", f"Num latents is empty: enter a whole number from {lo} to {hi}.")
            return
        clamped = min(max(int(value), lo), hi)
        self.build.template.num_latents = clamped
        note = ""
        if clamped != value:
            note = (
                f"Num latents {value} is out of range ({lo} to {hi}: every region gets that many "
                f"nodes per vector, and above {hi} a template outgrows memory); set to {clamped}."
            )
            self._clamping = True
            try:
                self._checked["num_latents"].value = clamped
            finally:
                self._clamping = False
        self._flag("num_latents", "", note)

    def _on_shape(self, text: str) -> None:
        try:
            shape = parse_grid(text)
        except ValueError as err:
            self._flag(
                "data_shape",
                f"Data shape '{safe_text(text)}': {err}; the build waits until it is fixed.",
            )
            return
        if shape != self.build.template.data_shape:
            self.build.template.data_shape = shape
        self._flag("data_shape", "")

    def _flag(self, field: str, error: str, note: str = "") -> None:
        """Record (or clear) why `field` cannot be used (errors make Build refuse) and show the
        errors, else a note on a value that was changed to fit."""
        if error:
            self._invalid[field] = error
        else:
            self._invalid.pop(field, None)
        if self._invalid:
            set_status(self.field_alert, " ".join(self._invalid.values()), "danger")
        else:
            set_status(self.field_alert, note, "warning")

    def _on_build(self, event) -> None:
        """Say what is being built at once, then build on the next tick (so the message and the
        button's spinner reach the browser first) and report the whole wait. A template field that
        could not be read refuses the build (it would otherwise build with the field's old value)."""
        self.build.source = ("template", "graph", "file")[self.sources.active]
        fields = TEMPLATE_FIELDS[self.build.template.template]
        bad = [f for f in self._invalid if f in fields]
        if self.build.source == "template" and bad:  # the reason stands above, beside the field
            names = " and ".join(
                f"{self._checked[f].name.split(' (')[0]} '{safe_text(str(self._checked[f].value or ''))}'"
                for f in bad
            )
            set_status(
                self.outcome, f"**Not built:** {names} cannot be used; the reason stands above.", "danger"
            )
            return
        self._start_build()

    def _start_build(self, setup=None) -> None:
        """Say what is being built at once; build the circuit and compile its plan on the server's
        build threads (`services.background`: other sessions stay served meanwhile), then publish
        and redraw on this session's event loop. Without a browser session (tests) all runs now."""
        if setup is not None:
            setup()
        self.button.loading = True
        ahead = build_pool().held()
        wait = (
            f" (waiting for a build thread: {ahead} {plural(ahead, 'build')} ahead)"
            if ahead >= build_pool().threads
            else ""
        )
        set_status(self.outcome, f"Building {self._what()}: circuit, then plan, then views…{wait}", "info")
        doc = pn.state.curdoc
        if doc is not None and doc.session_context is not None:
            run_then(self.build.prepare, self._finish_build, doc)
        else:
            self._finish_build(self.build.prepare())

    def _finish_build(self, prepared) -> None:
        """Publish the build; every view redraws inside one frozen document update (the document's
        model graph is walked once, not once per redrawn plot: 5.4 s -> 2.2 s for the demo, measured)."""
        with pn.io.hold(freeze=True):
            try:
                res = self.build.finish(prepared)
            finally:
                self.button.loading = False
            self.report(res)

    def _what(self) -> str:
        b = self.build
        if b.source == "template":
            t = b.template
            sparse = f", sum density {t.sum_density:g}" if t.sum_density < 1 else ""
            label = {v: k for k, v in TEMPLATE_LABELS.items()}[t.template]
            tied = " homogeneous" if t.template == "hmm" and t.homogeneous else ""
            return f"{label}-{t.num_latents}{tied}{sparse} on {Path(b.data.dataset).name}"
        return "the composed circuit" if b.source == "graph" else Path(b.file_path).name or "the file"

    def report(self, res) -> None:
        """The outcome line: counts and the time the user waited, or the reason the build failed;
        alerts of earlier steps (a selected example, a rejected upload) are cleared on success."""
        b = self.build
        if not res.ok:
            set_status(self.outcome, f"**Invalid circuit:** {safe_text(res.error)}", "danger")
            return
        set_status(self.data.alert, "")
        set_status(self.importer.alert, "")
        i = res.info
        kinds = ", ".join(f"{v:,} {k}" for k, v in i.get("vectors_by_kind", {}).items())
        text = (
            f"Built {self._what()} in **{b.seconds:.2f} s** (circuit {res.seconds:.2f} s, plan and views "
            f"{max(b.seconds - res.seconds, 0):.2f} s): a valid circuit of **{i.get('num_nodes'):,}** "
            f"{plural(i.get('num_nodes'), 'node')} in {plural_n(i.get('num_vectors'), 'node vector')} "
            f"({kinds}) over {plural_n(i.get('num_vars'), 'variable')}.{self._parameters()}"
        )
        if i.get("num_nodes") == i.get("num_vectors"):  # a PSDD import: one node per vector
            text += (
                " Every node vector holds one node, so every node block is 1 node: the Partitions "
                "tab's block size cannot merge vectors into larger blocks (its tiles stay 1x1)."
            )
        if b.mismatch:
            set_status(self.outcome, f"{text} **Cannot train:** {safe_text(b.mismatch)}.", "warning")
        else:
            set_status(self.outcome, text, "success")

    def _parameters(self) -> str:
        """' Parameters: 1,234 learnable (tied).' from the session's compiled plan ('' without one);
        a tied set (a homogeneous HMM's steps) counts once, which is what tells it from the plain one."""
        plan = getattr(self.plan, "plan", None)
        if plan is None:
            return ""
        tied = " (tied: one set shared by every step)" if plan.ties.num_tied_params else ""
        return f" Parameters: **{plan.num_learnable_params:,}** learnable{tied}."

    def build_demo(self) -> None:
        """Open on a built circuit, so every tab has something to show at once."""
        self._start_build(setup=self.build.use_demo)

    def __panel__(self):
        return pn.Column(
            learn(LEARN),
            self.data,
            self.sources,
            pn.Row(self.button),
            self.outcome,
            sizing_mode="stretch_width",
        )
