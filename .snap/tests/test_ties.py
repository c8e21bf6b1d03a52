"""Tied parameters (issue 14 item 1): a homogeneous HMM against a float64 forward algorithm and
Baum-Welch written here, on both backends (Triton through its interpreter on CPU); parameter counts;
tied gradients against autograd on the same float64 forward algorithm; .cw round trips."""

import itertools

import numpy as np
import pytest
import torch

import engine
from engine.dists import Categorical
from engine.nodes import CircuitError, InputNodes, SumNodes, inputs, multiply, summate
from engine.structures import hmm
from tests.kernel_runner import DEVICE, OPTS


def compile_on(root, backend, block_size=None):
    if backend == "triton":
        return engine.compile(
            root, block_size=block_size, device=DEVICE, backend="triton", kernel_options=OPTS
        )
    return engine.compile(root, block_size=block_size)


def dense(s: SumNodes) -> np.ndarray:
    """A sum vector's weights as a dense float64 `[num_nodes, child nodes]` matrix."""
    bs = s.block_size
    w = np.zeros((s.num_nodes, sum(c.num_nodes for c in s.children)))
    p = s.params.double().numpy()
    for e, (i, j) in enumerate(s.edge_ids.T):
        w[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs] = p[e]
    return w


def hmm_tables(root):
    """(pi [L], A [L, L], B [L, K]) of a homogeneous HMM built by `hmm`, after checking that every
    tied copy holds its source's values."""
    vs = root.topological()
    sums = [v for v in vs if isinstance(v, SumNodes) and v is not root]
    ins = [v for v in vs if isinstance(v, InputNodes)]
    a_src = [v for v in sums if v.tied_to is None]
    b_src = [v for v in ins if v.tied_to is None]
    assert len(a_src) <= 1 and len(b_src) == 1  # one transition and one emission set
    for v in sums + ins:
        src = v.tied_to or v
        assert torch.equal(v.params, src.params)
    pi = dense(root)[0]
    a = dense(a_src[0]) if a_src else np.zeros((len(pi), len(pi)))
    return pi, a, b_src[0].params.double().numpy()


def forward_loglik(pi, a, b, x: np.ndarray) -> np.ndarray:
    """log p(x) per row of `x: [N, T]` by the forward algorithm, float64."""
    alpha = pi[None] * b[:, x[:, 0]].T
    for t in range(1, x.shape[1]):
        alpha = (alpha @ a) * b[:, x[:, t]].T
    return np.log(alpha.sum(1))


def baum_welch(pi, a, b, x, step, pseudo):
    """One Baum-Welch update with counts summed over time and rows (float64), blended with `step` and
    pseudocounts spread over each row's entries, as the engine's EM defines them."""
    n, t_len = x.shape
    alphas, betas = [pi[None] * b[:, x[:, 0]].T], [np.ones((n, len(pi)))]
    for t in range(1, t_len):
        alphas.append((alphas[-1] @ a) * b[:, x[:, t]].T)
    for t in range(t_len - 2, -1, -1):
        betas.insert(0, (b[:, x[:, t + 1]].T * betas[0]) @ a.T)
    p = alphas[-1].sum(1, keepdims=True)
    gamma = [al * be / p for al, be in zip(alphas, betas)]
    pi_c = gamma[0].sum(0)
    a_c = sum(
        ((alphas[t] / p)[:, :, None] * a[None] * (b[:, x[:, t + 1]].T * betas[t + 1])[:, None, :]).sum(0)
        for t in range(t_len - 1)
    )
    b_c = np.zeros_like(b)
    for t in range(t_len):
        np.add.at(b_c.T, x[:, t], gamma[t])

    def upd(old, counts):
        c = counts + pseudo / counts.shape[-1]
        return (1 - step) * old + step * c / c.sum(-1, keepdims=True)

    new_a = upd(a, a_c) if t_len > 1 else a
    return upd(pi, pi_c), new_a, upd(b, b_c)


def all_sequences(t_len, k):
    return torch.tensor(list(itertools.product(range(k), repeat=t_len)))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("t_len,latents,emits,bs", [(3, 2, 3, None), (4, 4, 2, 2)])
