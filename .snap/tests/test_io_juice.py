"""Juice formats (.jpc, .clt, .spn): every file is checked against an independent float64 evaluator
written here straight from the file text, on all assignments of tiny circuits; write -> read keeps
log-likelihoods; bad files give one-line errors; pickles are refused with the conversion command."""

import gzip
import io
import itertools
import math
import pickle
import zipfile

import numpy as np
import pytest
import torch

import engine
from engine.dists import Bernoulli, Categorical, Gaussian
from engine.io import FileFormatError, load, read_clt, read_jpc, write_jpc
from engine.nodes import CircuitError, inputs, multiply, summate

# ------------------------------------------------------------------------------ reference evaluators


def reference_jpc_loglik(text: str, x: np.ndarray) -> np.ndarray:
    """log p(x) `[B]` in float64 from JPC text (variables from 1, values from 0); last node is the root."""
    lines = [t.split() for t in text.splitlines() if t.strip() and not t.startswith("c")][1:]
    val: dict[str, np.ndarray] = {}
    with np.errstate(divide="ignore"):
        for t in lines:
            k, nid = t[0], t[1]
            if k == "L":
                lit = int(t[3])
                val[nid] = np.where(x[:, abs(lit) - 1] == (1 if lit > 0 else 0), 0.0, -np.inf)
            elif k == "I":
                val[nid] = np.where(x[:, int(t[3]) - 1] == int(t[4]), 0.0, -np.inf)
            elif k == "C":
                logp = np.array([float(s) for s in t[4:]] + [-np.inf] * 8)
                val[nid] = logp[x[:, int(t[3]) - 1].astype(int)]
            elif k == "B":
                n, p = int(t[4]), math.exp(float(t[5]))
                v = x[:, int(t[3]) - 1].astype(int)
                pmf = np.array(
                    [math.comb(n, j) * p**j * (1 - p) ** (n - j) if j <= n else 0.0 for j in range(16)]
                )
                val[nid] = np.log(pmf[v])
            elif k == "G":
                mu, sd = float(t[4]), float(t[5])
                z = (x[:, int(t[3]) - 1] - mu) / sd
                val[nid] = -0.5 * z * z - math.log(sd) - 0.5 * math.log(2 * math.pi)
            elif k == "P":
                val[nid] = sum(val[c] for c in t[4:])
            else:
                terms = [val[c] + float(w) for c, w in zip(t[4::2], t[5::2])]
                val[nid] = np.logaddexp.reduce(np.stack(terms), axis=0)
    return val[lines[-1][1]]


def reference_clt_loglik(text: str, x: np.ndarray) -> np.ndarray:
    """sum_v log p(x_v | x_parent(v)) straight from the .clt lines."""
    rows = [t.split() for t in text.splitlines() if t.strip()]
    r = int(rows[1][0])
    out = np.zeros(len(x))
    with np.errstate(divide="ignore"):
        for i, t in enumerate(rows[2:]):
            v = int(t[0]) - 1
            if i < r:
                p1 = np.full(len(x), float(t[1]))
            else:
                u = int(t[1]) - 1
                p1 = np.where(x[:, u] == 1, float(t[2]), float(t[3]))
            out += np.log(np.where(x[:, v] == 1, p1, 1 - p1))
    return out


def reference_spn_loglik(text: str, x: np.ndarray) -> np.ndarray:
    rows = [t.split() for t in text.splitlines() if t.strip()][1:]
    val: list[np.ndarray] = []
    with np.errstate(divide="ignore"):
        for t in rows:
            if t == ["EOF"]:
                break
            if t[0] == "v":
                val.append(np.where(x[:, int(t[1])] == int(t[2]), 0.0, -np.inf))
            elif t[0] == "*":
                val.append(sum(val[int(c)] for c in t[1:]))
            else:
                terms = [val[int(c)] + float(w) for c, w in zip(t[1::2], t[2::2])]
                val.append(np.logaddexp.reduce(np.stack(terms), axis=0))
    return val[-1]


def grid(*sizes: int) -> np.ndarray:
    return np.array(list(itertools.product(*(range(s) for s in sizes))), dtype=np.int64)


def engine_ll(root, x) -> np.ndarray:
    with torch.no_grad():
        return engine.compile(root)(torch.as_tensor(x)).double().numpy()


def assert_close_ll(got: np.ndarray, want: np.ndarray) -> None:
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=2e-5, rtol=0)
    assert np.all(got[~finite] < -50)  # zero probability: -inf, or log(1e-38)-sized in older float32 paths


def write(tmp_path, name: str, text: str):
    p = tmp_path / name
    p.write_text(text)
    return p


# -------------------------------------------------------------------------------------- files

