"""One Triton-vs-PyTorch check shared by the kernel tests (tiny shapes, interpreter on CPU), the GPU
tests (tests/test_kernels_gpu.py, `gpu` marker) and the GPU report (benchmarks/check_kernels_gpu.py):
compile the same circuit on both backends, run forward, flows and one EM step, compare every buffer.
The GPU-sized circuits and the training / graph-replay checks live here too, so the GPU test and the
GPU report run the same code."""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

import engine
from engine.dists import Bernoulli, Categorical, Gaussian
from engine.kernels import KernelOptions
from engine.kernels.graph import CapturedStep
from engine.nodes import inputs, multiply, summate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# small tiles so the interpreter's shapes stay tiny; the GPU checks pass their own options
OPTS = KernelOptions(
    block_b=16,
    fwd_block_b=16,
    elem_block_b=16,
    prod_rows=16,
    sparse_children=16,
    input_nodes=16,
    input_block_b=16,
    stats_nodes=16,
)
EM = (0.4, 0.1)  # step size, pseudocount of the one EM step compared


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


def run(root, x, missing, backend, opts=OPTS, device=DEVICE, dtype=torch.float32):
    """Compile a copy of `root` (params in `dtype`), run forward, flows and one EM step; returns
    (pc, buffers). Node row 0 is the constant log 1 that padded product slots point at: its "flow" is
    no node's flow (PyTorch adds pad flows into it, the kernels skip pads), so it is left out."""
    pc = engine.compile(copy.deepcopy(root), device=device, backend=backend, kernel_options=opts).to(dtype)
    pc.zero_flows()
    ll = pc.forward(x.to(device), missing.to(device), validate=False)
    node_flows = pc.backward_flows(accumulate_params=True)
    out = {
        "ll": ll,
        "node_mars": pc._mars[0].clone(),
        "node_flows": node_flows[1:].clone(),
        "param_flows": pc.param_flows.clone(),
    }
    for i in range(len(pc.input_layers)):
        out[f"stats_{i}"] = pc.input_stats(i).clone()
    pc.em_step(*EM)
    out["params_after_em"] = pc.params.clone()
    for i in range(len(pc.input_layers)):
        out[f"inputs_after_em_{i}"] = pc.input_params(i).clone()
    return pc, out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||b - a|| / ||a|| over the finite entries; inf when the non-finite entries differ (or NaN)."""
    a, b = a.double(), b.double()
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
        return math.inf
    return ((a[fa] - b[fa]).norm() / a[fa].norm().clamp_min(1e-300)).item()


def errors(root, x, missing, opts=OPTS, device=DEVICE, ref_dtype=torch.float32, ref=None):
    """The Triton-compiled circuit and each buffer's relative error against the PyTorch backend
    (run in `ref_dtype`, or the given `ref` buffers)."""
    if ref is None:
        _, ref = run(root, x, missing, "torch", opts, device, ref_dtype)
    pc, got = run(root, x, missing, "triton", opts, device)
    return pc, {k: rel(ref[k], got[k]) for k in ref}


def compare(root, x, missing, tol=2e-5, opts=OPTS, device=DEVICE):
    """Assert every buffer matches within relative error `tol`; returns the Triton circuit."""
    pc, errs = errors(root, x, missing, opts, device)
    for k, err in errs.items():
        assert err < tol, f"{k}: relative error {err:.2e}"
    return pc


# ----------------------------------------------------------------------------- GPU-sized checks
def mixed_circuit():
    """Bernoulli and Gaussian inputs, a sparse (block size 4 and 8) and tiled sum layers, block-sparse edges."""
    x0 = [inputs(v, 64 if v < 2 else 128, Bernoulli() if v < 2 else Gaussian()) for v in range(4)]
    a = summate(multiply(x0[0], x0[1]), num_nodes=128, block_size=4)
    a2 = summate(multiply(x0[0], x0[1]), multiply(x0[0], x0[1]), num_nodes=128, block_size=32)
    c = summate(
        multiply(x0[2], x0[3]),
        num_nodes=128,
        edge_ids=np.array([[0, 0, 1, 2, 3], [0, 1, 1, 2, 3]]),
        block_size=32,
    )
    top1 = summate(multiply(a, c), num_nodes=64, block_size=8)
    top2 = summate(multiply(a2, c), num_nodes=64, block_size=64)
    return summate(top1, top2, num_nodes=1)


def gpu_cases(mnist: torch.Tensor) -> dict:
    """name -> (root, kind): HCLT and PD on MNIST-shaped data, and the mixed sparse circuit."""
    return {
        "hclt64_mnist": (
            engine.structures.hclt(mnist, 64, input_dist=Categorical(256), device="cuda"),
            "cat",
        ),
        # 128 latents in blocks of 64: two blocks a variable, so the row-grouped sum forward runs
        "hclt128_mnist": (
            engine.structures.hclt(mnist, 128, input_dist=Categorical(256), device="cuda", block_size=64),
            "cat",
        ),
        "pd32_mnist": (engine.structures.pd((28, 28), 32, (4, 4), input_dist=Categorical(256)), "cat"),
        # four blocks of 32 a region: the 4-block forward and the 2-block node scale / parameter flows
        "pd128_mnist": (engine.structures.pd((28, 28), 128, (4, 4), input_dist=Categorical(256)), "cat"),
        "mixed_sparse": (mixed_circuit(), "mixed"),
    }


def gpu_batch(kind: str, mnist: torch.Tensor, B: int = 256):
    """A batch on the GPU for a case of `kind` (half the MNIST pixels redrawn at random), 10% missing."""
    if kind == "cat":
        x = mnist[torch.randperm(mnist.shape[0])[:B]].cuda()
        x = torch.where(torch.rand(x.shape, device="cuda") < 0.5, torch.randint_like(x, 0, 256), x)
    else:
        x = torch.stack(
            [
                torch.randint(0, 2, (B,)).float(),
                torch.randint(0, 2, (B,)).float(),
                torch.randn(B),
                torch.randn(B),
            ],
            1,
        ).cuda()
    return x, torch.rand(x.shape, device="cuda") < 0.1


def train_ll(root, mnist, backend, steps=30, B=512) -> float:
    """Mean LL after `steps` graph-captured mini-batch EM steps (catches drift that one step hides)."""
    pc = engine.compile(copy.deepcopy(root), device="cuda", backend=backend)
    step = CapturedStep(pc, B, em=(0.1, 0.1))
    for i in range(steps):
        step(mnist[(i * B) % 2560 : (i * B) % 2560 + B].cuda())
    return pc(mnist[:1024].cuda(), validate=False).double().mean().item()


def graph_rel_err(root, x) -> float:
    """Largest relative error of CUDA-graph replays against the eager first call (LL, parameter flows)."""
    pc = engine.compile(copy.deepcopy(root), device="cuda")
    step = CapturedStep(pc, x.shape[0], em=None)
    eager = step(x).clone()
    f_eager = pc.param_flows.clone()
    for _ in range(2):
        g = step(x).clone()
    assert step.captured, step.failed
    return max(rel(eager, g), rel(f_eager, pc.param_flows))


def profiled_training(root, mnist, steps=10, B=512):
    """Graph-captured EM steps with a sampled profiler (eager on sampled batches) and without:
    (LL with profiler, LL without, number of layer events)."""
    out = []
    for every in (3, 0):
        pc = engine.compile(copy.deepcopy(root), device="cuda")
        prof = pc.profile(True, every=every) if every else None
        step = CapturedStep(pc, B, em=(0.1, 0.1))
        for i in range(steps):
            step(mnist[(i * B) % 2560 : (i * B) % 2560 + B].cuda())
            if prof is not None:
                prof.collect()
        nev = 0 if prof is None else sum(e["type"] == "layer_time" for e in prof.collect(block=True))
        nev += 0 if prof is None else sum(prof.counts.values())
        pc.profile(False)
        out.append((pc(mnist[:1024].cuda(), validate=False).double().mean().item(), nev))
    return out[0][0], out[1][0], out[0][1]
