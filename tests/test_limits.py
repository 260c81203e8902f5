"""
Limits a single client cannot get around: frame rate, fragments, handshake
slots, per-address connections, old protocol versions, the API's timeouts
and connection cap, listener replies, log floods, blocking handlers.
Real sockets on 127.0.0.1 and the embedded broker, unless a Clock is needed.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest
import pytest_twisted
from childnode import ChildNode
from conftest import wait_for
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from wsclient import connect, connect_refused

from sockdrawer import Subscriber, on
from sockdrawer.core.listeners import ListenerRegistry
from sockdrawer.core.subscriber import SOCKET, Source


class _Capture:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __enter__(self) -> list[dict[str, Any]]:
        globalLogPublisher.addObserver(self.events.append)
        return self.events

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self.events.append)
        for e in self.events:
            if e.get("log_failure") is not None:
                e["log_failure"].cleanFailure()


def masked(opcode_byte: int, payload: bytes) -> bytes:
    """One client frame (masked with a zero mask), first byte given (FIN/RSV/opcode)."""
    assert len(payload) < 126
    return bytes((opcode_byte, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


class _Silent(protocol.Protocol):
    def connectionMade(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def silent_connection(port: int) -> _Silent:
    """A TCP connection that never sends a byte."""
    return await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(protocol.Factory.forProtocol(_Silent))


# -- frames from the client ------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_frame_flood_closes_with_1008(run_service: Any) -> None:
    """A socket sending frames faster than --max-frames-per-second beyond --frame-burst is closed with 1008 'rate
    limit'; its listener saw at most the burst, and another socket is unaffected."""
    from listeners import SEEN, Echo

    SEEN.clear()
    svc = await run_service(listeners=(Echo,), max_frames_per_second=10, frame_burst=20)
    bystander = await connect(svc.ws_port, "/news")
    client = await connect(svc.ws_port, "/echo")
    await wait_for(lambda: svc.factory.sockets(b"echo") == 1)
    client.send_raw(masked(0x81, b"x") * 100)
    code, reason = await client.wait_closed()
    assert (code, reason) == (1008, "rate limit")
    assert 0 < len([s for s in SEEN if s[0] == "Echo"]) <= 20
    await svc.publish("still here", "news")
    assert await bystander.next_text() == "still here"


@pytest_twisted.ensureDeferred
async def test_frame_burst_is_exact_and_counted(run_service: Any) -> None:
    """With --frame-burst 3 and next to no refill, exactly 3 frames reach the listener and the 4th closes the socket
    with 1008; frames after it are not handed on; the counters say 4 frames received and 1 socket rate-limited,
    per socket, and each closed socket is one log line (which the admin page lists among its warnings)."""
    from listeners import SEEN, Echo
    from twisted.logger import globalLogPublisher

    SEEN.clear()
    svc = await run_service(listeners=(Echo,), max_frames_per_second=0.001, frame_burst=3)
    clients = [await connect(svc.ws_port, "/echo") for _ in range(2)]
    await wait_for(lambda: svc.factory.sockets(b"echo") == 2)
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        for client in clients:
            client.send_raw(masked(0x81, b"x") * 6)
            code, reason = await client.wait_closed()
            assert (code, reason) == (1008, "rate limit")
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert len([s for s in SEEN if s[0] == "Echo"]) == 2 * 3
    assert (svc.factory.frames_received, svc.factory.rate_limited) == (2 * 4, 2)
    lines = [e for e in logged if "frame rate limit" in e.get("log_format", "")]
    assert len(lines) == 2 and svc.admin is not None
    assert sum("over the frame rate limit" in w["text"] for w in svc.admin.warnings) == 2


@pytest_twisted.ensureDeferred
async def test_steady_rate_under_the_limit_is_fine(run_service: Any) -> None:
    """A client sending steadily below the rate is never cut off (the bucket refills)."""
    from listeners import Echo

    clock = Clock()
    svc = await run_service(listeners=(Echo,), max_frames_per_second=10, frame_burst=2)
    svc.factory.clock = clock  # the bucket's time only; sockets stay real
    client = await connect(svc.ws_port, "/echo")
    for i in range(30):
        client.send_text(f"m{i}")
        assert await client.next_text() == f"m{i}"
        clock.advance(0.2)  # 5 frames a second
    assert client.ws.state.name == "OPEN"


