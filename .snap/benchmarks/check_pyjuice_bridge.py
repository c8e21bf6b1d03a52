"""Check `benchmarks/pyjuice_bridge.py`: the same circuit in both engines gives the same numbers.

    python benchmarks/check_pyjuice_bridge.py                      # GPU: tiny + MNIST-sized circuits
    python benchmarks/check_pyjuice_bridge.py --sizes tiny --json $OUT/bridge.json
    TRITON_INTERPRET=1 python benchmarks/check_pyjuice_bridge.py --cpu   # CPU box, tiny only (slow)

Per circuit (ours built by engine.structures, converted by `to_pyjuice`):

1. initial log-likelihoods on the same data: max |ours - PyJuice| with PyJuice in fp32 (asserted
   below 1e-3 relative to max |LL|) and, on a GPU, with PyJuice's default bf16 tiles (printed);
2. tiny circuits only: the parameter flows of one batch against a float64 autograd reference
   (flow of a weight = weight * d sum(LL) / d weight), for ours and for PyJuice; where the circuit
   has sum children without edges, also for PyJuice with them kept (`drop_dangling=False`), which
   shows PyJuice's stale-flow problem (`pj_bad_vectors` > 0);
3. `--steps` mini-batch EM steps on both from that same state on the same batches, PyJuice run
   with its tutorial loop (`record_graphs` dry run on a GPU, `MiniBatchEM`, `lls.mean().backward()`,
   `optimizer.step()`), ours with `zero_flows / accumulate_flows / em_step`; per-step LLs and the LL
   gap after the steps, for PyJuice's default `keep_zero_params=False` and for `True` (which keeps
   the pass-through sums PyJuice's compiler inserts exact).

`--cpu` runs PyJuice on a CPU-only torch through Triton's interpreter. PyJuice 2.6.3 cannot run on
CPU as shipped; this script then patches, for its own process only: `torch.cuda.current_device` and
`torch.cuda.device` (`TensorCircuit._init_layers` calls both unconditionally), `Tensor.cuda`
(`InputLayer._get_num_nodes_gcd` and `layer/compilation.py` call `.cuda()`), the input layers'
`device` (`InputLayer.forward/backward/mini_batch_em` raise NotImplementedError unless
`"cuda" in self.device.type`), and `tl.extra.cuda.libdevice` (`log1p`, `pow`, `ceil`: CUDA
libdevice calls the interpreter cannot run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
import engine  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.nodes import InputNodes, ProdNodes, SumNodes  # noqa: E402

STEP, PSEUDO = 0.1, 0.1


# ----------------------------------------------------------------------------- CPU-only shim
class _FakeCudaDevice(str):
    """Parsed by torch as "cpu"; passes PyJuice's `"cuda" in layer.device.type` checks."""

    type = "cuda"
    index = None


@triton.jit
def _log1p(x):
    return tl.log(1.0 + x)


@triton.jit
def _pow(x, y):
    return tl.exp(y * tl.log(x))


def install_cpu_shim():
    """Patch torch/triton so that PyJuice compiles and runs on CPU tensors (this process only)."""
    import contextlib
    import types

    tl.extra.cuda.libdevice = types.SimpleNamespace(log1p=_log1p, pow=_pow, ceil=tl.math.ceil)

    class _NoDevice(contextlib.nullcontext):
        def __init__(self, *args, **kwargs):
            super().__init__()

    torch.cuda.current_device = lambda: 0
    torch.cuda.device = _NoDevice
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def pj_compile(juice, ns, device):
    t0 = time.perf_counter()
    if device.type == "cpu":
        pc = juice.compile(ns, verbose=False, disable_gpu_compilation=True)
        for layer in pc.input_layer_group:
            layer.device = _FakeCudaDevice("cpu")
    else:
        pc = juice.compile(ns, verbose=False).to(device)
    return pc, time.perf_counter() - t0


