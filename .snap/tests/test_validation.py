"""Bad circuits and bad data raise ValueError subclasses whose messages name the problem."""

import numpy as np
import pytest
import torch

import engine
from engine.dists import Bernoulli, Categorical
from tests.helpers import tiny_tree


def test_not_decomposable():
    a, b = engine.inputs(0, 2, Categorical(3)), engine.inputs(0, 2, Categorical(3))
    with pytest.raises(ValueError, match="not decomposable"):
        engine.compile(engine.summate(engine.multiply(a, b), num_nodes=1))


def test_not_smooth():
    a, b = engine.inputs(0, 2, Categorical(3)), engine.inputs(1, 2, Categorical(3))
    with pytest.raises(ValueError, match="not smooth"):
        engine.compile(engine.summate(a, b, num_nodes=1))


def test_root_must_be_one_node_and_options_checked():
    with pytest.raises(ValueError, match="exactly one node"):
        engine.compile(engine.inputs(0, 4, Categorical(3)))
    with pytest.raises(ValueError, match="power of two"):
        engine.compile(tiny_tree(), block_size=3)
    with pytest.raises(ValueError, match="tolerance"):
        engine.compile(tiny_tree(), tolerance=-1)


def test_bad_node_arguments():
    a = engine.inputs(0, 4, Categorical(3))
    with pytest.raises(ValueError, match="out of range"):
        engine.summate(a, num_nodes=4, edge_ids=np.array([[0], [9]]), block_size=4)
    with pytest.raises(ValueError, match="equal num_nodes"):
        engine.multiply(a, engine.inputs(1, 2, Categorical(3)))
    with pytest.raises(ValueError, match="num_cats"):
        Categorical(1)
    with pytest.raises(ValueError, match="sum to 1"):
        engine.inputs(0, 1, Categorical(2), params=[[0.9, 0.9]])


@pytest.mark.parametrize(
    "x, missing, match",
    [
        (torch.tensor([[0, 1, 2, 3]]), None, "value 3 out of range"),
        (torch.tensor([[0, 1, -1, 0]]), None, "out of range"),
        (torch.tensor([[0, 1, 2]]), None, "shape"),
        (torch.tensor([0, 1, 2, 0]), None, "shape"),
        (torch.tensor([[0.0, 1.0, float("nan"), 0.0]]), None, "NaN"),
        (torch.tensor([[0.0, 1.5, 0.0, 0.0]]), None, "out of range"),
        (torch.tensor([[0, 1, 2, 0]]), torch.tensor([[1, 0, 0, 0]]), "missing must be a bool"),
    ],
)
def test_bad_data(x, missing, match):
    pc = engine.compile(tiny_tree())
    with pytest.raises(ValueError, match=match):
        pc(x, missing)


def test_nan_allowed_where_missing():
    pc = engine.compile(tiny_tree())
    x = torch.tensor([[0.0, float("nan"), 2.0, 1.0]])
    m = torch.tensor([[False, True, False, False]])
    assert torch.isfinite(pc(x, m)).all()


def test_bernoulli_range():
    root = engine.summate(engine.inputs(0, 2, Bernoulli()), num_nodes=1)
    with pytest.raises(ValueError, match="Bernoulli"):
        engine.compile(root)(torch.tensor([[2]]))


def test_em_arguments():
    pc = engine.compile(tiny_tree())
    with pytest.raises(ValueError, match="step_size"):
        pc.em_step(0.0)
    with pytest.raises(ValueError, match="pseudocount"):
        pc.em_step(1.0, -1.0)


def test_unavailable_or_unknown_device():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            engine.compile(tiny_tree(), device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        engine.compile(tiny_tree(), device="gpu0")
    with pytest.raises(ValueError, match="backend"):
        engine.compile(tiny_tree(), backend="jax")
