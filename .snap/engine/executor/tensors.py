"""Plan -> torch tensors: index tensors per partition, flat tile params gathered from node vectors.

Also the inverse, writing the (trained) flat params back into the node vectors. Everything comes
from the layer plan (`Layer.sum_sources` says where each sum vector's tiles land).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from engine.compiler.plan import Layer, LayerPlan
from engine.executor.torch_ops import ProdPartitionTensors, SumPartitionTensors
from engine.nodes import NodeVector, SumNodes


@dataclass
class SumLayerTensors:
    """One sum layer's partitions, as the PyTorch ops read them."""

    parts: list[SumPartitionTensors]


@dataclass
class ProdLayerTensors:
    """One product layer's partitions, as the PyTorch ops read them."""

    parts: list[ProdPartitionTensors]


def _as_long(a) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.long)


def sum_partitions(layer: Layer) -> list[SumPartitionTensors]:
    """A sum layer's partitions: node rows written `[nb * bs]`, element rows read `[nb, width * bs]`."""
    out = []
    for p in layer.partitions:
        ar = torch.arange(p.block_size)
        node_idx = (_as_long(p.node_rows)[:, None] + ar).reshape(-1)
        child_idx = (_as_long(p.child_rows)[:, :, None] + ar).reshape(p.num_node_blocks, -1)
        out.append(
            SumPartitionTensors(p.block_size, p.num_node_blocks, p.width, p.param_offset, node_idx, child_idx)
        )
    return out


def prod_partitions(layer: Layer) -> list[ProdPartitionTensors]:
    """A product layer's partitions: element rows written `[n]`, node rows multiplied `[n, width]`."""
    return [ProdPartitionTensors(_as_long(p.node_rows), _as_long(p.child_rows)) for p in layer.partitions]


def layer_tensors(plan: LayerPlan) -> list[SumLayerTensors | ProdLayerTensors | None]:
    """Per layer index: its PyTorch tables (None for input layers)."""
    out: list[SumLayerTensors | ProdLayerTensors | None] = []
    for layer in plan.layers:
        if layer.kind == "sum":
            out.append(SumLayerTensors(sum_partitions(layer)))
        elif layer.kind == "product":
            out.append(ProdLayerTensors(prod_partitions(layer)))
        else:
            out.append(None)
    return out


def apply_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Apply `fn` (a device move) to every tensor inside nested dataclasses, lists, tuples and dict
    values, in place."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = apply_tensors(v, fn)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = apply_tensors(v, fn)
    elif isinstance(obj, tuple):
        return type(obj)(apply_tensors(v, fn) for v in obj)
    elif isinstance(obj, torch.Tensor):
        return fn(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, apply_tensors(getattr(obj, f.name), fn))
    return obj


def _tiles(s: SumNodes, r: int, b: int) -> torch.Tensor:
    """A sum vector's `[E, bs, bs]` params cut into `[E*r*r, b, b]` tiles (source tile order)."""
    e = s.params.shape[0]
    return s.params.view(e, r, b, r, b).permute(0, 1, 3, 2, 4).reshape(e * r * r, b, b)


def gather_sum_params(plan: LayerPlan, vectors: dict[int, NodeVector]):
    """Flat tile params `[num_params]` and the mask of real (non-padding) entries."""
    params = torch.zeros(plan.num_params)
    mask = torch.zeros(plan.num_params, dtype=torch.bool)
    for layer in plan.sum_layers:
        sources = {
            b: torch.cat([_tiles(vectors[src.uid], src.ratio, b) for src in srcs])
            for b, srcs in layer.sum_sources.items()
        }
        for p in layer.partitions:
            ts = _as_long(p.tile_source)  # [nb, w]
            tiles = sources[p.block_size][ts.clamp_min(0)] * (ts >= 0)[:, :, None, None]
            n = p.num_params
            params[p.param_offset : p.param_offset + n] = tiles.permute(0, 2, 1, 3).reshape(-1)
            m = (ts >= 0)[:, None, :, None].expand(-1, p.block_size, -1, p.block_size)
            mask[p.param_offset : p.param_offset + n] = m.reshape(-1)
    return params, mask


def scatter_sum_params(params: torch.Tensor, plan: LayerPlan, vectors: dict[int, NodeVector]) -> None:
    """Write flat tile params back into each SumNodes.params (inverse of `gather_sum_params`)."""
    params = params.detach().float().cpu()
    for layer in plan.sum_layers:
        for b, srcs in layer.sum_sources.items():
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
                s = vectors[src.uid]
                e, r = s.params.shape[0], src.ratio
                t = sources[src.first_tile : src.first_tile + src.num_tiles]
                s.params = t.view(e, r, r, b, b).permute(0, 1, 3, 2, 4).reshape(e, r * b, r * b).clone()
