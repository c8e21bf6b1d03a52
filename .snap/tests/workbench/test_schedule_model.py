"""The Schedule tab's models: the memory timeline of a step and the device model's calibration."""

from __future__ import annotations

import numpy as np
import pytest

from engine.compiler.plan import PAD_ROWS
from engine.executor.stream_schedule import recompute_buffers
from workbench.services import calibrate, memory, plans
from workbench.state.circuit import BuildState


@pytest.fixture(scope="module")
def demo_plan():
    b = BuildState()
    assert b.build_demo().ok
    return plans.make_plan(b.root, None, 0.5)


def test_memory_timeline_recompute_against_store(demo_plan):
    batch = 512
    recs = plans.schedule(demo_plan, batch)
    tl = memory.memory_timeline(demo_plan, recs, batch)
    assert len(tl["recompute"]) == len(tl["store"]) == len(recs)
    peak_re, peak_store = memory.peak_saving(tl)
    # the recompute policy's peak is the engine's own training-memory estimate
    assert peak_re == demo_plan.memory_bytes(batch)["total"]
    per_row = 4 * batch
    products = [la for la in demo_plan.layers if la.kind == "product"]
    all_products = (PAD_ROWS + sum(la.writes[2] - la.writes[1] for la in products)) * per_row
    last_forward = max(i for i, r in enumerate(recs) if r["pass"] == "forward")
    assert tl["store"][last_forward]["element values"] == all_products  # every product layer kept
    assert tl["store"][-1]["element values"] == PAD_ROWS * per_row  # all released by the end
    assert peak_store > peak_re
    assert all(d["total"] == sum(d[b] for b in memory.BUFFERS) for d in tl["store"])
    assert tl["recompute"][0]["node flows"] == 0 and tl["recompute"][-1]["node flows"] > 0


def test_calibration_recovers_a_known_device(demo_plan):
    recs = plans.schedule(demo_plan, 512)  # preset: 1e11 FLOP/s, 20 GB/s, 5 us
    rng = np.random.default_rng(0)
    truth = (3e9, 2.5e9, 40.0)  # FLOP/s, bytes/s, us per partition: far from the preset
    for r in recs:
        exact = calibrate.predict_ms(r["flops"], r["bytes"], r["launches"], *truth)
        r["measured_ms"] = float(exact * rng.uniform(0.97, 1.03))
    cal = calibrate.calibrate(recs, 1e11, 2e10, 5.0)
    assert cal is not None and cal.num_steps == len(recs)
    assert cal.uncalibrated_factor > 3  # the preset is far off ...
    assert cal.factor == pytest.approx(1.0, abs=0.05)  # ... the calibrated model is not
    assert cal.median_error < 1.06
    measured = sum(r["measured_ms"] for r in recs)
    assert cal.measured_ms == pytest.approx(measured)


def test_calibration_needs_measured_steps(demo_plan):
    recs = plans.schedule(demo_plan, 512)
    assert calibrate.calibrate(recs, 1e11, 2e10, 5.0) is None
    for r in recs[:2]:
        r["measured_ms"] = 1.0
    assert calibrate.calibrate(recs, 1e11, 2e10, 5.0) is None


def test_three_stream_memory_holds_the_spare_element_buffer_in_the_flows_pass(demo_plan):
    batch = 256
    recs = plans.schedule(demo_plan, batch)
    tl = memory.memory_timeline(demo_plan, recs, batch)
    three, one = tl["three streams"], tl["recompute"]
    assert len(three) == len(recs)
    buffer = recompute_buffers(demo_plan).spare_rows * 4 * batch  # the spare _flows_pass allocates
    assert 0 < buffer <= demo_plan.num_element_rows * 4 * batch
    for r, a, b in zip(recs, three, one, strict=True):
        extra = buffer if r["pass"] != "forward" else 0  # held from the first backward step on
        assert a["element values"] == b["element values"] + extra
        assert a["total"] == b["total"] + extra and a["node flows"] == b["node flows"]
    assert memory.peak(three) == demo_plan.memory_bytes(batch)["total"] + buffer
    assert memory.peak(one) == demo_plan.memory_bytes(batch)["total"]


def test_stream_schedule_service_lays_the_records_on_one_or_three_streams(demo_plan):
    recs = plans.schedule(demo_plan, 512)
    serial = sum(r["predicted_ms"] for r in recs)
    one = plans.stream_schedule(demo_plan, recs, num_streams=1)
    assert [s["pass"] for s in one] == [r["pass"] for r in recs]
    assert plans.step_ms(one) == pytest.approx(serial)
    three = plans.stream_schedule(demo_plan, recs)
    n_sums = sum(r["kind"] == "sum" and r["pass"] == "backward" for r in recs)
    n_early = sum(len(v) for v in plans.early_launches(demo_plan).values())
    assert n_early > 0  # the demo is an HCLT: some input statistics come early
    assert len(three) == len(recs) + n_sums + n_early
    assert sum(s["pass"] == "statistics" for s in three) == n_early
    assert {s["lane"] for s in three} == set(plans.STREAM_LANES.values())
    main = sum(s["ms"] for s in three if s["stream"] == "main")
    assert main <= plans.step_ms(three) < serial
    assert sum(s["ms"] for s in three) == pytest.approx(serial)  # the same work, split and overlapped
    # a run's plan dict lays out the same way; an unmeasured step cannot be laid out
    assert plans.stream_schedule(demo_plan.to_dict(512), recs) == three
    assert plans.stream_schedule(demo_plan, recs, key="measured_ms") is None
    with pytest.raises(ValueError, match="records for a plan"):
        plans.stream_schedule(demo_plan, recs[:-1])