MIXED_JPC = """c a hand-written JPC over 3 variables: literals, an indicator, categoricals, a binomial
jpc 16
L 0 0 1
L 1 0 -1
I 2 0 2 0
I 3 0 2 2
C 4 0 2 -1.2039728043259361 -0.35667494393873245 -inf
B 5 0 3 2 -0.6931471805599453
C 6 0 3 -2.3025850929940455 -0.10536051565782628 -inf
S 7 0 2 2 -0.5108256237659907 3 -0.916290731874155
S 8 0 2 4 -0.2231435513142097 7 -1.6094379124341003
P 9 0 3 0 8 5
P 10 0 3 1 4 6
S 11 0 2 9 -0.6931471805599453 10 -0.6931471805599453
P 12 0 2 0 7
P 13 0 2 12 5
S 14 0 2 13 -1.6094379124341003 11 -0.2231435513142097
P 15 0 1 14
"""

CLT = """5
2
1 0.3
4 0.8
2 1 0.9 0.2
3 2 0.25 0.6
5 1 0.0 1.0
"""

SPN = """(2 3 2)
v 0 0
v 0 1
v 1 0
v 1 1
v 1 2
v 2 0
v 2 1
+ 2 -1.6094379124341003 3 -0.5108256237659907 4 -1.6094379124341003
+ 5 -0.10536051565782628 6 -2.3025850929940455
* 7 8
* 0 9
+ 2 -0.2231435513142097 3 -1.6094379124341003 4 -inf
* 1 11 8
+ 10 -0.35667494393873245 12 -1.2039728043259361
EOF
"""


def test_jpc_all_line_kinds_match_the_file_evaluator(tmp_path):
    path = write(tmp_path, "mixed.jpc", MIXED_JPC)
    root = load(path)  # detected by content
    x = grid(2, 3, 3)
    got, want = engine_ll(root, x), reference_jpc_loglik(MIXED_JPC, x)
    assert_close_ll(got, want)
    assert np.isclose(np.exp(want).sum(), 1.0) and np.isclose(np.exp(got).sum(), 1.0, atol=1e-5)
    assert (~np.isfinite(want)).any()  # the file has zero-probability assignments


def test_clt_matches_the_product_of_its_cpts(tmp_path):
    root = load(write(tmp_path, "forest.clt", CLT))
    x = grid(2, 2, 2, 2, 2)
    assert_close_ll(engine_ll(root, x), reference_clt_loglik(CLT, x))


def test_zoo_clt_without_edges(tmp_path):
    text = "4\n4\n1 0.2\n2 0.1\n3 0.3\n4 0.4\n"  # the Circuit-Model-Zoo's clts/4.clt
    root = read_clt(write(tmp_path, "4.clt", text))
    x = grid(2, 2, 2, 2)
    assert_close_ll(engine_ll(root, x), reference_clt_loglik(text, x))


def test_spn_with_a_three_valued_variable(tmp_path):
    root = load(write(tmp_path, "m.spn", SPN))
    x = grid(2, 3, 2)
    want = reference_spn_loglik(SPN, x)
    assert_close_ll(engine_ll(root, x), want)
    assert np.isclose(np.exp(want).sum(), 1.0)


def test_gzipped_jpc_loads(tmp_path):
    path = tmp_path / "mixed.jpc.gz"
    path.write_bytes(gzip.compress(MIXED_JPC.encode()))
    x = grid(2, 3, 3)
    assert_close_ll(engine_ll(load(path), x), reference_jpc_loglik(MIXED_JPC, x))


# --------------------------------------------------------------------------------- round trips


