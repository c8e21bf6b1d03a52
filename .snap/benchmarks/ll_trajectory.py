"""Diagnostic: log-likelihood along one mini-batch EM run, per backend, on the same circuit.

    python benchmarks/ll_trajectory.py --config hclt:128 --backends triton-graph torch --every 20

Builds one circuit (a deep copy per backend), trains each with identical batches (step 0.1,
pseudocount 0.1, batch 512, as vs_pyjuice.py) and prints the mean LL on 4,096 held samples every
`--every` batches, plus whether any parameter became non-finite. Used to tell a training-dynamics
outlier from an arithmetic one: if the backends agree the kernels are not the cause.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch

sys.path.insert(0, ".")
import engine  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.dists import Categorical  # noqa: E402

BATCH, STEP, PSEUDO = 512, 0.1, 0.1


def build(config: str, data):
    kind, nl = config.split(":")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "hclt":
        return engine.structures.hclt(data, int(nl), input_dist=Categorical(256), device=dev)
    return engine.structures.pd((28, 28), int(nl), (4, 4), input_dist=Categorical(256))


def mean_ll(pc, x) -> float:
    with torch.no_grad():
        return sum(
            pc(x[i : i + BATCH], validate=False).double().sum().item() for i in range(0, len(x), BATCH)
        ) / len(x)


def trajectory(root, backend: str, data, held, batches: int, every: int) -> list[dict]:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = backend.replace("-graph", "")
    pc = engine.compile(copy.deepcopy(root), device=dev, backend=name)
    step = None
    if backend.endswith("-graph"):
        from engine.kernels.graph import CapturedStep

        step = CapturedStep(pc, BATCH, em=(STEP, PSEUDO))
    out = []
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(data.shape[0], generator=g)
    for b in range(batches):
        x = data[perm[(b * BATCH) % len(perm) :][:BATCH]].to(dev)
        if step is not None and x.shape[0] == BATCH:
            step(x)
        else:
            pc.zero_flows()
            pc.accumulate_flows(x, validate=False)
            pc.em_step(STEP, PSEUDO)
        if (b + 1) % every == 0 or b + 1 == batches:
            finite = bool(torch.isfinite(pc.params).all()) and all(
                bool(torch.isfinite(pc.input_params(i)).all()) for i in range(len(pc.input_layers))
            )
            row = {"backend": backend, "batch": b + 1, "ll": mean_ll(pc, held), "finite": finite}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="hclt:128")
    ap.add_argument("--backends", nargs="+", default=["triton-graph", "torch"])
    ap.add_argument("--samples", type=int, default=60000)
    ap.add_argument("--batches", type=int, default=118)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = mnist_like(args.samples)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    root = build(args.config, data.to(dev))
    held = data[:4096].to(dev)
    rows = [r for b in args.backends for r in trajectory(root, b, data, held, args.batches, args.every)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
