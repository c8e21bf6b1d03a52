"""Datasets: the bundled benchmarks and user files, validated into train/valid/test tensors.

Every way in ends in `_make_dataset`, which checks the values once (finite, non-negative when
discrete, 2-D, non-empty) and decides the data kind, so the engine can trust what it is given.
User files are read without unpickling: `.npy`/`.npz` with `allow_pickle=False`, `.csv` as text.
Before a user file is decoded, its declared shapes are checked against the memory budget
(`engine.budget`), so a small file that declares a huge array is refused before anything is allocated.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from engine import budget

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
DEBD_DIR = ASSETS_DIR / "data" / "debd"
DEBD_NAMES = ("nltcs", "plants", "baudio", "jester", "bnetflix", "accidents", "pumsb_star", "dna", "bbc")
FILE_SUFFIXES = (".npy", ".npz", ".csv")
MAX_FILE_BYTES = 1 << 30  # 1 GiB: larger files are refused before reading
MAX_NUM_CATS = 1 << 16  # a larger category count is almost surely an ID column, not a variable
# Continuous data feeds float32 Gaussians, whose EM sums squares over up to ~2^31 rows: |x| <= 1e14
# keeps N * x^2 below float32's 3.4e38 (at |x| ~ 1.8e19 a single square overflows and training NaNs).
MAX_ABS_CONTINUOUS = 1e14
CSV_CELL_BYTES = 8 * 4  # peak bytes per CSV cell: float64 parse (grown by doubling), copies, int64
SPLIT_KEYS = ("train", "valid", "test")
_CHUNK = 1024  # mnist_like rows per chunk: ~25 MB of float32 scratch at 784 variables

Kind = Literal["binary", "categorical", "continuous"]


class DataError(ValueError):
    """Data that cannot be used as given; the message says what is wrong and where."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train/valid/test splits of one dataset.

    `train`, `valid`, `test`: [N, num_vars], int64 category indices for binary/categorical data,
    float32 for continuous data. `num_cats` is max value + 1 for discrete data (2 for binary) and
    None for continuous data.
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    num_vars: int
    num_cats: int | None
    kind: Kind


def available_datasets() -> list[str]:
    """Names `load_dataset` accepts besides file paths."""
    return [*DEBD_NAMES, "digits"]


