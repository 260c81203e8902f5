"""
The WebSocket side: an Autobahn server whose sockets join their channel's
group by their path (:mod:`sockdrawer.fanout`), and pass the frames browsers
send to the listeners; a request for an event stream goes to the SSE side.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall

from sockdrawer import _private
from sockdrawer.core.channels import ChannelNameError, channel_from_path, printable
from sockdrawer.core.logs import NamedLogger
from sockdrawer.core.pusher import PusherSession
from sockdrawer.core.subscriber import SOCKET, Source
from sockdrawer.core.tokens import Grant, TokenRefused
from sockdrawer.core.v1 import SUBPROTOCOL, Peer, V1Session
from sockdrawer.transports.sse.connection import StreamingConnection
from sockdrawer.transports.websocket.admission import Admission, uncount
from sockdrawer.transports.websocket.compression import acceptable_offers
from sockdrawer.transports.websocket.fanout import PLAIN, ChannelGroup
from sockdrawer.transports.websocket.frames import TEXT, reply_frame
from sockdrawer.transports.websocket.handshake import _address, merge_extension_headers, take_token
from sockdrawer.transports.websocket.pusherdoor import PATH as PUSHER_PATH
from sockdrawer.transports.websocket.pusherdoor import PusherDoor
from sockdrawer.transports.websocket.sendpath import SendPath
from sockdrawer.transports.websocket.sockets import SocketRegistry

_private.make_log_arguments_lazy()

CLOSE_GOING_AWAY = 1001
CLOSE_INTERNAL_ERROR = 1011
CLOSE_SERVICE_RESTART = 1012
#: the socket's token expired; the client should reconnect with a fresh one
CLOSE_TOKEN_EXPIRED = 4001
_STATE_OPEN = _private.GuardedServerProtocol.STATE_OPEN


class SockDrawerServerProtocol(StreamingConnection, Admission, PusherDoor, SendPath,  # type: ignore[misc]
                               _private.GuardedServerProtocol):
    """
    One browser connection on one channel, a member of that channel's
    :class:`~sockdrawer.fanout.ChannelGroup` for its encoding while it is
    open.

    Slow readers: bytes the kernel does not take wait in Twisted's buffer for
    the socket, in order.  A socket whose buffer grows past ``send_buffer``
    bytes, or stays above Twisted's high-water mark (64 KiB) for
    ``slow_timeout`` seconds, is cut off with close code 1008.
    """

    # a class attribute (Autobahn sets it before copying options): each event on the wire at once
    tcpNoDelay = True

    factory: SocketRegistry
    transport: Any
    closeHandshakeTimeout: float  # an option, from the factory
    _log = NamedLogger(namespace="sockdrawer.websocket.SockDrawerServerProtocol")

    key: bytes | None = None
    #: :data:`~sockdrawer.fanout.PLAIN`, or the permessage-deflate window bits
    encoding = PLAIN
    #: the channel's group while this socket is a member
    _group: ChannelGroup | None = None
    #: the reason of a refusal sockdrawer chose itself (fixed text, safe for the status line)
    _own_reason: str | None = None
    #: the token of a handshake in progress (taken out before Autobahn sees it: never logged)
    _token: str | None = None
    _head = b""  # the request head as received so far, until its blank line
    _head_complete = False
    user: str | None = None  # the ``sub`` of its token, or the connect proxy's user
    _expiry: IDelayedCall | None = None
    #: the client address counted against --max-connections-per-ip
    _counted_ip: str | None = None
    _pending = False
    #: the address counted against --max-pending-handshakes-per-ip while in the handshake
    _pending_ip: str | None = None
    _opened = False
    #: token bucket for frames from the client: tokens left, as of when
    #: the frame rate limit as a virtual schedule (GCRA, the token bucket's one-number form): when the next
    #: frame is due if the client kept to the rate; up to frame_burst - 1 intervals ahead of now are allowed
    _due = 0.0
    _fragments = 0  # frames in the message being received
    #: what this socket's token allows (``None``: no token)
    grant: Grant | None = None
    #: the sockdrawer.v1 (or Pusher) session, for a socket that speaks it
    _session: V1Session | PusherSession | None = None

    @property
    def _v1(self) -> bool:
        """Whether this socket speaks sockdrawer.v1 (its handshake chose the subprotocol)."""
        return bool(self.websocket_protocol_in_use == SUBPROTOCOL)

    # -- Twisted

    def connectionMade(self) -> None:
        super().connectionMade()
        factory = self.factory
        factory.connections[self] = None
        factory.connections_total += 1
        self._pending = True
        factory.pending += 1
        if factory.pending > factory.options.max_pending_handshakes:
            # silent connections must not lock real clients out: drop at once
            factory.refusals[503] = factory.refusals.get(503, 0) + 1
            self.dropConnection(abort=True)
            return
        if not factory.options.trust_x_forwarded_for:
            ip = self.transport.getPeer().host
            if ip:
                # one address may hold only part of the pool: the others still get in
                pending = factory.pending_per_ip.get(ip, 0) + 1
                factory.pending_per_ip[ip] = pending
                self._pending_ip = ip
                if pending > factory.max_pending_per_ip:
                    factory.refusals[503] = factory.refusals.get(503, 0) + 1
                    self.dropConnection(abort=True)
                    return
            self._count_ip(ip)

    def _handshake_over(self) -> None:
        """No longer in the opening handshake (open, or gone): out of the pending counts."""
        factory = self.factory
        state = self.__dict__
        if state.pop("_pending", False):
            factory.pending -= 1
        ip = state.pop("_pending_ip", None)
        if ip is not None:
            uncount(factory.pending_per_ip, ip)

    # -- the outbox of its sockdrawer.v1 session (sockdrawer.core.v1.host.Outbox)

    @property
    def can_send(self) -> bool:
        return bool(self.state == _STATE_OPEN)

    def frame(self, payload: bytes) -> bytes:
        """A text frame of ``payload`` in this socket's encoding."""
        return self.factory.encoders.frame(self.encoding, payload, TEXT)

    write = SendPath.deliver_queued

    def expires(self, when: float) -> None:
        """A refreshed token: closed with 4001 at its expiry, not the old one's."""
        self._cancel_expiry()
        clock = self.factory.clock
        self._expiry = clock.callLater(max(0.0, when - clock.seconds()), self._token_expired)

    def dataReceived(self, data: bytes) -> None:
        if self.streaming:
            return self.stream_data(data)
        if self.state == self.STATE_CONNECTING and not self._head_complete:
            # the request head, collected here: its size capped, a token taken out before Autobahn
            # parses or logs anything, a request for an event stream handed to the SSE side
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if (end if end >= 0 else len(head)) > self.factory.max_handshake_size:
                self._head = b""
                self._own_reason = "Request Header Fields Too Large"
                self.failHandshake(self._own_reason, 431)
                return
            if end < 0:
                self._head = head
                return
            self._head = b""
            self._head_complete = True
            if self.factory.verifier is not None:
                self._token, head = take_token(head)
            if self.take_stream_request(head, end, self._token):
                return
            if head.lower().count(b"\r\nsec-websocket-extensions:", 0, end + 2) > 1:
                head = merge_extension_headers(head)
            elif self.fast_handshake(head):  # the common request, without Autobahn's parser
                return
            data = head
        _private.feed(self, data)
        if self.state == _STATE_OPEN and self._opened:
            _private.settle(self, ("_fragments",))  # what the frames just read left behind, dropped

    def connectionLost(self, reason: Any = None) -> None:
        self.stream_lost()
        self._leave()
        self._cancel_expiry()
        super().connectionLost(reason)
        factory = self.factory
        self._handshake_over()
        if self._opened:
            self._opened = False
            factory.open_sockets -= 1
            self.uncount_user()
        ip, self._counted_ip = self._counted_ip, None
        if ip is not None:
            uncount(factory.per_ip, ip)
        factory._forget(self)
        _private.break_close_cycle(self)

    # -- Autobahn: the opening handshake

    def onConnect(self, request: ConnectionRequest) -> Deferred[None] | None:  # type: ignore[override]
        factory = self.factory
        token, self._token = self._token, None
        if request.version != 13:
            # older drafts carry the origin elsewhere, and no browser uses them: refuse
            self._deny(426, "use WebSocket version 13")
        # the channel comes from the raw request target (Autobahn's request.path went through urlparse)
        target = _private.raw_request_target(self).split("?", 1)[0]
        try:
            key = channel_from_path(target, factory.max_channel_length)
        except ChannelNameError as e:
            self._deny(ConnectionDeny.BAD_REQUEST, str(e))
        if request.origin and not factory.origins.allows(request.origin):
            self._deny(ConnectionDeny.FORBIDDEN, "origin not allowed")
        if factory.options.trust_x_forwarded_for and self._counted_ip is None:
            if not self._count_ip(_address(self.peer)):
                raise ConnectionDeny(429, self._own_reason or "")
        if factory.open_sockets >= factory.options.max_connections:
            self._deny(ConnectionDeny.SERVICE_UNAVAILABLE, "too many connections")
        if factory.pusher is not None and target.startswith(PUSHER_PATH):
            return self.admit_pusher(request, target)  # type: ignore[no-any-return]
        channel = key.decode("utf-8")
        v1 = SUBPROTOCOL in request.protocols and key == b""
        proxy = factory.options.connect_proxy
        if proxy is not None and not token:  # the app's backend says who this is, and what it may read
            return self.ask_connect_proxy(proxy, request, target, key, v1)
        if factory.verifier is not None and (token or not (v1 or factory.is_public(channel))):
            # v1: the token (if any) is checked here, each channel at its subscribe
            try:
                grant = factory.verifier.verify(token)
            except TokenRefused as e:
                self._deny(e.status, e.reason)
            if not v1 and not grant.allows(channel):
                self._deny(ConnectionDeny.FORBIDDEN, "token does not cover this channel")
            self.grant = grant
            self.user = grant.user
            self._expires_at = grant.expires + factory.verifier.leeway
        return self._admitted(request, key, v1)  # type: ignore[no-any-return]

    def _admitted(self, request: ConnectionRequest, key: bytes, v1: bool) -> Any:
        return self.within_user_cap(lambda: self._open_as(request, key, v1))

    def _open_as(self, request: ConnectionRequest, key: bytes, v1: bool) -> Any:
        factory = self.factory
        _private.set_extension_offers(self, acceptable_offers(request.extensions, factory.compression))
        self.key = key
        if v1:
            return SUBPROTOCOL  # Autobahn keeps it (websocket_protocol_in_use): _v1
        if factory.authorize is not None:
            decision = factory.authorize(Source(SOCKET, key.decode("utf-8"), self.peer, self.user))
            if decision is not None:
                return decision.addCallback(self._authorized)
        return None

    def _authorized(self, allowed: bool) -> None:
        if not allowed:
            self._deny(ConnectionDeny.FORBIDDEN, "refused by a listener")

    def handshake_error(self) -> None:
        self._log.failure("error while answering a WebSocket handshake from {peer}", peer=self.peer)
        if self.state == self.STATE_CONNECTING:
            self._own_reason = "Internal Server Error"
            self.failHandshake(self._own_reason, 500)
        elif self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=CLOSE_INTERNAL_ERROR, reasonUtf8=b"internal error", isReply=False)

    def refusing(self, reason: str, code: int, responseHeaders: Any) -> tuple[str, int, Any]:
        # Autobahn puts request details and exception texts into the status
        # line: send the standard phrase, log the detail (one line a refusal)
        factory = self.factory
        factory.refusals[code] = factory.refusals.get(code, 0) + 1
        headers = [h for h in (responseHeaders or []) if h[0].lower() != "sec-websocket-version"]
        if code == 426 or len(headers) != len(responseHeaders or []):
            # an unsupported version: RFC 6455 4.4, and only 13 (version 8 would be refused too)
            code = 426
            responseHeaders = [*headers, ("Sec-WebSocket-Version", "13")]
        # a 500 was logged with its traceback already
        if not (code == 500 and reason == self._own_reason):
            self._log.info("refused a WebSocket handshake from {peer}: {code} {reason}", peer=self.peer, code=code,
                           reason=reason)
        if reason != self._own_reason:
            try:
                reason = HTTPStatus(code).phrase
            except ValueError:
                reason = "Bad Request"
        return reason, code, responseHeaders

    def onOpen(self) -> None:
        key = self.key
        assert key is not None
        factory = self.factory
        state = self.__dict__
        for name in ("_head_complete", "_head", "_token"):  # back to the class defaults
            state.pop(name, None)
        self._handshake_over()
        self._opened = True
        factory.open_sockets += 1
        self.count_user()
        if factory.freezer is not None:
            factory.freezer.opened()
        expires = getattr(self, "_expires_at", None)
        if expires is not None:
            del self._expires_at
            self._expiry = factory.clock.callLater(max(0.0, expires - factory.clock.seconds()),
                                                   self._token_expired)
        self.attach_send_path()
        deflate = _private.negotiated_deflate(self)
        if deflate is not None:
            self.encoding = deflate.server_max_window_bits
            _private.bound_inflation(deflate)
        if self._pusher_open is not None:
            self.open_pusher()
            return
        if self._v1:
            # v1 frames go straight to the kernel too while nothing waits in
            # Twisted's buffer (deliver_queued checks), else through it, in order
            peer = Peer(self.peer, self.user, self.grant, self._counted_ip)
            self._session = V1Session(factory.sessions, self, peer)
            self._session._client = self.client_id  # its webhook events' id (if any)
            return
        self.factory.join(key, self)

    # -- Autobahn: open

    def onMessageBegin(self, isBinary: bool) -> None:
        self._fragments = 0
        super().onMessageBegin(isBinary)

    def onMessageFrameBegin(self, length: int) -> None:
        # every frame counts, before any reaches a listener: endless empty fragments cost as a flood does
        if self.state == _STATE_OPEN:
            if not self._take_frame():
                return  # failed: Autobahn ignores the rest of the frame
            self._fragments += 1
            if self._fragments > self.factory.options.max_fragments:
                _private.fail_connection(self, 1009, "too many fragments")
                return
        # after our own close (shutdown, expiry) frames are still parsed, and
        # dropped at onMessage: the socket has left its channel
        super().onMessageFrameBegin(length)

    def onPing(self, payload: bytes) -> None:
        if self._take_frame():
            super().onPing(payload)

    def _take_frame(self) -> bool:
        """Take one frame from the socket's token bucket (``_due``); close with 1008 when it is empty."""
        if self.state != _STATE_OPEN:
            return False
        self.factory.frames_received += 1
        settings = self.factory.options
        now = self.factory.clock.seconds()
        interval = 1.0 / settings.max_frames_per_second
        due = max(self._due, now)
        # the burst spent: over the rate (a millionth of an interval of slack for the sum's rounding)
        if due - now > (settings.frame_burst - 1 + 1e-6) * interval:
            self.over_rate_limit()
            return False
        self._due = due + interval
        return True

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        session = self._session
        if session is not None:
            try:
                session.received(payload, isBinary)
            except Exception:
                # a frame the session could not handle: this socket only, one
                # traceback a minute at most (a client cannot flood the log)
                factory = self.factory
                now = factory.clock.seconds()
                if now - factory.last_frame_failure_logged >= 60.0:
                    factory.last_frame_failure_logged = now
                    self._log.failure("a sockdrawer.v1 frame failed (logged at most once a minute); "
                                      "closing that socket with 1011")
                factory.frame_failures += 1
                _private.fail_connection(self, CLOSE_INTERNAL_ERROR, "internal error")
            return
        handler = self.factory.frame_handler
        if handler is None or self._group is None or self.key is None:
            return
        message: str | bytes = payload if isBinary else payload.decode("utf-8")
        source = Source(SOCKET, self.key.decode("utf-8"), self.peer, self.user)
        for d in handler(source, message):
            d.addCallback(self._reply)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._leave()

    def sendData(self, data: bytes, sync: bool = False, chopsize: int | None = None) -> None:
        if not (sync or chopsize):
            sent = self.send_now(data)
            if sent == len(data):
                return
            data = data[sent:]
        # What did not go straight to the kernel (the handshake's answer, pings, pongs, close frames,
        # replies) goes through Twisted's buffer; until that has drained, the group must not write past it.
        group = self._group
        self.queueing()
        super().sendData(data, sync, chopsize)
        if (group is not None and self._group is group) or self._session is not None:
            # pongs and replies to a client that sends but never reads count against its limits too
            self._check_backlog(len(data))

    def closing(self) -> None:
        # no data frame may follow a close frame: leave the channel first
        self._leave()

    def closed_frame(self, isReply: bool) -> None:
        if not isReply and not self.closeHandshakeTimeout and self.state == self.STATE_CLOSING:
            # no close handshake timer to drop a peer that never answers:
            # close TCP once the close frame is written (at once for a slow
            # reader, whose backlog may never drain)
            self.dropConnection(abort=self._abort_on_close)

    # -- own

    def close_for_shutdown(self, code: int = CLOSE_SERVICE_RESTART) -> None:
        """Start a clean close at server shutdown: 1012 (service restart) or 1001 (going away)."""
        if self.streaming:
            self.transport.loseConnection()  # an event stream ends (its client comes back after retry)
        elif self.state == self.STATE_OPEN:
            reason = b"service restart" if code == CLOSE_SERVICE_RESTART else b"server shutting down"
            self.sendCloseFrame(code=code, reasonUtf8=reason, isReply=False)
        elif self.state == self.STATE_CONNECTING:
            self.dropConnection(abort=True)

    def _token_expired(self) -> None:
        self._expiry = None
        if self.state == self.STATE_OPEN:
            self.sendCloseFrame(code=CLOSE_TOKEN_EXPIRED, reasonUtf8=b"token expired", isReply=False)

    def _cancel_expiry(self) -> None:
        timer, self._expiry = self._expiry, None
        if timer is not None and timer.active():
            timer.cancel()

    def _leave(self) -> None:
        self._cancel_slow_timer()
        if self._group is not None:
            self.factory.leave(self)
        session = self._session
        if session is not None:
            self._session = None
            session.close()

    def _reply(self, result: Any) -> None:
        if result is None or self.state != self.STATE_OPEN:
            return
        try:
            payload, opcode = reply_frame(result)
        except TypeError as e:
            self._log.error("listener reply on {channel!r} {error}", channel=printable(self.key), error=e)
            return
        limit = self.factory.max_reply_size
        if len(payload) > limit:
            self._log.warn(
                "listener reply of {size} bytes on {channel!r} not sent: over --max-reply-size ({limit})",
                size=len(payload),
                channel=printable(self.key),
                limit=limit,
            )
            return
        self.sendData(self.factory.encoders.frame(self.encoding, payload, opcode))

    def __repr__(self) -> str:
        return f"<SockDrawerServerProtocol {self.key!r} {self.peer}>"


_private.install_compact_defaults(SockDrawerServerProtocol)
