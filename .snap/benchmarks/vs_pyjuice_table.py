"""Markdown tables for benchmarks/README.md from the JSON that vs_pyjuice.py writes (no GPU, no torch).

    python benchmarks/vs_pyjuice.py --table results/vs_pyjuice_hclt_h200.json results/....json

`render(docs)` gives, over the rows of all files: the main table (one row per configuration and batch
size: fit, captured step, PyJuice's tutorial loop and eager loop, peak memory, compile, LLs, and one
group of columns per opt-in precision run), the batch-size curve (configurations run at two or
more batch sizes: seconds per epoch, samples/s, speed-up, peak memory, and any cliff), and the
floor table (per pass the floor in ms, `step_floor.times_ms`, against the measured step). Missing
entries (older files, a failed peer) print as "-".
"""

from __future__ import annotations

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_floor import ELEMENT_BUFFERS, PASSES, times_ms  # noqa: E402

CLIFF = 0.9  # a batch size whose samples/s falls below 90% of the best smaller one's is a cliff
NUM_ROWS = 60000


def load(path: str) -> dict:
    """One vs_pyjuice JSON file; a clear error for a missing or malformed one."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"--table: cannot read {path}: {err}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
        raise SystemExit(f"--table: {path} is not a vs_pyjuice.py result (no 'results' list)")
    return doc


def _num(v) -> float | None:
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def fmt(v, spec: str = ".3f", suffix: str = "") -> str:
    v = _num(v)
    return "-" if v is None else f"{v:{spec}}{suffix}"


def _div(a, b):
    a, b = _num(a), _num(b)
    return None if a is None or not b else a / b


def _gap(a, b):
    d = _div(abs(a - b), abs(b)) if _num(a) is not None and _num(b) is not None else None
    return None if d is None else 100 * d


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _label(row: dict) -> str:
    kind, _, nl = row["config"].partition("-")
    return f"{kind.upper()}-{nl}"


def _bs(row: dict, doc: dict) -> int:
    return row.get("batch_size") or doc.get("batch_size") or 512


def _steps(row: dict, doc: dict) -> int:
    em = row.get("ours", {}).get("em") or {}
    return em.get("steps_per_epoch") or NUM_ROWS // _bs(row, doc)


def _extras(docs: list[dict]) -> list[str]:
    keys = {k for d in docs for r in d["results"] for k in r if k.startswith("ours_") and k != "ours_step"}
    return sorted(k[len("ours_") :] for k in keys)


def header(doc: dict) -> str:
    """The run's card, versions, ceilings and command, as a paragraph."""
    c = doc.get("ceilings", {})
    peaks = ", ".join(
        f"{n} {fmt(c.get(f'matmul_{n}_TFLOPs'), '.0f')}"
        for n in ("fp32", "tf32", "bf16")
        if f"matmul_{n}_TFLOPs" in c
    )
    return (
        f"{doc.get('device', '?')}, {doc.get('date', '?')}: torch {doc.get('torch')}, Triton "
        f"{doc.get('triton')}, PyJuice {doc.get('pyjuice')}, Python {doc.get('python')}; measured copy "
        f"{fmt(_div(c.get('copy_GBps'), 1e3), '.2f')} TB/s, matmul TFLOP/s {peaks or '-'}; "
        f"{doc.get('epochs', '?')} epochs per system; `{doc.get('command', '?')}`"
    )


def _main_rows(docs: list[dict]):
    """(row, doc) of the main runs (not the points only a --curve asked for)."""
    return [(r, d) for d in docs for r in d["results"] if r.get("main", True)]


