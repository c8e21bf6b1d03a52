"""Defects of the 2026-11-30 new-user trial, checked on the views without a browser."""

from __future__ import annotations

import pytest

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

    new = RunState(run_id="new", status="starting", spec={"epochs": 1, "full_batch_epochs": 0, "device": "cpu"})
    ses.run = new
    view._follow_new_run(new, "x")
    assert view.progress.value == 0 and view.progress.bar_color == "success"
    assert view.live.sources["layers"].data["layer"] == [] and view.live.figures["layers"].x_range.factors == []
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
