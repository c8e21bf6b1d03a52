"""One training run: compile a circuit for a device, train it with `optim.fit`, save it.

`python -m engine train` and the workbench's worker both call `run_training`, so a run started
from the command line and one started in the browser compile, train, profile and save the same
way (and a speed measured for one is the speed of the other).

    cfg = TrainConfig(epochs=10, schedule=EMSchedule(batch_size=512), device="auto")
    result = run_training(root, dataset, cfg, callback=print, out="model.cw")
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engine.compiler import DEFAULT_TOLERANCE
from engine.nodes import NodeVector
from engine.optim import EVENT_INTERVAL_S, EMSchedule, fit


@dataclass(frozen=True)
class TrainConfig:
    """Everything about a run except the circuit and the data.

    `profile_interval_s`: with `profile`, time one batch per this many seconds (None: the
    profiler's own every-20th-batch sampling); `event_interval_s`: progress events (each a device
    sync) at most this often.
    """

    epochs: int = 10  # mini-batch EM epochs; schedule.full_batch_epochs follow
    schedule: EMSchedule = field(default_factory=EMSchedule)
    device: str = "auto"
    block_size: int | None = None
    tolerance: float = DEFAULT_TOLERANCE
    profile: bool = False
    profile_interval_s: float | None = None
    event_interval_s: float = EVENT_INTERVAL_S
    distributed: bool = False  # data-parallel over the joined torch.distributed group
    reduce_dtype: str = "fp32"  # data-parallel: "bf16" sends the flows in half the bytes

    def check(self) -> None:
        """Raise ValueError naming the first setting that cannot train."""
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        self.schedule.check()
        if not (0.0 <= self.tolerance < math.inf):
            raise ValueError(f"tolerance must be a finite number >= 0, got {self.tolerance}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block size must be >= 1, got {self.block_size}")
        if self.reduce_dtype not in ("fp32", "bf16"):
            raise ValueError(f"reduce dtype must be fp32 or bf16, got {self.reduce_dtype!r}")


@dataclass
class TrainResult:
    pc: torch.nn.Module
    history: list[dict]
    stopped: bool  # a stop request ended the run before its last epoch


def pick_device(name: str) -> str:
    """ "auto" -> "cuda" when a CUDA GPU is available, else "cpu"; a CUDA request without one fails."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but no CUDA GPU is available")
    return name


def check_output_path(path) -> None:
    """Raise OSError unless `path` can be written: not a folder, its folder created and writable.

    A device (e.g. /dev/full) gets one test byte, since only a write shows whether it takes data.
    """
    if path is None or path == "":
        return
    try:
        _probe_write(Path(path))
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror or e}") from e


def _probe_write(p: Path) -> None:
    if p.is_dir():
        raise IsADirectoryError(0, "it is a folder; give a file name")
    if p.exists() and not p.is_file():
        with open(p, "wb") as f:  # raises for a device that refuses data
            f.write(b"\n")
            f.flush()
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".cw-write-test-", dir=p.parent)  # raises if not writable
    os.close(fd)
    os.unlink(probe)
    if p.exists() and not os.access(p, os.W_OK):
        raise PermissionError(0, "permission denied")


def json_line(event: dict) -> str:
    """`event` as one strict JSON line: NaN and infinities become null (JSON has no NaN)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(event), allow_nan=False)


def run_training(
    root: NodeVector,
    dataset,
    cfg: TrainConfig,
    callback: Callable[[dict], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    out=None,
    progress: bool = False,
    on_compiled: Callable[[torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Compile `root` for `cfg.device`, train it on `dataset` (train/valid/test splits), save to `out`.

    `on_compiled(pc)` runs once the circuit is compiled, before training (to report the plan);
    the model is saved also when `should_stop` ended the run early.
    """
    import engine

    cfg.check()
    check_output_path(out)
    pc = engine.compile(
        root, block_size=cfg.block_size, device=pick_device(cfg.device), tolerance=cfg.tolerance
    )
    if on_compiled is not None:
        on_compiled(pc)
    if cfg.profile:
        pc.profile(True, interval_s=cfg.profile_interval_s)
    try:
        history = fit(
            pc,
            dataset.train,
            dataset.valid,
            dataset.test,
            cfg.epochs,
            cfg.schedule,
            callback,
            should_stop,
            progress,
            event_interval_s=cfg.event_interval_s,
            distributed=cfg.distributed,
            reduce_dtype=cfg.reduce_dtype,
        )
    finally:
        pc.profile(False)
    stopped = should_stop is not None and len(history) < cfg.epochs + cfg.schedule.full_batch_epochs
    if out is not None:
        engine.save(pc, out)
    return TrainResult(pc, history, stopped)
