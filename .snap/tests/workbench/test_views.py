"""Views without a browser: live plots stream only new points, hidden views defer redraws, log ticks."""

from __future__ import annotations

import math

import pytest
from bokeh.models import ColumnDataSource

from workbench.services.store import RunStore
from workbench.state import RunState
from workbench.views.compare_view import CompareView
from workbench.views.live_plots import LivePlots
from workbench.views.schedule_view import log_ticks


def _events(epochs: range, batches_per_epoch: int = 4) -> list[dict]:
    out = []
    for ep in epochs:
        for b in range(1, batches_per_epoch + 1):
            out.append(
                {"type": "batch", "epoch": ep, "batch": b, "num_batches": batches_per_epoch, "ll": -6.0}
            )
        out.append({"type": "memory", "t": 100.0 + ep, "allocated": 1e6, "peak_allocated": 2e6})
        out.append(
            {
                "type": "layer_times",
                "epoch": ep,
                "batch": batches_per_epoch,
                "records": [
                    {"layer": 1, "kind": "product", "pass": "recompute", "ms": 0.1, "calls": 2},
                    {"layer": 0, "kind": "input", "pass": "forward", "ms": 0.5, "calls": 2},
                    {"layer": 1, "kind": "product", "pass": "forward", "ms": 0.2, "calls": 2},
                ],
            }
        )
        out.append({"type": "epoch", "epoch": ep, "train_ll": -6.1, "valid_ll": None, "test_ll": None})
    return out


@pytest.fixture(autouse=True)
def _bokeh():
    from workbench.app import configure_panel

    configure_panel()  # HoloViews needs its plotting extension for the Compare view's figures


def _streamed(plots: LivePlots, monkeypatch) -> dict[str, list[int]]:
    """Record the number of rows of every `stream` call per source."""
    calls: dict[str, list[int]] = {k: [] for k in plots.sources}
    names = {id(src): key for key, src in plots.sources.items()}
    orig = ColumnDataSource.stream

    def stream(self, data, rollover=None):
        calls[names[id(self)]].append(len(next(iter(data.values()))))
        return orig(self, data, rollover)

    monkeypatch.setattr(ColumnDataSource, "stream", stream)
    return calls


def test_live_plots_stream_only_new_rows_and_reset_for_another_run(monkeypatch):
    run, plots = RunState(run_id="a"), LivePlots()
    calls = _streamed(plots, monkeypatch)
    run.apply(_events(range(1, 3)))
    plots.update(run)
    run.apply(_events(range(3, 4)))
    plots.update(run)
    plots.update(run)  # nothing new: nothing sent
    assert calls["batch"] == [8, 4] and calls["ll"] == [2, 1] and calls["memory"] == [2, 1]
    ll = plots.sources["ll"].data
    assert ll["epoch"] == [1, 2, 3] and all(math.isnan(v) for v in ll["valid_ll"])  # None -> NaN
    assert plots.sources["memory"].data["t"] == [0.0, 1.0, 2.0]  # seconds since the first reading
    assert plots.sources["memory"].data["allocated"] == [1.0, 1.0, 1.0]  # MB
    layers = plots.sources["layers"].data  # one row per layer, ms per pass (NaN: no such pass)
    assert layers["layer"] == ["0", "1"] and layers["forward"] == [0.5, 0.2]
    assert math.isnan(layers["recompute"][0]) and layers["recompute"][1] == 0.1
    assert plots.figures["layers"].x_range.factors == ["0", "1"]

    other = RunState(run_id="b")
    other.apply(_events(range(1, 2)))
    plots.update(other)
    assert plots.sources["batch"].data["step"] == [1, 2, 3, 4]
    assert plots.sources["ll"].data["epoch"] == [1]


def test_hidden_compare_view_redraws_when_shown(tmp_path):
    view = CompareView(store=RunStore(tmp_path / "runs"), shown=False)
    run = RunState(run_id="r1", name="first")
    run.apply(_events(range(1, 3)))
    view.compare.add(run)
    assert "Comparing" not in view.info.object  # hidden: not redrawn yet
    view.shown = True
    assert "Comparing **1** run." in view.info.object  # singular
    assert list(view.table.value["run_id"]) == ["r1"]