def test_homogeneous_hmm_is_the_forward_algorithm_and_normalised(backend, t_len, latents, emits, bs):
    root = hmm(t_len, latents, emits, block_size=bs, homogeneous=True)
    pc = compile_on(root, backend)
    x = all_sequences(t_len, emits)
    ll = pc(x.to(pc.device)).cpu().double()
    ref = forward_loglik(*hmm_tables(pc.sync_to_nodes()), x.numpy())
    np.testing.assert_allclose(ll.numpy(), ref, atol=2e-5)
    assert abs(torch.logsumexp(ll, 0).item()) < 1e-5  # sums to 1 over all sequences


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("step,pseudo", [(1.0, 0.0), (0.5, 0.1)])
def test_tied_em_is_baum_welch_with_counts_summed_over_time(backend, step, pseudo):
    t_len, latents, emits = 4, 4, 3
    pc = compile_on(hmm(t_len, latents, emits, block_size=2, homogeneous=True), backend)
    x = torch.randint(0, emits, (40, t_len))
    for _ in range(3):  # three EM steps, each checked against Baum-Welch from the current parameters
        before = hmm_tables(pc.sync_to_nodes())
        pc.zero_flows()
        pc.accumulate_flows(x.to(pc.device))
        pc.em_step(step, pseudo)
        want = baum_welch(*before, x.numpy(), step, pseudo)
        got = hmm_tables(pc.sync_to_nodes())  # also checks every copy equals its source
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=2e-5)
        ll = pc(x.to(pc.device)).cpu().double().numpy()
        np.testing.assert_allclose(ll, forward_loglik(*got, x.numpy()), atol=2e-5)


def test_em_leaves_each_copys_own_flows_in_place():
    pc = engine.compile(hmm(4, 4, 3, homogeneous=True))
    x = torch.randint(0, 3, (20, 4))
    pc.zero_flows()
    pc.accumulate_flows(x)
    flows = pc.param_flows.clone()
    stats = [inp.stats.clone() for inp in pc.input_layers]
    pc.em_step(1.0, 0.0)
    assert torch.equal(pc.param_flows, flows)
    assert all(torch.equal(a.stats, b) for a, b in zip(pc.input_layers, stats))


def test_parameter_count_does_not_grow_with_sequence_length():
    latents, emits = 8, 5
    want = latents * emits + latents * latents + latents  # emissions, transitions, initial
    counts = [engine.compile(hmm(t, latents, emits, homogeneous=True)).num_parameters() for t in (2, 5, 17)]
    assert counts == [want] * 3
    untied = [engine.compile(hmm(t, latents, emits)).num_parameters() for t in (2, 5)]
    assert untied == [
        2 * latents * emits + latents * latents + latents,
        5 * latents * emits + 4 * latents * latents + latents,
    ]
    plan = engine.compile(hmm(5, latents, emits, homogeneous=True)).plan.to_dict()
    assert plan["num_learnable_params"] == want and plan["ties"]["num_tied_params"] > 0


def test_tied_sums_in_one_layer_take_the_summed_flows():
    """Two tied sum vectors at the same depth (one layer): EM equals the update from expected counts
    W * dlogp/dW of a float64 evaluator written here, with W one shared tensor (autograd)."""
    d = Categorical(3)
    leaves = [inputs(v, 4, d) for v in range(4)]
    s0 = summate(leaves[0], num_nodes=4, block_size=2)
    s1 = summate(leaves[1], num_nodes=4, block_size=2, tie_to=s0)
    root = summate(multiply(s0, s1, leaves[2], leaves[3]), num_nodes=1)
    pc = engine.compile(root)
    x = torch.randint(0, 3, (30, 4))
    w = torch.tensor(dense(s0), requires_grad=True)
    r = torch.tensor(dense(root)[0])
    b = [v.params.double() for v in leaves]
    mix = [w @ b[k][:, x[:, k]] for k in (0, 1)]  # [4, N] each
    lik = (r[:, None] * mix[0] * mix[1] * b[2][:, x[:, 2]] * b[3][:, x[:, 3]]).sum(0)
    lik.log().sum().backward()
    counts = w.detach() * w.grad  # expected counts over both copies
    pc.zero_flows()
    pc.accumulate_flows(x)
    pc.em_step(1.0, 0.2)
    pc.sync_to_nodes()
    c = counts + 0.2 / 4
    np.testing.assert_allclose(dense(s0), (c / c.sum(1, keepdim=True)).numpy(), atol=2e-6)
    assert torch.equal(s1.params, s0.params)


def test_tie_checks_shapes_and_families():
    d = Categorical(3)
    a = inputs(0, 4, d)
    with pytest.raises(CircuitError, match="shapes or families differ"):
        inputs(1, 4, Categorical(4), tie_to=a)
    with pytest.raises(CircuitError, match="shapes or families differ"):
        inputs(1, 2, d, tie_to=a)
    s = summate(a, num_nodes=4)
    with pytest.raises(CircuitError, match="shapes or families differ"):
        summate(inputs(1, 8, d), num_nodes=4, tie_to=s)  # children of another size
    with pytest.raises(CircuitError, match="edge_ids"):
        summate(a, inputs(1, 4, d), num_nodes=4).tie_to(
            summate(a, inputs(2, 4, d), num_nodes=4, edge_ids=[[0], [1]])
        )
    with pytest.raises(CircuitError, match="only sum and input"):
        multiply(a).tie_to(multiply(inputs(1, 4, d)))


