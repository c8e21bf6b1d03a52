"""engine.io: native round trips (bit for bit), every refusal on real bad files, and PSDD import
checked against an independent float64 evaluator written here straight from the file text."""

import io
import itertools
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch

import engine
from engine.dists import Bernoulli, Categorical, Gaussian
from engine.io import FileFormatError, limits, load, read_psdd, save
from engine.nodes import CircuitError, InputNodes, NodeVector, ProdNodes, SumNodes, inputs, multiply, summate

ASSETS = Path(__file__).resolve().parents[1] / "assets"
CIRCUITS = ASSETS / "circuits"
PSDD_FILES = sorted(CIRCUITS.glob("*.psdd"))
VTREES = {
    "little_4var": "little_4var.vtree",
    "simple2.1": "simple2.vtree",
    "simple2.4": "simple2.vtree",
    "nltcs.clt": "nltcs.vtree",
    "nltcs.10split": "nltcs.vtree",
}


# ----------------------------------------------------------------------------------- helpers


def mixed_circuit(seed: int) -> NodeVector:
    """Smooth, decomposable circuit over 4 variables with all three input families, explicit
    block sizes and non-default edge_ids."""
    torch.manual_seed(seed)
    a = inputs(0, 4, Categorical(3), block_size=2)
    b = inputs(1, 4, Bernoulli(), block_size=4)
    c = inputs(2, 4, Gaussian(min_std=0.05), block_size=2)
    d = inputs(3, 8, Categorical(4), block_size=4)
    c2 = inputs(2, 2, Gaussian(), block_size=1)
    p1 = multiply(a, b, block_size=2)
    p2 = multiply(c, d, edge_ids=[[1, 0], [0, 3]], block_size=2)
    p3 = multiply(c2, d, edge_ids=[[0, 2], [1, 1], [0, 5], [1, 7]], block_size=1)
    s1 = summate(p1, num_nodes=4, block_size=2)
    s2 = summate(p2, p3, num_nodes=4, edge_ids=[[1, 0, 0, 1], [3, 0, 2, 1]], block_size=2)
    top = multiply(s1, s2, edge_ids=[[1, 0], [0, 0]], block_size=2)
    alt = multiply(a, b, s2, block_size=4)
    root = summate(top, alt, num_nodes=1)
    root.name = "root"
    return root


def mixed_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    cols = [
        torch.randint(0, 3, (n,), generator=g),
        torch.randint(0, 2, (n,), generator=g),
        torch.randn(n, generator=g, dtype=torch.float64),
        torch.randint(0, 4, (n,), generator=g),
    ]
    return torch.stack([c.double() for c in cols], 1)


def bits(t: torch.Tensor) -> torch.Tensor:
    assert t.dtype == torch.float32
    return t.contiguous().view(torch.int32)


def assert_same_circuit(a: NodeVector, b: NodeVector) -> None:
    ta, tb = a.topological(), b.topological()
    assert len(ta) == len(tb)
    ida = {v.uid: i for i, v in enumerate(ta)}
    idb = {v.uid: i for i, v in enumerate(tb)}
    for va, vb in zip(ta, tb):
        assert type(va) is type(vb)
        assert (va.num_nodes, va.block_size, va.name) == (vb.num_nodes, vb.block_size, vb.name)
        assert [ida[c.uid] for c in va.children] == [idb[c.uid] for c in vb.children]
        if isinstance(va, InputNodes):
            assert va.var == vb.var and va.dist.to_json() == vb.dist.to_json()
        if isinstance(va, (ProdNodes, SumNodes)):
            np.testing.assert_array_equal(va.edge_ids, vb.edge_ids)
        if isinstance(va, (InputNodes, SumNodes)):
            assert torch.equal(bits(va.params), bits(vb.params))


def all_assignments(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product([0, 1], repeat=n)), dtype=torch.long)


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def saved_members(tmp_path: Path) -> tuple[dict, dict]:
    """(circuit.json as a dict, arrays) of a freshly saved mixed circuit, to tamper with."""
    path = tmp_path / "good.pcz"
    save(mixed_circuit(0), path)
    with zipfile.ZipFile(path) as zf:
        doc = json.loads(zf.read("circuit.json"))
        arrays = safetensors.numpy.load(zf.read("arrays.safetensors"))
    return doc, arrays


