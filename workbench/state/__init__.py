"""Per-session state: plain `param.Parameterized` classes, no widgets (views bind to them)."""

from workbench.state.circuit import BuildState, CircuitSpec, DataState, GraphSpec
from workbench.state.plan import PlanState
from workbench.state.runs import CompareState, RunState
from workbench.state.session import SessionState, TrainingSettings

__all__ = [
    "BuildState",
    "CircuitSpec",
    "CompareState",
    "DataState",
    "GraphSpec",
    "PlanState",
    "RunState",
    "SessionState",
    "TrainingSettings",
]
