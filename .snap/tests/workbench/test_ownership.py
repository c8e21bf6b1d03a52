"""Runs belong to the session (browser cookie) that made them; others see them only when shared."""

import io
import zipfile

import pytest

from workbench.owner import COOKIE, new_token, session_owner
from workbench.services import Services
from workbench.services.jobs import JobRunner
from workbench.services.store import RunStore
from workbench.state.session import SessionState


@pytest.fixture
def services(tmp_path):
    store = RunStore(tmp_path / "runs")
    runner = JobRunner(store)
    yield Services(store, runner)
    runner.shutdown()


def _run(store, owner):
    run_id = store.create({"circuit": {"source": "template"}, "dataset": "nltcs"}, owner=owner)
    store.append_events(run_id, [{"type": "epoch", "epoch": 1, "train_ll": -6.0}])
    store.set_status(run_id, "done")
    (store.path(run_id) / "model.cwpc").write_bytes(b"model")
    return run_id


def test_other_owners_cannot_list_or_read_a_run_until_it_is_shared(tmp_path):
    store = RunStore(tmp_path)
    alice, bob = new_token(), new_token()
    mine, legacy = _run(store, alice), _run(store, None)
    a, b = store.scoped(alice), store.scoped(bob)
    assert [r.run_id for r in a.list_runs()] == sorted([mine, legacy], reverse=True)
    assert [r.run_id for r in b.list_runs()] == [legacy]  # a run without owner (CLI, older) is everyone's
    for read in (b.spec, b.status, b.events, b.model_path, b.archive):
        with pytest.raises(PermissionError, match="another session"):
            read(mine)
    with pytest.raises(PermissionError):
        b.set_shared(mine, True)
    with pytest.raises(PermissionError):
        b.delete(mine)
    assert a.events(mine, ("epoch",))[0]["train_ll"] == -6.0
    a.set_shared(mine, True)
    assert mine in [r.run_id for r in b.list_runs()] and b.status(mine)["status"] == "done"
    names = zipfile.ZipFile(io.BytesIO(b.archive(mine))).namelist()
    assert f"{mine}/metrics.jsonl" in names and not any("access" in n for n in names)
    on_disk = "".join(p.read_text() for p in store.path(mine).glob("*.json"))
    assert alice not in on_disk  # only a hash of the token is stored
    a.set_shared(mine, False)
    assert [r.run_id for r in b.list_runs()] == [legacy]


def test_sessions_open_and_continue_only_runs_they_may_read(services):
    alice, bob = SessionState(services), SessionState(services)
    assert alice.owner != bob.owner and len(alice.owner) >= 32
    run_id = _run(services.store, alice.owner)
    services.store.set_status(run_id, "stopped")
    assert alice.open_run(run_id).epochs["train_ll"] == [-6.0]
    with pytest.raises(PermissionError):
        bob.open_run(run_id)
    with pytest.raises(PermissionError):
        services.runner.continue_run(run_id, owner=bob.owner)
    assert run_id not in [r.run_id for r in bob.store.list_runs()]
    alice.share_run(True)
    assert bob.open_run(run_id).status == "stopped"


def test_compare_view_lists_only_the_sessions_runs(services):
    from workbench.views.compare_view import CompareView

    alice, bob = SessionState(services), SessionState(services)
    mine = _run(services.store, alice.owner)
    theirs = _run(services.store, bob.owner)
    view = CompareView(store=alice.store, jobs=services.runner, compare=alice.compare)
    assert list(view.picker.options.values()) == [mine] and theirs not in str(view.picker.options)


def test_the_owner_token_comes_from_a_well_formed_cookie_only():
    token = new_token()
    assert session_owner({COOKIE: token}) == token
    for bad in ("", "short", "x" * 31, "<script>" + "a" * 40, "a" * 65):
        got = session_owner({COOKIE: bad})
        assert got != bad and len(got) >= 32
    assert session_owner({}) != session_owner({})
