"""
``--workers N``: a supervisor and N ``twistd sockdrawer`` workers on one port
(SO_REUSEPORT), against a real redis-server and real WebSocket clients.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from childnode import TWISTD, ChildNode
from twisted.logger import LogLevel, eventAsJSON
from twisted.python import usage
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from sockdrawer import Client
from sockdrawer.node.tap import Options
from sockdrawer.node.workers import WorkerLog, check_workers, parse_tcp, worker_api

_STARTED = re.compile(r"\] worker-(\d+) started \(pid (\d+)\)")
_API = re.compile(r"\[worker-(\d+)\] listening on http://[^:]+:(\d+)")
_SUBSCRIBED = re.compile(r"\[worker-(\d+)\] subscribed to ")


@dataclass
class Worker:
    pid: int
    api_port: int | None = None
    subscribed: bool = False


def workers(node: ChildNode) -> dict[int, Worker]:
    """The current process of each worker, from the supervisor's log (a restart starts a new entry)."""
    found: dict[int, Worker] = {}
    for line in node.log_text().splitlines():
        if m := _STARTED.search(line):
            found[int(m.group(1))] = Worker(int(m.group(2)))
        elif (m := _API.search(line)) and int(m.group(1)) in found:
            found[int(m.group(1))].api_port = int(m.group(2))
        elif (m := _SUBSCRIBED.search(line)) and int(m.group(1)) in found:
            found[int(m.group(1))].subscribed = True
    return found


def wait_workers(node: ChildNode, count: int, timeout: float = 30.0, not_pids: frozenset[int] = frozenset()
                 ) -> dict[int, Worker]:
    """Wait until ``count`` workers (none of them ``not_pids``) listen on their API port and are subscribed."""
    deadline = time.monotonic() + timeout
    while True:
        found = workers(node)
        if len(found) == count and all(w.api_port and w.subscribed and w.pid not in not_pids
                                       for w in found.values()):
            return found
        assert node.proc is not None and node.proc.poll() is None, node.log_text()
        assert time.monotonic() < deadline, f"workers not ready in {timeout} s:\n{node.log_text()}"
        time.sleep(0.05)


def supervisor(tmp_path: Path, redis_url: str, *args: str) -> tuple[ChildNode, dict[int, Worker]]:
    node = ChildNode(tmp_path, ["--workers", "2", "--redis", redis_url, *args]).start()
    return node, wait_workers(node, 2)


def health(worker: Worker) -> dict[str, Any]:
    """The worker's own ``GET /health``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.api_port}/health", timeout=10) as r:
        answer: dict[str, Any] = json.loads(r.read())
        return answer


def wait_sockets(by_worker: dict[int, Worker], total: int, timeout: float = 10.0) -> dict[int, int]:
    """Wait until the workers' ``GET /health`` socket counts add up to ``total``; return them."""
    deadline = time.monotonic() + timeout
    while True:
        counts = {i: health(w)["sockets"] for i, w in by_worker.items()}
        if sum(counts.values()) == total:
            return counts
        assert time.monotonic() < deadline, f"expected {total} sockets over the workers, have {counts}"
        time.sleep(0.02)


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stop(node: ChildNode) -> None:
    if node.proc is not None and node.proc.poll() is None:
        node.stop()


def test_connections_spread_over_both_workers_and_every_socket_gets_every_message_once(
        tmp_path: Path, redis_server: Any) -> None:
    """With --workers 2, 40 connections on the one port are spread over both worker processes (each worker's
    /health counts some), every socket gets every published message exactly once and in order, and a listener's
    broker events fire once per worker (as with separate nodes)."""
    node, by_worker = supervisor(tmp_path, redis_server.url, "--listener", "listeners:Witness", "--name", "wk")
    stack = ExitStack()
    try:
        pids = {w.pid for w in by_worker.values()}
        assert len(pids) == 2 and node.proc is not None and node.proc.pid not in pids
        sockets = [stack.enter_context(connect(node.url("/news"), open_timeout=5)) for _ in range(40)]
        counts = wait_sockets(by_worker, 40)
        assert all(c > 0 for c in counts.values()), counts
        publisher = Client(redis_server.url, name="wk")
        assert publisher.pub("warm", "news") == 2  # one subscription per worker
        for i in range(20):
            publisher.pub(f"m{i}", "news")
        publisher.pub("fence", "news")
        for ws in sockets:
            got = [ws.recv(timeout=5) for _ in range(22)]
            assert got == ["warm", *(f"m{i}" for i in range(20)), "fence"]
        # the listener runs in every worker: one report per worker, each from its own pid
        with connect(node.url("/witness/seen"), open_timeout=5) as watcher:
            wait_sockets(by_worker, 41)
            publisher.pub("who sees this?", "witness")
            reports = {watcher.recv(timeout=5) for _ in range(2)}
            assert reports == {f"seen by {pid}" for pid in pids}
            publisher.pub("fence", "witness/seen")
            assert watcher.recv(timeout=5) == "fence", "a third report: some worker ran its listener twice"
    finally:
        stack.close()
        stop(node)
    node.assert_no_traceback()


