"""The served workbench listens on localhost only, shows no server paths, keeps no failed uploads,
and refuses hyper-parameters that are not finite."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from workbench.services import uploads
from workbench.services.jobs import JobSpec
from workbench.services.store import RunStore
from workbench.views._common import safe_text

REPO = Path(__file__).resolve().parents[2]


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as in /proc/net/tcp*) with a socket listening on `port`."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                out.append(address)
    return out


@pytest.mark.slow
def test_scripts_start_listens_on_localhost_only():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [str(REPO / "scripts" / "start"), "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, "scripts/start exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/workbench", timeout=30) as r:
                    assert r.status == 200
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the workbench did not answer")
        assert _listening(port) == ["0100007F"]  # 127.0.0.1 only: no 0.0.0.0, no [::]
    finally:
        proc.terminate()
        proc.wait(30)


def test_safe_text_makes_html_and_markdown_inert():
    text = safe_text('<img src=q onerror="x()"> [a](javascript:x()) **b** `c`')
    assert "<" not in text and ">" not in text
    assert "&lt;img" in text and "\\[a\\]\\(javascript:x\\(\\)\\)" in text and "\\*\\*b\\*\\*" in text
    assert safe_text("nltcs.clt.psdd") == "nltcs.clt.psdd"


def test_stored_specs_name_uploaded_files_without_their_server_path(tmp_path):
    store = RunStore(tmp_path)
    run_id = store.create(
        {
            "dataset": "/srv/secret/uploads/mine-1a2b.npy",
            "circuit": {"source": "file", "path": "/srv/secret/uploads/c-9f.psdd"},
        }
    )
    spec = store.spec(run_id)
    assert spec["dataset"] == "mine-1a2b.npy" and spec["circuit"]["path"] == "c-9f.psdd"
    assert "/srv" not in (tmp_path / run_id / "spec.json").read_text()
    assert store.spec(store.create({"dataset": "nltcs", "circuit": {}}))["dataset"] == "nltcs"


def test_failed_uploads_leave_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_UPLOAD_DIR", str(tmp_path))
    res = uploads.save_data_upload("bad.csv", b"1,2\nnan,3\n")
    assert not res.ok and "NaN" in res.error
    res = uploads.save_circuit_upload("bad.psdd", b"psdd 1\nX 1\n")
    assert not res.ok

    def explode(path):
        raise MemoryError

    monkeypatch.setattr("engine.data.load_dataset", explode)
    res = uploads.save_data_upload("big.csv", b"1,2\n3,4\n")
    assert not res.ok and "memory" in res.error
    assert list(tmp_path.iterdir()) == []


def test_upload_limit_is_checked_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_UPLOAD_DIR", str(tmp_path))
    res = uploads.save_data_upload("big.csv", b"1,2\n" * 1000, max_bytes=1000)
    assert not res.ok and "too large" in res.error and "limit" in res.error
    assert uploads.MAX_UPLOAD_BYTES <= 12 * 2**20 or os.environ.get("CW_MAX_UPLOAD_MB")


@pytest.mark.parametrize("field", ["pseudocount", "step_size", "final_step_size", "tolerance"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_job_spec_refuses_non_finite_hyper_parameters(field, value):
    spec = JobSpec(circuit={"source": "template"}, **{field: value})
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        spec.validate()
    JobSpec(circuit={"source": "template"}).validate()  # the defaults are fine


def test_live_jobs_and_their_errors_show_no_server_paths(tmp_path):
    from workbench.services.jobs import JobRunner

    bad = tmp_path / "secret-folder" / "data.csv"
    bad.parent.mkdir()
    bad.write_text("1,2\n3,4\n" * 20)
    runner = JobRunner(RunStore(tmp_path / "runs"))
    try:
        spec = JobSpec(
            circuit={"source": "file", "path": str(tmp_path / "secret-folder" / "c.psdd")},
            dataset=str(bad),
            epochs=1,
            full_batch_epochs=0,
            threads=1,
        )
        job = runner.start(spec)
        assert job.spec.dataset == "data.csv" and job.spec.circuit["path"] == "c.psdd"
        assert runner.wait(job.job_id, 120) and job.status == "failed"
        assert "c.psdd" in job.message and "secret-folder" not in job.message, job.message
        assert "secret-folder" not in (tmp_path / "runs" / job.job_id / "status.json").read_text()
    finally:
        runner.shutdown()


def test_store_writes_null_for_non_finite_numbers(tmp_path):
    import json

    store = RunStore(tmp_path)
    run_id = store.create({"circuit": {}})
    store.append_events(
        run_id, [{"type": "epoch", "train_ll": math.nan, "valid_ll": -math.inf, "x": [math.inf, 1.0]}]
    )
    store.set_status(run_id, "failed", ratio=math.nan)

    def strict(token):
        raise AssertionError(token)

    line = (tmp_path / run_id / "metrics.jsonl").read_text().strip()
    assert json.loads(line, parse_constant=strict) == {
        "type": "epoch",
        "train_ll": None,
        "valid_ll": None,
        "x": [None, 1.0],
    }
    assert json.loads((tmp_path / run_id / "status.json").read_text(), parse_constant=strict)["ratio"] is None


def test_run_files_and_archives_hold_no_server_paths(tmp_path):
    """Tracebacks, messages and the model path reach the store relative to their package or as names."""
    import io
    import zipfile
    from pathlib import Path

    from workbench.services.jobs import JobRunner

    repo = str(Path(__file__).resolve().parents[2])
    runner = JobRunner(RunStore(tmp_path / "runs"))
    try:
        spec = JobSpec(
            circuit={"source": "template", "template": "no-such-template"},
            dataset="nltcs",
            epochs=1,
            full_batch_epochs=0,
            threads=1,
        )
        job = runner.start(spec)
        assert runner.wait(job.job_id, 120) and job.status == "failed"
        done = runner.start(
            JobSpec(
                circuit={"source": "template", "template": "hclt", "num_latents": 2},
                dataset="nltcs",
                epochs=1,
                full_batch_epochs=0,
                threads=1,
                profile=False,
            )
        )
        assert runner.wait(done.job_id, 120) and done.status == "done", done.message
        for run_id in (job.job_id, done.job_id):
            archive = zipfile.ZipFile(io.BytesIO(runner.store.archive(run_id)))
            texts = [archive.read(n).decode() for n in archive.namelist() if not n.endswith(".cwpc")]
            assert texts and all(repo not in t and str(tmp_path) not in t for t in texts), run_id
        error = runner.store.events(job.job_id, ("error",))[0]
        assert "workbench/services/worker.py" in error["traceback"]  # still useful, relative to the checkout
        assert runner.store.events(done.job_id, ("done",))[0]["model"] == "model.cwpc"
    finally:
        runner.shutdown()


def test_every_stylesheet_of_a_new_session_is_local(tmp_path):
    """The app's models get local stylesheet URLs from the start, not only after the page render
    re-patches the models it reaches (before, 11 of 11 pointed at cdn.holoviz.org)."""
    from bokeh.document import Document
    from bokeh.models import ImportedStyleSheet
    from panel.io.state import set_curdoc

    from workbench.app import create_app
    from workbench.offline import pin_local_resources
    from workbench.services import Services
    from workbench.services.jobs import JobRunner

    store = RunStore(tmp_path)
    services = Services(store, JobRunner(store))
    try:
        doc = Document()
        with set_curdoc(doc):
            pin_local_resources()
            create_app(services).server_doc(doc)
        urls = {str(s.url) for root in doc.roots for s in root.select({"type": ImportedStyleSheet})}
        assert urls and not [u for u in urls if "://" in u], sorted(urls)[:5]
    finally:
        services.shutdown()
