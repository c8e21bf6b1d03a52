"""benchmarks/vs_pyjuice.py off the GPU: its tables from saved JSON (against the numbers published in
benchmarks/README.md), the batch-size curve's cliff check, the EM-settings check, and our side of the
run on a CPU stand-in (PD-16 on a few hundred rows) written to JSON and read back by `--table`."""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import step_floor  # noqa: E402
import vs_pyjuice as vs  # noqa: E402
import vs_pyjuice_plan as plan  # noqa: E402
import vs_pyjuice_table as tbl  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")


def test_table_reproduces_the_published_rows():
    """The README's HCLT/PD table (2026-11-30) came from these two files; --table prints its rows."""
    docs = [tbl.load(os.path.join(RESULTS, f"vs_pyjuice_{k}_h200.json")) for k in ("hclt", "pd")]
    out = tbl.render(docs)
    assert (
        "| HCLT-256 | 1.274 | 1.274 | 1.00 | 1.707 | 1.996 | 1.57x | 2.456 | 2.54 | 2.49 | 0.62 / 3.9 |"
        in out
    )
    assert "| PD-128 | 1.154 | 1.154 | 1.00 | 1.466 | 1.738 | 1.51x | 1.703 | 1.78 | 2.48 |" in out
    assert "-702.20 | -702.15 | 0.01% |" in out
    assert "ratio 1.003" in out  # the CLI-vs-fit check of the HCLT file
    assert "4.24 TB/s" in out


def test_table_reproduces_the_round3_rows():
    """The README's round-3 tables (issue 11, 2026-11-30 12:00 and 12:05 UTC) came from these files."""
    docs = [tbl.load(os.path.join(RESULTS, f"vs_pyjuice_{k}_h200_round3.json")) for k in ("hclt", "pd")]
    out = tbl.render(docs)
    assert "| HCLT-256 | 1.123 | 1.124 | 1.00 | 1.540 | 1.970 | 1.75x |" in out
    assert "| PD-128 | 1.090 | 1.092 | 1.00 | 1.396 | 1.737 | 1.59x |" in out
    assert "| HCLT-256 | 4096 | 14 | 0.860 | 66,652 | 1.222 | 46,934 | 1.42x |" in out  # the curve
    assert "no cliff" in out


def test_table_reproduces_the_round4_rows():
    """The README's round-4 tables (issue 11, 2026-11-30 13:59 and 14:06 UTC) came from these files."""
    docs = [tbl.load(os.path.join(RESULTS, f"vs_pyjuice_{k}_h200_round4.json")) for k in ("hclt", "pd")]
    out = tbl.render(docs)
    assert "| HCLT-128 | 0.438 | 0.438 | 1.00 | 0.616 | 0.864 | 1.97x |" in out
    assert "| HCLT-512 | 2.973 | 2.958 | 1.01 | 4.224 | 5.969 | 2.01x |" in out
    assert "| PD-128 | 1.057 | 1.057 | 1.00 | 1.361 | 1.760 | 1.66x |" in out
    assert "| HCLT-256 | 4096 | 14 | 0.816 | 70,315 | 1.216 | 47,156 | 1.49x |" in out  # the curve
    assert "no cliff" in out


def test_table_reproduces_the_round5_rows():
    """The README's round-5 table (issue 11, 2026-11-30 21:59-22:13 UTC) came from these three files."""
    names = ("hclt_h200_round5_partial", "pd_h200_round5_partial", "h200_round5b")
    docs = [tbl.load(os.path.join(RESULTS, f"vs_pyjuice_{n}.json")) for n in names]
    out = tbl.render(docs)
    assert "| HCLT-128 | 0.418 | 0.418 | 1.00 | 0.628 | 0.815 | 1.95x |" in out
    assert "| PD-64 | 0.367 | 0.367 | 1.00 | 0.515 | 0.739 | 2.01x |" in out
    assert "| PD-128 | 0.935 | 0.935 | 1.00 | 1.236 | 1.726 | 1.85x |" in out
    assert "| PD-256 | 2.894 | 2.893 | 1.00 | 3.769 | 5.305 | 1.83x |" in out
    assert "| HCLT-256 | 1.019 | 1.017 | 1.00 | 1.430 | 1.939 | 1.90x |" in out


