"""Structure surgery (engine.surgery) checked by enumeration: pruned and grown circuits stay
normalised, grow without noise keeps the distribution, pruning keeps the highest-flow block edges,
and several heads evaluated in one pass equal each head compiled on its own."""

import copy

import numpy as np
import pytest
import torch

import engine
from engine.nodes import SumNodes
from engine.surgery import edge_flows, grow, head_log_probs, multi_root, prune
from tests.helpers import all_assignments, irregular, tiny_tree


def enumerate_ll(root, num_vars=None, num_cats=3):
    pc = engine.compile(root)
    x = all_assignments(num_vars or pc.num_vars, num_cats)
    with torch.no_grad():
        return pc(x).double()


def num_block_edges(root):
    return sum(v.edge_ids.shape[1] for v in root.topological() if isinstance(v, SumNodes))


def sample_data(root, n=300, seed=0):
    torch.manual_seed(seed)
    return engine.queries.sample(engine.compile(root), n)


@pytest.mark.parametrize("make", [lambda: tiny_tree(latents=8, block_size=2), irregular])
@pytest.mark.parametrize("keep", [0.3, 0.6])
def test_prune_keeps_a_normalised_circuit_with_fewer_edges(make, keep):
    torch.manual_seed(0)
    root = make()
    before = enumerate_ll(root)
    x = sample_data(root)
    pruned = prune(root, keep, x)
    total = num_block_edges(root)
    assert num_block_edges(pruned) < total
    assert num_block_edges(pruned) >= int(np.ceil(keep * total))
    ll = enumerate_ll(pruned)
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(enumerate_ll(root), before, rtol=0, atol=0)  # input circuit untouched


def test_prune_keeps_the_highest_flow_edges():
    torch.manual_seed(1)
    root = tiny_tree(latents=8, block_size=2)
    x = sample_data(root)
    pc = engine.compile(copy.deepcopy(root))
    pc.accumulate_flows(x)
    scores = {uid: f.double().sum((1, 2)) for uid, f in edge_flows(pc).items()}
    sums = [v for v in pc.root.topological() if isinstance(v, SumNodes)]
    pruned = prune(pc, 0.5)  # uses the flows pc accumulated
    new_sums = [v for v in pruned.topological() if isinstance(v, SumNodes)]
    kept_free, dropped, num_kept, num_total = [], [], 0, 0
    for old, new in zip(sums, new_sums):
        kept_pairs = {tuple(e) for e in new.edge_ids.T.tolist()}
        sc = scores[old.uid].numpy()
        best = {}  # node block -> index of its highest-flow edge (always kept)
        for e, i in enumerate(old.edge_ids[0].tolist()):
            if i not in best or sc[e] > sc[best[i]]:
                best[i] = e
        for e, (i, j) in enumerate(old.edge_ids.T.tolist()):
            num_total += 1
            if (i, j) in kept_pairs:
                num_kept += 1
                if best[i] != e:
                    kept_free.append(sc[e])
            else:
                dropped.append(sc[e])
    assert dropped and num_kept >= int(np.ceil(0.5 * num_total))
    assert min(kept_free) >= max(dropped)  # beyond each block's best edge, the top scores are kept


def test_prune_with_everything_kept_is_the_same_distribution():
    torch.manual_seed(2)
    root = irregular()
    x = sample_data(root)
    torch.testing.assert_close(enumerate_ll(prune(root, 1.0, x)), enumerate_ll(root), atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [lambda: tiny_tree(latents=4, block_size=2), irregular])
def test_grow_without_noise_keeps_the_distribution(make):
    torch.manual_seed(3)
    root = make()
    grown = grow(root, noise=0.0)
    torch.testing.assert_close(enumerate_ll(grown), enumerate_ll(root), atol=1e-5, rtol=0)
    inner = [v for v in root.topological() if v is not root]
    assert sum(v.num_nodes for v in grown.topological()) >= 2 * sum(v.num_nodes for v in inner)


def test_grow_with_noise_is_normalised_and_different():
    torch.manual_seed(4)
    root = tiny_tree(latents=4, block_size=2)
    ll = enumerate_ll(grow(root, noise=0.3, seed=0))
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-4)
    assert (ll - enumerate_ll(root)).abs().max() > 1e-3


def test_grow_then_prune_round():
    """The training-loop use: grow, a few EM steps, prune back; stays normalised."""
    torch.manual_seed(5)
    root = tiny_tree(latents=4, block_size=2)
    x = sample_data(root)
    pc = engine.compile(grow(root, noise=0.1, seed=1))
    for _ in range(3):
        pc.zero_flows()
        pc.accumulate_flows(x)
        pc.em_step(step_size=0.5, pseudocount=0.1)
    pruned = prune(pc, 0.5, x)
    assert enumerate_ll(pruned).exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_several_heads_in_one_pass_equal_each_head_alone():
    torch.manual_seed(6)
    ins = [engine.inputs(v, 4, engine.dists.Categorical(3)) for v in range(3)]
    a = engine.summate(engine.multiply(*ins), num_nodes=3, block_size=1)
    b = engine.summate(
        engine.multiply(engine.summate(engine.multiply(ins[0], ins[1]), num_nodes=4), ins[2]),
        num_nodes=2,
        block_size=2,
    )
    pc = engine.compile(multi_root(a, b))
    x = all_assignments(3, 3)
    heads = head_log_probs(pc, [a, b], x)  # [27, 5], one forward pass
    assert heads.shape == (27, 5)
    for k, (h, j) in enumerate([(a, 0), (a, 1), (a, 2), (b, 0), (b, 1)]):
        alone = engine.summate(h, num_nodes=1, block_size=1, edge_ids=[[0], [j]], params=[[[1.0]]])
        torch.testing.assert_close(heads[:, k], engine.compile(alone)(x), atol=1e-5, rtol=0)
    assert torch.allclose(heads.exp().sum(0), torch.ones(5), atol=1e-4)  # every head is normalised