@pytest.mark.parametrize("lo, hi", [(1.3e5, 5.2e5), (2e3, 3.1e5), (1.0, 1e9), (50.0, 60.0), (1e4, 1e6)])
def test_log_ticks_are_few_and_round(lo, hi):
    ticks = log_ticks(lo, hi)
    assert 1 <= len(ticks) <= 5 and ticks == sorted(ticks)
    assert all(lo / 2 <= t <= hi * 2 for t in ticks)
    assert all(f"{t:.0e}"[0] in "1235" for t in ticks)  # 1, 2, 3 or 5 x 10^k


# ---- issue 9: nothing stale, measured times only of this plan, widgets reset on a new circuit


class _Services:
    runner = store = None


def _session():
    from workbench.state import SessionState

    s = SessionState(_Services())
    s.build.build_demo()
    return s


def test_failed_build_clears_partitions_schedule_and_circuit():
    from workbench.views.circuit_view import CircuitView
    from workbench.views.partition_view import PartitionView
    from workbench.views.schedule_view import ScheduleView

    s = _session()
    views = PartitionView(plan=s.plan), ScheduleView(plan=s.plan), CircuitView(plan=s.plan)
    part, sched, circ = views
    cells = part.tiles_fig.cells
    assert len(cells.data["left"]) and len(part.table.value) and sched.predicted.object is not None
    s.build.source, s.build.file_path = "file", "/nonexistent.cwpc"
    assert not s.build.build().ok
    assert len(cells.data["left"]) == 0 and len(part.slots_fig.source.data["real"]) == 0
    assert len(part.padding_fig.source.data["value"]) == 0 and len(part.table.value) == 0
    assert sched.predicted.object is None and sched.scatter.object is None and len(sched.table.value) == 0
    assert circ.pane.object is None
    for text in (part.totals.object, sched.info.object, circ.info.object):
        assert "last build failed" in text


def test_schedule_draws_measured_times_only_of_this_plan():
    from workbench.views.schedule_view import ScheduleView

    s = _session()
    view = ScheduleView(plan=s.plan)
    means = {(r["layer"], r["pass"]): 1.0 for r in s.plan.schedule()}
    other = _plan_of(s.build.root, block_size=2).layers
    view.param.update(measured_source="run-a", measured_plan=other, measured=means)
    assert view.measured_plot.object is None and "different plan" in view.info.object
    view.measured_plan = list(s.plan.layers)
    assert view.measured_plot.object is not None and "Measured (run-a)" in view.info.object
    # each timeline's x range fits its own step (tests/workbench/test_schedule_timelines.py)
    assert view.measured_plot.object.opts.get().kwargs["xlim"][1] == pytest.approx(1.02 * len(means))


def _plan_of(root, **kw):
    from workbench.state import PlanState

    return PlanState(root=root, **kw)


def test_circuit_widgets_reset_on_a_new_circuit():
    from workbench.views.circuit_view import CircuitView

    s = _session()
    view = CircuitView(plan=s.plan)
    view.level_w.value = "Blocks"
    view.vector_w.value = "v20"
    assert view.level == "Blocks" and view.vector == "v20"
    s.build.template.num_latents = 8
    assert s.build.build().ok
    assert view.level == "Layers" and view.level_w.value == "Layers" and view.vector_w.value == ""


def test_blocks_level_without_an_id_draws_blocks_at_the_plan_block_size():
    from workbench.views.circuit_view import CircuitView

    s = _session()
    view = CircuitView(plan=s.plan)
    s.plan.block_size = 2
    view.level = "Blocks"
    d, text = view.drawing()
    assert d.level == "blocks" and d.info["block_size"] == 2
    assert "blocks of 2 nodes" in text and "1 blocks" not in text


def test_si_tick_labels_use_k_m_g():
    from workbench.views._common import SI_TICKS_JS, fmt_count

    assert fmt_count(1500) == "1.5k" and fmt_count(2e6) == "2M" and fmt_count(3e9) == "3G"
    assert '"M", 1e6' in SI_TICKS_JS and '"m"' not in SI_TICKS_JS


