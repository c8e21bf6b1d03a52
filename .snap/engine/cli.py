"""Command line: `python -m engine train ...` and `python -m engine plan ...`.

    python -m engine train --structure hclt --data nltcs --latents 32 --epochs 20 \
        --metrics runs/nltcs.jsonl --out runs/nltcs.cw

Every epoch prints and appends one JSON object to `--metrics` (log-likelihoods in nats per
example); `--profile` adds per-layer times and device memory to the same file.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from pathlib import Path

import torch

from engine.compiler import DEFAULT_TOLERANCE
from engine.structures.templates import TEMPLATES as STRUCTURES


def build_structure(name: str, ds, latents: int, seed: int, device: str = "cpu", homogeneous: bool = False):
    """A root node vector of structure `name` fitted to dataset `ds` (HCLT's tree learnt on `device`),
    built by the same translator as the workbench's template builder. `homogeneous`: HMM only, one
    tied transition and emission set for all steps."""
    from engine.structures.templates import build_template

    if name not in STRUCTURES:
        raise ValueError(f"unknown structure {name!r}; choose one of {', '.join(STRUCTURES)}")
    if homogeneous and name != "hmm":
        raise ValueError(f"--homogeneous applies to --structure hmm only, not {name}")
    spec = {"template": name, "num_latents": latents, "seed": seed}
    if homogeneous:
        spec["homogeneous"] = True
    return build_template(spec, ds, device=device)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def cmd_train(args) -> int:
    from engine import distributed
    from engine.data import load_dataset
    from engine.optim import EMSchedule
    from engine.training import TrainConfig, json_line, pick_device, run_training

    schedule = EMSchedule(
        batch_size=args.batch_size,
        step_size=args.step_size,
        final_step_size=args.final_step_size,
        pseudocount=args.pseudocount,
        full_batch_epochs=args.full_batch_epochs,
        drop_last=args.drop_last,
    )
    device, main = args.device, True
    if distributed.launched_by_torchrun():  # torchrun --nproc-per-node N -m engine train ...
        ranks, device = distributed.join(args.device)
        main = ranks.is_main
    cfg = TrainConfig(
        epochs=args.epochs,
        schedule=schedule,
        device=device,
        block_size=args.block_size,
        tolerance=args.tolerance,
        profile=args.profile,
        distributed=distributed.launched_by_torchrun(),
        reduce_dtype=args.reduce_dtype,
    )
    cfg.check()  # bad settings fail before the data are read
    torch.manual_seed(args.seed)
    ds = load_dataset(args.data)
    t0 = time.perf_counter()
    root = build_structure(args.structure, ds, args.latents, args.seed, pick_device(device), args.homogeneous)
    metrics_file = None
    if args.metrics and main:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(args.metrics, "w")

    def on_compiled(pc) -> None:
        if main:
            print(
                f"{args.structure} on {ds.name}: {ds.num_vars} vars, {ds.train.shape[0]} train rows; "
                f"{pc.plan.to_dict()['num_edges']:,} edges, {len(pc.plan.layers)} layers, built in "
                f"{time.perf_counter() - t0:.2f}s on {pc.device.type}"
                + (f" x {torch.distributed.get_world_size()} ranks" if cfg.distributed else ""),
                file=sys.stderr,
            )

    def on_event(e: dict) -> None:
        if e["type"] == "epoch":
            print(
                f"epoch {e['epoch']:3d}  train {_fmt(e['train_ll'])}  valid {_fmt(e['valid_ll'])}  "
                f"test {_fmt(e['test_ll'])}  ({e['seconds']:.2f}s)",
                file=sys.stderr,
            )
        if metrics_file is not None and (e["type"] == "epoch" or (args.profile and e["type"] != "batch")):
            metrics_file.write(json_line(e) + "\n")
            metrics_file.flush()

    try:
        result = run_training(
            root,
            ds,
            cfg,
            on_event,
            out=args.out if main else None,
            progress=not args.quiet,
            on_compiled=on_compiled,
        )
    finally:
        if metrics_file is not None:
            metrics_file.close()
        if cfg.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if args.out and main:
        print(f"saved {args.out}", file=sys.stderr)
    if result.history:
        last = result.history[-1]
        print(
            json_line(
                {
                    "test_ll": last["test_ll"],
                    "valid_ll": last["valid_ll"],
                    "train_ll": last["train_ll"],
                    "seconds": round(sum(h["seconds"] for h in result.history), 3),
                }
            )
        )
    return 0


def cmd_plan(args) -> int:
    from engine.compiler import compile_plan
    from engine.data import load_dataset

    ds = load_dataset(args.data)
    root = build_structure(args.structure, ds, args.latents, 0, homogeneous=args.homogeneous)
    plan, _, _ = compile_plan(root, args.block_size, args.tolerance)
    print(json.dumps(plan.to_dict(args.batch_size), indent=1))
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m engine", description="Train and inspect probabilistic circuits."
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("train", "plan"):
        s = sub.add_parser(name)
        s.add_argument("--structure", choices=STRUCTURES, default="hclt")
        s.add_argument(
            "--data", required=True, help="dataset name (nltcs, plants, digits, ...) or a .npy/.npz/.csv file"
        )
        s.add_argument("--latents", type=POSITIVE_INT, default=32)
        s.add_argument("--block-size", type=POSITIVE_INT, default=None)
        s.add_argument(
            "--tolerance", type=NON_NEGATIVE, default=DEFAULT_TOLERANCE, help="partition padding tolerance"
        )
        s.add_argument("--batch-size", type=POSITIVE_INT, default=512)
        s.add_argument(
            "--homogeneous",
            action="store_true",
            help="hmm: one transition and emission parameter set shared (tied) by all steps",
        )
    t = sub.choices["train"]
    t.add_argument("--epochs", type=COUNT, default=10, help="mini-batch EM epochs")
    t.add_argument(
        "--full-batch-epochs", type=COUNT, default=10, help="full-batch EM epochs after mini-batch EM"
    )
    t.add_argument(
        "--step-size", type=UNIT_STEP, default=1.0, help="mini-batch EM step at epoch 1 (cosine decay)"
    )
    t.add_argument("--final-step-size", type=UNIT_STEP, default=0.1)
    t.add_argument("--pseudocount", type=NON_NEGATIVE, default=0.1)
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--metrics", help="JSON-lines metrics file (one object per epoch)")
    t.add_argument("--out", help="save the trained model here (engine file format)")
    t.add_argument("--profile", action="store_true", help="record per-layer times and memory into --metrics")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--drop-last",
        action="store_true",
        help="skip each mini-batch epoch's short tail batch (always, under torchrun)",
    )
    t.add_argument(
        "--reduce-dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="under torchrun: the dtype the ranks' flows are summed in (bf16: half the bytes)",
    )
    return p


def main(argv=None) -> int:
    """Run a command; every failure a user can cause is one `error:` line on stderr and exit code 2."""
    args = _parse(argv)
    if isinstance(args, int):
        return args
    from engine.distributed import DistributedError
    from engine.training import check_output_path

    try:
        if args.command == "train":
            for path in (args.metrics, args.out):
                check_output_path(path)  # before training, so a bad path never costs the model
        return {"train": cmd_train, "plan": cmd_plan}[args.command](args)
    except (ValueError, OSError, OverflowError, RecursionError) as e:  # bad data, circuit, file, path
        return _fail(str(e) or type(e).__name__)
    except DistributedError as e:  # another rank died or stopped answering: say so, don't hang
        return _fail(str(e))
    except MemoryError:
        return _fail("out of memory: use a smaller circuit (--latents) or less data")
    except RuntimeError as e:  # torch reports a failed allocation as a RuntimeError
        if "allocate" not in str(e) and "out of memory" not in str(e):
            raise
        return _fail("out of memory: use a smaller circuit (--latents) or less data")


def _parse(argv) -> argparse.Namespace | int:
    """Parsed arguments, or exit code 2 after argparse's one `error:` line (without its usage block)."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return make_parser().parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help: printed to stdout
            raise
        lines = [line for line in captured.getvalue().splitlines() if "error:" in line]
        print(f"{lines[-1] if lines else 'error: bad arguments'} (see --help)", file=sys.stderr)
        return 2


def _fail(message: str) -> int:
    lines = message.strip().splitlines() or ["failed"]
    print(f"error: {lines[0]}", file=sys.stderr)
    return 2


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """argparse `type=`: a finite `kind` number within [low, high] ((low, high] with `low_open`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} must be a finite number")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"{text} must be {'>' if low_open else '>='} {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text} must be <= {high}")
        return value

    return parse


POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
UNIT_STEP = _number(float, 0.0, 1.0, low_open=True)
NON_NEGATIVE = _number(float, 0.0)
