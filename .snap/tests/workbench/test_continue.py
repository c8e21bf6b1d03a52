"""Continue: a stopped or interrupted run of this browser trains on from its checkpoint, from the
session state and from the Train tab's Continue button."""

import time

import pytest

from workbench.services import Services
from workbench.services.jobs import JobRunner
from workbench.services.store import RunStore
from workbench.state.session import SessionState


def _wait(pred, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def services(tmp_path):
    store = RunStore(tmp_path / "runs")
    runner = JobRunner(store, stop_timeout=20.0)
    yield Services(store, runner)
    runner.shutdown()


def _stopped_run(session: SessionState) -> str:
    """Train HCLT-4 on nltcs for up to 30 epochs and stop it after two."""
    session.build.template.param.update(template="hclt", num_latents=4)
    assert session.build.build().ok
    session.training.param.update(epochs=30, full_batch_epochs=1, batch_size=256, profile=False)
    run = session.start_training()
    assert run is not None, session.error
    store = session.services.store
    assert _wait(lambda: len(store.events(run.run_id, ("epoch",))) >= 2), run.status
    session.stop()
    assert session.services.runner.wait(run.run_id, 60)
    assert store.status(run.run_id)["status"] == "stopped"
    return run.run_id


def test_session_continues_its_stopped_run_with_the_epochs_left(services):
    ses = SessionState(services)
    first = _stopped_run(ses)
    done = len(services.store.events(first, ("epoch",)))
    assert [r.run_id for r in ses.continuable_runs()] == [first]
    other = SessionState(services)  # another browser sees nothing to continue, and cannot
    assert other.continuable_runs() == [] and other.continue_run(first) is None
    assert "another session" in other.error

    run = ses.continue_run(first)
    assert run is not None and run is ses.run and run.live, ses.error
    assert run.spec["epochs"] == 30 - done and run.spec["full_batch_epochs"] == 1
    assert run.spec["circuit"] == {"source": "file", "path": "model.cwpc"}
    assert _wait(lambda: services.store.events(run.run_id, ("epoch",)))
    ses.stop()
    assert services.runner.wait(run.run_id, 60)
    assert services.store.events(run.run_id, ("epoch",))[0]["train_ll"] > -7.0  # trained on, not afresh
    assert services.store.readable(run.run_id, ses.owner) and not services.store.readable(
        run.run_id, other.owner
    )


def test_train_tab_lists_the_runs_to_continue_and_continues_the_picked_one(services):
    from workbench.views.training_view import TrainingView

    ses = SessionState(services)
    first = _stopped_run(ses)
    view = TrainingView(session=ses)  # a page opened after the run stopped (or the server restarted)
    assert list(view.continue_pick.options.values()) == [first] and not view.continue_btn.disabled
    view.continue_pick.value = first
    view.continue_btn.clicks += 1
    assert ses.run is not None and ses.run.run_id != first and ses.run.live, view.alert.object
    assert view.stop_btn.disabled is False and view.start_btn.disabled is True
    ses.stop()
    assert services.runner.wait(ses.run.run_id, 60)

    empty = TrainingView(session=SessionState(services))  # another browser
    assert empty.continue_pick.options in ({}, []) and empty.continue_btn.disabled