def load_dataset(
    name_or_path: str | os.PathLike[str],
    valid_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Load a bundled dataset by name, or a `.npy`/`.npz`/`.csv` file by path.

    The fractions and `seed` split data that comes as one array (digits, single-array files);
    DEBD datasets and `.npz` files with train/valid/test keys keep their own splits.
    """
    _check_fractions(valid_fraction, test_fraction)
    if isinstance(name_or_path, str) and name_or_path.lower() in available_datasets():
        name = name_or_path.lower()
        if name == "digits":
            return _load_digits(valid_fraction, test_fraction, seed)
        return _load_debd(name)
    path = _resolve_file(name_or_path)
    arrays = _read_file(path)
    if isinstance(arrays, np.ndarray):
        arrays = _split(arrays, valid_fraction, test_fraction, seed)
    return _make_dataset(path.stem, arrays, source=str(path))


def mnist_like(num_samples: int, num_vars: int = 784, num_cats: int = 256, seed: int = 0) -> torch.Tensor:
    """Synthetic MNIST stand-in for benchmarks: [num_samples, num_vars] int64 in [0, num_cats).

    Each sample is one of ten fixed "digit" templates (Gaussian blobs on a near-square grid),
    jittered and shifted per sample, so pixels are correlated and mostly background (0) like
    MNIST. Deterministic in `seed`; generated in fixed-size chunks to bound memory.
    """
    if num_samples < 0 or num_vars < 1 or num_cats < 2:
        raise DataError(
            f"mnist_like needs num_samples >= 0, num_vars >= 1, num_cats >= 2; got "
            f"{num_samples}, {num_vars}, {num_cats}"
        )
    height = int(np.sqrt(num_vars))
    while num_vars % height:
        height -= 1
    width = num_vars // height
    rows, cols = np.divmod(np.arange(num_vars), width)
    grid = np.stack([rows, cols], axis=1).astype(np.float32)  # [V, 2] pixel coordinates
    rng = np.random.default_rng(seed)
    size = np.array([height, width], dtype=np.float32)
    templates = rng.uniform(0.25, 0.75, size=(10, 8, 2)).astype(np.float32) * size  # [10, K, 2]
    sigma = max(1.0, 0.06 * max(height, width))
    out = torch.empty(num_samples, num_vars, dtype=torch.int64)
    for start in range(0, num_samples, _CHUNK):
        n = min(_CHUNK, num_samples - start)
        labels = rng.integers(0, 10, size=n)
        jitter = rng.normal(0.0, 0.04, size=(n, 8, 2)) * size
        shift = rng.normal(0.0, 0.06, size=(n, 1, 2)) * size
        centres = (templates[labels] + jitter + shift).astype(np.float32)  # [n, K, 2]
        dist2 = ((grid[None, None] - centres[:, :, None]) ** 2).sum(-1)  # [n, K, V]
        ink = np.exp(-dist2 / (2 * sigma**2)).sum(1)  # [n, V]
        ink += rng.normal(0.0, 0.05, size=ink.shape)
        level = np.clip(1.5 * ink - 0.4, 0.0, 1.0)
        out[start : start + n] = torch.from_numpy(np.rint(level * (num_cats - 1)).astype(np.int64))
    return out


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    """Reject split fractions that would leave no training data."""
    if not (0 <= valid_fraction < 1 and 0 <= test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise DataError(
            f"valid_fraction and test_fraction must be in [0, 1) and sum to less than 1; got "
            f"{valid_fraction} and {test_fraction}"
        )


def _load_debd(name: str) -> Dataset:
    """A DEBD benchmark with its standard splits (bit-packed in the bundled `.npz`)."""
    path = DEBD_DIR / f"{name}.npz"
    if not path.is_file():
        raise DataError(f"bundled dataset file {path} is missing; reinstall from a full checkout")
    arrays = _read_npz(path)
    if isinstance(arrays, np.ndarray):
        raise DataError(f"{path}: expected train/valid/test arrays")
    return _make_dataset(name, arrays, source=str(path))


def _load_digits(valid_fraction: float, test_fraction: float, seed: int) -> Dataset:
    """scikit-learn's 8x8 digits (bundled with scikit-learn): 64 variables, 17 levels 0..16."""
    from sklearn.datasets import load_digits

    data = load_digits().data.astype(np.int64)
    splits = _split(data, valid_fraction, test_fraction, seed)
    dataset = _make_dataset("digits", splits, source="sklearn.datasets.load_digits")
    return replace(dataset, num_cats=17)  # every split uses the full 0..16 range


def _resolve_file(name_or_path: str | os.PathLike[str]) -> Path:
    """Path of an existing, supported, not-too-large data file, or a DataError saying why not."""
    path = Path(name_or_path)
    looks_like_path = path.suffix != "" or len(path.parts) > 1 or path.exists()
    if not looks_like_path:
        raise DataError(
            f"unknown dataset {str(name_or_path)!r}; known datasets: "
            f"{', '.join(available_datasets())}; or give a path to a {'/'.join(FILE_SUFFIXES)} file"
        )
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"not a regular file: {path}")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DataError(
            f"unknown file extension {path.suffix!r} for {path}; supported: {', '.join(FILE_SUFFIXES)}"
        )
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise DataError(f"{path} is {size / 2**30:.2f} GiB; the limit is {MAX_FILE_BYTES / 2**30:.2f} GiB")
    return path


