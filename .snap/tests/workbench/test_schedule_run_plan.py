"""Issue 10: the Schedule draws a profiled run's own plan (the worker's plan event) with its measured
times, when that plan is not the current one; the current plan is never drawn against those times.
"""

from __future__ import annotations

import holoviews.plotting.bokeh  # noqa: F401  (the backend the timelines' options are read from)
import panel as pn
import pytest

from workbench.services import memory, plans
from workbench.services.store import RunStore
from workbench.state import RunState


def _session():
    from workbench.services import Services
    from workbench.services.jobs import JobRunner
    from workbench.state.session import SessionState

    store = RunStore(None)
    ses = SessionState(Services(store, JobRunner(store)))
    assert ses.build.build_demo().ok
    return ses


def _run_of(ses, name: str = "run-a") -> tuple[RunState, dict[tuple[int, str], float]]:
    """A finished run of the session's current plan, folded from the events a worker sends: its plan
    event and two windows of layer times (distinct per step, so a swapped or misplaced bar shows)."""
    plan = ses.plan.plan.to_dict(ses.plan.batch_size)
    steps = [(s.layer.index, s.pass_name) for s in ses.plan.plan.steps()]
    ms = {k: 0.1 + 0.01 * i for i, k in enumerate(steps)}
    window = [{"layer": la, "pass": p, "kind": "", "ms": v, "calls": 2} for (la, p), v in ms.items()]
    run = RunState(run_id="r-" + name, name=name, status="running")
    run.apply([{"type": "plan", "plan": plan}, {"type": "layer_times", "records": window}])
    run.apply([{"type": "layer_times", "records": window}, {"type": "done", "status": "done"}])
    return run, ms


def _rects(pane) -> list[tuple[int, str, str, float]]:
    """(layer, pass, kind, width ms) of every bar of a timeline pane, left to right."""
    df = pane.object.data.sort_values("t0")
    return [(int(r.layer), r["pass"], r.kind, float(r.t1 - r.t0)) for _, r in df.iterrows()]


def test_schedule_lays_out_a_plan_dict_as_the_plan_itself():
    """`plans.schedule(plan.to_dict())` follows the plan's own traversal and gives the same records
    (and the same memory timeline) as the compiled plan, for two different circuits."""
    ses = _session()
    for latents in (None, 4):
        if latents:
            ses.build.template.num_latents = latents
            assert ses.build.build().ok
        plan, bs = ses.plan.plan, ses.plan.batch_size
        d = plan.to_dict(bs)
        from_dict = plans.schedule(d, bs)
        assert from_dict == plans.schedule(plan, bs)
        assert [(r["layer"], r["pass"]) for r in from_dict] == [
            (s.layer.index, s.pass_name) for s in plan.steps()
        ]
        skeleton = plans.plan_from_dict(d)
        assert memory.memory_timeline(skeleton, from_dict, bs) == memory.memory_timeline(plan, from_dict, bs)
        assert plans.plan_batch_size(d, 7) == bs and plans.plan_batch_size({}, 7) == 7


@pytest.mark.parametrize(
    "bad, says",
    [
        ({}, "no layers"),
        ({"layers": [{"kind": "sum"}]}, "layer 0 is malformed"),
        ([{**{"index": 0, "num_nodes": 1, "num_edges": 0}, "kind": "conv"}], "unknown kind 'conv'"),
    ],
)
def test_a_malformed_plan_dict_is_refused_in_one_line(bad, says):
    with pytest.raises(ValueError, match=says) as err:
        plans.plan_from_dict(bad)
    assert "\n" not in str(err.value)


