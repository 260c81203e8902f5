"""
Event streams on the WebSocket port: the request that asks for one, its
admission (origin, token, caps, the listeners' say, as for a socket), and the
open streams, grouped by channel so each batch is framed once for all of a
channel's streams, with one heartbeat for every stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from zope.interface import implementer

from sockdrawer import _private
from sockdrawer.core.channels import ChannelNameError, channel_from_path, printable
from sockdrawer.core.interfaces import Batch, IChannelHub, ISink
from sockdrawer.core.logs import NamedLogger
from sockdrawer.core.subscriber import SOCKET, Source
from sockdrawer.core.tokens import TokenRefused
from sockdrawer.transports.sse.events import HEARTBEAT, message_event, response_head, retry_hint

#: how often every stream gets a heartbeat comment, and the reconnect delay a stream suggests
HEARTBEAT_INTERVAL = 15.0
RETRY_MS = 2000


@dataclass
class StreamRequest:
    """The parts of a request head a stream needs (names of headers in lower case; the first of each)."""

    method: str
    target: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def query(self, name: str) -> list[str]:
        """Every value of the query parameter ``name``, percent-decoded."""
        _, _, query = self.target.partition("?")
        found = []
        for param in query.split("&"):
            key, eq, value = param.partition("=")
            if eq and unquote(key) == name:
                found.append(unquote(value))
        return found


def event_stream_request(head: bytes) -> StreamRequest | None:
    """
    The request in ``head`` (up to its blank line) if it asks for an event
    stream: a ``GET`` with ``text/event-stream`` in ``Accept`` and no
    ``Upgrade``.  Anything else (a WebSocket handshake, a plain ``GET``) is
    ``None``: the WebSocket side answers it.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"GET":
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers.setdefault(name.strip().lower().decode("latin-1"), value.strip().decode("latin-1"))
    if "upgrade" in headers or "text/event-stream" not in headers.get("accept", ""):
        return None
    return StreamRequest("GET", parts[1].decode("latin-1"), headers)