def _read_file(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """One array to be split, or a dict of the three splits."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz(path)
    if suffix == ".csv":
        return _read_csv(path)
    _check_magic(path, b"\x93NUMPY", ".npy")
    try:
        _check_npy_header(path)
        return np.load(path, allow_pickle=False)
    except DataError:
        raise
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataError(
                f"{path} holds Python objects (pickle), which are never loaded; save a numeric array instead"
            ) from err
        raise DataError(f"{path} is not a valid .npy file: {err}") from err
    except OSError as err:
        raise DataError(f"{path} is not a valid .npy file: {err}") from err


def _read_npz(path: Path) -> np.ndarray | dict[str, np.ndarray]:
    """DEBD-style `.npz`: train/valid/test (bit-packed along axis 1 when num_vars is given), or one array."""
    _check_magic(path, b"PK\x03\x04", ".npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            _check_unpacked_size(path, z.zip.infolist())
            _check_npz_headers(path, z.zip)
            arrays = {key: z[key] for key in z.files}
    except DataError:
        raise
    except (ValueError, zipfile.BadZipFile) as err:
        if "allow_pickle" in str(err):
            raise DataError(f"{path} holds Python objects (pickle), which are never loaded") from err
        raise DataError(f"{path} is not a valid .npz file: {err}") from err
    except (OSError, EOFError) as err:
        raise DataError(f"{path} is not a valid .npz file: {err}") from err
    num_vars = arrays.pop("num_vars", None)
    if set(SPLIT_KEYS) <= arrays.keys():
        splits = {key: arrays[key] for key in SPLIT_KEYS}
        return splits if num_vars is None else _unpack_splits(path, splits, num_vars)
    if len(arrays) == 1 and not arrays.keys() & set(SPLIT_KEYS):
        (array,) = arrays.values()
        return array if num_vars is None else _unpack_splits(path, {"data": array}, num_vars)["data"]
    raise DataError(
        f"{path} has arrays {sorted(arrays)}; expected 'train', 'valid' and 'test' "
        f"(optionally 'num_vars'), or exactly one array to split"
    )


def _check_unpacked_size(path: Path, members: list[zipfile.ZipInfo]) -> None:
    """Refuse an archive that would decompress past MAX_FILE_BYTES (a small file can hide a huge array)."""
    size = sum(member.file_size for member in members)
    if size > MAX_FILE_BYTES:
        raise DataError(
            f"{path} decompresses to {size / 2**30:.2f} GiB; the limit is {MAX_FILE_BYTES / 2**30:.2f} GiB"
        )


def _check_npy_header(path: Path) -> None:
    """Refuse a `.npy` whose declared array is pickled, larger than its file, or over the memory budget."""
    with open(path, "rb") as f:
        shape, dtype, offset = budget.read_npy_header(f)
    _check_declared(path, "", shape, dtype, path.stat().st_size - offset, split=True)


def _check_npz_headers(path: Path, zf: zipfile.ZipFile) -> None:
    """Read only the header of every member and refuse before NumPy allocates the declared arrays."""
    infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
    packed = any(i.filename == "num_vars.npy" for i in infos)
    split = len(infos) - packed == 1
    total = 0
    for info in infos:
        with zf.open(info) as f:
            shape, dtype, offset = budget.read_npy_header(f)
        expand = 8 if packed and dtype == np.uint8 else 1
        member = f" member {info.filename[:-4]!r}"
        total += _check_declared(path, member, shape, dtype, info.file_size - offset, expand, split)
    if budget.exceeds(total):
        raise DataError(f"{path}: its arrays {budget.describe(total)}")


def _check_declared(
    path: Path,
    where: str,
    shape: tuple,
    dtype: np.dtype,
    data_bytes: int,
    expand: int = 1,
    split: bool = False,
) -> int:
    """The estimated peak of one declared array, after checking it against the bytes stored and the budget."""
    if dtype.hasobject:
        raise DataError(f"{path}{where} holds Python objects (pickle), which are never loaded")
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if declared > data_bytes:
        raise DataError(
            f"{path}{where} is truncated or corrupt: its header declares shape {shape} ({declared} bytes) "
            f"but only {max(data_bytes, 0)} bytes of data follow"
        )
    peak = budget.array_peak(shape, dtype, expand, split)
    if budget.exceeds(peak):
        raise DataError(f"{path}{where}: an array of shape {shape} and dtype {dtype} {budget.describe(peak)}")
    return peak


def _check_magic(path: Path, magic: bytes, suffix: str) -> None:
    """Refuse a file whose first bytes are not `magic`, before NumPy guesses that it is a pickle."""
    with open(path, "rb") as f:
        if f.read(len(magic)) != magic:
            raise DataError(f"{path} is not a valid {suffix} file: it does not start with {magic!r}")


def _unpack_splits(path: Path, splits: dict[str, np.ndarray], num_vars: np.ndarray) -> dict[str, np.ndarray]:
    """Unpack bit-packed uint8 rows to [N, num_vars] 0/1; arrays already num_vars wide pass through."""
    if num_vars.shape != () or not np.issubdtype(num_vars.dtype, np.integer) or int(num_vars) < 1:
        raise DataError(f"{path}: 'num_vars' must be a positive integer scalar")
    d = int(num_vars)
    out = {}
    for key, array in splits.items():
        if array.ndim == 2 and array.shape[1] == d:
            out[key] = array
        elif array.ndim == 2 and array.dtype == np.uint8 and array.shape[1] == (d + 7) // 8:
            out[key] = np.unpackbits(array, axis=1, count=d)
        else:
            raise DataError(
                f"{path}: '{key}' has shape {array.shape} and dtype {array.dtype}; with "
                f"num_vars={d} expected [N, {d}] or bit-packed uint8 [N, {(d + 7) // 8}]"
            )
    return out


def _read_csv(path: Path) -> np.ndarray:
    """Numeric comma-separated values; a first line that is not numeric is taken as a header."""
    _check_csv_cells(path)
    with open(path, encoding="utf-8-sig", errors="replace") as f:  # -sig: a leading BOM is not data
        first = f.readline()
    if not first.strip():
        raise DataError(f"{path} is empty")
    try:
        [float(cell) for cell in first.split(",")]
        skip = 0
    except ValueError:
        skip = 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": checked later
            return np.loadtxt(
                path, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float64, encoding="utf-8-sig"
            )
    except ValueError as err:
        raise DataError(f"{path}: every cell must be a number (no missing values): {err}") from err


def _check_csv_cells(path: Path) -> None:
    """Count cells (separators) in 1 MiB chunks and refuse a CSV whose parse would pass the memory budget."""
    cells = 0
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            cells += chunk.count(b",") + chunk.count(b"\n")
    peak = (cells + 1) * CSV_CELL_BYTES
    if budget.exceeds(peak):
        raise DataError(f"{path}: about {cells:,} cells {budget.describe(peak)}")


def _split(data: np.ndarray, valid_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Shuffle rows with `seed` and cut them into train/valid/test by the given fractions."""
    if data.ndim != 2:
        raise DataError(f"data must be 2-D [num_examples, num_vars]; got shape {data.shape}")
    n = data.shape[0]
    order = np.random.default_rng(seed).permutation(n)
    n_valid, n_test = round(n * valid_fraction), round(n * test_fraction)
    n_train = n - n_valid - n_test
    return {
        "train": data[order[:n_train]],
        "valid": data[order[n_train : n_train + n_valid]],
        "test": data[order[n_train + n_valid :]],
    }


def _make_dataset(name: str, splits: dict[str, np.ndarray], source: str) -> Dataset:
    """Validate all splits together, decide the kind, and convert to tensors."""
    for key in SPLIT_KEYS:
        _check_array(splits[key], f"{source} [{key}]")
    widths = {splits[key].shape[1] for key in SPLIT_KEYS}
    if len(widths) != 1:
        shapes = ", ".join(f"{key} {splits[key].shape}" for key in SPLIT_KEYS)
        raise DataError(f"{source}: splits disagree on the number of variables: {shapes}")
    if splits["train"].shape[0] == 0:
        raise DataError(f"{source}: no training examples")
    (num_vars,) = widths
    if all(_is_integral(splits[key]) for key in SPLIT_KEYS) and not _too_many_levels(splits):
        return _discrete_dataset(name, splits, num_vars, source)
    tensors = [torch.from_numpy(np.ascontiguousarray(splits[key], dtype=np.float32)) for key in SPLIT_KEYS]
    for key, t in zip(SPLIT_KEYS, tensors):
        _check_continuous_range(t, f"{source} [{key}]")
    return Dataset(name, *tensors, num_vars=num_vars, num_cats=None, kind="continuous")


def _too_many_levels(splits: dict[str, np.ndarray]) -> bool:
    """Whole numbers stored as floats past MAX_NUM_CATS are measurements (continuous), not categories.

    Integer-typed arrays keep the category-count error: there a huge value is most likely an ID column.
    """
    floats = [splits[key] for key in SPLIT_KEYS if splits[key].size and splits[key].dtype.kind == "f"]
    return bool(floats) and max(float(np.abs(a).max()) for a in floats) >= MAX_NUM_CATS


def _check_continuous_range(t: torch.Tensor, where: str) -> None:
    """Refuse values a float32 Gaussian cannot fit (their squares overflow, and training turns to NaN)."""
    if not t.numel():
        return
    if not torch.isfinite(t).all():
        raise DataError(f"{where}: values overflow float32 (largest is about 3.4e38)")
    top = float(t.abs().max())
    if top > MAX_ABS_CONTINUOUS:
        raise DataError(
            f"{where}: continuous values must lie within +-{MAX_ABS_CONTINUOUS:.0e} (float32 Gaussians "
            f"square them); found {top:.3g}: rescale the data"
        )


def _discrete_dataset(name: str, splits: dict[str, np.ndarray], num_vars: int, source: str) -> Dataset:
    """Integer-valued data: category indices 0..num_cats-1, stored as int64."""
    for key in SPLIT_KEYS:
        array = splits[key]
        if array.size and array.min() < 0:
            row, col = np.unravel_index(np.argmin(array), array.shape)
            raise DataError(
                f"{source} [{key}]: discrete (integer-valued) data must be non-negative category "
                f"indices; found {array[row, col]} at row {row}, column {col}"
            )
    top = max(int(splits[key].max()) for key in SPLIT_KEYS if splits[key].size)
    if top + 1 > MAX_NUM_CATS:
        raise DataError(
            f"{source}: largest value {top} means {top + 1} categories; the limit is {MAX_NUM_CATS}"
        )
    kind: Kind = "binary" if top <= 1 else "categorical"
    tensors = [torch.from_numpy(splits[key].astype(np.int64)) for key in SPLIT_KEYS]
    return Dataset(name, *tensors, num_vars=num_vars, num_cats=max(top + 1, 2), kind=kind)


def _check_array(array: np.ndarray, where: str) -> None:
    """Shape and value checks shared by all sources: numeric, 2-D, non-empty, finite."""
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where}: values must be numbers (bool, int or float); got dtype {array.dtype}")
    if array.ndim != 2:
        raise DataError(f"{where}: data must be 2-D [num_examples, num_vars]; got shape {array.shape}")
    if array.shape[1] == 0 or (array.shape[0] == 0 and where.endswith("[train]")):
        raise DataError(f"{where}: empty data (shape {array.shape})")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0]
        raise DataError(f"{where}: NaN or infinite value at row {bad[0]}, column {bad[1]}")


def _is_integral(array: np.ndarray) -> bool:
    """True when every value is a whole number (any dtype)."""
    return array.dtype.kind in "biu" or bool((array == np.floor(array)).all())
