"""The Indicator (fixed literal), DiscreteLogistic and Binomial families: enumeration and float64 references,
EM leaves indicators unchanged, Triton (interpreter on CPU) matches the PyTorch path."""

import copy
import math

import pytest
import torch

import engine
from engine.distributions import from_json
from engine.distributions.discrete_logistic import DiscreteLogistic
from engine.distributions.indicator import ZERO_LOG, Indicator
from engine.dists import Categorical
from tests.kernel_runner import DEVICE, compare


def indicator_circuit():
    """x0 in {0,1,2} chosen by indicators, x1 categorical given it: p = sum_k w_k [x0=k] c_k(x1)."""
    ind = engine.inputs(0, 3, Indicator(3), params=[[0.0], [1.0], [2.0]], block_size=1)
    cat = engine.inputs(1, 3, Categorical(4), block_size=1)
    return engine.summate(engine.multiply(ind, cat), num_nodes=1)


def test_indicator_circuit_sums_to_one_and_matches_enumeration():
    torch.manual_seed(0)
    root = indicator_circuit()
    pc = engine.compile(root)
    x = torch.tensor([[a, b] for a in range(3) for b in range(4)])
    ll = pc(x).double()
    w = root.params[:, 0, 0].double()
    cat = root.children[0].children[1].params.double()
    want = torch.tensor([math.log(w[a] * cat[a, b]) for a, b in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(ll, want, atol=1e-5, rtol=0)
    assert ll.exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_indicator_mismatch_is_the_zero_floor_and_missing_is_one():
    d = Indicator(3)
    params = torch.tensor([[0.0], [2.0]])
    xv = torch.tensor([[0, 2], [0, 2]])
    miss = torch.tensor([[False, False], [True, False]])
    lp = d.log_prob(params, xv, miss)
    assert lp.tolist() == [[0.0, pytest.approx(ZERO_LOG)], [0.0, 0.0]]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_em_leaves_indicators_unchanged(backend):
    torch.manual_seed(1)
    root = indicator_circuit()
    pc = engine.compile(copy.deepcopy(root), device=DEVICE if backend == "triton" else "cpu", backend=backend)
    x = torch.stack([torch.randint(0, 3, (64,)), torch.randint(0, 4, (64,))], 1).to(pc.device)
    before = [pc.input_params(i).clone() for i in range(len(pc.input_layers))]
    for _ in range(3):
        pc.zero_flows()
        pc.accumulate_flows(x)
        pc.em_step(step_size=1.0, pseudocount=0.1)
    for i, d in enumerate(pc.input_dists):
        if d.name == "indicator":
            assert torch.equal(pc.input_params(i), before[i])
        else:
            assert not torch.equal(pc.input_params(i), before[i])  # the categoricals did learn


def test_indicator_kernels_match_torch():
    torch.manual_seed(2)
    ind = engine.inputs(0, 32, Indicator(3), params=(torch.arange(32) % 3).float()[:, None])
    cat = engine.inputs(1, 32, Categorical(4))
    root = engine.summate(engine.multiply(ind, cat), num_nodes=1)
    x = torch.stack([torch.randint(0, 3, (24,)), torch.randint(0, 4, (24,))], 1)
    compare(root, x, torch.rand(x.shape) < 0.2)


def test_families_round_trip_through_the_registry(tmp_path):
    assert from_json(Indicator(5).to_json()).num_cats == 5
    d = from_json(DiscreteLogistic(256, 0.7).to_json())
    assert (d.num_cats, d.min_std) == (256, 0.7)
    root = indicator_circuit()
    engine.save(root, tmp_path / "c.cw")
    x = torch.tensor([[a, b] for a in range(3) for b in range(4)])
    torch.testing.assert_close(engine.compile(engine.load(tmp_path / "c.cw"))(x), engine.compile(root)(x))


# --------------------------------------------------------------------------------- discrete logistic


def reference_logistic_probs(mu, s, num_cats):
    """float64 p(k) straight from the CDF difference, tails to the end values: [n, num_cats]."""
    k = torch.arange(num_cats, dtype=torch.float64)
    upper = torch.sigmoid((k[None] + 0.5 - mu[:, None]) / s[:, None])
    lower = torch.sigmoid((k[None] - 0.5 - mu[:, None]) / s[:, None])
    upper[:, -1] = 1.0
    lower[:, 0] = 0.0
    return upper - lower


@pytest.mark.parametrize("num_cats", [2, 7, 256])
def test_discrete_logistic_matches_the_cdf_reference_and_sums_to_one(num_cats):
    torch.manual_seed(3)
    n = 16
    mu = torch.rand(n, dtype=torch.float64) * (num_cats + 20) - 10
    s = torch.rand(n, dtype=torch.float64) * num_cats / 4 + 0.05
    d = DiscreteLogistic(num_cats)
    probs = d.value_probs(torch.stack([mu, s], 1))
    want = reference_logistic_probs(mu, s, num_cats)
    torch.testing.assert_close(probs, want, atol=1e-9, rtol=1e-6)
    torch.testing.assert_close(probs.sum(1), torch.ones(n, dtype=torch.float64))


def logistic_circuit(num_vars=3, k=16, num_cats=256):
    ins = [engine.inputs(v, k, DiscreteLogistic(num_cats)) for v in range(num_vars)]
    return engine.summate(engine.multiply(*ins), num_nodes=1)


def test_discrete_logistic_kernels_match_torch():
    torch.manual_seed(4)
    root = logistic_circuit()
    x = torch.randint(0, 256, (24, 3))
    compare(root, x, torch.rand(x.shape) < 0.2, tol=1e-4)


def test_discrete_logistic_mixture_is_normalised_by_enumeration():
    torch.manual_seed(5)
    root = logistic_circuit(num_vars=2, k=4, num_cats=9)
    x = torch.tensor([[a, b] for a in range(9) for b in range(9)])
    assert engine.compile(root)(x).double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)


def test_discrete_logistic_em_matches_moments_on_one_leaf():
    x = torch.tensor([[10], [20], [30], [40]])
    leaf = engine.inputs(0, 1, DiscreteLogistic(256), params=[[100.0, 20.0]])
    pc = engine.compile(leaf)
    pc.zero_flows()
    pc.accumulate_flows(x)
    pc.em_step(1.0, 0.0)
    mu, s = pc.input_params(0)[0].tolist()
    assert mu == pytest.approx(25.0, rel=1e-5)
    assert s == pytest.approx(math.sqrt(125.0) * math.sqrt(3) / math.pi, rel=1e-5)


def test_discrete_logistic_training_raises_the_likelihood():
    torch.manual_seed(6)
    root = logistic_circuit(num_vars=2, k=4, num_cats=256)
    x = torch.cat([torch.randint(20, 60, (200, 2)), torch.randint(180, 230, (200, 2))])
    pc = engine.compile(root)
    first = pc(x).mean().item()
    for _ in range(5):
        pc.zero_flows()
        pc.accumulate_flows(x)
        pc.em_step(1.0, 0.1)
    assert pc(x).mean().item() > first + 0.5


def test_psdd_literals_survive_em_with_pseudocount():
    """Issue 14 item 2: after EM with the default pseudocount every PSDD literal stays exact."""
    from engine.io import read_psdd
    from tests.test_io import CIRCUITS, nltcs_rows

    root = read_psdd(CIRCUITS / "nltcs.10split.psdd")
    rows = torch.as_tensor(nltcs_rows()[:1000], dtype=torch.long)
    pc = engine.compile(root)
    before = [pc.input_params(i).clone() for i in range(len(pc.input_layers))]
    for _ in range(2):
        pc.zero_flows()
        pc.accumulate_flows(rows)
        pc.em_step(step_size=1.0, pseudocount=0.1)
    kinds = {d.name for d in pc.input_dists}
    assert "indicator" in kinds
    for i, d in enumerate(pc.input_dists):
        if d.name == "indicator":
            assert torch.equal(pc.input_params(i), before[i])
    assert torch.isfinite(pc.params).all()


# ------------------------------------------------------------------------------------------ binomial


def test_binomial_matches_the_pmf_and_em_is_the_closed_form():
    from engine.distributions.binomial import Binomial

    d = Binomial(5)
    p = torch.tensor([[0.0], [0.3], [1.0]], dtype=torch.float64)
    want = torch.tensor(
        [[math.comb(5, k) * q**k * (1 - q) ** (5 - k) for k in range(6)] for q in (0.0, 0.3, 1.0)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(d.value_probs(p), want, atol=1e-12, rtol=1e-9)
    leaf = engine.inputs(0, 1, Binomial(5), params=[[0.5]])
    pc = engine.compile(leaf)
    pc.zero_flows()
    pc.accumulate_flows(torch.tensor([[0], [2], [5], [1]]))
    pc.em_step(1.0, 0.0)
    assert pc.input_params(0).item() == pytest.approx(8 / 20)


def test_binomial_mixture_on_triton_matches_torch_and_jpc_keeps_b_lines(tmp_path):
    from engine.distributions.binomial import Binomial
    from engine.io import read_jpc, write_jpc

    torch.manual_seed(7)
    ins = [engine.inputs(v, 8, Binomial(4)) for v in range(2)]
    root = engine.summate(engine.multiply(*ins), num_nodes=1)
    x = torch.randint(0, 5, (24, 2))
    compare(root, x, torch.rand(x.shape) < 0.2)
    write_jpc(root, tmp_path / "b.jpc")
    assert sum(line.startswith("B ") for line in (tmp_path / "b.jpc").read_text().splitlines()) == 16
    grid = torch.tensor([[a, b] for a in range(5) for b in range(5)])
    torch.testing.assert_close(
        engine.compile(read_jpc(tmp_path / "b.jpc"))(grid), engine.compile(root)(grid), atol=1e-5, rtol=0
    )


def test_psdd_logical_support_survives_em_with_pseudocount():
    """asia.uai.psdd rules out 128 of its 256 assignments; EM with pseudocount 0.1 keeps exactly those
    at probability zero (learnable Bernoulli literals would have spread mass onto them)."""
    import itertools

    from engine.io import read_psdd
    from tests.test_io import CIRCUITS

    pc = engine.compile(read_psdd(CIRCUITS / "asia.uai.psdd"))
    x = torch.tensor(list(itertools.product([0, 1], repeat=pc.num_vars)))
    zero = torch.isinf(pc(x))
    assert int(zero.sum()) == 128
    for _ in range(3):
        pc.zero_flows()
        pc.accumulate_flows(x)
        pc.em_step(step_size=1.0, pseudocount=0.1)
    after = pc(x)
    assert torch.equal(torch.isinf(after), zero) and torch.isfinite(pc.params).all()
    assert after[~zero].exp().sum().item() == pytest.approx(1.0, abs=1e-5)
