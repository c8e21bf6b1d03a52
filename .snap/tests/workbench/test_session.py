"""Issue 9 state behaviour: the demo build, nothing stale after a failed build, per-template defaults,
variables checked against the dataset at build time, plan signatures and the Blocks level's block size."""

from __future__ import annotations

import pytest

from workbench.services import layout, plans
from workbench.services.circuits import TEMPLATE_DEFAULTS
from workbench.state import BuildState, PlanState, SessionState
from workbench.state.circuit import grid_shape


@pytest.fixture(autouse=True)
def _runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_RUNS_DIR", str(tmp_path / "runs"))


class _Services:
    runner = store = None


def test_demo_builds_a_block_sparse_circuit_with_several_partitions_and_padding():
    s = SessionState(_Services())
    res = s.build.build_demo()
    assert res.ok and s.build.seconds >= res.seconds > 0
    assert s.plan.plan is not None
    assert max(x["num_partitions"] for x in s.plan.sum_layers) >= 2
    assert s.plan.padding_ratio > 0


def test_a_failed_build_drops_the_old_plan_and_says_why():
    s = SessionState(_Services())
    s.build.build_demo()
    assert s.plan.plan is not None
    s.build.source = "file"
    s.build.file_path = "/nonexistent/circuit.cwpc"
    res = s.build.build()
    assert not res.ok
    assert s.plan.plan is None and s.plan.sum_layers == [] and s.plan.layers == []
    assert "last build failed" in s.plan.absent
    s.build.build_demo()
    assert s.plan.plan is not None and "last build failed" not in s.plan.absent


def test_pd_defaults_fit_the_dataset_and_latents_are_per_template():
    b = BuildState()
    assert b.data.dataset == "nltcs" and b.template.data_shape == [4, 4]
    b.template.template = "pd"
    assert b.build().ok, b.error  # PD's default builds on the default dataset
    b.template.num_latents = 6
    b.template.template = "hmm"
    assert b.template.num_latents == 16
    b.template.template = "pd"
    assert b.template.num_latents == 6
    assert grid_shape(69) == [3, 23] and grid_shape(784) == [28, 28]


def test_circuit_variables_are_checked_against_the_dataset_at_build_time():
    s = SessionState(_Services())
    s.build.source = "graph"  # the composed example covers 2 variables; nltcs has 16
    res = s.build.build()
    assert res.ok
    assert "2 variables" in s.build.mismatch and "16" in s.build.mismatch
    assert s.start_training() is None and "2 variables" in s.error
    s.build.build_demo()
    assert s.build.mismatch == ""


def test_sum_density_is_a_template_key():
    assert TEMPLATE_DEFAULTS["sum_density"] == 1.0
    b = BuildState()
    assert b.template.to_dict()["sum_density"] == 1.0


def test_plan_signature_tells_plans_apart():
    b = BuildState()
    b.build_demo()
    a = PlanState(root=b.root, block_size=None)
    same = PlanState(root=b.root, block_size=None)
    other = PlanState(root=b.root, block_size=2)
    assert plans.plan_signature(a.layers) == plans.plan_signature(same.layers)
    assert plans.plan_signature(a.layers) != plans.plan_signature(other.layers)


def test_blocks_level_follows_the_plan_block_size_and_partitions():
    b = BuildState()
    b.build_demo()
    idx = layout.VectorIndex(b.root)
    sid = next(
        i for i, k in zip(idx.ids, idx.kind) if k == "sum" and idx.vectors[idx.find(i)].num_nodes == 16
    )
    v = idx.vectors[idx.find(sid)]
    own = layout.block_dag(idx, sid)
    two = layout.block_dag(idx, sid, block_size=2)
    assert own.info["block_size"] == v.block_size == 4 and own.info["num_blocks"] == 4
    assert two.info["block_size"] == 2 and two.info["num_blocks"] == 8
    assert two.info["num_block_edges"] == 4 * own.info["num_block_edges"]
    ps = PlanState(root=b.root, block_size=2)
    parts = ps.partitions_of(v, 2)
    assert len(parts) == 8 and all(k >= 0 for _, k in parts)
