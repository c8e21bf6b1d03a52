"""The layer plan is the one contract between the compiler and the executors (issue 10): immutable,
the only thing executors import from the compiler, walked by one traversal everywhere."""

import ast
import dataclasses
from pathlib import Path

import pytest

import engine
from tests.helpers import irregular, tiny_tree
from tests.kernel_runner import OPTS
from workbench.services.plans import pass_order

ROOT = Path(__file__).parent.parent
COMPILER_INTERNALS = ("engine.compiler.layout", "engine.compiler.ir")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_nothing_outside_the_compiler_imports_its_internals():
    files = [
        p
        for d in ("engine", "workbench")
        for p in (ROOT / d).rglob("*.py")
        if "compiler" not in p.relative_to(ROOT).parts
    ]
    bad = {
        str(p.relative_to(ROOT)): sorted(m for m in _imports(p) if m.startswith(COMPILER_INTERNALS))
        for p in files
    }
    assert not {k: v for k, v in bad.items() if v}


def test_the_plan_is_immutable():
    plan = engine.compile(tiny_tree()).plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.layers[1].partitions[0].kernel = "mine"
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.root_row = 3


def test_backends_name_their_kernels_without_touching_the_compiled_plan():
    pc = engine.compile(irregular(), block_size=2, backend="triton", kernel_options=OPTS)
    kernels = {p["kernel"] for layer in pc.plan.to_dict()["layers"] for p in layer["partitions"]}
    assert kernels == {"product", "sum_sparse"}
    compiled = {p.kernel for layer in pc._compiled_plan.layers for p in layer.partitions}
    assert compiled == {"torch"}  # the compiler's plan names no executor
    pc.set_backend("torch")
    assert {p["kernel"] for layer in pc.plan.to_dict()["layers"] for p in layer["partitions"]} == {"torch"}


def test_one_traversal_for_the_executor_and_the_schedule():
    plan = engine.compile(irregular()).plan
    order = [(layer.index, p) for layer, p in pass_order(plan)]
    assert order == [(s.layer.index, s.pass_name) for s in plan.steps()]
    kinds = [(s.layer.kind, s.pass_name) for s in plan.backward_steps(inputs=False)]
    assert kinds[:3] == [("product", "recompute"), ("sum", "backward"), ("product", "backward")]
    assert len(plan.forward_steps()) == len(plan.layers)


def test_profiled_passes_follow_the_traversal():
    pc = engine.compile(tiny_tree())
    x = engine.queries.sample(pc, 4)
    prof = pc.profile(True, every=1)
    pc.accumulate_flows(x)
    events = [(e["layer"], e["pass"]) for e in prof.collect(block=True) if e["type"] == "layer_time"]
    assert events == [(s.layer.index, s.pass_name) for s in pc.plan.steps()]
