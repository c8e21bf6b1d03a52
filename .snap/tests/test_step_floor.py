"""benchmarks/step_floor.py: bytes and FLOPs of a training step, against counts made by hand on a tiny
circuit and against counts taken from the node graph (not the plan) on an irregular one."""

from __future__ import annotations

import pytest
from helpers import irregular, tiny_tree

import engine
from benchmarks.step_floor import ELEMENT_BUFFERS, PASSES, step_floor, times_ms, to_dict
from engine.nodes import InputNodes, SumNodes


def test_tiny_tree_counted_by_hand():
    """((x0 x1)(x2 x3)), 4 latents, block size 4, Categorical(3), B = 2.

    Node rows: 1-16 inputs, 17-24 the two mixtures, 25 the root. Element rows: 8 (products of the
    mixtures' children), then 4 (the root's children). Sum weights: 2 blocks x 4 x 4 + 4 = 36.
    Input params: 16 nodes x 3 categories = 48. A float row of B = 2 is 8 bytes."""
    B = 2
    f = step_floor(engine.compile(tiny_tree(latents=4, block_size=4)).plan, B)
    assert set(f) == set(PASSES)
    # forward: node values read by products 16 + 8 rows, written by sums 8 + 1; element values
    # 8 + 4 written and read again; weights 36 floats read
    assert f["forward"].bytes == (24 + 9 + 2 * 12) * 8 + 36 * 4
    # flows: node values read {1..25} = 25 rows (recompute's children and the sums' own rows),
    # node flows read 9 (the sums' rows), written 24 (the products' children); element values
    # recomputed (12) and read (12); element flows written (12) and read (12); weights 36
    assert f["flows"].bytes == (25 + 9 + 24 + 24 + 24) * 8 + 36 * 4
    assert f["flows"].by_tensor["node_flows"] == (9 + 24) * 8
    # parameter flows: the sums' node flows and values (9 + 9), element values 12; weights read,
    # their flows written
    assert f["param_flows"].bytes == (9 + 9 + 12) * 8 + 2 * 36 * 4
    # inputs: 4 uint8 values per example; input rows written (16) and their flows read (16); the
    # 48 params read and the 48 statistics written
    assert f["inputs"].bytes == 4 * B + 32 * 8 + 2 * 48 * 4
    # EM: weights and params read and written, their flows read
    assert f["em"].bytes == 3 * 36 * 4 + 3 * 48 * 4
    # one 2-FLOP multiply-add per weight and example in each of the three matmul passes
    for name in ("forward", "flows", "param_flows"):
        assert f[name].flops == 2 * 36 * B
    assert f["inputs"].flops == f["em"].flops == 0
    assert all(sum(c.by_tensor.values()) == c.bytes for c in f.values())


def _graph_counts(root) -> tuple[int, int]:
    """(sum weights, input params) read off the node vectors, not the compiled plan."""
    vecs = root.topological()
    weights = sum(v.edge_ids.shape[1] * v.block_size**2 for v in vecs if isinstance(v, SumNodes))
    params = sum(v.num_nodes * v.dist.num_cats for v in vecs if isinstance(v, InputNodes))
    return weights, params


@pytest.mark.parametrize("B", [1, 7, 64])
def test_irregular_matches_the_node_graph(B):
    root = irregular()
    weights, params = _graph_counts(root)
    plan = engine.compile(root).plan
    f = step_floor(plan, B)
    assert f["forward"].flops == f["flows"].flops == f["param_flows"].flops == 2 * B * weights
    assert f["em"].bytes == 3 * 4 * (weights + params)
    assert f["forward"].by_tensor["params"] == 4 * weights
    # every node row but the constant row 0 is written once: inputs in their pass, sums in forward
    assert f["inputs"].by_tensor["node_mars"] + f["forward"].by_tensor["node_mars"] >= 4 * B * (
        plan.num_node_rows - 1
    )
    assert f["inputs"].by_tensor["data"] == B * plan.num_vars  # one uint8 per variable


def test_times_take_the_slower_of_memory_and_compute():
    f = to_dict(step_floor(engine.compile(tiny_tree(latents=4, block_size=4)).plan, 2))
    ceil = {"copy_GBps": 1e-6, "matmul_tf32_TFLOPs": 1e-12, "matmul_bf16_TFLOPs": 2e-12}
    t = times_ms(f, ceil, "tf32x3")
    # 1 kB/s and 1 FLOP/s: milliseconds are 1e3 x bytes / 1e3 and 1e3 x 3 x FLOPs
    assert t["forward"]["memory_ms"] == pytest.approx(f["forward"]["bytes"])
    assert t["forward"]["compute_ms"] == pytest.approx(3e3 * f["forward"]["flops"])
    assert t["forward"]["bound"] == "compute"
    assert t["em"]["bound"] == "memory"
    assert times_ms(f, ceil, "bf16")["forward"]["compute_ms"] == pytest.approx(0.5e3 * f["forward"]["flops"])
    assert t["step_ms"] == pytest.approx(sum(t[p]["floor_ms"] for p in PASSES))
    # without the element buffers (products fused into the sums): forward loses its 24 element rows
    fused = times_ms(f, ceil, "tf32x3", ELEMENT_BUFFERS)
    assert fused["forward"]["memory_ms"] == pytest.approx(f["forward"]["bytes"] - 24 * 8)
    assert fused["em"] == t["em"]
    with pytest.raises(ValueError, match="precision"):
        times_ms(f, ceil, "fp8")
    with pytest.raises(ValueError, match="matmul_fp32_TFLOPs"):
        times_ms(f, ceil, "ieee")
