"""The Schedule tab's stream switch: one stream (CPU, profiled batches) or a GPU training step's three."""

from __future__ import annotations

import re

import holoviews.plotting.bokeh  # noqa: F401  (the backend the timelines' options are read from)
import panel as pn
import pytest

from workbench.services import memory, plans
from workbench.services.store import RunStore
from workbench.views._common import fmt_bytes
from workbench.views.schedule_view import STREAM_LANE_NAMES, ScheduleView


def _view():
    from workbench.services import Services
    from workbench.services.jobs import JobRunner
    from workbench.state.session import SessionState

    store = RunStore(None)
    ses = SessionState(Services(store, JobRunner(store)))
    assert ses.build.build_demo().ok
    view = ScheduleView(plan=ses.plan)
    pn.panel(view).get_root()
    return ses, view


def _title(pane) -> str:
    return pane.object.opts.get().kwargs["title"]


def _ms(title: str) -> float:
    return float(re.search(r": ([\d.e+-]+) ms per training step", title).group(1))


def test_switching_to_three_streams_draws_three_lanes_the_shorter_step_and_two_element_buffers():
    ses, view = _view()
    records = ses.plan.schedule()
    one_title = _title(view.predicted)
    assert "one stream" in one_title
    assert _ms(one_title) == pytest.approx(sum(r["predicted_ms"] for r in records), rel=1e-3)
    assert "Drawn: **one stream**" in view.streams_info.object
    one_memory = _title(view.memory)

    view.stream_switch.value = 3
    three_title = _title(view.predicted)
    assert "three streams (GPU training)" in three_title
    slots = plans.stream_schedule(ses.plan.plan, records)
    assert _ms(three_title) == pytest.approx(plans.step_ms(slots), rel=1e-3) and _ms(three_title) < _ms(
        one_title
    )
    rects = view.predicted.object.data
    assert len(rects) == len(slots) and rects["lane0"].round().nunique() == 3
    assert view.predicted.object.opts.get().kwargs["yticks"] == list(enumerate(STREAM_LANE_NAMES))
    assert "Drawn: **three streams**" in view.streams_info.object
    assert f"**{plans.step_ms(slots):.3g} ms on three streams**" in view.streams_info.object
    tl = memory.memory_timeline(ses.plan.plan, records, ses.plan.batch_size)
    three_memory = _title(view.memory)
    assert "two element buffers" in three_memory and three_memory != one_memory
    assert f"peak {fmt_bytes(memory.peak(tl['three streams']))}" in three_memory
    # tap a parameter-flows bar: its sum layer is selected in every view
    i = next(k for k, s in enumerate(slots) if s["pass"] == "param flows")
    view._tap.event(index=[i])
    assert ses.plan.selected_layer == slots[i]["layer"]


def test_measured_times_are_said_to_come_from_one_stream_and_are_laid_out_on_three():
    ses, view = _view()
    view.stream_switch.value = 3
    measured = {(r["layer"], r["pass"]): 3 * r["predicted_ms"] for r in ses.plan.schedule()}
    view.param.update(measured_source="run-a", measured_plan=list(ses.plan.layers), measured=measured)
    assert "profiled batches on one stream" in _title(view.measured_plot)
    assert "which run on one stream" in view.streams_info.object
    records = ses.plan.schedule(measured)
    t = plans.step_ms(plans.stream_schedule(ses.plan.plan, records, "measured_ms"))
    assert f"they predict **{t:.3g} ms** per step" in view.streams_info.object
    assert "three streams" in _title(view.calibrated_plot)


def test_a_run_of_another_plan_is_laid_out_on_three_streams_on_its_own_plan():
    from tests.workbench.test_schedule_run_plan import _run_of
    from workbench.views.training_view import TrainingView

    ses, view = _view()
    train = TrainingView(session=ses, schedule=view)
    a_plan = ses.plan.plan
    ses.run, ms = _run_of(ses)
    train._finished()
    ses.build.template.num_latents = 4  # circuit B
    assert ses.build.build().ok
    view.plan_switch.value = "run"
    view.stream_switch.value = 3
    assert view.showing_run()
    a_records = plans.schedule(a_plan, ses.plan.batch_size, measured=ms)
    slots = plans.stream_schedule(a_plan, a_records)
    assert "plan of run-a, three streams" in _title(view.predicted)
    assert _ms(_title(view.predicted)) == pytest.approx(plans.step_ms(slots), rel=1e-3)
    assert len(view.predicted.object.data) == len(slots)  # A's steps, not B's
    assert "profiled batches on one stream" in _title(view.measured_plot)
    t = plans.step_ms(plans.stream_schedule(a_plan, a_records, "measured_ms"))
    assert t < sum(ms.values()) and f"they predict **{t:.3g} ms** per step" in view.streams_info.object
    assert "two element buffers" in _title(view.memory)
