"""Circuit Workbench engine: block-sparse probabilistic circuits on CPU (PyTorch) and GPU (Triton).

import engine
from engine.dists import Categorical
root = engine.structures.hclt(train, num_latents=32, input_dist=Categorical(2))
pc = engine.compile(root)
log_p = pc(x)                      # [B], nats
"""

from engine import dists
from engine.circuit import CompiledCircuit, compile
from engine.nodes import CircuitError, InputNodes, NodeVector, ProdNodes, SumNodes, inputs, multiply, summate

__all__ = [
    "dists",
    "compile",
    "CompiledCircuit",
    "CircuitError",
    "NodeVector",
    "InputNodes",
    "ProdNodes",
    "SumNodes",
    "inputs",
    "multiply",
    "summate",
    "structures",
    "queries",
    "optim",
    "save",
    "load",
]


def __getattr__(name):
    # Submodules that import heavier dependencies load lazily: `engine.structures`, `engine.queries`...
    import importlib

    if name in ("structures", "queries", "optim", "data", "io"):
        return importlib.import_module(f"engine.{name}")
    if name in ("save", "load"):
        return getattr(importlib.import_module("engine.io"), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
