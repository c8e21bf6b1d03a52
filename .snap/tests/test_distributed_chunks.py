"""Chunked input statistics (issue 12): the statistics of a large input layer are computed in launches
over node-row chunks, and data-parallel EM all-reduces chunk k while chunk k+1 computes.

Checked here, in Triton's interpreter on CPU: the chunks are real (one kernel launch each, the hook
called once per chunk with ranges tiling the layer along segment boundaries), the chunked launches
give the single launch's statistics bit for bit and the float64 PyTorch statistics within float
rounding, on a categorical layer (segment kernel) and a Gaussian one (tile kernel); and two gloo
ranks with chunking train what one process trains on the same global batches.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

import engine
from engine import distributed
from engine.dists import Bernoulli, Categorical, Gaussian
from engine.kernels import inputs as kernel_inputs
from engine.nodes import inputs, multiply, summate
from tests.kernel_runner import OPTS, data, rel

NODES = 48  # per variable: three segments of OPTS.stats_nodes = 16


def _circuit():
    """Three categorical variables (one input layer, 144 nodes in 9 segments), a Gaussian and a
    Bernoulli variable (a layer each): every statistics kernel family, several segments per variable."""
    cat = [inputs(v, NODES, Categorical(20)) for v in range(3)]
    s = summate(multiply(*cat), num_nodes=16, block_size=16)
    t = summate(
        multiply(inputs(3, NODES, Gaussian()), inputs(4, NODES, Bernoulli())), num_nodes=16, block_size=16
    )
    return summate(multiply(s, t), num_nodes=1)


DISTS = [Categorical(20)] * 3 + [Gaussian(), Bernoulli()]


def _stats(root, x, m, backend, dtype=torch.float32, chunk_rows=None):
    """Each input layer's statistics after one flows pass; with `chunk_rows` every layer is asked for
    chunks of that many rows, and the hook's calls are returned per layer."""
    pc = engine.compile(copy.deepcopy(root), backend=backend, kernel_options=OPTS).to(dtype)
    calls: dict[int, list] = {}
    if chunk_rows is not None:
        pc.stats_listener = lambda i: (chunk_rows, lambda lo, hi: calls.setdefault(i, []).append((lo, hi)))
    pc.zero_flows()
    pc.accumulate_flows(x, m, validate=False)
    return pc, [pc.input_stats(i).clone() for i in range(len(pc.input_layers))], calls


def test_chunk_ranges_tile_the_layer_along_segment_boundaries():
    vars_ = torch.tensor([0] * 50 + [1] * 7 + [2] * 33 + [3])  # 91 nodes, runs cut at 16: 9 segments
    starts, _, _ = kernel_inputs.segments(vars_, 16)
    bounds = starts.tolist() + [91]
    for rows in (1, 10, 16, 40, 90, 91, 1000):
        chunks = kernel_inputs.chunk_ranges(starts, 91, rows)
        assert (
            chunks[0][0] == 0 and chunks[0][2] == 0 and chunks[-1][1] == len(starts) and chunks[-1][3] == 91
        )
        for k, (a, b, lo, hi) in enumerate(chunks):
            assert (lo, hi) == (bounds[a], bounds[b]) and a < b  # whole segments, never empty
            if k + 1 < len(chunks):
                assert chunks[k + 1][0] == b and hi - lo >= rows  # contiguous; only the last is short
                assert hi - lo - (bounds[b] - bounds[b - 1]) < rows  # no segment more than needed
        assert (len(chunks) == 1) == (rows >= 91)  # one chunk only when the layer fits
    assert len(kernel_inputs.chunk_ranges(starts, 91, 1)) == len(starts)  # at most one chunk per segment


def test_chunked_statistics_launches_are_real_and_equal_one_launch(monkeypatch):
    x, m = data(DISTS, 40)
    root = _circuit()
    launches = {"categorical": 0, "gaussian": 0, "bernoulli": 0}
    for cls in (Categorical, Gaussian, Bernoulli):
        orig = cls.kernel_stats

        def counting(self, *args, _orig=orig, **kw):
            launches[self.name] += 1
            return _orig(self, *args, **kw)

        monkeypatch.setattr(cls, "kernel_stats", counting)
    pc, one, none = _stats(root, x, m, "triton")
    assert none == {} and launches == {"categorical": 1, "gaussian": 1, "bernoulli": 1}  # default: one launch
    for k in launches:
        launches[k] = 0
    pc, chunked, calls = _stats(root, x, m, "triton", chunk_rows=20)
    _, ref, _ = _stats(root, x, m, "torch", torch.float64)
    names = [inp.dist.name for inp in pc.input_layers]
    for i, name in enumerate(names):
        n = pc.input_layers[i].num_nodes
        ranges = calls[i]
        assert len(ranges) > 1 and launches[name] == len(ranges)  # one launch per chunk, each reported
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, in order
        seg_starts = set(pc.tables.inputs[i].segments[0].tolist()) | {n}
        assert all(lo in seg_starts and hi in seg_starts for lo, hi in ranges)  # whole segments
        assert chunked[i].abs().sum() > 0  # real statistics, not zeros
        assert torch.equal(chunked[i], one[i]), name  # the same arithmetic per segment as one launch
        assert rel(ref[i], chunked[i]) < 1e-5, name
    assert [len(calls[i]) for i in range(len(names))] == [
        len(kernel_inputs.chunk_ranges(pc.tables.inputs[i].segments[0].cpu(), inp.num_nodes, 20))
        for i, inp in enumerate(pc.input_layers)
    ]


