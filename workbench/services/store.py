"""The run store: one directory per training run, kept after the browser closes.

    $CW_RUNS_DIR (default ./runs)/
        <run_id>/spec.json       the job spec (JSON)
        <run_id>/status.json     {"status": "queued"|"running"|"paused"|"done"|"stopped"|"failed"|
                                  "interrupted", "message": str, "created": unix s, "updated": unix s,
                                  "server_pid": int, "pid": worker pid, ...}
        <run_id>/metrics.jsonl   one streamed event per line (epoch, batch, layer_times, memory, ...)
        <run_id>/model.cwpc      the trained circuit (engine.save), written by the worker
        <run_id>/plan.json       the compiled plan summary (plan.to_dict), written by the worker
        <run_id>/access.json     {"owner": sha256 of the owner's token, "shared": bool} (not archived)

Writes are append-only (metrics) or atomic renames (status, spec), so a crash leaves readable files.
A run whose server died before it finished is marked "interrupted" by `recover()` at the next start.

Runs belong to whoever made them: `scoped(token)` is the store as one owner sees it (their runs, runs
marked shared, and runs without an owner, such as the CLI's); reading anything else raises
`PermissionError`. Only a hash of the token is stored, so sharing a run never reveals it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

TERMINAL = ("done", "stopped", "failed", "interrupted")
MODEL_FILE = "model.cwpc"
ACCESS_FILE = "access.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def default_runs_dir() -> Path:
    return Path(os.environ.get("CW_RUNS_DIR", "runs")).resolve()


@dataclass
class RunRecord:
    """One stored run, for listings."""

    run_id: str
    name: str
    status: str
    message: str
    created: float
    updated: float
    has_model: bool
    spec: dict


class RunStore:
    """File-backed run store; safe to share between sessions (one lock per store)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).resolve() if root is not None else default_runs_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- paths
    def path(self, run_id: str) -> Path:
        """Directory of `run_id` (validated: no path tricks)."""
        if not _RUN_ID.match(run_id or ""):
            raise ValueError(f"invalid run id {run_id!r}")
        return self.root / run_id

    def model_path(self, run_id: str) -> Path:
        return self.path(run_id) / MODEL_FILE

    # ----------------------------------------------------------------- writing
    def create(self, spec: dict, name: str | None = None, owner: str | None = None) -> str:
        """New run directory holding `spec`, owned by the holder of token `owner` (None: no owner,
        readable by all); returns its run id (time-sortable)."""
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        d = self.path(run_id)
        d.mkdir(parents=True)
        if owner is not None:
            _write_json(d / ACCESS_FILE, {"owner": owner_hash(owner), "shared": False})
        _write_json(d / "spec.json", shareable_spec({**spec, "name": name or spec.get("name") or run_id}))
        (d / "metrics.jsonl").touch()
        now = time.time()
        status = {
            "status": "queued",
            "message": "",
            "created": now,
            "updated": now,
            "server_pid": os.getpid(),
        }
        _write_json(d / "status.json", status)
        return run_id

    def recover(self) -> list[str]:
        """Mark unfinished runs whose server process is gone as "interrupted"; returns their ids.

        Their metrics and last checkpoint (model.cwpc) are kept; a worker still alive (its server was
        killed before it noticed) is sent SIGTERM, which makes it save and exit. Runs of a live
        server (another process sharing the folder) are left alone.
        """
        out = []
        for run in self.list_runs():
            st = self.status(run.run_id)
            if run.status in TERMINAL or _pid_alive(st.get("server_pid")):
                continue
            worker = st.get("pid")
            if _pid_alive(worker) and _is_worker(worker):
                os.kill(worker, signal.SIGTERM)
            kept = "; the last checkpoint is kept" if run.has_model else ""
            message = f"the server stopped while this run was {run.status}; its metrics so far are kept{kept}"
            self.set_status(run.run_id, "interrupted", message)
            out.append(run.run_id)
        return out

    def set_status(self, run_id: str, status: str, message: str = "", **extra) -> None:
        """Update status.json atomically (keeps `created` and earlier extra keys)."""
        with self._lock:
            cur = self.status(run_id)
            cur.update(extra, status=status, message=without_paths(message), updated=time.time())
            _write_json(self.path(run_id) / "status.json", cur)

    def append_events(self, run_id: str, events: list[dict]) -> None:
        """Append events to metrics.jsonl (one JSON object per line)."""
        if not events:
            return
        lines = "".join(json.dumps(_finite(e), default=_jsonable, allow_nan=False) + "\n" for e in events)
        with self._lock, open(self.path(run_id) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(lines)

    def write_json(self, run_id: str, name: str, obj: dict) -> None:
        """Any extra JSON file of the run (e.g. plan.json)."""
        _write_json(self.path(run_id) / name, obj)

    def set_shared(self, run_id: str, shared: bool, owner: str) -> None:
        """Let every session read run `run_id` (or only its owner again); only the owner may."""
        access = self.access(run_id)
        if access.get("owner") != owner_hash(owner):
            raise PermissionError(f"run {run_id} is not yours to share")
        _write_json(self.path(run_id) / ACCESS_FILE, {**access, "shared": bool(shared)})

    def access(self, run_id: str) -> dict:
        """{"owner": token hash, "shared": bool}, or {} for a run without an owner."""
        return _read_json(self.path(run_id) / ACCESS_FILE, {})

    def readable(self, run_id: str, viewer: str | None) -> bool:
        """True when the holder of token `viewer` may see the run (None: the server itself)."""
        access = self.access(run_id)
        return (
            viewer is None
            or not access
            or access.get("shared") is True
            or access.get("owner") == owner_hash(viewer)
        )

    def scoped(self, viewer: str) -> "ScopedRunStore":
        """This store as the holder of token `viewer` sees it."""
        return ScopedRunStore(self, viewer)

    def delete(self, run_id: str) -> None:
        shutil.rmtree(self.path(run_id), ignore_errors=True)

    # ----------------------------------------------------------------- reading
    def spec(self, run_id: str) -> dict:
        return _read_json(self.path(run_id) / "spec.json", {})

    def status(self, run_id: str) -> dict:
        return _read_json(self.path(run_id) / "status.json", {"status": "unknown", "message": ""})

    def events(self, run_id: str, types: tuple[str, ...] | None = None) -> list[dict]:
        """All stored events, optionally only those whose "type" is in `types` (skips torn lines)."""
        out = []
        p = self.path(run_id) / "metrics.jsonl"
        if not p.exists():
            return out
        with open(p, encoding="utf-8") as f:
            for line in f:
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if types is None or e.get("type") in types:
                    out.append(e)
        return out

    def list_runs(self) -> list[RunRecord]:
        """All runs, newest first."""
        out = []
        for d in sorted(self.root.iterdir(), reverse=True):
            if not d.is_dir() or not _RUN_ID.match(d.name) or not (d / "spec.json").exists():
                continue
            st, spec = RunStore.status(self, d.name), RunStore.spec(self, d.name)  # unchecked: filtered later
            out.append(
                RunRecord(
                    d.name,
                    spec.get("name", d.name),
                    st.get("status", "unknown"),
                    st.get("message", ""),
                    st.get("created", 0.0),
                    st.get("updated", 0.0),
                    (d / MODEL_FILE).exists(),
                    spec,
                )
            )
        return out

    def archive(self, run_id: str) -> bytes:
        """The run directory as zip bytes, for download."""
        d = self.path(run_id)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for p in sorted(d.iterdir()):
                if p.is_file() and p.name != ACCESS_FILE:
                    zf.write(p, f"{run_id}/{p.name}")
        return buf.getvalue()


class ScopedRunStore(RunStore):
    """The run store as one owner sees it: listings hold only runs they may read, and reading any
    other run raises PermissionError. Shares the root and lock of the server's store."""

    def __init__(self, store: RunStore, viewer: str):
        self.root, self._lock, self.viewer = store.root, store._lock, viewer

    def _check(self, run_id: str) -> None:
        if not self.readable(run_id, self.viewer):
            raise PermissionError(f"run {run_id} belongs to another session and is not shared")

    def create(self, spec: dict, name: str | None = None, owner: str | None = None) -> str:
        return super().create(spec, name, self.viewer if owner is None else owner)

    def list_runs(self) -> list[RunRecord]:
        return [r for r in super().list_runs() if self.readable(r.run_id, self.viewer)]

    def spec(self, run_id: str) -> dict:
        self._check(run_id)
        return super().spec(run_id)

    def status(self, run_id: str) -> dict:
        self._check(run_id)
        return super().status(run_id)

    def events(self, run_id: str, types: tuple[str, ...] | None = None) -> list[dict]:
        self._check(run_id)
        return super().events(run_id, types)

    def model_path(self, run_id: str) -> Path:
        self._check(run_id)
        return super().model_path(run_id)

    def archive(self, run_id: str) -> bytes:
        self._check(run_id)
        return super().archive(run_id)

    def set_shared(self, run_id: str, shared: bool, owner: str | None = None) -> None:
        super().set_shared(run_id, shared, self.viewer if owner is None else owner)

    def delete(self, run_id: str) -> None:
        if self.access(run_id).get("owner") != owner_hash(self.viewer):
            raise PermissionError(f"run {run_id} is not yours to delete")
        super().delete(run_id)


def _code_roots() -> list[str]:
    """Folders whose paths tracebacks name: site-packages and the checkout, longest first."""
    import site
    import sysconfig

    roots = {str(Path(__file__).resolve().parents[2]), *site.getsitepackages(), site.getusersitepackages()}
    roots |= {sysconfig.get_path(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    return sorted((r.rstrip(os.sep) + os.sep for r in roots if r), key=len, reverse=True)


_CODE_ROOTS = _code_roots()
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])(?:/[^\s/\"':]+)+/([^\s/\"':]+)")


def without_paths(text: str) -> str:
    """`text` (a message or a traceback) with no server path left: code files relative to their
    package or the checkout (`engine/training.py`), any other absolute path cut to its file name."""
    for root in _CODE_ROOTS:
        text = text.replace(root, "")
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1), text)


