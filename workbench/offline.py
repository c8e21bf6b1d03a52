"""Every stylesheet from the workbench's own server, never a CDN, from the first model on.

Panel patches a page's stylesheet URLs to the server's `static/` folder only when it renders the
page, after the app's models exist; until then (and for any model it does not reach at that moment)
they point at cdn.holoviz.org. Setting the document's `dist_url` before the app builds anything
makes every model local from the start. Bokeh's own JS/CSS come from the server already
(`panel serve` uses resources mode "server").
"""

from __future__ import annotations


def pin_local_resources(doc=None) -> None:
    """Make `doc` (default: the session's document) resolve Panel's CSS to this server."""
    from panel.io.resources import LOCAL_DIST
    from panel.io.state import state

    doc = doc if doc is not None else state.curdoc
    if doc is None:
        return
    doc._template_variables["dist_url"] = f"{state.rel_path}/{LOCAL_DIST}" if state.rel_path else LOCAL_DIST