def test_cw_round_trip_keeps_ties(tmp_path):
    pc = engine.compile(hmm(5, 4, 3, homogeneous=True))
    x = torch.randint(0, 3, (30, 5))
    for _ in range(2):
        pc.zero_flows()
        pc.accumulate_flows(x)
        pc.em_step(1.0, 0.1)
    path = tmp_path / "h.cw"
    engine.save(pc, path)
    back = engine.load(path)
    assert back.num_parameters() == pc.num_parameters()
    assert back.plan.ties.to_dict() == pc.plan.ties.to_dict()
    torch.testing.assert_close(back(x), pc(x), rtol=0, atol=0)
    for p in (pc, back):
        p.zero_flows()
        p.accumulate_flows(x)
        p.em_step(1.0, 0.1)
    torch.testing.assert_close(back(x), pc(x), rtol=0, atol=0)
    root = back.sync_to_nodes()
    assert sum(v.tied_to is not None for v in root.topological()) == 4 + 3  # emission and transition copies


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tied_gradients_match_autograd_of_the_forward_algorithm(backend):
    from engine.gradients import gradients

    t_len, latents, emits = 4, 2, 3
    pc = compile_on(hmm(t_len, latents, emits, homogeneous=True), backend)
    x = torch.randint(0, emits, (25, t_len))
    g = gradients(pc, x.to(pc.device), wrt="probs")
    root = pc.sync_to_nodes()
    pi, a, b = (torch.tensor(t, requires_grad=True) for t in hmm_tables(root))
    alpha = pi[None] * b[:, x[:, 0]].T
    for t in range(1, t_len):
        alpha = (alpha @ a) * b[:, x[:, t]].T
    alpha.sum(1).log().sum().backward()
    emit = pc.input_layers[0]
    for i in range(emit.num_nodes // latents):  # every emission copy holds the tied total
        np.testing.assert_allclose(
            g.input_grads[0][i * latents : (i + 1) * latents].cpu().double().numpy(),
            b.grad.numpy(),
            rtol=1e-4,
            atol=1e-4,
        )
    flat = g.sum_grad.cpu().double().numpy()
    trans = [v for v in root.topological() if isinstance(v, SumNodes) and v is not root]
    assert len(trans) == t_len - 1
    for v in trans:  # every transition copy holds the tied total
        np.testing.assert_allclose(flat[dense_slots(pc, v)], a.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(flat[dense_slots(pc, root)][0], pi.grad.numpy(), rtol=1e-4, atol=1e-4)


def dense_slots(pc, s: SumNodes) -> np.ndarray:
    """Flat parameter slot of each weight of `s` as a dense `[num_nodes, child nodes]` matrix
    (compiled without a block size, so each block edge is one tile)."""
    from engine.compiler.ties import sum_slots

    tiles, bs = sum_slots(pc.plan.layers, s), s.block_size
    out = np.zeros((s.num_nodes, sum(c.num_nodes for c in s.children)), dtype=np.int64)
    for e, (i, j) in enumerate(s.edge_ids.T):
        out[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs] = tiles[e]
    return out


def test_prune_and_grow_keep_ties():
    from engine.surgery import grow, prune

    pc = engine.compile(hmm(5, 4, 3, block_size=2, homogeneous=True))
    x = torch.randint(0, 3, (40, 5))
    want = pc.num_parameters()
    pruned = engine.compile(prune(pc, 0.5, x))
    assert pruned.num_parameters() < want  # edges went, and the tied set lost them together
    assert pruned.plan.ties.to_dict()["num_tied_sum_params"] > 0
    grown = engine.compile(grow(pc, noise=0.2, seed=0))
    assert grown.num_parameters() == 8 * 3 + 8 * 8 + 8  # twice the states: emissions, transitions, root
    for p in (pruned, grown):  # still normalised and still tied after EM
        p.zero_flows()
        p.accumulate_flows(x)
        p.em_step(1.0, 0.1)
        assert abs(torch.logsumexp(p(all_sequences(5, 3)).double(), 0).item()) < 1e-4
        check_copies_equal(p.sync_to_nodes())


def check_copies_equal(root) -> None:
    """Every tied copy holds its source's values."""
    n = 0
    for v in root.topological():
        if v.tied_to is not None:
            assert torch.equal(v.params, v.tied_to.params)
            n += 1
    assert n > 0


@pytest.mark.parametrize("bad", ["self", "product", "missing"])
def test_cw_reader_refuses_a_bad_tie(tmp_path, bad):
    import json
    import zipfile

    from engine.io.limits import FileFormatError

    path = tmp_path / "h.cw"
    engine.save(hmm(3, 2, 3, homogeneous=True), path)
    with zipfile.ZipFile(path) as zf:
        doc, arrays = json.loads(zf.read("circuit.json")), zf.read("arrays.safetensors")
    copy_ = next(v for v in doc["vectors"] if "tie" in v)
    prod = next(v["id"] for v in doc["vectors"] if v["kind"] == "product")
    copy_["tie"] = {"self": copy_["id"], "product": prod, "missing": 999}[bad]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("circuit.json", json.dumps(doc))
        zf.writestr("arrays.safetensors", arrays)
    with pytest.raises(FileFormatError, match="tie"):
        engine.load(path)


def test_cli_plan_counts_a_homogeneous_hmm_once(capsys):
    import json

    from engine.cli import main

    counts = {}
    for flag in ([], ["--homogeneous"]):
        assert main(["plan", "--structure", "hmm", "--data", "nltcs", "--latents", "4", *flag]) == 0
        counts[bool(flag)] = json.loads(capsys.readouterr().out)["num_learnable_params"]
    assert counts[True] == 4 * 2 + 4 * 4 + 4 and counts[False] == 16 * 4 * 2 + 15 * 4 * 4 + 4
    assert main(["plan", "--structure", "hclt", "--data", "nltcs", "--homogeneous"]) == 2
    assert "--homogeneous applies to --structure hmm only" in capsys.readouterr().err


def test_deepcopy_of_a_long_tied_chain_keeps_ties_without_recursion():
    import copy

    root = hmm(300, 4, 3, homogeneous=True)  # a chain far deeper than Python's recursion limit
    twin = copy.deepcopy(root)
    a, b = root.topological(), twin.topological()
    assert len(a) == len(b) and all(u.uid == v.uid and u is not v for u, v in zip(a, b))
    srcs = {id(v.tied_to) for v in b if v.tied_to is not None}
    assert srcs <= {id(v) for v in b} and len(srcs) == 2  # ties point inside the copy: one per set
    assert all(v.params is v.tied_to.params for v in b if v.tied_to is not None)  # still one tensor
    x = torch.randint(0, 3, (8, 300))
    torch.testing.assert_close(engine.compile(twin)(x), engine.compile(root)(x), rtol=0, atol=0)


def test_tied_totals_are_one_fixed_order_sum_of_source_and_copies():
    """A tied set's total is a plain sum over [source, copies...] (no repeated-index index_add_, whose
    CUDA atomics made data-parallel ranks' homogeneous HMMs drift apart by ~1e-7 per run)."""
    import numpy as np

    from engine.executor.ties import TieIndex

    src = np.array([0, 0, 3, 0, 3])
    dst = np.array([5, 6, 7, 8, 9])
    t = TieIndex.of(src, dst)
    members = {int(r[0]): sorted(int(v) for v, m in zip(r, k) if m) for r, k in zip(t.members, t.mask)}
    assert members == {0: [0, 5, 6, 8], 3: [3, 7, 9]}
    flows = torch.randn(10, 3, dtype=torch.float64)
    want = flows.clone()
    want[0] = flows[0] + flows[5] + flows[6] + flows[8]
    want[3] = flows[3] + flows[7] + flows[9]
    own = t.gather(flows)
    torch.testing.assert_close(flows, want, rtol=0, atol=1e-12)
    assert own.shape == (2, 3)


def test_ties_never_form_a_cycle_and_fixed_leaves_are_not_learnable():
    import engine
    from engine.dists import Categorical, Indicator
    from engine.nodes import CircuitError

    v = [engine.inputs(i, 2, Categorical(3)) for i in range(3)]
    v[0].tie_to(v[1])
    v[1].tie_to(v[2])
    with pytest.raises(CircuitError, match="itself"):
        v[2].tie_to(v[0])  # v0 -> v1 -> v2 already: closing the loop is refused at once
    a, b = (
        engine.inputs(0, 2, Indicator(2), params=[[0.0], [1.0]]),
        engine.inputs(1, 2, Indicator(2), params=[[0.0], [1.0]]),
    )
    pc = engine.compile(engine.summate(engine.multiply(a, b), num_nodes=1))
    assert pc.num_parameters() == 2  # the two sum weights; indicator values are fixed, not learnt
