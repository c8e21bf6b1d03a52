"""Issue 15's probe table, re-run: hostile files, bad CLI values, server faults, injection, binding.

    PYTHONPATH=. .venv/bin/python benchmarks/reliability_probes.py [--skip-server] [--json out.json]

Every probe runs in a fresh process. File probes report the outcome and the process's peak resident
memory (VmHWM; an interpreter with torch imported is about 220 MB). CLI probes report the exit code,
the number of stderr lines and the child's peak memory. Server probes (SIGTERM/SIGKILL recovery,
bind address, injection in the browser, ...) run the test that checks each, in a fresh pytest, and
report whether it passed and how long it took. Hostile files are generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

from tests.test_reliability import CIRCUIT_JSON, _npy_header, _psdd_chain, _zip_member_of_zeros, probe

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def file_probes(tmp: Path) -> list[tuple[str, str]]:
    """(name, statements run in a fresh interpreter) for each hostile file, generated in `tmp`."""
    npz = tmp / "bomb.npz"
    with zipfile.ZipFile(npz, "w", zipfile.ZIP_DEFLATED) as zf:
        _zip_member_of_zeros(zf, "x.npy", _npy_header((32768, 32768), np.uint8), GIB)
    npy = tmp / "huge.npy"
    npy.write_bytes(_npy_header((2**20, 2**20), np.float64) + bytes(100))
    cz = tmp / "bomb.cwpc"
    header = json.dumps(
        {"v0.params": {"dtype": "F32", "shape": [GIB // 4], "data_offsets": [0, GIB]}}
    ).encode()
    with zipfile.ZipFile(cz, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("circuit.json", json.dumps(CIRCUIT_JSON))
        _zip_member_of_zeros(zf, "arrays.safetensors", len(header).to_bytes(8, "little") + header, GIB)
    deep = tmp / "deep.cwpc"
    with zipfile.ZipFile(deep, "w") as zf:
        zf.writestr("circuit.json", "[" * 200_000 + "]" * 200_000)
        zf.writestr("arrays.safetensors", (2).to_bytes(8, "little") + b"{}")
    chain = tmp / "chain.psdd"
    _psdd_chain(chain, 5000)
    big = tmp / "big.csv"
    big.write_text("1.0,2.0\n" * 50 + "2.5e19,1.0\n")
    gz = tmp / "bomb.jpc.gz"
    with gzip.open(gz, "wb", compresslevel=9) as f:
        f.write(b"jpc 3\n")
        for _ in range(1024):
            f.write((b"c " + b"x" * 1000 + b"\n") * 1024)
    spn = tmp / "deep.spn"
    spn.write_text("(2)\nv 0 0\nv 0 1\n" + "".join(f"+ {i} 0.0\n" for i in range(1, 200_001)) + "EOF\n")
    payload = tmp / "cells.csv"
    payload.write_text('a,b\n0,1\n1,<img src=q onerror="x()">\n')
    graph = (
        '{"source": "graph", "edges": [{"parent": "s", "child": "a"}], "nodes": [{"id": "a", "kind": '
        '"input", "num_nodes": 10**8, "var": 0}, {"id": "s", "kind": "sum", "num_nodes": 1}]}'
    )
    server = "from workbench.services.circuits import build\nres = build({!r})\nraise ValueError(res.error)"
    return [
        (
            f"npz {npz.stat().st_size / 2**20:.1f} MB inflating to 1 GiB",
            f"from engine.data import load_dataset\nload_dataset({str(npz)!r})",
        ),
        (
            "npy 1 KB declaring (2^20)^2 float64",
            f"from engine.data import load_dataset\nload_dataset({str(npy)!r})",
        ),
        (
            f"circuit zip {cz.stat().st_size / 2**20:.1f} MB inflating to 1 GiB",
            f"import engine\nengine.load({str(cz)!r})",
        ),
        ("circuit.json nested 200k deep", f"import engine\nengine.load({str(deep)!r})"),
        (
            f"PSDD chain 5,000 deep ({chain.stat().st_size // 1024} KB), server build",
            server.format({"source": "file", "path": str(chain)}),
        ),
        (
            "Compose graph num_nodes 1e8, server build",
            f"from workbench.services.circuits import build\nres = build({graph})\nraise ValueError(res.error)",
        ),
        (
            "CSV with a value 2.5e19 (beyond float32 Gaussians)",
            f"from engine.data import load_dataset\nload_dataset({str(big)!r})",
        ),
        (
            f".jpc.gz {gz.stat().st_size / 2**20:.1f} MB inflating to 1 GiB",
            f"import engine\nengine.load({str(gz)!r})",
        ),
        (
            f".spn chain 200k deep ({spn.stat().st_size / 2**20:.1f} MB), server build",
            server.format({"source": "file", "path": str(spn)}),
        ),
        (
            "CSV upload with a script payload cell",
            f"from workbench.services.uploads import save_data_upload\n"
            f"res = save_data_upload('cells.csv', open({str(payload)!r}, 'rb').read())\nraise ValueError(res.error)",
        ),
    ]


def cli_probes(tmp: Path) -> list[tuple[str, list[str]]]:
    base = ["train", "--data", "nltcs", "--latents", "4", "--epochs", "1", "--full-batch-epochs", "0"]
    (tmp / "a-folder").mkdir(exist_ok=True)
    return [
        ("--pseudocount nan", [*base, "--pseudocount", "nan"]),
        ("--tolerance inf", [*base, "--tolerance", "inf"]),
        ("--out a folder", [*base, "--out", str(tmp / "a-folder")]),
        ("--metrics /dev/full", [*base, "--metrics", "/dev/full"]),
        ("--out in a missing folder", [*base, "--out", str(tmp / "no" / "such" / "m.cw")]),
        ("--latents 100000", ["train", "--data", "nltcs", "--latents", "100000", "--epochs", "1"]),
        ("--data a missing file", ["train", "--data", str(tmp / "missing.csv")]),
        ("--block-size 3", [*base, "--block-size", "3"]),
        ("--data a 1 GiB npz bomb", ["train", "--data", str(tmp / "bomb.npz")]),
    ]


SERVER_PROBES = [
    (
        "server SIGTERM: worker stops, run saved, not left running",
        "tests/workbench/test_lifecycle.py::test_sigterm_stops_the_worker_and_saves_the_run",
    ),
    (
        "server SIGKILL: no orphan worker, restart marks run interrupted",
        "tests/workbench/test_lifecycle.py::test_sigkill_leaves_no_orphan_and_restart_marks_the_run_interrupted",
    ),
    ("interrupted/stopped run continues (state and Continue button)", "tests/workbench/test_continue.py"),
    (
        "NaN run (diverging) marked failed, metrics strict JSON",
        "tests/workbench/test_lifecycle.py::test_a_diverging_run_is_marked_failed_and_its_metrics_stay_json",
    ),
    (
        "scripts/start binds 127.0.0.1 only",
        "tests/workbench/test_security.py::test_scripts_start_listens_on_localhost_only",
    ),
    ("another browser cannot list/read/continue a run unless shared", "tests/workbench/test_ownership.py"),
    (
        "run files and archives hold no server paths",
        "tests/workbench/test_security.py::test_run_files_and_archives_hold_no_server_paths",
    ),
    (
        "script payloads in CSV cells and file names render as text (browser)",
        "tests/browser/test_security.py",
    ),
    ("6 concurrent page loads: no off-host request (browser)", "tests/browser/test_offline.py"),
    ("slow build in one session, other session served (browser)", "tests/browser/test_responsiveness.py"),
]


def run_cli(args: list[str]) -> tuple[int, int, str, float]:
    """(exit code, stderr lines, last stderr line, peak MB) of `python -m engine args` in a fresh process."""
    wrapper = (
        "import json, resource, subprocess, sys\n"
        "r = subprocess.run([sys.executable, '-m', 'engine', *sys.argv[1:]], capture_output=True, text=True)\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps({'rc': r.returncode, 'stderr': r.stderr, 'peak': peak}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lines = [ln for ln in res["stderr"].splitlines() if ln.strip()]
    return res["rc"], len(lines), (lines[-1] if lines else ""), res["peak"]


def run_test(node: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-W", "ignore", node],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-200:]
    return ("pass" if r.returncode == 0 else "FAIL") + f" ({tail})", time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-server", action="store_true", help="only the file and CLI probes")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, body in file_probes(tmp):
            outcome, peak = probe(body)
            rows.append(
                {
                    "kind": "file",
                    "probe": name,
                    "outcome": outcome.replace(str(tmp) + "/", "")[:160],
                    "peak_mb": round(peak),
                }
            )
            print(rows[-1], flush=True)
        for name, argv in cli_probes(tmp):
            rc, nlines, last, peak = run_cli(argv)
            rows.append(
                {
                    "kind": "cli",
                    "probe": name,
                    "outcome": f"exit {rc}, {nlines} stderr line(s): {last.replace(str(tmp) + '/', '')[:120]}",
                    "peak_mb": round(peak),
                }
            )
            print(rows[-1], flush=True)
    if not args.skip_server:
        for name, node in SERVER_PROBES:
            outcome, seconds = run_test(node)
            rows.append({"kind": "server", "probe": name, "outcome": outcome, "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
    print("\n| probe | outcome | peak MB / time |\n|---|---|---|")
    for r in rows:
        cost = f"{r['peak_mb']} MB" if "peak_mb" in r else f"{r['seconds']} s"
        print(f"| {r['probe']} | {r['outcome'].replace('|', '/')} | {cost} |")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "cpus": os.cpu_count(),
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