@pytest_twisted.ensureDeferred
async def test_empty_fragment_flood_closes_with_1009(run_service: Any) -> None:
    """A message of endless empty continuation frames is closed with 1009 at --max-fragments frames."""
    svc = await run_service(max_fragments=50, max_frames_per_second=1e9, frame_burst=10**9)
    client = await connect(svc.ws_port, "/news")
    client.send_raw(masked(0x01, b"") + masked(0x00, b"") * 200)
    code, reason = await client.wait_closed()
    assert (code, reason) == (1009, "too many fragments")


@pytest_twisted.ensureDeferred
async def test_max_fragments_is_the_most_frames_a_message_may_have(run_service: Any) -> None:
    """With --max-fragments 3, a message of exactly 3 frames arrives (twice in a row: the count starts over per
    message); one of 4 frames closes the socket with 1009."""
    from listeners import Echo

    svc = await run_service(listeners=(Echo,), max_fragments=3, max_frames_per_second=1e9, frame_burst=10**9)
    client = await connect(svc.ws_port, "/echo")
    three = masked(0x01, b"a") + masked(0x00, b"b") + masked(0x80, b"c")
    client.send_raw(three + three)
    assert [await client.next_text(), await client.next_text()] == ["abc", "abc"]
    client.send_raw(masked(0x01, b"a") + masked(0x00, b"b") + masked(0x00, b"c") + masked(0x80, b"d"))
    code, reason = await client.wait_closed()
    assert (code, reason) == (1009, "too many fragments")


def _flood(port: int, frames: int) -> int:
    """Open a socket, send one message of ``frames`` empty fragments, return the server's close code."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /f HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  + masked(0x01, b"") + masked(0x00, b"") * frames)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 4:
            part = s.recv(65536)
            assert part, f"closed without a close frame: {data!r}"
            data += part
        body = data.split(b"\r\n\r\n", 1)[1]
        assert body[:1] == b"\x88", body[:20]
        return int.from_bytes(body[2:4], "big")


@pytest.mark.parametrize(("args", "code"), [([], 1008), (["--frame-burst", "100000000"], 1009)])
def test_fragment_floods_end_in_a_close_with_flat_memory(tmp_path: Any, args: list[str], code: int) -> None:
    """Against a twistd child: 100 sockets each sending a message of 5,000 empty fragments are closed (1008 by the
    rate limit with the defaults, 1009 by --max-fragments without it), and the server's memory grows by less than
    5 MB (unbounded, it grew 7.7 MB per million fragments)."""
    def rss_kb(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    with ChildNode(tmp_path, args) as node:
        assert node.proc is not None
        _flood(node.ws_port, 5000)  # warm up: first-connection allocations are not the flood's
        before = rss_kb(node.proc.pid)
        codes = {_flood(node.ws_port, 5000) for _ in range(100)}
        after = rss_kb(node.proc.pid)
    assert codes == {code}
    assert after - before < 5 * 1024, (before, after)


# -- handshake slots -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_silent_connections_do_not_take_socket_slots(run_service: Any) -> None:
    """Connections that never finish their handshake do not count against --max-connections: with 20 silent ones,
    real clients still open up to the limit, and one more gets 503."""
    svc = await run_service(max_connections=3)
    silent = [await silent_connection(svc.ws_port) for _ in range(20)]
    await wait_for(lambda: svc.factory.pending == 20)
    clients = [await connect(svc.ws_port, "/news") for _ in range(3)]
    refusal = await connect_refused(svc.ws_port, "/news")
    assert refusal.status == 503
    for s in silent:
        s.transport.loseConnection()
    for c in clients:
        c.close()


@pytest_twisted.ensureDeferred
async def test_pending_handshakes_are_bounded(run_service: Any) -> None:
    """Past --max-pending-handshakes, a new connection still in its handshake is dropped at once."""
    svc = await run_service(max_pending_handshakes=5)
    silent = [await silent_connection(svc.ws_port) for _ in range(5)]
    extra = await silent_connection(svc.ws_port)
    await extra.lost.addTimeout(5, reactor)
    for s in silent:
        s.transport.loseConnection()
    await wait_for(lambda: svc.factory.pending == 0)
    client = await connect(svc.ws_port, "/news")
    client.close()


@pytest_twisted.ensureDeferred
async def test_connections_per_address_are_bounded(run_service: Any) -> None:
    """Past --max-connections-per-ip connections from one address, the next handshake gets 429."""
    svc = await run_service(max_connections_per_ip=2)
    first = [await connect(svc.ws_port, "/news") for _ in range(2)]
    refusal = await connect_refused(svc.ws_port, "/news")
    assert refusal.status == 429
    first[0].close()
    await first[0].wait_closed()
    await wait_for(lambda: svc.factory.per_ip.get("127.0.0.1") == 1)
    again = await connect(svc.ws_port, "/news")
    again.close()


@pytest_twisted.ensureDeferred
async def test_forwarded_address_counts_with_trusted_proxies(run_service: Any) -> None:
    """With --trust-x-forwarded-for, the per-address limit counts the forwarded client address, not the proxy's."""
    svc = await run_service(max_connections_per_ip=1, trust_x_forwarded_for=1)
    a = await connect(svc.ws_port, "/news", extra_headers=[("X-Forwarded-For", "203.0.113.1")])
    b = await connect(svc.ws_port, "/news", extra_headers=[("X-Forwarded-For", "203.0.113.2")])
    refusal = await connect_refused(svc.ws_port, "/news", extra_headers=[("X-Forwarded-For", "203.0.113.1")])
    assert refusal.status == 429
    a.close()
    b.close()


