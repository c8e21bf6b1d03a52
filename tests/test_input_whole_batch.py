"""`KernelOptions.input_whole_batch`: the input forward's programs walk the whole batch for their nodes
(a node's parameter row stays in L1 instead of being fetched once per batch tile). Same arithmetic
per value: bit-identical to the option off, and within float32 rounding of a float64 reference."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from engine.dists import Bernoulli, Categorical, Gaussian  # noqa: E402
from engine.nodes import inputs, multiply, summate  # noqa: E402
from tests.kernel_runner import OPTS, data, errors, run  # noqa: E402
from tests.test_param_split import CASES  # noqa: E402

WHOLE = dataclasses.replace(OPTS, input_whole_batch=True)


def cases():
    out = {name: CASES[name]() for name in ("hclt", "pd")}
    dists = [Bernoulli(), Bernoulli(), Gaussian(), Gaussian()]
    x = [inputs(v, 16, d) for v, d in enumerate(dists)]
    left = summate(multiply(x[0], x[1]), num_nodes=16, block_size=16)
    right = summate(multiply(x[2], x[3]), num_nodes=16, block_size=16)
    out["mixed"] = (summate(multiply(left, right), num_nodes=1), dists)
    return out


@pytest.mark.parametrize("name", ["hclt", "pd", "mixed"])
def test_whole_batch_forward_matches_tiles_and_float64(name):
    root, dists = cases()[name]
    torch.manual_seed(3)
    x, m = data(dists, 40)  # 40 columns: three batch tiles of 16, the last one partial
    if isinstance(dists[0], Categorical):
        x = x.long()
    _, tiles = run(root, x, m, "triton", OPTS)
    _, whole = run(root, x, m, "triton", WHOLE)
    for k in tiles:
        assert torch.equal(tiles[k], whole[k]), k
    _, err = errors(root, x, m, WHOLE, ref_dtype=torch.float64)
    assert max(err.values()) < 2e-5, err
