"""The flows service against an independent float64 reference: autograd through a vector-by-vector
evaluator (`tests.test_structures.reference_log_prob`), on random data.

The flow of edge (n, c) summed over the batch is w_nc * d(sum_x log p(x)) / d w_nc, so parameter
flows, flow mass and the EM update can be checked without the engine's flows pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.nodes import SumNodes
from tests.helpers import irregular, tiny_tree
from tests.test_structures import reference_log_prob
from workbench.services.flows import step_flows


def reference_edge_flows(root, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """uid of each sum vector -> its parameter flows [E, bs, bs] (float64, summed over x)."""
    sums = [v for v in root.topological() if isinstance(v, SumNodes)]
    saved = {v.uid: v.params for v in sums}
    try:
        for v in sums:
            v.params = v.params.detach().double().requires_grad_()
        reference_log_prob(root, x).sum().backward()
        return {v.uid: (v.params.grad * v.params).detach() for v in sums}
    finally:
        for v in sums:
            v.params = saved[v.uid]


@pytest.mark.parametrize("make, block_size", [(tiny_tree, None), (irregular, None), (irregular, 2)])
def test_flows_match_autograd_reference(make, block_size):
    torch.manual_seed(0)
    root = make()
    x = torch.randint(0, 3, (64, 4 if make is tiny_tree else 5))
    ref = reference_edge_flows(root, x)
    s = step_flows(root, x.numpy(), block_size, 0.5, step_size=0.5, pseudocount=0.1)
    assert s.batch_size == 64
    assert s.log_likelihood == pytest.approx(float(reference_log_prob(root, x).mean()), abs=1e-4)
    # flow is conserved: the sum layers' flow mass is every sum edge's flow, per example
    sum_mass = sum(la["mass"] for la in s.layers if la["kind"] == "sum")
    assert sum_mass == pytest.approx(sum(float(f.sum()) for f in ref.values()) / 64, rel=1e-4)
    root_layer = s.layers[-1]
    assert root_layer["kind"] == "sum" and root_layer["mass"] == pytest.approx(1.0, abs=1e-5)
    # the root's EM update: flows as the reference's, new weights by the EM formula in float64
    u = s.update(root_layer["layer"], 0)
    ref_flow = ref[root.uid].reshape(-1).numpy()
    ref_flow = ref_flow[root.params.reshape(-1).numpy() > 0]
    np.testing.assert_allclose(np.sort(u.flow), np.sort(ref_flow), rtol=1e-4, atol=1e-6)
    assert u.node_flow == pytest.approx(64.0, rel=1e-5) and u.flow.sum() == pytest.approx(64.0, rel=1e-4)
    counts = u.flow + 0.1 / u.flow.size
    expected = 0.5 * u.old + 0.5 * counts / counts.sum()
    np.testing.assert_allclose(u.new, expected, rtol=1e-5, atol=1e-7)
    assert u.new.sum() == pytest.approx(1.0, abs=1e-5)


def test_flow_mass_per_layer_counts_the_scopes_a_layer_splits_the_variables_into():
    """tiny_tree: ((x0 x1) (x2 x3)); 4 input scopes, 2 products and sums below, 1 at the top."""
    torch.manual_seed(1)
    x = torch.randint(0, 3, (32, 4))
    s = step_flows(tiny_tree(), x.numpy())
    mass = {(la["kind"], la["depth"]): round(la["mass"], 4) for la in s.layers}
    assert mass == {
        ("input", 0): 4.0,
        ("product", 1): 2.0,
        ("sum", 1): 2.0,
        ("product", 2): 1.0,
        ("sum", 2): 1.0,
    }
    assert all(isinstance(la["mass"], float) for la in s.layers)  # plain data for the view
