"""Defects of the 2026-11-30 new-user trial, checked on the views without a browser."""

from __future__ import annotations

import pytest

from workbench.services.memory import BUFFERS as BUFFER_NAMES
from workbench.services.store import RunStore
from workbench.state import RunState


@pytest.fixture(autouse=True)
def _bokeh():
    from workbench.app import configure_panel

    configure_panel()


def _epochs(run: RunState, n: int, name_layers=True) -> RunState:
    events = []
    for ep in range(1, n + 1):
        events.append({"type": "batch", "epoch": ep, "batch": 1, "num_batches": 1, "ll": -6.0})
        events.append(
            {
                "type": "layer_times",
                "records": [{"layer": 0, "kind": "input", "pass": "forward", "ms": 0.5, "calls": 1}],
            }
        )
        events.append({"type": "epoch", "epoch": ep, "train_ll": -6.0 + ep, "valid_ll": -6.1 + ep})
    events.append({"type": "status", "status": "running", "device": "cpu"})
    events.append({"type": "done", "status": "done"})
    run.apply(events)
    return run


class _Services:
    runner = store = None


def _training_view(monkeypatch, gpus: int = 0):
    from workbench.services import ranks
    from workbench.state import SessionState
    from workbench.views import training_view

    monkeypatch.setattr(ranks, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(training_view.pn.state, "add_periodic_callback", lambda *a, **k: None)
    ses = SessionState(_Services())
    return ses, training_view.TrainingView(session=ses)


def test_a_new_or_failed_run_shows_nothing_of_the_previous_run(monkeypatch):
    """Trial defect 2: the bar stayed full, the layer bars stayed, the device read 'on …'."""
    ses, view = _training_view(monkeypatch)
    ses.run = _epochs(RunState(run_id="old", spec={"epochs": 2, "full_batch_epochs": 0}), 2)
    view._follow_new_run(ses.run, "x")
    view._refresh()
    view._finished()
    assert view.progress.value == 1000 and view.live.sources["layers"].data["layer"] == ["0"]

    new = RunState(
        run_id="new", status="starting", spec={"epochs": 1, "full_batch_epochs": 0, "device": "cpu"}
    )
    ses.run = new
    view._follow_new_run(new, "x")
    view.poll()  # the first tick of the new run
    assert view.progress.value == 0 and view.progress.bar_color == "success"
    assert (
        view.live.sources["layers"].data["layer"] == [] and view.live.figures["layers"].x_range.factors == []
    )
    assert view.live.sources["ll"].data["epoch"] == [] and len(view.epoch_table.value) == 0
    assert "…" not in view.progress_text.object and "cpu (starting)" in view.progress_text.object

    new.apply([{"type": "error", "message": "boom"}])
    view._finished()
    assert new.status == "failed" and view.progress.value == 0 and view.progress.bar_color == "danger"
    assert "cpu (not started)" in view.progress_text.object


@pytest.mark.parametrize("gpus, offered", [(0, False), (1, True)])
def test_gpu_is_offered_only_when_one_is_visible(monkeypatch, gpus, offered):
    """Trial defect 2: "GPU (cuda)" was offered without a GPU and failed only after Start."""
    _, view = _training_view(monkeypatch, gpus)
    assert ("cuda" in view.device.options.values()) is offered
    assert "cpu" in view.device.options.values() and "auto" in view.device.options.values()


# ---- Compare (trial defects 3-6)


def _stored(store: RunStore, name: str, epochs: int, **spec) -> str:
    """A run written to `store` as the worker writes one: spec, events, final status; its id."""
    run_id = store.create({"name": name, "epochs": epochs, **spec})
    events = []
    for ep in range(1, epochs + 1):
        events.append({"type": "epoch", "epoch": ep, "train_ll": -6.0, "valid_ll": -6.1, "seconds": 1.0})
    events.append({"type": "done", "status": "done"} if epochs else {"type": "error", "message": "no data"})
    store.append_events(run_id, events)
    store.set_status(run_id, "done" if epochs else "failed")
    return run_id


def _compare_view(tmp_path, runs):
    """A CompareView over a store of `runs` [(name, epochs[, spec])], all of them picked."""
    from workbench.views.compare_view import CompareView

    store = RunStore(tmp_path / "runs")
    ids = [_stored(store, *r[:2], **(r[2] if len(r) > 2 else {})) for r in runs]
    view = CompareView(store=store)
    view.picker.value = ids
    return ids, view


def test_clear_removes_the_plots(tmp_path):
    _, view = _compare_view(tmp_path, [("a", 2), ("b", 2)])
    view.add_selected()
    assert view.curves.object is not None and "Comparing **2** runs" in view.info.object
    view.clear_btn.clicks += 1
    assert "Pick two or more runs" in view.info.object
    assert view.curves.object is None and view.timing.object is None and view.layers.object is None


def test_picked_runs_are_drawn_once_when_all_are_read(tmp_path):
    """Nine runs were added one by one, each a redraw: 'Comparing 4 runs' with two lines for 3 s."""
    import asyncio
    import concurrent.futures

    _, view = _compare_view(tmp_path, [(f"n{i}", 2) for i in range(9)])
    drawn = []
    view.compare.param.watch(lambda e: drawn.append(len(e.new)), "runs")
    # a fresh loop in its own thread: an earlier test in the same process may leave this thread's loop running
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, view._add_clicked()).result(timeout=120)
    assert drawn == [9] and "Comparing **9** runs" in view.info.object and not view.add_btn.disabled