def test_sigkill_of_a_worker_drops_only_its_sockets_and_it_is_restarted(tmp_path: Path, redis_server: Any) -> None:
    """A worker killed with SIGKILL loses exactly its own sockets; the other worker's sockets keep receiving; the
    supervisor logs the death and starts a new process for that worker (new pid), which takes new connections."""
    node, by_worker = supervisor(tmp_path, redis_server.url, "--name", "wk2")
    stack = ExitStack()
    try:
        sockets = [stack.enter_context(connect(node.url("/news"), open_timeout=5)) for _ in range(30)]
        counts = wait_sockets(by_worker, 30)
        victim = min(counts, key=lambda i: (counts[i] == 0, i))  # a worker with sockets
        assert counts[victim] > 0, counts
        old_pid = by_worker[victim].pid
        os.kill(old_pid, signal.SIGKILL)
        publisher = Client(redis_server.url, name="wk2")
        publisher.pub("after", "news")
        dropped = kept = 0
        for ws in sockets:
            try:
                assert ws.recv(timeout=5) == "after"
                kept += 1
            except ConnectionClosed:
                dropped += 1
        assert dropped == counts[victim] and kept == 30 - counts[victim], (dropped, kept, counts)
        # restarted: a new process for the same worker, the exit logged
        restarted = wait_workers(node, 2, not_pids=frozenset({old_pid}))
        assert restarted[victim].pid != old_pid
        assert f"worker-{victim} (pid {old_pid}) exited (killed by signal 9); restarting in" in node.log_text()
        assert restarted[1 - victim].pid == by_worker[1 - victim].pid
        # new connections work, and reach the new process too
        fresh: list[ClientConnection] = []
        deadline = time.monotonic() + 10
        while health(restarted[victim])["sockets"] == 0:
            assert time.monotonic() < deadline, "no new connection reached the restarted worker"
            fresh.append(stack.enter_context(connect(node.url("/news"), open_timeout=5)))
            time.sleep(0.02)
        wait_sockets(restarted, kept + len(fresh))
        assert publisher.pub("again", "news") == 2
        for ws in fresh:
            assert ws.recv(timeout=5) == "again"
    finally:
        stack.close()
        stop(node)


def test_sigterm_drains_every_worker_with_1012_then_the_supervisor_exits(tmp_path: Path, redis_server: Any) -> None:
    """SIGTERM to the supervisor: every socket on both workers gets close code 1012 (each worker's own drain), the
    supervisor waits for both and exits as a single node does (re-raising SIGTERM); a worker that gets SIGTERM
    twice (systemd's control-group kill and the supervisor both send one) drains once, without an error."""
    node, by_worker = supervisor(tmp_path, redis_server.url, "--drain-window", "0.2")
    stack = ExitStack()
    try:
        sockets = [stack.enter_context(connect(node.url("/news"), open_timeout=5)) for _ in range(20)]
        counts = wait_sockets(by_worker, 20)
        assert all(c > 0 for c in counts.values()), counts
        os.kill(by_worker[0].pid, signal.SIGTERM)  # as systemd signals every process of the unit
        node.send_signal(signal.SIGTERM)
        codes = []
        for ws in sockets:
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None
            codes.append(closed.value.rcvd.code)
        assert codes == [1012] * 20
        assert node.wait() == -signal.SIGTERM, node.log_text()
    finally:
        stack.close()
        stop(node)
    text = node.log_text()
    for i, w in by_worker.items():
        # worker 0 may have exited on its own SIGTERM before the supervisor's came
        assert re.search(rf"worker-{i} \(pid {w.pid}\) (stopped|exited) \(killed by signal 15\)", text), text
        assert gone(w.pid)
    assert "all workers stopped" in text and "ReactorNotRunning" not in text
    node.assert_no_traceback()


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, redis_server: Any) -> None:
    """When the supervisor dies with SIGKILL (it cannot stop anything), each worker sees its pipe close and
    stops instead of holding the port as an orphan."""
    node, by_worker = supervisor(tmp_path, redis_server.url)
    try:
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait(10)
        deadline = time.monotonic() + 20
        while not all(gone(w.pid) for w in by_worker.values()):
            assert time.monotonic() < deadline, "orphaned workers kept running"
            time.sleep(0.05)
    finally:
        stop(node)
        for w in by_worker.values():
            if not gone(w.pid):
                os.kill(w.pid, signal.SIGKILL)


