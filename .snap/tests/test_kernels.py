"""Triton kernels against the PyTorch path (engine/executor/torch_ops.py) on random inputs.

On CPU these run through Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py before any
kernel module is imported), so shapes stay tiny. The runner is tests/kernel_runner.py; on a GPU the
same runner checks full sizes in tests/test_kernels_gpu.py (`gpu` marker) and
benchmarks/check_kernels_gpu.py.
"""

import copy
import dataclasses
import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import engine  # noqa: E402
from engine.dists import Bernoulli, Categorical, Gaussian  # noqa: E402
from engine.executor import torch_ops  # noqa: E402
from engine.kernels import KernelOptions  # noqa: E402
from engine.kernels.graph import CapturedStep  # noqa: E402
from engine.kernels.product import ProdLayerKernelTensors  # noqa: E402
from engine.kernels.sum_block import _tf32_split  # noqa: E402
from engine.nodes import inputs, multiply, summate  # noqa: E402
from engine.structures import hclt_from_tree, pd  # noqa: E402
from tests.kernel_runner import DEVICE, OPTS, compare, data  # noqa: E402


def _hclt(num_vars=5, latents=32, cats=7):
    edges = np.array([[0, 1], [1, 2], [1, 3], [3, 4]])[: num_vars - 1]
    return hclt_from_tree(edges, num_vars, latents, Categorical(cats))


def test_hclt_categorical_with_missing_matches_torch():
    x, m = data([Categorical(7)] * 5, 20)
    pc = compare(_hclt(), x.long(), m)
    kernels = {p["kernel"] for layer in pc.plan.to_dict()["layers"] for p in layer["partitions"]}
    assert kernels == {"product", "sum_block", "sum_sparse"}


def test_hclt_block_64_width_2():
    x, m = data([Categorical(5)] * 3, 12, 0.0)
    root = hclt_from_tree(np.array([[0, 1], [1, 2]]), 3, 128, Categorical(5), block_size=64)
    compare(root, x.long(), m)


def test_pd_shared_children_matches_torch():
    """PD: products feed several sums (element flows from many parents, child-major tables)."""
    root = pd((4, 4), 16, (2, 2), input_dist=Categorical(4))
    x, m = data([Categorical(4)] * 16, 9)
    compare(root, x.long(), m)


def test_bernoulli_gaussian_sparse_and_edges():
    x0 = [inputs(v, 16 if v < 2 else 32, Bernoulli() if v < 2 else Gaussian()) for v in range(4)]
    a = summate(multiply(x0[0], x0[1]), num_nodes=32, block_size=4)  # sparse kernel: bs 4
    a2 = summate(multiply(x0[0], x0[1]), multiply(x0[0], x0[1]), num_nodes=32, block_size=16)
    c = summate(
        multiply(x0[2], x0[3]), num_nodes=32, edge_ids=np.array([[0, 0, 1], [0, 1, 1]]), block_size=16
    )  # block-sparse edges: node block 1 reads only child block 1
    top1 = summate(multiply(a, c), num_nodes=16, block_size=8)
    top2 = summate(multiply(a2, c), num_nodes=16, block_size=16)
    root = summate(top1, top2, num_nodes=1)
    x, m = data([Bernoulli(), Bernoulli(), Gaussian(), Gaussian()], 20, 0.25)
    pc = compare(root, x, m, tol=5e-5)
    kernels = {p["kernel"] for layer in pc.plan.to_dict()["layers"] for p in layer["partitions"]}
    assert "sum_sparse" in kernels and "sum_block" in kernels


def test_input_segments_belong_to_their_circuit():
    """Regression: segments were cached by vars_.data_ptr(), so a later circuit whose vars_ landed at
    a recycled address got the earlier circuit's variable segments (wrong statistics, bad EM). They
    are now each circuit's own table: two circuits, variables in different orders, both exact."""

    def interleaved():
        ins = [inputs(v, 16, Categorical(5)) for v in (1, 0)]
        return summate(multiply(*ins), num_nodes=1)

    for root in (_hclt(num_vars=2, latents=16, cats=5), interleaved()):
        x, m = data([Categorical(5)] * 2, 12)
        pc = compare(root, x.long(), m)
        assert len(pc.tables.inputs[0].segments[0]) >= 1


