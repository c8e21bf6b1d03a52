"""Fused products (`KernelOptions(fuse_products=True)`): the block-sum kernels compute the product layer
below them from node_mars, and that layer's forward and recompute launches disappear.

Each circuit runs forward, flows and one EM step three ways: the PyTorch backend in float64 (the
reference), Triton unfused and Triton fused. Fused must match the reference and be bit-identical to
unfused (the same float32 adds in the same order). conftest.py fills step buffers with NaN, so a
fused layer whose element rows some reader still took from element_mars shows up as NaN. The queries
that read element values themselves (MPE's max-product forward, sampling's top-down selection,
conditionals with soft evidence) must still see them.
"""

import dataclasses
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import engine  # noqa: E402
from engine import queries  # noqa: E402
from engine.dists import Categorical  # noqa: E402
from engine.kernels import KernelOptions, product  # noqa: E402
from engine.kernels.graph import CapturedStep  # noqa: E402
from engine.kernels.product import ProdLayerKernelTensors  # noqa: E402
from engine.kernels.sum_block import BlockSumTensors  # noqa: E402
from engine.nodes import inputs, multiply, summate  # noqa: E402
from engine.structures import hclt_from_tree, pd  # noqa: E402
from tests.kernel_runner import DEVICE, OPTS, data, rel, run  # noqa: E402

FUSED = dataclasses.replace(OPTS, fuse_products=True)
TOL = 2e-5  # float32 kernels against float64 PyTorch


def _random_tree_hclt(num_vars=8, latents=16, cats=5):
    """HCLT on a random tree over `num_vars` variables (products of 2 to 4 children)."""
    parents = [int(np.random.randint(0, v)) for v in range(1, num_vars)]
    edges = np.array([[p, v] for v, p in zip(range(1, num_vars), parents)])
    return hclt_from_tree(edges, num_vars, latents, Categorical(cats))


def _mixed_widths():
    """Products of 1, 2 and 3 children in one layer (padded slots in the merged table), sum
    partitions of widths 3 and 1, and a sum layer with a block-size-4 (sparse) partition next to a
    tiled one, whose product layer must stay unfused."""
    xs = [inputs(v, 16, Categorical(5)) for v in range(6)]
    ys = [inputs(v, 16, Categorical(5)) for v in range(2)]
    p1, p2, p3 = multiply(xs[0], xs[1]), multiply(ys[0], ys[1]), multiply(xs[0], ys[1])
    sa = summate(p1, p2, p3, num_nodes=16, block_size=16)  # width 3, products of 2
    sb = summate(multiply(xs[2], xs[3], xs[4]), num_nodes=16, block_size=16)  # products of 3
    sc = summate(multiply(xs[5]), num_nodes=16, block_size=16)  # products of 1
    a = summate(multiply(sa, sb), num_nodes=16, block_size=4)  # the sparse kernel in this layer
    b = summate(multiply(sa, sb), num_nodes=16, block_size=16)
    top = summate(multiply(a, sc), multiply(b, sc), num_nodes=32, block_size=16)
    return summate(multiply(top), num_nodes=1)


CASES = {
    "hclt8": (lambda: _random_tree_hclt(8, 16, 5), [Categorical(5)] * 8),
    "pd4x4": (lambda: pd((4, 4), 16, (2, 2), input_dist=Categorical(4)), [Categorical(4)] * 16),
    "mixed": (_mixed_widths, [Categorical(5)] * 6),
}


def _fused_layers(pc) -> list[int]:
    return [i for i, t in enumerate(pc.tables.layers) if isinstance(t, ProdLayerKernelTensors) and t.fused]


@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_matches_float64_torch_and_unfused_bit_for_bit(name, monkeypatch):
    make, dists = CASES[name]
    root = make()
    x, m = data(dists, 20)
    _, ref = run(root, x.long(), m, "torch", dtype=torch.float64)
    _, plain = run(root, x.long(), m, "triton")
    launched = []
    real = product.prod_forward
    monkeypatch.setattr(product, "prod_forward", lambda t, *a: (launched.append(t), real(t, *a))[1])
    pc, got = run(root, x.long(), m, "triton", opts=FUSED)
    fused = _fused_layers(pc)
    assert fused, "expected at least one fused product layer"
    assert not any(t.fused for t in launched), "a fused product layer was launched in training"
    for k in ref:
        assert rel(ref[k], got[k]) < TOL, f"{k}: relative error {rel(ref[k], got[k]):.2e}"
        assert torch.equal(plain[k], got[k]), f"{k}: fused differs from unfused"


