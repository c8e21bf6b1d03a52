"""The Schedule tab's timelines as a browser trial read them: each x axis fits its own step, every hover
reads in words and ms, each calibrated step time names its schedule, thin bars keep their colour and a
tap on any timeline of the current plan selects its layer.
"""

from __future__ import annotations

import re

import holoviews as hv
import holoviews.plotting.bokeh  # noqa: F401  (the backend the timelines' options are read from)
import pytest
from bokeh.models import HoverTool

from tests.workbench.test_schedule_streams_view import _view
from workbench.services import calibrate, plans

SLOW = 20  # the profiled run below is this much slower than the preset predicts


def _kw(pane) -> dict:
    return pane.object.opts.get().kwargs


def _measure(ses, view):
    """A profiled run of this very plan, `SLOW`x the preset's prediction per step; its records."""
    measured = {(r["layer"], r["pass"]): SLOW * r["predicted_ms"] for r in ses.plan.schedule()}
    view.param.update(measured_source="run-a", measured_plan=list(ses.plan.layers), measured=measured)
    records = ses.plan.schedule(measured)
    c = view.calibration
    for r in records:  # each step's time under the fitted device model
        r["calibrated_ms"] = float(
            calibrate.predict_ms(
                r["flops"], r["bytes"], r["launches"], c.peak_flops, c.bandwidth, c.launch_us
            )
        )
    return records


def test_each_timeline_axis_fits_its_own_step_in_ms():
    """Three streams: the predicted axis ends at the three-stream step (not the one-stream total, a
    third longer), and after a run 20x slower the predicted, calibrated and measured timelines each end
    at their own step instead of all at the measured one."""
    ses, view = _view()
    view.stream_switch.value = 3
    records = ses.plan.schedule()
    one = sum(r["predicted_ms"] for r in records)
    three = plans.step_ms(plans.stream_schedule(ses.plan.plan, records))
    assert three < 0.9 * one  # the bug drew the three-stream step on a one-stream axis
    assert _kw(view.predicted)["xlim"] == pytest.approx((0, 1.02 * three))
    assert _kw(view.predicted)["xlabel"] == "time in the step (ms)"

    records = _measure(ses, view)
    measured = sum(r["measured_ms"] for r in records)
    cal_three = plans.step_ms(plans.stream_schedule(ses.plan.plan, records, "calibrated_ms"))
    assert measured > 10 * three
    for pane, step in (
        (view.predicted, three),
        (view.calibrated_plot, cal_three),
        (view.measured_plot, measured),
    ):
        assert _kw(pane)["xlim"] == pytest.approx((0, 1.02 * step))
        assert f": {step:.3g} ms per training step" in _kw(pane)["title"]  # the axis is the title's step
        assert "(ms)" in _kw(pane)["xlabel"]
    assert "each timeline's time axis fits its own step" in view.info.object

    view.stream_switch.value = 1  # one stream: the predicted step no longer sits on the measured axis
    assert _kw(view.predicted)["xlim"] == pytest.approx((0, 1.02 * one))
    assert _kw(view.measured_plot)["xlim"] == pytest.approx((0, 1.02 * measured))


def _tooltips(pane) -> dict[str, str]:
    fig = hv.render(pane.object, backend="bokeh")
    (hover,) = [t for t in fig.tools if isinstance(t, HoverTool)]
    return {k: re.sub(r"@\{(\w+)\}", r"@\1", v) for k, v in hover.tooltips}  # holoviews writes @{col}


def test_one_stream_hovers_read_like_the_three_stream_one():
    """Predicted and measured one-stream bars: layer, what it does in words, time in ms with its start
    and end; no rectangle corners, lane coordinates or alpha, no exponent format."""
    ses, view = _view()
    records = _measure(ses, view)
    for pane in (view.predicted, view.measured_plot, view.calibrated_plot):
        assert "one stream" in _kw(pane)["title"]
        tips = _tooltips(pane)
        assert list(tips) == ["layer", "does", "time"]
        assert tips["layer"] == "@layer (@kind)" and tips["does"] == "@what"
        assert re.fullmatch(r"@ms\{0\.000\[0\]\} ms, from @t0\{[^}]+\} to @t1\{[^}]+\} ms", tips["time"])
        assert not any(f in v for v in tips.values() for f in ("@lane0", "@lane1", "@alpha"))
    df = view.predicted.object.data
    assert len(df) == len(records)
    words = dict(zip(zip(df["kind"], df["pass"]), df["what"], strict=True))
    assert words[("input", "backward")] == "input statistics, at the end of the pass"
    assert words[("sum", "backward")].startswith("backward: element flows")
    assert "recomputed" in words[("product", "recompute")]
    assert all(w and w != p for (_, p), w in words.items())  # words, not the bare pass name


def test_each_calibrated_step_says_which_schedule_it_is_for():
    """The calibration line's one-stream step and three-stream step; the latter is the calibrated
    three-stream timeline's title, so the screen never shows two unlabelled calibrated numbers."""
    ses, view = _view()
    view.stream_switch.value = 3
    records = _measure(ses, view)
    cal = view.calibration
    line = view.calibration_info.object
    three = plans.step_ms(plans.stream_schedule(ses.plan.plan, records, "calibrated_ms"))
    assert f"**{cal.predicted_ms:.3g} ms per step on one stream**" in line
    assert f"**{three:.3g} ms on three streams**" in line
    assert f"{cal.uncalibrated_ms:.3g} ms on one stream" in line
    assert f": {three:.3g} ms per training step" in _kw(view.calibrated_plot)["title"]
    assert "three streams" in _kw(view.calibrated_plot)["title"]
    assert three < cal.predicted_ms


def test_thin_bars_keep_their_colour():
    """No white outline (it washed out bars narrower than a pixel): the edge is absent or a faint
    dark one, on one stream and on three."""
    ses, view = _view()
    for n in (1, 3):
        view.stream_switch.value = n
        glyph = hv.render(view.predicted.object, backend="bokeh").renderers[0].glyph
        color = glyph.line_color
        assert color is None or (color == "black" and glyph.line_alpha <= 0.3), (n, color)


@pytest.mark.parametrize("streams", [1, 3])
def test_a_tap_on_the_calibrated_or_measured_timeline_selects_its_layer(streams):
    ses, view = _view()
    view.stream_switch.value = streams
    records = _measure(ses, view)
    assert set(view._taps) == {"predicted", "calibrated", "measured"}
    for name in ("calibrated", "measured"):
        data = getattr(view, f"{name}_plot").object.data
        i = next(k for k in range(len(data)) if data["layer"][k] != ses.plan.selected_layer)
        view._taps[name].event(index=[i])
        assert ses.plan.selected_layer == data["layer"][i]
        # the redraw highlights it in every timeline
        for pane in (view.predicted, view.calibrated_plot, view.measured_plot):
            df = pane.object.data
            assert set(df.loc[df["alpha"] == 1.0, "layer"]) == {data["layer"][i]}
            assert "tap" in _kw(pane)["tools"]
    assert len(view.measured_plot.object.data) == len(records)


def test_every_three_stream_bar_says_what_it_does_in_words():
    ses, view = _view()
    view.stream_switch.value = 3
    df = view.predicted.object.data
    assert all(w and w != p for p, w in zip(df["pass"], df["what"], strict=True))
    words = dict(zip(zip(df["kind"], df["pass"]), df["what"], strict=True))
    assert words[("sum", "param flows")].startswith("parameter flows, behind the main chain")
    assert "element flows" in words[("sum", "backward")] and "parameter" not in words[("sum", "backward")]
    assert "two alternating element buffers" in words[("product", "recompute")]
