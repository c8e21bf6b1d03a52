"""One browser session's state: circuit, plan what-if, training settings, the live run and comparisons.

Shared services (the JobRunner and RunStore) are passed in, never created per session.
"""

from __future__ import annotations

import param

from engine.optim import EMSchedule
from workbench.owner import new_token
from workbench.services.jobs import JobSpec
from workbench.state.circuit import BuildState
from workbench.state.plan import PlanState
from workbench.state.runs import CompareState, RunState


class TrainingSettings(param.Parameterized):
    """EM settings of the next training job (block size and tolerance come from PlanState)."""

    epochs = param.Integer(default=5, bounds=(1, 10_000), doc="Mini-batch EM epochs")
    batch_size = param.Integer(default=512, bounds=(1, 1 << 20), doc="Examples per mini-batch")
    step_size = param.Number(
        default=EMSchedule.step_size, bounds=(1e-6, 1.0), doc="EM step size at the first epoch"
    )
    final_step_size = param.Number(
        default=EMSchedule.final_step_size, bounds=(1e-6, 1.0), doc="EM step size at the last epoch"
    )
    pseudocount = param.Number(default=0.1, bounds=(0.0, None), doc="Pseudocount added to the flows")
    full_batch_epochs = param.Integer(
        default=EMSchedule.full_batch_epochs, bounds=(0, 1000), doc="Full-batch EM epochs at the end"
    )
    device = param.Selector(
        default="auto",
        objects=["auto", "cpu", "cuda"],
        doc="Training device; 'auto': the worker uses CUDA if it has it",
    )
    profile = param.Boolean(default=True, doc="Stream per-layer times (small overhead)")
    gpus = param.Integer(
        default=1, bounds=(1, 64), doc="Data-parallel ranks (services.ranks); batch size per rank"
    )
    run_name = param.String(default="", doc="Run name ('' = the run id)")


class SessionState(param.Parameterized):
    """Everything one browser session holds; `services` is the per-server Services object."""

    build = param.ClassSelector(class_=BuildState, doc="Circuit source and last build")
    plan = param.ClassSelector(class_=PlanState, doc="Partition what-if of the built circuit")
    training = param.ClassSelector(class_=TrainingSettings, doc="Settings for the next job")
    run = param.ClassSelector(
        class_=RunState,
        default=None,
        allow_None=True,
        doc="The run this session started or opened (None before)",
    )
    compare = param.ClassSelector(class_=CompareState, doc="Runs compared side by side")
    error = param.String(default="", doc="Last error of a session action ('' if none)")
    owner = param.String(default="", doc="Owner token: the session's runs are its own unless shared")

    def __init__(self, services, **params):
        params.setdefault("build", BuildState())
        params.setdefault("plan", PlanState())
        params.setdefault("training", TrainingSettings())
        params.setdefault("compare", CompareState())
        params["owner"] = params.get("owner") or new_token()
        super().__init__(**params)
        self.services = services
        store = getattr(services, "store", None)
        self.store = store.scoped(self.owner) if store is not None else None  # the runs this session may see
        self.build.param.watch(lambda e: self._follow_build(), "result")
        self.build.plan_hook = self.plan.prepare  # plans compile in the build thread, off the event loop
        self.training.param.watch(lambda e: setattr(self.plan, "batch_size", e.new), "batch_size")

    def _follow_build(self) -> None:
        """Plan the new circuit; after a failed build drop the old plan, so no view shows a stale one."""
        b = self.build
        absent = f"The last build failed ({b.error}); nothing to show until a build succeeds."
        self.plan.param.update(absent=absent if b.error else self.plan.param.absent.default, root=b.root)

    def job_spec(self) -> JobSpec:
        """The job the current settings describe."""
        t = self.training
        return JobSpec(
            circuit=self.build.spec(),
            dataset=self.build.data.dataset,
            epochs=t.epochs,
            batch_size=t.batch_size,
            step_size=t.step_size,
            final_step_size=t.final_step_size,
            pseudocount=t.pseudocount,
            full_batch_epochs=t.full_batch_epochs,
            block_size=self.plan.block_size,
            tolerance=self.plan.tolerance,
            device=t.device,
            profile=t.profile,
            name=t.run_name,
            gpus=t.gpus,
        )

    def start_training(self) -> RunState | None:
        """Start a job with the current settings; the new live run becomes `run` (None + `error` on failure)."""
        if self.build.mismatch:
            self.error = self.build.mismatch
            return None
        return self._follow(lambda: self.services.runner.start(self.job_spec(), owner=self.owner))

    def _follow(self, start) -> RunState | None:
        """Start a job with `start()` and make it the live `run` (None + `error` when refused;
        PermissionError, another browser's run, is an OSError)."""
        try:
            job = start()
        except (ValueError, OSError) as err:
            self.error = str(err)
            return None
        self.error = ""
        self.run = RunState.for_job(job)
        self.compare.add(self.run)
        return self.run

    def open_run(self, run_id: str) -> RunState:
        """Open a stored run (live if this server is still running it)."""
        job = self.services.runner.get(run_id)
        run = RunState.from_store(self.store, run_id)  # PermissionError: another session's unshared run
        if job is not None and not job.finished:
            run._job, run._since = job, job.drain(0)[1]
        self.run = run
        return run

    def continuable_runs(self) -> list:
        """This session's stored runs that can train on: stopped or interrupted, with a checkpoint
        (RunRecords, newest first); not one already continued by a run that did not fail."""
        runs = self.store.list_runs()
        continued = {(r.spec.get("continues") or {}).get("run_id") for r in runs if r.status != "failed"}
        return [
            r
            for r in runs
            if r.status in ("stopped", "interrupted") and r.has_model and r.run_id not in continued
        ]

    def continue_run(self, run_id: str | None = None) -> RunState | None:
        """Train on from the last checkpoint of run `run_id` (default: the open run), stopped or
        interrupted, in a new run that becomes `run` (None + `error` when it cannot continue)."""
        run_id = run_id or (self.run.run_id if self.run is not None else "")
        if not run_id:
            self.error = "pick a stopped or interrupted run first"
            return None
        return self._follow(lambda: self.services.runner.continue_run(run_id, owner=self.owner))

    def share_run(self, shared: bool = True) -> None:
        """Let other sessions list and read the open run (or stop letting them)."""
        if self.run is not None:
            self.store.set_shared(self.run.run_id, shared)

    def pause(self) -> None:
        if self.run is not None:
            self.services.runner.pause(self.run.run_id)

    def resume(self) -> None:
        if self.run is not None:
            self.services.runner.resume(self.run.run_id)

    def stop(self) -> None:
        if self.run is not None:
            self.services.runner.stop(self.run.run_id)

    def poll(self) -> bool:
        """Periodic-callback body: pull new events into the live run (and compared live runs)."""
        changed = self.run.poll() if self.run is not None else False
        others = [r for r in self.compare.runs if r is not self.run]
        return any([changed, *[r.poll() for r in others]])
