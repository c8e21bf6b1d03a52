"""Browser-test fixtures, after Panel's own tests: serve on a free port, wait for the websocket.

The workbench is served by a `panel serve apps/workbench.py` subprocess (as a user would start it),
with the run store in a temporary folder. Each test gets a fresh browser context, hence a fresh
Panel session: per-session state is reset between tests. Chromium is Debian's (`/usr/bin/chromium`);
every request that leaves localhost is recorded so tests can assert the page works offline.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SERVER_START_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"panel serve exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"workbench did not answer at {url} within {timeout} s")


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory) -> Path:
    """The run store of the served workbench ($CW_RUNS_DIR of the server), for checks on disk."""
    return tmp_path_factory.mktemp("runs")


@contextmanager
def serve_workbench(env: dict, log_dir: Path) -> Iterator[str]:
    """`panel serve apps/workbench.py` on a free port with `env` added to ours; yields the app URL,
    stops the server on exit and prints the end of its log if it logged a traceback."""
    port = free_port()
    log = open(log_dir / "panel.log", "w+")
    cmd = [
        sys.executable,
        "-m",
        "panel",
        "serve",
        "apps/workbench.py",
        "--port",
        str(port),
        "--address",
        "127.0.0.1",
        "--allow-websocket-origin",
        f"127.0.0.1:{port}",
        "--num-procs",
        "1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/workbench"
    try:
        _wait_http(url, proc, SERVER_START_S)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        text = log.read()
        log.close()
        if "Traceback" in text:
            print("---- panel serve log ----\n" + text[-6000:])


@pytest.fixture(scope="session")
def workbench_url(tmp_path_factory, runs_dir):
    """Serve apps/workbench.py on a free port; yields the app URL."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("chromium not installed at /usr/bin/chromium")
    with serve_workbench({"CW_RUNS_DIR": str(runs_dir)}, tmp_path_factory.mktemp("log")) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class PageWatch:
    """Console errors and off-host requests seen by one page."""

    def __init__(self, page, host: str):
        self.page, self.host = page, host
        self.console_errors: list[str] = []
        self.external: list[str] = []
        self.websocket_open = False
        page.on("console", self._on_console)
        page.on("pageerror", lambda e: self.console_errors.append(f"pageerror: {e}"))
        page.on("request", self._on_request)

    def _on_console(self, msg) -> None:
        if msg.type == "error":
            self.console_errors.append(msg.text)
        if "Websocket connection" in msg.text and "now open" in msg.text:
            self.websocket_open = True

    def _on_request(self, req) -> None:
        url = req.url
        if url.startswith("http") and self.host not in url:
            self.external.append(url)


@pytest.fixture()
def page(browser, workbench_url):
    """A fresh context (new Panel session) per test, loaded and connected."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    watch = PageWatch(pg, workbench_url.split("/")[2])
    pg.watch = watch
    pg.goto(workbench_url, timeout=90_000)
    deadline = time.monotonic() + 60
    while not watch.websocket_open and time.monotonic() < deadline:
        pg.wait_for_timeout(200)
    assert watch.websocket_open, "the Bokeh websocket never opened"
    yield pg
    context.close()


def screenshot(page, name: str) -> None:
    """Refresh the README's screenshot of a view, only when asked (`CW_SCREENSHOTS=1 scripts/test
    tests/browser`), so an ordinary test run leaves the work tree clean."""
    if not os.environ.get("CW_SCREENSHOTS"):
        return
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(500)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)
