"""
The WebSocket server's edges: bad input, limits, slow readers, shutdown.
Real sockets on 127.0.0.1 and the embedded broker.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest_twisted
from conftest import wait_for
from twisted.internet import protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.threads import deferToThread
from websockets.frames import Opcode
from wsclient import RawClient, connect, connect_refused


def raw_request(port: int, request: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes (blocking; run in a thread)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


UPGRADE = (
    b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
)


@pytest_twisted.ensureDeferred
async def test_handshake_response_is_minimal(run_service: Any) -> None:
    """The 101 response carries no Server header (no version disclosure)."""
    svc = await run_service()
    response = await deferToThread(raw_request_first, svc.ws_port, UPGRADE % (b"/news", b""))
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nserver:" not in response.lower()


def raw_request_first(port: int, request: bytes) -> bytes:
    """Send raw bytes and return the first answer (for connections the server keeps open)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        return s.recv(65536)


@pytest_twisted.ensureDeferred
async def test_no_status_page_and_no_open_redirect(run_service: Any) -> None:
    """A plain GET gets 426 Upgrade Required, never Autobahn's status page or a redirect."""
    svc = await run_service()
    for path in (b"/", b"/?redirect=https://evil.example/"):
        response = await deferToThread(
            raw_request, svc.ws_port, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % path)
        assert response.startswith(b"HTTP/1.1 426"), response[:80]
        assert b"evil.example" not in response and b"Location" not in response


