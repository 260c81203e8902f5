"""
Every assumption ``sockdrawer._private`` makes about the internals of
Twisted, Autobahn and txredisapi, one test each.  When a new release breaks
one, the test named after the assumption fails, not a browser.
"""

from __future__ import annotations

import inspect
from typing import Any

import autobahn.twisted.websocket
import autobahn.websocket.protocol
import autobahn.websocket.types
import pytest
import pytest_twisted
import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.compress import PerMessageDeflate
from conftest import wait_for
from twisted.internet import defer, protocol, reactor, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from sockdrawer import _private
from sockdrawer.transports.websocket.compression import accept_deflate

HANDSHAKE = (
    b"GET /a;b//c?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
)


class Recording(WebSocketServerProtocol):
    """A plain Autobahn server protocol that records what it sees in onConnect."""

    seen: dict[str, Any]

    def onConnect(self, request: Any) -> None:
        self.seen = {
            "uri": self.http_request_uri,
            "extensions": list(self.websocket_extensions),
            "request_extensions": list(request.extensions),
        }
        if getattr(self.factory, "replace_offers", None) is not None:
            _private.set_extension_offers(self, self.factory.replace_offers)


def open_connection(extra: bytes = b"", compression: bool = False, replace_offers: Any = None) -> Any:
    """A plain Autobahn server connection over a StringTransport, after a complete opening handshake."""
    factory = WebSocketServerFactory()
    factory.protocol = Recording
    options: dict[str, Any] = {"openHandshakeTimeout": 0, "closeHandshakeTimeout": 0}
    if compression:
        options["perMessageCompressionAccept"] = accept_deflate
    factory.setProtocolOptions(**options)
    factory.replace_offers = replace_offers
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(HANDSHAKE % extra)
    assert transport.value().startswith(b"HTTP/1.1 101 "), transport.value()
    return proto, transport


# -- Twisted -------------------------------------------------------------------