def main_table(docs: list[dict]) -> str:
    extras = _extras(docs)
    many = len({_bs(r, d) for r, d in _main_rows(docs)}) > 1
    head = ["config"] + (["batch"] if many else []) + [
        "fit", "step", "fit / step", "fit wall", "PyJuice", "speed-up", "PJ prev.", "peak GB ours",
        "PyJuice", "compile s ours / PJ", "LL ours", "LL PyJuice", "LL gap",
    ]  # fmt: skip
    for p in extras:
        head += [f"{p}", f"{p} speed-up", f"peak GB {p}", f"LL {p}"]
    rows = []
    for r, d in _main_rows(docs):
        o, p, e = r.get("ours", {}), r.get("pyjuice", {}), r.get("pyjuice_eager", {})
        step = o.get("step", {}).get("epoch_s")
        cells = [_label(r)] + ([str(_bs(r, d))] if many else []) + [
            fmt(o.get("epoch_s")), fmt(step), fmt(_div(o.get("epoch_s"), step), ".2f"),
            fmt(o.get("wall_s")), fmt(p.get("epoch_s")),
            fmt(_div(p.get("epoch_s"), o.get("epoch_s")), ".2f", "x"), fmt(e.get("epoch_s")),
            fmt(o.get("peak_alloc_GB"), ".2f"), fmt(p.get("peak_alloc_GB"), ".2f"),
            f"{fmt(o.get('compile_s'), '.2f')} / {fmt(p.get('compile_s'), '.1f')}",
            fmt(o.get("ll"), ".2f"), fmt(p.get("ll"), ".2f"), fmt(_gap(o.get("ll"), p.get("ll")), ".2f", "%"),
        ]  # fmt: skip
        for x in extras:
            xo = r.get("ours_" + x, {})
            cells += [
                fmt(xo.get("epoch_s")),
                fmt(_div(p.get("epoch_s"), xo.get("epoch_s")), ".2f", "x"),
                fmt(xo.get("peak_alloc_GB"), ".2f"),
                fmt(xo.get("ll"), ".2f"),
            ]
        rows.append(cells)
    return _table(head, rows)


def curves(docs: list[dict]) -> dict[str, list[tuple[dict, dict]]]:
    """config -> [(row, doc)] sorted by batch size, for configurations run at >= 2 batch sizes."""
    by: dict[str, list] = {}
    for d in docs:
        for r in d["results"]:
            by.setdefault(r["config"], []).append((r, d))
    return {c: sorted(v, key=lambda rd: _bs(*rd)) for c, v in by.items() if len({_bs(*rd) for rd in v}) > 1}


def samples_per_s(row: dict, doc: dict, system: str) -> float | None:
    return _div(_steps(row, doc) * _bs(row, doc), row.get(system, {}).get("epoch_s"))


def cliffs(curve: list[tuple[dict, dict]], system: str) -> list[str]:
    """Batch sizes where `system`'s samples/s falls below CLIFF x the best of the smaller sizes."""
    out, best, best_bs = [], None, None
    for r, d in curve:
        s = samples_per_s(r, d, system)
        if s is None:
            continue
        if best is not None and s < CLIFF * best:
            out.append(
                f"{system} at batch {_bs(r, d)}: {s:,.0f} samples/s, {100 * (1 - s / best):.0f}% below batch {best_bs}"
            )
        if best is None or s >= best:
            best, best_bs = s, _bs(r, d)
    return out


def curve_table(docs: list[dict]) -> str:
    cs = curves(docs)
    if not cs:
        return ""
    head = [
        "config", "batch", "steps / epoch", "ours s/epoch", "ours samples/s", "PyJuice s/epoch",
        "PyJuice samples/s", "speed-up", "ours step / floor", "peak GB ours", "PyJuice", "LL ours", "LL PyJuice",
    ]  # fmt: skip
    rows, notes = [], []
    for _, curve in cs.items():
        for r, d in curve:
            o, p = r.get("ours", {}), r.get("pyjuice", {})
            t, step_ms = step_vs_floor(o, r, d)
            rows.append([
                _label(r), str(_bs(r, d)), str(_steps(r, d)), fmt(o.get("epoch_s")),
                fmt(samples_per_s(r, d, "ours"), ",.0f"), fmt(p.get("epoch_s")),
                fmt(samples_per_s(r, d, "pyjuice"), ",.0f"), fmt(_div(p.get("epoch_s"), o.get("epoch_s")), ".2f", "x"),
                fmt(_div(step_ms, t and t["step_ms"]), ".1f", "x"),
                fmt(o.get("peak_alloc_GB"), ".2f"), fmt(p.get("peak_alloc_GB"), ".2f"),
                fmt(o.get("ll"), ".2f"), fmt(p.get("ll"), ".2f"),
            ])  # fmt: skip
            if r.get("em_mismatch"):
                notes.append(f"{_label(r)} at batch {_bs(r, d)}: EM settings differ ({r['em_mismatch']})")
        for system in ("ours", "pyjuice"):
            notes += [f"{_label(curve[0][0])}: cliff, {c}" for c in cliffs(curve, system)]
    text = _table(head, rows)
    notes = notes or [f"no cliff: samples/s never below {CLIFF:.0%} of the best smaller batch, either system"]
    return text + "\n\n" + "\n".join(f"- {n}" for n in notes)


