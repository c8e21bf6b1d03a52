"""Refuse oversized uploads in the browser, before they are sent.

Bokeh's FileInput sends a file as one base64 websocket message; a message past the server's cap
(`--websocket-max-message-size`) silently drops the session and freezes the page. This component
watches every file input of the page (the `input` event crosses shadow roots; it fires before the
`change` that makes Bokeh read the file), and for a file over the limit stops that `change`, clears
the input and shows why. The server checks the same limit again (`services.uploads`).
"""

from __future__ import annotations

import param
from panel.custom import JSComponent

from workbench.services.uploads import MAX_UPLOAD_BYTES


class UploadGuard(JSComponent):
    """An alert that appears when a chosen file exceeds `max_bytes`; hidden otherwise."""

    max_bytes = param.Integer(default=MAX_UPLOAD_BYTES, bounds=(1, None), doc="Largest upload, bytes")

    _esm = """
export function render({ model }) {
  const note = document.createElement("div")
  note.className = "alert alert-danger cw-upload-refused"
  note.setAttribute("role", "alert")
  note.style.display = "none"
  if (window.__cwUploadGuard) window.removeEventListener("input", window.__cwUploadGuard, true)
  window.__cwUploadGuard = (event) => {
    const input = event.composedPath()[0]
    if (!(input instanceof HTMLInputElement) || input.type !== "file" || !input.files) return
    const big = Array.from(input.files).find((f) => f.size > model.max_bytes)
    if (big === undefined) { note.style.display = "none"; return }
    input.addEventListener("change", (e) => e.stopImmediatePropagation(), { capture: true, once: true })
    input.value = ""
    const mib = (n) => (n / 2 ** 20).toFixed(1)
    note.textContent = `Upload refused: ${big.name} is ${mib(big.size)} MiB; the limit is ` +
      `${mib(model.max_bytes)} MiB (CW_MAX_UPLOAD_MB on the server). The file was not sent.`
    note.style.display = "block"
  }
  window.addEventListener("input", window.__cwUploadGuard, true)
  return note
}
"""
