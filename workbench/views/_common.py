"""Small shared pieces of the views: the "learn" blurb, number formatting, status alerts."""

from __future__ import annotations

import html
import re

import panel as pn

KIND_COLORS = {"input": "#4c78a8", "product": "#f58518", "sum": "#54a24b", "recompute": "#e45756"}
PASS_COLORS = {"forward": "#72b7b2", "recompute": "#e45756", "backward": "#b279a2"}


# Panel hides inactive tabs with `visibility: hidden`: each still takes room (a Tabs is as tall as its
# tallest tab, which left a gap under the Build tab's short forms) and is styled and laid out again on
# every update of the page (most of the browser's time while a run streams). Take them out of layout.
COLLAPSE_HIDDEN_TABS = ':host > [aria-hidden="true"] { display: none; }'


def collapsing_tabs(*items, **params) -> pn.Tabs:
    """`pn.Tabs` whose hidden tabs take no room and no layout work (all rendered up front)."""
    return pn.Tabs(*items, dynamic=False, stylesheets=[COLLAPSE_HIDDEN_TABS], **params)


def learn(text: str) -> pn.pane.Markdown:
    """A short 'what this shows and why it matters' blurb shown at the top of a view."""
    return pn.pane.Markdown(text, css_classes=["cw-learn"], styles={"font-size": "0.95em"}, margin=(0, 10))


def status(message: str = "", kind: str = "info") -> pn.pane.Alert:
    """An alert pane (hidden while `message` is empty)."""
    return pn.pane.Alert(message, alert_type=kind, visible=bool(message), margin=(5, 10))


_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_{}\[\]()#+!|~])")


def safe_text(text) -> str:
    """User text (file names, file contents, error messages) made inert for a Markdown/HTML pane.

    HTML is escaped (a CSV cell `<img onerror=...>` must not run) and Markdown punctuation is
    backslash-escaped (no links, images or emphasis from user text). Use outside code spans.
    """
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", html.escape(str(text), quote=False))


def set_status(alert: pn.pane.Alert, message: str, kind: str = "info") -> None:
    alert.param.update(object=message, alert_type=kind, visible=bool(message))


def plural(n: float, word: str) -> str:
    """`word` in the number `n` asks for: plural(1, 'node') -> 'node', plural(2, 'node') -> 'nodes'."""
    return word if n == 1 else word + "s"


def plural_n(n: float, word: str) -> str:
    """'1 node', '3 nodes', '12,345 nodes'."""
    return f"{n:,} {plural(n, word)}"


# Bokeh tick labels with SI prefixes (k, M, G, T; never "m" for millions as Numeral.js's "a" does)
SI_TICKS_JS = """
const a = Math.abs(tick);
for (const [u, s] of [["T", 1e12], ["G", 1e9], ["M", 1e6], ["k", 1e3]]) {
  if (a >= s) { const v = tick / s; return (Math.abs(v) >= 100 ? v.toFixed(0) : +v.toPrecision(3)) + u; }
}
return a >= 1 || a === 0 ? String(+tick.toPrecision(3)) : tick.toPrecision(2);
"""


def si_ticks():
    """A Bokeh tick formatter writing 1500 as '1.5k' and 2e6 as '2M'."""
    from bokeh.models import CustomJSTickFormatter

    return CustomJSTickFormatter(code=SI_TICKS_JS)


def integer_ticks():
    """A Bokeh ticker for integer axes (epochs, partitions, layers): no 0.5 ticks."""
    from bokeh.models import BasicTicker

    return BasicTicker(min_interval=1, desired_num_ticks=8)


# Plots sit on long scrolling pages: the mouse wheel scrolls the page, it does not zoom the plot
# (zoom stays one click away in the toolbar).
NO_WHEEL = {"active_tools": ["pan"], "default_tools": ["pan", "wheel_zoom", "box_zoom", "reset", "save"]}


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M' (SI prefixes: k, M, G)."""
    n = float(n)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{_num(n / scale)}{unit}"
    return f"{n:.4g}"


def fmt_bytes(n: float) -> str:
    """Bytes with SI prefixes, as every view writes them: 1500 -> '1.5 kB', 2.5e9 -> '2.5 GB'."""
    n = float(n)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{_num(n / scale)} {unit}"
    return f"{n:.0f} B"


def byte_unit(peak: float) -> tuple[str, float]:
    """The unit a byte axis that reaches `peak` is labelled in, and its size: ('MB', 1e6) for 2.5e6,
    so ticks read 0.5, 1, 2.5 beside 'memory (MB)' rather than 500k, 2.5M beside '(bytes)'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(peak) >= scale:
            return unit, scale
    return "B", 1.0


def _num(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"
