"""A roofline: each layer's arithmetic intensity against the FLOP/s it attains, under the device's
ceilings (peak compute, bandwidth x intensity) that meet at the ridge point.

Layers left of the ridge are bound by memory traffic (input and product layers, small sum tiles);
right of it by compute (large sum tiles). Predicted points sit on or below the roof (the launch cost
per partition pulls them down); measured ones show how far the real run is from the model.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd

from workbench.views._common import KIND_COLORS, NO_WHEEL, si_ticks

MARKERS = {"forward": "circle", "recompute": "triangle", "backward": "square"}


def points(records: list[dict], key: str) -> pd.DataFrame:
    """One row per schedule step with time `key`: intensity (FLOP/byte) and attained FLOP/s."""
    rows = [r for r in records if r.get(key) and r["flops"] > 0 and r["bytes"] > 0]
    df = pd.DataFrame(rows, columns=["layer", "kind", "pass", "flops", "bytes", key])
    df["intensity"] = df["flops"] / df["bytes"]
    df["flop_s"] = df["flops"] / (df[key].astype(float) * 1e-3)
    df["marker"] = df["pass"].map(MARKERS)
    return df


def roofline(records: list[dict], peak_flops: float, bandwidth: float, measured: bool):
    """The roof, the ridge and every step of the schedule (hollow markers: measured)."""
    pred = points(records, "predicted_ms")
    ai = pred["intensity"] if len(pred) else pd.Series([1.0])
    ridge = peak_flops / bandwidth
    lo, hi = min(ai.min(), ridge) / 4, max(ai.max(), ridge) * 4
    x = np.geomspace(lo, hi, 64)
    roof = hv.Curve((x, np.minimum(peak_flops, bandwidth * x)), "intensity", "flop_s", label="roof").opts(
        color="#333", line_width=2
    )
    ridge_line = hv.VLine(ridge).opts(color="#999", line_dash="dashed", line_width=1)
    vdims = ["flop_s", "kind", "pass", "layer", "marker"]
    out = roof * ridge_line * _scatter(pred, vdims, fill=True)
    if measured:
        out = out * _scatter(points(records, "measured_ms"), vdims, fill=False)
    return out.opts(
        logx=True,
        logy=True,
        xformatter=si_ticks(),
        yformatter=si_ticks(),
        xlabel="arithmetic intensity (FLOP/byte)",
        ylabel="attained (FLOP/s)",
        title=f"Roofline: ridge at {ridge:.3g} FLOP/byte (filled: predicted"
        + (", hollow: measured)" if measured else ")"),
        responsive=True,
        height=300,
        show_legend=False,
        **NO_WHEEL,
    )


def _scatter(df: pd.DataFrame, vdims: list[str], fill: bool):
    el = hv.Points(df, ["intensity", "flop_s"], vdims[1:])
    return el.opts(
        color="kind",
        cmap=KIND_COLORS,
        marker="marker",
        size=9,
        fill_alpha=0.9 if fill else 0.0,
        line_width=1 if fill else 2,
        tools=["hover"],
    )