class _Hold(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.made.callback(self)  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_twisted_tcp_write_buffer_is_tempdatalen_plus_databuffer() -> None:
    """Twisted's tcp.Connection keeps unsent bytes in _tempDataLen and dataBuffer (from offset on), and an
    empty buffer has both at zero once doWrite has run."""
    made: defer.Deferred[Any] = defer.Deferred()
    factory = protocol.Factory.forProtocol(_Hold)
    factory.made = made  # type: ignore[attr-defined]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        protocol.Factory.forProtocol(protocol.Protocol))
    try:
        server = await made
        conn = server.transport
        assert isinstance(conn, tcp.Connection)
        assert not _private.has_write_backlog(conn) and _private.write_backlog(conn) == 0
        conn.write(b"x" * 1000)
        assert _private.has_write_backlog(conn)
        assert _private.write_backlog(conn) == 1000
        await wait_for(lambda: not _private.has_write_backlog(conn))
        assert _private.write_backlog(conn) == 0
    finally:
        client.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_twisted_tcp_connection_hands_out_its_socket() -> None:
    """A plain TCP transport is a tcp.Connection whose getHandle() is the socket, and it is not ISSLTransport."""
    made: defer.Deferred[Any] = defer.Deferred()
    factory = protocol.Factory.forProtocol(_Hold)
    factory.made = made  # type: ignore[attr-defined]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        protocol.Factory.forProtocol(protocol.Protocol))
    try:
        server = await made
        conn, direct = _private.tcp_connection(server.transport)
        assert conn is server.transport and direct
        assert conn.getHandle().fileno() == conn.fileno()
    finally:
        client.transport.abortConnection()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_twisted_tcp_connection_works_compacted() -> None:
    """Twisted's tcp.Connection has dataBuffer, offset, producer and streamingProducer as class attributes
    with the defaults compact_transport assumes, and Server reads hostname only while it is built; a Server
    builds logstr and repr from its session number, client host and port, holds its socket's fileno, and
    deletes both at the close: a compacted connection (those gone, a compact class, its dict rebuilt) reads
    the same strings and fileno, reports its addresses, writes, lets its producer go, closes, and answers -1
    for fileno after."""
    for name, default in (("dataBuffer", b""), ("offset", 0), ("producer", None), ("streamingProducer", False)):
        assert getattr(tcp.Server, name) == default, name
    made: defer.Deferred[Any] = defer.Deferred()
    factory = protocol.Factory.forProtocol(_Hold)
    factory.made = made  # type: ignore[attr-defined]
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    received: list[bytes] = []

    class Reader(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            received.append(data)

    client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
        protocol.Factory.forProtocol(Reader))
    try:
        server = await made
        conn = server.transport
        # as on an open socket: a producer registered, a first write sent (the dict grew key by key)
        conn.registerProducer(_Producer(), True)
        conn.write(b"hello")
        await wait_for(lambda: b"".join(received) == b"hello")
        before = (conn.logstr, conn.logPrefix(), repr(conn), conn.fileno(), conn.connected, conn._tempDataLen)
        assert type(conn) is tcp.Server and conn.__dict__["fileno"].__self__ is conn.socket
        _private.compact_transport(conn)
        dropped = {"hostname", "dataBuffer", "offset", "logstr", "repstr", "fileno", "connected", "_tempDataLen",
                   "_tempDataBuffer"}
        assert not dropped & set(conn.__dict__), dropped & set(conn.__dict__)
        assert isinstance(conn, tcp.Server) and type(conn) is not tcp.Server
        # each reads as Twisted's own did
        assert (conn.logstr, conn.logPrefix(), repr(conn), conn.fileno(), conn.connected, conn._tempDataLen) == before
        assert before[0].startswith("_Hold,") and before[2].startswith("<_Hold #")
        assert conn.getPeer().port == client.transport.getHost().port and conn.getHost().port == port.getHost().port
        conn.write(b" again")  # through Twisted's buffer: a list of its own
        await wait_for(lambda: b"".join(received) == b"hello again")
        assert type(conn)._tempDataBuffer is not conn._tempDataBuffer  # the descriptor made one for it
        conn.unregisterProducer()
        conn.loseConnection()
        await wait_for(lambda: not conn.connected)
        # Twisted deleted the socket and its fileno at the close: FileDescriptor's own answers -1
        assert not hasattr(conn, "socket") and conn.fileno() == -1 and conn.connected == 0
    finally:
        client.transport.abortConnection()
        await port.stopListening()


class _Producer:
    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def test_twisted_tls_wrapper_keeps_the_tcp_connection_as_transport() -> None:
    """A TLS wrapper protocol (TLSMemoryBIOProtocol) sits on the TCP connection as its .transport, so the fast
    path finds the buffer under TLS and never sends around it; a startTLS connection provides ISSLTransport."""
    from twisted.internet.ssl import CertificateOptions

    wrapper = TLSMemoryBIOFactory(CertificateOptions(), False, protocol.Factory.forProtocol(protocol.Protocol))
    tls = wrapper.buildProtocol(None)
    tcp_conn = tcp.Connection.__new__(tcp.Connection)
    tls.transport = tcp_conn
    assert _private.tcp_connection(tls) == (tcp_conn, False)
    from twisted.internet import _newtls

    started = tcp.Connection.__new__(tcp.Connection)
    assert "directlyProvides(transport, ISSLTransport)" in inspect.getsource(_newtls.startTLS)
    from zope.interface import directlyProvides

    directlyProvides(started, ISSLTransport)  # what _newtls.startTLS does
    assert _private.tcp_connection(started) == (started, False)


def test_twisted_http_channel_flags_a_request_in_hand() -> None:
    """HTTPChannel's _handlingRequest is False while a request is still arriving (a slowloris) and when idle,
    True from the moment a request has all arrived until its response is finished."""
    from twisted.web import resource, server

    class Slow(resource.Resource):
        isLeaf = True
        pending: list[Any] = []

        def render_GET(self, request: Any) -> Any:
            self.pending.append(request)
            return server.NOT_DONE_YET

    site = server.Site(Slow())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    channel.makeConnection(StringTransport())
    assert not _private.handling_request(channel)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")  # headers still coming
    assert not _private.handling_request(channel)
    channel.dataReceived(b"\r\n")
    assert _private.handling_request(channel)
    Slow.pending[0].finish()
    assert not _private.handling_request(channel)
    channel.connectionLost(Failure(ConnectionDone()))


# -- Autobahn ------------------------------------------------------------------


def test_autobahn_handshake_state_attributes_exist_after_the_handshake() -> None:
    """Autobahn sets each attribute named in HANDSHAKE_STATE during the opening handshake (so dropping them
    frees memory), and each name in COMPACT_DEFAULTS holds that default on a fresh open connection."""
    proto, _ = open_connection()
    missing = [name for name in _private.HANDSHAKE_STATE if name not in proto.__dict__]
    assert not missing, f"Autobahn no longer sets {missing}"
    for name, default in _private.COMPACT_DEFAULTS.items():
        assert name in proto.__dict__, f"Autobahn no longer sets {name} per connection"
        value = proto.__dict__[name]
        if name != "data":  # bytes left over after the handshake: empty here
            assert value is default or value == default, (name, value, default)


def test_autobahn_reads_no_handshake_state_once_open() -> None:
    """After compact() drops the handshake state (the transport details among it), the open connection still
    echoes, pings and closes, and its transport_details reads None."""
    proto, transport = open_connection()
    _private.install_compact_defaults(Recording)
    proto.onMessage = lambda payload, binary: proto.sendMessage(payload, binary)
    _private.compact(proto)
    for name in _private.HANDSHAKE_STATE:
        assert name not in proto.__dict__
    assert proto.transport_details is None
    transport.clear()
    mask = b"\x00\x00\x00\x00"
    proto.dataReceived(b"\x81\x82" + mask + b"hi")
    assert transport.value() == b"\x81\x02hi"
    proto.sendPing(b"p")
    proto.sendClose(1000)
    assert proto.state == proto.STATE_CLOSING


def test_autobahn_makes_the_lazy_state_per_connection_and_uses_it_as_assumed() -> None:
    """Autobahn gives each connection the LAZY_STATE objects (an empty send_queue deque, trafficStats,
    utf8validator, ["message"] / {"message": None} events), and only calls len, append and popleft on
    send_queue: a class attribute standing in for them until first use changes nothing."""
    import collections
    import re

    proto, _ = open_connection()
    state = proto.__dict__
    assert type(state["send_queue"]) is collections.deque and not state["send_queue"]
    assert type(state["trafficStats"]) is autobahn.websocket.protocol.TrafficStats
    assert type(state["utf8validator"]) is autobahn.websocket.protocol.Utf8Validator
    assert state["_valid_events"] == ["message"] and state["_results"] == {"message": None}
    assert state.get("_listeners") is None
    for name, (_, droppable) in _private.LAZY_STATE.items():
        assert droppable(state[name]), name
    source = inspect.getsource(autobahn.websocket.protocol)
    uses = set(re.findall(r"send_queue(?:\.\w+|\)| =)", source))
    assert uses <= {"send_queue)", "send_queue.append", "send_queue.popleft", "send_queue ="}, uses


def test_autobahn_works_on_a_connection_without_its_lazy_state() -> None:
    """A compacted connection (no send_queue, trafficStats, utf8validator or event tables of its own)
    validates UTF-8 (1007 for bad text), echoes, and sends synchronously and chopped through a fresh queue."""
    proto, transport = open_connection()
    _private.install_compact_defaults(Recording)
    proto.onMessage = lambda payload, binary: proto.sendMessage(payload, binary)
    _private.compact(proto)
    assert not set(_private.LAZY_STATE) & set(proto.__dict__)
    assert len(proto.send_queue) == 0
    transport.clear()
    mask = b"\x00\x00\x00\x00"
    proto.dataReceived(b"\x81\x82" + mask + b"hi")
    assert transport.value() == b"\x81\x02hi"
    assert "utf8validator" in proto.__dict__ and "trafficStats" in proto.__dict__
    transport.clear()
    proto.sendMessage(b"sync", sync=True)  # through send_queue and a reactor turn
    assert "send_queue" in proto.__dict__
    assert transport.value() == b"\x81\x04sync"
    proto.sendData(b"", chopsize=1)
    other, other_transport = open_connection()
    _private.compact(other)
    failed: list[int] = []
    other._fail_connection = lambda code, reason: failed.append(code)
    other.dataReceived(b"\x81\x81" + mask + b"\xff")  # not UTF-8
    assert failed == [1007]


def test_autobahn_sets_the_frame_state_before_it_reads_it() -> None:
    """After settle() drops what the last frames left (FRAME_STATE) from a connection between frames, it still
    takes text, binary, fragmented and control frames, refuses bad UTF-8 with 1007, and settles again; in the
    middle of a fragmented message settle() leaves everything in place."""
    proto, transport = open_connection()
    _private.install_compact_defaults(Recording)
    got: list[tuple[bytes, bool]] = []
    proto.onMessage = lambda payload, binary: got.append((payload, binary))
    _private.compact(proto)
    mask = b"\x00\x00\x00\x00"
    proto.dataReceived(b"\x81\x82" + mask + b"hi")
    assert set(_private.FRAME_STATE) & set(proto.__dict__)
    _private.settle(proto)
    assert not set(_private.FRAME_STATE) & set(proto.__dict__)
    proto.dataReceived(b"\x82\x83" + mask + b"bin")
    _private.settle(proto)
    proto.dataReceived(b"\x01\x82" + mask + b"ab")  # a fragmented text message: first part
    _private.settle(proto)
    assert proto.inside_message and "message_data" in proto.__dict__
    proto.dataReceived(b"\x80\x82" + mask + b"cd")
    _private.settle(proto)
    transport.clear()
    proto.dataReceived(b"\x89\x81" + mask + b"p")  # a ping: the pong goes out
    assert transport.value() == b"\x8a\x01p"
    _private.settle(proto)
    assert got == [(b"hi", False), (b"bin", True), (b"abcd", False)]
    failed: list[int] = []
    proto._fail_connection = lambda code, reason: failed.append(code)
    proto.dataReceived(b"\x81\x81" + mask + b"\xff")
    assert failed == [1007]


def test_autobahn_copies_config_attrs_onto_each_connection() -> None:
    """Autobahn's _connectionMade copies every name in CONFIG_ATTRS from the factory; with options as class
    attributes and an empty CONFIG_ATTRS it copies nothing, and function options stay plain functions."""
    factory = WebSocketServerFactory()
    factory.setProtocolOptions(perMessageCompressionAccept=accept_deflate, openHandshakeTimeout=0)
    cls = _private.options_as_class(WebSocketServerProtocol, factory)
    assert cls.CONFIG_ATTRS == ()
    assert cls.perMessageCompressionAccept([]) is None  # not bound as a method
    assert "_connectionMade" in vars(autobahn.websocket.protocol.WebSocketProtocol)
    source = inspect.getsource(autobahn.websocket.protocol.WebSocketProtocol._connectionMade)
    assert "CONFIG_ATTRS" in source, "Autobahn no longer copies options through CONFIG_ATTRS"
    factory.protocol = cls
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert not set(WebSocketServerProtocol.CONFIG_ATTRS) & set(proto.__dict__)


def test_autobahn_datareceived_is_a_log_line_around_underscore_datareceived() -> None:
    """Autobahn's public dataReceived only logs and calls _dataReceived, so feeding _dataReceived directly
    answers a handshake the same way."""
    source = inspect.getsource(autobahn.twisted.websocket.WebSocketAdapterProtocol.dataReceived)
    assert "self._dataReceived(data)" in source
    factory = WebSocketServerFactory()
    factory.protocol = WebSocketServerProtocol
    factory.setProtocolOptions(openHandshakeTimeout=0)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    _private.feed(proto, HANDSHAKE % b"")
    assert transport.value().startswith(b"HTTP/1.1 101 ")


def test_autobahn_keeps_the_raw_request_target_for_onconnect() -> None:
    """http_request_uri holds the request target exactly as sent (with ;params and //) when onConnect runs."""
    proto, _ = open_connection()
    assert proto.seen["uri"] == "/a;b//c?x=1"


def test_autobahn_negotiates_from_websocket_extensions() -> None:
    """processHandshake leaves the parsed offers in websocket_extensions (equal to request.extensions) before
    onConnect, and succeedHandshake negotiates from that list: emptying it declines compression."""
    offer = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    proto, transport = open_connection(offer, compression=True)
    assert proto.seen["extensions"] == proto.seen["request_extensions"]
    assert proto.seen["extensions"][0][0] == "permessage-deflate"
    assert b"permessage-deflate; server_no_context_takeover" in transport.value()
    deflate = _private.negotiated_deflate(proto)
    assert isinstance(deflate, PerMessageDeflate) and deflate.server_max_window_bits == 15
    proto, transport = open_connection(offer, compression=True, replace_offers=[])
    assert b"sec-websocket-extensions" not in transport.value().lower()
    assert _private.negotiated_deflate(proto) is None


def _waiting(d: defer.Deferred[Any]) -> int:
    """How many callbacks wait on ``d`` (Twisted 25.5 renamed the list and deprecated the old name)."""
    own = getattr(d, "_callbacks", None)
    if own is None:
        own = d.callbacks
    return len(own)


def test_autobahn_server_adds_nothing_to_is_open_or_is_closed() -> None:
    """On an open server connection Autobahn's is_open has fired with None and is_closed is pending, neither
    with a callback waiting: compact() may drop both (LAZY_STATE), and a compacted connection still fires a
    fresh is_closed, with itself, at the close."""
    proto, _ = open_connection()
    assert proto.is_open.called and proto.is_open.result is None and not _waiting(proto.is_open)
    assert not proto.is_closed.called and not _waiting(proto.is_closed)
    _private.install_compact_defaults(Recording)
    _private.compact(proto)
    assert "is_open" not in proto.__dict__ and "is_closed" not in proto.__dict__
    assert proto.is_open.called
    proto.connectionLost(Failure(ConnectionDone()))
    results: list[Any] = []
    proto.is_closed.addCallback(results.append)
    assert results == [proto]


def test_autobahn_is_closed_fires_with_the_protocol() -> None:
    """Autobahn resolves is_closed with the protocol itself (a cycle); break_close_cycle replaces it once fired."""
    proto, _ = open_connection()
    proto.connectionLost(Failure(ConnectionDone()))
    assert proto.is_closed.called
    results: list[Any] = []
    proto.is_closed.addCallback(results.append)
    assert results == [proto]
    _private.break_close_cycle(proto)
    proto.is_closed.addCallback(results.append)
    assert results[-1] is None


def test_autobahn_modules_use_hltype_and_hlval_as_globals() -> None:
    """The Autobahn modules whose debug-log arguments are made lazy import hltype and hlval as module globals,
    and the lazy versions format to the same text."""
    from autobahn import util

    _private.make_log_arguments_lazy()
    for module in _private.LAZY_LOG_MODULES:
        for name in ("hltype", "hlval"):
            helper = getattr(module, name)
            assert getattr(helper, "__sockdrawer_lazy__", False), f"{module.__name__}.{name}"
    assert str(autobahn.websocket.protocol.hlval("x")) == util.hlval("x")
    assert f"{autobahn.websocket.protocol.hltype(open_connection)}" == util.hltype(open_connection)


def test_autobahn_pretty_prints_the_copied_options_with_its_pformat_global() -> None:
    """autobahn.websocket.protocol imports pprint.pformat as a module global and formats the options
    _connectionMade copied with it on every connection (an empty list for sockdrawer's class options); the
    replacement gives pprint's text for that and for anything else."""
    import pprint

    source = inspect.getsource(autobahn.websocket.protocol.WebSocketProtocol._connectionMade)
    assert "pformat(configAttrLog)" in source
    _private.make_log_arguments_lazy()
    fast = autobahn.websocket.protocol.pformat
    assert fast is not pprint.pformat and fast.__module__ == "sockdrawer._private.of_autobahn"
    for value in ([], [("openHandshakeTimeout", 5, "X")], {"a": [1, 2]}, ()):
        assert fast(value) == pprint.pformat(value)
    called: list[Any] = []
    original = pprint.pformat
    pprint.pformat = lambda *a, **k: called.append(a) or original(*a, **k)  # type: ignore[assignment]
    from twisted.internet import reactor

    from sockdrawer.core.hub import MemoryChannelHub
    from sockdrawer.transports.websocket.factory import SockDrawerServerFactory

    factory = SockDrawerServerFactory(MemoryChannelHub(), clock=reactor)
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    try:
        proto.makeConnection(transport)
        proto.dataReceived(HANDSHAKE.replace(b"/a;b//c?x=1", b"/news") % b"")
    finally:
        pprint.pformat = original
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    assert called == [], "an empty option list still went through pprint"


class _Guarded(_private.GuardedServerProtocol):
    """Records which of the guarded steps' hooks Autobahn reached."""

    hooks: list[Any]

    def onConnect(self, request: Any) -> None:
        self.transport.registerProducer(self, True)  # Autobahn unregisters one when it drops a refused connection
        if request.path == "/raise":
            raise RuntimeError("boom")
        if request.path == "/deny":
            raise autobahn.websocket.types.ConnectionDeny(403, "no")

    def onOpen(self) -> None:
        if self.http_request_path == "/open-raises":
            raise RuntimeError("boom in onOpen")

    def handshake_error(self) -> None:
        self.hooks.append("handshake_error")

    def refusing(self, reason: str, code: int, headers: Any) -> tuple[str, int, Any]:
        self.hooks.append(("refusing", reason, code))
        return "Changed", code, headers

    def closing(self) -> None:
        self.hooks.append("closing")

    def closed_frame(self, is_reply: bool) -> None:
        self.hooks.append(("closed_frame", is_reply))


def _guarded(path: bytes) -> tuple[Any, StringTransport]:
    factory = WebSocketServerFactory()
    factory.protocol = _Guarded
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
    proto = factory.buildProtocol(None)
    proto.hooks = []
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived((HANDSHAKE % b"").replace(b"/a;b//c?x=1", path))
    return proto, transport


def test_autobahn_runs_the_four_guarded_steps_with_their_signatures() -> None:
    """Autobahn calls processHandshake, succeedHandshake(res), failHandshake(reason, code, responseHeaders)
    and sendCloseFrame(code, reasonUtf8, isReply) on a server protocol, so the overrides in
    GuardedServerProtocol see every handshake and close: a refusal goes through refusing() (its reason is
    what is sent), and a close frame is framed by closing() and closed_frame()."""
    server = autobahn.websocket.protocol.WebSocketServerProtocol
    assert list(inspect.signature(server.succeedHandshake).parameters) == ["self", "res"]
    assert list(inspect.signature(server.failHandshake).parameters)[:4] == [
        "self", "reason", "code", "responseHeaders"]
    assert list(inspect.signature(autobahn.websocket.protocol.WebSocketProtocol.sendCloseFrame).parameters) == [
        "self", "code", "reasonUtf8", "isReply"]
    proto, transport = _guarded(b"/deny")
    assert proto.hooks == [("refusing", "no", 403)]
    assert transport.value().startswith(b"HTTP/1.1 403 Changed")
    proto, transport = _guarded(b"/ok")
    assert transport.value().startswith(b"HTTP/1.1 101 ")
    proto.sendClose(1000)
    assert proto.hooks == ["closing", ("closed_frame", False)]


def test_autobahn_logs_a_refusal_only_through_the_connection_log() -> None:
    """Autobahn's failHandshake (and the dropConnection it calls) log through the connection's ``log``
    attribute, read at each call: GuardedServerProtocol, which swaps it for the call, leaves no Autobahn
    line about the refusal in the log, while the refusal is still sent."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto, transport = _guarded(b"/deny")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert transport.value().startswith(b"HTTP/1.1 403 ")
    assert not [e for e in events if "handshake" in str(e.get("log_format", "")) or "dropping" in str(
        e.get("log_format", ""))]
    assert "log" in vars(proto) or hasattr(type(proto), "log")  # the attribute Autobahn logs through


def test_autobahn_exceptions_in_the_handshake_reach_the_guard() -> None:
    """An exception out of onOpen (inside succeedHandshake, in a Deferred callback) reaches handshake_error()
    instead of dying where nobody sees it; one out of onConnect is Autobahn's own 500 refusal, which goes
    through refusing()."""
    proto, _ = _guarded(b"/open-raises")
    assert proto.hooks == ["handshake_error"]
    proto, _ = _guarded(b"/raise")
    assert proto.hooks[0][::2] == ("refusing", 500)


# -- txredisapi ----------------------------------------------------------------


def test_txredisapi_hiredis_protocol_keeps_its_reader() -> None:
    """txredisapi uses hiredis, and HiredisProtocol keeps its hiredis.Reader in _reader and feeds it there."""
    import hiredis

    assert txredisapi.RedisProtocol is txredisapi.HiredisProtocol
    proto = txredisapi.SubscriberProtocol()
    reader = _private.hiredis_reader(proto)
    assert isinstance(reader, hiredis.Reader)
    assert "self._reader.feed(data)" in inspect.getsource(txredisapi.HiredisProtocol.dataReceived)


def test_txredisapi_reply_dispatch_matches_hiredis_protocol() -> None:
    """A reply handed over with dispatch_reply fires the pending command's Deferred as HiredisProtocol's own
    dataReceived would, and the steps it mirrors are still the ones HiredisProtocol takes."""
    source = inspect.getsource(txredisapi.HiredisProtocol.dataReceived)
    for step in ("self.tryConvertData(res)", 'res == "QUEUED"', "self.transactions += 1",
                 "self.handleTransactionData(res)", "self.replyReceived(res)"):
        assert step in source, f"HiredisProtocol.dataReceived no longer does {step}"
    factory = txredisapi.RedisFactory(None, None, 1)
    factory.charset = None
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    results: list[Any] = []
    proto.execute_command("PING").addCallback(results.append)
    _private.dispatch_reply(proto, b"PONG")
    assert results == [b"PONG"]


def test_txredisapi_factory_adds_connections_through_connectionready() -> None:
    """txredisapi's factory hands each new connection to _connectionReady (for its pool), the hook that
    ConnectionPoolBypass turns off."""
    assert "_connectionReady" in vars(txredisapi.RedisFactory)
    assert "self._connectionReady" in inspect.getsource(txredisapi.RedisFactory.buildProtocol)

    class Bypassing(_private.ConnectionPoolBypass, txredisapi.RedisFactory):  # type: ignore[misc]
        pass

    factory = Bypassing(None, None, 1)
    factory._connectionReady(object())
    assert factory.pool == []


def test_autobahn_inflation_cuts_output_when_input_is_consumed() -> None:
    """Autobahn's PerMessageDeflate bounds inflation with decompress(data, max_length) on _decompressor and flags
    an overflow only by a leftover unconsumed_tail; bound_inflation also refuses output zlib still holds."""
    import zlib

    from autobahn.exception import PayloadExceededError

    source = inspect.getsource(PerMessageDeflate.decompress_message_data)
    assert "self._decompressor.decompress(data" in source and "unconsumed_tail" in source
    deflate = PerMessageDeflate(True, False, False, 15, 15, 8)
    deflate.start_decompress_message()
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = raw.compress(bytes(range(256)) * 4) + raw.flush(zlib.Z_SYNC_FLUSH)
    _private.bound_inflation(deflate)
    import pytest

    with pytest.raises(PayloadExceededError):
        deflate.decompress_message_data(payload[:-4], max_output_len=125)


def test_txredisapi_factories_take_their_options_as_attributes() -> None:
    """txredisapi's factories read charset, convertNumbers, password, username and replyTimeout from
    themselves when they build a protocol, and report the first AUTH failure through factory.deferred."""
    for factory_class in (txredisapi.SubscriberFactory, txredisapi.RedisFactory):
        factory = factory_class() if factory_class is txredisapi.SubscriberFactory else factory_class(
            None, None, 1)
        _private.configure_factory(factory, "pw", "user", 2.5)
        proto = factory.buildProtocol(None)
        assert (proto.charset, proto.password, proto.username, proto.replyTimeout) == (None, "pw", "user", 2.5)
        assert proto.convertNumbers is False
        assert isinstance(factory.deferred, defer.Deferred)


# -- Twisted's ClientService ----------------------------------------------------


def test_twisted_client_service_logs_its_retries_through_its_class_logger() -> None:
    """ClientService logs each retry ("Scheduling retry ...") at info level through its class attribute
    ``_log``: QuietClientService, which replaces that logger, logs no retry line, a plain one does."""
    from twisted.application.internet import ClientService
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.testing import MemoryReactorClock
    from twisted.logger import Logger, globalLogPublisher

    assert isinstance(ClientService.__dict__["_log"], Logger)
    seen: dict[str, list[str]] = {}
    for name, kind in (("plain", ClientService), ("quiet", _private.QuietClientService)):
        clock = MemoryReactorClock()
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        try:
            service = kind(TCP4ClientEndpoint(clock, "127.0.0.1", 1), protocol.Factory.forProtocol(protocol.Protocol),
                           retryPolicy=lambda n: 1.0, clock=clock)
            service.startService()
            connector = clock.connectors[0]
            clock.tcpClients[0][2].clientConnectionFailed(connector, Failure(ConnectionDone()))
        finally:
            globalLogPublisher.removeObserver(events.append)
        seen[name] = [e["log_format"] for e in events if "Scheduling retry" in e.get("log_format", "")]
    assert len(seen["plain"]) == 1 and seen["quiet"] == []


# -- Twisted's ProcessMonitor ----------------------------------------------------


def test_twisted_process_monitor_keeps_protocols_restarts_and_processended() -> None:
    """ProcessMonitor keeps each running process's protocol in ``protocols[name]``, schedules the restart in
    that protocol's processEnded (then it is in ``restart[name]``), and forgets the protocol when it ended:
    watch_process_end, restart_pending and running_processes read exactly that."""
    from twisted.internet.testing import MemoryReactorClock
    from twisted.runner.procmon import ProcessMonitor

    clock = MemoryReactorClock()
    monitor = ProcessMonitor(reactor=clock)
    monitor.addProcess("w", ["/bin/true"])
    spawned: list[Any] = []
    clock.spawnProcess = lambda proto, *a, **k: spawned.append(proto) or proto.makeConnection(  # type: ignore
        type("T", (), {"pid": 42, "closeStdin": lambda self: None})())
    monitor.startService()
    ended: list[Any] = []
    assert _private.watch_process_end(monitor, "w", lambda pid, reason: ended.append(pid)) == 42
    assert _private.running_processes(monitor) == 1
    spawned[0].processEnded(Failure(ConnectionDone()))
    assert ended == [42] and _private.running_processes(monitor) == 0
    assert _private.restart_pending(monitor, "w") is not None and _private.restart_pending(monitor, "w").active()
    monitor.stopService()


class _Both(_private.GuardedServerProtocol):
    """Autobahn's protocol with the fast path: records what onConnect is given, and the messages."""

    def onMessage(self, payload: bytes, is_binary: bool) -> None:
        self.got = payload

    def onConnect(self, request: Any) -> Any:
        self.given = (request.peer, request.headers, request.host, request.path, request.params, request.version,
                      request.origin, request.protocols, request.extensions)
        return request.protocols[0] if request.protocols else None


_STATE = ("http_request_data", "http_status_line", "http_headers", "http_request_uri", "http_request_path",
          "http_request_params", "http_request_host", "websocket_version", "websocket_protocols", "websocket_origin",
          "websocket_extensions", "_wskey", "http_response_data", "state", "data")


def _connecting() -> tuple[Any, StringTransport]:
    """A _Both connection over a StringTransport, before any byte of its handshake."""
    factory = WebSocketServerFactory()
    factory.protocol = _Both
    factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0, allowedOrigins=["*"])
    proto = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4242))
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def _answer(request: bytes, fast: bool) -> Any:
    proto, transport = _connecting()
    if fast:
        assert proto.fast_handshake(request)
    else:
        proto.dataReceived(request)
    return proto, transport.value()


