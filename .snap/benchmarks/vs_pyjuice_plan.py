"""Which runs a vs_pyjuice.py call makes, and how long they should take on an H200 (no torch).

The device tool gives a command at most 600 s, so the run prints `estimate_seconds` first and skips a
run that no longer fits in `--budget-s`. The estimate is per run from the epoch and compile times the
README's H200 table measured at batch 512; everything else in it (small-batch cost, JIT, structure
builds, fixed start-up) is a stated guess, and each row of the JSON keeps `expected_s` beside the
`seconds` it took, so the guesses can be checked against the next run.
"""

from __future__ import annotations

import math

BATCH, NUM_ROWS = 512, 60000
KINDS = ("hclt", "pd")


def parse_configs(specs: list[str]) -> list[tuple[str, int]]:
    """`["hclt:16,32", "pd:128"]` -> `[("hclt", 16), ("hclt", 32), ("pd", 128)]`."""
    out = []
    for spec in specs:
        kind, _, sizes = spec.partition(":")
        if kind not in KINDS or not sizes:
            raise SystemExit(f"--configs: {spec!r} is not KIND:LATENTS[,LATENTS...] with KIND in {KINDS}")
        try:
            out += [(kind, int(n)) for n in sizes.split(",")]
        except ValueError:
            raise SystemExit(f"--configs: {spec!r} has a latent count that is not an integer") from None
    return out


# seconds at batch 512 on one H200 (benchmarks/README.md, 2026-11-30): fit epoch, fit wall epoch (with
# its evaluation of the 60,000 rows), PyJuice tutorial epoch, PyJuice eager epoch, compile ours / PJ
H200_REF = {
    ("hclt", 16): (0.190, 0.243, 0.424, 2.285, 0.21, 8.3),
    ("hclt", 32): (0.259, 0.334, 0.468, 1.700, 0.22, 2.5),
    ("hclt", 64): (0.372, 0.473, 0.597, 2.744, 0.22, 2.4),
    ("hclt", 128): (0.624, 0.808, 0.871, 3.035, 0.43, 4.2),
    ("hclt", 256): (1.274, 1.707, 1.996, 2.456, 0.62, 3.9),
    ("hclt", 512): (3.346, 4.613, 5.942, 5.429, 1.02, 7.0),
    ("pd", 16): (0.141, 0.182, 0.401, 0.696, 0.29, 9.1),
    ("pd", 32): (0.226, 0.292, 0.456, 0.927, 0.22, 4.4),
    ("pd", 64): (0.481, 0.608, 0.754, 0.868, 0.33, 7.2),
    ("pd", 128): (1.154, 1.466, 1.738, 1.703, 0.55, 9.8),
    ("pd", 256): (3.196, 4.089, 5.345, 5.166, 0.92, 11.6),
}
FIXED_S = 40.0  # imports, data generation, the ceilings, CUDA context, first JIT: a guess, generous
JIT_S = 3.0  # Triton JIT of new shapes / precisions in each warm-up epoch of ours (README's JSON: 1-4 s)
BUILD_S = {"hclt": 4.0, "pd": 3.0}  # structure per configuration (HCLT: Chow-Liu on the GPU): a guess


def _ref(kind: str, nl: int) -> tuple:
    """H200_REF, or the nearest measured size of `kind` scaled by (latents ratio)^2 (sum weights)."""
    if (kind, nl) in H200_REF:
        return H200_REF[kind, nl]
    near = min((n for k, n in H200_REF if k == kind), key=lambda n: abs(math.log2(n / nl)))
    s = max(1.0, (nl / near) ** 2)
    return tuple(v * s for v in H200_REF[kind, near])


def small_batch_factor(bs: int) -> float:
    """Epoch time at `bs` over that at 512: a guess (fixed per-step costs: launches, PyJuice's sync per
    step) of 1 + 0.5 (512 / bs - 1) below 512, and 1 above (the same rows, fuller tiles)."""
    return 1.0 + 0.5 * max(0.0, BATCH / bs - 1.0)


def plan_runs(args) -> list[tuple[str, int, int, bool]]:
    """`(kind, latents, batch size, main)` in run order: the main runs (`--configs` at `--batch-sizes`,
    which also get the extra columns: opt-in precisions, PyJuice eager and fp32) first, so that a
    tight `--budget-s` cuts curve points rather than configurations; then each `--curve`
    configuration at the `--curve-batch-sizes` not run yet. Batch sizes ascending per configuration."""
    main = [(*c, bs, True) for c in parse_configs(args.configs) for bs in sorted(set(args.batch_sizes))]
    done = {(k, n, bs) for k, n, bs, _ in main}
    curve = [
        (*c, bs, False)
        for c in dict.fromkeys(parse_configs(args.curve))
        for bs in sorted(set(args.curve_batch_sizes))
        if (*c, bs) not in done
    ]
    return list(dict.fromkeys(main)) + curve


def estimate_seconds(runs, args) -> dict:
    """Expected wall seconds of the run, per `kind-latents@batch` and in total, from H200_REF."""
    e, per, built = args.epochs, {}, set()
    for kind, nl, bs, main in runs:
        fit, wall, pj, eager, c_ours, c_pj = _ref(kind, nl)
        lls = 2 * (wall - fit) / 6 * 2  # two LLs of 10,000 rows on each side, PyJuice's eager: x2
        f = small_batch_factor(bs)
        ours = c_ours + lls + e * wall * f + fit * f + 1.0 + JIT_S  # + the captured step's epoch
        t = ours * (1 + (len(args.extra_precision) if main else 0))
        if not args.no_pyjuice:
            t += c_pj + lls + 1.0 + e * pj * f  # + its dry run
            if args.eager_batches and main:
                t += c_pj + (3 + args.eager_batches) * eager / (NUM_ROWS // BATCH)
            if f"{kind}:{nl}" in args.pj_fp32_configs and main:
                t += c_pj + lls + 1.0 + e * pj * f * 1.5
        per[f"{kind}-{nl}@{bs}"] = t + (0.0 if (kind, nl) in built else BUILD_S[kind])
        built.add((kind, nl))
    cli = 0.0
    if args.cli_config:
        kind, nl = parse_configs([args.cli_config])[0]
        fit, wall, _, _, c_ours, _ = _ref(kind, nl)
        cli = 2 * (3 * (wall + 0.1) + c_ours + BUILD_S[kind]) + 15.0  # CLI process, then fit again
    return {"per_run_s": per, "cli_s": cli, "total_s": FIXED_S + sum(per.values()) + cli}