def test_node_vector_under_products_of_two_layers_gets_both_flows():
    """A sum vector that is a child of products in two product layers: the flows pass stores its
    flows at the first (upper) layer and adds at the second; node_flows starts uninitialised."""
    x = [inputs(v, 16, Categorical(5)) for v in range(4)]
    s01 = summate(multiply(x[0], x[1]), num_nodes=16, block_size=16)
    s2 = summate(multiply(x[2]), num_nodes=16, block_size=16)
    s012 = summate(multiply(s01, s2), num_nodes=16, block_size=16)  # s01 under a lower product layer
    s3 = summate(multiply(x[3]), num_nodes=16, block_size=16)
    s23 = summate(multiply(s2, s3), num_nodes=16, block_size=16)
    top = summate(multiply(s012, s3), multiply(s01, s23), num_nodes=16, block_size=16)  # and a higher one
    root = summate(multiply(top), num_nodes=1)
    xd, m = data([Categorical(5)] * 4, 20)
    pc = compare(root, xd.long(), m)
    firsts = [t.flow_first for t in pc.tables.layers if isinstance(t, ProdLayerKernelTensors)]
    assert any(bool((f == 0).any()) for f in firsts), "expected a node row reached by two product layers"


def test_forward_batch_tile_shrinks_for_small_partitions():
    from engine.kernels.sum_block import forward_batch_tile

    cpu = torch.device("cpu")  # counted as 132 SMs: a partition wants >= 264 programs
    assert forward_batch_tile(464, 512, 128, cpu) == 128  # PD-128's large layers: wide tiles
    assert forward_batch_tile(40, 512, 128, cpu) == 64
    assert forward_batch_tile(16, 512, 128, cpu) == 32  # HCLT-512's layers: never below 32
    assert forward_batch_tile(16, 20, 16, cpu) == 16  # never above the option


@pytest.mark.parametrize("group_cols", [16, 32, 64])
def test_grouped_child_tiles_match_torch(group_cols):
    """Child tiles taken G at a time (width 3 and 2, G of 1, 2 and 4: masked tails), children shared by
    parents of different partitions and layers, parent groups in the element-flow kernel."""
    xs = [inputs(v, 16, Categorical(5)) for v in range(4)]
    ys = [inputs(v, 16, Categorical(5)) for v in range(2)]
    p1, p2, p3 = multiply(xs[0], xs[1]), multiply(ys[0], ys[1]), multiply(xs[0], ys[1])
    s = summate(p1, p2, p3, num_nodes=32, block_size=16)  # width 3
    s2 = summate(p1, p2, num_nodes=16, block_size=16)  # width 2, same children as s
    t = summate(multiply(xs[2], xs[3]), num_nodes=32, block_size=16)
    t2 = summate(multiply(xs[2], xs[3]), num_nodes=16, block_size=16)
    root = summate(multiply(s, t), multiply(s2, t2), num_nodes=1)
    x, m = data([Categorical(5)] * 4, 20)
    compare(
        root,
        x.long(),
        m,
        opts=KernelOptions(
            block_b=16,
            prod_rows=16,
            sparse_children=16,
            input_nodes=16,
            group_cols=group_cols,
            fwd_block_b=32,
            elem_block_b=16,
            stats_cats=16,
            elem_sets=0,  # the child-major element-flow kernel's parent groups (the set kernel: below)
        ),
    )


def _on_device(x):
    return torch.as_tensor(x, dtype=torch.long, device=DEVICE)


def _forward_ref(pt, params, em, rows):
    """float64 PyTorch forward of partition `pt` (tables on DEVICE), returned on the CPU."""
    ref = torch.zeros(rows, em.shape[1], dtype=torch.float64, device=DEVICE)
    torch_ops.sum_forward(pt, params.double().to(DEVICE), em.double().to(DEVICE), ref)
    return ref.cpu()