def test_a_run_of_circuit_a_is_drawn_on_its_own_plan_after_circuit_b_is_built():
    from workbench.views.schedule_view import ScheduleView
    from workbench.views.training_view import TrainingView

    ses = _session()
    view = ScheduleView(plan=ses.plan)
    train = TrainingView(session=ses, schedule=view)
    pn.panel(view).get_root()
    a_plan = ses.plan.plan
    a_records = plans.schedule(a_plan, ses.plan.batch_size)
    run, ms = _run_of(ses)
    ses.run = run
    train._finished()  # what the Train tab does when a run ends: the run's plan and times go to the Schedule
    assert view.run_plan["layers"] == [la.to_dict() for la in a_plan.layers]
    # the same plan: drawn as the current plan's measurements, no switch needed
    assert view.matches() and view.plan_switch.disabled and view.measured_plot.object is not None

    ses.build.template.num_latents = 4  # circuit B
    assert ses.build.build().ok
    assert not view.matches()
    # B's predicted timeline never shows A's measurements: refused with the note
    assert view.show == "current" and view.measured_plot.object is None and view.calibration is None
    assert "ran a different plan" in view.info.object
    assert view.table.value["measured_ms"].isna().all()
    assert {la for la, *_ in _rects(view.predicted)} <= {la.index for la in ses.plan.plan.layers}
    # the switch offers A's plan by name and size
    n = len(a_plan.layers)
    assert not view.plan_switch.disabled
    assert f"the run's plan (run-a, {n} layers)" in view.plan_switch.options

    view.plan_switch.value = "run"
    assert view.showing_run()
    # A's layers, in A's traversal, coloured by kind, measured bars as wide as A's mean times
    want = [(r["layer"], r["pass"], r["kind"]) for r in a_records]
    assert [x[:3] for x in _rects(view.measured_plot)] == want
    assert [x[3] for x in _rects(view.measured_plot)] == pytest.approx([ms[k[:2]] for k in want])
    assert [x[:3] for x in _rects(view.predicted)] == want
    assert (
        view.predicted.object.opts.get().kwargs["cmap"] == view.measured_plot.object.opts.get().kwargs["cmap"]
    )
    # each timeline's time axis fits its own step (no sliver of a predicted step on a measured axis)
    predicted = sum(r["predicted_ms"] for r in a_records)
    assert view.predicted.object.opts.get().kwargs["xlim"][1] == pytest.approx(1.02 * predicted)
    assert view.measured_plot.object.opts.get().kwargs["xlim"][1] == pytest.approx(1.02 * sum(ms.values()))
    assert "each timeline's time axis fits its own step" in view.info.object
    # no tap tool: the run's layer indices are not the current plan's
    for pane in (view.predicted, view.measured_plot, view.calibrated_plot):
        assert "tap" not in pane.object.opts.get().kwargs["tools"]
    assert view._tap is None and view._taps == {}
    assert list(view.table.value["measured_ms"]) == pytest.approx([round(ms[k[:2]], 4) for k in want])
    assert f"The plan of run run-a** (not the current circuit's): **{n}** layers" in view.info.object
    assert view.calibration is not None and view.memory.object is not None
    assert "Measured (run-a) on its own plan" in view.measured_plot.object.opts.get().kwargs["title"]

    # back to B: its what-if timeline again, still without A's times
    view.plan_switch.value = "current"
    assert view.measured_plot.object is None and "ran a different plan" in view.info.object
    assert view.table.value["measured_ms"].isna().all()


def test_the_switch_follows_the_current_plan():
    """Back on the run's plan (same options again), the run's times are this plan's: no switch."""
    from workbench.views.schedule_view import ScheduleView

    ses = _session()
    view = ScheduleView(plan=ses.plan)
    run, _ = _run_of(ses)
    view.param.update(
        measured_source=run.name,
        measured_plan=run.plan["layers"],
        run_plan=run.plan,
        measured=run.layer_means,
    )
    ses.plan.block_size = 2
    assert not view.plan_switch.disabled
    view.plan_switch.value = "run"
    assert "The plan of run run-a" in view.info.object
    ses.plan.block_size = None
    assert view.matches() and view.plan_switch.disabled and not view.showing_run()
    assert "Measured (run-a): " in view.info.object


def test_a_run_plan_that_cannot_be_laid_out_is_said_and_nothing_stale_stays():
    from workbench.views.schedule_view import ScheduleView

    ses = _session()
    view = ScheduleView(plan=ses.plan)
    bad = [{"index": 0, "kind": "conv", "num_nodes": 1, "num_edges": 0}]
    view.param.update(
        measured_source="run-x", measured_plan=bad, run_plan={"layers": bad}, measured={(0, "forward"): 1.0}
    )
    assert view.predicted.object is not None and not view.plan_switch.disabled
    view.plan_switch.value = "run"
    assert "The run's plan cannot be drawn: plan dict layer 0 has unknown kind 'conv'" in view.info.object
    assert view.predicted.object is None and view.measured_plot.object is None and len(view.table.value) == 0


def test_an_earlier_run_of_this_plan_is_drawn_after_a_later_run_of_another_plan():
    """New-user trial: run plan A, then run another circuit B, then build A again: the Schedule
    draws A's own earlier measurements (it said "the last profiled run ran a different plan")."""
    from workbench.views.schedule_view import ScheduleView

    ses = _session()
    view = ScheduleView(plan=ses.plan)
    pn.panel(view).get_root()
    run_a, ms_a = _run_of(ses, "run-a")
    view.param.update(
        measured_source=run_a.name,
        measured_plan=run_a.plan["layers"],
        run_plan=run_a.plan,
        measured=run_a.layer_means,
    )
    ses.build.template.num_latents = 4  # circuit B, trained: the Schedule's last run is now B's
    assert ses.build.build().ok
    run_b, _ = _run_of(ses, "run-b")
    view.param.update(
        measured_source=run_b.name,
        measured_plan=run_b.plan["layers"],
        run_plan=run_b.plan,
        measured=run_b.layer_means,
    )
    ses.build.template.num_latents = 16  # circuit A again (the demo's latents)
    assert ses.build.build().ok
    assert not view.matches()  # the last run is B's ...
    assert view.this_plan_measured()[0] == "run-a"  # ... but A was measured earlier in this session
    assert view.measured_plot.object is not None
    assert "Measured (run-a)" in view.measured_plot.object.opts.get().kwargs["title"]
    assert [x[3] for x in _rects(view.measured_plot)] == pytest.approx(
        [ms_a[(r["layer"], r["pass"])] for r in plans.schedule(ses.plan.plan, ses.plan.batch_size)]
    )
    assert "ran a different plan" not in view.info.object and "Measured (run-a)" in view.info.object
    assert view.calibration is not None and "calibrated** to run-a" in view.calibration_info.object
