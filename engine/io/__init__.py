"""Circuit files: the native zip format (`save` / `load`) and PSDD import (`read_psdd`).

`load` looks at the content, not the extension: a zip archive is a native file, text whose first
non-comment token is `psdd` is a PSDD; anything else raises `FileFormatError`.
"""

from __future__ import annotations

import os

from engine.io import limits
from engine.io.format import load_native, save
from engine.io.limits import FileFormatError
from engine.io.psdd import first_keyword, read_psdd

__all__ = ["FileFormatError", "load", "read_psdd", "save"]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # local file header; empty archive
_PICKLE_PROTOCOL = b"\x80"


def load(path):
    """Read a circuit file: the root `NodeVector`, or a `CompiledCircuit` if one was saved.

    PSDD files are imported with `read_psdd` (without a vtree). Raises `FileFormatError`.
    """
    path = os.fspath(path)
    data = limits.read_capped(path)
    if data[:4] in _ZIP_MAGIC:
        return load_native(data, path)
    keyword = first_keyword(data)
    if keyword == "psdd":
        return read_psdd(path)
    if keyword == "vtree":
        raise FileFormatError(f"{path}: this is a vtree, load the .psdd file it belongs to")
    if not data:
        raise FileFormatError(f"{path}: file is empty")
    if data[:1] == _PICKLE_PROTOCOL:
        raise FileFormatError(f"{path}: looks like a Python pickle; pickles are never loaded (unsafe)")
    raise FileFormatError(
        f"{path}: unknown file format (expected a circuit-workbench zip archive or a PSDD text file)"
    )