def step_vs_floor(o: dict, row: dict, doc: dict) -> tuple[dict | None, float | None]:
    """(`times_ms` of a run of ours, or None for a file without floor or ceilings; its captured step
    in ms a batch)."""
    step = o.get("step", {})
    step_ms = _div(step.get("epoch_s"), (step.get("batches") or _steps(row, doc)) / 1e3)
    try:
        return times_ms(o["floor"], doc.get("ceilings") or {}, o.get("precision") or "tf32x3"), step_ms
    except (KeyError, ValueError):
        return None, step_ms


def floor_table(docs: list[dict]) -> str:
    """Per configuration, batch size and precision of ours: the floor per pass and the measured step."""
    head = ["config", "batch", "precision"] + [f"{p} ms" for p in PASSES]
    head += ["floor ms/batch", "without element buffers", "step ms/batch", "step / floor", "fit ms/batch"]
    head += ["PyJuice ms/batch"]
    rows = []
    for r, d in _main_rows(docs):  # curve points: their step / floor is in the curve table
        nb = _steps(r, d)
        pj = _div(r.get("pyjuice", {}).get("epoch_s"), nb)
        for key in ["ours"] + [k for k in r if k.startswith("ours_") and k != "ours_step"]:
            o = r[key]
            t, step_ms = step_vs_floor(o, r, d)
            if t is None:
                continue  # an older file without floors or ceilings
            cells = [_label(r), str(_bs(r, d)), o.get("precision") or "tf32x3"]
            cells += [
                fmt(t[p]["floor_ms"], ".3f") + ("" if t[p]["bound"] == "memory" else " (c)") for p in PASSES
            ]
            fused = times_ms(
                o["floor"], d.get("ceilings") or {}, o.get("precision") or "tf32x3", ELEMENT_BUFFERS
            )
            cells += [
                fmt(t["step_ms"], ".3f"), fmt(fused["step_ms"], ".3f"), fmt(step_ms, ".2f"), fmt(_div(step_ms, t["step_ms"]), ".1f", "x"),
                fmt(_div(o.get("epoch_s"), nb / 1e3), ".2f"), fmt(None if pj is None else 1e3 * pj, ".2f"),
            ]  # fmt: skip
            rows.append(cells)
    return _table(head, rows) if rows else ""


def render(docs: list[dict]) -> str:
    """All tables (and the run headers) as markdown, in the order benchmarks/README.md shows them."""
    parts = [f"- {header(d)}" for d in docs]
    for d in docs:
        c = d.get("cli_vs_fit")
        if c and "ratio" in c:
            parts.append(
                f"- CLI against fit ({c['config']}, {c['epochs']} epochs): {fmt(c['cli_wall_per_epoch_s'])} s "
                f"against {fmt(c['fit_wall_per_epoch_s'])} s of wall clock per epoch, ratio {fmt(c['ratio'])}"
            )
        if d.get("skipped"):
            parts.append(f"- not run (over --budget-s): {', '.join(d['skipped'])}")
    parts += [main_table(docs), curve_table(docs), floor_table(docs)]
    return "\n\n".join(p for p in parts if p)
