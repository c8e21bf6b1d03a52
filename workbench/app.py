"""Assemble the workbench: shared services (one per server), per-session state, views, a template.

    create_app().servable()     # per session: SessionState, one view per tab, a Bootstrap template

Services (JobRunner + RunStore) come from `workbench.services.get_services()` and are shared by all
sessions; each session owns its `SessionState`. Views never touch torch.
"""

from __future__ import annotations

import holoviews as hv
import panel as pn

from workbench.owner import OwnerCookie, session_owner
from workbench.services import Services, get_services
from workbench.state.session import SessionState
from workbench.upload_guard import UploadGuard
from workbench.views._common import collapsing_tabs

TITLE = "Circuit Workbench"
INTRO = """Build a probabilistic circuit, see how it is compiled into block-sparse layers, train it
with EM and profile it layer by layer.

Each tab starts with a short note on what it shows and why it matters for running PCs in parallel.

Runs are kept in the run store (`$CW_RUNS_DIR`, default `./runs`) after the browser closes."""


def configure_panel() -> None:
    """Extensions; the Bootstrap template loads no web fonts or CDN assets, so the app works offline."""
    pn.extension("tabulator", sizing_mode="stretch_width", notifications=True)
    hv.extension("bokeh", logo=False)


def create_views(session: SessionState) -> dict:
    """One view per tab, keyed by tab title."""
    from workbench.views.builder import BuilderView
    from workbench.views.circuit_view import CircuitView
    from workbench.views.compare_view import CompareView
    from workbench.views.flows_view import FlowsView
    from workbench.views.partition_view import PartitionView
    from workbench.views.schedule_view import ScheduleView
    from workbench.views.training_view import TrainingView

    services = session.services
    schedule = ScheduleView(plan=session.plan)
    return {
        "Build": BuilderView(build=session.build, plan=session.plan),
        "Circuit": CircuitView(plan=session.plan),
        "Partitions": PartitionView(plan=session.plan),
        "Schedule": schedule,
        "Flows": FlowsView(session=session),
        "Train": TrainingView(session=session, schedule=schedule),
        "Compare": CompareView(store=session.store, jobs=services.runner, compare=session.compare),
    }


def follow_tabs(tabs: pn.Tabs, views: dict) -> None:
    """Tell views with a `shown` parameter whether their tab is open, so hidden ones defer redraws."""

    def show(active: int) -> None:
        for i, view in enumerate(views.values()):
            if "shown" in view.param:
                view.shown = i == active

    show(tabs.active)
    tabs.param.watch(lambda e: show(e.new), "active")


def create_app(services: Services | None = None) -> pn.template.BootstrapTemplate:
    """The whole workbench for one session."""
    configure_panel()
    session = SessionState(services or get_services(), owner=session_owner())
    views = create_views(session)
    tabs = collapsing_tabs(*views.items(), sizing_mode="stretch_width")
    follow_tabs(tabs, views)
    template = pn.template.BootstrapTemplate(
        title=TITLE,
        main=[UploadGuard(margin=(0, 10)), OwnerCookie(token=session.owner, margin=0), tabs],
        sidebar=[pn.pane.Markdown(INTRO)],
        sidebar_width=260,
        header_background="#2f4f6f",
    )
    template.session_state = session  # for tests and debugging
    template.views = views
    return template