# ----------------------------------------------------------------------------- circuits
def circuits(sizes, device):
    g = torch.Generator().manual_seed(0)
    out = []
    if "tiny" in sizes:
        x8 = torch.randint(0, 3, (256, 8), generator=g)
        out.append(("hclt4-8vars", lambda: engine.structures.hclt(x8, 4, input_dist=Categorical(3)), x8))
        x16 = torch.randint(0, 4, (256, 16), generator=g)
        out.append(
            ("pd4x4-4-split1", lambda: engine.structures.pd((4, 4), 4, 1, input_dist=Categorical(4)), x16)
        )
        out.append(
            ("pd4x4-8-split2", lambda: engine.structures.pd((4, 4), 8, 2, input_dist=Categorical(4)), x16)
        )
        x3 = torch.randint(0, 3, (256, 3), generator=g)
        out.append(("passthrough-min", lambda: _passthrough_min(), x3))
    if "mnist" in sizes:
        from engine.data import mnist_like

        data = mnist_like(12288).to(torch.uint8)
        out.append(
            (
                "hclt16-mnist",
                lambda: engine.structures.hclt(
                    data[:8192].to(device).long(), 16, input_dist=Categorical(256), device=device
                ),
                data,
            )
        )
        out.append(
            (
                "pd16-mnist",
                lambda: engine.structures.pd((28, 28), 16, (4, 4), input_dist=Categorical(256)),
                data,
            )
        )
    return out


def _passthrough_min():
    """root = sum(prod(sum(prod(x0, x1)), x2), prod(x0, x1, x2)): PyJuice inserts one pass-through sum."""
    d = Categorical(3)
    i0, i1, i2 = (engine.inputs(v, 4, d) for v in range(3))
    j0, j1, j2 = (engine.inputs(v, 4, d) for v in range(3))
    inner = engine.summate(engine.multiply(i0, i1), num_nodes=4)
    return engine.summate(engine.multiply(inner, i2), engine.multiply(j0, j1, j2), num_nodes=1)


