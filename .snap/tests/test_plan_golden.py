"""Golden file: the layer plan of a small fixed circuit, side by side with its source.

Regenerate after an intended change with `CW_UPDATE_GOLDEN=1 scripts/test tests/test_plan_golden.py`
and review the diff: it shows exactly how layering, partitioning and cost estimates moved.
"""

import json
import os
from pathlib import Path

import engine
from tests.helpers import irregular, tiny_tree

GOLDEN = Path(__file__).parent / "golden"
VOLATILE = ("compile_seconds", "pass_seconds")


def _plan(root, **kw) -> dict:
    d = engine.compile(root, **kw).plan.to_dict(batch_size=8)
    return {k: v for k, v in d.items() if k not in VOLATILE}


def _check(name: str, plan: dict) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(plan, indent=1, sort_keys=True) + "\n"
    if os.environ.get("CW_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"plan of {name} changed; see the module docstring"


def test_tiny_tree_plan():
    _check("tiny_tree_bs2", _plan(tiny_tree(block_size=2)))


def test_irregular_plan_with_tolerance():
    _check("irregular_tol0", _plan(irregular(), tolerance=0.0))
    _check("irregular_tol1", _plan(irregular(), tolerance=1.0))