def test_a_schedule_bar_selects_its_layer_for_every_view():
    from workbench.views.partition_view import PartitionView
    from workbench.views.schedule_view import ScheduleView

    s = _session()
    part, sched = PartitionView(plan=s.plan), ScheduleView(plan=s.plan)
    records = s.plan.schedule()
    i = next(k for k, r in enumerate(records) if r["kind"] == "sum" and r["layer"] != part.layer.value)
    sched._select(records, [i])
    assert s.plan.selected_layer == records[i]["layer"] == part.layer.value
    rects = sched.predicted.object.data
    assert set(rects.loc[rects["alpha"] == 1.0, "layer"]) == {records[i]["layer"]}


def test_progress_line_counts_the_epoch_in_progress_once():
    from workbench.views.training_view import epoch_label

    spec = {"epochs": 40, "full_batch_epochs": 0}
    assert epoch_label(spec, 1, 2) == "Epoch 2/40 (mini-batch 2/40)"  # was "Epoch 1/40 (mini-batch 2/40)"
    assert epoch_label({"epochs": 1, "full_batch_epochs": 1}, 2, 2) == "Epoch 2/2 (full-batch 1/1)"
    assert epoch_label(spec, 0, None) == "Epoch 0/40 (mini-batch 0/40)"


def _demo_session():
    from workbench.services import Services
    from workbench.services.jobs import JobRunner
    from workbench.state.session import SessionState

    store = RunStore(None)
    ses = SessionState(Services(store, JobRunner(store)))
    assert ses.build.build_demo().ok
    return ses


def test_schedule_calibrates_to_a_run_of_this_plan_and_draws_the_memory_timeline():
    import panel as pn

    from workbench.views.schedule_view import ScheduleView

    ses = _demo_session()
    view = ScheduleView(plan=ses.plan)
    pn.panel(view).get_root()
    assert "**uncalibrated**" in view.calibration_info.object and view.use_calibrated.disabled
    assert view.calibrated_plot.object is None
    title = view.memory.object.opts.get().kwargs["title"]
    assert title.startswith("Step memory: peak") and "saves" in title and "B" in title
    # a profiled run of this very plan, 20x slower than the preset predicts
    measured = {(r["layer"], r["pass"]): 20 * r["predicted_ms"] for r in ses.plan.schedule()}
    view.param.update(measured_source="run-a", measured_plan=list(ses.plan.layers), measured=measured)
    assert "**calibrated** to run-a" in view.calibration_info.object
    assert view.calibration.uncalibrated_factor == pytest.approx(20, rel=0.01)
    assert view.calibration.factor == pytest.approx(1.0, abs=0.1)
    assert view.calibrated_plot.object is not None and not view.use_calibrated.disabled
    assert view.table.value["calibrated_ms"].notna().all()
    view.use_calibrated.clicks += 1  # the preset gives way to the fitted model
    assert ses.plan.peak_flops == view.calibration.peak_flops
    assert sum(r["predicted_ms"] for r in ses.plan.schedule()) == pytest.approx(
        view.calibration.predicted_ms, rel=1e-6
    )


def test_flows_view_draws_the_step_on_the_current_circuit_and_follows_the_selected_layer():
    import panel as pn

    from workbench.views.flows_view import FlowsView

    ses = _demo_session()
    view = FlowsView(session=ses)
    pn.panel(view).get_root()
    assert view.result is not None and "One EM step on the first **256** training rows" in view.info.object
    top = max(la["layer"] for la in view.result.layers if la["kind"] == "sum")
    assert view.layer.value == top and "received flow **256**" in view.formula.object
    ses.plan.selected_layer = 4
    assert view.layer.value == 4 and view.node.value == view.result.top_nodes[4]
    df = view.table.value
    assert len(df) > 1 and df["new_weight"].sum() == pytest.approx(1.0, abs=1e-3)
    ses.plan.block_size = 2  # a what-if: the step reruns on the new plan
    assert "layer 4" in " ".join(view.layer.options)
    ses.build.template.template = "pd"
    ses.build.template.data_shape = [5, 5]  # 25 variables: nltcs has 16, so the build fails
    ses.build.build()
    assert view.result is None and "last build failed" in view.info.object