def test_fusion_only_where_every_partition_is_tiled():
    """The mixed circuit: the product layer under the sum layer with a sparse partition is not fused,
    the others are; fused partitions share one gather table of the layer's widest product."""
    pc = engine.compile(_mixed_widths(), device=DEVICE, backend="triton", kernel_options=FUSED)
    layers = pc.plan.layers
    for layer in layers:
        if layer.kind != "sum":
            continue
        prod, table = pc.tables.layers[layer.index - 1], pc.tables.layers[layer.index]
        tiled = all(isinstance(pt, BlockSumTensors) for pt in table.parts)
        assert prod.fused == tiled, layer.index
        if prod.fused:
            _, lo, hi = layers[layer.index - 1].writes
            rows = {id(pt.fused_rows) for pt in table.parts}
            assert len(rows) == 1 and table.parts[0].fused_rows.shape == (hi - lo, prod.child_rows.shape[1])
            assert all(pt.fused_lo == lo for pt in table.parts)
    kinds = {
        pc.tables.layers[layer.index - 1].fused for layer in layers if layer.kind == "sum" and layer.index
    }
    assert kinds == {True, False}
    widths = {pc.tables.layers[i].child_rows.shape[1] for i in _fused_layers(pc)}
    assert 3 in widths  # the layer of products of 1, 2 and 3 children, padded with node row 0
    plain = engine.compile(_mixed_widths(), device=DEVICE, backend="triton", kernel_options=OPTS)
    assert not _fused_layers(plain)


@pytest.mark.parametrize("name", ["hclt8", "mixed"])
def test_mpe_and_max_product_with_fusion(name):
    """The max-product forward reads element_mars with PyTorch ops: fused layers still get computed."""
    make, dists = CASES[name]
    root = make()
    x, m = data(dists, 6, 0.5)
    x = x.long()
    ref = engine.compile(root, backend="torch").double()
    pc = engine.compile(root, device=DEVICE, backend="triton", kernel_options=FUSED)
    assert _fused_layers(pc)
    v_ref, _ = ref.forward_mars(x, m, semiring="max")
    v, _ = pc.forward_mars(x.to(DEVICE), m.to(DEVICE), semiring="max")
    assert rel(v_ref[ref.plan.root_row], v[pc.plan.root_row]) < TOL
    assert torch.equal(queries.mpe(ref, x, m), queries.mpe(pc, x, m).cpu())


def test_sampling_with_fusion_matches_unfused():
    """Sampling's top-down selection reads element values: same draws fused and unfused."""
    make, dists = CASES["mixed"]
    root = make()
    x, m = data(dists, 1, 0.5)
    out = []
    for opts in (OPTS, FUSED):
        pc = engine.compile(root, device=DEVICE, backend="triton", kernel_options=opts)
        torch.manual_seed(5)
        out.append(queries.sample(pc, 12, x.long(), m))
    assert torch.equal(out[0], out[1])


def test_conditionals_with_soft_evidence_and_fusion():
    """Conditionals rerun the inner layers on changed input rows, then the flows pass (fused)."""
    make, dists = CASES["hclt8"]
    root = make()
    x, m = data(dists, 5, 0.5)
    soft = {1: torch.tensor([0.2, 1.0, 0.5, 0.0, 0.3]), 4: torch.rand(5, 5) + 0.1}
    ref = engine.compile(root, backend="torch").double()
    pc = engine.compile(root, device=DEVICE, backend="triton", kernel_options=FUSED)
    for s in (None, soft):
        want = queries.conditional(ref, x.long(), m, soft_evidence=s)
        got = queries.conditional(pc, x.long().to(DEVICE), m.to(DEVICE), soft_evidence=s)
        assert (want.double() - got.double().cpu()).abs().max() < 1e-5


def test_forward_mars_writes_fused_layers_by_default():
    """`forward_mars` promises element values: by default the top product layer's rows are written."""
    make, dists = CASES["pd4x4"]
    root = make()
    x, m = data(dists, 4)
    bufs = []
    for opts in (OPTS, FUSED):
        pc = engine.compile(root, device=DEVICE, backend="triton", kernel_options=opts)
        bufs.append(pc.forward_mars(x.long(), m))
    top = [layer for layer in pc.plan.layers if layer.kind == "product"][-1]
    _, lo, hi = top.writes
    assert torch.isfinite(bufs[1][1][lo:hi]).all()
    assert torch.equal(bufs[0][1][lo:hi], bufs[1][1][lo:hi])


def test_captured_step_with_fusion_matches_eager():
    """CapturedStep (a CUDA graph on GPU, eager here): two identical steps, identical flows."""
    make, dists = CASES["pd4x4"]
    x, _ = data(dists, 16, 0.0)
    pc = engine.compile(make(), device=DEVICE, backend="triton", kernel_options=FUSED)
    step = CapturedStep(pc, batch_size=16)
    ll1 = step(x.long().to(DEVICE)).clone()
    flows1 = pc.param_flows.clone()
    ll2 = step(x.long().to(DEVICE)).clone()
    assert torch.equal(ll1, ll2) and torch.equal(flows1, pc.param_flows)
    assert torch.isfinite(ll1).all()