@pytest_twisted.ensureDeferred
async def test_a_refused_request_is_one_log_line(run_service: Any) -> None:
    """A plain GET on the WebSocket port is logged once: sockdrawer's line with the status it got and why,
    in the namespace the docs quote, and not Autobahn's two lines about failing and dropping it."""
    from twisted.logger import formatEvent, globalLogPublisher

    svc = await run_service()
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        response = await deferToThread(raw_request, svc.ws_port, b"GET /news HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await wait_for(lambda: any("refused a WebSocket" in e.get("log_format", "") for e in events))
        ok = await connect(svc.ws_port, "/news")  # a later turn: anything logged for the GET is in
        assert ok.ws.state.name == "OPEN"
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert response.startswith(b"HTTP/1.1 426")
    about = [e for e in events if "peer" in e or "refused" in e.get("log_format", "")]
    assert [(e["log_namespace"], formatEvent(e).split(": ", 1)[1]) for e in about] == [
        ("sockdrawer.websocket.SockDrawerServerProtocol", "426 HTTP Upgrade header missing")]
    assert not [e for e in events if str(e.get("log_namespace", "")).startswith("autobahn")]


@pytest_twisted.ensureDeferred
async def test_oversized_handshake_gets_431(run_service: Any) -> None:
    """A handshake request over --max-handshake-size gets HTTP 431 and is closed."""
    svc = await run_service(max_handshake_size=2048)
    padding = b"X-Pad: " + b"a" * 4000 + b"\r\n"
    response = await deferToThread(raw_request, svc.ws_port, UPGRADE % (b"/news", padding))
    assert response.startswith(b"HTTP/1.1 431")
    ok = await connect(svc.ws_port, "/news")
    assert ok.ws.state.name == "OPEN"


@pytest_twisted.ensureDeferred
async def test_oversized_message_closes_1009(run_service: Any) -> None:
    """A message over --max-message-size closes only that socket, with 1009."""
    svc = await run_service(max_message_size=1000, listeners=("listeners:Echo",))
    big = await connect(svc.ws_port, "/echo")
    bystander = await connect(svc.ws_port, "/echo")
    big.send_text("x" * 1001)
    code, _ = await big.wait_closed()
    assert code == 1009
    bystander.send_text("x" * 1000)
    assert await bystander.next_text() == "x" * 1000


@pytest_twisted.ensureDeferred
async def test_invalid_utf8_closes_1007(run_service: Any) -> None:
    """A text frame with invalid UTF-8 closes only that socket, with 1007."""
    svc = await run_service(listeners=("listeners:Echo",))
    bad = await connect(svc.ws_port, "/echo")
    other = await connect(svc.ws_port, "/echo")
    # a masked text frame whose payload is not UTF-8
    payload = b"\xff\xfe"
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    bad.send_raw(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    code, _ = await bad.wait_closed()
    assert code == 1007
    other.send_text("fine")
    assert await other.next_text() == "fine"


@pytest_twisted.ensureDeferred
async def test_protocol_error_closes_1002(run_service: Any) -> None:
    """An unmasked client frame (a protocol violation) closes that socket with 1002."""
    svc = await run_service()
    bad = await connect(svc.ws_port, "/news")
    other = await connect(svc.ws_port, "/news")
    bad.send_raw(b"\x81\x02hi")  # unmasked: clients must mask
    code, _ = await bad.wait_closed()
    assert code == 1002
    await svc.publish("still up", "news")
    assert await other.next_text() == "still up"


@pytest_twisted.ensureDeferred
async def test_allowed_origins(run_service: Any) -> None:
    """With --allowed-origin set, other browser origins get HTTP 403; listed ones connect."""
    svc = await run_service(allowed_origins=("https://app.example:443",))
    refused = await connect_refused(svc.ws_port, "/news", origin="https://evil.example")
    assert refused.status == 403
    ok = await connect(svc.ws_port, "/news", origin="https://app.example")
    assert ok.ws.state.name == "OPEN"


@pytest_twisted.ensureDeferred
async def test_refusals_are_counted_by_status(run_service: Any) -> None:
    """Each refused handshake counts once under its HTTP status (what /metrics reports)."""
    svc = await run_service(allowed_origins=("https://app.example:443",))
    for _ in range(2):
        assert (await connect_refused(svc.ws_port, "/news", origin="https://evil.example")).status == 403
    assert (await connect_refused(svc.ws_port, "/a//b")).status == 400
    assert svc.factory.refusals == {403: 2, 400: 1}


@pytest_twisted.ensureDeferred
async def test_max_connections_gets_503(run_service: Any) -> None:
    """Past --max-connections, new handshakes get HTTP 503 and existing sockets are untouched."""
    svc = await run_service(max_connections=2)
    a = await connect(svc.ws_port, "/n")
    b = await connect(svc.ws_port, "/n")
    refused = await connect_refused(svc.ws_port, "/n")
    assert refused.status == 503
    await svc.publish("both", "n")
    assert [await a.next_text(), await b.next_text()] == ["both", "both"]


@pytest_twisted.ensureDeferred
async def test_auto_ping(run_service: Any) -> None:
    """With --auto-ping-interval, idle sockets are pinged (and a client that pongs stays connected)."""
    svc = await run_service(auto_ping_interval=0.05, auto_ping_timeout=1)
    client = await connect(svc.ws_port, "/idle")
    await wait_for(lambda: client.pings_received >= 2)
    assert client.ws.state.name == "OPEN"


class _SilentPeer(protocol.Protocol):
    """Completes the handshake with raw bytes, then never reads again."""

    lost = False

    def connectionMade(self) -> None:
        self.transport.write(UPGRADE % (b"/flood", b""))
        self.transport.pauseProducing()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


async def connect_silent(svc: Any, peer: _SilentPeer | None = None) -> Any:
    """Connect a peer that never reads to /flood; return it once the server has it on the channel."""
    peer = peer if peer is not None else _SilentPeer()
    await TCP4ClientEndpoint(reactor, "127.0.0.1", svc.ws_port).connect(protocol.Factory.forProtocol(lambda: peer))
    await wait_for(lambda: svc.factory.sockets(b"flood") == 1)
    return peer


@pytest_twisted.ensureDeferred
async def test_slow_reader_is_cut_off_and_others_unaffected(run_service: Any) -> None:
    """A socket that stops reading is cut off once it queues too much; a reading socket on the channel gets
    every message, in order."""
    svc = await run_service(send_buffer=256 * 1024, slow_timeout=30)
    peer = await connect_silent(svc)
    reader = await connect(svc.ws_port, "/flood")
    chunk = "y" * 16384
    sent = 0
    received = 0
    while svc.factory.sockets(b"flood") == 2 and sent < 2000:  # bounded: 32 MB at most
        for _ in range(16):
            await svc.publish(chunk, "flood")
            sent += 1
        # the reader keeps up: wait until it has everything sent so far
        await wait_for(lambda r=received, s=sent: r + reader.pending() >= s)
        while reader.pending():
            assert (await reader.next_text()) == chunk
            received += 1
    assert svc.factory.sockets(b"flood") == 1, "the silent socket was never cut off"
    assert svc.factory.slow_cut_offs == 1
    assert sent < 2000
    while received < sent:
        assert (await reader.next_text()) == chunk
        received += 1
    await wait_for(lambda: len(svc.factory.connections) == 1)  # the server dropped it
    peer.transport.resumeProducing()
    await wait_for(lambda: peer.lost)


@pytest_twisted.ensureDeferred
async def test_slow_reader_cut_off_after_timeout(run_service: Any) -> None:
    """A socket that stays unable to take data is cut off by the --slow-timeout clock, though it is far
    under --send-buffer."""
    svc = await run_service(send_buffer=64 * 1024 * 1024, slow_timeout=0.3)
    peer = await connect_silent(svc)
    sent = 0
    while svc.factory.slow_cut_offs == 0 and sent < 1000:
        if sent < 400:  # enough to fill the kernel buffers and pause the socket
            await svc.publish("z" * 16384, "flood")
            sent += 1
        else:
            await wait_for(lambda: svc.factory.slow_cut_offs > 0, timeout=5)
    assert svc.factory.slow_cut_offs == 1
    await wait_for(lambda: not svc.factory.connections)  # the server dropped it
    peer.transport.resumeProducing()
    await wait_for(lambda: peer.lost)


@pytest_twisted.ensureDeferred
async def test_slow_reader_that_catches_up_stays(run_service: Any) -> None:
    """A socket that falls behind past the high-water mark, then reads its backlog before --slow-timeout runs
    out, is not cut off when the clock fires."""
    svc = await run_service(send_buffer=64 * 1024 * 1024, slow_timeout=0.5)
    peer = await connect_silent(svc)
    (proto,) = svc.factory.connections
    while proto._buffered() <= 64 * 1024:
        await svc.publish("z" * 16384, "flood")
    assert proto._slow_timer is not None, "the slow clock must be running"
    peer.transport.resumeProducing()
    await wait_for(lambda: proto._buffered() == 0, timeout=5)
    await task.deferLater(reactor, 0.8, lambda: None)  # past --slow-timeout
    assert svc.factory.slow_cut_offs == 0
    assert proto.state == proto.STATE_OPEN


@pytest_twisted.ensureDeferred
async def test_slow_timeout_zero_turns_the_clock_off(run_service: Any) -> None:
    """With --slow-timeout 0 a reader far behind (but under --send-buffer) is never cut off by the clock."""
    svc = await run_service(send_buffer=64 * 1024 * 1024, slow_timeout=0)
    await connect_silent(svc)
    (proto,) = svc.factory.connections
    for _ in range(2000):
        if proto._buffered() > 64 * 1024:
            break
        await svc.publish("z" * 16384, "flood")
    assert proto._buffered() > 64 * 1024 and proto._slow_timer is None
    await task.deferLater(reactor, 0.2, lambda: None)
    assert svc.factory.slow_cut_offs == 0 and proto.state == proto.STATE_OPEN


@pytest_twisted.ensureDeferred
async def test_shutdown_closes_sockets_with_1012(run_service: Any, services: list[Any]) -> None:
    """Stopping the service sends every socket close code 1012 (service restart) and closes them; with
    --drain-close-code 1001, 1001 (going away)."""
    for code_option, expected in ((None, (1012, "service restart")), (1001, (1001, "server shutting down"))):
        svc = await run_service(**({"drain_close_code": code_option} if code_option else {}))
        clients = [await connect(svc.ws_port, "/news") for _ in range(3)]
        await svc.stopService()
        for c in clients:
            assert await c.wait_closed() == expected
        assert not svc.factory.connections


@pytest_twisted.ensureDeferred
async def test_mixed_text_and_binary_burst_in_order(run_service: Any) -> None:
    """A burst of mixed text and binary messages arrives complete and in publish order."""
    svc = await run_service()
    client = await connect(svc.ws_port, "/mix")
    expected = []
    for i in range(500):
        payload = (b"\xff%d" % i) if i % 3 == 0 else (b"t%d" % i)
        expected.append((Opcode.BINARY if i % 3 == 0 else Opcode.TEXT, payload))
    svc.hub.hold()
    for _, payload in expected[:250]:
        svc.hub.deliver(b"mix", payload)
    svc.hub.release()
    for _, payload in expected[250:]:
        await svc.publish(payload, "mix")
    got = [await client.next_message() for _ in expected]
    assert got == expected


def test_websocket_frame_encoding() -> None:
    """Server frames: unmasked, FIN set, text opcode for UTF-8 and binary otherwise, 7/16/64-bit lengths."""
    from sockdrawer.transports.websocket.frames import encode_batch, encode_frame

    assert encode_frame(b"hi") == b"\x81\x02hi"
    assert encode_frame(b"\xff") == b"\x82\x01\xff"
    assert encode_frame(b"") == b"\x81\x00"
    assert encode_frame(b"a" * 126)[:4] == b"\x81\x7e" + struct.pack("!H", 126)
    assert encode_frame(b"a" * 70000)[:10] == b"\x81\x7f" + struct.pack("!Q", 70000)
    assert encode_batch([b"a", b"\xff"]) == b"\x81\x01a\x82\x01\xff"
    # the same bytes as Autobahn's own prepared messages
    from autobahn.websocket.protocol import PreparedMessage

    for size in (0, 1, 125, 126, 65535, 65536, 70000):
        for payload, binary in ((b"t" * size, False), (b"\xff" * max(size, 1), True)):
            assert encode_frame(payload) == PreparedMessage(payload, binary, False, True).payloadHybi


@pytest_twisted.ensureDeferred
async def test_closed_connections_freed_without_cyclic_gc(run_service: Any) -> None:
    """A closed connection is freed by reference counting alone, so full GC passes stay rare and short."""
    import gc

    from twisted.internet import task

    from sockdrawer.transports.websocket.protocol import SockDrawerServerProtocol

    svc = await run_service()
    gc.collect()
    gc.disable()
    try:
        def ours() -> int:
            return sum(isinstance(o, SockDrawerServerProtocol) and o.factory is svc.factory
                       for o in gc.get_objects())

        clients = [await connect(svc.ws_port, f"/gc{i % 3}") for i in range(20)]
        assert ours() == 20
        for c in clients:
            c.close()
        for c in clients:
            await c.wait_closed()
        await wait_for(lambda: not svc.factory.connections)
        await task.deferLater(reactor, 0, lambda: None)
        assert ours() == 0
    finally:
        gc.enable()


@pytest_twisted.ensureDeferred
async def test_raw_request_target_names_the_channel(run_service: Any) -> None:
    """The channel is the raw path: ';' is part of it, and '//a/b' is refused rather than read as host 'a'."""
    svc = await run_service()
    # the websockets client drops ';params' itself: send the request by hand
    raw = RawClient(b"/rooms;42")
    await TCP4ClientEndpoint(reactor, "127.0.0.1", svc.ws_port).connect(protocol.Factory.forProtocol(lambda: raw))
    await wait_for(lambda: svc.factory.sockets(b"rooms;42") == 1)
    await svc.publish("to rooms;42", "rooms;42")
    await wait_for(lambda: b"to rooms;42" in raw.received)
    assert svc.factory.sockets(b"rooms") == 0
    refused = await connect_refused(svc.ws_port, "//a/b")
    assert refused.status == 400


@pytest_twisted.ensureDeferred
async def test_autobahn_refusals_do_not_echo_the_request(run_service: Any) -> None:
    """Handshake refusals from Autobahn's own checks carry the standard reason phrase, not request text."""
    svc = await run_service()
    request = UPGRADE.replace(b"GET ", b"POSTXYZ ") % (b"/news", b"")
    response = await deferToThread(raw_request, svc.ws_port, request)
    status_line = response.split(b"\r\n", 1)[0]
    assert status_line == b"HTTP/1.1 405 Method Not Allowed"
    request = UPGRADE.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1:<evil>") % (b"/news", b"")
    response = await deferToThread(raw_request, svc.ws_port, request)
    assert response.split(b"\r\n", 1)[0] == b"HTTP/1.1 400 Bad Request"


class _PingingPeer(_SilentPeer):
    """Completes the handshake, never reads, and keeps sending pings (each one asks for a pong)."""

    def ping(self) -> None:
        mask = b"\x00\x00\x00\x00"
        payload = b"p" * 125
        self.transport.write((bytes([0x89, 0x80 | len(payload)]) + mask + payload) * 100)


@pytest_twisted.ensureDeferred
async def test_client_that_sends_but_never_reads_is_cut_off(run_service: Any) -> None:
    """Pongs count against the limits: a client that pings without reading is cut off, not buffered forever."""
    # no rate limit here: this is about the send buffer, not about how fast a client may send
    svc = await run_service(send_buffer=256 * 1024, slow_timeout=30, max_frames_per_second=1e9, frame_burst=10**9)
    peer = await connect_silent(svc, _PingingPeer())
    sent = 0
    while svc.factory.slow_cut_offs == 0:
        assert sent < 5_000, "never cut off"  # 5,000 x 100 pings: about 70 MB of pongs at most
        peer.ping()
        sent += 1
        await task.deferLater(reactor, 0, lambda: None)
    await wait_for(lambda: not svc.factory.connections)


# -- taking the token out of the request head (unit) ----------------------------


def test_take_token_redacts_query_and_header() -> None:
    """The token comes from ?token= (percent-decoded, among other parameters; '=' may be in its value), both places
    are rewritten to 'redacted', and the bytes after the head's blank line are left as they are, even when they
    look like a header."""
    from sockdrawer.transports.websocket.handshake import take_token

    rest = b"Authorization: Bearer later\r\n\r\n"
    head = (b"GET /news?a=1&token=abc%2Bd=&b=2 HTTP/1.1\r\nHost: x\r\nauthorization: bearer other\r\n\r\n" + rest)
    token, rewritten = take_token(head)
    assert token == "abc+d="
    assert rewritten == (b"GET /news?a=1&token=redacted&b=2 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer redacted"
                         b"\r\n\r\n" + rest)


def test_take_token_leaves_other_requests_alone() -> None:
    """A request without a token keeps every byte (no '?' added to its target); a '?' inside the query is part of a
    value, not the start of another query; the header is the fallback when the query has no token."""
    from sockdrawer.transports.websocket.handshake import take_token

    plain = b"GET /news HTTP/1.1\r\nHost: x\r\n\r\n"
    assert take_token(plain) == (None, plain)
    nested = b"GET /news?a=b?token=x HTTP/1.1\r\nHost: x\r\n\r\n"
    assert take_token(nested) == (None, nested)
    # not a request line of three parts separated by single spaces (RFC 9112 3): not parsed, no token taken,
    # but the token is redacted all the same (the line is refused, and logged then)
    odd = b"GET  /news?token=x HTTP/1.1\r\nHost: x\r\n\r\n"
    assert take_token(odd) == (None, odd.replace(b"token=x", b"token=redacted"))
    token, rewritten = take_token(b"GET /news?a=1 HTTP/1.1\r\nX-Note: Bearer no\r\n"
                                  b"Authorization: Bearer  hdr:1 \r\n\r\n")
    assert token == "hdr:1"
    assert rewritten == (b"GET /news?a=1 HTTP/1.1\r\nX-Note: Bearer no\r\nAuthorization: Bearer redacted"
                         b"\r\n\r\n")


def test_address_of_a_peer_string() -> None:
    """The client address in Autobahn's peer strings, IPv4 and IPv6 (colons inside), or a forwarded bare one."""
    from sockdrawer.transports.websocket.handshake import _address

    assert _address("tcp4:198.51.100.2:5678") == "198.51.100.2"
    assert _address("tcp6:2001:db8::1:5678") == "2001:db8::1"
    assert _address("203.0.113.1") == "203.0.113.1"
    assert _address(None) is None and _address("") is None


def test_factory_public_channels_and_origins() -> None:
    """is_public follows --public-channel patterns; origin_allowed follows --allowed-origin."""
    from sockdrawer.config import Settings
    from sockdrawer.core.hub import MemoryChannelHub
    from sockdrawer.node.service import websocket_options
    from sockdrawer.transports.websocket.factory import SockDrawerServerFactory

    settings = Settings(public_channel=("public/*",), allowed_origins=("https://app.example:443",))
    factory = SockDrawerServerFactory(MemoryChannelHub(), options=websocket_options(settings), clock=reactor)
    assert factory.is_public("public/news") and not factory.is_public("news")
    assert factory.origin_allowed("https://app.example") and not factory.origin_allowed("https://evil.example")


def test_collector_freeze_after_settling_and_every_chunk() -> None:
    """The collector freeze runs `settle` seconds after a socket opened (one freeze however many opened
    meanwhile), at once after `chunk` openings, collects the young generations just before each freeze, and
    stop() cancels what is pending and unfreezes."""
    from sockdrawer.transports.websocket.timers import CollectorFreeze

    class Collector:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def collect(self, generation: int = 2) -> int:
            self.calls.append(f"collect{generation}")
            return 0

        def freeze(self) -> None:
            self.calls.append("freeze")

        def unfreeze(self) -> None:
            self.calls.append("unfreeze")

    clock, gc_ = task.Clock(), Collector()
    freezer = CollectorFreeze(clock, settle=1.0, chunk=3, collector=gc_)
    freezer.opened()
    clock.advance(0.5)
    freezer.opened()
    assert gc_.calls == []
    clock.advance(0.5)
    assert gc_.calls == ["collect1", "freeze"] and freezer.freezes == 1
    clock.advance(10)
    assert freezer.freezes == 1, "a freeze with no socket opened"
    for _ in range(3):
        freezer.opened()
    assert freezer.freezes == 2, "no freeze at once after a chunk of openings"
    clock.advance(10)
    assert freezer.freezes == 2, "the chunk's freeze left a timer behind"
    freezer.opened()
    freezer.stop()
    clock.advance(10)
    assert freezer.freezes == 2 and gc_.calls[-1] == "unfreeze"
    gc_.calls.clear()
    freezer.start()
    assert gc_.calls == ["collect2", "freeze"] and freezer.freezes == 3  # at listening: one full pass


@pytest_twisted.ensureDeferred
async def test_open_sockets_are_frozen_out_of_full_collections(run_service: Any) -> None:
    """Once sockets have opened and settled, they are in the collector's permanent generation, so a full
    pass does not walk them; they still close and free normally; the service's stop unfreezes."""
    import gc

    from sockdrawer.transports.websocket.protocol import SockDrawerServerProtocol

    svc = await run_service()
    assert svc.factory.freezer is not None
    assert svc.factory.freezer.freezes == 1 and gc.get_freeze_count() > 0, "nothing frozen at listening"
    clients = [await connect(svc.ws_port, f"/frozen{i}") for i in range(5)]
    await wait_for(lambda: svc.factory.freezer.freezes >= 2)  # after the sockets opened
    assert gc.get_freeze_count() > 0
    assert not any(isinstance(o, SockDrawerServerProtocol) and o.factory is svc.factory
                   for o in gc.get_objects()), "an open socket is still walked by full collections"
    svc.hub.deliver(b"frozen0", b"still here")
    assert await clients[0].next_message() == (Opcode.TEXT, b"still here")
    for c in clients:
        c.close()
    await wait_for(lambda: not svc.factory.connections)
    await svc.stopService()
    assert gc.get_freeze_count() == 0


@pytest_twisted.ensureDeferred
async def test_no_gc_freeze_leaves_sockets_to_full_collections(run_service: Any) -> None:
    """With --no-gc-freeze nothing is frozen: open sockets stay in the collector's generations."""
    import gc

    from sockdrawer.transports.websocket.protocol import SockDrawerServerProtocol

    gc.unfreeze()
    svc = await run_service(no_gc_freeze=True)
    assert svc.factory.freezer is None
    client = await connect(svc.ws_port, "/thawed")
    await wait_for(lambda: svc.factory.open_sockets == 1)
    assert gc.get_freeze_count() == 0
    assert any(isinstance(o, SockDrawerServerProtocol) and o.factory is svc.factory for o in gc.get_objects())
    client.close()
