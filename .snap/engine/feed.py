"""Training data on the device: resident when it fits, streamed in pinned chunks when it does not.

A GPU step of a small circuit takes a millisecond or two; copying each batch from pageable CPU
memory and waiting for it costs as much again. So on a GPU the training driver keeps the whole set
on the device in its narrowest exact integer type (uint8 for 256 categories: 60,000 x 784 MNIST
rows are 47 MB) and gathers each batch there. A set larger than the budget is streamed instead:
the rows of the next chunk of batches are gathered on the CPU into pinned memory and copied on a
side stream while the current chunk trains (double buffering). On the CPU the data are used as
given: the exact PyTorch path. (The CPU gather of the next chunk runs on the training thread while
the GPU works through the queued batches; only the host-to-device copy runs on its own stream.)

    feed = DataFeed(train, pc.device)
    for xb in feed.batches(order, batch_size):   # xb: [batch_size, num_vars] on the device
        ...
"""

from __future__ import annotations

from typing import Iterator

import torch

DATA_BUDGET_FRACTION = 0.25  # of the device's free memory the resident training set may take
CHUNK_BYTES = 64 << 20  # streamed chunk size: large enough that one copy hides many steps


def narrowest_exact(x: torch.Tensor) -> torch.Tensor:
    """`x` in the smallest dtype that holds its values exactly (integers only; floats stay float32)."""
    if x.is_floating_point():
        return x.float()
    if x.numel() == 0:
        return x
    lo, hi = int(x.min()), int(x.max())
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return x.to(dtype)
    return x


def batch_order(n: int, shuffle: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """The row order of one epoch: a permutation (from `generator`, else the global RNG) or 0..n-1."""
    return torch.randperm(n, generator=generator) if shuffle else torch.arange(n)


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def default_budget(device: torch.device) -> int:
    """Bytes the resident training set may take: a quarter of the device's free memory."""
    if device.type != "cuda":
        return 1 << 62
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DATA_BUDGET_FRACTION)


class DataFeed:
    """Batches of one data split on `device`, resident or streamed (see the module docstring).

    `data: [N, num_vars]`; `budget_bytes`: the most the resident copy may take (default: a quarter
    of the free device memory; 0 forces streaming, which tests use on the CPU).
    """

    def __init__(
        self,
        data: torch.Tensor,
        device: torch.device,
        budget_bytes: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        self.device = torch.device(device)
        self.n = data.shape[0]
        compact = narrowest_exact(data) if self.device.type == "cuda" else data
        self.nbytes = compact.numel() * compact.element_size()
        budget = default_budget(self.device) if budget_bytes is None else budget_bytes
        self.resident = compact.to(self.device) if self.nbytes <= budget else None
        self.host = None if self.resident is not None else compact.cpu()
        self.row_bytes = max(1, compact[:1].numel() * compact.element_size())
        self.chunk_bytes = chunk_bytes

    @property
    def streamed(self) -> bool:
        return self.resident is None

    def batches(
        self, order: torch.Tensor, batch_size: int, drop_last: bool = False
    ) -> Iterator[torch.Tensor]:
        """Yield `[batch_size, num_vars]` device batches of the rows `order` names, in that order."""
        stop = num_batches(len(order), batch_size, drop_last) * batch_size
        order = order[: min(stop, len(order))]
        if self.resident is not None:
            idx = order.to(self.device, non_blocking=True)
            for s in range(0, len(idx), batch_size):
                yield self.resident[idx[s : s + batch_size]]
            return
        yield from self._streamed(order, batch_size)

    def _streamed(self, order: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        rows = max(batch_size, self.chunk_bytes // self.row_bytes // batch_size * batch_size)
        chunks = [order[s : s + rows] for s in range(0, len(order), rows)]
        cuda = self.device.type == "cuda"
        shape = (min(rows, len(order)), *self.host.shape[1:])
        host = [torch.empty(shape, dtype=self.host.dtype, pin_memory=cuda) for _ in range(2)]
        dev = [torch.empty(shape, dtype=self.host.dtype, device=self.device) for _ in range(2)]
        side = torch.cuda.Stream(self.device) if cuda else None
        copied = [torch.cuda.Event() if cuda else None for _ in range(2)]
        consumed = [torch.cuda.Event() if cuda else None for _ in range(2)]

        def load(k: int) -> None:
            slot, m = k % 2, len(chunks[k])
            if cuda:
                copied[slot].synchronize()  # the host buffer's last copy has left it
            torch.index_select(self.host, 0, chunks[k], out=host[slot][:m])
            if not cuda:
                dev[slot][:m].copy_(host[slot][:m])
                return
            with torch.cuda.stream(side):
                side.wait_event(consumed[slot])  # the batches read from this device buffer were taken
                dev[slot][:m].copy_(host[slot][:m], non_blocking=True)
                copied[slot].record(side)

        current = torch.cuda.current_stream(self.device) if cuda else None
        if cuda:
            side.wait_stream(current)  # the device buffers' allocation is ordered before their first copy
        try:
            if chunks:
                load(0)
            for k, chunk in enumerate(chunks):
                slot = k % 2
                if cuda:
                    current.wait_event(copied[slot])
                for s in range(0, len(chunk), batch_size):
                    yield dev[slot][s : min(s + batch_size, len(chunk))]
                    if s == 0 and k + 1 < len(chunks):
                        load(k + 1)  # gather the next chunk while this one's first batch runs
                if cuda:
                    consumed[slot].record(current)
        finally:
            if cuda:
                current.wait_stream(side)  # no copy may still write a buffer freed after a stop