def test_table_reproduces_the_round8_rows():
    """The README's round-8 tables (issue 11, 2026-12-01 10:08-10:26 UTC) came from these files."""
    names = ("hclt_h200_round8", "pd_h200_round8")
    out = tbl.render([tbl.load(os.path.join(RESULTS, f"vs_pyjuice_{n}.json")) for n in names])
    assert "| HCLT-512 | 2.586 | 2.584 | 1.00 | 3.458 | 5.915 | 2.29x | - | 5.73 | 5.89 |" in out
    assert "| PD-128 | 0.872 | 0.871 | 1.00 | 1.143 | 1.747 | 2.00x | - | 1.90 | 2.52 |" in out
    assert "| PD-128 | 4096 | 14 | 0.754 | 76,085 | 1.381 | 41,527 | 1.83x | 3.4x | 10.58 | 14.99 |" in out
    assert "no cliff" in out
    again = tbl.render([tbl.load(os.path.join(RESULTS, "vs_pyjuice_hclt256_h200_round8b.json"))])
    assert "| HCLT-256 | 128 | 468 | 1.702 | 35,198 | 5.034 | 11,900 | 2.96x | 3.9x | 1.28 | 1.33 |" in again


def test_table_rejects_a_file_that_is_not_a_result(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="no 'results' list"):
        tbl.load(str(bad))
    with pytest.raises(SystemExit, match="cannot read"):
        tbl.load(str(tmp_path / "missing.json"))


def _curve_doc(pj_epochs: dict[int, float]) -> dict:
    """HCLT-256 at several batch sizes: ours 1.0 s per epoch everywhere, PyJuice as given."""
    rows = []
    for bs, pj in pj_epochs.items():
        nb = 60000 // bs
        rows.append(
            {
                "config": "hclt-256",
                "batch_size": bs,
                "ours": {"epoch_s": 1.0, "em": {"steps_per_epoch": nb}, "ll": -700.0},
                "pyjuice": {"epoch_s": pj, "ll": -700.5},
            }
        )
    return {"results": rows, "ceilings": {}}


def test_curve_reports_a_cliff_and_only_a_cliff():
    flat = tbl.curve_table([_curve_doc({256: 2.0, 512: 2.0, 1024: 1.9})])
    assert "no cliff" in flat
    # 60000 // 1024 = 58 steps of 1024 = 59,392 samples: 1.0 s ours, 1.9 s PyJuice
    assert "| HCLT-256 | 1024 | 58 | 1.000 | 59,392 | 1.900 | 31,259 | 1.90x |" in flat
    cliff = tbl.curve_table([_curve_doc({256: 2.0, 512: 2.0, 2048: 4.0})])  # 29 x 2048 in 4 s
    assert "HCLT-256: cliff, pyjuice at batch 2048: 14,848 samples/s, 50% below batch 512" in cliff
    assert "ours" not in cliff.split("cliff")[-1]


def test_em_settings_checked_equal():
    ours = {"em": {"batch_size": 512, "steps_per_epoch": 117, "step_sizes": [0.1, 0.1], "pseudocount": 0.1}}
    pj = {"em": {**ours["em"], "niters_per_update": 1}}
    assert vs.em_mismatch({"ours": ours, "pyjuice": pj}) is None
    pj2 = copy.deepcopy(pj)
    pj2["em"]["step_sizes"] = [0.1, 0.05]
    pj2["em"]["niters_per_update"] = 2
    assert vs.em_mismatch({"ours": ours, "pyjuice": pj2}) == "step_sizes, niters_per_update"


