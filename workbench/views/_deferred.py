"""Views that redraw only while their tab is on screen.

Panel takes hidden tabs out of layout (`display: none`, see `_common.collapsing_tabs`). A HoloViews
plot updated in place there comes back empty when the tab opens (Bokeh "could not set initial
ranges"; seen on the Schedule tab after a block-size change made on the Partitions tab), and every
hidden redraw costs the server time the user waits for. So a hidden view only notes what it owes
and does it when `shown` turns True (the app sets `shown` from the active tab).
"""

from __future__ import annotations

from typing import Callable

import param


class DeferWhileHidden(param.Parameterized):
    """Mixin: `self.when_shown(key, fn)` runs `fn` now if shown, else once when shown (latest per key)."""

    shown = param.Boolean(
        default=True, doc="Whether the view's tab is on screen; hidden, it redraws when opened"
    )

    def __init__(self, **params):
        super().__init__(**params)
        self._owed: dict[str, Callable[[], None]] = {}
        self.param.watch(lambda e: self._pay() if e.new else None, "shown")

    def when_shown(self, key: str, fn: Callable[[], None]) -> None:
        if self.shown:
            self._owed.pop(key, None)
            fn()
        else:
            self._owed[key] = fn

    def _pay(self) -> None:
        owed, self._owed = self._owed, {}
        for fn in owed.values():
            fn()
