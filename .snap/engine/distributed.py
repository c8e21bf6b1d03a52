"""Data-parallel EM on `torch.distributed` (NCCL on GPUs, gloo on CPUs).

EM needs no gradient-averaging tricks: flows are sums over examples, so the sum of the ranks'
parameter flows and input statistics *is* the flow of the global batch. Each rank runs forward and
flows on its shard of every global batch (`per-rank batch x world size` rows), the flows are
all-reduced, and every rank applies the same EM update, so the parameters stay identical on all
ranks; one process on the same global batches computes the same update up to summation order.

    torchrun --nproc-per-node 2 -m engine train --data nltcs ...      # the CLI joins the group itself
    engine.optim.fit(pc, train, ..., distributed=True)                 # in a script under torchrun

A rank that dies makes the others' next collective fail: with gloo they raise `DistributedError` at
once (tested); the process group times out after `CW_DIST_TIMEOUT_S` (default 120 s). With NCCL the
all-reduce of a step runs inside its CUDA graph, where NCCL's watchdog does not time it out: a rank
that dies mid-epoch can leave the others blocked until the launcher ends them (torchrun does, as
soon as one worker fails).
"""

from __future__ import annotations

import datetime
import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0
ALLREDUCE_LAYER = -1  # the all-reduce's span in profiler events: no layer of the plan


class DistributedError(RuntimeError):
    """A collective failed: another rank exited or stopped answering."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the default process group."""

    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun (or a launcher setting its variables) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def timeout_s() -> float:
    value = float(os.environ.get("CW_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if not (0 < value < float("inf")):
        raise ValueError(f"CW_DIST_TIMEOUT_S must be a positive number of seconds, got {value}")
    return value


def join(device: str = "auto") -> tuple[Ranks, str]:
    """Join (or reuse) the default process group; returns the ranks and this rank's device.

    On CUDA each rank takes GPU `LOCAL_RANK` and the NCCL backend, its stream of high priority
    (`HIGH_PRIORITY`: the flows' all-reduces then need no second communicator, `flow_group`); on
    the CPU, gloo. The group reads the launcher's environment (MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE).
    """
    from engine.training import pick_device

    use_cuda = pick_device(device).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s()),
            pg_options=_high_priority_options() if use_cuda and HIGH_PRIORITY else None,
        )
    return Ranks(dist.get_rank(), dist.get_world_size()), f"cuda:{local}" if use_cuda else "cpu"


