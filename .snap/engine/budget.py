"""The memory budget for user files: estimate what a file will take once decoded, refuse before allocating.

A file's size says little about the memory it costs: a 1 KB `.npy` can declare a [2^20, 2^20]
array, a 1 MB `.npz` can inflate to 1 GiB, and widening uint8 to int64 multiplies that by 8. So every
reader first reads the declared shapes (a few bytes of header), estimates the peak of decoding,
converting and splitting, and raises before the first large allocation when that passes the budget.

The budget is `CW_MEMORY_BUDGET_MB` (default 1024 MiB), read when this module is imported; tests and
embedding code may set `budget.MEMORY_BUDGET_BYTES` directly (it is looked up at call time).
"""

from __future__ import annotations

import os

import numpy as np

MEMORY_BUDGET_BYTES = int(float(os.environ.get("CW_MEMORY_BUDGET_MB", "1024")) * 2**20)
INDEX_BYTES = 8  # discrete data ends as int64 category indices; float32 data takes less


def exceeds(estimate: int) -> bool:
    """True when `estimate` bytes would pass the memory budget."""
    return estimate > MEMORY_BUDGET_BYTES


def describe(estimate: int) -> str:
    """'needs about 9.4 GiB; the memory budget is 1.0 GiB (CW_MEMORY_BUDGET_MB)'."""
    return (
        f"needs about {_gib(estimate)} of memory; the memory budget is "
        f"{_gib(MEMORY_BUDGET_BYTES)} (set CW_MEMORY_BUDGET_MB to change it)"
    )


def array_peak(shape: tuple[int, ...], dtype: np.dtype, expand: int = 1, split: bool = False) -> int:
    """Peak bytes of turning a stored array into a dataset's tensors.

    Counts the array as read, an `expand`-times wider unpacked copy (bit-packed rows), a row-shuffled
    copy when one array is `split` into train/valid/test, an elementwise temporary (the whole-number
    and finiteness checks) and the int64 result.
    """
    n = 1
    for d in shape:
        n *= int(d)
    item = np.dtype(dtype).itemsize
    unpacked = n * expand
    raw = n * item + (unpacked if expand > 1 else 0)
    return raw + unpacked * (item * (2 if split else 1) + 1 + INDEX_BYTES)


def read_npy_header(fp) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of a `.npy` stream positioned at its start; reads only the header.

    Raises ValueError for a bad header (NumPy's own parser, with its header-size cap).
    """
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
    elif version in ((2, 0), (3, 0)):
        shape, _, dtype = np.lib.format.read_array_header_2_0(fp)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), dtype, fp.tell()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