def _raw_head(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


@pytest_twisted.ensureDeferred
async def test_old_protocol_versions_are_refused(run_service: Any) -> None:
    """A handshake with Sec-WebSocket-Version 8 (whose origin header differs) is refused with 426 and
    Sec-WebSocket-Version: 13, so it cannot skip the origin check."""
    svc = await run_service(allowed_origins=("https://app.example:443",))
    request = (b"GET /news HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n"
               b"Origin: https://evil.example\r\n\r\n")
    head = await deferToThread(_raw_head, svc.ws_port, request)
    assert head.startswith(b"HTTP/1.1 426 "), head
    assert b"Sec-WebSocket-Version: 13" in head


# -- tokens are never logged ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tokens_never_reach_any_log_event(run_service: Any) -> None:
    """With Autobahn's debug logging on, no log event carries the token (query string or Authorization header):
    it is taken out of the request before Autobahn parses it."""
    import txaio

    from sockdrawer import make_token

    secret = "k" * 40
    svc = await run_service(auth_secret=secret)
    tok = make_token(secret, channels=["news"], ttl=60)
    txaio.set_global_log_level("debug")
    try:
        with _Capture() as events:
            a = await connect(svc.ws_port, f"/news?token={tok}")
            b = await connect(svc.ws_port, "/news", extra_headers=[("Authorization", f"Bearer {tok}")])
            refusal = await connect_refused(svc.ws_port, "/news?token=" + tok[:-3] + "abc")
    finally:
        txaio.set_global_log_level("info")
    assert refusal.status == 401
    assert events, "no events captured"
    from twisted.logger import formatEvent

    for event in events:
        assert tok not in formatEvent(event) and tok not in repr(event), event
    a.close()
    b.close()


# -- API -----------------------------------------------------------------------


def _api(port: int, request: bytes, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while read:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


@pytest_twisted.ensureDeferred
async def test_api_bearer_scheme_is_case_insensitive(run_service: Any) -> None:
    """'bearer KEY' and 'BEARER KEY' are accepted like 'Bearer KEY'; a wrong key still gets 401."""
    svc = await run_service(api_key="the-key")
    for header, status in ((b"bearer the-key", b"200"), (b"BEARER the-key", b"200"), (b"Bearer wrong", b"401")):
        request = (b"POST /publish/news HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: " + header
                   + b"\r\nContent-Length: 2\r\n\r\nhi")
        response = await deferToThread(_api, svc.api_port, request)
        assert response.split(b" ")[1] == status, (header, response)


@pytest_twisted.ensureDeferred
async def test_api_body_must_arrive_in_time(run_service: Any) -> None:
    """A request whose body dribbles in is answered 408 once --api-timeout has passed since its first line."""
    svc = await run_service(api_timeout=1)

    def dribble() -> tuple[bytes, float]:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", svc.api_port), timeout=10) as s:
            s.sendall(b"POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            data = b""
            s.settimeout(0.3)
            for _ in range(30):
                try:
                    s.sendall(b"x")
                except OSError:
                    break
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    break
                data += chunk
            return data, time.monotonic() - started

    response, took = await deferToThread(dribble)
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert took < 5


@pytest_twisted.ensureDeferred
async def test_api_connections_are_bounded(run_service: Any) -> None:
    """At --api-max-connections open API connections, a new one takes the place of the oldest that has no
    whole request in hand (these send nothing): that one is closed, the others stay, and /health answers."""
    svc = await run_service(api_max_connections=2)
    held = [await silent_connection(svc.api_port) for _ in range(2)]
    response = await deferToThread(_api, svc.api_port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 ")
    await held[0].lost.addTimeout(5, reactor)  # the oldest gave way
    assert held[1].transport.connected
    held[1].transport.loseConnection()
    await held[1].lost


# -- listener replies, failures, blocking --------------------------------------


class BigReply(Subscriber):
    @on("big")
    def reply(self, message: Any, source: Source) -> Any:
        return "y" * int(message) if source.from_socket else None


@pytest_twisted.ensureDeferred
async def test_listener_replies_are_bounded_by_max_reply_size(run_service: Any) -> None:
    """A reply over --max-message-size but within --max-reply-size is sent; one over --max-reply-size is logged
    with its size and not sent, and the socket stays open."""
    svc = await run_service(listeners=(BigReply,), max_message_size=1024, max_reply_size=200_000)
    client = await connect(svc.ws_port, "/big")
    client.send_text("100000")
    assert await client.next_text() == "y" * 100_000
    client.send_text("200000")  # exactly the limit: sent
    client.send_text("1")
    assert await client.next_text() == "y" * 200_000
    assert await client.next_text() == "y"
    with _Capture() as events:
        client.send_text("300000")
        client.send_text("10")
        assert await client.next_text() == "y" * 10
    assert any("300000 bytes" in str(e.get("log_format", "")).format(**{k: v for k, v in e.items()
                                                                       if isinstance(k, str)})
               for e in events if e.get("size") == 300000)
    assert not [e for e in events if e.get("log_failure") is not None]


class Exploding(Subscriber):
    @on("boom")
    def boom(self, message: Any) -> Any:
        raise RuntimeError("boom")


def test_handler_failures_log_one_traceback_then_counts() -> None:
    """A handler that raises on every frame logs its traceback once, then one count per minute."""
    clock = Clock()
    registry = ListenerRegistry([Exploding], clock=clock)
    with _Capture() as events:
        for _ in range(50):
            registry.dispatch(Source(SOCKET, "boom", "peer"), "x")
        clock.advance(60)
        registry.dispatch(Source(SOCKET, "boom", "peer"), "x")
        clock.advance(60)
    tracebacks = [e for e in events if e.get("log_failure") is not None]
    counts = [e for e in events if e.get("count") is not None]
    assert len(tracebacks) == 1
    assert [e["count"] for e in counts] == [49, 1]


class Sleepy(Subscriber):
    @on("slow")
    def slow(self, message: Any) -> Any:
        time.sleep(0.15)


def test_blocking_handlers_are_named_in_a_warning() -> None:
    """A handler call that holds the reactor over 100 ms is logged as a warning naming the handler."""
    registry = ListenerRegistry([Sleepy], clock=Clock())
    with _Capture() as events:
        registry.dispatch(Source(SOCKET, "slow", "peer"), "x")
    warnings = [e for e in events if "held the reactor" in e.get("log_format", "")]
    assert len(warnings) == 1 and warnings[0]["handler"] == "Sleepy.slow" and warnings[0]["ms"] >= 100




def test_api_connection_limit_counts_refusals() -> None:
    """At --api-max-connections, while every connection has a whole request in hand (its answer not finished),
    each new connection is refused, and counted; once one is idle again, a new one takes its place."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport
    from twisted.web import resource, server

    from sockdrawer.http.api import ConnectionLimit

    class Slow(resource.Resource):
        isLeaf = True
        requests: list[Any] = []

        def render_GET(self, request: Any) -> Any:
            self.requests.append(request)
            return server.NOT_DONE_YET

    limit = ConnectionLimit(server.Site(Slow()), 1)
    addr = IPv4Address("TCP", "127.0.0.1", 1)
    first = limit.buildProtocol(addr)
    transport = StringTransport()
    first.makeConnection(transport)
    first.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert limit.buildProtocol(addr) is None and limit.buildProtocol(addr) is None
    assert limit.refused == 2 and limit.evicted == 0
    Slow.requests[0].finish()  # answered: idle, so it gives way to the next
    assert limit.buildProtocol(addr) is not None
    assert limit.evicted == 1 and transport.disconnecting


def test_api_request_deadline_runs_on_the_given_clock() -> None:
    """The --api-timeout deadline of a request is scheduled on the site's clock (a test Clock here)."""
    from twisted.internet.task import Clock
    from twisted.web.resource import Resource
    from twisted.web.test.requesthelper import DummyChannel

    from sockdrawer.http.api import ApiSite

    clock = Clock()
    site = ApiSite(Resource(), max_body=10, timeout=7, clock=clock)
    channel = DummyChannel()
    site.requestFactory(channel)
    assert [c.getTime() for c in clock.getDelayedCalls()] == [7]
    clock.advance(7)
    assert channel.transport.written.getvalue().startswith(b"HTTP/1.1 408 ")
