"""Plan -> torch tensors: index tensors per partition, flat tile params gathered from node vectors.

Also the inverse, writing the (trained) flat params back into the node vectors.
"""

from __future__ import annotations

import torch

from engine.compiler.layout import Layout
from engine.compiler.plan import LayerPlan
from engine.executor.torch_ops import ProdPartitionTensors, SumPartitionTensors
from engine.nodes import SumNodes


def _as_long(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.long)


def partition_tensors(plan: LayerPlan) -> list[list]:
    """For every layer, its partitions as tensors (empty list for input layers)."""
    out = []
    for layer in plan.layers:
        parts = []
        for p in layer.partitions:
            if layer.kind == "sum":
                bs = p.block_size
                ar = torch.arange(bs)
                node_idx = (_as_long(p.node_rows)[:, None] + ar).reshape(-1)
                child_idx = (_as_long(p.child_rows)[:, :, None] + ar).reshape(p.num_node_blocks, -1)
                parts.append(SumPartitionTensors(bs, p.num_node_blocks, p.width, p.param_offset, node_idx, child_idx))
            elif layer.kind == "product":
                parts.append(ProdPartitionTensors(_as_long(p.node_rows), _as_long(p.child_rows)))
        out.append(parts)
    return out


def _tiles(s: SumNodes, r: int, b: int) -> torch.Tensor:
    """A sum vector's `[E, bs, bs]` params cut into `[E*r*r, b, b]` tiles (source tile order)."""
    e = s.params.shape[0]
    return s.params.view(e, r, b, r, b).permute(0, 1, 3, 2, 4).reshape(e * r * r, b, b)


def gather_sum_params(plan: LayerPlan, lay: Layout, sums: dict[int, SumNodes]):
    """Flat tile params `[num_params]` and the mask of real (non-padding) entries."""
    params = torch.zeros(plan.num_params)
    mask = torch.zeros(plan.num_params, dtype=torch.bool)
    for layer in plan.sum_layers:
        sources = {
            b: torch.cat([_tiles(sums[src.uid], src.ratio, b) for src in srcs])
            for b, srcs in lay.sum_sources[layer.index].items()
        }
        for p in layer.partitions:
            ts = _as_long(p.tile_source)  # [nb, w]
            tiles = sources[p.block_size][ts.clamp_min(0)] * (ts >= 0)[:, :, None, None]
            n = p.num_params
            params[p.param_offset : p.param_offset + n] = tiles.permute(0, 2, 1, 3).reshape(-1)
            m = (ts >= 0)[:, None, :, None].expand(-1, p.block_size, -1, p.block_size)
            mask[p.param_offset : p.param_offset + n] = m.reshape(-1)
    return params, mask


def scatter_sum_params(params: torch.Tensor, plan: LayerPlan, lay: Layout, sums: dict[int, SumNodes]) -> None:
    """Write flat tile params back into each SumNodes.params (inverse of `gather_sum_params`)."""
    params = params.detach().float().cpu()
    for layer in plan.sum_layers:
        for b, srcs in lay.sum_sources[layer.index].items():
            total = srcs[-1].first_tile + srcs[-1].num_tiles
            sources = torch.zeros(total, b, b)
            for p in layer.partitions:
                if p.block_size != b:
                    continue
                ts = _as_long(p.tile_source)
                w = params[p.param_offset : p.param_offset + p.num_params]
                tiles = w.view(p.num_node_blocks, b, p.width, b).permute(0, 2, 1, 3)
                valid = ts >= 0
                sources[ts[valid]] = tiles[valid]
            for src in srcs:
                s = sums[src.uid]
                e, r = s.params.shape[0], src.ratio
                t = sources[src.first_tile : src.first_tile + src.num_tiles]
                s.params = t.view(e, r, r, b, b).permute(0, 1, 3, 2, 4).reshape(e, r * b, r * b).clone()
