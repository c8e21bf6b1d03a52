"""Every error a user can cause in the CLI is one `error:` line on stderr and exit code 2, and a bad
output path is found before training (the run would otherwise be lost)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--latents", "2", "--epochs", "1", "--full-batch-epochs", "0", "--quiet"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(r: subprocess.CompletedProcess, match: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and match in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--pseudocount", "nan"], "--pseudocount: 'nan' must be a finite number"),
        (["--pseudocount", "inf"], "must be a finite number"),
        (["--tolerance", "inf"], "--tolerance: 'inf' must be a finite number"),
        (["--tolerance", "nan"], "must be a finite number"),
        (["--step-size", "2"], "--step-size: 2 must be <= 1.0"),
        (["--latents", "0"], "--latents: 0 must be >= 1"),
        (["--batch-size", "-5"], "must be >= 1"),
        (["--epochs", "1e400"], "is not a valid int"),
    ],
)
def test_bad_hyper_parameters(args, match):
    assert_one_line_error(run_cli("train", "--data", "nltcs", *QUICK, *args), match)


def test_output_paths_are_checked_before_training(tmp_path):
    metrics = tmp_path / "m.jsonl"
    r = run_cli("train", "--data", "nltcs", *QUICK, "--metrics", str(metrics), "--out", str(tmp_path))
    assert_one_line_error(r, "it is a folder")
    assert not metrics.exists() or metrics.read_text() == ""  # training never started
    assert_one_line_error(
        run_cli("train", "--data", "nltcs", *QUICK, "--metrics", "/dev/full"), "cannot write /dev/full"
    )
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert_one_line_error(
        run_cli("train", "--data", "nltcs", *QUICK, "--out", str(blocked / "m.cw")), "cannot write"
    )


def test_hostile_files_are_one_line_errors(tmp_path):
    deep = tmp_path / "deep.npz"
    with zipfile.ZipFile(deep, "w") as zf:
        zf.writestr(
            "x.npy",
            b"\x93NUMPY\x01\x00"
            + (118).to_bytes(2, "little")
            + b"{'descr': '<f8', 'fortran_order': False, 'shape': (1048576, 1048576), }".ljust(117)
            + b"\n",
        )
    assert_one_line_error(run_cli("train", "--data", str(deep), *QUICK), "truncated or corrupt")
    assert_one_line_error(run_cli("plan", "--data", str(deep)), "truncated or corrupt")


def _mem_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


@pytest.mark.skipif(_mem_total_gb() > 64, reason="a machine this large may grant the 40 GB allocation")
def test_a_circuit_too_large_for_memory_is_one_line():
    r = run_cli("train", "--data", "nltcs", "--latents", "100000", "--epochs", "1", "--quiet")
    assert_one_line_error(r, "out of memory")
