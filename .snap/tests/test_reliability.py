"""Hostile files are refused before they cost memory: each probe runs in a fresh subprocess, which
reports the outcome and its peak resident memory (baseline with torch imported: about 220 MB).

The files are generated here (small on disk, huge once decoded), never committed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from engine import budget

ROOT = Path(__file__).resolve().parents[1]
PEAK_LIMIT_MB = 500

# Peak from VmHWM (this process image's high-water mark): ru_maxrss would also count the pytest
# process this one was forked from, since Linux carries it across exec.
PROBE = """
import json, re
def run():
{body}
try:
    run()
    outcome = "accepted"
except BaseException as e:
    outcome = f"{{type(e).__name__}}: {{e}}"
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({{"outcome": outcome, "peak_mb": peak_kb / 1024}}))
"""


def probe(body: str, env: dict | None = None) -> tuple[str, float]:
    """(outcome, peak MB) of running `body` (statements, indented by 4) in a fresh interpreter."""
    import os

    code = PROBE.format(body="\n".join("    " + line for line in body.strip().splitlines()))
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    return result["outcome"], result["peak_mb"]


def _npy_header(shape, dtype) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()


def _zip_member_of_zeros(zf: zipfile.ZipFile, name: str, head: bytes, nbytes: int) -> None:
    """A member that is `head` followed by `nbytes` zero bytes, streamed (never held in memory)."""
    chunk = bytes(2**20)
    with zf.open(name, "w", force_zip64=True) as f:
        f.write(head)
        for _ in range(nbytes // len(chunk)):
            f.write(chunk)


def test_npz_member_inflating_to_256_mib_is_refused(tmp_path):
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        _zip_member_of_zeros(zf, "x.npy", _npy_header((16384, 16384), np.uint8), 256 * 2**20)
    assert path.stat().st_size < 2**20  # under 1 MB on disk
    outcome, peak = probe(f"from engine.data import load_dataset\nload_dataset({str(path)!r})")
    assert outcome.startswith("DataError") and "memory budget" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def test_tiny_npy_declaring_a_huge_array_is_refused(tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(_npy_header((2**20, 2**20), np.float64) + bytes(100))
    outcome, peak = probe(f"from engine.data import load_dataset\nload_dataset({str(path)!r})")
    assert outcome.startswith("DataError") and "truncated" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def test_sparse_npy_over_the_budget_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.npy"
    head = _npy_header((30000, 30000), np.uint8)  # 900 MB on disk, about 9 GB as int64 splits
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(len(head) + 30000 * 30000)  # sparse: no disk used
    outcome, peak = probe(f"from engine.data import load_dataset\nload_dataset({str(path)!r})")
    assert outcome.startswith("DataError") and "memory budget" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def test_csv_past_a_lowered_budget_is_refused(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text(("0," * 999 + "1\n") * 2500)  # 2.5 M cells: ~80 MB to parse
    body = f"from engine.data import load_dataset\nload_dataset({str(path)!r})"
    outcome, peak = probe(body, env={"CW_MEMORY_BUDGET_MB": "64"})
    assert outcome.startswith("DataError") and "memory budget is 64 MiB" in outcome, outcome
    assert peak < PEAK_LIMIT_MB
    outcome, _ = probe(body)  # the default budget takes it
    assert outcome == "accepted", outcome


CIRCUIT_JSON = {
    "format": "circuit-workbench",
    "version": 1,
    "kind": "circuit",
    "root": 0,
    "vectors": [
        {
            "id": 0,
            "kind": "input",
            "num_nodes": 1,
            "block_size": 1,
            "children": [],
            "var": 0,
            "dist": {"name": "bernoulli"},
            "params": "v0.params",
        }
    ],
}


def test_circuit_zip_whose_arrays_inflate_past_the_budget_is_refused(tmp_path):
    path = tmp_path / "bomb.cwpc"
    data = 320 * 2**20
    header = json.dumps(
        {"v0.params": {"dtype": "F32", "shape": [data // 4], "data_offsets": [0, data]}}
    ).encode()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("circuit.json", json.dumps(CIRCUIT_JSON))
        _zip_member_of_zeros(zf, "arrays.safetensors", len(header).to_bytes(8, "little") + header, data)
    assert path.stat().st_size < 2**20
    outcome, peak = probe(f"import engine\nengine.load({str(path)!r})")
    assert outcome.startswith("FileFormatError") and "limit" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def test_deeply_nested_circuit_json_is_a_file_format_error(tmp_path):
    path = tmp_path / "deep.cwpc"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("circuit.json", "[" * 200_000 + "]" * 200_000)
        zf.writestr("arrays.safetensors", (2).to_bytes(8, "little") + b"{}")
    outcome, peak = probe(f"import engine\nengine.load({str(path)!r})")
    assert outcome.startswith("FileFormatError") and "nested too deeply" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def _psdd_chain(path: Path, n: int) -> None:
    """A valid PSDD: decision node k over (x_k, D_{k-1}) and (not x_k, D_{k-1}), n levels deep."""
    lines, lit = [], {}
    for v in range(1, n + 1):
        for s in (1, -1):
            lit[v, s] = len(lines)
            lines.append(f"L {len(lines)} 0 {s * v}")
    prev = len(lines)
    lines.append(f"T {prev} 0 1 -0.693147 -0.693147")
    for v in range(2, n + 1):
        lines.append(f"D {len(lines)} 0 2 {lit[v, 1]} {prev} -0.693147 {lit[v, -1]} {prev} -0.693147")
        prev = len(lines) - 1
    path.write_text(f"psdd {len(lines)}\n" + "\n".join(lines) + "\n")


def test_deep_psdd_chain_is_refused_by_the_server_build_within_budget(tmp_path):
    path = tmp_path / "chain.psdd"
    _psdd_chain(path, 5000)
    body = f"""
