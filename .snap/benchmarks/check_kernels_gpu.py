"""GPU check of every Triton kernel against the PyTorch path in float64, at realistic sizes.

    python benchmarks/check_kernels_gpu.py [--json out.json]

For each circuit (HCLT on MNIST-shaped data, PD, a Bernoulli/Gaussian circuit with a sparse layer,
all with missing values) and each precision, runs one forward + flows pass + EM step with the Triton
backend and with the PyTorch backend in float64 on fresh random data, and prints the relative error
||got - ref|| / ||ref|| of: log-likelihoods, node values, node flows, parameter flows, input
statistics, parameters after EM. Also checks that the CUDA-graph step reproduces eager execution.
Exits 1 if a float32-default (tf32x3) or ieee error exceeds 1e-4 (or is NaN / inf: -inf or NaN in
other places than the reference).

The runner and the checks are the test suite's (tests/kernel_runner.py); `pytest -m gpu
tests/test_kernels_gpu.py` asserts the same bounds.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, ".")
from engine.data import mnist_like  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from tests.kernel_runner import (  # noqa: E402
    errors,
    gpu_batch,
    gpu_cases,
    graph_rel_err,
    profiled_training,
    rel,
    run,
    train_ll,
)

torch.backends.cuda.matmul.allow_tf32 = False


def kernel_rows(cases, data) -> tuple[list[dict], bool]:
    rows, bad = [], False
    for name, (root, kind) in cases.items():
        x, m = gpu_batch(kind, data)
        _, ref = run(root, x, m, "torch", None, "cuda", torch.float64)
        for prec in ("tf32x3", "ieee", "tf32", "bf16"):
            _, errs = errors(root, x, m, KernelOptions(precision=prec), "cuda", ref=ref)
            worst = max(errs.values())
            bad = bad or (prec in ("tf32x3", "ieee") and not worst < 1e-4)
            rows.append({"circuit": name, "precision": prec, **errs})
            print(f"{name:14s} {prec:7s} " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()), flush=True)
        _, t32 = run(root, x, m, "torch", None, "cuda")
        print(f"{name:14s} torch32 " + " ".join(f"{k}={rel(ref[k], t32[k]):.1e}" for k in ref), flush=True)
    return rows, bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    data = mnist_like(3000)
    cases = gpu_cases(data)
    rows, bad = kernel_rows(cases, data)
    for name in ("hclt64_mnist", "pd32_mnist", "pd128_mnist"):
        lt, lr = train_ll(cases[name][0], data, "triton"), train_ll(cases[name][0], data, "torch")
        print(f"{name:14s} 30 EM steps: LL triton {lt:.3f} torch {lr:.3f}")
        bad = bad or not abs(lt - lr) < 1e-2 * abs(lr)
    g = graph_rel_err(cases["hclt64_mnist"][0], data[:512].cuda())
    print(f"cuda graph replay vs eager: rel err {g:.1e}")
    bad = bad or not g < 1e-6
    lp, lo, nev = profiled_training(cases["hclt64_mnist"][0], data)
    print(
        f"sampled profiler (every 3) during graph training: LL {lp:.4f} vs {lo:.4f} without, {nev} layer events"
    )
    bad = bad or not abs(lp - lo) < 1e-4 * abs(lo) or nev == 0
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows, "graph_rel_err": g}, f, indent=1)
    print("FAIL" if bad else "ALL OK")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