def test_workers_without_redis_is_a_usage_error() -> None:
    """`twistd sockdrawer --workers 2` without --redis exits non-zero with the usage error, and no traceback."""
    result = subprocess.run([*TWISTD, "-n", "--pidfile=", "sockdrawer", "--workers", "2"],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "--workers above 1 needs --redis" in output
    assert "Traceback" not in output


def test_workers_need_tcp_endpoints_and_separate_api_ports() -> None:
    """--workers above 1 refuses endpoints other than tcp: (TLS, UNIX) and API ports that run into the
    WebSocket port, with usage errors saying why; tcp: endpoints and port numbers are accepted."""
    redis = ["--redis", "redis://127.0.0.1:6379/0", "--workers", "3"]
    for args, message in [
        (["--port", "unix:/tmp/sd.sock"], "supports tcp: endpoints (and port numbers) for --port"),
        (["--port", "ssl:8443:privateKey=k.pem"], "supports tcp: endpoints"),
        (["--api", "unix:/tmp/api.sock"], "supports tcp: endpoints (and port numbers) for --api"),
        (["--port", "8022", "--api", "tcp:8021"], "API ports 8021 to 8023"),
        (["--api", "tcp:65534"], "above 65535"),
    ]:
        with pytest.raises(usage.UsageError, match=re.escape(message)):
            Options().parseOptions([*redis, *args])
    for args in (["--port", "8020"], ["--port", "tcp6:port=8020:interface=\\:\\:1"], ["--api", "none"]):
        options = Options()
        options.parseOptions([*redis, *args])
        check_workers(options.settings)
        assert options.argv == [*redis, *args]


def test_endpoint_parsing_and_api_ports() -> None:
    """tcp:/tcp6: strings are read as Twisted reads them (positional and named arguments, escaped colons), and
    worker i's API port is the --api port plus i (port 0 stays 0: each picks a free one)."""
    assert parse_tcp("--port", 8020) == parse_tcp("--port", "tcp:port=8020:backlog=50")
    a = parse_tcp("--port", "tcp:8020:127.0.0.1:99")
    assert (a.kind, a.host, a.port, a.backlog) == ("tcp", "127.0.0.1", 8020, 99)
    b = parse_tcp("--port", "tcp6:8020:interface=\\:\\:1", backlog=1024)
    assert (b.host, b.port, b.backlog, b.family.name) == ("::1", 8020, 1024, "AF_INET6")
    assert parse_tcp("--port", "tcp:0:interface=127.0.0.1").family.name == "AF_INET"
    assert worker_api("tcp:8021:interface=127.0.0.1", 2) == "tcp:8023:backlog=50:interface=127.0.0.1"
    assert worker_api("tcp6:8021:interface=\\:\\:1", 1) == "tcp6:8022:backlog=50:interface=\\:\\:1"
    assert worker_api("tcp:0:interface=127.0.0.1", 5).startswith("tcp:0:")
    with pytest.raises(ValueError, match="no port number"):
        parse_tcp("--port", "tcp:interface=127.0.0.1")


def test_worker_log_lines_become_the_supervisors_events() -> None:
    """A worker's JSON log line is logged by the supervisor as that event, its text prefixed [worker-<i>] and a
    sockdrawer_worker field added; any other line (a traceback on stderr) is logged as the line itself; the
    empty line ProcessMonitor adds at each exit is not logged."""
    seen: list[dict[str, Any]] = []
    log = WorkerLog(namespace="sockdrawer", observer=seen.append)
    worker_event = {"log_format": "listening on {url}", "url": "ws://127.0.0.1:1/<channel>",
                    "log_level": LogLevel.info, "log_namespace": "sockdrawer", "log_time": 1.0}
    log.info("[{tag}] {line}", tag="worker-3", line=eventAsJSON(worker_event), stream="stdout")
    log.info("[{tag}] {line}", tag="worker-3", line="Traceback (most recent call last):", stream="stderr")
    log.info("[{tag}] {line}", tag="worker-3", line="", stream="stdout")
    from twisted.logger import formatEvent

    assert formatEvent(seen[0]) == "[worker-3] listening on ws://127.0.0.1:1/<channel>"
    assert seen[0]["sockdrawer_worker"] == 3 and seen[0]["log_time"] == 1.0
    assert seen[0]["log_level"] == LogLevel.info
    assert formatEvent(seen[1]) == "[worker-3] Traceback (most recent call last):"
    assert len(seen) == 2


def test_workers_run_as_the_supervisor_was_started() -> None:
    """Each worker runs twistd in the foreground without a pidfile, with the supervisor's --reactor and the
    sockdrawer arguments as given, logging JSON lines for the supervisor to decode."""
    from sockdrawer.config import Settings
    from sockdrawer.node.workers import WorkerSupervisor

    settings = Settings(workers=2, redis="redis://127.0.0.1:6379/0").validate()
    argv = ["--workers", "2", "--redis", "redis://127.0.0.1:6379/0"]
    sup = WorkerSupervisor(settings, argv, {}, reactor_name="asyncio", python="/usr/bin/python3")
    command = sup.worker_argv()
    assert command[:3] == ["/usr/bin/python3", "-c", "from twisted.scripts.twistd import run; run()"]
    assert command[3:] == ["--nodaemon", "--pidfile=", "--logger=sockdrawer.logs.worker_stdout", "--reactor=asyncio",
                           "sockdrawer", *argv]
    assert "--reactor=asyncio" not in WorkerSupervisor(settings, argv, {}).worker_argv()
    # SIGKILL comes after the whole drain, plus a margin
    slow = settings.replace(drain_delay=5.0, drain_window=20.0, shutdown_timeout=5.0)
    assert WorkerSupervisor(slow, argv, {}).monitor.killTime == 40
