"""Per-session run state: the series of one run (live or stored) and several runs side by side.

`RunState.apply(events)` folds streamed events into plot-ready series and updates all parameters
in one `param.update`, bumping `version`, so views redraw once per pulled batch of events.
"""

from __future__ import annotations

import param

from workbench.services.store import fold_status
from workbench.state import ranks as rank_state

EPOCH_KEYS = ("epoch", "train_ll", "valid_ll", "test_ll", "seconds")
MEMORY_KEYS = ("allocated", "reserved", "peak_allocated", "peak_reserved")
SERIES = ("epochs", "batches", "memory_series")  # dicts of lists that grow in place


def _empty_series(keys) -> dict:
    return {k: [] for k in keys}


class RunState(param.Parameterized):
    """Series and latest values of one training run."""

    run_id = param.String(default="", doc="Run id in the store (= job id)")
    name = param.String(default="", doc="Display name of the run")
    status = param.String(default="", doc="queued|starting|running|paused|stopping|done|stopped|failed")
    message = param.String(default="", doc="Error or status message ('' if none)")
    device = param.String(default="", doc="Device the worker trains on (cpu/cuda)")
    epochs = param.Dict(
        default=_empty_series(EPOCH_KEYS),
        doc="Per-epoch series {epoch, train_ll, valid_ll, test_ll (nats/example), seconds}",
    )
    batches = param.Dict(
        default=_empty_series(("step", "epoch", "batch", "ll", "examples_per_s")),
        doc="Throttled batch series; step = global batch index",
    )
    progress = param.Dict(
        default={}, doc="Latest batch event {epoch, batch, num_batches, ll, examples_per_s}"
    )
    layer_times = param.List(default=[], doc="Latest window: [{layer, kind, pass, ms, calls}], ms per call")
    layer_means = param.Dict(default={}, doc="Mean ms per call over the run, keyed (layer, pass)")
    memory = param.Dict(default={}, doc="Latest memory event (bytes)")
    memory_series = param.Dict(default=_empty_series(("t", *MEMORY_KEYS)), doc="Memory over time (bytes)")
    plan = param.Dict(default={}, doc="plan.to_dict() of the compiled circuit, once known")
    spec = param.Dict(default={}, doc="The job spec")
    ranks = param.Dict(default={}, doc="Multi-GPU runs: per-rank series {rank: ...} (state.ranks.fold)")
    version = param.Integer(default=0, doc="Bumped once per apply() that changed anything")

    def __init__(self, **params):
        super().__init__(**params)
        self._since = 0
        self._job = None
        self._totals: dict[tuple[int, str], list[float]] = {}

    # ----------------------------------------------------------------- sources
    @classmethod
    def from_store(cls, store, run_id: str) -> "RunState":
        """A run read back from the store (finished or still running)."""
        st, spec = store.status(run_id), store.spec(run_id)
        run = cls(
            run_id=run_id,
            name=spec.get("name", run_id),
            spec=spec,
            status=st.get("status", ""),
            message=st.get("message", ""),
            device=st.get("device", ""),
        )
        plan_path = store.path(run_id) / "plan.json"
        if plan_path.exists():
            import json

            run.plan = json.loads(plan_path.read_text())
        run.apply(store.events(run_id))
        run.param.update(status=st.get("status", run.status), message=st.get("message", run.message))
        return run

    @classmethod
    def for_job(cls, job) -> "RunState":
        """A live run following `job` (a JobRunner Job); call `poll()` periodically."""
        run = cls(
            run_id=job.job_id, name=job.spec.name or job.job_id, spec=job.spec.to_dict(), status=job.status
        )
        run._job = job
        return run

    def poll(self) -> bool:
        """Pull new events from the live job and apply them; True if anything changed."""
        if self._job is None:
            return False
        events, self._since = self._job.drain(self._since)
        changed = self.apply(events)
        if self._job.status != self.status or self._job.message != self.message:
            self.param.update(status=self._job.status, message=self._job.message)
            changed = True
        return changed

    @property
    def live(self) -> bool:
        return self._job is not None and not self._job.finished

    # ----------------------------------------------------------------- folding events
    def apply(self, events: list[dict]) -> bool:
        """Fold `events` into the series; one batch of param events for all of them. True if any applied.

        Series grow in place (appending N events costs O(N), not a copy of every series per call);
        watchers of `epochs`, `batches` and `memory_series` are still triggered, once per call.
        """
        if not events:
            return False
        upd: dict = {}
        for e in events:
            self._fold(e, upd)
        upd["layer_means"] = {k: tot / n for k, (tot, n) in self._totals.items()}
        upd["version"] = self.version + 1
        grown = [k for k in SERIES if upd.pop(k, False)]
        with param.parameterized.discard_events(self):
            self.param.update(**upd)
        self.param.trigger(*upd, *grown)  # one batch of events, the grown series included
        return True

    @property
    def epochs_before(self) -> int:
        """Epochs the runs this one continues made: its own count on from there (continue_run)."""
        return int((self.spec.get("continues") or {}).get("epochs_before", 0))

    def _fold(self, e: dict, upd: dict) -> None:
        if "rank" in e:  # a data-parallel run: every rank's times and memory, rank 0's the run's own
            upd["ranks"] = self.ranks
            e = rank_state.fold(self.ranks, e)
            if e is None:
                return
        kind = e.get("type")
        if kind in ("epoch", "batch") and self.epochs_before and e.get("epoch") is not None:
            e = {**e, "epoch": e["epoch"] + self.epochs_before}  # the worker counts from 1
        if kind == "epoch":
            for k in EPOCH_KEYS:
                self.epochs[k].append(e.get(k))
            upd["epochs"] = True
        elif kind == "batch":
            b = self.batches
            step = (e["epoch"] - 1) * e["num_batches"] + e["batch"]
            for k, v in (
                ("step", step),
                ("epoch", e["epoch"]),
                ("batch", e["batch"]),
                ("ll", e.get("ll")),
                ("examples_per_s", e.get("examples_per_s")),
            ):
                b[k].append(v)
            upd["batches"] = True
            upd["progress"] = {k: e.get(k) for k in ("epoch", "batch", "num_batches", "ll", "examples_per_s")}
        elif kind == "layer_times":
            upd["layer_times"] = e["records"]
            for r in e["records"]:
                acc = self._totals.setdefault((r["layer"], r["pass"]), [0.0, 0])
                acc[0] += r["ms"] * r["calls"]
                acc[1] += r["calls"]
        elif kind == "memory":
            upd["memory"] = {k: e.get(k) for k in MEMORY_KEYS}
            self.memory_series["t"].append(e.get("t"))
            for k in MEMORY_KEYS:
                self.memory_series[k].append(e.get(k))
            upd["memory_series"] = True
        elif kind in ("status", "done", "error"):
            status, message = fold_status(upd.get("status", self.status), upd.get("message", self.message), e)
            upd["status"], upd["message"] = status, message
            if kind == "status" and e.get("device"):
                upd["device"] = e["device"]
        elif kind == "plan":
            upd["plan"] = e["plan"]

    def summary(self) -> dict:
        """One row for run tables: final metrics and key settings."""
        last = {k: (v[-1] if v else None) for k, v in self.epochs.items()}
        c = (self.spec.get("continues") or {}).get("circuit") or self.spec.get("circuit", {})
        return {
            "run_id": self.run_id,
            "name": self.name,
            "status": self.status,
            "template": c.get("template", c.get("source", "")),
            "dataset": self.spec.get("dataset", ""),
            "epochs": last["epoch"],
            "train_ll": last["train_ll"],
            "valid_ll": last["valid_ll"],
            "test_ll": last["test_ll"],
            "seconds": sum(s for s in self.epochs["seconds"] if s),
        }


