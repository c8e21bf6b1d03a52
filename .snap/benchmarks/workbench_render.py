"""Time to build and render the workbench views for a large (~300K-node) circuit; target < 2 s each.

    python benchmarks/workbench_render.py                       # PD 28x28, 64 latents (~300K nodes)
    python benchmarks/workbench_render.py --latents 32 --out /tmp/r.json

"Render" = construct the view and produce its Bokeh models (`pn.panel(view).get_root()`), the
server-side work Panel does before a page (or a tab update) is sent to the browser. Also times the
plan (compile without tensors) and a what-if recompute (block size change) with the views attached.
Prints a table and writes JSON (default benchmarks/results/workbench_render.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import holoviews as hv
import panel as pn

TARGET_S = 2.0


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def build_root(args):
    from engine.dists import Categorical
    from engine.structures import pd as pd_structure

    return pd_structure((args.height, args.width), args.latents, args.split, input_dist=Categorical(256))


def run(args) -> list[dict]:
    pn.extension("tabulator")
    hv.extension("bokeh")
    from workbench.services.circuits import describe
    from workbench.state.plan import PlanState
    from workbench.views.circuit_view import CircuitView
    from workbench.views.partition_view import PartitionView
    from workbench.views.schedule_view import ScheduleView

    root, t_build = timed(lambda: build_root(args))
    info = describe(root)
    rows = [{"step": "build circuit (not a view)", "seconds": t_build}]
    plan = PlanState()
    _, t = timed(lambda: setattr(plan, "root", root))
    rows.append({"step": "plan: compile layer plan + summaries", "seconds": t})

    def render(make):
        view = make()
        pn.panel(view).get_root()
        return view

    circuit, t = timed(lambda: render(lambda: CircuitView(plan=plan)))
    rows.append({"step": "Circuit view (layers level)", "seconds": t})
    _, t = timed(lambda: (setattr(circuit, "level", "Node vectors"), pn.panel(circuit).get_root()))
    rows.append({"step": "Circuit view: drill to node vectors (ranks 0-4)", "seconds": t})
    vid = next(i for i, n in zip(circuit.index().ids, circuit.index().vectors) if n.kind == "sum")
    _, t = timed(lambda: (circuit.param.update(vector=vid, level="Blocks"), pn.panel(circuit).get_root()))
    rows.append({"step": "Circuit view: drill to blocks of one vector", "seconds": t})
    partitions, t = timed(lambda: render(lambda: PartitionView(plan=plan)))
    rows.append({"step": "Partitions view", "seconds": t})
    _, t = timed(lambda: render(lambda: ScheduleView(plan=plan)))
    rows.append({"step": "Schedule view", "seconds": t})
    _, t = timed(lambda: setattr(plan, "block_size", 16))
    rows.append({"step": "what-if: block size 16 (recompile + redraw views)", "seconds": t})
    _, t = timed(lambda: setattr(plan, "tolerance", 1.0))
    rows.append({"step": "what-if: tolerance 1.0 (recompile + redraw views)", "seconds": t})
    for r in rows:
        r["within_target"] = r["seconds"] < TARGET_S or r["step"].startswith("build")
    meta = {
        "circuit": f"PD {args.height}x{args.width}, {args.latents} latents, split {args.split}",
        "num_nodes": info["num_nodes"],
        "num_vectors": info["num_vectors"],
        "num_layers": len(plan.layers),
        "machine": platform.platform(),
        "python": platform.python_version(),
    }
    return meta, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=28)
    ap.add_argument("--width", type=int, default=28)
    ap.add_argument("--latents", type=int, default=64)
    ap.add_argument("--split", type=int, default=4)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "workbench_render.json"))
    args = ap.parse_args()
    meta, rows = run(args)
    print(
        f"{meta['circuit']}: {meta['num_nodes']:,} nodes, {meta['num_vectors']:,} node vectors, "
        f"{meta['num_layers']} layers"
    )
    print(f"{'step':55s} {'seconds':>8s}  < {TARGET_S:g} s")
    for r in rows:
        print(f"{r['step']:55s} {r['seconds']:8.3f}  {'yes' if r['within_target'] else 'NO'}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "target_s": TARGET_S, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