def write_native(tmp_path: Path, doc: dict, arrays: dict, name: str = "bad.pcz") -> Path:
    path = tmp_path / name
    path.write_bytes(
        zip_bytes(
            {"circuit.json": json.dumps(doc).encode(), "arrays.safetensors": safetensors.numpy.save(arrays)}
        )
    )
    return path


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_round_trip_is_bit_exact_and_same_likelihood(tmp_path, seed):
    root = mixed_circuit(seed)
    path = tmp_path / "c.pcz"
    save(root, path)
    back = load(path)
    assert isinstance(back, NodeVector)
    assert_same_circuit(root, back)
    x = mixed_data(256, seed)
    torch.testing.assert_close(engine.compile(back)(x), engine.compile(root)(x), rtol=0, atol=0)


def test_round_trip_of_a_bare_input_vector_and_of_an_imported_psdd(tmp_path):
    leaf = inputs(5, 3, Categorical(4))
    save(leaf, tmp_path / "leaf.pcz")
    assert_same_circuit(leaf, load(tmp_path / "leaf.pcz"))
    psdd = read_psdd(CIRCUITS / "little_4var.psdd")
    save(psdd, tmp_path / "psdd.pcz")
    assert_same_circuit(psdd, load(tmp_path / "psdd.pcz"))


@pytest.mark.parametrize("block_size", [None, 1])
def test_compiled_round_trip_keeps_trained_params_and_block_size(tmp_path, block_size):
    pc = engine.compile(mixed_circuit(3), block_size=block_size)
    x = mixed_data(512, 3)
    pc.accumulate_flows(x)
    pc.em_step(step_size=1.0, pseudocount=0.1)
    expected = pc(x)
    save(pc, tmp_path / "pc.pcz")
    back = load(tmp_path / "pc.pcz")
    assert isinstance(back, engine.CompiledCircuit)
    assert back.block_size == block_size
    assert_same_circuit(pc.root, back.root)
    torch.testing.assert_close(back(x), expected, rtol=0, atol=1e-6)


def test_save_replaces_an_existing_file_and_rejects_other_objects(tmp_path):
    path = tmp_path / "c.pcz"
    path.write_bytes(b"old")
    save(mixed_circuit(0), path)
    assert isinstance(load(path), NodeVector)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pcz"]  # no temporary left behind
    with pytest.raises(TypeError, match="NodeVector"):
        save({"not": "a circuit"}, path)


# ------------------------------------------------------------------------------- refusals


def test_missing_file(tmp_path):
    with pytest.raises(FileFormatError, match="not found") as e:
        load(tmp_path / "nope.pcz")
    assert "nope.pcz" in str(e.value)


def test_file_too_large(tmp_path, monkeypatch):
    save(mixed_circuit(0), tmp_path / "c.pcz")
    monkeypatch.setattr(limits, "MAX_FILE_BYTES", 100)
    with pytest.raises(FileFormatError, match="too large.*limit is 100"):
        load(tmp_path / "c.pcz")


def test_unknown_format_empty_file_and_pickle(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    with pytest.raises(FileFormatError, match="unknown file format"):
        load(tmp_path / "a.txt")
    (tmp_path / "empty.pcz").write_bytes(b"")
    with pytest.raises(FileFormatError, match="empty"):
        load(tmp_path / "empty.pcz")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"params": [1.0, 2.0]}))
    with pytest.raises(FileFormatError, match="pickle"):
        load(tmp_path / "evil.pkl")


