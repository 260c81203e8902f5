"""
Running in production: Prometheus metrics, readiness, drain at SIGTERM, the
Redis reconnect schedule.  Real redis-server processes, a real twistd child
where the process boundary matters, Twisted's Clock where time does.
"""

from __future__ import annotations

import json
import selectors
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import pytest_twisted
from childnode import ChildNode
from conftest import RedisServer, wait_for, wait_subscribed
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from wsclient import connect

from sockdrawer.brokers.linkparts import Backoff


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def scrape(port: int, headers: dict[str, str] | None = None) -> dict[str, float]:
    """GET /metrics, parsed with prometheus_client's parser: sample name (with labels) -> value."""
    status, body = get(f"http://127.0.0.1:{port}/metrics", headers)
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "le")
            le = sample.labels.get("le")
            name = sample.name + (f"{{{labels}}}" if labels else "") + (f"[le={le}]" if le else "")
            samples[name] = sample.value
    return samples


@pytest_twisted.ensureDeferred
async def test_metrics_move_with_sockets_messages_and_redis(own_redis: RedisServer, run_service: Any) -> None:
    """A Prometheus scrape shows sockets, connections, messages, deliveries and bytes counting up, Redis going
    0 then 1 with a reconnect counted when it is killed and restarted, and the fan-out histograms filling."""
    svc = await run_service(redis=own_redis.url, redis_retry_max=0.5)
    await wait_subscribed(svc, own_redis)
    before = await deferToThread(scrape, svc.api_port)
    assert before["sockdrawer_sockets"] == 0 and before["sockdrawer_redis_connected"] == 1
    clients = [await connect(svc.ws_port, "/news") for _ in range(3)]
    for i in range(5):
        await deferToThread(own_redis.publish, "sock-drawer/news", f"m{i}")
    for c in clients:
        assert [await c.next_text() for _ in range(5)] == [f"m{i}" for i in range(5)]
    await svc.publish("from code", "news")
    for c in clients:
        await c.next_text()
    now = await deferToThread(scrape, svc.api_port)
    assert now["sockdrawer_sockets"] == 3 and now["sockdrawer_channels"] == 1
    assert now["sockdrawer_connections_total"] == before["sockdrawer_connections_total"] + 3
    assert now["sockdrawer_messages_total{source=redis}"] == 6  # the service's publish came back through Redis
    assert now["sockdrawer_messages_total{source=service}"] == 1
    assert now["sockdrawer_deliveries_total"] == 18
    assert now["sockdrawer_bytes_sent_total"] >= 18 * 4
    assert now["sockdrawer_fanout_latency_seconds_count"] >= 1
    assert now["sockdrawer_fanout_turn_seconds_count"] >= 1
    own_redis.stop()
    await wait_for(lambda: not svc.broker.is_connected())
    down = await deferToThread(scrape, svc.api_port)
    assert down["sockdrawer_redis_connected"] == 0
    own_redis.start(port=own_redis.port)
    await wait_subscribed(svc, own_redis)
    up = await deferToThread(scrape, svc.api_port)
    assert up["sockdrawer_redis_connected"] == 1
    assert up["sockdrawer_redis_reconnects_total"] == before["sockdrawer_redis_reconnects_total"] + 1
    assert not any("channel=" in name for name in up), "no per-channel labels"


@pytest_twisted.ensureDeferred
async def test_metrics_need_the_api_key_unless_public(run_service: Any) -> None:
    """With --api-key, /metrics needs it (401 without); with --metrics-public it does not."""
    svc = await run_service(api_key="k")
    status, _ = await deferToThread(get, f"http://127.0.0.1:{svc.api_port}/metrics")
    assert status == 401
    samples = await deferToThread(scrape, svc.api_port, {"Authorization": "Bearer k"})
    assert "sockdrawer_sockets" in samples
    public = await run_service(api_key="k", metrics_public=True)
    assert "sockdrawer_sockets" in await deferToThread(scrape, public.api_port)


