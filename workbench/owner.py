"""Who a session is: an owner token kept in a browser cookie, so a user's runs stay theirs across
page loads, and other browsers see them only when shared (`RunStore.scoped`).

The server reads the `cw_owner` cookie of the page request; a browser without one gets a fresh random
token, which `OwnerCookie` stores (SameSite=Strict, one year) for its next page loads.
"""

from __future__ import annotations

import re
import secrets

import param
from panel.custom import JSComponent

COOKIE = "cw_owner"
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{32,64}$")


def new_token() -> str:
    """A fresh unguessable owner token (192 random bits)."""
    return secrets.token_urlsafe(24)


def session_owner(cookies: dict | None = None) -> str:
    """The owner token of this page request: its well-formed `cw_owner` cookie, else a new token."""
    if cookies is None:
        import panel as pn

        try:
            cookies = pn.state.cookies if pn.state.curdoc is not None else {}
        except Exception:  # noqa: BLE001 - no request (tests, notebooks): a session of its own
            cookies = {}
    token = (cookies or {}).get(COOKIE, "")
    return token if _TOKEN.match(token or "") else new_token()


class OwnerCookie(JSComponent):
    """Invisible: writes the session's owner token into the `cw_owner` cookie of this site."""

    token = param.String(default="", doc="The session's owner token")

    _esm = """
export function render({ model }) {
  if (/^[A-Za-z0-9_-]{32,64}$/.test(model.token))
    document.cookie = `cw_owner=${model.token}; path=/; max-age=31536000; SameSite=Strict`
  const el = document.createElement("span")
  el.style.display = "none"
  return el
}
"""
