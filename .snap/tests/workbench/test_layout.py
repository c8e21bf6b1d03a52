"""Circuit drawing data: layer overview, vector DAG with aggregation, block level, and speed."""

import time

import numpy as np
import pytest

from engine.compiler import compile_plan
from engine.dists import Categorical
from engine.structures import hclt_from_tree
from workbench.services import circuits, layout
from workbench.state import GraphSpec


def _hclt(num_vars: int, num_latents: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    edges = np.array([[rng.integers(0, i), i] for i in range(1, num_vars)])
    return hclt_from_tree(edges, num_vars, num_latents, Categorical(4))


def test_layer_overview_one_glyph_per_layer_and_read_edges():
    root = circuits.build(GraphSpec.example().to_dict()).root
    plan, _, _ = compile_plan(root)
    d = layout.layer_overview(plan)
    assert d.num_nodes == len(plan.layers)
    kinds = dict(zip(d.nodes["id"], d.nodes["kind"]))
    ranks = dict(zip(d.nodes["id"], d.nodes["y"]))
    for s, t in zip(d.edges["source"], d.edges["target"]):
        assert ranks[s] > ranks[t]  # parents above the layers they read
        assert (kinds[s], kinds[t]) in {("product", "input"), ("product", "sum"), ("sum", "product")}
    assert sum(w for s, w in zip(d.edges["source"], d.edges["weight"]) if kinds[s] == "product") > 0


def test_vector_dag_matches_dag_and_aggregates():
    root = _hclt(40, 4)
    idx = layout.VectorIndex(root)
    full = layout.vector_dag(idx, max_per_rank=10_000)
    assert full.num_nodes == len(root.topological())
    assert sum(full.edges["weight"]) == sum(len(v.children) for v in root.topological())
    assert all(y0 > y1 for y0, y1 in zip(full.edges["y0"], full.edges["y1"]))
    agg = layout.vector_dag(idx, max_per_rank=5)
    assert agg.info["aggregated"] and max(agg.nodes["count"]) > 1
    assert sum(agg.nodes["size"]) == sum(full.nodes["size"])  # nodes are conserved
    sub = layout.vector_dag(idx, ranks=(idx.max_rank - 1, idx.max_rank))
    assert set(sub.nodes["y"]) <= {idx.max_rank - 1, idx.max_rank}


def test_block_dag_of_sum_and_product():
    root = _hclt(8, 8)
    idx = layout.VectorIndex(root)
    sum_id = next(i for i, v in zip(idx.ids, idx.vectors) if v.kind == "sum" and v.num_nodes == 8)
    d = layout.block_dag(idx, sum_id)
    v = idx.vectors[idx.find(sum_id)]
    assert d.info["num_block_edges"] == v.edge_ids.shape[1]
    assert sum(d.edges["weight"]) == v.edge_ids.shape[1]
    prod_id = next(i for i, v in zip(idx.ids, idx.vectors) if v.kind == "product")
    p = layout.block_dag(idx, prod_id, max_blocks=2)
    assert max(p.nodes["count"]) >= 1 and len({n for n in p.nodes["id"] if n.startswith("p")}) <= 2
    with pytest.raises(KeyError):
        layout.block_dag(idx, "v99999")


def test_layout_of_a_large_circuit_is_fast():
    root = _hclt(256, 64)  # ~41K nodes; benchmarks/workbench_metrics.py measures ~250K
    t0 = time.perf_counter()
    plan, _, _ = compile_plan(root)
    idx = layout.VectorIndex(root)
    layout.layer_overview(plan)
    d = layout.vector_dag(idx)
    layout.block_dag(idx, idx.ids[-2])
    assert time.perf_counter() - t0 < 2.0
    assert d.num_nodes <= 64 * (idx.max_rank + 1)


def test_labels_are_short_and_only_on_uncrowded_ranks():
    """Node-vector labels ran into each other: a rank with more glyphs than MAX_LABELS_PER_ROW gets
    none, the others get short labels (the vector id); the full text stays in the hover."""
    import pandas as pd

    from workbench.views.circuit_view import MAX_LABELS_PER_ROW, labelled

    crowded, sparse = MAX_LABELS_PER_ROW + 1, 3
    nodes = [
        {"id": f"v{i}", "x": float(i), "y": 0.0, "label": f"input vector v{i}: 4 nodes, block 4 var {i}"}
        for i in range(crowded)
    ] + [
        {"id": f"v{100 + i}", "x": float(i), "y": 1.0, "label": f"sum vector v{100 + i}: 8 nodes, block 4"}
        for i in range(sparse)
    ]
    d = layout.Drawing("vectors", {k: [n[k] for n in nodes] for k in nodes[0]})
    shown = labelled(d, pd.DataFrame(d.nodes))
    assert list(shown["short"]) == ["v100", "v101", "v102"]
    blocks = layout.Drawing(
        "blocks",
        {"id": ["p0", "c0"], "x": [0.0, 0.0], "y": [1.0, 0.0], "label": ["v3 block 0", "child block 0"]},
    )
    assert list(labelled(blocks, pd.DataFrame(blocks.nodes))["short"]) == ["block 0"]
