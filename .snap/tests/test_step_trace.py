"""benchmarks/step_trace.py's reading of a kernel timeline, on a synthetic trace (no GPU)."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import step_trace  # noqa: E402


def _step(t: float, stall: float) -> list[dict]:
    """One step from time t: 10 pass kernels (the last the statistics), a parameter-flow all-reduce
    during the pass, the EM kernel, the last all-reduce `stall` us after the statistics, the EM of
    the rows it brings, and PyTorch's LL bookkeeping."""
    ks = [
        {"name": f"_sum_bwd_elem_block_kernel{i}", "stream": 7, "t0": t + 10 * i, "t1": t + 10 * i + 9}
        for i in range(9)
    ]
    ks.append({"name": "_stats_kernel", "stream": 7, "t0": t + 90, "t1": t + 100})
    ks.append({"name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL", "stream": 9, "t0": t + 50, "t1": t + 70})
    ks.append({"name": "_sum_em_kernel", "stream": 7, "t0": t + 100, "t1": t + 130})
    ks.append(
        {
            "name": "ncclDevKernel_AllReduce_Sum_f32_RING_LL",
            "stream": 9,
            "t0": t + 100 + stall,
            "t1": t + 160 + stall,
        }
    )
    ks.append({"name": "_em_kernel", "stream": 7, "t0": t + 160 + stall, "t1": t + 170 + stall})
    ks.append(
        {
            "name": "void at::native::reduce_kernel<512>",
            "stream": 7,
            "t0": t + 171 + stall,
            "t1": t + 172 + stall,
        }
    )
    return ks


def test_steps_are_islands_and_the_tail_after_the_pass_is_measured(tmp_path):
    kernels = _step(0, 500) + _step(5000, 30) + _step(10000, 2) + _step(15000, 30)  # the first: skewed
    events = [
        {
            "cat": "kernel",
            "name": k["name"],
            "ts": k["t0"],
            "dur": k["t1"] - k["t0"],
            "args": {"stream": k["stream"]},
        }
        for k in kernels
    ] + [{"cat": "cpu_op", "name": "aten::add", "ts": 1, "dur": 3}]  # not a kernel: ignored
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    found = step_trace.islands(step_trace.kernels_of(str(path)))
    assert [len(s) for s in found] == [15, 15, 15, 15]
    out = step_trace.summary(found)
    assert out["steps_found"] == 4 and out["steps_kept"] == 3  # the first island dropped
    assert out["last_nccl_delay_us"] == [2.0, 30.0, 30.0]  # last all-reduce's start after the statistics
    assert out["after_flows_us_median"] == 102.0  # step end (172 + 30) - statistics end (100)
    assert out["step_us_median"] == 202.0 and out["compute_sum_us_median"] == 9 * 9 + 10 + 30 + 10 + 1
    assert out["nccl_sum_us_median"] == 80.0
    assert step_trace.median_step(out["steps"])["step_us"] == 202.0
    assert step_trace.summarise([kernels[10]]) is None  # an island of NCCL alone: no pass to measure
