"""The Build tab builds a homogeneous HMM (issue 14): a checkbox on the HMM template, carried by the
spec to the engine's template translator; its parameter count does not grow with the data's length."""

import panel as pn

import engine
from engine.structures.templates import build_template
from workbench.state import BuildState
from workbench.state.circuit import CircuitSpec


def test_build_tab_has_a_homogeneous_checkbox_that_ties_the_hmm():
    from workbench.views.builder import BuilderView

    b = BuildState()
    view = BuilderView(build=b)
    view.template.value = "HMM"
    assert b.template.template == "hmm"
    # a one-box group: its word is a <label> around the box, so clicking the word ticks it
    boxes = [w for w in view.template_params.select(pn.widgets.CheckBoxGroup) if w.options == ["Homogeneous"]]
    assert len(boxes) == 1 and boxes[0].value == []
    boxes[0].value = ["Homogeneous"]
    assert b.template.homogeneous is True
    b.template.sum_density = 1.0  # dense transitions: the count below is exact
    res = b.build()
    assert res.ok, res.error
    pc = engine.compile(res.root)
    latents, ds = b.template.num_latents, b.data.load()
    want = latents * ds.num_cats + latents * latents + latents  # emissions, transitions, initial
    assert ds.num_vars > 2 and pc.num_parameters() == want
    assert pc.plan.to_dict()["ties"]["num_tied_params"] > 0


def test_homogeneous_travels_in_the_spec_and_stays_tied_when_block_sparse():
    spec = CircuitSpec(template="hmm", homogeneous=True)
    assert CircuitSpec.from_dict(spec.to_dict()).homogeneous is True
    b = BuildState()
    b.template.template, b.template.homogeneous, b.template.sum_density = "hmm", True, 0.5
    b.template.num_latents = 8
    res = b.build()
    assert res.ok, res.error
    short = {**b.template.to_dict(), "seq_length": 3}
    counts = [engine.compile(build_template({**short, "seq_length": t})).num_parameters() for t in (3, 9)]
    assert counts[0] == counts[1]  # sparse transitions: one random edge subset, shared by all steps
    dense = {**short, "sum_density": 1.0}
    assert counts[0] < engine.compile(build_template({**dense, "seq_length": 3})).num_parameters()
