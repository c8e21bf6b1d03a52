"""Homogeneous (tied) HMM training on the GPU: mini-batch EM replayed as CUDA graphs against an eager twin.

    python scripts/check_tied_hmm_gpu.py --seq-length 128 --latents 128 --emits 32 --batches 200

A teacher homogeneous HMM with peaked random parameters samples the data; two students with the same
random start train on the same batches, one through `CapturedStep` (the tie reduction captured in the
graph), one eagerly. Prints one JSON line: parameter counts (learnable vs slots), graph replays and
capture failure (None when captured), the largest parameter difference between the two students,
whether every tied copy still equals its source, and held-out log-likelihoods (nats per sequence).
On a machine without CUDA it runs everything eagerly on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, ".")  # run from the repository root without installing it
import engine  # noqa: E402
from engine.kernels.graph import CapturedStep  # noqa: E402
from engine.nodes import InputNodes, SumNodes, normalize_sum_params  # noqa: E402
from engine.queries import sample  # noqa: E402
from engine.structures import hmm  # noqa: E402


def peaked(root, gen: torch.Generator):
    """Give every tie source peaked random parameters (copies take them at compile time)."""
    for v in root.topological():
        if v.tied_to is not None or not isinstance(v, (SumNodes, InputNodes)):
            continue
        p = torch.rand(v.params.shape, generator=gen) ** 6 + 1e-3
        if isinstance(v, SumNodes):
            v.params = normalize_sum_params(p, v.edge_ids[0], v.num_blocks)
        elif isinstance(v, InputNodes):
            v.params = p / p.sum(1, keepdim=True)
    return root


def copies_equal(pc) -> bool:
    return all(
        torch.equal(v.params, v.tied_to.params)
        for v in pc.sync_to_nodes().topological()
        if v.tied_to is not None
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--latents", type=int, default=128)
    ap.add_argument("--emits", type=int, default=32)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--step-size", type=float, default=0.1)
    ap.add_argument("--pseudocount", type=float, default=0.1)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    teacher = engine.compile(peaked(hmm(a.seq_length, a.latents, a.emits, homogeneous=True), gen), device=dev)
    x = sample(teacher, a.batch_size * 8)
    held = sample(teacher, 2048)
    torch.manual_seed(1)
    root = hmm(a.seq_length, a.latents, a.emits, homogeneous=True)
    graph_pc = engine.compile(root, device=dev)
    eager_pc = engine.compile(
        root, device=dev
    )  # each compile copies the parameters (no deepcopy: a 128-deep DAG overflows it)
    em = (a.step_size, a.pseudocount)
    graph_step = CapturedStep(graph_pc, a.batch_size, em=em)
    eager_step = CapturedStep(eager_pc, a.batch_size, em=em, enabled=False)
    before = float(graph_pc(held).double().mean())
    t0 = time.perf_counter()
    for i in range(a.batches):
        xb = x[(i % 8) * a.batch_size : (i % 8 + 1) * a.batch_size]
        graph_step(xb)
        eager_step(xb)
    if dev == "cuda":
        torch.cuda.synchronize()
    out = {
        "device": dev,
        "seq_length": a.seq_length,
        "latents": a.latents,
        "emits": a.emits,
        "num_parameters": graph_pc.num_parameters(),
        "untied_would_be": engine.compile(hmm(a.seq_length, a.latents, a.emits)).num_parameters(),
        "param_slots": graph_pc.plan.num_params + graph_pc.plan.num_input_params,
        "graph_replays": graph_step.replays,
        "graph_failed": graph_step.failed,
        "max_param_diff_graph_vs_eager": float((graph_pc.params - eager_pc.params).abs().max()),
        "copies_equal_sources": copies_equal(graph_pc) and copies_equal(eager_pc),
        "heldout_ll_start": before,
        "heldout_ll_graph": float(graph_pc(held).double().mean()),
        "heldout_ll_eager": float(eager_pc(held).double().mean()),
        "heldout_ll_teacher": float(teacher(held).double().mean()),
        "seconds_both_students": round(time.perf_counter() - t0, 2),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