def test_legend_sits_beside_the_plot_and_same_named_runs_say_how_they_differ(tmp_path):
    runs = [("hclt-nltcs", 2, {"block_size": i}) for i in range(8)] + [("other", 1)]
    ids, view = _compare_view(tmp_path, runs)
    view.add_selected()
    opts = view.curves.object.opts.get().kwargs
    assert opts["legend_position"] == "right"
    labels = {el.label for el in view.curves.object}
    assert f"hclt-nltcs [bs 3] ({ids[3][-6:]})" in labels and f"other ({ids[8][-6:]})" in labels
    assert len(labels) == 9
    assert view.timing.object.opts.get().kwargs["xrotation"] > 0  # nine names side by side overlapped


def test_a_failed_run_without_data_is_named_not_drawn(tmp_path):
    """README: a missing metric is named in the title; a failed run was an empty bar."""
    (good, bad), view = _compare_view(tmp_path, [("good", 2), ("broken", 0)])
    view.add_selected()
    bars = view.timing.object
    assert list(bars.dimension_values("run")) == [f"good ({good[-6:]})"]
    assert f"no epochs: broken ({bad[-6:]})" in bars.opts.get().kwargs["title"]
    assert f"broken ({bad[-6:]})" in view.curves.object.opts.get().kwargs["title"]


# ---- Continue (trial defect 7)


def test_continue_numbers_epochs_on_names_the_template_and_is_offered_once(tmp_path, monkeypatch):
    """The continued run counted 'Epoch 3/25' from 1 (Compare drew it over the original from epoch
    1), its template read `file`, and the stopped run stayed listed as continuable."""
    from workbench.services import Services
    from workbench.services.jobs import JobRunner
    from workbench.state import SessionState
    from workbench.views.compare_view import CompareView

    store = RunStore(tmp_path / "runs")
    runner = JobRunner(store)
    ses = SessionState(Services(store, runner))
    circuit = {"source": "template", "template": "hclt", "num_latents": 4}
    first = store.create(
        {"name": "hclt-nltcs", "circuit": circuit, "dataset": "nltcs", "epochs": 25, "full_batch_epochs": 1},
        owner=ses.owner,
    )
    store.append_events(first, [{"type": "epoch", "epoch": e, "train_ll": -6.0} for e in (1, 2)])
    store.set_status(first, "stopped")
    store.model_path(first).write_bytes(b"checkpoint")
    assert [r.run_id for r in ses.continuable_runs()] == [first]

    started = {}

    def start(spec, name=None, owner=None):  # the worker is not needed: record what it would get
        started["spec"] = spec
        return type("Job", (), {"job_id": store.create(spec, owner=owner), "spec": None})()

    monkeypatch.setattr(runner, "start", start)
    job = runner.continue_run(first, owner=ses.owner)
    spec = started["spec"]
    assert spec["continues"] == {"run_id": first, "epochs_before": 2, "circuit": circuit}
    assert spec["epochs"] == 23 and spec["circuit"]["source"] == "file"
    assert ses.continuable_runs() == []  # continued: not offered again

    store.append_events(job.job_id, [{"type": "epoch", "epoch": 1, "train_ll": -5.0}])
    run = RunState.from_store(store, job.job_id)
    assert run.epochs["epoch"] == [3] and run.summary()["template"] == "hclt"

    from workbench.views.training_view import epoch_label

    assert epoch_label(run.spec, 3, 4) == "Epoch 4/26 (mini-batch 4/25)"
    view = CompareView(store=ses.store)
    view.compare.metric = "train_ll"
    view.compare.runs = [RunState.from_store(store, first), run]
    lines = [el for el in view.curves.object if type(el).__name__ == "Curve"]
    assert [list(c.dimension_values(0)) for c in lines] == [[1, 2], [3]]


# ---- Build tab (trial defects 8, 9, 10)


def _builder(template: str = "hmm"):
    from workbench.state import SessionState
    from workbench.views.builder import TEMPLATE_LABELS, BuilderView

    ses = SessionState(_Services())
    view = BuilderView(build=ses.build, plan=ses.plan)
    view.template.value = {v: k for k, v in TEMPLATE_LABELS.items()}[template]
    return ses, view