from workbench.services.circuits import build
res = build({{"source": "file", "path": {str(path)!r}}})
raise ValueError(res.error)
"""
    outcome, peak = probe(body)
    assert "vectors deep; the limit is" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def test_psdd_larger_than_the_budget_allows_is_refused(tmp_path, monkeypatch):
    from engine.io import FileFormatError, read_psdd

    path = tmp_path / "chain.psdd"
    _psdd_chain(path, 200)
    monkeypatch.setattr(budget, "MEMORY_BUDGET_BYTES", path.stat().st_size * 10)
    with pytest.raises(FileFormatError, match="memory budget"):
        read_psdd(path)


def test_psdd_with_a_long_comment_header_is_recognised(tmp_path):
    import engine

    text = (ROOT / "assets" / "circuits" / "little_4var.psdd").read_text()
    path = tmp_path / "commented.psdd"
    path.write_text("c " + "x" * 100 + "\n" + ("c comment line\n" * 1000) + text)
    assert len(engine.load(path).topological()) > 1


def test_compose_graph_with_1e8_nodes_is_refused_at_once():
    body = """
import time
from workbench.services.circuits import build
graph = {"source": "graph", "edges": [{"parent": "s", "child": "a"}],
         "nodes": [{"id": "a", "kind": "input", "num_nodes": 10**8, "var": 0}, {"id": "s", "kind": "sum", "num_nodes": 1}]}
