"""Heavy per-session work (circuit builds, plan compiles) on a small shared thread pool, so the
server's event loop keeps serving every other session while one session builds.

Threads, not processes: a built circuit is a large graph of Python objects that a process would have
to pickle back. The heavy parts release the GIL for part of their time (torch's Chow-Liu, numpy in
the compiler), and the event loop gets the GIL back at every switch interval (5 ms) in any case.
The pool is bounded (`CW_BUILD_THREADS`, default 2): more builds wait their turn, and `waiting()`
says how many are ahead, for the progress line.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

log = logging.getLogger(__name__)


def default_threads() -> int:
    """Builds at once: CW_BUILD_THREADS, else 2."""
    return max(1, int(os.environ.get("CW_BUILD_THREADS") or 2))


class BuildPool:
    """A bounded thread pool that counts the jobs it holds (running and queued)."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or default_threads()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cw-build")
        self._lock = threading.Lock()
        self._held = 0

    def held(self) -> int:
        """Jobs submitted and not yet finished (running and queued)."""
        return self._held

    def waiting(self) -> int:
        """Jobs queued behind the running ones."""
        return max(0, self._held - self.threads)

    def submit(self, fn: Callable, *args) -> Future:
        with self._lock:
            self._held += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._release)
        return future

    def _release(self, _future) -> None:
        with self._lock:
            self._held -= 1


_pool: BuildPool | None = None
_pool_lock = threading.Lock()


def build_pool() -> BuildPool:
    """The process-wide pool (created on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = BuildPool()
        return _pool


def run_then(work: Callable[[], object], then: Callable[[object], None], doc) -> Future:
    """Run `work()` on the build pool, then `then(result)` on the event loop of Bokeh document `doc`
    (`then(exception)` if `work` raised). `add_next_tick_callback` is Bokeh's thread-safe way in."""

    def done(future: Future) -> None:
        err = future.exception()
        if err is not None:
            log.error("background work failed", exc_info=err)
        value = err if err is not None else future.result()
        try:
            doc.add_next_tick_callback(lambda: then(value))
        except Exception:  # noqa: BLE001 - the session closed meanwhile: nobody to tell
            log.debug("document gone before its background work finished")

    future = build_pool().submit(work)
    future.add_done_callback(done)
    return future