def test_the_torch_backend_reports_a_layer_once():
    x, m = data(DISTS, 16)
    pc, stats, calls = _stats(_circuit(), x, m, "torch", chunk_rows=20)
    assert {i: r for i, r in calls.items()} == {
        i: [(0, inp.num_nodes)] for i, inp in enumerate(pc.input_layers)
    }


def test_reducer_chunks_only_large_statistics_and_can_be_turned_off():
    pc = engine.compile(copy.deepcopy(_circuit()), backend="triton", kernel_options=OPTS)
    cat = next(i for i, inp in enumerate(pc.input_layers) if inp.dist.name == "categorical")
    row_bytes = 20 * 4
    r = distributed.FlowReducer(pc, chunk_bytes=30 * row_bytes)
    assert r.chunk_rows == {cat: 30}  # the 48-node Gaussian/Bernoulli layers' stats are smaller
    assert (pc.input_layers[cat].layer.index, "backward") not in r.buckets
    assert distributed.FlowReducer(pc, chunk_bytes=0).chunk_rows == {}
    assert distributed.FlowReducer(pc, overlap=False, chunk_bytes=30 * row_bytes).chunk_rows == {}
    assert distributed.FlowReducer(pc, "bf16", chunk_bytes=30 * row_bytes).chunk_rows == {}
    with pytest.raises(ValueError, match="chunk_bytes"):
        distributed.FlowReducer(pc, chunk_bytes=-1)
    r.start()
    assert pc.stats_listener is not None
    r.cancel()
    assert pc.stats_listener is None


def test_a_chunk_never_reported_is_an_error_not_a_silent_partial_sum():
    import torch.distributed as dist

    pc = engine.compile(copy.deepcopy(_circuit()), backend="triton", kernel_options=OPTS)
    r = distributed.FlowReducer(pc, chunk_bytes=30 * 20 * 4)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        r.start()
        (i,) = r.chunk_rows
        rows, after = r._stats_chunks(i)
        after(0, 30)
        with pytest.raises(RuntimeError, match="out of order"):
            after(40, 60)
        with pytest.raises(RuntimeError, match="never reduced"):
            r()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


B = 16  # rows per rank and step
SCHED = dict(step_size=0.5, final_step_size=0.3, full_batch_epochs=1, drop_last=True)


def _train(world_batch: int, distributed_: bool, chunk_bytes=None):
    from engine import optim

    torch.manual_seed(0)  # the same data and initial circuit in every process
    x, _ = data(DISTS, 80)
    pc = engine.compile(copy.deepcopy(_circuit()), backend="triton", kernel_options=OPTS)
    hist = optim.fit(
        pc,
        x,
        epochs=1,
        schedule=optim.EMSchedule(batch_size=world_batch, **SCHED),
        generator=torch.Generator().manual_seed(2),
        distributed=distributed_,
        reduce_chunk_bytes=chunk_bytes,
    )
    params = torch.cat([pc.params] + [pc.input_params(i).reshape(-1) for i in range(len(pc.input_layers))])
    return params, [(h["pass_ll"], h["train_ll"]) for h in hist]


def _chunk_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist

    reported = []
    on_chunk = distributed.FlowReducer._on_stats_chunk
    distributed.FlowReducer._on_stats_chunk = lambda self, i, lo, hi: (
        reported.append((i, lo, hi)),
        on_chunk(self, i, lo, hi),
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    params, lls = _train(B, True, chunk_bytes=30 * 20 * 4)  # the categorical layer in 5 chunks
    torch.save({"params": params, "lls": lls, "reported": reported}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_with_chunked_statistics_train_what_one_process_trains(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_chunk_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"])  # ranks agree exactly
    steps = 80 // (2 * B)
    assert r0["reported"] == r1["reported"]  # the same collectives on both
    by_layer: dict[int, list] = {}
    for i, lo, hi in r0["reported"]:
        by_layer.setdefault(i, []).append((lo, hi))
    (cat,) = [i for i, r in by_layer.items() if r[-1][1] == 144]  # 3 categorical variables x 48 nodes
    assert by_layer.pop(cat) == steps * [(0, 32), (32, 64), (64, 96), (96, 128), (128, 144)]
    assert sorted(by_layer.values()) == 2 * [steps * [(0, NODES)]]  # Gaussian, Bernoulli: unchunked
    one_params, one_lls = _train(2 * B, False)
    assert torch.allclose(r0["params"], one_params, rtol=1e-4, atol=1e-6)
    assert len(one_lls) == len(r0["lls"]) == 2
    for a, b in zip(one_lls, r0["lls"]):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)