@pytest.mark.parametrize("extra", [
    b"",
    b"Origin: https://app.example.com:8443\r\n",
    b"Sec-WebSocket-Protocol: sockdrawer.v1, other\r\n",
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    b"User-Agent: x\r\nX-Other:  spaced  \r\n",
])
@pytest.mark.parametrize("target, host", [(b"/news?token=a&b=1", b"127.0.0.1:8020"), (b"/", b"[::1]:80"),
                                          (b"/a/b%20c", b"example.com")])
def test_autobahn_fast_handshake_leaves_what_processhandshake_leaves(target: bytes, host: bytes,
                                                                     extra: bytes) -> None:
    """For a request the fast path takes, onConnect is given the same request, the same 101 goes out (byte for
    byte), and the connection holds the same handshake state as after Autobahn's processHandshake; the early
    frame after the head is kept for the open connection."""
    request = (b"GET " + target + b" HTTP/1.1\r\nHost: " + host + b"\r\nUpgrade: websocket\r\n"
               b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
               b"Sec-WebSocket-Version: 13\r\n" + extra + b"\r\n" + b"\x81\x82\x00\x00\x00\x00hi")
    slow, slow_bytes = _answer(request, fast=False)
    fast, fast_bytes = _answer(request, fast=True)
    assert fast_bytes == slow_bytes and fast_bytes.startswith(b"HTTP/1.1 101 ")
    assert fast.given == slow.given and fast.got == slow.got == b"hi"
    for name in _STATE:
        assert getattr(fast, name) == getattr(slow, name), name


@pytest.mark.parametrize("request_bytes", [
    b"POST / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a:x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: short==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nOrigin: ::bad\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /#f HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
])
def test_autobahn_fast_handshake_leaves_the_rest_to_the_full_path(request_bytes: bytes) -> None:
    """A request the fast path does not take (another method or version, a repeated or folded header, a bad
    port, key, version, origin or target) is left untouched: nothing sent, the connection still connecting."""
    proto, transport = _connecting()
    assert not proto.fast_handshake(request_bytes)
    assert transport.value() == b"" and proto.state == proto.STATE_CONNECTING and not hasattr(proto, "given")
