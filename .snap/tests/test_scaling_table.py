"""benchmarks/scaling.py --table: the README's data-parallel rows come from the saved result files."""

from __future__ import annotations

import json
import os
import sys

import pytest

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


# the README's rows of each round (benchmarks/README.md), and the line of that round's A/B
ROUNDS = {
    "round4": [
        "hclt-256     2 |     0.556  1.84    14.5 |    1.099  1.81 |       1.98",
        "hclt-512     2 |     1.587  1.86    13.1 |    3.193  1.86 |       2.01",
        "pd-128       2 |     0.563  1.88     9.9 |    0.938  1.85 |       1.67",
        "chunks 0 MiB: 0.559 s/ep, scaling 1.83",  # the chunked-statistics A/B
    ],
    "round5b": [
        "hclt-256     2 |     0.544  1.89    14.5 |    1.109  1.82 |       2.04",
        "hclt-512     2 |     1.561  1.91    13.7 |    3.174  1.86 |       2.03",
        "pd-128       2 |     0.560  1.90     9.9 |    0.973  1.83 |       1.74",
        "pd-256       2 |     1.574  1.93    10.3 |    2.867  1.88 |       1.82",
        "EM after every all-reduce: 0.548 s/ep, scaling 1.87",  # the deferred-wait A/B
    ],
    "round6": [
        "hclt-256     2 |     0.535  1.91    15.0 |    1.081  1.84 |       2.02",
        "hclt-512     2 |     1.541  1.93    13.4 |    3.172  1.87 |       2.06",
        "pd-128       2 |     0.555  1.91    10.3 |    0.936  1.87 |       1.69",
        "pd-256       2 |     1.560  1.95    10.0 |    2.831  1.89 |       1.81",
        "normal-priority NCCL: 0.540 s/ep, scaling 1.89",  # the NCCL stream-priority A/B
    ],
}


@pytest.mark.parametrize("tag", sorted(ROUNDS))
def test_round_rows(capsys, tag):
    out = table(capsys, tag)
    missing = [line for line in ROUNDS[tag] if line not in out]
    assert not missing, f"{tag}: not in the printed table: {missing}\n{out}"