def test_truncated_and_corrupted_zip(tmp_path):
    save(mixed_circuit(0), tmp_path / "c.pcz")
    data = (tmp_path / "c.pcz").read_bytes()
    (tmp_path / "cut.pcz").write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="corrupt or truncated zip") as e:
        load(tmp_path / "cut.pcz")
    assert "cut.pcz" in str(e.value)
    flipped = bytearray(data)
    for i in range(60, 90):  # inside the first member's compressed data
        flipped[i] ^= 0xFF
    (tmp_path / "flip.pcz").write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match="corrupt"):
        load(tmp_path / "flip.pcz")


def test_bad_json_missing_keys_and_newer_version(tmp_path):
    doc, arrays = saved_members(tmp_path)
    arrays_blob = safetensors.numpy.save(arrays)
    bad = tmp_path / "bad.pcz"
    bad.write_bytes(zip_bytes({"circuit.json": b"{not json", "arrays.safetensors": arrays_blob}))
    with pytest.raises(FileFormatError, match="not valid JSON"):
        load(bad)
    with pytest.raises(FileFormatError, match="missing key 'vectors'"):
        load(write_native(tmp_path, {k: v for k, v in doc.items() if k != "vectors"}, arrays))
    with pytest.raises(FileFormatError, match=r"vector 2 \(product\) is missing key 'num_nodes'"):
        doc2 = json.loads(json.dumps(doc))
        del doc2["vectors"][2]["num_nodes"]
        load(write_native(tmp_path, doc2, arrays))
    with pytest.raises(
        FileFormatError, match=r"file format version 2 is newer than this engine supports \(1\)"
    ):
        load(write_native(tmp_path, {**doc, "version": 2}, arrays))
    with pytest.raises(FileFormatError, match="format"):
        load(write_native(tmp_path, {**doc, "format": "something-else"}, arrays))


def test_wrong_shapes_dtypes_and_missing_arrays(tmp_path):
    doc, arrays = saved_members(tmp_path)
    sum_v = next(v for v in doc["vectors"] if v["kind"] == "sum")
    name = sum_v["params"]
    shrunk = {**arrays, name: arrays[name][:-1]}
    with pytest.raises(FileFormatError, match=f"array '{name}' has shape"):
        load(write_native(tmp_path, doc, shrunk))
    as_f64 = {**arrays, name: arrays[name].astype(np.float64)}
    with pytest.raises(FileFormatError, match="dtype float64"):
        load(write_native(tmp_path, doc, as_f64))
    with pytest.raises(FileFormatError, match="not in arrays.safetensors"):
        load(write_native(tmp_path, doc, {k: v for k, v in arrays.items() if k != name}))
    inp = next(v for v in doc["vectors"] if v["kind"] == "input")
    wide = {**arrays, inp["params"]: np.ones((inp["num_nodes"], 7), np.float32)}
    with pytest.raises(FileFormatError, match="has shape"):
        load(write_native(tmp_path, doc, wide))
    prod = next(v for v in doc["vectors"] if v["kind"] == "product")
    out_of_range = {**arrays, prod["edge_ids"]: arrays[prod["edge_ids"]] + 100}
    with pytest.raises(FileFormatError, match="out of range"):
        load(write_native(tmp_path, doc, out_of_range))


def test_undefined_references_and_node_count_mismatch(tmp_path):
    doc, arrays = saved_members(tmp_path)
    last = len(doc["vectors"]) - 1
    doc2 = json.loads(json.dumps(doc))
    doc2["vectors"][last]["children"] = [99]
    with pytest.raises(FileFormatError, match="refers to undefined vector 99"):
        load(write_native(tmp_path, doc2, arrays))
    with pytest.raises(FileFormatError, match="root 99"):
        load(write_native(tmp_path, {**doc, "root": 99}, arrays))
    doc3 = json.loads(json.dumps(doc))
    prod = next(v for v in doc3["vectors"] if v["kind"] == "product")
    prod["num_nodes"] *= 2
    with pytest.raises(FileFormatError, match="shape|declares"):
        load(write_native(tmp_path, doc3, arrays))


