"""One Triton-vs-PyTorch check shared by the kernel tests (tiny shapes, interpreter on CPU) and the
GPU check (benchmarks/check_kernels_gpu.py, full sizes): compile the same circuit on both backends,
run forward, flows and one EM step, and compare every buffer."""

from __future__ import annotations

import copy

import torch

import engine
from engine.dists import Bernoulli, Categorical
from engine.kernels import KernelOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# small tiles so the interpreter's shapes stay tiny; the GPU check passes its own options
OPTS = KernelOptions(block_b=16, fwd_block_b=16, elem_block_b=16, prod_rows=16, sparse_children=16, input_nodes=16)


def data(dists, n, missing_rate=0.2):
    """Random `[n, len(dists)]` values in each family's support and a missing mask."""
    cols = []
    for d in dists:
        if isinstance(d, Categorical):
            cols.append(torch.randint(0, d.num_cats, (n,)).float())
        elif isinstance(d, Bernoulli):
            cols.append(torch.randint(0, 2, (n,)).float())
        else:
            cols.append(torch.randn(n))
    x = torch.stack(cols, 1)
    return x, torch.rand(x.shape) < missing_rate


def run(root, x, missing, backend, opts=OPTS, device=DEVICE):
    """Compile a copy of `root`, run forward, flows and `em_step(0.4, 0.1)`; returns (pc, buffers)."""
    pc = engine.compile(copy.deepcopy(root), device=device, backend=backend, kernel_options=opts)
    pc.zero_flows()
    ll = pc.forward(x.to(device), missing.to(device))
    node_flows = pc.backward_flows(accumulate_params=True)
    out = {"ll": ll, "node_mars": pc._mars[0].clone(), "node_flows": node_flows.clone(),
           "param_flows": pc.param_flows.clone()}
    for i in range(len(pc.input_layers)):
        out[f"stats_{i}"] = pc.input_stats(i).clone()
    pc.em_step(0.4, 0.1)
    out["params_after_em"] = pc.params.clone()
    for i in range(len(pc.input_layers)):
        out[f"input_params_after_em_{i}"] = pc.input_params(i).clone()
    return pc, out


def errors(root, x, missing, opts=OPTS, device=DEVICE) -> tuple[object, dict[str, float]]:
    """The Triton-compiled circuit and each buffer's relative error against the PyTorch backend."""
    _, ref = run(root, x, missing, "torch", opts, device)
    pc, got = run(root, x, missing, "triton", opts, device)
    out = {}
    for k in ref:
        a, b = ref[k].double(), got[k].double()
        fa, fb = torch.isfinite(a), torch.isfinite(b)
        if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
            out[k] = float("inf")  # -inf / nan in different places
            continue
        a, b = a[fa], b[fb]
        out[k] = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
    return pc, out


def compare(root, x, missing, tol=2e-5, opts=OPTS, device=DEVICE):
    """Assert every buffer matches within relative error `tol`; returns the Triton circuit."""
    pc, errs = errors(root, x, missing, opts, device)
    for k, err in errs.items():
        assert err < tol, f"{k}: relative error {err:.2e}"
    return pc
