"""
Event streams on the WebSocket port: the request that asks for one, its
admission (origin, token, caps, the listeners' say, as for a socket), and the
open streams, grouped by channel so each batch is framed once for all of a
channel's streams, with one heartbeat for every stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from twisted.internet.task import LoopingCall
from zope.interface import implementer

from sockdrawer import _private
from sockdrawer.core.channels import printable
from sockdrawer.core.interfaces import Batch, IChannelHub, ISink
from sockdrawer.core.logs import NamedLogger
from sockdrawer.transports.sse.events import HEARTBEAT, message_event, response_head, retry_hint
from sockdrawer.transports.websocket.fanout import FanoutStats

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
    The request in ``head`` (up to its blank line) if it is one for the
    event-stream side: a ``GET`` with ``text/event-stream`` in ``Accept`` and
    no ``Upgrade`` (a stream), a ``POST`` to ``/?stream=<id>`` (an op for
    that stream's session), or an ``OPTIONS`` preflight for such a post.
    Anything else (a WebSocket handshake, a plain ``GET``) is ``None``: the
    WebSocket side answers it.
    """
    if head.startswith(b"GET ") and b"text/event-stream" not in head:
        return None  # a WebSocket handshake (or a plain GET): no parsing on its way
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] not in (b"GET", b"POST", b"OPTIONS"):
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if colon:
            headers.setdefault(name.strip().lower().decode("latin-1"), value.strip().decode("latin-1"))
    request = StreamRequest(parts[0].decode("ascii"), parts[1].decode("latin-1"), headers)
    if "upgrade" in headers:
        return None
    if request.method == "GET":
        return request if "text/event-stream" in headers.get("accept", "") else None
    return request if request.path == "/" and request.query("stream") else None


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

    __slots__ = ("registry", "transport", "key", "peer", "_tcp", "_sock", "open", "session", "id", "expiry", "user")

    def __init__(self, registry: StreamRegistry, transport: Any, key: bytes | None, peer: str) -> None:
        self.registry = registry
        self.transport = transport
        #: the channel of a raw stream; ``None`` for a sockdrawer.v1 stream (its session has the channels)
        self.key = key
        self.peer = peer
        self._tcp, direct = _private.tcp_connection(transport)
        #: the socket, for writes straight to the kernel while nothing waits in Twisted's buffer (not TLS)
        self._sock = self._tcp.getHandle() if self._tcp is not None and direct else None
        self.open = False
        #: the sockdrawer.v1 session of a v1 stream
        self.session: Any = None
        #: a v1 stream's secret name, for the ops its page posts (``None`` until given one)
        self.id: str | None = None
        #: when its token expires, the stream ends
        self.expiry: Any = None
        #: who a raw stream's token or connect proxy said it is
        self.user: str | None = None

    def write(self, data: bytes) -> None:
        if not self.open:
            return
        conn, sock = self._tcp, self._sock
        if sock is not None and conn is not None and not _private.has_write_backlog(conn):
            # as the WebSocket fan-out does: one send, no trip through the reactor's write loop
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        self.transport.write(data)
        if conn is not None and _private.write_backlog(conn) > self.registry.send_buffer:
            self.registry.cut_offs += 1
            _log.info("cutting off a slow event stream on {channel!r} from {peer}",
                      channel=printable(self.key or b"sockdrawer.v1"), peer=self.peer)
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
        stats = self.registry.stats
        stats.deliveries += len(batch.messages) * len(self.streams)
        stats.bytes_sent += len(data) * len(self.streams)
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
        #: every open stream, raw or sockdrawer.v1; v1 streams by id
        self.streams: dict[EventStream, None] = {}
        self.by_id: dict[str, EventStream] = {}
        #: what the sockdrawer.v1 sessions of streams share (set by the server)
        self.sessions: Any = None
        #: streams opened since start, open now, cut off as slow readers; messages written
        self.opened = 0
        self.cut_offs = 0
        #: messages times streams, and bytes, written (a v1 subscription takes back what it did not send)
        self.stats = FanoutStats()
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = clock
        self._interval = heartbeat
        #: told of channels' first and last connections (--webhook; the server's registry sets it)
        self.lifecycle: Any = None

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    def join(self, stream: EventStream) -> None:
        """A stream opens: a raw one joins its channel's group."""
        key = stream.key
        if key is not None:
            group = self.groups.get(key)
            if group is None:
                group = self.groups[key] = StreamGroup(key, self)
                self.hub.subscribe(key, group)
            group.streams[stream] = None
            if self.lifecycle is not None:
                self.lifecycle.joined(key)
        self.streams[stream] = None
        stream.open = True
        self.opened += 1
        if not self._heartbeat.running and self._interval > 0:
            self._heartbeat.start(self._interval, now=False)

    def leave(self, stream: EventStream) -> None:
        """A stream ends: out of its group (the last one out unsubscribes it), its session closed."""
        if stream not in self.streams:
            return
        del self.streams[stream]
        expiry, stream.expiry = stream.expiry, None
        if expiry is not None and expiry.active():
            expiry.cancel()
        if stream.id is not None:
            self.by_id.pop(stream.id, None)
        session, stream.session = stream.session, None
        if session is not None:
            session.close()
        key = stream.key
        group = self.groups.get(key) if key is not None else None
        if group is not None and stream in group.streams:
            del group.streams[stream]
            if self.lifecycle is not None:
                self.lifecycle.left(group.key)
            if not group.streams:
                del self.groups[group.key]
                self.hub.unsubscribe(group.key, group)
        if not self.streams and self._heartbeat.running:
            self._heartbeat.stop()

    def _beat(self) -> None:
        for stream in list(self.streams):
            stream.write(HEARTBEAT)


_log = NamedLogger(namespace="sockdrawer.sse")


def start_response(proto: Any, key: bytes | None, cors: list[tuple[str, str]], grant: Any = None) -> EventStream:
    """
    The response head and the retry hint; the stream, counted as open.  A
    stream opened with a token ends when the token expires (as a socket is
    closed with 4001): the browser comes back with a fresh one.
    """
    stream: EventStream = proto.stream_opened(key)
    stream.user = grant.user if grant is not None else None
    factory = proto.factory
    if grant is not None and grant.expires != float("inf"):
        leeway = factory.verifier.leeway if factory.verifier is not None else 0.0
        clock = factory.clock
        stream.expiry = clock.callLater(max(0.0, grant.expires + leeway - clock.seconds()), stream.close)
    proto.transport.write(response_head(200, "OK", [
        ("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache"),
        # nginx: pass each event on at once instead of buffering the response
        ("X-Accel-Buffering", "no"), *cors]) + retry_hint(RETRY_MS))
    proto.factory.streams.join(stream)
    return stream