def test_malicious_members_are_never_extracted(tmp_path, monkeypatch):
    doc, arrays = saved_members(tmp_path)
    members = {"circuit.json": json.dumps(doc).encode(), "arrays.safetensors": safetensors.numpy.save(arrays)}
    work = tmp_path / "work"
    work.mkdir()
    (work / "evil.pcz").write_bytes(zip_bytes({**members, "../escaped.txt": b"gotcha"}))
    with pytest.raises(FileFormatError, match="unexpected archive member '../escaped.txt'"):
        load(work / "evil.pcz")
    assert not (tmp_path / "escaped.txt").exists()
    # A zip bomb: 64 MiB of zeros compresses to ~64 KiB; the member cap stops it before inflating.
    bomb = {**members, "arrays.safetensors": safetensors.numpy.save({"z": np.zeros(2**24, np.float32)})}
    (work / "bomb.pcz").write_bytes(zip_bytes(bomb))
    assert (work / "bomb.pcz").stat().st_size < 2**20
    monkeypatch.setattr(limits, "MAX_MEMBER_BYTES", 2**20)
    with pytest.raises(FileFormatError, match="declares 67108.* bytes uncompressed"):
        load(work / "bomb.pcz")
    assert sorted(p.name for p in work.iterdir()) == ["bomb.pcz", "evil.pcz"]


def test_vtree_file_is_refused_with_a_hint():
    with pytest.raises(FileFormatError, match="this is a vtree, load the .psdd"):
        load(CIRCUITS / "little_4var.vtree")


PSDD_HEAD = "c a test file\npsdd {n}\n"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("L 0 0 1\nL 1 0 -1\nD 2 1 2 0 1\n", r"line 5: decision node 2 declares 2 elements"),
        ("L 0 0 1\nL 1 0 x\n", r"line 4: expected integers"),
        ("L 0 0 1\nQ 1 0 1\n", r"line 4: malformed PSDD line"),
        ("L 0 0 1\nT 1 0 1 0.5\n", r"line 4: '0.5' is not a log-probability"),
        ("L 0 0 1\nL 1 0 -1\nD 2 1 2 0 7 -0.69 1 1 -0.69\n", r"line 5: node 2 refers to undefined node 7"),
        ("L 0 0 1\nL 0 0 -1\n", r"line 4: node id 0 defined twice"),
        ("L 0 0 1\nL 1 0 -1\nL 2 1 2\nD 3 2 2 0 2 -0.1 1 2 -0.1\n", r"line 6: decision node 3's weights sum"),
    ],
)
def test_malformed_psdd_lines_name_the_line(tmp_path, body, match):
    path = tmp_path / "bad.psdd"
    path.write_text(PSDD_HEAD.format(n=10) + body)
    with pytest.raises(FileFormatError, match=match) as e:
        load(path)
    assert "bad.psdd" in str(e.value)


def test_psdd_node_count_and_vtree_mismatches(tmp_path):
    path = tmp_path / "few.psdd"
    path.write_text(PSDD_HEAD.format(n=1) + "L 0 0 1\nL 1 0 -1\n")
    with pytest.raises(FileFormatError, match="header says psdd 1 but the file has 2 node lines"):
        read_psdd(path)
    with pytest.raises(FileFormatError, match="vtree node 0 is"):
        read_psdd(CIRCUITS / "nltcs.clt.psdd", CIRCUITS / "little_4var.vtree")
    bad_vtree = tmp_path / "bad.vtree"
    bad_vtree.write_text("vtree 2\nL 0 1\nI 1 0 5\n")
    with pytest.raises(FileFormatError, match="line 3: vtree node 1 refers to undefined node 5"):
        read_psdd(CIRCUITS / "simple2.1.psdd", bad_vtree)


def test_non_smooth_decision_node_is_a_circuit_error(tmp_path):
    path = tmp_path / "rough.psdd"
    body = "L 0 0 1\nL 1 0 -1\nL 2 1 2\nL 3 2 3\nD 4 3 2 0 2 -0.69314718 1 3 -0.69314718\n"
    path.write_text(PSDD_HEAD.format(n=5) + body)
    with pytest.raises(CircuitError, match="decision node 4 is not smooth"):
        read_psdd(path)


# ------------------------------------------------------------------------------ PSDD import


