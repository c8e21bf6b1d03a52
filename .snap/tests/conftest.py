"""Test-wide setup: Triton's interpreter on CPU-only machines, `gpu` skips, per-test seeds.

Pytest imports this file before any test module, so the environment is set before any module
that defines Triton kernels is imported (Triton reads TRITON_INTERPRET when kernels are defined).
"""

import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu`-marked tests when no CUDA device is present, so CPU runs stay green and honest."""
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _poison_step_buffers(monkeypatch) -> None:
    """Uninitialised step buffers filled with NaN: a kernel or op reading a row nobody wrote fails."""
    import engine.circuit

    monkeypatch.setattr(engine.circuit, "POISON_SCRATCH", True)


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Seed Python, NumPy and torch before each test so any failure reproduces on its own."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