def random_discrete_circuit(seed: int):
    """Multi-node vectors, explicit block sizes and sparse block edges over 4 discrete variables."""
    torch.manual_seed(seed)
    a = inputs(0, 4, Categorical(3), block_size=2)
    b = inputs(1, 4, Bernoulli(), block_size=4)
    c = inputs(2, 4, Categorical(4), block_size=2)
    d = inputs(3, 2, Bernoulli(), params=[[0.0], [1.0]], block_size=1)  # literals
    p1 = multiply(a, b, block_size=2)
    s1 = summate(p1, num_nodes=4, block_size=2)
    p2 = multiply(c, inputs(3, 4, Bernoulli(), block_size=2), block_size=2)
    p3 = multiply(c, d, edge_ids=[[0, 0], [1, 1]], block_size=1)
    s2 = summate(p2, p3, num_nodes=4, edge_ids=[[0, 1, 1, 0], [0, 1, 2, 2]], block_size=2)
    top = multiply(s1, s2, edge_ids=[[1, 0], [0, 1]], block_size=2)
    return summate(top, num_nodes=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_write_read_keeps_loglik_and_file_text_agrees(tmp_path, seed):
    root = random_discrete_circuit(seed)
    path = tmp_path / "c.jpc"
    write_jpc(root, path)
    x = grid(3, 2, 4, 2)
    want = reference_jpc_loglik(path.read_text(), x)
    assert_close_ll(engine_ll(root, x), want)
    assert_close_ll(engine_ll(read_jpc(path), x), want)
    assert np.isclose(np.exp(want).sum(), 1.0)


def test_write_jpc_of_a_trained_compiled_circuit_with_gaussians(tmp_path):
    torch.manual_seed(0)
    g = inputs(0, 4, Gaussian(), block_size=2)
    c = inputs(1, 4, Categorical(3), block_size=2)
    root = summate(multiply(g, c), num_nodes=1)
    pc = engine.compile(root)
    x = torch.stack([torch.randn(64, dtype=torch.float64), torch.randint(0, 3, (64,)).double()], 1)
    pc.accumulate_flows(x)
    pc.em_step(step_size=0.5)
    want = pc(x).double().numpy()
    write_jpc(pc, tmp_path / "g.jpc")
    back = read_jpc(tmp_path / "g.jpc")
    np.testing.assert_allclose(engine_ll(back, x.numpy()), want, atol=2e-5)
    np.testing.assert_allclose(
        reference_jpc_loglik((tmp_path / "g.jpc").read_text(), x.numpy()), want, atol=2e-5
    )


def test_clt_and_spn_export_as_jpc(tmp_path):
    for name, text, sizes in (("f.clt", CLT, (2,) * 5), ("m.spn", SPN, (2, 3, 2))):
        root = load(write(tmp_path, name, text))
        write_jpc(root, tmp_path / "out.jpc")
        x = grid(*sizes)
        assert_close_ll(engine_ll(load(tmp_path / "out.jpc"), x), engine_ll(root, x))


def test_write_jpc_refuses_a_multi_node_root(tmp_path):
    with pytest.raises(FileFormatError, match="one root node"):
        write_jpc(inputs(0, 2, Bernoulli()), tmp_path / "x.jpc")


# ---------------------------------------------------------------------------------- bad files

BAD_JPC = [
    ("jpc 2\nL 0 0 1\n", "header says jpc 2"),
    ("jpc 1\nX 0 0 1\n", "malformed JPC line"),
    ("jpc 2\nL 0 0 1\nP 1 0 1 7\n", "undefined node 7"),
    ("jpc 3\nL 0 0 1\nL 1 0 -1\nP 2 0 2 0 1\n", "not decomposable"),
    ("jpc 3\nL 0 0 1\nL 1 0 2\nS 2 0 2 0 -0.6931471805599453 1 -0.6931471805599453\n", "not smooth"),
    ("jpc 3\nL 0 0 1\nL 1 0 -1\nS 2 0 2 0 -0.1 1 -0.1\n", "sum to"),
    ("jpc 1\nC 0 0 1 -0.1 -0.2\n", "sum to"),
    ("jpc 1\nC 0 0 1 abc -0.2\n", "log-probability"),
    ("jpc 1\nL 0 0 0\n", "must be >= 1"),
    ("jpc 2\nL 0 0 1\nL 0 0 -1\n", "defined twice"),
    ("jpc 2\nG 0 0 1 0 1\nL 1 0 1\n", "both Gaussian and discrete"),
    ("jpc 1\nG 0 0 1 0.0 -1\n", "sigma > 0"),
    ("jpc 2\nL 0 0 1\nP 1 0 3 0\n", "declares 3 children"),
    ("jpc x\n", "expected integers"),
]


@pytest.mark.parametrize("text,fragment", BAD_JPC)
def test_malformed_jpc_one_line_error(tmp_path, text, fragment):
    with pytest.raises((FileFormatError, CircuitError)) as err:
        load(write(tmp_path, "bad.jpc", text))
    assert fragment in str(err.value) and "\n" not in str(err.value)


BAD_OTHER = [
    ("bad.clt", "3\n1\n1 0.5\n2 1 0.5 0.5\n", "expected 3 variable lines"),
    ("bad.clt", "2\n1\n1 0.5\n2 1 1.5 0.5\n", "[0, 1]"),
    ("bad.clt", "2\n1\n1 0.5\n1 2 0.5 0.5\n", "listed twice"),
    ("bad.clt", "3\n1\n1 0.5\n2 3 0.5 0.5\n3 2 0.5 0.5\n", "cycle"),
    ("bad.spn", "(2 2)\nv 0 0\nv 1 1\n* 0 1\n", "EOF"),
    ("bad.spn", "(2 2)\nv 0 3\nEOF\n", "outside the domain"),
    ("bad.spn", "(2 2)\nv 0 0\n+ 0 -0.5\nEOF\n", "sum to"),
    ("bad.spn", "(2 2)\nv 0 0\nq 1\nEOF\n", "malformed SPN line"),
]


@pytest.mark.parametrize("name,text,fragment", BAD_OTHER)
def test_malformed_clt_and_spn_one_line_error(tmp_path, name, text, fragment):
    with pytest.raises((FileFormatError, CircuitError)) as err:
        load(write(tmp_path, name, text))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_pyjuice_pickle_is_refused_with_the_conversion_command(tmp_path):
    path = tmp_path / "model.jpc"
    path.write_bytes(pickle.dumps({"not": "loaded"}, protocol=4))
    with pytest.raises(FileFormatError, match="scripts/pyjuice_to_jpc.py") as err:
        load(path)
    assert "\n" not in str(err.value)


def test_torch_zip_of_pickles_is_refused(tmp_path):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps([1, 2]))
    path = tmp_path / "model.jpc"
    path.write_bytes(buf.getvalue())
    with pytest.raises(FileFormatError, match="pyjuice_to_jpc"):
        load(path)


