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
        out.append({"type": "memory", "t": 100.0 + ep, "allocated": 2**20, "peak_allocated": 2**21})
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
    assert plots.sources["memory"].data["allocated"] == [1.0, 1.0, 1.0]  # MiB
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
    assert "Comparing **1** runs" in view.info.object
    assert list(view.table.value["run_id"]) == ["r1"]


@pytest.mark.parametrize("lo, hi", [(1.3e5, 5.2e5), (2e3, 3.1e5), (1.0, 1e9), (50.0, 60.0), (1e4, 1e6)])
def test_log_ticks_are_few_and_round(lo, hi):
    ticks = log_ticks(lo, hi)
    assert 1 <= len(ticks) <= 5 and ticks == sorted(ticks)
    assert all(lo / 2 <= t <= hi * 2 for t in ticks)
    assert all(f"{t:.0e}"[0] in "1235" for t in ticks)  # 1, 2, 3 or 5 x 10^k