@pytest_twisted.ensureDeferred
async def test_ready_follows_redis(own_redis: RedisServer, run_service: Any) -> None:
    """/ready is 200 with Redis up, 503 'broker down' when it stops, 200 again when it returns; /health stays 200."""
    svc = await run_service(redis=own_redis.url, redis_retry_max=0.5)
    await wait_subscribed(svc, own_redis)
    url = f"http://127.0.0.1:{svc.api_port}"
    assert (await deferToThread(get, url + "/ready"))[0] == 200
    own_redis.stop()
    await wait_for(lambda: not svc.broker.is_connected())
    status, body = await deferToThread(get, url + "/ready")
    assert status == 503 and json.loads(body)["reason"] == "broker down"
    assert (await deferToThread(get, url + "/health"))[0] == 200
    own_redis.start(port=own_redis.port)
    await wait_subscribed(svc, own_redis)
    assert (await deferToThread(get, url + "/ready"))[0] == 200


def _request(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_metrics_methods_and_headers(run_service: Any) -> None:
    """GET and HEAD /metrics answer in the Prometheus text format, never cached; other methods get 405 with
    Allow: GET, HEAD and a JSON error."""
    svc = await run_service()
    status, headers, body = await deferToThread(_request, svc.api_port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=")
    assert headers["cache-control"] == "no-store" and b"sockdrawer_sockets" in body
    status, headers, body = await deferToThread(_request, svc.api_port, "HEAD", "/metrics")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/plain")
    status, headers, body = await deferToThread(_request, svc.api_port, "POST", "/metrics")
    assert (status, headers["allow"], json.loads(body)) == (405, "GET, HEAD", {"error": "use GET"})
    assert headers["content-type"] == "application/json"


def test_ready_while_starting() -> None:
    """Before its port listens, a service is not ready ('starting')."""
    from sockdrawer.service import SockDrawerService

    svc = SockDrawerService(reactor=MemoryReactorClock())
    assert svc.ready() == (False, "starting")


def _open_sockets(port: int, count: int) -> list[socket.socket]:
    request = (b"GET /news HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(request)
        sockets.append(s)
    for s in sockets:
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101 "), head
        s.setblocking(False)
    return sockets


def test_sigterm_drains_1000_sockets_over_the_window(tmp_path: Any) -> None:
    """SIGTERM with 1,000 open sockets: /ready turns 503 at once and still answers 503 while the sockets are
    being closed, every socket gets 1012 'service restart', spread over --drain-window, and the process exits
    within the window plus --shutdown-timeout."""
    window, timeout, delay = 2.0, 2.0, 0.5
    args = ["--drain-window", str(window), "--shutdown-timeout", str(timeout), "--drain-delay", str(delay),
            "--max-connections-per-ip", "5000", "--max-pending-handshakes", "2000",
            "--max-pending-handshakes-per-ip", "1000"]  # 1,000 at once from one address
    with ChildNode(tmp_path, args) as node:
        sockets = _open_sockets(node.ws_port, 1000)
        node.wait_sockets(1000)
        assert get(f"http://127.0.0.1:{node.api_port}/ready")[0] == 200
        assert node.proc is not None
        node.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        status, body = get(f"http://127.0.0.1:{node.api_port}/ready")
        assert status == 503 and json.loads(body)["reason"] == "draining"
        selector = selectors.DefaultSelector()
        for s in sockets:
            selector.register(s, selectors.EVENT_READ)
        closed: dict[socket.socket, tuple[float, int, bytes]] = {}
        buffers: dict[socket.socket, bytes] = {}
        deadline = signalled + delay + window + timeout + 5
        asked_midway = None
        while len(closed) < len(sockets) and time.monotonic() < deadline:
            if asked_midway is None and len(closed) >= 300:  # the window is under way
                try:
                    asked_midway = get(f"http://127.0.0.1:{node.api_port}/ready")[0]
                except urllib.error.URLError:  # refused: the API port is closed
                    asked_midway = 0
            for key, _ in selector.select(timeout=0.5):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                buffers[s] = buffers.get(s, b"") + data
                frame = buffers[s]
                if len(frame) >= 4 and frame[0] == 0x88:
                    closed[s] = (time.monotonic() - signalled, int.from_bytes(frame[2:4], "big"),
                                 frame[4:2 + frame[1]])
                    selector.unregister(s)
                elif not data:
                    selector.unregister(s)
                    closed[s] = (time.monotonic() - signalled, 0, b"")
        node.wait(window + timeout + 5)
        exited = time.monotonic() - signalled
        for s in sockets:
            s.close()
    assert len(closed) == 1000
    assert asked_midway == 503, "the API stopped before the sockets were closed"
    codes = {code for _, code, _ in closed.values()}
    assert codes == {1012}, codes
    assert {reason for _, _, reason in closed.values()} == {b"service restart"}
    times = sorted(t for t, _, _ in closed.values())
    assert times[0] >= delay - 0.1, "closed before the drain delay was over"
    spread = times[-1] - times[0]
    assert window * 0.7 <= spread <= window + 1.0, spread
    first_half = sum(1 for t in times if t < times[0] + spread / 2)
    assert 350 <= first_half <= 650, first_half  # evenly spread, not all at once
    assert exited <= delay + window + timeout + 1.5, exited


# -- the Redis reconnect schedule ----------------------------------------------


def test_backoff_schedule() -> None:
    """The first retry is immediate, then 0.5 s doubling up to the maximum, jitter adding at most 25%, and the
    count starts over only on reset (a usable link)."""
    backoff = Backoff(initial=0.5, maximum=8.0, jitter=0.25, random=lambda: 0.0)
    assert [backoff(n) for n in range(1, 9)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    backoff.reset()
    assert backoff() == 0.0
    high = Backoff(initial=0.5, maximum=8.0, jitter=0.25, random=lambda: 0.999)
    delays = [high() for _ in range(7)]
    assert delays[1] == 0.5 * 1.24975 and delays[-1] == 8.0  # jitter never passes the maximum


class _Dropping(protocol.Protocol):
    """Accepts the TCP connection, then drops it at once: the link never becomes usable."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


def _recording(backoff: Backoff, delays: list[float]) -> None:
    """Record every delay ``backoff`` hands to ClientService (no jitter, small steps for a fast test)."""
    backoff.initial, backoff.maximum, backoff._random = 0.05, 0.4, lambda: 0.0

    class RecordingBackoff(Backoff):
        def __call__(self, attempt: int = 0) -> float:
            delay = super().__call__(attempt)
            delays.append(delay)
            return delay

    backoff.__class__ = RecordingBackoff


@pytest_twisted.ensureDeferred
async def test_reconnect_waits_grow_when_tcp_connects_but_the_link_drops(run_service: Any) -> None:
    """Against a server that accepts TCP and drops the link before it is usable, the waits between attempts
    grow from an immediate first retry (every successful TCP connect must not reset them)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import TCP4ServerEndpoint

    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        protocol.Factory.forProtocol(_Dropping))
    try:
        svc = await run_service(redis=f"redis://127.0.0.1:{port.getHost().port}/0", redis_ping_interval=0)
        delays: list[float] = []
        _recording(svc.broker._sub_backoff, delays)
        await wait_for(lambda: len(delays) >= 6, timeout=10)
        assert delays[:6] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4] or delays[:6] == [0.0, 0.05, 0.1, 0.2, 0.4, 0.4], delays
        assert not svc.broker.is_connected()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_wrong_password_backs_off(run_service: Any) -> None:
    """With a wrong Redis password, the waits between login attempts grow like any failure, and the password
    never reaches the log."""
    from twisted.logger import globalLogPublisher

    server = RedisServer()
    server.start()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        with server.client() as r:
            r.config_set("requirepass", "right-password")
        svc = await run_service(redis=f"redis://:wrong-password@127.0.0.1:{server.port}/0", redis_ping_interval=0)
        delays: list[float] = []
        _recording(svc.broker._sub_backoff, delays)
        await wait_for(lambda: len(delays) >= 5, timeout=10)
        assert delays[1:5] in ([0.1, 0.2, 0.4, 0.4], [0.05, 0.1, 0.2, 0.4]), delays
    finally:
        globalLogPublisher.removeObserver(events.append)
        server.stop()
    assert not any("wrong-password" in repr(e) for e in events)
