"""Compilation: node-vector DAG -> `LayerPlan`, as a short pipeline of named passes.

Each pass is a function of the previous pass's result; `on_pass(name, seconds)` is called after each
one (timing, dumps, checks), in the spirit of xDSL's pass pipeline.
"""

from __future__ import annotations

import time
from typing import Callable

from engine.compiler import cost
from engine.compiler.ir import CircuitIR, build_ir
from engine.compiler.layout import Layout, build_layout
from engine.compiler.plan import Layer, LayerPlan, Partition, Step
from engine.compiler.ties import build_ties
from engine.nodes import NodeVector

__all__ = [
    "compile_plan",
    "compile_circuit",
    "validate",
    "LayerPlan",
    "Layer",
    "Partition",
    "Step",
    "CircuitIR",
    "Layout",
    "DEFAULT_TOLERANCE",
]

DEFAULT_TOLERANCE = 0.25


def _check_options(block_size, tolerance) -> None:
    if block_size is not None and (int(block_size) < 1 or int(block_size) & (int(block_size) - 1)):
        raise ValueError(f"block_size must be a power of two >= 1, got {block_size}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")


def compile_plan(
    root: NodeVector,
    block_size: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    on_pass: Callable[[str, float], None] | None = None,
) -> tuple[LayerPlan, CircuitIR, Layout]:
    """Validate, normalise, lay out and partition the circuit under `root`."""
    _check_options(block_size, tolerance)
    times: dict[str, float] = {}

    def run(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        times[name] = time.perf_counter() - t0
        if on_pass is not None:
            on_pass(name, times[name])
        return out

    ir = run("validate_and_normalize", build_ir, root)
    lay = run("layout_and_partition", build_layout, ir, block_size, tolerance)
    layers = run("cost_model", lambda: [cost.annotate(layer) for layer in lay.layers])
    ties = run("ties", build_ties, layers, ir.sums, ir.inputs)
    num_input_params = sum(v.params.numel() for v in ir.inputs)
    # a tied fixed set: its copies are in ties.num_tied_params, so count only untied vectors and sources
    num_fixed = sum(v.params.numel() for v in ir.inputs if v.dist.fixed and v.tied_to is None)
    plan = LayerPlan(
        layers=layers,
        num_vars=ir.num_vars,
        num_node_rows=lay.num_node_rows,
        num_element_rows=lay.num_element_rows,
        num_params=lay.num_params,
        num_input_params=num_input_params,
        num_fixed_input_params=num_fixed,
        root_row=lay.node_row[ir.root.uid],
        block_size=block_size,
        tolerance=tolerance,
        compile_seconds=sum(times.values()),
        pass_seconds=times,
        node_row=dict(lay.node_row),
        ties=ties,
    )
    return plan, ir, lay


def validate(root: NodeVector) -> None:
    """Raise CircuitError if the circuit under `root` cannot be compiled (not smooth, not
    decomposable, a root of several nodes), without laying it out."""
    build_ir(root)


def compile_circuit(
    root: NodeVector, block_size: int | None = None, tolerance: float = DEFAULT_TOLERANCE
) -> tuple[LayerPlan, dict[int, NodeVector]]:
    """The plan and every node vector it refers to by uid (including a one-child sum that
    `compile_plan` puts over a root that is not one sum node): all an executor needs."""
    plan, ir, _ = compile_plan(root, block_size, tolerance)
    return plan, {v.uid: v for v in ir.root.topological()}
