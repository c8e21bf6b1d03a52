"""The one-launch EM's tile list (em.em_table) itself, which the interpreter cannot check through the
kernel: on a GPU the "aligned" launch class tells Triton every tile's first weight and row length are
multiples of 16 (vectorised loads), so a tile misfiled there reads the wrong weights, while the
interpreter ignores the hint. Every weight of every partition must lie in exactly one tile, and no
tile of an aligned class may break the promise."""

from __future__ import annotations

import random

import torch

from engine.executor import torch_ops
from engine.kernels import em


def _partitions(seed: int):
    rng = random.Random(seed)
    parts, at = [], rng.randrange(0, 40)
    for _ in range(12):
        bs, nb, w = rng.choice([1, 2, 4, 8, 16, 32]), rng.randrange(1, 6), rng.randrange(1, 12)
        if rng.random() < 0.5:
            at = -(-at // 16) * 16
        parts.append(torch_ops.SumPartitionTensors(bs, nb, w, at, torch.empty(0), torch.empty(0)))
        at += nb * bs * w * bs + rng.randrange(0, 20)
    return parts, at


def test_tiles_cover_every_partition_weight_once_and_keep_the_alignment_promise():
    for seed in range(5):
        parts, total = _partitions(seed)
        table = em.em_table(parts, "cpu")
        cover = torch.zeros(total, dtype=torch.int64)
        for (cl, aligned), (base, rows, lens) in table.tiles.items():
            assert base.dtype == torch.int64  # first weights of a 170 M-weight vector and beyond
            assert ((rows >= 1) & (rows <= em.RN)).all()
            assert cl == max(16, min(256, 1 << (int(lens.max()) - 1).bit_length()))
            if aligned:
                assert (base % 16 == 0).all() and (lens % 16 == 0).all(), (seed, cl)
            for b, r, n in zip(base.tolist(), rows.tolist(), lens.tolist()):
                cover[b : b + r * n] += 1
        inside = torch.zeros(total, dtype=torch.int64)
        for pt in parts:
            inside[pt.param_offset : pt.param_offset + pt.num_params] += 1
        assert torch.equal(cover, inside), seed
        assert any(a for _, a in table.tiles) and not all(a for _, a in table.tiles), seed


def test_offsets_past_int32_stay_exact():
    """A partition starting beyond 2^31 weights keeps its exact first weight in the tile list."""
    far = 2**31 + 48
    table = em.em_table([torch_ops.SumPartitionTensors(16, 3, 2, far, torch.empty(0), torch.empty(0))], "cpu")
    ((cl, aligned), (base, rows, lens)) = next(iter(table.tiles.items()))
    assert aligned and base.tolist() == [far, far + 16 * 32, far + 32 * 32]
    assert rows.tolist() == [16, 16, 16] and lens.tolist() == [32, 32, 32]


def test_a_partition_without_weights_gets_no_tile():
    empty = torch_ops.SumPartitionTensors(16, 0, 2, 64, torch.empty(0), torch.empty(0))
    assert em.em_table([empty], "cpu").tiles == {}
    full = torch_ops.SumPartitionTensors(16, 1, 2, 0, torch.empty(0), torch.empty(0))
    assert [b.tolist() for b, _, _ in em.em_table([empty, full], "cpu").tiles.values()] == [[0]]
