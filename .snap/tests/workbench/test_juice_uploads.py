"""The Import tab takes Juice's text formats (.jpc, .jpc.gz, .clt, .spn) that engine.load reads."""

import gzip

import pytest

from tests.test_io_juice import CLT, MIXED_JPC, SPN
from workbench.services import uploads
from workbench.state.circuit import BuildState


@pytest.mark.parametrize(
    "name, data, num_vars",
    [
        ("mixed.jpc", MIXED_JPC.encode(), 3),
        ("mixed.jpc.gz", gzip.compress(MIXED_JPC.encode()), 3),
        ("forest.clt", CLT.encode(), 5),
        ("m.spn", SPN.encode(), 3),
    ],
)
def test_juice_circuit_uploads_are_stored_and_build(tmp_path, monkeypatch, name, data, num_vars):
    monkeypatch.setenv("CW_UPLOAD_DIR", str(tmp_path))
    res = uploads.save_circuit_upload(name, data)
    assert res.ok, res.error
    assert res.path.endswith(name[name.index(".") :]) and res.summary["num_vars"] == num_vars
    build = BuildState(source="file", file_path=res.path)
    assert build.build().ok, build.error


def test_other_suffixes_are_still_refused_with_the_accepted_list(tmp_path, monkeypatch):
    monkeypatch.setenv("CW_UPLOAD_DIR", str(tmp_path))
    res = uploads.save_circuit_upload("model.pkl.gz", b"x")
    assert not res.ok and "'.pkl.gz'" in res.error and ".jpc, .jpc.gz, .clt, .spn" in res.error
    bad = uploads.save_circuit_upload("broken.jpc", b"jpc 1\nQ 0 0\n")
    assert not bad.ok and "broken.jpc" in bad.error and list(tmp_path.iterdir()) == []