# ---------------------------------------------------------------------------------- PSDD export

from tests.test_io import CIRCUITS, all_assignments, nltcs_rows, num_file_vars, reference_psdd_loglik  # noqa: E402


@pytest.mark.parametrize("name", ["little_4var", "nltcs.10split", "asia.uai"])
def test_psdd_export_round_trip_with_vtree(tmp_path, name):
    from engine.io import read_psdd, write_psdd

    root = read_psdd(CIRCUITS / f"{name}.psdd")
    write_psdd(root, tmp_path / "out.psdd", tmp_path / "out.vtree")
    text = (tmp_path / "out.psdd").read_text()
    n = num_file_vars(text)
    x = all_assignments(n).numpy() if n <= 12 else nltcs_rows()[:2000]
    want = reference_psdd_loglik((CIRCUITS / f"{name}.psdd").read_text(), x)
    finite = np.isfinite(want)
    got_text = reference_psdd_loglik(text, x)  # the independent evaluator on the exported text
    np.testing.assert_allclose(got_text[finite], want[finite], atol=1e-5)
    assert not np.isfinite(got_text[~finite]).any()
    back = read_psdd(tmp_path / "out.psdd", tmp_path / "out.vtree")  # the vtree checks every node
    assert_close_ll(engine_ll(back, x), want)


def test_psdd_export_refuses_a_non_binary_product(tmp_path):
    from engine.io import write_psdd

    root = load(write(tmp_path, "f.clt", CLT))  # Chow-Liu products have one factor per child + 1
    with pytest.raises(FileFormatError, match="PSDD export"):
        write_psdd(root, tmp_path / "x.psdd")


def test_pyjuice_conversion_script_against_pyjuice(tmp_path):
    """Runs where PyJuice is importable (it is not a dependency): our circuit -> PyJuice (the
    benchmarks' bridge) -> pyjuice.io.save (a pickle) -> refused by load -> the script -> load."""
    import importlib.util
    from pathlib import Path

    juice = pytest.importorskip("pyjuice")
    from benchmarks.pyjuice_bridge import to_pyjuice

    scripts = Path(__file__).resolve().parents[1] / "scripts"
    spec = importlib.util.spec_from_file_location("pyjuice_to_jpc", scripts / "pyjuice_to_jpc.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = random_discrete_circuit(0)
    juice.io.save(str(tmp_path / "m.jpc"), to_pyjuice(root, juice))
    with pytest.raises(FileFormatError, match="pyjuice_to_jpc"):
        load(tmp_path / "m.jpc")
    assert script.main([str(tmp_path / "m.jpc"), str(tmp_path / "text.jpc")]) == 0
    x = grid(3, 2, 4, 2)
    assert_close_ll(engine_ll(load(tmp_path / "text.jpc"), x), engine_ll(root, x))


@pytest.mark.parametrize("line", ["I 1 0 4000000000 1", "I 1 0 1 300000000", "B 1 0 1 10000000 -0.7"])
def test_tiny_files_asking_for_huge_variables_or_domains_are_refused(tmp_path, line):
    """24-byte files made the reader allocate ~1 GB (a scope bit per variable) or overflow a float."""
    path = tmp_path / "hostile.jpc"
    path.write_text(f"jpc 1\n{line}\n")
    with pytest.raises(FileFormatError, match="past this reader's limits"):
        engine.load(path)


def test_binomial_pmf_in_log_space_matches_the_closed_form():
    import math

    from engine.io.jpc import _binomial_pmf

    for n, p in [(1, 0.3), (7, 0.5), (40, 0.01), (3, 0.0), (3, 1.0)]:
        want = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
        assert _binomial_pmf(n, p) == pytest.approx(want, rel=1e-9, abs=1e-300)
    assert sum(_binomial_pmf(5000, 0.3)) == pytest.approx(1.0)  # math.comb overflowed a float here
