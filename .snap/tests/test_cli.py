"""The train CLI as a user runs it: metrics file, saved model, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import engine

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "engine", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_train_writes_metrics_and_a_loadable_model(tmp_path):
    metrics, out = tmp_path / "m.jsonl", tmp_path / "model.cw"
    r = run_cli(
        "train",
        "--structure",
        "hclt",
        "--data",
        "nltcs",
        "--latents",
        "4",
        "--epochs",
        "2",
        "--full-batch-epochs",
        "1",
        "--metrics",
        str(metrics),
        "--out",
        str(out),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert {"train_ll", "valid_ll", "test_ll"} <= row.keys()
        assert -16 < row["test_ll"] < 0  # 16 binary variables: at worst 16 ln 2 = 11.1 nats
    final = json.loads(r.stdout.strip().splitlines()[-1])
    pc = engine.load(out)
    from engine.data import load_dataset

    ds = load_dataset("nltcs")
    assert abs(pc(ds.test).double().mean().item() - final["test_ll"]) < 1e-4


def test_train_on_a_user_npy_file_with_profiling(tmp_path):
    data = np.random.RandomState(0).randint(0, 3, size=(300, 5))
    path = tmp_path / "d.npy"
    np.save(path, data)
    metrics = tmp_path / "m.jsonl"
    r = run_cli(
        "train",
        "--structure",
        "rat_spn",
        "--data",
        str(path),
        "--latents",
        "4",
        "--epochs",
        "1",
        "--full-batch-epochs",
        "0",
        "--metrics",
        str(metrics),
        "--profile",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    kinds = {e["type"] for e in events}
    assert {"epoch", "layer_time", "memory"} <= kinds
    passes = {e["pass"] for e in events if e["type"] == "layer_time"}
    assert {"forward", "backward", "recompute"} <= passes


def test_bad_inputs_give_a_message_not_a_traceback(tmp_path):
    r = run_cli("train", "--data", "no_such_dataset", "--epochs", "1")
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3,nan\n")
    r = run_cli("train", "--data", str(bad), "--epochs", "1")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = run_cli("train", "--data", "plants", "--structure", "pd", "--epochs", "1")
    assert r.returncode == 2 and "square" in r.stderr


def test_plan_command_prints_json():
    r = run_cli("plan", "--data", "nltcs", "--latents", "8")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["format"] == "layer-plan" and plan["num_vars"] == 16
    assert torch.tensor([layer["num_nodes"] for layer in plan["layers"]]).sum() > 0
