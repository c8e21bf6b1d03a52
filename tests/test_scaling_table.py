"""benchmarks/scaling.py --table: the README's data-parallel rows come from the saved result files."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import scaling  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")


def table(capsys, tag: str) -> str:
    """The printed table of the 1- and 2-GPU result files of one round."""
    runs = []
    for gpus in (1, 2):
        with open(os.path.join(RESULTS, f"scaling_h200x2_{gpus}gpu_{tag}.json")) as f:
            runs.append(json.load(f))
    scaling.print_table(runs)
    return capsys.readouterr().out


def test_round4_rows(capsys):
    out = table(capsys, "round4")
    assert "hclt-256     2 |     0.556  1.84    14.5 |    1.099  1.81 |       1.98" in out
    assert "hclt-512     2 |     1.587  1.86    13.1 |    3.193  1.86 |       2.01" in out
    assert "pd-128       2 |     0.563  1.88     9.9 |    0.938  1.85 |       1.67" in out
    assert "chunks 0 MiB: 0.559 s/ep, scaling 1.83" in out  # the chunked-statistics A/B


def test_round5_rows(capsys):
    out = table(capsys, "round5b")
    assert "hclt-256     2 |     0.544  1.89    14.5 |    1.109  1.82 |       2.04" in out
    assert "hclt-512     2 |     1.561  1.91    13.7 |    3.174  1.86 |       2.03" in out
    assert "pd-128       2 |     0.560  1.90     9.9 |    0.973  1.83 |       1.74" in out
    assert "pd-256       2 |     1.574  1.93    10.3 |    2.867  1.88 |       1.82" in out
    assert "EM after every all-reduce: 0.548 s/ep, scaling 1.87" in out  # the deferred-wait A/B


def test_round6_rows(capsys):
    out = table(capsys, "round6")
    assert "hclt-256     2 |     0.535  1.91    15.0 |    1.081  1.84 |       2.02" in out
    assert "hclt-512     2 |     1.541  1.93    13.4 |    3.172  1.87 |       2.06" in out
    assert "pd-128       2 |     0.555  1.91    10.3 |    0.936  1.87 |       1.69" in out
    assert "pd-256       2 |     1.560  1.95    10.0 |    2.831  1.89 |       1.81" in out
    assert "normal-priority NCCL: 0.540 s/ep, scaling 1.89" in out  # the priority A/B