def owner_hash(token: str) -> str:
    """What the store keeps of an owner's token."""
    return hashlib.sha256(f"cw-owner:{token}".encode()).hexdigest()


def fold_status(status: str, message: str, event: dict) -> tuple[str, str]:
    """A run's (status, message) after one of its events (the worker's "status", "done" and "error"
    events; others leave it). A finished run's status is final: late events do not change it.
    The one fold the JobRunner (server side) and RunState (per session) both use."""
    kind = event.get("type")
    if status in TERMINAL:
        return status, message
    if kind == "status":
        return event["status"], event.get("message", "")
    if kind == "done":
        return event["status"], ""
    if kind == "error":
        return "failed", event["message"]
    return status, message


def shareable_spec(spec: dict) -> dict:
    """The spec as every session may see it: an uploaded file by its name, not its server path.

    The worker gets the full spec from the JobRunner; spec.json is what run listings show.
    """
    out = dict(spec)
    dataset = str(out.get("dataset", ""))
    if "/" in dataset or os.sep in dataset:
        out["dataset"] = Path(dataset).name
    circuit = out.get("circuit")
    if isinstance(circuit, dict) and isinstance(circuit.get("path"), str):
        out["circuit"] = {**circuit, "path": Path(circuit["path"]).name}
    return out


def _pid_alive(pid) -> bool:
    """True when process `pid` exists and is not a zombie (a killed server not yet reaped is dead)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _is_worker(pid: int) -> bool:
    """True when `pid` is a multiprocessing child (a recycled pid of another program is left alone)."""
    try:
        return b"multiprocessing" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _finite(obj):
    """`obj` with NaN/inf floats replaced by None, so every stored line is valid JSON (null, not NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _jsonable(obj):
    if hasattr(obj, "item") and getattr(obj, "size", 1) == 1:
        return _finite(obj.item())
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    return str(obj)


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=1, default=_jsonable, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path, default: dict) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return dict(default)