def test_option_is_a_hashable_bool():
    assert KernelOptions(fuse_products=1) == KernelOptions(fuse_products=True)
    assert hash(KernelOptions(fuse_products=0)) == hash(KernelOptions())
    assert KernelOptions(fuse_products=1).fuse_products is True
    with pytest.raises(ValueError, match="fuse_products"):
        KernelOptions(fuse_products="yes")
    with pytest.raises(ValueError, match="fused_stages"):
        KernelOptions(fused_stages=0)


def test_fused_launches_pipeline_only_narrow_products():
    """Wide products would overflow shared memory when pipelined (sum_block.FUSED_PIPELINE_WIDTH)."""
    from engine.kernels.sum_block import FUSED_PIPELINE_WIDTH, _pipeline

    opts = KernelOptions(fuse_products=True, fused_stages=3)
    pc = engine.compile(_mixed_widths(), device=DEVICE, backend="triton", kernel_options=opts)
    seen = set()
    for table in pc.tables.layers:
        for pt in getattr(table, "parts", []):
            if isinstance(pt, BlockSumTensors):
                stages = _pipeline(pt, opts)
                if pt.fused_rows is None:
                    assert stages == {}
                else:
                    narrow = pt.fused_rows.shape[1] <= FUSED_PIPELINE_WIDTH
                    assert stages == {"num_stages": 3 if narrow else 1}
                    seen.add(narrow)
    assert seen == {True, False}


# ----------------------------------------------------------------------------- on a GPU (`-m gpu`)
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["hclt64_mnist", "pd32_mnist", "mixed_sparse"])
def test_fused_on_gpu_matches_float64_torch_and_graph_replays(name):
    """Realistic sizes on the GPU: fused within 1e-4 of float64 PyTorch and within 1e-6 of unfused on
    every buffer; a CUDA-graph replay of the fused step reproduces its eager first call."""
    from engine.data import mnist_like
    from tests.kernel_runner import errors, gpu_batch, gpu_cases

    torch.backends.cuda.matmul.allow_tf32 = False
    mnist = mnist_like(3000)
    root, kind = gpu_cases(mnist)[name]
    x, m = gpu_batch(kind, mnist)
    _, ref = run(root, x, m, "torch", None, "cuda", torch.float64)
    _, plain = run(root, x, m, "triton", KernelOptions(), "cuda")
    pc, errs = errors(root, x, m, KernelOptions(fuse_products=True), "cuda", ref=ref)
    assert _fused_layers(pc)
    worst = max(errs, key=errs.get)
    assert errs[worst] < 1e-4, f"{worst}: {errs[worst]:.2e}"
    _, got = run(root, x, m, "triton", KernelOptions(fuse_products=True), "cuda")
    assert max(rel(plain[k], got[k]) for k in plain) < 1e-6
    if kind == "cat":
        step = CapturedStep(pc, 512, em=None)
        xb = mnist[:512].cuda()
        eager = step(xb).clone()
        flows = pc.param_flows.clone()
        for _ in range(2):
            replay = step(xb).clone()
        assert step.captured, step.failed
        assert max(rel(eager, replay), rel(flows, pc.param_flows)) < 1e-6


def test_fuse_max_reads_keeps_costly_layers_unfused():
    """`fuse_max_reads`: a layer whose fused kernels would read more per element row stays unfused."""
    from engine.kernels.backend import fused_reads_per_row

    make, dists = CASES["pd4x4"]
    root = make()
    full = engine.compile(root, device=DEVICE, backend="triton", kernel_options=FUSED)
    reads = {
        i: fused_reads_per_row(full.tables.layers[i], full.tables.layers[i + 1]) for i in _fused_layers(full)
    }
    assert len(set(reads.values())) > 1, reads  # the 4-child patches read more than the 2-child splits
    cut = int(min(reads.values()))
    opts = dataclasses.replace(FUSED, fuse_max_reads=cut)
    pc = engine.compile(root, device=DEVICE, backend="triton", kernel_options=opts)
    kept = {i for i, r in reads.items() if r <= cut}
    assert kept and kept != set(reads) and set(_fused_layers(pc)) == kept
    x, m = data(dists, 12)
    _, ref = run(root, x.long(), m, "torch", dtype=torch.float64)
    _, got = run(root, x.long(), m, "triton", opts=opts)
    for k in ref:
        assert rel(ref[k], got[k]) < TOL, f"{k}: relative error {rel(ref[k], got[k]):.2e}"