t = time.perf_counter()
res = build(graph)
assert time.perf_counter() - t < 1.0
raise ValueError(res.error)
"""
    outcome, peak = probe(body)
    assert "the limit is" in outcome and "CW_MAX_VECTOR_NODES" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"template": "hmm", "num_latents": 100_000}, "memory budget"),
        ({"template": "rat_spn", "num_latents": 10**9}, "CW_MAX_VECTOR_NODES"),
    ],
)
def test_oversized_templates_are_refused_before_building(spec, match):
    from workbench.services.circuits import build

    res = build({"source": "template", **spec})
    assert not res.ok and match in res.error, res.error


def test_dense_sum_over_a_large_graph_is_refused():
    from workbench.services.circuits import build

    graph = {
        "source": "graph",
        "nodes": [
            {"id": "a", "kind": "input", "num_nodes": 100_000, "var": 0},
            {"id": "s", "kind": "sum", "num_nodes": 100_000},
        ],
        "edges": [{"parent": "s", "child": "a"}],
    }
    res = build(graph)
    assert not res.ok and "parameters" in res.error and "memory budget" in res.error, res.error
    graph["nodes"][0]["var"] = float("inf")
    graph["nodes"][1]["num_nodes"] = 1
    res = build(graph)
    assert not res.ok and "node 'a'" in res.error, res.error


# ----------------------------------------------------------------------------------------- data values


def test_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    from engine.data import load_dataset

    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff1,0\n0,1\n1,1\n".encode())
    ds = load_dataset(path, valid_fraction=0.0, test_fraction=0.0)
    assert ds.train.shape == (3, 2)


def test_large_whole_number_floats_are_continuous(tmp_path):
    from engine.data import load_dataset

    path = tmp_path / "counts.csv"
    path.write_text("".join(f"{100_000 + 7 * i},{i % 3}\n" for i in range(50)))
    ds = load_dataset(path, valid_fraction=0.0, test_fraction=0.0)
    assert ds.kind == "continuous" and ds.num_cats is None


def test_continuous_values_beyond_float32_gaussians_are_refused(tmp_path):
    from engine.data import DataError, load_dataset

    path = tmp_path / "far.npy"
    np.save(path, np.array([[0.5, 1.5], [2.5e19, 0.25]] * 4))
    with pytest.raises(DataError, match="continuous values must lie within"):
        load_dataset(path, valid_fraction=0.0, test_fraction=0.0)


def test_safetensors_header_declaring_more_than_the_limit_is_refused_from_its_header(tmp_path):
    import engine
    from engine.io import FileFormatError

    path = tmp_path / "liar.cwpc"
    header = json.dumps(
        {"v0.params": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}
    ).encode()
    with zipfile.ZipFile(path, "w") as zf:  # the zip header is honest: the member is small
        zf.writestr("circuit.json", json.dumps(CIRCUIT_JSON))
        zf.writestr("arrays.safetensors", len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(FileFormatError, match="declares .* bytes of arrays; the limit"):
        engine.load(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"var": "1e400"}, "'var' must be int"),
        ({"tolerance": "Infinity"}, "tolerance must be a finite number"),
        ({"tolerance": "NaN"}, "tolerance must be a finite number"),
    ],
)
def test_overflowing_numbers_in_circuit_json_are_file_format_errors(tmp_path, change, match):
    import engine
    from engine.io import FileFormatError

    doc = json.dumps({**CIRCUIT_JSON, "kind": "compiled", "block_size": None, "tolerance": 0.25})
    if "var" in change:
        doc = doc.replace('"var": 0', f'"var": {change["var"]}')
    else:
        doc = doc.replace('"tolerance": 0.25', f'"tolerance": {change["tolerance"]}')
    header = json.dumps({"v0.params": {"dtype": "F32", "shape": [1, 1], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "c.cwpc"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("circuit.json", doc)
        zf.writestr("arrays.safetensors", len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(FileFormatError, match=match):
        engine.load(path)


def test_gzipped_jpc_bomb_stops_at_the_text_budget(tmp_path):
    """2 MB of gzip inflating to 1 GiB of JPC text: refused at 8 MiB of output (it held 512 MiB, 1.3 GB peak)."""
    import gzip

    path = tmp_path / "bomb.jpc.gz"
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(b"jpc 3\n")
        chunk = (b"c " + b"x" * 1000 + b"\n") * 1024
        for _ in range(1024):
            f.write(chunk)
    assert path.stat().st_size < 4 * 2**20
    outcome, peak = probe(f"import engine\nengine.load({str(path)!r})")
    assert outcome.startswith("FileFormatError") and "decompresses to more than the limit" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def test_circuit_text_past_the_budget_is_refused_before_parsing(tmp_path):
    path = tmp_path / "wide.spn"
    path.write_text("(2)\nv 0 0\nv 0 1\n" + "+ 0 -0.7 1 -0.7\n" * 40_000 + "EOF\n")  # ~660 KB
    outcome, peak = probe(f"import engine\nengine.load({str(path)!r})", env={"CW_MEMORY_BUDGET_MB": "64"})
    assert outcome.startswith("FileFormatError") and "memory budget is 64 MiB" in outcome, outcome
    assert peak < PEAK_LIMIT_MB


def test_deep_spn_chain_is_refused_while_it_is_read(tmp_path):
    """2.4 MB of SPN text, a chain 200k deep: the server's depth limit stops the reader at node 4,097
    (it was refused only after parsing everything: 640 MB peak)."""
    path = tmp_path / "deep.spn"
    path.write_text("(2)\nv 0 0\nv 0 1\n" + "".join(f"+ {i} 0.0\n" for i in range(1, 200_001)) + "EOF\n")
    body = f"""
from workbench.services.circuits import build
res = build({{"source": "file", "path": {str(path)!r}}})
raise ValueError(res.error)
"""
    outcome, peak = probe(body)
    assert "nodes deep; the limit here is 4096" in outcome, outcome
    assert peak < PEAK_LIMIT_MB
