"""
Shared test fixtures: a private redis-server per test session (and a
restartable one for outage tests), and running sockdrawer services.

No test is skipped for a missing redis-server: the run fails and says how to
install it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
from twisted.internet import defer, reactor, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INSTALL_HINT = (
    "redis-server is not on the PATH; the tests start their own Redis. Install it with "
    "'apt-get install redis-server' (Debian/Ubuntu) or 'brew install redis' (macOS)."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def commands(data: bytes) -> list[list[bytes]]:
    """The RESP commands in ``data`` (what a link wrote), parsed back."""
    import hiredis

    reader = hiredis.Reader()
    reader.feed(data)
    out = []
    while (command := reader.gets()) is not False:
        out.append(command)
    return out


#: every redis-server the tests started and have not stopped: killed when the run (or an xdist worker) ends
_STARTED: set[subprocess.Popen[bytes]] = set()


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    for proc in list(_STARTED):
        proc.kill()
        proc.wait()
    _STARTED.clear()


class RedisServer:
    """A private redis-server child process on a free port, restartable."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="sockdrawer-redis-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None) -> None:
        """Start it (again, on the same port when restarting)."""
        self.stop()  # never two at once: the first would outlive the run
        for attempt in range(5):
            self.port = port or free_port()
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, "--loglevel", "warning"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _STARTED.add(self.proc)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return
                except OSError:
                    time.sleep(0.01)
            self.stop()
            if port is not None and attempt >= 2:
                break
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            _STARTED.discard(self.proc)
            self.proc = None

    def client(self) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def numpat(self) -> int:
        with self.client() as r:
            return int(r.pubsub_numpat())

    def pattern_subscribers(self) -> int:
        """How many client connections hold a pattern subscription (NUMPAT counts patterns)."""
        with self.client() as r:
            return sum(1 for c in r.client_list() if int(c.get("psub", 0)) > 0)

    def publish(self, channel: str | bytes, message: str | bytes) -> int:
        with self.client() as r:
            return int(r.publish(channel, message))


def _running_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server shared by the whole run."""
    yield from _running_redis()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, which it may stop and restart."""
    yield from _running_redis()


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> defer.Deferred[None]:
    """
    Poll ``predicate`` (which may return a Deferred) until it is true; fail
    after ``timeout`` seconds.
    """

    @defer.inlineCallbacks
    def loop() -> Any:
        deadline = reactor.seconds() + timeout
        while True:
            result = yield defer.maybeDeferred(predicate)
            if result:
                return result
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out waiting for {predicate}")
            yield task.deferLater(reactor, interval, lambda: None)

    return loop()


@defer.inlineCallbacks
def start_service(**settings: Any) -> Any:
    """Start a SockDrawerService on free loopback ports; return it, listening."""
    from sockdrawer.service import SockDrawerService

    settings.setdefault("port", "tcp:0:interface=127.0.0.1")
    settings.setdefault("api", "tcp:0:interface=127.0.0.1")
    svc = SockDrawerService(**settings)
    svc.startService()
    ports = yield svc.when_listening()
    svc.ws_port = ports["websocket"].getHost().port
    svc.api_port = ports["api"].getHost().port if ports["api"] else None
    return svc


@defer.inlineCallbacks
def wait_subscribed(svc: Any, redis: RedisServer) -> Any:
    """Wait until the service's pattern subscription is live in Redis, and its history policy loaded there."""
    yield wait_for(lambda: svc.broker.is_connected())
    yield wait_for(lambda: redis.numpat() >= 1)
    yield wait_for(lambda: svc.broker.library.loaded is not None)


@pytest.fixture
def services() -> Iterator[list[Any]]:
    """Services a test started; stopped (and checked for leftovers) at teardown."""
    started: list[Any] = []
    yield started
    for svc in started:
        if svc.running:
            pytest_twisted.blockon(defer.maybeDeferred(svc.stopService))
        assert not svc.factory.connections, "sockets left open after stopService"


@pytest.fixture
def run_service(services: list[Any]) -> Any:
    """``svc = yield run_service(redis=..., ...)``: started now, stopped at teardown."""

    @defer.inlineCallbacks
    def run(**settings: Any) -> Any:
        svc = yield start_service(**settings)
        services.append(svc)
        return svc

    return run


def pytest_configure(config: Any) -> None:
    global _config
    _config = config
    # the example listeners used by the tests live in tests/listeners.py
    sys.path.insert(0, os.path.join(ROOT, "tests"))


# -- the conformance suite's behaviour counts (tests/test_conformance.py)

#: run name -> {behaviour: count, ..., "cases": n, "seconds": s}
CONFORMANCE_COUNTS = pytest.StashKey[dict[str, dict[str, float]]]()


@pytest.fixture
def conformance_summary(request: pytest.FixtureRequest) -> Iterator[dict[str, dict[str, float]]]:
    """Where a conformance run stores its behaviour counts, for the table at the end of the session: they
    travel in the test's report (``user_properties``), so they reach the table from an xdist worker too."""
    counts: dict[str, dict[str, float]] = {}
    yield counts
    request.node.user_properties.append(("conformance", counts))


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "teardown":
        return
    for name, value in report.user_properties:
        if name == "conformance":
            _config.stash.setdefault(CONFORMANCE_COUNTS, {}).update(value)


_config: pytest.Config


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: a worker more than the cores (the tests mostly wait on sockets and child processes), at most 8."""
    return min(8, (os.cpu_count() or 1) + 1)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Print the conformance runs' behaviour counts (pytest captures the tests' own output)."""
    runs = config.stash.get(CONFORMANCE_COUNTS, {})
    if not runs:
        return
    columns: dict[str, None] = {}
    for row in runs.values():
        columns.update(dict.fromkeys(row))
    width = max(len(name) for name in runs)
    terminalreporter.section("WebSocket conformance (kosoku)")
    terminalreporter.write_line(f"{'run':<{width}}" + "".join(f"  {c:>{max(len(c), 5)}}" for c in columns))
    for name, row in runs.items():
        cells = "".join(f"  {row.get(c, ''):>{max(len(c), 5)}}" for c in columns)
        terminalreporter.write_line(f"{name:<{width}}{cells}")