class CompareState(param.Parameterized):
    """Several runs side by side: the same series of each, for overlaid plots and a table."""

    runs = param.List(default=[], item_type=RunState, doc="Runs being compared, in display order")
    metric = param.Selector(
        default="valid_ll",
        objects=["train_ll", "valid_ll", "test_ll", "seconds"],
        doc="Per-epoch metric to overlay",
    )

    def add(self, run: RunState) -> None:
        """Add a run (replaces one with the same run_id)."""
        self.runs = [r for r in self.runs if r.run_id != run.run_id] + [run]

    def add_from_store(self, store, run_id: str) -> RunState:
        run = RunState.from_store(store, run_id)
        self.add(run)
        return run

    def remove(self, run_id: str) -> None:
        self.runs = [r for r in self.runs if r.run_id != run_id]

    def series(self, metric: str | None = None) -> dict[str, tuple[list, list]]:
        """{run label: (epochs, values)} for `metric` (default: the `metric` param)."""
        m = metric or self.metric
        return {
            f"{r.name} ({r.run_id[-6:]})": (list(r.epochs["epoch"]), list(r.epochs[m])) for r in self.runs
        }

    def table(self) -> list[dict]:
        return [r.summary() for r in self.runs]

    def poll(self) -> bool:
        """Poll the live runs among those compared; True if any changed."""
        return any([r.poll() for r in self.runs])
