"""Uploaded files: data (.npy/.npz/.csv) and circuits (native zip, .psdd, Juice's .jpc/.clt/.spn),
saved and validated.

Uploads arrive as bytes (a FileInput's value). They are size-checked before anything is written,
stored under a random name in the upload directory ($CW_UPLOAD_DIR, default <runs>/uploads) and
then read by the engine's own validating readers, which never unpickle.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from workbench.services.circuits import describe, error_message, load_circuit_file
from workbench.services.store import default_runs_dir

DATA_SUFFIXES = (".npy", ".npz", ".csv")
# .cw: the name README and the CLI use; .jpc/.clt/.spn: Juice's text formats (.jpc.gz gzipped)
CIRCUIT_SUFFIXES = (".cw", ".cwpc", ".zip", ".psdd", ".jpc", ".jpc.gz", ".clt", ".spn")
# Bokeh sends a FileInput's file as one base64 websocket message; its default cap (20 MiB) holds a
# 12 MiB file. scripts/start raises the cap to match CW_MAX_UPLOAD_MB, so larger limits work there.
MAX_UPLOAD_BYTES = int(float(os.environ.get("CW_MAX_UPLOAD_MB", "12")) * 2**20)


@dataclass
class UploadResult:
    """Outcome of an upload: `path` of the stored file and a summary, or a readable `error`."""

    path: str | None = None
    error: str | None = None
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.path is not None


def upload_dir() -> Path:
    d = Path(os.environ.get("CW_UPLOAD_DIR", default_runs_dir() / "uploads")).resolve()
    d.mkdir(parents=True, exist_ok=True)
    return d


def _save(filename: str, data: bytes, suffixes: tuple[str, ...], max_bytes: int | None) -> Path:
    limit = MAX_UPLOAD_BYTES if max_bytes is None else max_bytes
    name = Path(filename or "").name.lower()
    suffix = max((s for s in suffixes if name.endswith(s)), key=len, default="")  # .jpc.gz over .gz
    if not suffix:
        shown = "".join(Path(name).suffixes[-2:]) or "(none)"
        raise ValueError(f"unsupported file type {shown!r}; use {', '.join(suffixes)}")
    if data is None or len(data) == 0:
        raise ValueError("the uploaded file is empty")
    if len(data) > limit:
        raise ValueError(
            f"file is too large ({len(data) / 2**20:.1f} MiB; the limit is {limit / 2**20:.0f} MiB)"
        )
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(filename).name[: -len(suffix)])[:40] or "upload"
    path = upload_dir() / f"{stem}-{uuid.uuid4().hex[:8]}{suffix}"
    path.write_bytes(data)
    return path


def _as_uploaded(message: str, path: Path, filename: str) -> str:
    """An error of the engine's readers, which name the stored file, with the name the user uploaded."""
    shown = Path(filename).name or "the uploaded file"
    for stored in dict.fromkeys((str(path), str(path.resolve()), path.name)):  # longest first
        message = message.replace(stored, shown)
    return message


def save_data_upload(filename: str, data: bytes, max_bytes: int | None = None) -> UploadResult:
    """Store and validate an uploaded data file; the stored file is removed again if invalid."""
    try:
        path = _save(filename, data, DATA_SUFFIXES, max_bytes)
    except ValueError as err:
        return UploadResult(error=error_message(err))
    ds = None
    try:
        ds, err = load_data(str(path))
    finally:
        if ds is None:  # invalid, or an error nobody expected: keep nothing
            path.unlink(missing_ok=True)
    if ds is None:
        return UploadResult(error=_as_uploaded(err, path, filename))
    return UploadResult(path=str(path), summary=dataset_summary(ds))


def save_circuit_upload(filename: str, data: bytes, max_bytes: int | None = None) -> UploadResult:
    """Store and load an uploaded circuit file (engine.load); summary = services.circuits.describe."""
    try:
        path = _save(filename, data, CIRCUIT_SUFFIXES, max_bytes)
    except ValueError as err:
        return UploadResult(error=error_message(err))
    try:
        root = load_circuit_file(path)
    except Exception as err:  # noqa: BLE001 - any failure is a refusal with a message, and no leftover file
        path.unlink(missing_ok=True)
        return UploadResult(error=_as_uploaded(error_message(err), path, filename))
    return UploadResult(path=str(path), summary=describe(root))


def load_data(name_or_path: str):
    """(Dataset, None) or (None, readable error) via engine.data.load_dataset."""
    from engine.data import load_dataset

    try:
        return load_dataset(name_or_path), None
    except (ValueError, OSError, OverflowError, RecursionError) as err:
        return None, error_message(err)
    except MemoryError:
        return None, "not enough memory to load this data; see CW_MEMORY_BUDGET_MB"


def dataset_summary(ds) -> dict:
    """Plain description of an engine Dataset."""
    return {
        "name": ds.name,
        "kind": ds.kind,
        "num_vars": ds.num_vars,
        "num_cats": ds.num_cats,
        "num_train": int(ds.train.shape[0]),
        "num_valid": int(ds.valid.shape[0]),
        "num_test": int(ds.test.shape[0]),
    }
