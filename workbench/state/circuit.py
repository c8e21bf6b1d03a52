"""Per-session circuit state: the dataset, a template spec or a drawn graph, and the built root.

Plain `param.Parameterized` classes, no widgets: views bind to these parameters and call `build()`.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import param

from workbench.services import circuits
from workbench.services.circuits import DIST_NAMES, TEMPLATE_DEFAULTS, TEMPLATES, BuildResult

log = logging.getLogger(__name__)

# The demo every session opens on: small enough to build in well under a second, block-sparse so the
# Partitions tab has several partitions (and padding at a larger tolerance) to show.
DEMO = {"template": "hclt", "num_latents": 16, "sum_density": 0.5, "seed": 0}
LATENTS = {"hclt": 16, "pd": 8, "rat_spn": 8, "hmm": 16}  # per-template default num_latents


def grid_shape(num_vars: int) -> list[int]:
    """The most square [H, W] with H * W = num_vars (PD's image grid): 16 -> [4, 4], 69 -> [3, 23]."""
    h = max(d for d in range(1, int(num_vars**0.5) + 1) if num_vars % d == 0)
    return [h, num_vars // h]


def variable_mismatch(res: BuildResult, dataset, name: str) -> str:
    """Why a built circuit cannot be trained on `dataset` ('' if its variables are the dataset's)."""
    if dataset is None or not res.ok:
        return ""
    n = res.info.get("num_vars", 0)
    top = max((v.var for v in res.root.topological() if v.kind == "input"), default=-1)
    if n == dataset.num_vars and top == dataset.num_vars - 1:
        return ""
    label = Path(name).name
    return (
        f"the circuit covers {n} variables (ids up to {top}) but dataset {label} has {dataset.num_vars}: "
        "it cannot be trained on it; choose a dataset with as many variables"
    )


class DataState(param.Parameterized):
    """Which dataset the session trains on: a bundled name or an uploaded file path."""

    dataset = param.String(
        default="nltcs", doc="Bundled dataset name (engine.data) or a path to an uploaded file"
    )
    summary = param.Dict(
        default={},
        constant=True,
        doc="name, kind, num_vars, num_cats, num_train/valid/test of the loaded data",
    )
    error = param.String(default="", constant=True, doc="Why the dataset could not be loaded ('' if fine)")

    def __init__(self, **params):
        super().__init__(**params)
        self._cache: dict[str, object] = {}

    @staticmethod
    def choices() -> list[str]:
        """Bundled dataset names."""
        from engine.data import available_datasets

        return available_datasets()

    def load(self):
        """The `engine.data.Dataset` for `dataset` (cached), or None with `error` set."""
        from workbench.services.uploads import dataset_summary, load_data

        key = self.dataset
        if key not in self._cache:
            ds, err = load_data(key)
            with param.edit_constant(self):
                self.error = err or ""
                self.summary = dataset_summary(ds) if ds is not None else {}
            if ds is None:
                return None
            self._cache = {key: ds}  # keep one: datasets can be large
        return self._cache[key]


class CircuitSpec(param.Parameterized):
    """A template circuit (HCLT, PD, RAT-SPN, HMM) and its parameters."""

    template = param.Selector(default="hclt", objects=list(TEMPLATES), doc="Structure template")
    num_latents = param.Integer(default=16, bounds=(1, 4096), doc="Latent states per region / variable")
    input_dist = param.Selector(
        default="auto", objects=list(DIST_NAMES), doc="Input distribution; 'auto' follows the dataset kind"
    )
    num_cats = param.Integer(
        default=2, bounds=(2, 65536), doc="Categories for categorical inputs without data"
    )
    num_vars = param.Integer(default=16, bounds=(1, None), doc="RAT-SPN variables when no dataset is chosen")
    data_shape = param.List(default=[8, 8], item_type=int, doc="PD: grid shape, e.g. [28, 28] (H, W)")
    split_intervals = param.Integer(default=4, bounds=(1, None), doc="PD: split step along each axis")
    max_split_depth = param.Integer(
        default=None, allow_None=True, bounds=(0, None), doc="PD: cap on nested splits (None: no cap)"
    )
    depth = param.Integer(default=2, bounds=(0, 20), doc="RAT-SPN: number of split levels")
    num_repetitions = param.Integer(default=2, bounds=(1, 256), doc="RAT-SPN: random repetitions")
    num_pieces = param.Integer(default=2, bounds=(2, 16), doc="RAT-SPN: parts per split")
    seq_length = param.Integer(default=8, bounds=(1, None), doc="HMM: sequence length when no dataset")
    num_emits = param.Integer(default=4, bounds=(2, None), doc="HMM: emission symbols when no dataset")
    homogeneous = param.Boolean(
        default=False, doc="HMM: one transition and emission parameter set shared (tied) by all steps"
    )
    chow_liu_samples = param.Integer(default=20000, bounds=(2, None), doc="HCLT: rows used for the tree")
    seed = param.Integer(default=0, doc="Random seed of the structure")
    sum_density = param.Number(
        default=1.0,
        bounds=(0.05, 1.0),
        doc="Share of sum block edges kept; below 1 node blocks get different numbers of child blocks, "
        "so sum layers split into several partitions with padding (engine.structures.sparse)",
    )

    def __init__(self, **params):
        super().__init__(**params)
        self._latents = dict(LATENTS)
        self.param.watch(self._swap_latents, "template")

    def _swap_latents(self, event) -> None:
        """Each template keeps its own num_latents (HMM's 16 states are not PD's 8 per region)."""
        self._latents[event.old] = self.num_latents
        self.num_latents = self._latents.get(event.new, self.num_latents)

    def to_dict(self) -> dict:
        """Plain JSON spec for `services.circuits.build` and the job spec."""
        return {"source": "template", **{k: getattr(self, k) for k in TEMPLATE_DEFAULTS}}

    @classmethod
    def from_dict(cls, d: dict) -> "CircuitSpec":
        return cls(**{k: v for k, v in d.items() if k in TEMPLATE_DEFAULTS})


_graph_ids = itertools.count(1)


class GraphSpec(param.Parameterized):
    """A graphically composed circuit: node vectors and edges as plain dicts (maps 1:1 to a graph editor).

    Node: {"id": str, "kind": "input"|"product"|"sum", "num_nodes": int, "block_size": int|None,
    "var": int (input), "dist": "categorical"|"bernoulli"|"gaussian" (input), "num_cats": int (input),
    "x": float, "y": float (optional editor position)}. Edge: {"parent": id, "child": id}.
    """

    nodes = param.List(default=[], item_type=dict, doc="Node vectors (see class docstring)")
    edges = param.List(default=[], item_type=dict, doc="Edges {'parent': id, 'child': id}, children in order")

    def add_node(self, kind: str, num_nodes: int = 4, **fields) -> str:
        """Append a node vector; returns its id (fields: var, dist, num_cats, block_size, x, y, id)."""
        nid = str(fields.pop("id", None) or f"{kind[0]}{next(_graph_ids)}")
        node = {
            "id": nid,
            "kind": kind,
            "num_nodes": int(num_nodes),
            "block_size": fields.pop("block_size", None),
        }
        if kind == "input":
            node.update(
                var=int(fields.pop("var", 0)),
                dist=fields.pop("dist", "categorical"),
                num_cats=int(fields.pop("num_cats", 2)),
            )
        node.update(fields)
        self.nodes = [*self.nodes, node]
        return nid

    def update_node(self, nid: str, **fields) -> None:
        """Change fields of node `nid`."""
        self.nodes = [{**n, **fields} if n["id"] == nid else n for n in self.nodes]

    def remove_node(self, nid: str) -> None:
        """Remove node `nid` and its edges."""
        self.edges = [e for e in self.edges if nid not in (e["parent"], e["child"])]
        self.nodes = [n for n in self.nodes if n["id"] != nid]

    def connect(self, parent: str, child: str) -> None:
        """Add edge parent -> child (ignored if present)."""
        if not any(e["parent"] == parent and e["child"] == child for e in self.edges):
            self.edges = [*self.edges, {"parent": parent, "child": child}]

    def disconnect(self, parent: str, child: str) -> None:
        self.edges = [e for e in self.edges if not (e["parent"] == parent and e["child"] == child)]

    def clear(self) -> None:
        self.param.update(nodes=[], edges=[])

    def to_dict(self) -> dict:
        return {"source": "graph", "nodes": list(self.nodes), "edges": list(self.edges)}

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(nodes=list(d.get("nodes", [])), edges=list(d.get("edges", [])))

    @classmethod
    def example(cls) -> "GraphSpec":
        """A small valid mixture over two binary variables: sum(product(in0, in1))."""
        g = cls()
        a = g.add_node("input", 4, var=0, id="x0", x=0, y=200)
        b = g.add_node("input", 4, var=1, id="x1", x=150, y=200)
        p = g.add_node("product", 4, id="prod", x=75, y=100)
        s = g.add_node("sum", 1, id="root", x=75, y=0)
        g.connect(p, a)
        g.connect(p, b)
        g.connect(s, p)
        return g


@dataclass
class PreparedBuild:
    """What `BuildState.prepare()` hands to `finish()`: the build result and when the build began."""

    result: BuildResult
    mismatch: str  # why the circuit cannot train on the dataset, or ''
    started: float  # time.perf_counter() at the start


class BuildState(param.Parameterized):
    """Which circuit the session uses (template, graph or file) and the result of the last build."""

    source = param.Selector(
        default="template", objects=["template", "graph", "file"], doc="Where the circuit comes from"
    )
    template = param.ClassSelector(class_=CircuitSpec, doc="Template spec (source='template')")
    graph = param.ClassSelector(class_=GraphSpec, doc="Drawn graph (source='graph')")
    file_path = param.String(default="", doc="Path of an uploaded circuit file (source='file')")
    data = param.ClassSelector(class_=DataState, doc="Dataset used by data-driven templates and training")
    result = param.ClassSelector(
        class_=BuildResult,
        default=None,
        allow_None=True,
        doc="Last build result (root or error); None before the first build",
    )
    error = param.String(default="", doc="Readable error of the last build ('' if it succeeded)")

    mismatch = param.String(
        default="",
        doc="Why the built circuit cannot train on the chosen dataset (variable counts differ), or ''",
    )
    seconds = param.Number(
        default=0.0, doc="Wall time of the last build, including the plan and view updates it triggered, s"
    )

    def __init__(self, **params):
        params.setdefault("template", CircuitSpec())
        params.setdefault("graph", GraphSpec.example())
        params.setdefault("data", DataState())
        super().__init__(**params)
        self.plan_hook = None  # callable(root), run by prepare() off the event loop after a good build
        self.data.param.watch(lambda e: self.fit_template_to_data(), "dataset")
        self.fit_template_to_data()

    def fit_template_to_data(self) -> None:
        """Give PD a grid that covers the dataset's variables (8x8 cannot model nltcs's 16)."""
        ds = self.data.load()
        if ds is None:
            return
        shape = grid_shape(ds.num_vars)
        if int(np.prod(self.template.data_shape)) != ds.num_vars:
            split = max(1, min(4, min(shape) // 2))  # 4 on MNIST's 28x28, as PyJuice's PD examples
            self.template.param.update(data_shape=shape, split_intervals=split)

    def build_demo(self) -> BuildResult:
        """The circuit every session opens on: a block-sparse HCLT-16 on nltcs (several partitions)."""
        self.use_demo()
        return self.build()

    def spec(self) -> dict:
        """The plain circuit spec of the current source (goes into job specs)."""
        if self.source == "template":
            return self.template.to_dict()
        if self.source == "graph":
            return self.graph.to_dict()
        return {"source": "file", "path": self.file_path}

    def build(self) -> BuildResult:
        """Build the current spec; sets `result`, `error`, `mismatch` and `seconds` (the whole wait,
        including what watchers of `result` recompute). Never raises for a bad circuit."""
        return self.finish(self.prepare())

    def prepare(self) -> PreparedBuild:
        """The heavy half of `build()`, safe off the event loop (a build thread): build the circuit
        and run `plan_hook(root)` (the session compiles its plan there). Sets no parameter but the
        dataset's, which loads once and is cached."""
        t0 = time.perf_counter()
        try:
            dataset = self.data.load()
            if dataset is None and self.source == "template" and self.template.template == "hclt":
                res = BuildResult(error=f"dataset: {self.data.error}")
            else:
                res = circuits.build(self.spec(), dataset if self.source == "template" else None)
            mismatch = variable_mismatch(res, dataset, self.data.dataset) if res.ok else ""
            if res.ok and self.plan_hook is not None:
                self.plan_hook(res.root)
        except Exception as err:  # noqa: BLE001 - a build thread must always hand back a result
            log.exception("build failed")
            res, mismatch = BuildResult(error=circuits.error_message(err)), ""
        return PreparedBuild(res, mismatch, t0)

    def finish(self, prepared: PreparedBuild) -> BuildResult:
        """The light half of `build()`, on the event loop: publish the result (watchers redraw)."""
        res = prepared.result
        self.param.update(result=res, error=res.error or "", mismatch=prepared.mismatch)
        self.seconds = time.perf_counter() - prepared.started
        return res

    def use_demo(self) -> None:
        """Set the spec to the demo every session opens on (build it with `build()`)."""
        self.data.dataset = "nltcs"
        self.template.param.update(**DEMO)
        self.source = "template"

    @property
    def root(self):
        """The last successfully built root NodeVector, or None."""
        return self.result.root if self.result is not None and self.result.ok else None