@pytest.mark.parametrize("precision,tol", [("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 3e-3), ("bf16", 2e-2)])
def test_sum_forward_precisions(precision, tol):
    """One tiled partition on random log-values (with -inf padding rows) against float64 PyTorch."""
    if precision == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("bf16 tl.dot is unreliable in Triton's interpreter (checked on GPU instead)")
    from engine.kernels.sum_block import block_tensors, sum_forward_block

    nb, w, bs, B = 3, 2, 16, 20
    rows = 64 + nb * w * bs
    em = torch.randn(rows, B) * 3 - 5
    em[:64] = -torch.inf
    child_rows = (64 + torch.arange(nb * w) * bs).view(nb, w)
    child_rows[2, 1] = 0  # a padded tile
    base = torch_ops.SumPartitionTensors(
        bs,
        nb,
        w,
        5,
        (torch.arange(nb * bs) + 1).to(DEVICE),
        (child_rows[:, :, None] + torch.arange(bs)).view(nb, -1).to(DEVICE),
    )
    pt = block_tensors(base, 1 + torch.arange(nb) * bs, child_rows, 64, _on_device)
    params = torch.rand(5 + nb * bs * w * bs)
    ref = _forward_ref(pt, params, em, 1 + nb * bs)
    got = torch.full((1 + nb * bs, B), float("nan"), device=DEVICE)  # poisoned: every real row written
    got[0] = 0
    sum_forward_block(
        pt, params.to(DEVICE), em.to(DEVICE), got, KernelOptions(precision=precision, fwd_block_b=16)
    )
    got = got.cpu()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(got).all() and err < tol, err


def test_row_groups_are_runs_of_equal_child_lists():
    from engine.kernels.sum_block import row_groups

    child_rows = torch.tensor([[10, 20], [10, 20], [10, 20], [30, 40], [30, 40], [10, 20]])
    g = row_groups(child_rows, min_fill=0)
    assert g[2].tolist() == [[0, 1], [2, -1], [3, 4], [5, -1]]
    assert g[4].tolist() == [[0, 1, 2, -1], [3, 4, -1, -1], [5, -1, -1, -1]]
    assert 2 not in row_groups(torch.tensor([[1, 2], [3, 4]]))  # no run: no table
    assert 2 not in row_groups(torch.tensor([[10, 20], [10, 30]]), min_fill=0)  # equal only in part
    # the default fill rule: 6 blocks in 4 pairs (75%) kept, in 3 quadruples (50%) not
    assert set(row_groups(child_rows)) == {2}


def _tiled_parts(pc) -> list:
    """The tiled (block-kernel) partitions of a Triton-compiled circuit."""
    return [p for t in pc.tables.layers if t for p in getattr(t, "parts", []) if hasattr(p, "row_groups")]


def _train_step_matches_torch(root, x, m, opts) -> None:
    """One overlapped training step (node scale in place, deferred parameter flows) on the Triton and
    the PyTorch executors: the same log-likelihoods and updated weights."""
    pcs = [
        engine.compile(copy.deepcopy(root), device=DEVICE, backend=b, kernel_options=opts)
        for b in ("triton", "torch")
    ]
    lls = [c.train_step(x.long().to(DEVICE), m.to(DEVICE), em=(0.5, 0.1)) for c in pcs]
    assert torch.allclose(lls[0], lls[1], rtol=1e-5)
    err = ((pcs[0].params - pcs[1].params).norm() / pcs[1].params.norm()).item()
    assert err < 1e-5, err


def test_forward_rows_follow_the_block_size_and_the_tile_limit():
    from engine.kernels.sum_block import FWD_MAX_ROWS, forward_rows

    class Part:
        def __init__(self, bs, tables=(2, 4)):
            self.block_size, self.row_groups = bs, dict.fromkeys(tables)

    opts = KernelOptions()
    assert forward_rows(Part(64), opts) == (2, 64)  # HCLT's blocks: 2 x 64 rows at 64 columns
    assert forward_rows(Part(32), opts) == (4, 32)  # PD's: 4 x 32 rows at 32 columns
    assert forward_rows(Part(16), opts) == (1, opts.fwd_block_b)  # not measured: one block a program
    assert forward_rows(Part(128), opts)[0] == (2 if 2 * 128 <= FWD_MAX_ROWS else 1)
    assert forward_rows(Part(32), dataclasses.replace(opts, fwd_rows_32=1)) == (1, opts.fwd_block_b)
    assert forward_rows(Part(16), dataclasses.replace(opts, fwd_rows=4, fwd_rows_min_block=16))[0] == 4
    assert forward_rows(Part(64, tables=()), opts) == (1, opts.fwd_block_b)


def test_flow_rows_only_at_the_measured_block_size():
    from engine.kernels.sum_block import flow_rows

    class Part:
        def __init__(self, bs, tables=(2, 4)):
            self.block_size, self.row_groups = bs, dict.fromkeys(tables)

    opts = KernelOptions()
    assert flow_rows(Part(32), opts) == 2  # PD: measured faster
    assert flow_rows(Part(64), opts) == 1 and flow_rows(Part(16), opts) == 1
    assert flow_rows(Part(32, tables=()), opts) == 1
    assert flow_rows(Part(32), dataclasses.replace(opts, flow_rows=1)) == 1


@pytest.mark.parametrize("rows", [2, 4])
def test_row_grouped_sum_forward_matches_float64(rows):
    """`fwd_rows`: node blocks sharing a child list as one tile; broken runs, runs longer than R, a
    group padded with -1 and a padded child tile, against float64 PyTorch; every real row written."""
    from engine.kernels.sum_block import block_tensors, forward_rows, sum_forward_block

    nb, w, bs, B = 12, 2, 16, 20
    rows_e = 64 + 3 * w * bs
    em = torch.randn(rows_e, B) * 3 - 5
    em[:64] = -torch.inf
    lists = (64 + torch.arange(3 * w) * bs).view(3, w)
    child_rows = lists[[0] * 7 + [1] * 4 + [2]].clone()
    child_rows[11, 1] = 0  # a padded tile
    node_rows = 1 + torch.randperm(nb, generator=torch.Generator().manual_seed(0)) * bs  # not in row order
    base = torch_ops.SumPartitionTensors(
        bs,
        nb,
        w,
        5,
        (node_rows[:, None] + torch.arange(bs)).view(-1).to(DEVICE),
        (child_rows[:, :, None] + torch.arange(bs)).view(nb, -1).to(DEVICE),
    )
    pt = block_tensors(base, node_rows, child_rows, 64, _on_device)
    opts = KernelOptions(fwd_block_b=16, fwd_rows=rows, fwd_rows_min_block=bs)
    assert forward_rows(pt, opts)[0] == rows and (pt.row_groups[rows] < 0).any()
    params = torch.rand(5 + nb * bs * w * bs)
    ref = _forward_ref(pt, params, em, 1 + nb * bs)
    got = torch.full((1 + nb * bs, B), float("nan"), device=DEVICE)
    got[0] = 0
    sum_forward_block(pt, params.to(DEVICE), em.to(DEVICE), got, opts)
    got = got.cpu()
    err = ((got.double() - ref).norm() / ref.norm()).item()
    assert torch.isfinite(got).all() and err < 1e-5, err


def test_pd_with_row_grouped_forward_matches_torch():
    from engine.kernels.sum_block import forward_rows

    root = pd((4, 4), 32, (2, 2), input_dist=Categorical(4), block_size=16)
    x, m = data([Categorical(4)] * 16, 9)
    opts = dataclasses.replace(OPTS, fwd_rows=2, fwd_rows_min_block=16)
    pc = compare(root, x.long(), m, opts=opts)
    parts = _tiled_parts(pc)
    assert any(forward_rows(p, opts)[0] == 2 for p in parts)


def test_plan_records_kernels_and_torch_on_cpu_backend():
    pc = engine.compile(_hclt(), backend="torch")
    assert {p["kernel"] for layer in pc.plan.to_dict()["layers"] for p in layer["partitions"]} == {"torch"}
    with pytest.raises(ValueError):
        engine.compile(_hclt(), backend="cuda-magic")


def test_switching_to_the_torch_backend_renames_the_plan_kernels():
    pc = engine.compile(_hclt(), backend="triton", kernel_options=OPTS)
    assert {p["kernel"] for layer in pc.plan.to_dict()["layers"] for p in layer["partitions"]} != {"torch"}
    pc.set_backend("torch")
    assert {p["kernel"] for layer in pc.plan.to_dict()["layers"] for p in layer["partitions"]} == {"torch"}


def test_captured_step_falls_back_and_matches_eager():
    root = _hclt()
    x, _ = data([Categorical(7)] * 5, 16, 0.0)
    x = x.long().to(DEVICE)
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=OPTS)
    step = CapturedStep(pc, batch_size=16)
    ll1 = step(x).clone()
    flows1 = pc.param_flows.clone()
    ll2 = step(x).clone()  # second call: zero_flows inside the step, same flows
    assert torch.allclose(ll1, ll2) and torch.allclose(flows1, pc.param_flows)
    assert step.captured == (DEVICE == "cuda")


def test_product_layer_of_several_partitions_runs_as_one_launch():
    """Products of 2 and 3 children in one layer: one merged launch (narrower rows padded with row 0)."""
    x0 = [inputs(v, 16, Categorical(5)) for v in range(5)]
    s = summate(multiply(x0[0], x0[1]), num_nodes=16, block_size=16)
    t = summate(multiply(x0[2], x0[3], x0[4]), num_nodes=16, block_size=16)
    root = summate(multiply(s, t), num_nodes=1)
    x, m = data([Categorical(5)] * 5, 20)
    pc = compare(root, x.long(), m)
    merged = [t for t in pc.tables.layers if isinstance(t, ProdLayerKernelTensors) and len(t.parts) > 1]
    assert merged, "expected a product layer with several partitions"


def test_profiler_samples_every_kth_batch():
    pc = engine.compile(_hclt(), backend="torch")
    prof = pc.profile(True, every=3)
    x, _ = data([Categorical(7)] * 5, 8, 0.0)
    for _ in range(7):  # batches 0, 3 and 6 are sampled
        pc.accumulate_flows(x.long())
    events = [e for e in prof.collect(block=True) if e["type"] == "layer_time"]
    per_batch = {(e["layer"], e["pass"]) for e in events}
    assert len(events) == 3 * len(per_batch) and prof.batches == 7
    with pytest.raises(ValueError):
        pc.profile(True, every=0)


@pytest.mark.parametrize(
    "sets,rows,max_rows,split",
    [(1, 16, 128, 0), (2, 32, 128, 0), (4, 16, 32, 0), (16, 64, 512, 0), (4, 32, 32, 16)],
)
def test_parent_set_element_flows_match_torch(sets, rows, max_rows, split, monkeypatch):
    """Element flows parent-set-major (`elem_sets`): PD's shared children (sets of several child
    blocks, uneven parent counts, runs cut at `sets` blocks, CM = rows // bs blocks per dot with a
    masked tail) and the grouped-tiles circuit (children shared across partitions: read-modify-write)."""
    from engine.kernels import sum_block

    opts = dataclasses.replace(
        OPTS, elem_sets=sets, elem_set_rows=rows, elem_set_max_rows=max_rows, elem_set_split=split
    )
    if sets == 16:  # batch tiles of 32, cut to 16 for the P = 4 sets by a 1024-float slab
        opts = dataclasses.replace(opts, elem_block_b=32, elem_set_slab=1024)
    ran = []  # parent rows (P * bs) of each partition the set kernel ran
    real = sum_block.elem_flows_sets
    monkeypatch.setattr(
        sum_block, "elem_flows_sets", lambda pt, *a: ran.append(pt.set_par.shape[1] * 16) or real(pt, *a)
    )
    root = pd((3, 4), 48, (1, 1), input_dist=Categorical(4), block_size=16)  # 3 parents, sets of <= 12
    x, m = data([Categorical(4)] * 12, 9)
    pc = compare(root, x.long(), m, opts=opts)
    # P = 4 sets over the cap: child-major, or (split) launches of two parents each
    assert ran and (split or max(ran) <= max_rows) and (max_rows < 64 and not split) == (max(ran) == 16)
    parts = [pt for t in pc.tables.layers if t is not None and hasattr(t, "parts") for pt in t.parts]
    assert any(
        getattr(pt, "set_par", None) is not None and len(pt.set_rows) > pt.set_par.shape[0] for pt in parts
    )
    xs = [inputs(v, 16, Categorical(5)) for v in range(4)]
    ys = [inputs(v, 16, Categorical(5)) for v in range(2)]
    p1, p2, p3 = multiply(xs[0], xs[1]), multiply(ys[0], ys[1]), multiply(xs[0], ys[1])
    s = summate(p1, p2, p3, num_nodes=32, block_size=16)
    s2 = summate(p1, p2, num_nodes=16, block_size=16)
    t = summate(multiply(xs[2], xs[3]), num_nodes=32, block_size=16)
    root = summate(
        multiply(s, t),
        multiply(s2, summate(multiply(xs[2], xs[3]), num_nodes=16, block_size=16)),
        num_nodes=1,
    )
    x, m = data([Categorical(5)] * 4, 20)
    compare(root, x.long(), m, opts=opts)


def test_parent_sets_group_children_by_their_parents():
    """The host tables: children with equal parent lists share a set; runs never cross sets."""
    from engine.kernels.sum_block import child_major_blocks, parent_sets

    # 3 node blocks x width 2; child rows 10, 20 under blocks 0 and 1, row 30 under block 2 only
    child_rows = torch.tensor([[10, 20], [10, 20], [30, 0]])
    cb, ptr, pi, pk = child_major_blocks(child_rows, 1)
    set_par, set_rows, set_k, chunks = parent_sets(cb, ptr, pi, pk)
    assert set_par.tolist() == [[0, 1], [2, -1]]
    assert set_rows.tolist() == [10, 20, 30]
    assert set_k.tolist() == [[0, 0], [1, 1], [0, 0]]
    assert chunks[1].tolist() == [[0, 1, 0], [1, 2, 0], [2, 3, 1]]
    assert chunks[4].tolist() == [[0, 2, 0], [2, 3, 1]]


def test_parent_set_split_at_block_size_32_matches_torch(monkeypatch):
    """The default split path's shape (PD-256: bs 32): sets of two parents in one-parent launches, two
    child blocks a dot, against the PyTorch path."""
    from engine.kernels import sum_block

    ran = []
    real = sum_block.elem_flows_sets
    monkeypatch.setattr(
        sum_block,
        "elem_flows_sets",
        lambda pt, *a: ran.append((pt.block_size, pt.set_par.shape[1])) or real(pt, *a),
    )
    root = pd((2, 4), 64, (1, 1), input_dist=Categorical(4), block_size=32)
    opts = dataclasses.replace(OPTS, elem_sets=2, elem_set_rows=64, elem_set_max_rows=32, elem_set_split=32)
    x, m = data([Categorical(4)] * 8, 21)
    compare(root, x.long(), m, opts=opts)
    assert (32, 2) in ran  # two parents of 32 rows over a 32-row limit: split into two launches


@pytest.mark.parametrize("wide", [0, 2, 8])
def test_split_parent_sets_take_elem_sets_wide_children(wide):
    """Sets split over launches run `elem_sets_wide` child blocks a program (0: `elem_sets`), sets that
    fit one launch `elem_sets`; every buffer against the PyTorch path."""

    class Seen(dict):
        def __getitem__(self, key):
            used.append(key)
            return super().__getitem__(key)

    used = []
    root = pd((4, 4), 64, (2, 2), input_dist=Categorical(4), block_size=16)  # 4 parents a set
    x, m = data([Categorical(4)] * 16, 9)
    opts = dataclasses.replace(OPTS, elem_sets=1, elem_sets_wide=wide, elem_set_max_rows=32)
    pc = engine.compile(copy.deepcopy(root), device=DEVICE, backend="triton", kernel_options=opts)
    parts = _tiled_parts(pc)
    for p in parts:
        p.set_chunks = Seen(p.set_chunks)
    pc.zero_flows()
    pc.forward(x.long().to(DEVICE), m.to(DEVICE))
    pc.backward_flows()
    # the 4-parent sets split (wide); sets of fewer parents run in one launch (elem_sets = 1)
    assert (wide or 1) in used and set(used) <= {1, wide or 1}
    compare(root, x.long(), m, opts=opts)


@pytest.mark.parametrize("rows", [2, 4])
@pytest.mark.parametrize("in_place", [False, True])
def test_row_grouped_node_scale_and_parameter_flows_match_torch(rows, in_place):
    """`flow_rows`: one node-scale max per row group, the parameter flows of the group's blocks as one
    tile (PD at block size 16: four blocks a region); every buffer against the PyTorch path, with the
    scale in a scratch and in place over the node flows (training steps)."""
    from engine.kernels.sum_block import flow_rows

    root = pd((4, 4), 64, (2, 2), input_dist=Categorical(4), block_size=16)
    x, m = data([Categorical(4)] * 16, 9)
    opts = dataclasses.replace(OPTS, flow_rows=rows, flow_rows_min_block=16, flow_rows_max_block=16)
    pc = compare(root, x.long(), m, opts=opts)
    parts = _tiled_parts(pc)
    assert any(flow_rows(p, opts) == rows for p in parts)
    if in_place:  # a training step writes the scale over the node flows (`sum_backward_block`)
        _train_step_matches_torch(root, x, m, opts)


@pytest.mark.parametrize("split_once", [False, True])
def test_parent_set_element_flows_with_and_without_the_presplit_slab(split_once):
    """`elem_split_once` (tf32x3): the parents' slab split into tf32 hi / lo parts once per program, or
    inside each dot; both against the PyTorch path."""
    root = pd((2, 4), 64, (1, 1), input_dist=Categorical(4), block_size=16)
    opts = dataclasses.replace(OPTS, elem_sets=4, elem_split_once=split_once)
    x, m = data([Categorical(4)] * 8, 13)
    compare(root, x.long(), m, opts=opts)


@triton.jit
def _split_kernel(x, hi, lo, N: tl.constexpr):
    o = tl.arange(0, N)
    h, low = _tf32_split(tl.load(x + o))
    tl.store(hi + o, h)
    tl.store(lo + o, low)


def test_tf32_split_rounds_to_ten_mantissa_bits_exactly():
    """`_tf32_split`: hi has tf32's 10 mantissa bits (the low 13 bits zero), hi + lo == x exactly
    (subnormals, 0 and 1 included), and hi is rounded to nearest: |lo| <= 2^-11 |x| for normal x,
    with lo of both signs."""
    x = torch.cat([torch.rand(1000), torch.tensor([0.0, 1.0, 1e-39, 1e-45, 1 - 2**-24, 0.1, 1 / 3])])
    x = torch.cat([x, torch.rand(1024 - len(x)) * 1e-20]).to(DEVICE)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, N=1024)
    hi, lo, x = hi.cpu(), lo.cpu(), x.cpu()
    assert ((hi.view(torch.int32) & 8191) == 0).all()
    assert torch.equal(hi + lo, x)
    normal = x.abs() >= 2.0**-126  # subnormals have fewer bits: exact, but not this relative bound
    assert (lo.abs() <= x.abs() * 2.0**-11)[normal].all()
    assert (lo < 0).any() and (lo > 0).any()


@pytest.mark.parametrize("rows", [2, 4])
def test_row_grouped_flows_with_padded_groups_match_torch(rows):
    """Three blocks a region: groups of 2 or 4 padded with -1, in the node scale and the parameter
    flows (their row masks), in a flows pass and in a training step against the PyTorch path."""
    from engine.kernels.sum_block import flow_rows

    root = pd((4, 4), 48, (2, 2), input_dist=Categorical(4), block_size=16)
    x, m = data([Categorical(4)] * 16, 9)
    opts = dataclasses.replace(OPTS, flow_rows=rows, flow_rows_min_block=16, flow_rows_max_block=16)
    pc = compare(root, x.long(), m, opts=opts)
    parts = _tiled_parts(pc)
    assert any(flow_rows(p, opts) == rows and bool((p.row_groups[rows] < 0).any()) for p in parts)
    _train_step_matches_torch(root, x, m, opts)


def test_new_grouping_options_are_refused_by_name():
    for kw, name in (
        ({"fwd_rows_32": 3}, "fwd_rows_32"),
        ({"flow_rows": 8}, "flow_rows"),
        ({"elem_sets_wide": 3}, "elem_sets_wide"),
        ({"elem_split_once": 2}, "elem_split_once"),
        ({"fwd_rows_32_block_b": 48}, "fwd_rows_32_block_b"),
        ({"flow_rows_min_block": 64}, "flow_rows_min_block"),
    ):
        with pytest.raises(ValueError, match=name):
            KernelOptions(**kw)
