"""The one-launch EM update of all sum partitions against the PyTorch update in float64.

`em.sum_em_update_all` walks a tile list built from every partition (several row-length classes,
partitions at arbitrary offsets with gaps between them, padded children masked out, nodes without
flow). Each partition must come out as `torch_ops.sum_em_update` makes it, and weights outside every
partition must stay untouched.
"""

from __future__ import annotations

import torch

from engine.executor import torch_ops
from engine.kernels import KernelOptions, em

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _partition(bs, nb, width, offset):
    return torch_ops.SumPartitionTensors(bs, nb, width, offset, torch.empty(0), torch.empty(0))


def test_all_partitions_in_one_launch_match_float64():
    g = torch.Generator().manual_seed(3)
    shapes = [(16, 3, 2), (1, 1, 40), (32, 2, 9), (16, 5, 1), (4, 2, 3)]  # (bs, nb, width)
    parts, at = [], 7  # a gap before the first and between partitions
    for bs, nb, w in shapes:
        if bs == 32:
            at = -(-at // 16) * 16  # one partition on a 16-weight boundary: the aligned launch class
        parts.append(_partition(bs, nb, w, at))
        at += nb * w * bs * bs + 5
    params = torch.rand(at, generator=g, dtype=torch.float64) + 0.05
    flows = torch.rand(at, generator=g, dtype=torch.float64) * torch.exp(torch.randn(at, generator=g) * 2)
    mask = torch.rand(at, generator=g) < 0.8
    flows[parts[2].param_offset : parts[2].param_offset + 18] = 0.0  # a node with no flow at all
    mask[parts[2].param_offset : parts[2].param_offset + 18] = False  # ... and no real child: kept
    ref = params.clone()
    for pt in parts:
        torch_ops.sum_em_update(pt, ref, flows, mask, 0.3, 0.1)
    table = em.em_table(parts, DEVICE)
    assert len(table.tiles) > 1  # several launch classes, one launch each
    assert any(aligned for _, aligned in table.tiles) and not all(aligned for _, aligned in table.tiles)
    got = params.float().to(DEVICE)
    em.sum_em_update_all(table, got, flows.float().to(DEVICE), mask.to(DEVICE), 0.3, 0.1, KernelOptions())
    got = got.cpu().double()
    inside = torch.zeros(at, dtype=torch.bool)
    for pt in parts:
        inside[pt.param_offset : pt.param_offset + pt.num_params] = True
    assert torch.equal(got[~inside], params.float().double()[~inside])  # gaps untouched
    err = (got - ref).norm() / ref.norm()
    assert err < 1e-6, err
    assert not torch.allclose(ref, params)  # the update changed something


def test_em_tables_follow_the_circuit_between_devices():
    """The one-launch EM table lives in a dict: moving the circuit's tables must move it too."""
    from engine.executor.tensors import apply_tensors

    table = em.em_table([_partition(16, 2, 2, 0), _partition(1, 1, 40, 1024)], "cpu")
    seen = []
    apply_tensors(table, lambda t: seen.append(t.dtype) or t.clone())
    assert len(seen) == 3 * len(table.tiles)  # every (base, rows, length) tensor of every class
