"""
Every timer and timeout with a short value, against real sockets and a real
redis-server; close codes read from the peer's own bytes; the defaults as
one table; the origin and X-Forwarded-For policies.  Each test here fails
when the behaviour its docstring names is switched off or changed.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from conftest import RedisServer, wait_for, wait_subscribed
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from wsclient import connect, connect_refused

from sockdrawer import Source, Subscriber, on
from sockdrawer.config import OPTIONS, Settings

UPGRADE = (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n")


class Peer(protocol.Protocol):
    """
    Sends a raw handshake and answers nothing (no pongs, no close replies).
    It parses the server's frames as they come, in linear time, keeping the
    opcodes and every close frame's payload (a slow-reader test reads MBs).
    """

    def __init__(self, path: bytes = b"/news", headers: bytes = b"", read: bool = True) -> None:
        self.path, self.headers, self.read = path, headers, read
        self.head = b""
        self._rest = bytearray()
        self._open = False
        self.opcodes: list[int] = []
        self.closes: list[bytes] = []
        self.lost: defer.Deferred[float] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(UPGRADE % (self.path, self.headers))
        if not self.read:
            self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self._rest += data
        if not self._open:
            end = self._rest.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head = bytes(self._rest[:end])
            del self._rest[:end + 4]
            self._open = True
        rest, start = self._rest, 0
        while len(rest) - start >= 2:
            opcode, length, header = rest[start] & 0x0F, rest[start + 1] & 0x7F, 2
            if length == 126:
                if len(rest) - start < 4:
                    break
                length, header = int.from_bytes(rest[start + 2:start + 4], "big"), 4
            elif length == 127:
                if len(rest) - start < 10:
                    break
                length, header = int.from_bytes(rest[start + 2:start + 10], "big"), 10
            if len(rest) - start < header + length:
                break
            self.opcodes.append(opcode)
            if opcode == 8:
                self.closes.append(bytes(rest[start + header:start + header + length]))
            start += header + length
        del rest[:start]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(reactor.seconds())


def close_code(peer: Peer) -> int | None:
    """The code of the first close frame the peer received."""
    return int.from_bytes(peer.closes[0][:2], "big") if peer.closes else None


async def open_peer(port: int, peer: Peer) -> Peer:
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(protocol.Factory.forProtocol(lambda: peer))
    return peer


# -- close codes from the peer's bytes -----------------------------------------


@pytest_twisted.ensureDeferred
async def test_slow_reader_gets_1008_on_the_wire(run_service: Any) -> None:
    """A socket that stops reading is cut off with close code 1008, which it finds at the end of its stream
    once it reads again."""
    svc = await run_service(send_buffer=128 * 1024, slow_timeout=30, close_handshake_timeout=10)
    peer = await open_peer(svc.ws_port, Peer(read=False))
    await wait_for(lambda: svc.factory.sockets(b"news") == 1)
    sent = 0
    while svc.factory.slow_cut_offs == 0:
        assert sent < 3000, "never cut off"
        svc.hub.deliver(b"news", b"x" * 16384)
        sent += 1
        await task.deferLater(reactor, 0, lambda: None)
    peer.transport.resumeProducing()
    await wait_for(lambda: close_code(peer) is not None, timeout=10)
    assert close_code(peer) == 1008
    assert [c[2:] for c in peer.closes] == [b"slow reader"]


@pytest_twisted.ensureDeferred
async def test_slow_readers_dropped_at_once_without_a_close_handshake_timeout(run_service: Any) -> None:
    """With --close-handshake-timeout 0 a slow reader cannot be waited for: each one cut off is dropped at once
    (its backlog discarded), and every cut-off is counted."""
    svc = await run_service(send_buffer=128 * 1024, slow_timeout=30, close_handshake_timeout=0)
    for _ in range(2):
        await open_peer(svc.ws_port, Peer(read=False))
    await wait_for(lambda: svc.factory.sockets(b"news") == 2)
    sent = 0
    while svc.factory.slow_cut_offs < 2:
        assert sent < 3000, "never cut off"
        svc.hub.deliver(b"news", b"x" * 16384)
        sent += 1
        await task.deferLater(reactor, 0, lambda: None)
    await wait_for(lambda: not svc.factory.connections, timeout=2)  # the peers, not reading, cannot tell yet
    assert svc.factory.slow_cut_offs == 2


@pytest_twisted.ensureDeferred
async def test_shutdown_drops_peers_that_never_answer_the_close(run_service: Any) -> None:
    """At shutdown a peer that never answers the close frame gets 1012 on the wire and is dropped after
    --shutdown-timeout, so stopping is bounded."""
    svc = await run_service(shutdown_timeout=0.5, close_handshake_timeout=60)
    peer = await open_peer(svc.ws_port, Peer())
    await wait_for(lambda: svc.factory.sockets(b"news") == 1)
    started = reactor.seconds()
    await svc.stopService()
    took = reactor.seconds() - started
    assert 0.4 <= took < 3, took
    assert not svc.factory.connections, "a socket that never answered was left open"
    assert close_code(peer) == 1012
    lost_at = await peer.lost.addTimeout(5, reactor)
    assert lost_at - started < 3, lost_at - started


# -- handshake, close and ping timers ------------------------------------------


@pytest_twisted.ensureDeferred
async def test_open_handshake_timeout_drops_silent_connections(run_service: Any) -> None:
    """A connection that never sends its handshake is dropped after --open-handshake-timeout, not before."""
    svc = await run_service(open_handshake_timeout=0.5)
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", svc.ws_port).connect(
        protocol.Factory.forProtocol(_Silent))
    opened = reactor.seconds()
    lost_at = await client.lost.addTimeout(5, reactor)
    assert 0.45 <= lost_at - opened < 2.0, lost_at - opened


class _Silent(protocol.Protocol):
    def connectionMade(self) -> None:
        self.lost: defer.Deferred[float] = defer.Deferred()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(reactor.seconds())


@pytest_twisted.ensureDeferred
async def test_close_handshake_timeout_drops_peers_that_never_answer(run_service: Any) -> None:
    """After the server sends a close frame (here: rate limit), a peer that never answers is dropped after
    --close-handshake-timeout, and not before the close frame was on the wire."""
    svc = await run_service(close_handshake_timeout=0.5, frame_burst=1, max_frames_per_second=0.001)
    peer = await open_peer(svc.ws_port, Peer())
    await wait_for(lambda: svc.factory.sockets(b"news") == 1)
    frame = bytes((0x81, 0x80 | 1)) + b"\x00\x00\x00\x00" + b"x"
    peer.transport.write(frame * 2)
    sent = reactor.seconds()
    lost_at = await peer.lost.addTimeout(5, reactor)
    assert close_code(peer) == 1008
    assert 0.45 <= lost_at - sent < 2.0, lost_at - sent


@pytest_twisted.ensureDeferred
async def test_ping_timeout_drops_peers_that_never_pong(run_service: Any) -> None:
    """With --auto-ping-interval and --auto-ping-timeout, a peer that never answers pings is dropped, while a
    real client (which answers them) stays open over the same time."""
    svc = await run_service(auto_ping_interval=0.3, auto_ping_timeout=0.3)
    mute = await open_peer(svc.ws_port, Peer())
    real = await connect(svc.ws_port, "/news")
    opened = reactor.seconds()
    lost_at = await mute.lost.addTimeout(5, reactor)
    assert 0.5 <= lost_at - opened < 2.5, lost_at - opened
    assert 9 in mute.opcodes, "no ping was sent"
    assert real.pings_received >= 1
    assert real.ws.state.name == "OPEN"


# -- Redis liveness and timeouts -----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_liveness_pings_detect_a_frozen_server(own_redis: RedisServer, run_service: Any) -> None:
    """When Redis stops answering (SIGSTOP) without closing the connection, the liveness PING times out after
    --redis-ping-interval + --redis-timeout, the link is marked down, and it comes back after SIGCONT."""
    svc = await run_service(redis=own_redis.url, redis_ping_interval=0.3, redis_timeout=0.5, redis_retry_max=0.3)
    await wait_subscribed(svc, own_redis)
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    stopped = reactor.seconds()
    try:
        await wait_for(lambda: not svc.broker.is_connected(), timeout=5)
        assert reactor.seconds() - stopped < 2.5
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)
    await wait_subscribed(svc, own_redis)


@pytest_twisted.ensureDeferred
async def test_publish_times_out_when_redis_does_not_answer(own_redis: RedisServer, run_service: Any) -> None:
    """A publish to a Redis that does not answer fails after --redis-timeout instead of hanging."""
    svc = await run_service(redis=own_redis.url, redis_ping_interval=0, redis_timeout=0.5)
    await wait_subscribed(svc, own_redis)
    await svc.publish("warm", "news")  # the publishing connection is up
    assert own_redis.proc is not None
    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        started = reactor.seconds()
        with pytest.raises((defer.TimeoutError, txredisapi.TimeoutError)):
            await svc.publish("lost", "news")
        assert 0.4 <= reactor.seconds() - started < 2.0
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)


@pytest_twisted.ensureDeferred
async def test_publish_times_out_while_no_connection_is_ready(run_service: Any) -> None:
    """A publish while the publishing connection never becomes usable (here: a wrong password, so AUTH fails and
    the connection drops) fails after --redis-timeout too: txredisapi's reply timeout bounds the reply to a
    command sent, not the wait for a connection that is ready to send it."""
    server = RedisServer()
    server.start()
    try:
        with server.client() as r:
            r.config_set("requirepass", "right-password")
        svc = await run_service(redis=f"redis://:wrong-password@127.0.0.1:{server.port}/0", redis_timeout=0.5,
                                redis_ping_interval=0)
        started = reactor.seconds()
        with pytest.raises(defer.TimeoutError):
            await svc.publish("lost", "news").addTimeout(5, reactor)  # the test's own bound, should it hang
        assert 0.4 <= reactor.seconds() - started < 2.0, reactor.seconds() - started
    finally:
        server.stop()


@pytest_twisted.ensureDeferred
async def test_redis_retry_max_caps_the_waits(run_service: Any) -> None:
    """--redis-retry-max is the longest wait between reconnection attempts."""
    port = _free_closed_port()
    svc = await run_service(redis=f"redis://127.0.0.1:{port}/0", redis_retry_max=0.3, redis_ping_interval=0)
    backoff = svc.broker._sub_backoff
    assert backoff.maximum == 0.3
    assert max(backoff() for _ in range(20)) == 0.3


def _free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- origins and forwarded addresses -------------------------------------------


@pytest_twisted.ensureDeferred
async def test_null_origin_refused_under_an_allow_list(run_service: Any) -> None:
    """'Origin: null' (file pages, sandboxed frames) is refused with 403 when --allowed-origin is set, and an
    allowed origin passes."""
    svc = await run_service(allowed_origins=("https://app.example:443",))
    refusal = await connect_refused(svc.ws_port, "/news", origin="null")
    assert refusal.status == 403
    ok = await connect(svc.ws_port, "/news", origin="https://app.example")
    ok.close()


class Who(Subscriber):
    @on("who")
    def who(self, message: Any, source: Source) -> Any:
        return str(source.peer) if source.from_socket else None


@pytest.mark.parametrize(("trusted", "expected"), [(0, "tcp4:127.0.0.1:"), (1, "198.51.100.2"),
                                                   (2, "203.0.113.1")])
@pytest_twisted.ensureDeferred
async def test_x_forwarded_for_with_trusted_proxies(run_service: Any, trusted: int, expected: str) -> None:
    """With 0 trusted proxies the peer is the TCP address; with 1 or 2, the address that many hops back in
    X-Forwarded-For."""
    svc = await run_service(listeners=(Who,), trust_x_forwarded_for=trusted)
    client = await connect(svc.ws_port, "/who",
                           extra_headers=[("X-Forwarded-For", "203.0.113.1, 198.51.100.2")])
    client.send_text("?")
    peer = await client.next_text()
    assert peer.startswith(expected) if trusted == 0 else peer == expected, peer


# -- the defaults, as documented ------------------------------------------------

#: the documented defaults (docs/configuration.rst is generated from the same table; this is the contract)
DOCUMENTED_DEFAULTS = {
    "port": "tcp:8020", "redis": None, "name": "sock-drawer", "api": "tcp:8021:interface=127.0.0.1",
    "max_message_size": 65536, "max_publish_size": 1048576, "max_reply_size": 1048576,
    "max_channel_length": 256, "max_handshake_size": 16384, "max_connections": 50000, "backlog": 1024,
    "open_handshake_timeout": 5.0, "close_handshake_timeout": 1.0, "auto_ping_interval": 25.0,
    "auto_ping_timeout": 10.0, "send_buffer": 1048576, "slow_timeout": 10.0, "allowed_origins": ("*",),
    "trust_x_forwarded_for": 0, "compression": False, "compression_threshold": 64, "redis_timeout": 5.0,
    "redis_ping_interval": 30.0, "redis_retry_max": 30.0, "shutdown_timeout": 5.0, "drain_delay": 0.0,
    "drain_window": 0.0, "drain_close_code": 1012, "metrics_public": False, "log_format": "text",
    "auth_leeway": 30.0, "max_frames_per_second": 100.0, "frame_burst": 200, "max_fragments": 1000,
    "max_pending_handshakes": 1000, "max_connections_per_ip": 1000, "api_timeout": 10.0,
    "api_max_connections": 100, "history_size": 0, "history_ttl": 300.0, "max_subscriptions": 100,
    "workers": 1, "subscribe": "pattern", "presence_timeout": 30.0, "no_gc_freeze": False,
    "proxy_timeout": 5.0, "proxy_max_concurrent": 100, "webhook_timeout": 10.0, "webhook_queue_max": 100_000,
    "proxy_header": ("Cookie", "Authorization"),
    "max_connections_per_user": 0,
    "max_pending_handshakes_per_ip": 250, "max_subscriptions_per_ip": 10_000, "max_presence_joins_per_second": 5.0,
    "presence_join_burst": 20,
}


def test_defaults_match_the_documented_table() -> None:
    """Every default in the option table is the documented one (a changed default must change this table and
    the docs together)."""
    defaults = Settings()
    for name, value in DOCUMENTED_DEFAULTS.items():
        assert getattr(defaults, name) == value, name
    documented_or_unset = set(DOCUMENTED_DEFAULTS) | {s.field for s in OPTIONS if s.default in (None, ())}
    assert {s.field for s in OPTIONS} <= documented_or_unset


def test_defaults_reach_autobahn() -> None:
    """The timing defaults are what each new connection actually uses."""
    from sockdrawer.core.hub import MemoryChannelHub
    from sockdrawer.transports.websocket.factory import SockDrawerServerFactory

    proto = SockDrawerServerFactory(MemoryChannelHub(), clock=reactor).protocol
    assert (proto.autoPingInterval, proto.autoPingTimeout) == (25.0, 10.0)
    assert (proto.openHandshakeTimeout, proto.closeHandshakeTimeout) == (5.0, 1.0)
    assert (proto.maxFramePayloadSize, proto.maxMessagePayloadSize) == (65536, 65536)



def test_websocket_options_default_to_the_option_table() -> None:
    """The WebSocket transport's own options object has the option table's defaults, name for name (the
    transport never reads Settings; the node builds its options from them)."""
    from sockdrawer.transports.websocket.options import WebSocketOptions

    defaults, options = Settings(), WebSocketOptions()
    for name in WebSocketOptions.names():
        assert getattr(options, name) == getattr(defaults, name), name