def test_partition_what_if_updates_the_figures_in_place():
    """A block-size change sends new data to the same figures (rebuilding them cost 2-3 s)."""
    from workbench.views.partition_view import PartitionView

    s = _session()
    part = PartitionView(plan=s.plan)
    fig, before = part.tiles_fig.fig, part.tiles_fig.fig.title.text
    assert "of 4x4" in before
    part.block.value = "2"
    assert part.tiles_fig.fig is fig and "of 2x2" in fig.title.text
    assert part.heat.object is fig and len(part.tiles_fig.cells.data["left"]) > 0
    layers = [str(x["layer"]) for x in s.plan.sum_layers]
    assert part.parts_fig.fig.x_range.factors == layers
    assert part.parts_fig.source.data["value"] == [x["num_partitions"] for x in s.plan.sum_layers]


def test_flows_view_asks_before_a_large_step(monkeypatch):
    """A circuit whose step would hold the server for seconds waits for the button."""
    import panel as pn

    from workbench.views import flows_view

    monkeypatch.setattr(flows_view, "AUTO_FLOP", 100.0)  # the demo counts as large
    ses = _demo_session()
    view = flows_view.FlowsView(session=ses)
    pn.panel(view).get_root()
    assert view.result is None and view.run_btn.visible
    assert view.run_btn.name == "Run one EM step on 8 rows" and "A large circuit" in view.info.object
    view.run_btn.clicks += 1
    assert view.result is not None and view.result.batch_size == 8
    assert "One EM step on the first **8** training rows" in view.info.object


def test_compare_draws_missing_values_as_gaps_and_names_runs_without_any(tmp_path):
    """None in a metric (no validation split, an epoch not evaluated) made an object column that
    Bokeh drew as nothing: lines are float arrays with NaN gaps, and a run with no value is named."""
    import numpy as np

    view = CompareView(store=RunStore(tmp_path / "runs"))
    none = RunState(run_id="r-none", name="none")
    none.apply(_events(range(1, 3)))  # valid_ll None in every epoch
    gaps = RunState(run_id="r-gaps", name="gaps")
    for ep, valid in ((1, -6.2), (2, None), (3, -6.0)):
        gaps.apply([{"type": "epoch", "epoch": ep, "train_ll": -6.1, "valid_ll": valid, "test_ll": None}])
    view.compare.runs = [none, gaps]
    overlay = view.curves.object
    assert "valid_ll per epoch (no valid_ll: none (r-none))" == overlay.opts.get().kwargs["title"]
    curves = [el for el in overlay if type(el).__name__ == "Curve"]
    assert len(curves) == 1
    ys = curves[0].dimension_values(1)
    assert ys.dtype.kind == "f" and np.isnan(ys[1]) and ys[0] == -6.2 and ys[2] == -6.0


def test_flows_view_says_so_when_the_dataset_no_longer_fits_the_circuit():
    import panel as pn

    from workbench.views.flows_view import FlowsView

    ses = _demo_session()
    view = FlowsView(session=ses)
    pn.panel(view).get_root()
    ses.build.data.dataset = "digits"  # 64 variables; the demo covers nltcs's 16, not rebuilt
    ses.plan.block_size = 2  # a what-if reruns the step on the chosen dataset's rows
    assert view.result is None and "No flows: data must have shape" in view.info.object


def test_compare_list_follows_a_run_that_finishes(tmp_path):
    """The stored-run list said 'running' for a run the plots showed done."""
    from workbench.services.store import RunRecord

    class Store(RunStore):
        status_now = "running"

        def list_runs(self):
            return [RunRecord("r1", "first", self.status_now, "", 0.0, 0.0, False, {})]

    store = Store(tmp_path / "runs")
    view = CompareView(store=store)
    run = RunState(run_id="r1", name="first")
    run.apply(_events(range(1, 2)))
    view.compare.add(run)
    assert list(view.picker.options) == ["first · running · r1"]
    store.status_now = "done"
    run.apply(_events(range(2, 3)))  # a new epoch: the plots redraw, and the list with them
    view.redraw()
    assert list(view.picker.options) == ["first · done · r1"]