def test_configs_runs_and_estimate():
    assert plan.parse_configs(["hclt:16,32", "pd:128"]) == [("hclt", 16), ("hclt", 32), ("pd", 128)]
    for bad in ("hclt", "rat:16", "pd:1x"):
        with pytest.raises(SystemExit, match="--configs"):
            plan.parse_configs([bad])
    args = vs.build_parser().parse_args(
        "--configs pd:16,128 --curve pd:128 --curve-batch-sizes 4096 128 512 --eager-batches 0".split()
    )
    # main runs first (the curve's 512 point is one), then the other curve points, ascending
    runs = plan.plan_runs(args)
    assert runs == [
        ("pd", 16, 512, True),
        ("pd", 128, 512, True),
        ("pd", 128, 128, False),
        ("pd", 128, 4096, False),
    ]
    est = plan.estimate_seconds(runs, args)
    assert list(est["per_run_s"]) == ["pd-16@512", "pd-128@512", "pd-128@128", "pd-128@4096"]
    assert est["per_run_s"]["pd-128@128"] > est["per_run_s"]["pd-128@4096"]  # more steps an epoch
    assert est["per_run_s"]["pd-128@512"] > est["per_run_s"]["pd-128@4096"]  # the structure built once
    assert est["total_s"] == pytest.approx(plan.FIXED_S + sum(est["per_run_s"].values()))
    extra = vs.build_parser().parse_args(
        "--configs pd:16,128 --extra-precision bf16 --eager-batches 0".split()
    )
    assert (
        plan.estimate_seconds(plan.plan_runs(extra), extra)["per_run_s"]["pd-128@512"]
        > est["per_run_s"]["pd-128@512"]
    )
    big = vs.build_parser().parse_args("--configs pd:512".split())  # not measured: scaled from PD-256
    assert (
        plan.estimate_seconds(plan.plan_runs(big), big)["total_s"]
        > plan.estimate_seconds(
            plan.plan_runs(vs.build_parser().parse_args("--configs pd:256".split())), big
        )["total_s"]
    )


@pytest.fixture
def cpu_stand_in(monkeypatch):
    """Our side of vs_pyjuice on the CPU over 256 rows, with made-up ceilings; one intra-op thread (on
    a shared CPU, spinning intra-op threads made the run 20x slower)."""
    monkeypatch.setattr(vs, "DEV", "cpu")
    monkeypatch.setattr(vs, "NUM_ROWS", 256)
    monkeypatch.setattr(vs, "LL_ROWS", 64)
    ceil = {"copy_GBps": 4000.0, "matmul_tf32_TFLOPs": 400.0, "matmul_bf16_TFLOPs": 800.0}
    monkeypatch.setattr(vs, "ceilings", lambda: ceil)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_run_over_budget_is_skipped_and_listed(cpu_stand_in, tmp_path, capsys):
    out = tmp_path / "r.json"
    vs.main("--configs pd:16 --batch-sizes 64 --no-pyjuice --budget-s 1 --out".split() + [str(out)])
    doc = json.loads(out.read_text())
    assert doc["results"] == [] and doc["skipped"] == ["pd-16@64"]
    capsys.readouterr()
    vs.main(["--table", str(out)])
    assert "not run (over --budget-s): pd-16@64" in capsys.readouterr().out


def test_our_side_on_a_cpu_stand_in(cpu_stand_in, tmp_path, capsys):
    """The whole flow with --no-pyjuice on the CPU: the JSON has each batch size's row with our EM
    settings, the captured step and the floor of the compiled plan, the opt-in precision on the main
    run only; --table prints all three tables."""
    out = tmp_path / "r.json"
    cmd = "--configs pd:16 --batch-sizes 64 --curve pd:16 --curve-batch-sizes 32 --extra-precision bf16"
    vs.main(cmd.split() + ["--no-pyjuice", "--eager-batches", "0", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert [(r["batch_size"], r["main"]) for r in doc["results"]] == [(64, True), (32, False)]
    assert "ours_bf16" not in doc["results"][1] and doc["results"][0]["ours_bf16"]["precision"] == "bf16"
    plan = vs.engine.compile(vs.ours_build("pd", 16, None)).plan
    for r in doc["results"]:
        o = r["ours"]
        assert o["em"]["steps_per_epoch"] == 256 // r["batch_size"] == o["step"]["batches"]
        assert o["em"]["step_sizes"] == [0.1, 0.1] and o["em"]["pseudocount"] == 0.1
        assert o["precision"] == "tf32x3"
        assert o["floor"] == step_floor.to_dict(step_floor.step_floor(plan, r["batch_size"]))
    capsys.readouterr()
    vs.main(["--table", str(out)])
    text = capsys.readouterr().out
    assert "| PD-16 | 64 | bf16 |" in text and "| PD-16 | 64 | tf32x3 |" in text  # the floor table
    assert "| PD-16 | 32 | 8 |" in text  # the curve: 256 // 32 steps an epoch
    assert "| config | fit | step | fit / step |" in text  # the main table: batch 64 only, no batch column
    assert "| PD-16 | 64 | 4 |" in text  # ... and the curve's 64 point is that main run
