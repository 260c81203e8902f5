"""
The WebSocket side: an Autobahn server whose sockets subscribe to the hub by
their path, receive the hub's batches as ready-made frames, and pass the
frames browsers send to the listeners.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable, Sequence
from http import HTTPStatus
from typing import Any, NoReturn
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.util import wildcards2patterns
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet import tcp
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from zope.interface import implementer

from ._autobahn import make_log_arguments_lazy
from ._channels import DEFAULT_MAX_CHANNEL_LENGTH, ChannelNameError, channel_from_path
from .interfaces import Batch, IChannelHub, ISink
from .subscriber import SOCKET, Source

#: Called with each frame a browser sends: returns one Deferred per handler,
#: each firing with the reply to send back (or ``None``).
FrameHandler = Callable[[Source, "str | bytes"], Sequence[Deferred[Any]]]

make_log_arguments_lazy()

CLOSE_GOING_AWAY = 1001
_STATE_OPEN = WebSocketServerProtocol.STATE_OPEN
# Attributes Autobahn's server keeps from the opening handshake and never
# reads once the socket is open.
_HANDSHAKE_STATE = (
    "http_headers",
    "http_request_data",
    "http_status_line",
    "http_request_uri",
    "http_request_path",
    "http_request_params",
    "http_request_host",
    "websocket_protocols",
    "websocket_extensions",
    "websocket_origin",
    "_wskey",
    "http_response_data",
    "websocket_extensions_in_use",  # only read while negotiating
)
# Attributes Autobahn sets on every connection (in _connectionMade and the
# handshake, before any read) whose values usually stay these defaults: as
# class attributes they need no room in each idle socket's dict.
_COMPACT_DEFAULTS: dict[str, Any] = {
    name: False
    for name in (
        "triggered", "wasMaxFramePayloadSizeExceeded", "wasMaxMessagePayloadSizeExceeded",
        "closedByMe", "failedByMe", "droppedByMe", "wasClean", "wasServerConnectionDropTimeout",
        "wasOpenHandshakeTimeout", "wasCloseHandshakeTimeout", "wasServingFlashSocketPolicyFile",
        "inside_message",
    )
}
_COMPACT_DEFAULTS.update(
    (name, None)
    for name in (
        "_perMessageCompress", "trackedTimings", "wasNotCleanReason", "localCloseCode",
        "localCloseReason", "remoteCloseCode", "remoteCloseReason", "openHandshakeTimeoutCall",
        "closeHandshakeTimeoutCall", "autoPingTimeoutCall", "autoPingPending", "autoPingPendingSent",
        "websocket_protocol_in_use", "current_frame",
    )
)
_COMPACT_DEFAULTS.update(send_state=WebSocketServerProtocol.SEND_STATE_GROUND, autoPingPendingSeq=0, data=b"")
_HIGH_WATER = 64 * 1024


def _is_tcp(transport: Any) -> bool:
    return isinstance(transport, tcp.Connection) and hasattr(transport, "_tempDataLen")
CLOSE_POLICY_VIOLATION = 1008


def encode_frame(message: bytes) -> bytes:
    """
    One unmasked, unfragmented server frame for ``message`` (RFC 6455 5.2): a
    text frame when it is valid UTF-8, a binary frame otherwise.  Payload
    bytes are unchanged.

    This is what Autobahn's ``PreparedMessage(..., applyMask=False,
    doNotCompress=True).payloadHybi`` builds, without the object around it:
    the frames of a batch are joined here anyway, and at 100,000 messages a
    second the object costs more than the framing.
    """
    try:
        message.decode("utf-8")
        opcode = 0x81  # FIN + text
    except UnicodeDecodeError:
        opcode = 0x82  # FIN + binary
    length = len(message)
    if length < 126:
        return bytes((opcode, length)) + message
    if length < 0x10000:
        return _HEADER_16(opcode, 126, length) + message
    return _HEADER_64(opcode, 127, length) + message


_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


def encode_batch(messages: Sequence[bytes]) -> bytes:
    """The frames of ``messages``, in order, joined for one write."""
    if len(messages) == 1:
        return encode_frame(messages[0])
    return b"".join([encode_frame(m) for m in messages])


class SockDrawerServerProtocol(WebSocketServerProtocol):
    """
    One browser connection on one channel, a member of that channel's
    :class:`ChannelGroup` while it is open.

    Slow readers: bytes the kernel does not take wait in Twisted's buffer for
    the socket, in order.  A socket whose buffer grows past ``send_buffer``
    bytes, or stays above Twisted's high-water mark (64 KiB) for
    ``slow_timeout`` seconds, is cut off with close code 1008.
    """

    # Autobahn calls transport.setTcpNoDelay(self.tcpNoDelay) before copying
    # the factory's options, so the option must exist on the class
    # (STACK-NOTES 2.3).  A push service wants each event on the wire at once.
    tcpNoDelay = True

    factory: SockDrawerServerFactory
    transport: Any
    closeHandshakeTimeout: float  # an option, from the factory
    _log = Logger()

    key: bytes | None = None
    #: the channel's group while this socket is a member
    _group: ChannelGroup | None = None
    #: the socket, when the transport is a plain TCP or UNIX connection whose
    #: buffer the fast path may bypass (not TLS)
    _sock: socket.socket | None = None
    #: the Twisted TCP connection whose write buffer holds this socket's
    #: backlog (the transport itself, or the one under TLS)
    _tcp: tcp.Connection | None = None
    _slow_timer: IDelayedCall | None = None

    # -- Twisted

    def connectionMade(self) -> None:
        super().connectionMade()
        self.factory.connections[self] = None

    def dataReceived(self, data: bytes) -> None:
        # autobahn's own dataReceived formats a debug line per read; skip it.
        if self.state == self.STATE_CONNECTING:
            limit = self.factory.max_handshake_size
            if len(self.data) + len(data) > limit:
                self.data = b""
                self._own_reason = "Request Header Fields Too Large"
                self.failHandshake(self._own_reason, 431)
                return
        self._dataReceived(data)

    def connectionLost(self, reason: Any = None) -> None:
        self._leave()
        super().connectionLost(reason)
        self.factory._forget(self)
        # Autobahn resolves is_closed with the protocol itself: a reference
        # cycle that only Python's cyclic GC would free, and full collections
        # over thousands of connections pause the reactor for tens of ms.
        # Without it, a closed connection is freed at once by refcounting.
        if self.is_closed.called:
            self.is_closed = succeed(None)

    # -- Autobahn

    def onConnect(self, request: ConnectionRequest) -> None:
        # The channel comes from the raw request target: Autobahn's
        # request.path went through urlparse, which drops ";params" and reads
        # "//a/b" as a host name.
        target = self.http_request_uri.split("?", 1)[0]
        try:
            key = channel_from_path(target, self.factory.max_channel_length)
        except ChannelNameError as e:
            self._deny(ConnectionDeny.BAD_REQUEST, str(e))
        if request.origin and not self.factory.origin_allowed(request.origin):
            self._deny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        self.key = key
        return None

    def _deny(self, code: int, reason: str) -> NoReturn:
        # a reason of our own, fixed text: safe for the status line
        self._own_reason = reason
        raise ConnectionDeny(code, reason)

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        # Autobahn puts request details (method, version, Host header) and
        # exception texts into the status line; send the standard phrase
        # instead, and log the detail.
        if reason != getattr(self, "_own_reason", None):
            self._log.info("refused a WebSocket handshake from {peer}: {reason}", peer=self.peer, reason=reason)
            try:
                reason = HTTPStatus(code).phrase
            except ValueError:
                reason = "Bad Request"
        super().failHandshake(reason, code, responseHeaders)

    def onOpen(self) -> None:
        key = self.key
        assert key is not None
        transport = self.transport
        if _is_tcp(transport):
            self._tcp = transport
            # With ssl: endpoints the TCP connection itself carries TLS
            # (Twisted's startTLS); its bytes must go through the TLS layer.
            if not getattr(transport, "TLS", False):
                self._sock = transport.socket
        elif _is_tcp(getattr(transport, "transport", None)):  # a TLS wrapper protocol
            self._tcp = transport.transport
        self._compact()
        self.factory.join(key, self)

    def _compact(self) -> None:
        # An idle socket's memory is mostly its instance dict.  Drop the
        # opening handshake (never read again once open) and every attribute
        # that holds its class default, then rebuild the dict: deleting keys
        # never shrinks a dict.
        state = self.__dict__
        for name in _HANDSHAKE_STATE:
            state.pop(name, None)
        for name, default in _COMPACT_DEFAULTS.items():
            if name in state:
                value = state[name]
                if value is default or (type(value) is type(default) and value == default):
                    del state[name]
        self.__dict__ = dict(state)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        handler = self.factory.frame_handler
        if handler is None or self._group is None or self.key is None:
            return
        message: str | bytes = payload if isBinary else payload.decode("utf-8")
        source = Source(SOCKET, self.key.decode("utf-8"), self.peer)
        for d in handler(source, message):
            d.addCallback(self._reply)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._leave()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        # Everything Autobahn sends (handshake, pings, pongs, replies, close
        # frames) goes through Twisted's buffer; until that has drained, the
        # group must not write past it.
        group = self._group
        if group is not None:
            group.demote(self)
        super().sendData(data, sync, chopsize)
        if group is not None and self._group is group:
            # pongs and replies to a client that sends but never reads
            # count against its limits too
            self._check_backlog(len(data))

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                       isReply: bool = False) -> None:
        # no data frame may follow a close frame: leave the channel first
        self._leave()
        super().sendCloseFrame(code, reasonUtf8, isReply)

    # -- delivery, driven by the ChannelGroup

    def _deliver_slow(self, data: bytes) -> None:
        """Deliver ``data`` to a member that is not on the direct path."""
        if self.state != _STATE_OPEN:
            return
        conn = self._tcp
        sock = self._sock
        if sock is not None and conn is not None and not conn._tempDataLen and not conn.dataBuffer:
            # Twisted's buffer has drained: back to direct sends
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                group = self._group
                if group is not None:
                    group.promote(self)
                return
            if sent:
                data = data[sent:]
        self.transport.write(data)
        self._check_backlog(len(data))

    def _backlog(self, rest: bytes) -> None:
        """The kernel did not take all of a direct send: queue the rest in Twisted."""
        group = self._group
        if group is not None:
            group.demote(self)
        self.transport.write(rest)
        self._check_backlog(len(rest))

    def _check_backlog(self, just_queued: int) -> None:
        """
        Enforce the slow-reader limits after ``just_queued`` bytes went into
        Twisted's buffer: over ``send_buffer`` bytes queued *before* them
        means the socket fell that far behind; above the high-water mark
        starts (or keeps) the ``slow_timeout`` clock.
        """
        buffered = self._buffered()
        if buffered > _HIGH_WATER:
            factory = self.factory
            if buffered - just_queued > factory.send_buffer:
                self._cut_off("queued too much")
            elif self._slow_timer is None and factory.slow_timeout > 0:
                self._slow_timer = factory.clock.callLater(factory.slow_timeout, self._check_slow)

    def _buffered(self) -> int:
        """Bytes waiting in Twisted for this socket."""
        conn = self._tcp
        if conn is None:
            return 0
        pending: int = conn._tempDataLen + len(conn.dataBuffer) - conn.offset
        return pending

    def _check_slow(self) -> None:
        self._slow_timer = None
        if self._group is not None and self._buffered() > _HIGH_WATER:
            self._cut_off("stayed too slow")

    # -- own

    def close_going_away(self) -> None:
        """Start a clean close with code 1001, as at server shutdown."""
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=CLOSE_GOING_AWAY, reasonUtf8=b"server shutting down", isReply=False)
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def _cut_off(self, why: str) -> None:
        self._cancel_slow_timer()
        if self.state != self.STATE_OPEN:
            return
        self._log.info(
            "cutting off a slow reader on {channel!r} from {peer}: {why}",
            channel=self.key,
            peer=self.peer,
            why=why,
        )
        self.factory.slow_cut_offs += 1
        self.sendCloseFrame(code=CLOSE_POLICY_VIOLATION, reasonUtf8=b"slow reader", isReply=False)
        if not self.closeHandshakeTimeout:
            self.dropConnection(abort=True)

    def _cancel_slow_timer(self) -> None:
        timer, self._slow_timer = self._slow_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _leave(self) -> None:
        self._cancel_slow_timer()
        if self._group is not None:
            self.factory.leave(self)

    def _reply(self, result: Any) -> None:
        if result is None or self.state != self.STATE_OPEN:
            return
        if isinstance(result, str):
            self.sendMessage(result.encode("utf-8"), isBinary=False)
        elif isinstance(result, (bytes, bytearray, memoryview)):
            self.sendMessage(bytes(result), isBinary=True)
        elif isinstance(result, (dict, list)):
            try:
                text = json.dumps(result)
            except (TypeError, ValueError) as e:
                self._log.error("listener reply on {channel!r} is not JSON: {error}", channel=self.key, error=e)
                return
            self.sendMessage(text.encode("utf-8"), isBinary=False)
        else:
            self._log.error(
                "listener reply on {channel!r} has type {type}; return str, bytes, dict, list or None",
                channel=self.key,
                type=type(result).__name__,
            )

    def __repr__(self) -> str:
        return f"<SockDrawerServerProtocol {self.key!r} {self.peer}>"


for _name, _default in _COMPACT_DEFAULTS.items():
    setattr(SockDrawerServerProtocol, _name, _default)


@implementer(ISink)
class ChannelGroup:
    """
    The open sockets of one channel: one sink of the hub for all of them.

    Each batch is framed once, then written to every member.  Members whose
    Twisted write buffer is empty (plain TCP or UNIX, no TLS) are *direct*:
    the frames go straight to the kernel with one ``send()``, which saves the
    two ``epoll_ctl`` calls of Twisted's startWriting/stopWriting and a
    reactor turn per socket, and the loop over them touches nothing but the
    sockets.  A member becomes *queued* as soon as anything waits in its
    Twisted buffer (the kernel took only part of a write, or Autobahn sent a
    ping, pong, reply or close frame): its frames then go through the
    transport, in order, until the buffer has drained.
    """

    __slots__ = ("key", "_direct", "_queued", "_direct_items")

    def __init__(self, key: bytes) -> None:
        self.key = key
        #: direct members, each with its socket's bound ``send``
        self._direct: dict[SockDrawerServerProtocol, Callable[[bytes], int]] = {}
        self._queued: dict[SockDrawerServerProtocol, None] = {}
        self._direct_items: tuple[tuple[SockDrawerServerProtocol, Callable[[bytes], int]], ...] | None = None

    def __len__(self) -> int:
        return len(self._direct) + len(self._queued)

    @property
    def receivers(self) -> int:
        """The number of sockets in the group."""
        return len(self)

    def add(self, proto: SockDrawerServerProtocol) -> None:
        proto._group = self
        self._queued[proto] = None  # the first batch finds out whether it can go direct

    def remove(self, proto: SockDrawerServerProtocol) -> None:
        proto._group = None
        if self._direct.pop(proto, None) is not None:
            self._direct_items = None
        self._queued.pop(proto, None)

    def demote(self, proto: SockDrawerServerProtocol) -> None:
        if self._direct.pop(proto, None) is not None:
            self._direct_items = None
            self._queued[proto] = None

    def promote(self, proto: SockDrawerServerProtocol) -> None:
        sock = proto._sock
        if sock is not None and proto in self._queued:
            del self._queued[proto]
            self._direct[proto] = sock.send
            self._direct_items = None

    def receive(self, batch: Batch) -> None:
        data = batch.encoded
        if data is None:
            data = batch.encoded = encode_batch(batch.messages)
        # the queued members as they are now: a direct member demoted in the
        # loop below already has this batch in its Twisted buffer
        queued = tuple(self._queued) if self._queued else ()
        direct = self._direct_items
        if direct is None:
            direct = self._direct_items = tuple(self._direct.items())
        size = len(data)
        for proto, send in direct:
            try:
                sent = send(data)
            except OSError:
                # EAGAIN, or a socket being torn down (Twisted finds out on
                # its own): queue it and let Twisted deal with it
                sent = 0
            if sent != size:
                proto._backlog(data[sent:] if sent else data)
        for proto in queued:
            if proto._group is self:
                proto._deliver_slow(data)

    def __repr__(self) -> str:
        return f"<ChannelGroup {self.key!r} direct={len(self._direct)} queued={len(self._queued)}>"


class SockDrawerServerFactory(WebSocketServerFactory):
    """
    Builds :class:`SockDrawerServerProtocol` connections with safe, finite
    options: no status page (no open redirect), no ``Server`` header, size
    limits on incoming frames and messages, handshake timeouts, auto-ping.

    :param hub: where sockets subscribe.
    :param frame_handler: gets the frames browsers send; ``None`` ignores them.
    :param clock: the reactor, for the slow-reader timer.
    """

    protocol = SockDrawerServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        hub: IChannelHub,
        frame_handler: FrameHandler | None = None,
        *,
        clock: Any = None,
        max_message_size: int = 64 * 1024,
        max_channel_length: int = DEFAULT_MAX_CHANNEL_LENGTH,
        max_handshake_size: int = 16 * 1024,
        max_connections: int = 50_000,
        open_handshake_timeout: float = 5.0,
        close_handshake_timeout: float = 1.0,
        auto_ping_interval: float = 25.0,
        auto_ping_timeout: float = 10.0,
        send_buffer: int = 1024 * 1024,
        slow_timeout: float = 10.0,
        allowed_origins: Sequence[str] = ("*",),
        trust_x_forwarded_for: int = 0,
    ) -> None:
        super().__init__(server="")
        if clock is None:
            from twisted.internet import reactor as clock
        self.hub = hub
        self.frame_handler = frame_handler
        self.clock = clock
        self.max_channel_length = max_channel_length
        self.max_handshake_size = max_handshake_size
        self.send_buffer = send_buffer
        self.slow_timeout = slow_timeout
        self.connections: dict[SockDrawerServerProtocol, None] = {}
        self.groups: dict[bytes, ChannelGroup] = {}
        self.slow_cut_offs = 0
        self._any_origin = "*" in allowed_origins
        self._origin_patterns = wildcards2patterns(list(allowed_origins))
        self._empty_waiters: list[Deferred[None]] = []
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=max_message_size,
            maxMessagePayloadSize=max_message_size,
            maxConnections=max_connections,
            openHandshakeTimeout=open_handshake_timeout,
            closeHandshakeTimeout=close_handshake_timeout,
            autoPingInterval=auto_ping_interval,
            autoPingTimeout=auto_ping_timeout,
            # origins are checked in onConnect, to answer 403 with a fixed reason
            allowedOrigins=["*"],
            allowNullOrigin=True,
            trustXForwardedFor=trust_x_forwarded_for,
            # send the close code (1002, 1007, 1009) instead of just dropping TCP
            failByDrop=False,
        )

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        """
        As Autobahn's, and the options become class attributes of this
        factory's own protocol subclass: Autobahn then copies nothing into
        each connection (35 attributes, and a pretty-printed debug line it
        formats even with debug logging off), which saves memory and
        handshake time per socket.
        """
        super().setProtocolOptions(*args, **kwargs)
        base = SockDrawerServerProtocol
        options: dict[str, Any] = {name: getattr(self, name) for name in base.CONFIG_ATTRS}
        for name, value in options.items():
            # a plain function stored on a class becomes a method (an extra
            # argument): Autobahn's perMessageCompressionAccept is one
            if callable(value):
                options[name] = staticmethod(value)
        options["CONFIG_ATTRS"] = ()
        self.protocol = type(base.__name__, (base,), options)  # type: ignore[assignment]

    def origin_allowed(self, origin: str) -> bool:
        """
        Whether a browser from ``origin`` may connect: the origin, as
        ``scheme://host:port`` with the port always filled in, must match one
        of the allowed patterns.  ``null`` (file pages, sandboxes) passes only
        when any origin is allowed.
        """
        if self._any_origin:
            return True
        try:
            parts = urlsplit(origin.strip())
            port = parts.port or {"https": 443, "http": 80}.get(parts.scheme.lower())
        except ValueError:
            return False
        if not parts.hostname or port is None:
            return False
        normalized = f"{parts.scheme.lower()}://{parts.hostname}:{port}"
        return any(p.match(normalized) for p in self._origin_patterns)

    def join(self, key: bytes, proto: SockDrawerServerProtocol) -> None:
        """Add an open socket to its channel's group (subscribing the group)."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = ChannelGroup(key)
            self.hub.subscribe(key, group)
        group.add(proto)

    def leave(self, proto: SockDrawerServerProtocol) -> None:
        """Take a socket out of its group; the last one out unsubscribes the group."""
        group = proto._group
        if group is None:
            return
        group.remove(proto)
        if not len(group) and self.groups.get(group.key) is group:
            del self.groups[group.key]
            self.hub.unsubscribe(group.key, group)

    def sockets(self, key: bytes) -> int:
        """How many open sockets are on channel ``key``."""
        group = self.groups.get(key)
        return len(group) if group is not None else 0

    def when_all_closed(self) -> Deferred[None]:
        """A Deferred that fires once no connection is left."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._empty_waiters.append(d)
        return d

    def _forget(self, proto: SockDrawerServerProtocol) -> None:
        self.connections.pop(proto, None)
        if not self.connections and self._empty_waiters:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)
