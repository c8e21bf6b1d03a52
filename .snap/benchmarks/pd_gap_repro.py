"""Why ours and PyJuice 2.6.3 ended at different LLs on PD (vs_pyjuice_pd_h200.json): a reproducer.

    # CPU box (PyJuice through Triton's interpreter; slow, keep it small):
    TRITON_INTERPRET=1 PYTHONPATH=/path/to/pyjuice/site python benchmarks/pd_gap_repro.py --cpu
    # GPU (the H200 configuration, both bridge variants, 234 steps = 2 epochs of 117 batches):
    python benchmarks/pd_gap_repro.py --shape 28 28 --split 4 --latents 16 --steps 234 --json $OUT/pd_gap.json

Trains the same PD circuit from the same initial parameters on the same batches with mini-batch EM
(step 0.1, pseudocount 0.1) in our engine (`zero_flows / accumulate_flows / em_step`) and in
PyJuice (`pyjuice_bridge.make_optimizer(keep_zero_params=True)` + `tutorial_epoch`, as
vs_pyjuice.py does), for two ways of building PyJuice's circuit:

- `dangling_kept`: `to_pyjuice` as it was before `_drop_dangling` (every child of every sum vector
  is passed to `juice.summate`, also those that no block edge reaches). Our PD's sparse mixtures
  (`max_prod_block_conns=4`, one random pick of 4 splits per node block) leave such children
  whenever a box has more than 4 splits; for 28x28 / (4, 4) that is 24% of all sum children at
  PD-16 and PD-32, 10% at PD-64, 2.4% at PD-128, 0.2% at PD-256.
- `dangling_dropped`: the current `to_pyjuice` (such children left out; no value changes).

Per variant it prints / stores the per-step training LL of both systems and the mean LL of held-out
rows after the steps (both evaluated in fp32). Nothing here is timed.

Measured on the 2-core CPU box, 2026-11-30 (PyJuice 2.6.3 through TRITON_INTERPRET=1 and
check_pyjuice_bridge's shim; 8 latents so that PyJuice's tiles stay below 16 and its bf16 dot path,
which the interpreter gets wrong, is not taken; Categorical(256); step 0.1, pseudocount 0.1):

- 8x8, split 2 (4 of 216 sum children dangling), batch 512, 15 steps: dangling_kept: per-step train
  LL gap up to 5.7e-3 nats from step 2 on, held-out LL ours -119.8849 / PyJuice -119.8824;
  dangling_dropped: per-step gap at most 6.5e-5 nats, held-out -119.8849 / -119.8848.
- 12x12, split 2 (246 of 1506 children dangling, 16%; 28x28/(4,4) PD-16 has 24%), batch 256:
  8 steps: dangling_kept: train LL ours - PyJuice -0.39, -0.33, -0.29, -0.26, -0.24, -0.21, -0.20
  nats at steps 2-8 (step 1, before any update: 0), held-out LL ours -253.667 / PyJuice -253.482;
  dangling_dropped (213 children left out where reached): per-step train-LL gap <= 3.4e-4 nats over
  all 8 steps, held-out LL ours -253.6673 / PyJuice -253.6670.
  The sign of the gap is not fixed: it depends on what is left in PyJuice's element-flow scratch rows
  (on the H200, PD-16 ended with PyJuice 10.8 nats lower).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine  # noqa: E402
from engine.data import mnist_like  # noqa: E402
from engine.dists import Categorical  # noqa: E402

STEP, PSEUDO = 0.1, 0.1


def build(shape, split, latents, cats):
    return engine.structures.pd(tuple(shape), latents, (split, split), input_dist=Categorical(cats))


def pj_compile(juice, ns, device):
    if device.type == "cpu":
        from check_pyjuice_bridge import _FakeCudaDevice

        pc = juice.compile(ns, verbose=False, disable_gpu_compilation=True)
        for layer in pc.input_layer_group:
            layer.device = _FakeCudaDevice("cpu")
        return pc
    return juice.compile(ns, verbose=False).to(device)


def run_variant(variant, args, juice, bridge, device, batches, ev):
    torch.manual_seed(0)
    root = build(args.shape, args.split, args.latents, args.cats)  # same seed -> same circuit + params
    ours = engine.compile(root, device=device)
    original = bridge._drop_dangling
    if variant == "dangling_kept":  # the bridge before _drop_dangling: keep every child
        bridge._drop_dangling = lambda s, info: (s, list(s.children))
    try:
        ns, info = bridge.to_pyjuice(root, juice, return_info=True)
    finally:
        bridge._drop_dangling = original
    pj = pj_compile(juice, ns, device)
    init = {
        "ours": float(torch.cat([ours(e, validate=False) for e in ev]).double().mean()),
        "pj": float(torch.cat([bridge.pj_lls(pj, e) for e in ev]).double().mean()),
    }
    opt = bridge.make_optimizer(juice, pj, STEP, PSEUDO, keep_zero_params=True)
    if device.type == "cuda" and args.graphs:
        bridge.record_graphs(pj, batches[0])  # the tutorial's dry run (flows cleared after it)
    ll_o, ll_p = [], []
    t0 = time.time()
    for i, xb in enumerate(batches):
        ll_p.append(bridge.tutorial_epoch(pj, opt, [xb]) / xb.shape[0])
        ours.zero_flows()
        ll_o.append(float(ours.accumulate_flows(xb, validate=False).double().sum()) / xb.shape[0])
        ours.em_step(STEP, PSEUDO)
        if args.verbose and (i < 10 or (i + 1) % 10 == 0):
            print(
                f"  {variant} step {i + 1:4d}: train LL ours {ll_o[-1]:.4f} pj {ll_p[-1]:.4f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    fin = {
        "ours": float(torch.cat([ours(e, validate=False) for e in ev]).double().mean()),
        "pj": float(torch.cat([bridge.pj_lls(pj, e) for e in ev]).double().mean()),
    }
    return {
        "variant": variant,
        "dangling_children_dropped": info.dangling_children,
        "passthrough_sums": bridge.passthrough_sums(pj),
        "num_sums": info.num_sums,
        "init_ll": init,
        "final_ll": fin,
        "final_gap_pct": 100 * (fin["ours"] - fin["pj"]) / abs(fin["pj"]),
        "step_ll_ours": ll_o,
        "step_ll_pj": ll_p,
        "max_step_gap": max(abs(a - b) for a, b in zip(ll_o, ll_p)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="PyJuice on CPU via Triton's interpreter")
    ap.add_argument("--shape", type=int, nargs=2, default=[8, 8])
    ap.add_argument("--split", type=int, default=2)
    ap.add_argument("--latents", type=int, default=16)
    ap.add_argument("--cats", type=int, default=256)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-rows", type=int, default=2048)
    ap.add_argument("--variants", default="dangling_kept,dangling_dropped")
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="GPU: skip record_graphs")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from check_pyjuice_bridge import choose_device

    device = choose_device(args.cpu)
    import pyjuice as juice
    import pyjuice_bridge as bridge

    nv = args.shape[0] * args.shape[1]
    n = args.steps * args.batch
    data = mnist_like(n + args.eval_rows, num_vars=nv, num_cats=args.cats)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(n, generator=g)
    batches = [data[perm[i * args.batch : (i + 1) * args.batch]].to(device) for i in range(args.steps)]
    ev = [data[n + i : n + i + args.batch].to(device) for i in range(0, args.eval_rows, args.batch)]
    info = {
        "device": "cpu (Triton interpreter)" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
        "step_size": STEP,
        "pseudocount": PSEUDO,
        "shape": args.shape,
        "split": args.split,
        "latents": args.latents,
        "cats": args.cats,
        "batch": args.batch,
        "steps": args.steps,
        "eval_rows": args.eval_rows,
    }
    print(info, flush=True)
    out = []
    for variant in args.variants.split(","):
        r = run_variant(variant, args, juice, bridge, device, batches, ev)
        out.append(r)
        print(
            f"{variant:17s} dangling dropped {r['dangling_children_dropped']:4d} | init LL ours "
            f"{r['init_ll']['ours']:.4f} pj {r['init_ll']['pj']:.4f} | after {args.steps} steps ours "
            f"{r['final_ll']['ours']:.4f} pj {r['final_ll']['pj']:.4f} gap {r['final_gap_pct']:+.3f}% | "
            f"max per-step train-LL gap {r['max_step_gap']:.2e}",
            flush=True,
        )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({**info, "results": out}, fh, indent=1)


if __name__ == "__main__":
    main()