def test_homogeneous_hmm_is_said_in_the_report_the_run_name_and_a_help_line(monkeypatch):
    """The build report of a homogeneous HMM was the plain HMM's, word for word."""
    import panel as pn

    ses, view = _builder("hmm")
    assert view.help.visible and "shares one transition matrix" in view.help.object
    view._on_build(None)
    plain = view.outcome.object
    assert "Built HMM-" in plain and "learnable." in plain and "tied" not in plain
    box = next(
        w for w in view.template_params.select(pn.widgets.CheckBoxGroup) if w.options == ["Homogeneous"]
    )
    box.value = ["Homogeneous"]
    view._on_build(None)
    tied = view.outcome.object
    assert "HMM-16 homogeneous" in tied and "learnable (tied" in tied
    count = lambda text: int(text.split("Parameters: **")[1].split("**")[0].replace(",", ""))  # noqa: E731
    assert count(tied) == ses.plan.plan.num_learnable_params < count(plain)

    _, tv = _training_view(monkeypatch)
    tv.session = ses
    names = []
    monkeypatch.setattr(ses, "start_training", lambda: names.append(ses.training.run_name))
    monkeypatch.setattr(tv, "_follow_new_run", lambda *a: None)
    tv.start()
    assert names == ["hmm-homogeneous-nltcs-bsauto"]
    view.template.value = "HCLT"
    assert not view.help.visible


def test_an_unreadable_grid_is_said_once(monkeypatch):
    """'4 x four': the same sentence stood above and below Build circuit."""
    ses, view = _builder("pd")
    view._checked["data_shape"].value = "4 x four"
    assert "4 x four" in view.field_alert.object
    view._on_build(None)
    said = view.field_alert.object.split("4 x four")[1]  # the reason, stated once, above the button
    assert said not in view.outcome.object
    assert "Not built:** Data shape '4 x four' cannot be used; the reason stands above" in view.outcome.object


def test_units_memory_axes_in_kb_mb_clamped_at_zero_and_one_epoch(monkeypatch):
    """'live memory (bytes)' with 500k / 2.5M ticks; a CPU memory axis from -1 to 1 MB; '= 1 epochs'."""
    import numpy as np

    from workbench.views.memory_plot import memory_plot

    rec = [{"pass": "forward", "total": 0, **{b: 5e5 * (i + 1) / 5 for b in BUFFER_NAMES}} for i in range(3)]
    store = [{"total": 2.5e6 + i} for i in range(3)]
    plot = memory_plot({"recompute": rec, "store": store})
    opts = plot.opts.get().kwargs
    assert opts["ylabel"] == "live memory (MB)" and "yformatter" not in opts
    stored = next(el for el in plot if el.label == "store every product layer")
    assert np.allclose(stored.dimension_values(1), 2.5, atol=1e-5)  # MB, as the label says

    ses, view = _training_view(monkeypatch)
    assert view.live.figures["memory"].y_range.start == 0
    ses.training.param.update(epochs=1, full_batch_epochs=0)
    assert "**1** epoch:" in view.epoch_total.object
    ses.training.full_batch_epochs = 2
    assert "**3** epochs:" in view.epoch_total.object


def test_vector_counts_are_written_like_the_variable_count():
    """'1058 input' beside '1,058 variables'."""

    class Res:
        ok, error, seconds = True, None, 0.1
        info = {
            "num_nodes": 5000,
            "num_vectors": 2500,
            "vectors_by_kind": {"input": 1058, "sum": 20},
            "num_vars": 1058,
        }

    ses, view = _builder("hclt")
    view.report(Res())
    assert "(1,058 input, 20 sum) over 1,058 variables" in view.outcome.object


def test_no_empty_legends_before_the_first_run():
    """Before any run the Train plots showed legends of labels without swatches."""
    from workbench.views.live_plots import LivePlots

    plots = LivePlots()
    assert not any(plots.figures[k].legend.visible for k in ("ll", "layers", "memory"))
    run = RunState(run_id="a", spec={"epochs": 2})
    run.apply([{"type": "memory", "t": 1.0, "allocated": 1e6, "peak_allocated": 2e6}])
    plots.update(run)
    assert plots.figures["memory"].legend.visible and not plots.figures["ll"].legend.visible
    _epochs(run, 2)
    plots.update(run)
    assert plots.figures["ll"].legend.visible and plots.figures["layers"].legend.visible
    assert not plots.figures["memory"].legend.visible  # the run reported cpu: no device memory
    plots.update(RunState(run_id="b"))  # a new run: empty again
    assert not any(plots.figures[k].legend.visible for k in ("ll", "layers", "memory"))