class StreamRefused(Exception):
    """A stream request refused with ``status`` (the reason goes to the log)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class EventStream:
    """
    One event stream: the HTTP response on a connection of the WebSocket
    port, for one channel.  Slow readers are cut off as sockets are: over
    ``send_buffer`` bytes queued in Twisted's buffer closes the stream.
    """

    __slots__ = ("registry", "transport", "key", "peer", "_tcp", "open")

    def __init__(self, registry: StreamRegistry, transport: Any, key: bytes, peer: str) -> None:
        self.registry = registry
        self.transport = transport
        self.key = key
        self.peer = peer
        self._tcp, _ = _private.tcp_connection(transport)
        self.open = False

    def write(self, data: bytes) -> None:
        if not self.open:
            return
        self.transport.write(data)
        conn = self._tcp
        if conn is not None and _private.write_backlog(conn) > self.registry.send_buffer:
            self.registry.cut_offs += 1
            _log.info("cutting off a slow event stream on {channel!r} from {peer}", channel=printable(self.key),
                      peer=self.peer)
            self.open = False
            self.registry.leave(self)
            self.transport.abortConnection()

    def close(self) -> None:
        """End the stream (at shutdown): the client reconnects after its ``retry`` delay."""
        if self.open:
            self.open = False
            self.registry.leave(self)
        self.transport.loseConnection()

    def lost(self) -> None:
        """The connection is gone."""
        if self.open:
            self.open = False
            self.registry.leave(self)


@implementer(ISink)
class StreamGroup:
    """The open streams of one channel: subscribed to the hub once, each batch framed once for all."""

    __slots__ = ("key", "streams", "registry")

    def __init__(self, key: bytes, registry: StreamRegistry) -> None:
        self.key = key
        self.streams: dict[EventStream, None] = {}
        self.registry = registry

    @property
    def receivers(self) -> int:
        return len(self.streams)

    def receive(self, batch: Batch) -> None:
        data = b"".join(message_event(m) for m in batch.messages)
        self.registry.delivered += len(batch.messages) * len(self.streams)
        for stream in list(self.streams):
            stream.write(data)


class StreamRegistry:
    """
    The event streams of one server: their groups by channel, counters,
    and the heartbeat.

    :param hub: where the groups subscribe.
    :param clock: the reactor.
    :param send_buffer: bytes a stream may have queued before it is cut off.
    """

    def __init__(self, hub: IChannelHub, clock: Any, send_buffer: int,
                 heartbeat: float = HEARTBEAT_INTERVAL) -> None:
        self.hub = hub
        self.clock = clock
        self.send_buffer = send_buffer
        self.groups: dict[bytes, StreamGroup] = {}
        #: streams opened since start, open now, cut off as slow readers; messages written
        self.opened = 0
        self.cut_offs = 0
        self.delivered = 0
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._interval = heartbeat

    @property
    def open_streams(self) -> int:
        return sum(len(g.streams) for g in self.groups.values())

    def join(self, stream: EventStream) -> None:
        group = self.groups.get(stream.key)
        if group is None:
            group = self.groups[stream.key] = StreamGroup(stream.key, self)
            self.hub.subscribe(stream.key, group)
        group.streams[stream] = None
        stream.open = True
        self.opened += 1
        if not self._heartbeat.running and self._interval > 0:
            self._heartbeat.start(self._interval, now=False)

    def leave(self, stream: EventStream) -> None:
        group = self.groups.get(stream.key)
        if group is None or stream not in group.streams:
            return
        del group.streams[stream]
        if not group.streams:
            del self.groups[stream.key]
            self.hub.unsubscribe(stream.key, group)
        if not self.groups and self._heartbeat.running:
            self._heartbeat.stop()

    def _beat(self) -> None:
        for group in list(self.groups.values()):
            for stream in list(group.streams):
                stream.write(HEARTBEAT)


_log = NamedLogger(namespace="sockdrawer.sse")


def open_stream(proto: Any, request: StreamRequest, token: str | None) -> None:
    """
    Answer ``request`` on ``proto``'s connection (a connection of the
    WebSocket port whose head asked for an event stream): the response head
    and the stream, or an error status; the listeners' ``authorize`` may
    decide later.
    """
    factory = proto.factory
    cors: list[tuple[str, str]] = []
    try:
        origin = request.headers.get("origin")
        if origin:
            if not factory.origins.allows(origin):
                raise StreamRefused(403, "origin not allowed")
            cors = [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"),
                    ("Vary", "Origin")]
        try:
            key = channel_from_path(request.path, factory.max_channel_length)
        except ChannelNameError as e:
            raise StreamRefused(400, str(e)) from None
        if factory.open_sockets >= factory.options.max_connections:
            raise StreamRefused(503, "too many connections")
        channel = key.decode("utf-8")
        user = None
        if factory.verifier is not None and (token or not factory.is_public(channel)):
            try:
                grant = factory.verifier.verify(token)
            except TokenRefused as e:
                raise StreamRefused(e.status, e.reason) from None
            if not grant.allows(channel):
                raise StreamRefused(403, "token does not cover this channel")
            user = grant.user
        decision = None
        if factory.authorize is not None:
            decision = factory.authorize(Source(SOCKET, channel, proto.peer, user))
    except StreamRefused as e:
        refuse(proto, e, cors)
        return
    if decision is None:
        _start(proto, key, cors)
        return

    def decided(allowed: bool) -> None:
        if not proto.connected:
            return
        if allowed:
            _start(proto, key, cors)
        else:
            refuse(proto, StreamRefused(403, "refused by a listener"), cors)

    def failed(failure: Any) -> None:
        _log.failure("error while deciding on an event stream from {peer}", failure, peer=proto.peer)
        if proto.connected:
            refuse(proto, StreamRefused(500, "Internal Server Error"), cors)

    d: Deferred[bool] = decision
    d.addCallbacks(decided, failed)


def refuse(proto: Any, refusal: StreamRefused, cors: list[tuple[str, str]]) -> None:
    """An error response for a stream request, then the connection closes."""
    factory = proto.factory
    factory.refusals[refusal.status] = factory.refusals.get(refusal.status, 0) + 1
    if refusal.status != 500:
        _log.info("refused an event stream from {peer}: {code} {reason}", peer=proto.peer, code=refusal.status,
                  reason=refusal.reason)
    try:
        phrase = HTTPStatus(refusal.status).phrase
    except ValueError:
        phrase = "Bad Request"
    body = f"{refusal.status} {phrase}\n".encode()
    proto.transport.write(response_head(refusal.status, phrase, [
        ("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))), *cors]) + body)
    proto.transport.loseConnection()


def _start(proto: Any, key: bytes, cors: list[tuple[str, str]]) -> None:
    stream = proto.stream_opened(key)
    proto.transport.write(response_head(200, "OK", [
        ("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
        # nginx: pass each event on at once instead of buffering the response
        ("X-Accel-Buffering", "no"), *cors]) + retry_hint(RETRY_MS))
    proto.factory.streams.join(stream)