# ----------------------------------------------------------------------------- float64 reference
def reference_flows(root, x):
    """Sum-parameter flows of batch `x` by autograd in float64: {sum uid: [E, bs, bs]}."""
    order = root.topological()
    P = {
        v.uid: v.params.double().clone().requires_grad_(True)
        for v in order
        if isinstance(v, (SumNodes, InputNodes))
    }
    val = {}
    for v in order:
        if isinstance(v, InputNodes):
            val[v.uid] = P[v.uid].clamp_min(1e-300).log()[:, x[:, v.var].long()].T  # Categorical only
        elif isinstance(v, ProdNodes):
            e = torch.as_tensor(v.node_edges())
            val[v.uid] = sum(val[c.uid][:, e[:, k]] for k, c in enumerate(v.children))
        else:
            bs = v.block_size
            ch = torch.cat([val[c.uid] for c in v.children], 1)
            ei = torch.as_tensor(v.edge_ids)
            W = torch.zeros(v.num_blocks, ch.shape[1] // bs, bs, bs, dtype=torch.float64)
            W = W.index_put((ei[0], ei[1]), P[v.uid]).permute(0, 2, 1, 3).reshape(v.num_nodes, -1)
            val[v.uid] = torch.logsumexp(ch[:, None, :] + W.clamp_min(1e-300).log()[None], 2)
    val[root.uid][:, 0].sum().backward()
    return {uid: (p.grad * p.detach()) for uid, p in P.items() if p.dim() == 3}


def our_param_flows(pc):
    """Our flat parameter flows cut back into per-vector `[E, bs, bs]` tensors."""
    from engine.executor.tensors import scatter_sum_params

    sums = {uid: copy.copy(s) for uid, s in pc._vectors.items() if s.kind == "sum"}
    scatter_sum_params(pc.param_flows, pc.plan, sums)
    return {uid: s.params for uid, s in sums.items()}


def pj_param_flows(pj):
    pj.update_param_flows()
    out = {}
    for ns in pj.root_ns:
        if ns.is_sum() and hasattr(ns, "_cw_uid"):
            out[ns._cw_uid] = ns
    return out


def flow_errors(root, ours, pj, x, bridge):
    ref = reference_flows(root, x.cpu())
    ours.zero_flows()
    ours.accumulate_flows(x.to(ours.device), validate=False)
    mine = our_param_flows(ours)
    pj.init_param_flows(flows_memory=0.0)
    lls = pj(x.to(pj.device).long())
    lls.mean().backward()
    pjn = pj_param_flows(pj)
    pj.init_param_flows(flows_memory=0.0)
    ours.zero_flows()
    e_ours = e_pj = scale = 0.0
    bad = 0
    sums = {v.uid: v for v in root.topological() if isinstance(v, SumNodes)}
    for uid, r in ref.items():
        scale = max(scale, float(r.abs().max()))
        e_ours = max(e_ours, float((mine[uid].double().cpu() - r).abs().max()))
        ns = pjn[uid]
        s = copy.copy(sums[uid])
        s.params = r.float()
        _, rt = bridge._retile(s, ns.block_size, ns.ch_block_size)
        err = float((ns._param_flows.double().cpu() - rt.double()).abs().max())
        bad += err > 1e-3 * max(1.0, float(rt.abs().max()))
        e_pj = max(e_pj, err)
    return {
        "ref_max": scale,
        "ours_max_err": e_ours,
        "pj_max_err": e_pj,
        "pj_bad_vectors": bad,
        "num_sum_vectors": len(ref),
    }


# ----------------------------------------------------------------------------- EM
def em_both(name, build, x, juice, bridge, device, steps, batch, keep_zero_params, graphs):
    torch.manual_seed(0)  # the same initial parameters for every variant
    root = build()
    ours = engine.compile(root, device=device)
    ns = bridge.to_pyjuice(root, juice)
    pj, _ = pj_compile(juice, ns, device)
    batches = [x[i * batch : (i + 1) * batch].to(device).long() for i in range(steps)]
    opt = bridge.make_optimizer(juice, pj, STEP, PSEUDO, keep_zero_params=keep_zero_params)
    if graphs:
        bridge.record_graphs(pj, batches[0])  # the tutorial's dry run; flows zeroed after it
    ll_o, ll_p = [], []
    for xb in batches:
        ll_p.append(bridge.tutorial_epoch(pj, opt, [xb]) / xb.shape[0])
        ours.zero_flows()
        ll_o.append(float(ours.accumulate_flows(xb, validate=False).double().sum()) / xb.shape[0])
        ours.em_step(STEP, PSEUDO)
    ev = x[steps * batch : steps * batch + 4 * batch].to(device).long()
    if ev.shape[0] == 0:
        ev = x[: 4 * batch].to(device).long()
    gap = bridge.max_ll_gap(ours, pj, ev, batch_size=batch)
    mo = float(
        torch.cat([ours(ev[i : i + batch], validate=False) for i in range(0, ev.shape[0], batch)])
        .double()
        .mean()
    )
    mp = float(bridge.pj_lls(pj, ev, batch_size=batch).double().mean())
    return {
        "keep_zero_params": keep_zero_params,
        "step_lls_ours": ll_o,
        "step_lls_pj": ll_p,
        "eval_ll_ours": mo,
        "eval_ll_pj": mp,
        "eval_rel_diff": abs(mo - mp) / abs(mo),
        "eval_max_gap_after": gap,
        "passthrough_sums": bridge.passthrough_sums(pj),
    }


def choose_device(cpu: bool) -> torch.device:
    """`--cpu`: PyJuice through the CPU shim (Triton's interpreter); else the GPU, which must exist."""
    if cpu:
        install_cpu_shim()
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run with --cpu (and TRITON_INTERPRET=1) for the tiny circuits")
    return torch.device("cuda")


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cpu", action="store_true", help="run PyJuice on CPU (needs TRITON_INTERPRET=1)")
    ap.add_argument("--sizes", default=None, help="tiny,mnist (default: both on GPU, tiny on --cpu)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="default 512 on GPU, 16 with --cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = choose_device(args.cpu)
    sizes = (args.sizes or ("tiny" if args.cpu else "tiny,mnist")).split(",")
    from importlib.metadata import version

    import pyjuice as juice

    from benchmarks import pyjuice_bridge as bridge

    info = {
        "device": "cpu (Triton interpreter)" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "pyjuice": version("pyjuice"),
        "step_size": STEP,
        "pseudocount": PSEUDO,
        "steps": args.steps,
    }
    print(info, flush=True)
    results, failures = [], []
    for name, build, data in circuits(sizes, device):
        tiny = not name.endswith("mnist")
        batch = args.batch or (16 if args.cpu else (64 if tiny else 512))
        torch.manual_seed(0)
        root = build()
        t0 = time.perf_counter()
        ours = engine.compile(root, device=device)
        t_ours = time.perf_counter() - t0
        ns, binfo = bridge.to_pyjuice(root, juice, return_info=True)
        pj, t_pj = pj_compile(juice, ns, device)
        x = data[: 4 * batch].to(device)
        row = {
            "circuit": name,
            "batch": batch,
            "compile_s_ours": t_ours,
            "compile_s_pj": t_pj,
            "pj_block_sizes": sorted(set(binfo.block_sizes.values())),
            "sparse_products": binfo.sparse_products,
            "reduced_vectors": len(binfo.reduced),
            "dangling_children_dropped": binfo.dangling_children,
            "partly_dangling": binfo.partly_dangling,
            "passthrough_sums": bridge.passthrough_sums(pj),
        }
        ll = torch.cat([ours(x[i : i + batch], validate=False) for i in range(0, x.shape[0], batch)])
        row["mean_ll"] = float(ll.double().mean())
        row["init_gap_fp32"] = bridge.max_ll_gap(ours, pj, x, batch_size=batch)
        row["init_rel_gap_fp32"] = row["init_gap_fp32"] / float(ll.abs().max())
        if not args.cpu:
            row["init_gap_pj_default_bf16"] = bridge.max_ll_gap(
                ours, pj, x, batch_size=batch, force_use_fp32=False
            )
        if tiny:
            row["flows"] = flow_errors(root, ours, pj, x[:batch], bridge)
            if binfo.dangling_children:  # PyJuice with the unconnected children kept: its flows go wrong
                pj2, _ = pj_compile(juice, bridge.to_pyjuice(root, juice, drop_dangling=False), device)
                row["flows_dangling_kept"] = flow_errors(root, ours, pj2, x[:batch], bridge)
                del pj2
        del pj, ours
        for kzp in (False, True):
            row[f"em_kzp_{kzp}"] = em_both(
                name, build, data, juice, bridge, device, args.steps, batch, kzp, graphs=not args.cpu
            )
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
        if not row["init_rel_gap_fp32"] < 1e-3:
            failures.append(f"{name}: initial LL gap {row['init_rel_gap_fp32']:.2e} relative")
        for kzp in (False, True):
            r = row[f"em_kzp_{kzp}"]
            if r["eval_rel_diff"] > 5e-3:
                print(
                    f"WARNING {name} keep_zero_params={kzp}: LLs after {args.steps} EM steps differ by "
                    f"{100 * r['eval_rel_diff']:.2f}% (issue 8 asks for < 0.5%)",
                    flush=True,
                )
    print(
        f"{'circuit':16s} {'init gap fp32':>13s} {'rel':>9s} | flows err ours / pj | "
        f"EM LL ours / pj (kzp False) | ours / pj (kzp True)"
    )
    for r in results:
        f = r.get("flows", {})
        a, b = r["em_kzp_False"], r["em_kzp_True"]
        print(
            f"{r['circuit']:16s} {r['init_gap_fp32']:13.2e} {r['init_rel_gap_fp32']:9.1e} | "
            f"{f.get('ours_max_err', float('nan')):.1e} / {f.get('pj_max_err', float('nan')):.1e} | "
            f"{a['eval_ll_ours']:.4f} / {a['eval_ll_pj']:.4f} | {b['eval_ll_ours']:.4f} / {b['eval_ll_pj']:.4f}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**info, "results": results}, fh, indent=1)
    if failures:
        sys.exit("FAILED: " + "; ".join(failures))
    print("OK: initial log-likelihoods agree (< 1e-3 relative) on every circuit")


if __name__ == "__main__":
    main()
