"""Circuit files: the native zip format (`save` / `load`), PSDD, and Juice's `.jpc` / `.clt` / `.spn`.

`load` looks at the content, not the extension: a zip archive is a native file; text whose first
non-comment token is `psdd` is a PSDD and `jpc` a Juice circuit; two lines holding one integer each
start a Chow-Liu tree (`.clt`); a line starting with `(` starts an SPN. Gzip-compressed text (Juice
ships `.jpc.gz`) is decompressed first, under the same size cap. Pickles are never loaded: PyJuice's
own `.jpc` is one, and is refused with the command that converts it. Anything else raises
`FileFormatError`.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib

from engine.io import limits
from engine.io.clt import looks_like_clt, read_clt
from engine.io.format import load_native, save
from engine.io.jpc import read_jpc, write_jpc
from engine.io.limits import FileFormatError
from engine.io.psdd import first_keyword, read_psdd
from engine.io.spn import looks_like_spn, read_spn

__all__ = [
    "FileFormatError",
    "load",
    "read_clt",
    "read_jpc",
    "read_psdd",
    "read_spn",
    "save",
    "write_jpc",
    "write_psdd",
]

_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # local file header; empty archive
_GZIP_MAGIC = b"\x1f\x8b"
_PICKLE_PROTOCOL = b"\x80"
PYJUICE_HINT = (
    "PyJuice saves .jpc files as Python pickles, which are never loaded (unsafe); convert it inside "
    "a PyJuice environment with `python scripts/pyjuice_to_jpc.py {path} out.jpc` and load out.jpc"
)


def __getattr__(name):
    if name == "write_psdd":  # lazy: the exporter is only needed when writing
        from engine.io.psdd_export import write_psdd

        return write_psdd
    raise AttributeError(f"module 'engine.io' has no attribute {name!r}")


def load(path, max_depth: int | None = None):
    """Read a circuit file: the root `NodeVector`, or a `CompiledCircuit` if one was saved.

    PSDD files are imported with `read_psdd` (without a vtree). `max_depth` refuses JPC/SPN text
    deeper than that many nodes while it is read (a server's guard against deep-chain files).
    Raises `FileFormatError` (or `CircuitError` for a circuit that is not valid or too deep).
    """
    path = os.fspath(path)
    data = limits.read_capped(path)
    if data[:4] in _ZIP_MAGIC:
        if _is_torch_pickle_zip(data):
            raise FileFormatError(
                f"{path}: a zip of pickles (torch.save / PyJuice); " + PYJUICE_HINT.format(path=path)
            )
        return load_native(data, path)
    gzipped = data[:2] == _GZIP_MAGIC
    if gzipped:
        data = _gunzip(data, path)
    if not data:
        raise FileFormatError(f"{path}: file is empty")
    limits.check_text(len(data), path)
    if data[:1] == _PICKLE_PROTOCOL:
        raise FileFormatError(f"{path}: looks like a Python pickle. " + PYJUICE_HINT.format(path=path))
    keyword = first_keyword(data)
    if keyword == "psdd":
        if gzipped:
            raise FileFormatError(f"{path}: a gzip-compressed PSDD; decompress it first (gunzip)")
        return read_psdd(path)
    if keyword == "jpc":
        return read_jpc(path, data, max_depth)
    if keyword == "vtree":
        raise FileFormatError(f"{path}: this is a vtree, load the .psdd file it belongs to")
    if looks_like_clt(data):
        return read_clt(path, data)
    if looks_like_spn(data):
        return read_spn(path, data, max_depth)
    raise FileFormatError(
        f"{path}: unknown file format (expected a circuit-workbench zip archive, or PSDD, JPC, CLT or SPN text)"
    )


def _is_torch_pickle_zip(data: bytes) -> bool:
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.endswith("data.pkl") for n in names) and "circuit.json" not in names


def _gunzip(data: bytes, path: str) -> bytes:
    """Decompress gzip bytes, refusing more than `limits.text_limit()` of output (a gzip bomb stops
    at the budget's share, not at 512 MiB held in memory)."""
    limit = limits.text_limit()
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise FileFormatError(f"{path}: corrupt gzip data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise FileFormatError(f"{path}: decompresses to more than the limit of {limit} bytes")
    return out
