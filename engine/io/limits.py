"""Size limits for circuit files and the error raised for any file the engine will not read.

Every reader goes through `read_capped`, so a file is checked for existence and size before a byte
of it is parsed. Zip members are read in memory with their own cap (`read_member`), never extracted.
"""

from __future__ import annotations

import os
import zipfile
import zlib

MAX_FILE_BYTES = 512 * 2**20  # whole file on disk: 512 MiB
MAX_MEMBER_BYTES = 1024 * 2**20  # one decompressed zip member: 1 GiB (arrays compress well)
MAX_JSON_BYTES = 64 * 2**20  # circuit.json: 64 MiB (about a million vectors)
MAX_MEMBERS = 16  # entries in a native archive; the format writes 2


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
    try:
        info = zf.getinfo(name)
    except KeyError:
        raise FileFormatError(f"{path}: archive has no member {name!r}") from None
    if info.file_size > limit:
        raise FileFormatError(
            f"{path}: archive member {name!r} declares {info.file_size} bytes uncompressed "
            f"(the limit is {limit})"
        )
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise FileFormatError(f"{path}: archive member {name!r} is corrupt ({e})") from e
    if len(data) > limit:
        raise FileFormatError(f"{path}: archive member {name!r} is larger than the limit of {limit} bytes")
    return data
