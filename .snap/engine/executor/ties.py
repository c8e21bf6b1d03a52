"""Tied parameters at EM time, for every executor: sum the copies' flows into their sources, update,
copy the sources back (the plan's `Ties`, engine/compiler/ties.py).

All index tensors live on the circuit's device and have fixed shapes; the reduction is
`index_select`, a fixed-order sum and `index_copy_` only (no host sync, no data-dependent shape), so it is
captured with the rest of the EM step in a CUDA graph (engine/kernels/graph.py). Data-parallel
training all-reduces flows before `em_step`, so each rank reduces the same totals.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.compiler.plan import Ties


def _long(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.long)


@dataclass
class TieIndex:
    """One buffer's ties: `src, dst: [K]` rows (source <- copy), `own: [U]` the unique sources, and
    `members: [U, M]` each source's row followed by its copies' (padded by repeating a row, `mask`
    0 there), so a tied set's total is one fixed-order sum: deterministic on CUDA, unlike an
    `index_add_` with repeated indices, whose atomics would let data-parallel ranks drift apart."""

    src: torch.Tensor
    dst: torch.Tensor
    own: torch.Tensor
    members: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, src: np.ndarray, dst: np.ndarray) -> TieIndex:
        own = np.unique(src)
        order = np.argsort(src, kind="stable")
        starts = np.searchsorted(src[order], own)
        counts = np.diff(np.append(starts, len(src)))
        width = 1 + int(counts.max(initial=0))
        members = np.repeat(own[:, None], width, axis=1)
        mask = np.zeros((len(own), width), dtype=np.float32)
        mask[:, 0] = 1.0
        for u, (a, n) in enumerate(zip(starts, counts)):
            members[u, 1 : 1 + n] = dst[order[a : a + n]]
            mask[u, 1 : 1 + n] = 1.0
        return cls(_long(src), _long(dst), _long(own), _long(members), torch.as_tensor(mask))

    def gather(self, flows: torch.Tensor) -> torch.Tensor:
        """flows[sources] = the sum over the source and its copies; returns the sources' own flows."""
        own = flows.index_select(0, self.own)
        u, m = self.members.shape
        rows = flows.index_select(0, self.members.reshape(-1)).reshape(u, m, *flows.shape[1:])
        mask = self.mask.to(flows.dtype).reshape(u, m, *([1] * (flows.dim() - 1)))
        flows.index_copy_(0, self.own, (rows * mask).sum(1))
        return own

    def scatter(self, params: torch.Tensor, flows: torch.Tensor, own: torch.Tensor) -> None:
        """params[copies] = params[sources]; the sources' flows go back to their own."""
        params.index_copy_(0, self.dst, params.index_select(0, self.src))
        flows.index_copy_(0, self.own, own)


@dataclass
class TiedSlots:
    """The circuit's ties as device index tensors: the flat sum params and, per input layer position
    (`pc.input_layers[i]`), its node rows. Moved with the circuit (`apply_tensors`)."""

    sums: TieIndex | None = None
    inputs: list[tuple[int, TieIndex]] = field(default_factory=list)  # (input layer position, ties)

    @classmethod
    def from_plan(cls, ties: Ties, input_index: dict[int, int]) -> TiedSlots:
        sums = TieIndex.of(ties.sum_src, ties.sum_dst) if ties.sum_dst.size else None
        ins = [(input_index[li], TieIndex.of(s, d)) for li, (s, d) in sorted(ties.inputs.items()) if d.size]
        return cls(sums, ins)

    @property
    def empty(self) -> bool:
        return self.sums is None and not self.inputs

    def before_em(self, pc) -> list:
        """Sum each copy's parameter flows and input statistics into its source."""
        saved = [self.sums.gather(pc.param_flows) if self.sums is not None else None]
        saved += [t.gather(pc.input_layers[i].stats) for i, t in self.inputs]
        return saved

    def after_em(self, pc, saved: list) -> None:
        """Copy the updated sources into their copies; flows and statistics are as before `before_em`."""
        if self.sums is not None:
            self.sums.scatter(pc.params, pc.param_flows, saved[0])
        for (i, t), own in zip(self.inputs, saved[1:]):
            inp = pc.input_layers[i]
            t.scatter(inp.params, inp.stats, own)

    @torch.no_grad()
    def copy_sources(self, pc) -> None:
        """params[copies] = params[sources], for sums and inputs (at compile time)."""
        if self.sums is not None:
            pc.params.index_copy_(0, self.sums.dst, pc.params.index_select(0, self.sums.src))
        for i, t in self.inputs:
            p = pc.input_layers[i].params
            p.index_copy_(0, t.dst, p.index_select(0, t.src))

    def tie_flat(self, values: torch.Tensor) -> None:
        """A per-sum-weight tensor `[num_params]` (gradients): every member of a tied set gets the set's total."""
        if self.sums is not None:
            self.sums.gather(values)
            values.index_copy_(0, self.sums.dst, values.index_select(0, self.sums.src))

    def tie_input(self, i: int, values: torch.Tensor) -> None:
        """The same for input layer `i`'s `[nodes, num_params]` gradient."""
        for j, t in self.inputs:
            if j != i:
                continue
            t.gather(values)
            values.index_copy_(0, t.dst, values.index_select(0, t.src))
