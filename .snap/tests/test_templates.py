"""The one spec -> circuit translator: the CLI and the workbench build the same circuit for a request."""

import pytest

from engine import dists
from engine.cli import build_structure
from engine.data import load_dataset
from engine.nodes import CircuitError
from engine.structures.templates import build_template, input_dist
from workbench.services import circuits


def _signature(root) -> list[tuple]:
    """Kinds, sizes, variables, input families and child structure in topological order."""
    order = root.topological()
    index = {v.uid: i for i, v in enumerate(order)}
    return [
        (
            v.kind,
            v.num_nodes,
            getattr(v, "var", None),
            type(getattr(v, "dist", None)).__name__,
            tuple(index[c.uid] for c in v.children),
        )
        for v in order
    ]


@pytest.fixture(scope="module")
def nltcs():
    return load_dataset("nltcs")


@pytest.mark.parametrize("template", ["hclt", "pd", "rat_spn", "hmm"])
def test_cli_and_workbench_build_the_same_circuit(template, nltcs):
    ds = load_dataset("digits") if template == "pd" else nltcs  # PD needs a square grid (digits: 8x8)
    cli_root = build_structure(template, ds, 4, 0)
    spec = {"source": "template", "template": template, "num_latents": 4, "seed": 0}
    result = circuits.build(spec, ds)
    assert result.ok, result.error
    assert _signature(result.root) == _signature(cli_root)


def test_auto_inputs_follow_the_data(nltcs):
    assert isinstance(input_dist("auto", dataset=nltcs), dists.Bernoulli)  # binary: one parameter a node
    digits = load_dataset("digits")
    cat = input_dist("auto", dataset=digits)
    assert isinstance(cat, dists.Categorical) and cat.num_cats == digits.num_cats
    with pytest.raises(CircuitError, match="binary"):
        input_dist("bernoulli", dataset=digits)


def test_pd_grid_is_derived_from_the_data_or_refused(nltcs):
    digits = load_dataset("digits")
    root = build_template({"template": "pd", "num_latents": 2}, digits)
    assert {v.var for v in root.topological() if v.kind == "input"} == set(range(digits.num_vars))
    with pytest.raises(CircuitError, match="not a square"):
        build_template({"template": "pd", "num_latents": 2, "num_vars": 15})
    with pytest.raises(CircuitError, match="unknown template"):
        build_template({"template": "tree"}, nltcs)
