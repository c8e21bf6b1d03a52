"""The Schedule tab's three streams with early input statistics: input rows whose flows are final before
the flows pass ends get their statistics on the param-flows stream right after the product layer that
finished them (the executor's rule, `stream_schedule.early_stats`); the input step on main keeps the rest.

Checked on a real HCLT plan (some rows come early) and a PD plan (none), for the compiled plan and for
the plan dict a run stores (with and without the stored ranges), and in the drawn timeline.
"""

from __future__ import annotations

import json
import re

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (the backend the timelines' options are read from)
import numpy as np
import pytest

from engine.dists import Categorical
from engine.executor.stream_schedule import plan_early_stats, three_streams
from engine.structures import hclt, pd
from tests.workbench.test_schedule_streams_view import _view
from workbench.services import plans
from workbench.views.schedule_view import STREAM_LANE_NAMES, ScheduleView, slot_note

BATCH = 512


@pytest.fixture(scope="module")
def hclt_plan():
    rng = np.random.default_rng(0)
    z = rng.integers(0, 2, (500, 1))  # one hidden cause: a Chow-Liu tree with some depth
    x = (z + (rng.random((500, 12)) < 0.2)) % 2 + 2 * rng.integers(0, 2, (500, 12))
    return plans.make_plan(hclt(x, 16), None, 0.5)


@pytest.fixture(scope="module")
def pd_plan():
    return plans.make_plan(pd((4, 4), 16, (2, 2), input_dist=Categorical(4)), None, 0.5)


def executor_launches(plan) -> list[tuple[int, int, int, int]]:
    """(backward position, input layer, lo, hi) of each early launch, by the executor's own rule."""
    e = plan_early_stats(plan)
    return [(p, *launch) for p in sorted(e) for launch in e[p]]


def test_an_hclt_step_computes_its_early_statistics_behind_the_product_layers(hclt_plan):
    plan = hclt_plan
    recs = plans.schedule(plan, BATCH)
    slots = plans.stream_schedule(plan, recs)
    launches = executor_launches(plan)
    stats = [s for s in slots if s["pass"] == "statistics"]
    assert len(stats) == len(launches) > 0
    back = plan.backward_steps()
    for s, (p, i, lo, hi) in zip(stats, launches, strict=True):
        layer = plan.input_layers[i]
        assert (s["lane"], s["stream"], s["kind"], s["layer"]) == (
            "param flows behind",
            "param flows",
            "input",
            layer.index,
        )
        assert s["rows"] == [lo, hi] and s["after"] == back[p].layer.index
        assert s["ms"] == pytest.approx(recs[s["step"]]["predicted_ms"] * (hi - lo) / layer.num_nodes)
        product = next(
            x for x in slots if x["layer"] == s["after"] and x["pass"] == "backward" and x["stream"] == "main"
        )
        assert s["start_ms"] >= product["end_ms"] - 1e-12  # waits for the rows' last product layer
    moved = {}
    for s in stats:
        moved[s["step"]] = moved.get(s["step"], 0) + s["rows"][1] - s["rows"][0]
    for s in (s for s in slots if s["kind"] == "input" and s["pass"] == "backward"):
        n = plan.layers[s["layer"]].num_nodes
        assert s["stream"] == "main" and s["rows"] is None and s["after"] is None
        assert s["ms"] == pytest.approx(recs[s["step"]]["predicted_ms"] * (1 - moved.get(s["step"], 0) / n))
    assert sum(moved.values()) > 0.5 * sum(la.num_nodes for la in plan.input_layers)  # most rows early
    assert sum(s["ms"] for s in slots) == pytest.approx(sum(r["predicted_ms"] for r in recs))
    # profiled batches (one stream) compute every statistic at the end
    assert not any(s["pass"] == "statistics" for s in plans.stream_schedule(plan, recs, num_streams=1))


def test_a_run_plan_dict_lays_out_the_same_early_statistics(hclt_plan):
    plan = hclt_plan
    recs = plans.schedule(plan, BATCH)
    slots = plans.stream_schedule(plan, recs)
    d = json.loads(json.dumps(plan.to_dict(BATCH)))  # as a run's plan event stores it
    assert d["input_flows_ready"] == [list(r) for r in plan.input_flows_ready()]
    skeleton = plans.plan_from_dict(d)
    assert skeleton.input_flows_ready() == plan.input_flows_ready()  # stored, not recomputed
    assert plans.early_launches(skeleton) == plans.early_launches(plan)
    assert plans.stream_schedule(d, recs) == slots == plans.stream_schedule(skeleton, recs)


def test_a_plan_dict_without_stored_ranges_has_none_early(hclt_plan):
    """A run from before plans stored the ranges: every statistic at the end, as the model did then."""
    plan = hclt_plan
    recs = plans.schedule(plan, BATCH)
    d = plan.to_dict(BATCH)
    del d["input_flows_ready"]
    skeleton = plans.plan_from_dict(d)
    assert skeleton.input_flows_ready() == () and plans.early_launches(skeleton) == {}
    slots = plans.stream_schedule(d, recs)
    plain = three_streams(plan.steps(), [r["predicted_ms"] for r in recs])
    assert [(s["step"], s["pass"], s["stream"], s["start_ms"], s["end_ms"]) for s in slots] == [
        (x.step, x.part, x.stream, x.start, x.end) for x in plain
    ]
    assert plans.step_ms(slots) > plans.step_ms(plans.stream_schedule(plan, recs))  # early ones help here
    with pytest.raises(ValueError, match=r"input_flows_ready holds \[1, 2\]: expected \[p, i, lo, hi\]"):
        plans.plan_from_dict({**d, "input_flows_ready": [[1, 2]]})
    with pytest.raises(ValueError, match="input_flows_ready is malformed"):
        plans.plan_from_dict({**d, "input_flows_ready": [["a", 0, 0, 1]]})


def test_a_pd_plan_keeps_every_statistic_at_the_end(pd_plan):
    recs = plans.schedule(pd_plan, BATCH)
    assert plans.early_launches(pd_plan) == {} and len(pd_plan.input_flows_ready()) == 1
    for plan in (pd_plan, pd_plan.to_dict(BATCH)):
        slots = plans.stream_schedule(plan, recs)
        assert not any(s["pass"] == "statistics" for s in slots)
        inputs = [s for s in slots if s["kind"] == "input" and s["pass"] == "backward"]
        assert [s["ms"] for s in inputs] == pytest.approx([recs[s["step"]]["predicted_ms"] for s in inputs])
        assert "No input statistics come early" in ScheduleView._early_line(slots)


def test_the_timeline_draws_early_statistics_in_the_param_lane_as_input_work():
    ses, view = _view()
    view.stream_switch.value = 3
    slots = plans.stream_schedule(ses.plan.plan, ses.plan.schedule())
    stats = [k for k, s in enumerate(slots) if s["pass"] == "statistics"]
    assert stats  # the demo is an HCLT
    df = view.predicted.object.data
    assert len(df) == len(slots)
    lane = STREAM_LANE_NAMES.index("param flows behind")
    drawn = df[df["pass"] == "statistics"]
    assert len(drawn) == len(stats)
    assert (drawn["lane0"].round() == lane).all() and (drawn["kind"] == "input").all()  # input colour
    assert all("computed early" in w and "product layer" in w for w in drawn["what"])
    ends = df[(df["kind"] == "input") & (df["pass"] == "backward")]
    assert all("not done early" in w for w in ends["what"])
    assert "early input-statistics launches" in view.streams_info.object
    view._tap.event(index=[stats[0]])  # tap one: its input layer is selected in every view
    assert ses.plan.selected_layer == slots[stats[0]]["layer"]
    assert slot_note(slots[stats[0]]).startswith(f"input statistics of nodes {slots[stats[0]]['rows'][0]}-")


def test_a_stream_bar_hover_says_what_it_does_and_its_time_not_its_corners():
    """The hover of an early bar names its nodes and product layer and its time in ms, without the
    rectangle's corners, lane coordinates and alpha that a new user cannot read."""
    from bokeh.models import HoverTool

    ses, view = _view()
    view.stream_switch.value = 3
    fig = hv.render(view.predicted.object, backend="bokeh")
    (hover,) = [t for t in fig.tools if isinstance(t, HoverTool)]
    tips = {k: re.sub(r"@\{(\w+)\}", r"@\1", v) for k, v in hover.tooltips}  # holoviews writes @{col}
    assert list(tips) == ["layer", "does", "time"]
    assert tips["does"] == "@what" and tips["time"].startswith("@ms") and " ms" in tips["time"]
    assert not any(f in v for v in tips.values() for f in ("@lane0", "@lane1", "@alpha"))
    assert "what" in view.predicted.object.data  # the column it reads


def test_the_streams_line_says_plainly_why_none_come_early(hclt_plan, pd_plan):
    """A PD (the current circuit) gets a plain 'none in this circuit', not a hedge about stored runs;
    only a run's stored plan without the ranges is said to lack them."""
    ses, view = _view()
    view.stream_switch.value = 3
    pd_line = view._streams_line(pd_plan, plans.schedule(pd_plan, BATCH), False)
    assert "No input statistics come early in this circuit" in pd_line
    assert "stored" not in pd_line and "early input-statistics launches" not in pd_line
    d = hclt_plan.to_dict(BATCH)
    del d["input_flows_ready"]
    old = view._streams_line(plans.plan_from_dict(d), plans.schedule(hclt_plan, BATCH), False)
    assert "this run's stored plan does not say when its input nodes' flows are final" in old
    assert "in this circuit" not in old
    hclt_line = view._streams_line(hclt_plan, plans.schedule(hclt_plan, BATCH), False)
    assert "early input-statistics launches" in hclt_line and "No input statistics" not in hclt_line