def reference_psdd_loglik(text: str, x: np.ndarray) -> np.ndarray:
    """log p(x) `[B]` in float64, straight from the PSDD text: recursive over node ids, the last
    node is the root, literals are exact indicators (log 0 = -inf)."""
    lines = {}
    for line in text.splitlines():
        t = line.split()
        if t and t[0] in "LTD":
            lines[int(t[1])] = t
            root = int(t[1])
    memo: dict[int, np.ndarray] = {}

    def value(i: int) -> np.ndarray:
        if i not in memo:
            t = lines[i]
            if t[0] == "L":
                lit = int(t[3])
                memo[i] = np.where(x[:, abs(lit) - 1] == (lit > 0), 0.0, -np.inf)
            elif t[0] == "T":
                lp = float(t[4])
                memo[i] = np.where(x[:, int(t[3]) - 1] == 1, lp, np.log1p(-np.exp(lp)))
            else:
                terms = [
                    value(int(t[4 + 3 * k])) + value(int(t[5 + 3 * k])) + float(t[6 + 3 * k])
                    for k in range(int(t[3]))
                ]
                memo[i] = np.logaddexp.reduce(np.stack(terms), axis=0)
        return memo[i]

    with np.errstate(divide="ignore"):
        return value(root)


def num_file_vars(text: str) -> int:
    out = 0
    for line in text.splitlines():
        t = line.split()
        if t and t[0] == "L":
            out = max(out, abs(int(t[3])))
        elif t and t[0] == "T":
            out = max(out, int(t[3]))
    return out


def engine_loglik(pc, x: np.ndarray, batch: int = 8192) -> np.ndarray:
    with torch.no_grad():
        parts = [pc(torch.as_tensor(x[i : i + batch], dtype=torch.long)) for i in range(0, len(x), batch)]
    return torch.cat(parts).double().numpy()


def assert_matches_reference(got: np.ndarray, want: np.ndarray) -> None:
    finite = np.isfinite(want)
    np.testing.assert_array_less(np.abs(got[finite] - want[finite]), 1e-4)
    assert np.all(got[~finite] < -50)  # exact zeros become log(1e-38)-sized values in float32


def nltcs_rows() -> np.ndarray:
    path = ASSETS / "data" / "debd" / "nltcs.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        return np.unpackbits(z["test"], axis=1, count=int(z["num_vars"]))
    return np.random.default_rng(0).integers(0, 2, (2000, 16), dtype=np.uint8)


@pytest.mark.parametrize("path", PSDD_FILES, ids=[p.stem for p in PSDD_FILES])
def test_psdd_import_matches_reference_and_is_normalised(path):
    text = path.read_text()
    n = num_file_vars(text)
    root = load(path)
    pc = engine.compile(root)
    assert pc.num_vars == n
    x = all_assignments(n).numpy()
    got = engine_loglik(pc, x)
    assert_matches_reference(got, reference_psdd_loglik(text, x))
    total = np.exp(np.logaddexp.reduce(got))
    assert abs(total - 1.0) < 1e-4
    if n == 16:
        rows = nltcs_rows()
        assert_matches_reference(engine_loglik(pc, rows), reference_psdd_loglik(text, rows))


@pytest.mark.parametrize("stem", sorted(VTREES))
def test_psdd_import_with_its_vtree_builds_the_same_circuit(stem):
    plain = read_psdd(CIRCUITS / f"{stem}.psdd")
    checked = read_psdd(CIRCUITS / f"{stem}.psdd", CIRCUITS / VTREES[stem])
    assert_same_circuit(plain, checked)
    vectors = checked.topological()
    assert all(v.num_nodes == 1 and v.block_size == 1 for v in vectors)
    leaves = [v for v in vectors if isinstance(v, InputNodes)]
    literals = [v for v in leaves if v.dist.name == "indicator"]  # L lines: fixed indicators (issue 14)
    assert literals and all(v.params.item() in (0.0, 1.0) for v in literals)
    assert all(v.dist.name in ("indicator", "bernoulli") for v in leaves)
