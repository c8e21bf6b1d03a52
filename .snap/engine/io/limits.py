"""Size limits for circuit files and the error raised for any file the engine will not read.

Every reader goes through `read_capped`, so a file is checked for existence and size before a byte
of it is parsed. Zip members are read in memory with their own cap (`read_member`), never extracted.
The caps shrink with the memory budget (`engine.budget`): decoding copies a member a few times.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib

from engine import budget

MAX_FILE_BYTES = 512 * 2**20  # whole file on disk: 512 MiB
MAX_MEMBER_BYTES = 1024 * 2**20  # one decompressed zip member: 1 GiB (arrays compress well)
MAX_JSON_BYTES = 64 * 2**20  # circuit.json: 64 MiB (about a million vectors)
MAX_MEMBERS = 16  # entries in a native archive; the format writes 2
ARRAY_COPIES = 4  # arrays member: raw bytes, safetensors' arrays, checked copies, normalised params
JSON_OBJECT_FACTOR = 16  # parsed JSON takes up to ~16x its text as Python objects
PSDD_BYTES_PER_BYTE = 128  # measured: a 410 KB PSDD builds ~50 MB of node vectors


def arrays_limit() -> int:
    """Bytes the arrays member may declare: the smaller of MAX_MEMBER_BYTES and the budget's share."""
    return min(MAX_MEMBER_BYTES, budget.MEMORY_BUDGET_BYTES // ARRAY_COPIES)


def json_limit() -> int:
    return min(MAX_JSON_BYTES, budget.MEMORY_BUDGET_BYTES // JSON_OBJECT_FACTOR)


def text_limit() -> int:
    """Bytes of circuit text (PSDD, JPC, CLT, SPN; after gunzip) the memory budget can build:
    about PSDD_BYTES_PER_BYTE bytes of node vectors per byte of text (8 MiB at the 1 GiB default)."""
    return min(MAX_FILE_BYTES, budget.MEMORY_BUDGET_BYTES // PSDD_BYTES_PER_BYTE)


def check_text(nbytes: int, path: str) -> None:
    """Refuse circuit text the memory budget cannot build, before parsing it."""
    if nbytes > text_limit():
        raise FileFormatError(f"{path}: this circuit text {budget.describe(nbytes * PSDD_BYTES_PER_BYTE)}")


class FileFormatError(ValueError):
    """A circuit file that is missing, too large, corrupt or not in a supported format.

    The message names the problem and the path.
    """


def read_capped(path, limit: int | None = None) -> bytes:
    """The bytes of `path`, after checking it exists and holds at most `limit` bytes (default
    `MAX_FILE_BYTES`, looked up at call time so tests can lower it)."""
    limit = MAX_FILE_BYTES if limit is None else limit
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileFormatError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise FileFormatError(f"{path}: not a regular file")
    size = os.path.getsize(path)
    if size > limit:
        raise FileFormatError(f"{path}: file is too large ({size} bytes; the limit is {limit} bytes)")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while we looked
        raise FileFormatError(f"{path}: file is too large (over the limit of {limit} bytes)")
    return data


def read_member(zf: zipfile.ZipFile, name: str, limit: int, path: str) -> bytes:
    """Decompress one archive member into memory, refusing more than `limit` bytes.

    The declared size is checked first; the read itself is capped too, since a header can lie.
    """
    info = _member_info(zf, name, limit, path)
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise FileFormatError(f"{path}: archive member {name!r} is corrupt ({e})") from e
    if len(data) > limit:
        raise FileFormatError(f"{path}: archive member {name!r} is larger than the limit of {limit} bytes")
    return data


def read_safetensors_member(zf: zipfile.ZipFile, name: str, limit: int, path: str) -> bytes:
    """Like `read_member`, but the safetensors header is read first and its declared total is capped,
    so a member whose zip header lies is refused after reading only its few header bytes."""
    info = _member_info(zf, name, limit, path)
    try:
        with zf.open(info) as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 <= n <= min(limit, 100 * 2**20):
                raise FileFormatError(f"{path}: {name} has a corrupt header length")
            header = f.read(n)
            total = 8 + n + _safetensors_data_size(header, name, path)
            if total > limit:
                raise FileFormatError(
                    f"{path}: {name} declares {total} bytes of arrays; the limit is {limit} bytes "
                    f"({budget.describe(total * ARRAY_COPIES)})"
                )
            rest = f.read(total - 8 - n + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        if isinstance(e, FileFormatError):
            raise
        raise FileFormatError(f"{path}: archive member {name!r} is corrupt ({e})") from e
    if 8 + n + len(rest) != total:
        raise FileFormatError(f"{path}: {name} holds {8 + n + len(rest)} bytes but declares {total}")
    return head + header + rest


def _member_info(zf: zipfile.ZipFile, name: str, limit: int, path: str) -> zipfile.ZipInfo:
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise FileFormatError(f"{path}: archive has no member {name!r}") from None
    if info.file_size > limit:
        raise FileFormatError(
            f"{path}: archive member {name!r} declares {info.file_size} bytes uncompressed "
            f"(the limit is {limit})"
        )
    return info


def _safetensors_data_size(header: bytes, name: str, path: str) -> int:
    """Largest end offset in a safetensors JSON header: the bytes of array data that follow it."""
    try:
        entries = json.loads(header.decode("utf-8"))
        ends = [int(e["data_offsets"][1]) for k, e in entries.items() if k != "__metadata__"]
    except (
        UnicodeDecodeError,
        json.JSONDecodeError,
        RecursionError,
        AttributeError,
        KeyError,
        IndexError,
        TypeError,
        ValueError,
    ) as e:
        raise FileFormatError(f"{path}: {name} has a corrupt header ({type(e).__name__})") from e
    return max(ends, default=0)