def current() -> Ranks:
    """The ranks of the initialised default group (for `fit(..., distributed=True)`)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "distributed=True needs torch.distributed initialised: launch with torchrun "
            "and call engine.distributed.join() (the CLI does) or init_process_group()"
        )
    return Ranks(dist.get_rank(), dist.get_world_size())


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as err:
        raise DistributedError(
            f"rank {dist.get_rank()}: the {what} failed, so another rank has exited or "
            f"stopped answering ({type(err).__name__}: {str(err).splitlines()[0]})"
        ) from err


def _plan_fingerprint(pc) -> int:
    import hashlib
    import json

    plan = {k: v for k, v in pc.plan.to_dict().items() if k not in ("compile_seconds", "pass_seconds")}
    digest = hashlib.sha256(json.dumps(plan, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:7], "little")  # fits a float64 exactly


def broadcast_parameters(pc) -> None:
    """Every rank starts from rank 0's parameters, after checking every rank compiled the same plan
    (a rank that learnt another tree would otherwise train nonsense without an error)."""
    mine = float(_plan_fingerprint(pc))
    t = torch.tensor([mine, -mine], dtype=torch.float64, device=pc.device)
    _collective("circuit check", dist.all_reduce, t, op=dist.ReduceOp.MAX)
    if t[0].item() != mine or -t[1].item() != mine:
        raise DistributedError(
            f"rank {dist.get_rank()}: the ranks compiled different circuits (different "
            "layer plans); build the structure deterministically, e.g. with the same seed"
        )
    for t in [pc.params] + [pc.input_params(i) for i in range(len(pc.input_layers))]:
        _collective("parameter broadcast", dist.broadcast, t, 0)


def broadcast_order(order: torch.Tensor, device) -> torch.Tensor:
    """Rank 0's row order of an epoch, on every rank (ranks' RNGs may differ)."""
    t = order.to(device)
    _collective("batch-order broadcast", dist.broadcast, t, 0)
    return t.cpu()


def all_sum(values: list[float], device) -> list[float]:
    """Element-wise sum over ranks of a few host numbers (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _collective("all-reduce of the log-likelihood sums", dist.all_reduce, t)
    return t.tolist()


REDUCE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


BUCKET_BYTES = 8 * 2**20  # sum layers' flows are all-reduced in buckets of at least this much
# `chunk_bytes` > 0: an input layer's statistics larger than that are computed and all-reduced in
# chunks of about that much, each chunk's all-reduce overlapping the next chunk's statistics kernel.
# Off by default: on 2 H200s (2026-11-30 14:17, results/scaling_h200x2_2gpu_round4.json) 32 MiB chunks
# against none gave 0.556 / 0.559 s an epoch at HCLT-256, 1.587 / 1.592 at HCLT-512, 0.563 / 0.563 at
# PD-128 (0-0.5%, within run-to-run noise), while the chunked statistics launches alone cost 0.05-0.16
# ms more a step than one launch. Kept opt-in (`fit(reduce_chunk_bytes=32 << 20)`) for slower links.
CHUNK_BYTES = 0
# The EM update after an all-reduced step waits only for the parameter flows before the sum weights
# and for each input layer's statistics before its rows (`PendingStats`). False: every all-reduce
# is waited for before the update starts (the A/B of benchmarks/scaling.py --defer-ab).
DEFER_STATS = True


# The flows' all-reduces run on an NCCL stream of high priority, so their kernels take SMs ahead of
# queued compute (CUDA graphs keep the priority each node was captured with): on 2 H200s the last
# statistics' all-reduce no longer waits behind the EM kernel, -0.04 to -0.20 ms a step
# (benchmarks/NOTES.md, "Issue 12: where the 2-GPU step's last 0.6 ms went"). `join` makes the default
# group so; a default group made elsewhere gets a second, high-priority group for the flows
# (`flow_group`). False (or CW_DIST_HIGH_PRIORITY=0 in the environment): normal priority throughout.
HIGH_PRIORITY = os.environ.get("CW_DIST_HIGH_PRIORITY", "1") != "0"
_FLOW_GROUPS: dict = {}  # id of the default group -> (that group, the flows' high-priority group)


def _high_priority_options():
    """NCCL options for a group whose stream has high priority, with the group's own timeout (torch
    warns when the options' timeout and the `timeout` argument differ)."""
    opts = dist.ProcessGroupNCCL.Options(is_high_priority_stream=True)
    opts._timeout = datetime.timedelta(seconds=timeout_s())
    return opts


def _default_has_nccl() -> bool:
    """Whether the default group reaches CUDA tensors through NCCL ("nccl", "cuda:nccl",
    "cpu:gloo,cuda:nccl"; init_process_group() without a backend makes the last)."""
    try:
        return "nccl" in str(dist.get_backend_config())
    except (AttributeError, RuntimeError, ValueError):
        return "nccl" in str(dist.get_backend())


def _default_is_high_priority() -> bool:
    """Whether the default group's NCCL stream already has high priority (`join` makes it so)."""
    try:
        return bool(dist.group.WORLD._get_backend(torch.device("cuda")).options.is_high_priority_stream)
    except (AttributeError, RuntimeError, ValueError):
        return False


def flow_group(device="cuda"):
    """The process group the flows (on `device`) are all-reduced on: the default one (CPU tensors,
    no NCCL in the default group, HIGH_PRIORITY off, or a default group already of high priority, as
    `join` makes it), else a high-priority NCCL group over the same ranks (a second communicator,
    with its own NCCL buffers on each GPU), made once per default group (every rank makes it at the
    same point: the reducer's construction) and initialised by one all-reduce on `device`, outside
    any CUDA graph capture."""
    device = torch.device(device)
    if not HIGH_PRIORITY or device.type != "cuda" or not dist.is_initialized() or not _default_has_nccl():
        return None
    if _default_is_high_priority():
        return None
    world = dist.group.WORLD
    cached = _FLOW_GROUPS.get(id(world))
    if cached is not None and cached[0] is world:
        return cached[1]
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        group = dist.new_group(
            backend="nccl",
            pg_options=_high_priority_options(),
            timeout=datetime.timedelta(seconds=timeout_s()),
        )
        dist.all_reduce(torch.zeros(1, device=device), group=group)
    except (RuntimeError, ConnectionError) as err:
        raise DistributedError(
            f"rank {dist.get_rank()}: setting up the flows' high-priority NCCL group failed (another "
            f"rank exited, or NCCL could not make a second communicator: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); CW_DIST_HIGH_PRIORITY=0 all-reduces "
            "the flows on the default group instead"
        ) from err
    _FLOW_GROUPS.clear()  # a default group destroyed and made again: its old flows group goes too
    _FLOW_GROUPS[id(world)] = (world, group)
    return group


class FlowReducer:
    """Sums the parameter flows and input statistics over ranks, in place; its own profiler span.

    Called alone (`reducer()`), it reduces every buffer: one all-reduce per buffer (the sum-weight
    flows, then each input layer's statistics) in a fixed order on every rank, so NCCL can also
    record them inside the CUDA graph of a step. `dtype="bf16"` halves the bytes sent: the buffers
    are cast into one flat bfloat16 buffer, reduced in one call and cast back (each flow keeps ~3
    significant digits, as PyJuice's bf16 reduction; every rank still receives the same sums).

    `overlap=True` (the default; fp32 only): `start()` before a step's flows pass makes the circuit report each
    finished layer (`pc.flow_listener`); the flows of consecutive sum layers (contiguous in the
    flat vector, top-down) are all-reduced asynchronously in buckets of >= `bucket_bytes` while
    the layers below still compute (each report returns the wait for its all-reduce: an EM update
    inside the pass, `CompiledCircuit.train_step`, waits for it on a stream of its own and updates
    the bucket's layers behind it); the input statistics range by range as the circuit reports them
    (`pc.stats_listener`, each range a contiguous `[rows, num_stats]` view): in a training step the
    rows whose flows are final early (HCLT: most of them, `LayerPlan.input_flows_ready`) are computed
    and reduced while the layers below still run, the rest after the input layer's step. `reducer()`
    then waits for them all. The profiler span then measures only the wait, the exposed part.

    With overlap, an input layer whose statistics exceed `chunk_bytes` (>0) is asked to compute them
    in chunks of node rows (`Backend.input_stats`), each all-reduced as soon as it is queued, while
    the next chunk computes. Every rank issues the same collectives in the same order: the ranges
    follow from the plan and the kernel options, which the ranks share. `chunk_rows` maps such an
    input layer's index to its rows per chunk (empty: no chunking).
    """

    def __init__(
        self,
        pc,
        dtype: str = "fp32",
        overlap: bool = True,
        bucket_bytes: int = BUCKET_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
    ):
        if dtype not in REDUCE_DTYPES:
            raise ValueError(f"reduce dtype must be one of {', '.join(REDUCE_DTYPES)}, got {dtype!r}")
        self.pc = pc
        self.dtype = dtype
        self.group = flow_group(pc.device)
        self.tensors = [pc.param_flows] + [pc.input_stats(i) for i in range(len(pc.input_layers))]
        self.flat = None
        if dtype != "fp32":
            total = sum(t.numel() for t in self.tensors)
            self.flat = torch.empty(total, dtype=REDUCE_DTYPES[dtype], device=pc.device)
        self.buckets = _flow_buckets(pc, bucket_bytes) if overlap and dtype == "fp32" else {}
        self.overlap = bool(self.buckets)
        if int(chunk_bytes) < 0:
            raise ValueError(f"chunk_bytes must be >= 0 (0: no chunking), got {chunk_bytes}")
        self.chunk_rows = _stats_chunk_rows(pc, int(chunk_bytes)) if self.overlap else {}
        self._pending: list = []
        self._reported: dict[int, int] = {}  # input layer -> its statistics rows reduced so far this step
        self._armed = False

    def start(self) -> None:
        """Before a flows pass whose flows this reducer will sum: reduce layer by layer as they finish."""
        self._pending, self._reported = [], {}  # a step that raised mid-pass left its own behind
        if self.overlap:
            self.pc.flow_listener = self._on_step
            self.pc.stats_listener = self._stats_chunks
            self._armed = True

    def __call__(self, defer_stats: bool = False) -> PendingStats | None:
        """Wait for (or, not started, run) the reduction. `defer_stats` (an EM update follows at once
        and takes the result, `CompiledCircuit.em_step(pending=...)`): only the parameter flows are
        waited for here; the input statistics still on their way come back as `PendingStats`, so the
        sum-weight update runs while the last statistics arrive."""
        prof = self.pc.profiler
        with prof.span(ALLREDUCE_LAYER, "allreduce", "allreduce") if prof is not None else nullcontext():
            if self._armed:
                return self._finish(defer_stats and DEFER_STATS)
            self._reduce()
            return None

    def cancel(self) -> None:
        """Forget a started reduction without waiting (a CUDA-graph capture that failed midway)."""
        self.pc.flow_listener = None
        self.pc.stats_listener = None
        self._armed = False
        self._pending = []
        self._reported = {}

    def _on_step(self, step) -> Callable[[], None] | None:
        """The circuit's report of a finished step: a bucket it closes is all-reduced; returns the wait
        for it (an EM update in the pass, `PassEM`, waits so for the bucket's layers), or None."""
        what = self.buckets.get((step.layer.index, step.pass_name))
        if what is None:
            return None
        work = _collective(
            "all-reduce of the parameter flows", dist.all_reduce, what, group=self.group, async_op=True
        )
        self._pending.append((None, work))
        return lambda: _collective("all-reduce of the parameter flows", work.wait)

    def _stats_chunks(self, i: int):
        """The circuit's question before input layer i's statistics: (rows per chunk, after)."""
        return self.chunk_rows.get(i, 0), lambda lo, hi: self._on_stats_chunk(i, lo, hi)

    def _on_stats_chunk(self, i: int, lo: int, hi: int) -> Callable[[], None]:
        if lo != self._reported.get(i, 0) or hi <= lo:
            raise RuntimeError(f"input layer {i}: statistics rows {lo}..{hi} reported out of order")
        self._reported[i] = hi
        view = self.pc.input_stats(i)[lo:hi]  # whole rows of a [n, S] tensor: contiguous
        work = _collective(
            "all-reduce of the input statistics", dist.all_reduce, view, group=self.group, async_op=True
        )
        self._pending.append(((i, lo, hi), work))
        return lambda: PendingStats._wait(work)

    def _finish(self, defer_stats: bool) -> PendingStats | None:
        pending, reported = self._pending, self._reported
        self.cancel()
        for key, work in pending:  # on CUDA: the compute stream waits for NCCL's stream, the host does not
            if key is None:
                _collective("all-reduce of the parameter flows", work.wait)
        stats = PendingStats([(key, work) for key, work in pending if key is not None])
        for i in range(len(self.pc.input_layers)):  # rows never reported would be silently left unsummed
            n = self.pc.input_stats(i).shape[0]
            if reported.get(i, 0) != n:
                stats.wait_all()  # nothing of this step may be left in flight
                raise RuntimeError(
                    f"input layer {i}: statistics rows {reported.get(i, 0)}..{n} were never reduced"
                )
        if defer_stats:
            return stats
        stats.wait_all()
        return None

    def _reduce(self) -> None:
        if self.flat is None:
            for t in self.tensors:
                _collective("all-reduce of the parameter flows", dist.all_reduce, t, group=self.group)
            return
        views, at = [], 0
        for t in self.tensors:  # read N fp32, write N bf16
            views.append(self.flat[at : at + t.numel()])
            views[-1].copy_(t.reshape(-1))
            at += t.numel()
        _collective("all-reduce of the parameter flows", dist.all_reduce, self.flat, group=self.group)
        for t, v in zip(self.tensors, views):  # read N bf16, write N fp32
            t.copy_(v.view(t.shape))


class PendingStats:
    """Input statistics whose all-reduce may still run when the EM update starts: the update of
    layer i's rows waits only for the all-reduces of those rows (`pieces`)."""

    def __init__(self, works: list):
        self._works = works  # [((layer i, lo, hi), work)], each layer's ranges in order

    def pieces(self, i: int) -> list[tuple[int, int, Callable[[], None]]]:
        """`[(lo, hi, wait)]` tiling layer i's rows: all ranges but the last, then the last (the
        statistics computed at the end of the pass, the ones still arriving): two EM launches at most."""
        mine = [(lo, hi, work) for (j, lo, hi), work in self._works if j == i]
        if not mine:
            return []
        head, (lo, hi, last) = mine[:-1], mine[-1]
        out = [(head[0][0], lo, lambda: [self._wait(w) for _, _, w in head])] if head else []
        return out + [(lo, hi, lambda: self._wait(last))]

    def wait_all(self) -> None:
        for _, work in self._works:
            self._wait(work)

    @staticmethod
    def _wait(work) -> None:
        _collective("all-reduce of the input statistics", work.wait)


def _flow_buckets(pc, bucket_bytes: int) -> dict:
    """(layer index, pass) of the step after which a buffer slice is final -> that slice.

    Sum layers come top-down in the flows pass and own contiguous, descending parameter ranges:
    consecutive ones are merged until a bucket holds `bucket_bytes`; the last sum layer closes the
    final bucket. Empty when the layers' ranges do not tile the flat vector this way. (The input
    statistics are reduced range by range as the circuit reports them: `FlowReducer._on_stats_chunk`.)"""
    out, lo, hi, last = {}, None, None, None
    flows = pc.param_flows
    sums = [st for st in pc.plan.backward_steps() if st.layer.kind == "sum" and st.pass_name == "backward"]
    for i, st in enumerate(sums):
        parts = st.layer.partitions
        a = min(p.param_offset for p in parts)
        b = max(p.param_offset + p.num_params for p in parts)
        if hi is not None and b != lo:  # not adjacent: close the open bucket first
            out[last] = flows[lo:hi]
            lo = hi = None
        lo, hi, last = a, (b if hi is None else hi), (st.layer.index, "backward")
        if (hi - lo) * flows.element_size() >= bucket_bytes or i == len(sums) - 1:
            out[last] = flows[lo:hi]
            lo = hi = None
    if sum(t.numel() for t in out.values()) != flows.numel():
        return {}  # a layout with gaps or another order: reduce everything at the end instead
    return out


def _stats_chunk_rows(pc, chunk_bytes: int) -> dict[int, int]:
    """Input layer index -> rows per chunk, for the layers whose statistics exceed `chunk_bytes`."""
    out = {}
    for i in range(len(pc.input_layers)):
        stats = pc.input_stats(i)
        rows = chunk_bytes // max(1, stats.shape[1] * stats.element_size())
        if chunk_bytes > 0 and 0 < rows < stats.shape[0]:
            out[i] = rows
    return out


def shard_batches(order: torch.Tensor, batch_size: int, ranks: Ranks) -> torch.Tensor:
    """This rank's rows of each global batch of `batch_size * world` rows (the tail is dropped).

    Global batch g is `order[g*G : (g+1)*G]`; rank r takes its r-th slice of `batch_size` rows, so
    the ranks' batches together are exactly the global batch one process would train on.
    """
    g = batch_size * ranks.world
    whole = len(order) // g * g
    rows = order[:whole].reshape(-1, ranks.world, batch_size)[:, ranks.rank]
    return rows.reshape(-1)


def shard_rows(n: int, ranks: Ranks) -> torch.Tensor:
    """A contiguous share of rows 0..n-1 (full-batch EM and evaluation: every row once overall)."""
    lo, hi = n * ranks.rank // ranks.world, n * (ranks.rank + 1) // ranks.world
    return torch.arange(lo, hi)
