"""Shared services (one per server) and plain-data helpers: jobs, run store, layout, plans, uploads.

`get_services()` returns the process-wide `Services` (JobRunner + RunStore), created on first use.
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass

_lock = threading.Lock()
_services = None


@dataclass
class Services:
    """Per-server services shared by all sessions."""

    store: object  # workbench.services.store.RunStore
    runner: object  # workbench.services.jobs.JobRunner

    def shutdown(self) -> None:
        self.runner.shutdown()


def get_services(runs_dir=None) -> Services:
    """The process-wide services (runs in `runs_dir`, default $CW_RUNS_DIR or ./runs)."""
    global _services
    with _lock:
        if _services is None:
            from workbench.services.jobs import JobRunner
            from workbench.services.store import RunStore

            store = RunStore(runs_dir)
            _services = Services(store, JobRunner(store))
            atexit.register(_services.shutdown)  # panel serve exits normally on SIGTERM
        return _services
