"""Calibrate the schedule's device model (roofline + launch cost) to a profiled run of the same plan.

The model predicts a step's time as `max(flops / peak_flops, bytes / bandwidth) + launches *
launch_us`. A preset (say "this CPU") can be off by 10x; given measured per-step times of this very
plan, `calibrate` picks the throughput, bandwidth and launch cost that minimise the squared log
error over the steps (a grid search in log space, then a finer one around the best point: no local
minima to fall into, and fast at a few hundred steps). Plain numbers in, plain numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOPS_RANGE = (1e6, 1e16)  # FLOP/s searched
BANDWIDTH_RANGE = (1e6, 1e14)  # bytes/s searched
LAUNCH_US = np.array([0.0, 1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 350, 500, 1000, 2000])


@dataclass
class Calibration:
    """A device model fitted to measured step times, and how well it predicts them."""

    peak_flops: float  # FLOP/s
    bandwidth: float  # bytes/s
    launch_us: float  # microseconds per partition
    num_steps: int  # measured steps used
    measured_ms: float  # sum of the measured step times
    predicted_ms: float  # sum of the calibrated model's predictions for the same steps
    uncalibrated_ms: float  # sum of the preset model's predictions for the same steps
    median_error: float  # median over steps of max(pred / meas, meas / pred) (1.0 = exact)

    @property
    def factor(self) -> float:
        """Measured / calibrated prediction for the whole step (1.0 = exact)."""
        return self.measured_ms / max(self.predicted_ms, 1e-12)

    @property
    def uncalibrated_factor(self) -> float:
        return self.measured_ms / max(self.uncalibrated_ms, 1e-12)


def predict_ms(flops, bytes_, launches, peak_flops, bandwidth, launch_us) -> np.ndarray:
    """The roofline + launch model, in ms, broadcast over numpy arrays."""
    return 1e3 * np.maximum(flops / peak_flops, bytes_ / bandwidth) + launches * launch_us * 1e-3


def _best(f, b, n, m, flops_grid, bw_grid, launch_grid) -> tuple[float, float, float, float]:
    """(loss, peak_flops, bandwidth, launch_us) minimising the squared log error on the grid."""
    t = 1e3 * np.maximum(f / flops_grid[:, None, None, None], b / bw_grid[None, :, None, None])
    t = t + n * launch_grid[None, None, :, None] * 1e-3  # [P, W, L, N]
    loss = ((np.log(np.maximum(t, 1e-12)) - np.log(m)) ** 2).sum(-1)
    i, j, k = np.unravel_index(int(loss.argmin()), loss.shape)
    return float(loss[i, j, k]), float(flops_grid[i]), float(bw_grid[j]), float(launch_grid[k])


def calibrate(
    records: list[dict], peak_flops: float, bandwidth: float, launch_us: float
) -> Calibration | None:
    """Fit the model to the records' measured times (`plans.schedule` records with "flops",
    "bytes", "launches" and "measured_ms"); None when fewer than 3 steps were measured."""
    rows = [r for r in records if r.get("measured_ms") and r["measured_ms"] > 0]
    if len(rows) < 3:
        return None
    f = np.array([r["flops"] for r in rows], dtype=np.float64)
    b = np.array([r["bytes"] for r in rows], dtype=np.float64)
    n = np.array([r["launches"] for r in rows], dtype=np.float64)
    m = np.array([r["measured_ms"] for r in rows], dtype=np.float64)
    coarse_p = np.geomspace(*FLOPS_RANGE, 41)
    coarse_w = np.geomspace(*BANDWIDTH_RANGE, 33)
    _, p, w, launch = _best(f, b, n, m, coarse_p, coarse_w, LAUNCH_US)
    fine_l = np.unique(np.concatenate([LAUNCH_US, launch * np.geomspace(0.5, 2, 9)]))
    _, p, w, launch = _best(f, b, n, m, p * np.geomspace(0.5, 2, 21), w * np.geomspace(0.5, 2, 21), fine_l)
    pred = predict_ms(f, b, n, p, w, launch)
    ratio = np.maximum(pred / m, m / pred)
    return Calibration(
        peak_flops=p,
        bandwidth=w,
        launch_us=launch,
        num_steps=len(rows),
        measured_ms=float(m.sum()),
        predicted_ms=float(pred.sum()),
        uncalibrated_ms=float(predict_ms(f, b, n, peak_flops, bandwidth, launch_us).sum()),
        median_error=float(np.median(ratio)),
    )
