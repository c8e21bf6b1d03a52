"""Per-rank series of a data-parallel run (issue 12): what each rank's events add to a RunState.

Every rank of a multi-GPU job streams its own `layer_times` and `memory` events, tagged `"rank"`
(workbench.services.ranks); rank 0 alone reports batches and epochs. `fold` keeps, per rank:

    {"device": str, "pid": int,
     "layer_ms": {(layer, pass): mean ms per call over the run},   plan layers only
     "allreduce_ms": mean ms per step of the all-reduce span (layer ALLREDUCE_LAYER),
     "allreduce_share": allreduce_ms / (allreduce_ms + sum of layer_ms), in [0, 1]
     "memory": latest memory event (bytes), "memory_series": {"t", "allocated", "peak_allocated"}}

The share is of a profiled training step (each span's mean per call, summed): the part of a step
spent waiting for the other ranks' flows, which is what the all-reduce's span measures.
"""

from __future__ import annotations

ALLREDUCE_LAYER = -1  # = engine.distributed.ALLREDUCE_LAYER (the state layer does not import torch)
MEMORY_KEYS = ("allocated", "peak_allocated")


def _rank(ranks: dict, r: int) -> dict:
    return ranks.setdefault(
        r,
        {
            "device": "",
            "pid": None,
            "layer_ms": {},
            "allreduce_ms": 0.0,
            "allreduce_share": 0.0,
            "memory": {},
            "_totals": {},
            "memory_series": {"t": [], **{k: [] for k in MEMORY_KEYS}},
        },
    )


def fold(ranks: dict, event: dict) -> dict | None:
    """Fold one rank-tagged event into `ranks` (in place); returns what the run-wide fold should
    still see (rank 0's events, without the all-reduce span), or None when nothing."""
    r = int(event["rank"])
    st = _rank(ranks, r)
    kind = event.get("type")
    if kind == "rank":
        st["device"], st["pid"] = event.get("device", ""), event.get("pid")
        return None
    if kind == "layer_times":
        totals = st["_totals"]
        for rec in event["records"]:
            acc = totals.setdefault((rec["layer"], rec["pass"]), [0.0, 0])
            acc[0] += rec["ms"] * rec["calls"]
            acc[1] += rec["calls"]
        means = {k: tot / n for k, (tot, n) in totals.items() if n}
        st["allreduce_ms"] = sum(ms for (layer, _), ms in means.items() if layer == ALLREDUCE_LAYER)
        st["layer_ms"] = {k: ms for k, ms in means.items() if k[0] != ALLREDUCE_LAYER}
        step = st["allreduce_ms"] + sum(st["layer_ms"].values())
        st["allreduce_share"] = st["allreduce_ms"] / step if step > 0 else 0.0
        if r != 0:
            return None
        return {**event, "records": [rec for rec in event["records"] if rec["layer"] != ALLREDUCE_LAYER]}
    if kind == "memory":
        st["memory"] = {k: event.get(k) for k in ("allocated", "reserved", "peak_allocated", "peak_reserved")}
        st["memory_series"]["t"].append(event.get("t"))
        for k in MEMORY_KEYS:
            st["memory_series"][k].append(event.get(k))
    return event if r == 0 else None
