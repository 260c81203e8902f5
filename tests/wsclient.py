"""
A real WebSocket client for the tests, running in the reactor.

The WebSocket protocol itself is the ``websockets`` library's sans-I/O
``ClientProtocol``, an implementation independent of Autobahn, so framing
mistakes on the server side are caught rather than mirrored.  This file only
moves its bytes over a Twisted TCP connection.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri


class HandshakeRefused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


class WSClient(protocol.Protocol):
    """
    :ivar messages: a DeferredQueue of ``(opcode, payload bytes)`` per data frame.
    :ivar opened: fires with the 101 response, or fails with HandshakeRefused.
    :ivar closed: fires with ``(close code or None, reason)`` when the TCP
        connection ends.
    """

    def __init__(self, uri: str, origin: str | None = None, max_size: int | None = 2**26,
                 extra_headers: Sequence[tuple[str, str]] = (), deflate: bool = False,
                 record: bool = False, subprotocols: Sequence[str] | None = None) -> None:
        extensions = [ClientPerMessageDeflateFactory()] if deflate else None
        self.ws = ClientProtocol(parse_uri(uri), origin=origin, max_size=max_size,  # type: ignore[arg-type]
                                 extensions=extensions, subprotocols=subprotocols)  # type: ignore[arg-type]
        self.extra_headers = extra_headers
        #: every byte received, when ``record`` is true
        self.raw: bytearray | None = bytearray() if record else None
        self.response: Response | None = None
        self.messages: defer.DeferredQueue[tuple[Opcode, bytes]] = defer.DeferredQueue()
        self.opened: defer.Deferred[Response] = defer.Deferred()
        self.closed: defer.Deferred[tuple[int | None, str]] = defer.Deferred()
        self.frames_received = 0
        self.pings_received = 0
        self.pongs_received = 0
        #: opcodes of every frame received, in order (data and control)
        self.opcodes: list[Opcode] = []

    def connectionMade(self) -> None:
        request = self.ws.connect()
        for name, value in self.extra_headers:
            request.headers[name] = value
        self.ws.send_request(request)
        self._flush()

    def dataReceived(self, data: bytes) -> None:
        if self.raw is not None:
            self.raw += data
        self.ws.receive_data(data)
        self._handle_events()
        self._flush()

    def _handle_events(self) -> None:
        for event in self.ws.events_received():
            if isinstance(event, Response):
                self.response = event
                if event.status_code == 101 and self.ws.handshake_exc is None:
                    self.opened.callback(event)
                else:
                    self.opened.errback(HandshakeRefused(event.status_code, event.reason_phrase))
            else:
                self.opcodes.append(event.opcode)
                if event.opcode in (Opcode.TEXT, Opcode.BINARY):
                    self.frames_received += 1
                    self.messages.put((event.opcode, bytes(event.data)))
                elif event.opcode is Opcode.PING:
                    self.pings_received += 1
                elif event.opcode is Opcode.PONG:
                    self.pongs_received += 1

    def _flush(self) -> None:
        for chunk in self.ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:
                self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.ws.receive_eof()
        self._handle_events()
        if not self.opened.called:
            self.opened.errback(HandshakeRefused(0, "connection closed before the handshake ended"))
        rcvd = self.ws.close_rcvd
        self.closed.callback((rcvd.code if rcvd else None, rcvd.reason if rcvd else ""))

    # -- test helpers

    def send_text(self, text: str) -> None:
        self.ws.send_text(text.encode("utf-8"))
        self._flush()

    def send_binary(self, data: bytes) -> None:
        self.ws.send_binary(data)
        self._flush()

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the wire, bypassing the protocol."""
        self.transport.write(data)

    def ping(self, data: bytes = b"") -> None:
        self.ws.send_ping(data)
        self._flush()

    def close(self, code: int = 1000) -> None:
        self.ws.send_close(code)
        self._flush()

    def abort(self) -> None:
        self.transport.abortConnection()

    def wait_closed(self, timeout: float = 10.0) -> defer.Deferred[tuple[int | None, str]]:
        """``(close code, reason)`` once the TCP connection has ended; fails after ``timeout``."""
        d: defer.Deferred[tuple[int | None, str]] = defer.Deferred()
        self.closed.addBoth(lambda r: (d.called or d.callback(r), r)[1])
        return d.addTimeout(timeout, reactor)

    @defer.inlineCallbacks
    def next_message(self, timeout: float = 5.0) -> Any:
        """The next data frame as ``(opcode, payload)``; fails after ``timeout``."""
        d = self.messages.get()
        d.addTimeout(timeout, reactor)
        result = yield d
        return result

    @defer.inlineCallbacks
    def next_json(self, timeout: float = 5.0) -> Any:
        """The next data frame, a text frame, parsed as JSON."""
        import json

        text = yield self.next_text(timeout)
        return json.loads(text)

    def send_json(self, value: Any) -> None:
        import json

        self.send_text(json.dumps(value))

    @defer.inlineCallbacks
    def next_text(self, timeout: float = 5.0) -> Any:
        opcode, payload = yield self.next_message(timeout)
        assert opcode is Opcode.TEXT, f"expected a text frame, got {opcode} {payload!r}"
        return payload.decode("utf-8")

    def pending(self) -> int:
        return len(self.messages.pending)


@defer.inlineCallbacks
def connect(port: int, path: str = "/", **kwargs: Any) -> Any:
    """Connect, wait for the handshake, return the :class:`WSClient`."""
    client = WSClient(f"ws://127.0.0.1:{port}{path}", **kwargs)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    yield endpoint.connect(_Factory(client)).addTimeout(10, reactor)
    yield client.opened.addTimeout(10, reactor)
    return client


@defer.inlineCallbacks
def connect_refused(port: int, path: str = "/", **kwargs: Any) -> Any:
    """Connect expecting a refused handshake; return the HandshakeRefused."""
    client = WSClient(f"ws://127.0.0.1:{port}{path}", **kwargs)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    yield endpoint.connect(_Factory(client))
    try:
        yield client.opened.addTimeout(10, reactor)
    except HandshakeRefused as e:
        yield client.wait_closed()
        return e
    raise AssertionError(f"handshake to {path!r} succeeded; expected a refusal")


class _Factory(protocol.ClientFactory):
    def __init__(self, client: WSClient) -> None:
        self.client = client

    def buildProtocol(self, addr: Any) -> WSClient:
        return self.client


class RawClient(protocol.Protocol):
    """Completes the handshake, then records every byte the server sends."""

    def __init__(self, path: bytes) -> None:
        self.path = path
        self.received = b""
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(
            b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % self.path
        )

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)

    def frames(self) -> list[tuple[int, bytes]]:
        """(opcode, payload) of every frame after the 101 response, parsed from the raw bytes."""
        data = self.received[self.received.index(b"\r\n\r\n") + 4:]
        frames = []
        while data:
            opcode, length = data[0] & 0x0F, data[1] & 0x7F
            start = 2
            if length == 126:
                length, start = struct.unpack("!H", data[2:4])[0], 4
            elif length == 127:
                length, start = struct.unpack("!Q", data[2:10])[0], 10
            frames.append((opcode, data[start:start + length]))
            data = data[start + length:]
        return frames
