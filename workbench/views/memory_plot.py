"""Draw `services.memory.memory_timeline`: live bytes per step, recomputing product layers vs storing them."""

from __future__ import annotations

import holoviews as hv
import numpy as np

from workbench.services.memory import BUFFERS
from workbench.views._common import NO_WHEEL, PASS_COLORS, byte_unit, fmt_bytes

BUFFER_COLORS = {
    "parameters": "#bab0ac",
    "node values": "#4c78a8",
    "node flows": "#b279a2",
    "element values": "#f58518",
    "element flows": "#e45756",
}
STORE_COLOR = "#222222"


POLICY_NOTE = {  # how the title names what is recomputed into
    "recompute": "with product layers recomputed",
    "three streams": "with two element buffers (three streams)",
}


def memory_plot(timeline: dict[str, list[dict]], policy: str = "recompute"):
    """Stacked areas: the engine's buffers per step under `policy` ("recompute": one stream, "three
    streams": GPU training's flows pass, two element-value buffers, the second mostly in node-value
    rows already read); a dashed line: the total if every product layer were stored instead; pass
    boundaries shaded in the pass colours."""
    if policy not in POLICY_NOTE:
        raise ValueError(f"memory policy must be one of {sorted(POLICY_NOTE)}, got {policy!r}")
    rec, store = timeline[policy], timeline["store"]
    steps = np.arange(len(rec), dtype=float)
    totals = np.array([d["total"] for d in store], dtype=float)
    recomputed = np.array([sum(d[b] for b in BUFFERS) for d in rec], dtype=float)
    unit, scale = byte_unit(max(totals.max(initial=0), recomputed.max(initial=0)))  # axis in kB/MB/GB
    layers = []
    base = np.zeros(len(rec))
    for b in BUFFERS:
        top = base + np.array([d[b] for d in rec], dtype=float)
        layers.append(
            hv.Area((steps, base / scale, top / scale), "step", ["memory", "base"], label=b).opts(
                color=BUFFER_COLORS[b], alpha=0.85, line_width=0
            )
        )
        base = top
    stored = hv.Curve((steps, totals / scale), "step", "memory", label="store every product layer").opts(
        color=STORE_COLOR, line_dash="dashed", line_width=2, interpolation="steps-post"
    )
    spans = _pass_spans(rec)
    peak_re, peak_st = base.max(initial=0), totals.max(initial=0)
    title = (
        f"Step memory: peak {fmt_bytes(peak_re)} {POLICY_NOTE[policy]}, "
        f"{fmt_bytes(peak_st)} if stored ({_saving(peak_re, peak_st)})"
    )
    return hv.Overlay([*spans, *layers, stored]).opts(
        title=title,
        xlabel="step of the training step (forward, then recompute + backward)",
        ylabel=f"live memory ({unit})",
        responsive=True,
        height=300,
        legend_position="top_left",
        show_legend=True,
        **NO_WHEEL,
    )


def _saving(recompute: float, store: float) -> str:
    if store <= 0 or store <= recompute:
        return "no saving"
    return f"saves {fmt_bytes(store - recompute)}, {100 * (1 - recompute / store):.0f}%"


def _pass_spans(records: list[dict]) -> list:
    """Light background bands: forward steps, then the backward half."""
    first_back = next((i for i, r in enumerate(records) if r["pass"] != "forward"), len(records))
    return [
        hv.VSpan(-0.5, first_back - 0.5).opts(color=PASS_COLORS["forward"], alpha=0.08),
        hv.VSpan(first_back - 0.5, len(records) - 0.5).opts(color=PASS_COLORS["backward"], alpha=0.08),
    ]
