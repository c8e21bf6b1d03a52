"""Small circuits and brute-force references shared by the tests."""

from __future__ import annotations

import itertools

import torch

import engine
from engine.dists import Bernoulli, Categorical, Gaussian


def all_assignments(num_vars: int, num_cats: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(num_cats), repeat=num_vars)), dtype=torch.long)


def tiny_tree(num_cats=3, latents=4, block_size=None):
    """((x0 x1) (x2 x3)) with mixtures at every region: 4 variables."""
    ins = [engine.inputs(v, latents, Categorical(num_cats)) for v in range(4)]
    s01 = engine.summate(engine.multiply(ins[0], ins[1]), num_nodes=latents, block_size=block_size)
    s23 = engine.summate(engine.multiply(ins[2], ins[3]), num_nodes=latents, block_size=block_size)
    return engine.summate(engine.multiply(s01, s23), num_nodes=1)


def irregular(num_cats=3):
    """A DAG with shared vectors, products of products, sums over inputs, several block sizes and
    sparse block edges, so partitions get different widths and padding."""
    a = [engine.inputs(v, 8, Categorical(num_cats)) for v in range(5)]
    s0 = engine.summate(a[0], num_nodes=8, block_size=2)  # sum directly over inputs
    p01 = engine.multiply(s0, a[1])
    p012 = engine.multiply(p01, a[2])  # product of a product: flattened
    sparse = torch.tensor([[0, 0, 1, 2, 3, 3], [0, 3, 1, 2, 0, 3]])
    s012 = engine.summate(
        p012,
        engine.multiply(a[0], a[1], a[2]),
        num_nodes=8,
        block_size=2,
        edge_ids=torch.cat([sparse, torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])], 1),
    )
    s34 = engine.summate(engine.multiply(a[3], a[4]), num_nodes=4, block_size=4)
    top = engine.multiply(s012, engine.summate(engine.multiply(a[3], a[4]), num_nodes=8))
    top2 = engine.multiply(s012, engine.summate(s34, num_nodes=8))
    return engine.summate(top, top2, num_nodes=1)


def deterministic(num_vars=4, num_cats=3):
    """Sum over x_v's value at every level, so at most one child of each sum is non-zero."""

    def region(v):
        if v == num_vars - 1:
            return engine.inputs(v, 1, Categorical(num_cats))
        kids = []
        for k in range(num_cats):
            onehot = torch.full((1, num_cats), 0.0)
            onehot[0, k] = 1.0
            kids.append(
                engine.multiply(engine.inputs(v, 1, Categorical(num_cats), params=onehot), region(v + 1))
            )
        return engine.summate(*kids, num_nodes=1)

    return region(0)


def mixed_dists():
    """Bernoulli, Categorical and Gaussian inputs in one circuit."""
    ins = [
        engine.inputs(0, 4, Bernoulli()),
        engine.inputs(1, 4, Categorical(3)),
        engine.inputs(2, 4, Gaussian()),
    ]
    return engine.summate(engine.multiply(*ins), num_nodes=1)


def reference_probs(root, x: torch.Tensor) -> torch.Tensor:
    """p(x) `[B]` in float64 by evaluating every node vector on every row (Categorical and Bernoulli
    leaves; no log space, so a zero probability is exactly 0)."""
    val = {}
    x = torch.as_tensor(x).long()
    for v in root.topological():
        if v.kind == "input":
            p = v.params.double()
            table = torch.cat([1 - p, p], 1) if v.dist.name == "bernoulli" else p  # [n, K]
            val[v.uid] = table[:, x[:, v.var]].T  # [B, n]
        elif v.kind == "product":
            e = torch.as_tensor(v.node_edges())
            out = torch.ones(x.shape[0], v.num_nodes, dtype=torch.float64)
            for k, c in enumerate(v.children):
                out = out * val[c.uid][:, e[:, k]]
            val[v.uid] = out
        else:
            ch = torch.cat([val[c.uid] for c in v.children], 1)  # [B, total child nodes]
            bs, w = v.block_size, torch.zeros(v.num_nodes, ch.shape[1], dtype=torch.float64)
            for j, (nb, cb) in enumerate(v.edge_ids.T.tolist()):
                w[nb * bs : (nb + 1) * bs, cb * bs : (cb + 1) * bs] = v.params[j].double()
            val[v.uid] = ch @ w.T
    return val[root.uid][:, 0]


def fail_on_call(real, n: int, message: str = "launch failed"):
    """`real` wrapped to raise RuntimeError(message) on its n-th call (a launch failing mid-pass);
    returns (wrapper, calls), `calls["n"]` counting the calls made."""
    calls = {"n": 0}

    def wrapper(*args):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError(message)
        return real(*args)

    return wrapper, calls
