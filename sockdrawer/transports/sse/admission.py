"""
Whether a request for an event stream is answered with one: the origin (with
CORS headers for an allowed one), the channel, the connection cap, the token
and the listeners' ``authorize``, as for a socket; a refusal is a plain HTTP
answer.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from autobahn.websocket.types import ConnectionDeny
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from sockdrawer.core.channels import ChannelNameError, channel_from_path
from sockdrawer.core.logs import NamedLogger
from sockdrawer.core.subscriber import SOCKET, Source
from sockdrawer.core.tokens import Grant, TokenRefused
from sockdrawer.transports.sse.events import response_head
from sockdrawer.transports.sse.stream import StreamRefused, StreamRequest, start_response
from sockdrawer.transports.sse.v1 import post_op, start_v1_stream, v1_positions
from sockdrawer.transports.websocket.handshake import _address

_log = NamedLogger(namespace="sockdrawer.sse")


def open_stream(proto: Any, request: StreamRequest, token: str | None) -> None:
    """
    Answer ``request`` on ``proto``'s connection (a connection of the
    WebSocket port whose head asked for an event stream): the response head
    and the stream, or an error status; the connect proxy and the listeners'
    ``authorize`` may decide later.
    """
    factory = proto.factory
    cors: list[tuple[str, str]] = []
    try:
        allowed = _cors(proto, request)
        if allowed is None:
            raise StreamRefused(403, "origin not allowed")
        cors = allowed
        try:
            key = channel_from_path(request.path, factory.max_channel_length)
        except ChannelNameError as e:
            raise StreamRefused(400, str(e)) from None
        if factory.open_sockets >= factory.options.max_connections:
            raise StreamRefused(503, "too many connections")
        if factory.options.trust_x_forwarded_for and proto._counted_ip is None:
            _count_forwarded(proto, request)
        channels = request.query("channel")
        v1 = key == b"" and bool(channels or request.query("v1"))  # v1=1: a stream whose channels come by POST
        since = v1_positions(request, channels, factory.options.max_subscriptions) if v1 else []
        channel = key.decode("utf-8")
        proxy = factory.options.connect_proxy
        if proxy is not None and not token:  # the app's backend says who this is, and what it may read
            _ask_proxy(proxy, proto, request, key, v1, since, cors)
            return
        grant = None
        # v1: the token (if any) is checked here, each channel at its subscribe
        if factory.verifier is not None and (token or not (v1 or factory.is_public(channel))):
            try:
                grant = factory.verifier.verify(token)
            except TokenRefused as e:
                raise StreamRefused(e.status, e.reason) from None
        _admit(proto, request, key, v1, since, grant, cors)
    except StreamRefused as e:
        refuse(proto, e, cors)


def _ask_proxy(proxy: Any, proto: Any, request: StreamRequest, key: bytes, v1: bool, since: list[str | None],
               cors: list[tuple[str, str]]) -> None:
    info = {"transport": "sse", "path": request.path, "channel": None if v1 else key.decode("utf-8"),
            "subprotocol": "sockdrawer.v1" if v1 else None, "remote": _address(proto.peer),
            "origin": request.headers.get("origin")}
    d: Deferred[Grant] = proxy(info, request.headers)

    def admitted(grant: Grant) -> None:
        if proto.connected:
            try:
                _admit(proto, request, key, v1, since, grant, cors)
            except StreamRefused as e:
                refuse(proto, e, cors)

    def refused(failure: Failure) -> None:
        status = getattr(failure.value, "status", None)
        if status is None:
            _log.failure("error while asking the connect proxy about a stream from {peer}", failure,
                         peer=proto.peer)
            status = 500
        if proto.connected:
            refuse(proto, StreamRefused(status, getattr(failure.value, "reason", "Internal Server Error")), cors)

    d.addCallbacks(admitted, refused)


def _admit(proto: Any, request: StreamRequest, key: bytes, v1: bool, since: list[str | None], grant: Grant | None,
           cors: list[tuple[str, str]]) -> None:
    """The stream, once its grant (a token's, the connect proxy's, or none) is known, within its user's cap."""
    proto.user = grant.user if grant is not None else None
    try:
        result = proto.within_user_cap(lambda: _admit_now(proto, request, key, v1, since, grant, cors))
    except ConnectionDeny as e:
        raise StreamRefused(e.code, e.reason or "refused") from None
    if isinstance(result, Deferred):
        def refused(failure: Failure) -> None:
            error: Any = failure.value
            if isinstance(error, (ConnectionDeny, StreamRefused)):
                if proto.connected:
                    refuse(proto, StreamRefused(getattr(error, "status", getattr(error, "code", 429)),
                                                error.reason or "refused"), cors)
                return
            _log.failure("error while admitting a stream from {peer}", failure, peer=proto.peer)
            if proto.connected:
                refuse(proto, StreamRefused(500, "Internal Server Error"), cors)

        result.addErrback(refused)


def _admit_now(proto: Any, request: StreamRequest, key: bytes, v1: bool, since: list[str | None],
               grant: Grant | None, cors: list[tuple[str, str]]) -> None:
    if not proto.connected:
        return
    if v1:
        start_v1_stream(proto, request.query("channel"), since, grant, request.query("presence") == ["1"], cors)
        return
    channel = key.decode("utf-8")
    if grant is not None and not grant.allows(channel):
        raise StreamRefused(403, "this channel is not allowed")
    factory = proto.factory
    decision = None
    if factory.authorize is not None:
        decision = factory.authorize(Source(SOCKET, channel, proto.peer, grant.user if grant else None))
    if decision is None:
        start_response(proto, key, cors, grant)
        return

    def decided(allowed: bool) -> None:
        if not proto.connected:
            return
        if allowed:
            start_response(proto, key, cors, grant)
        else:
            refuse(proto, StreamRefused(403, "refused by a listener"), cors)

    def failed(failure: Any) -> None:
        _log.failure("error while deciding on an event stream from {peer}", failure, peer=proto.peer)
        if proto.connected:
            refuse(proto, StreamRefused(500, "Internal Server Error"), cors)

    decision.addCallbacks(decided, failed)


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


def _cors(proto: Any, request: StreamRequest) -> list[tuple[str, str]] | None:
    """The CORS headers for the request's origin; ``None`` when that origin is not allowed."""
    origin = request.headers.get("origin")
    if not origin:
        return []
    if not proto.factory.origins.allows(origin):
        return None
    return [("Access-Control-Allow-Origin", origin), ("Access-Control-Allow-Credentials", "true"),
            ("Vary", "Origin")]


def _answer(proto: Any, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
    phrase = HTTPStatus(status).phrase
    proto.transport.write(response_head(status, phrase, [
        ("Content-Type", "application/json"), ("Content-Length", str(len(body))), *headers]) + body)
    proto.transport.loseConnection()


def answer_preflight(proto: Any, request: StreamRequest) -> None:
    """An ``OPTIONS`` preflight for a post from another origin: allowed for the allowed origins."""
    cors = _cors(proto, request)
    if cors is None:
        refuse(proto, StreamRefused(403, "origin not allowed"), [])
        return
    _answer(proto, 204, b"", [*cors, ("Access-Control-Allow-Methods", "POST"),
                              ("Access-Control-Allow-Headers", "Content-Type"), ("Access-Control-Max-Age", "600")])


def answer_post(proto: Any, request: StreamRequest, body: bytes | None) -> None:
    """A post of one v1 op for a stream's session (``None``: no length, or over --max-message-size)."""
    cors = _cors(proto, request)
    if cors is None:
        refuse(proto, StreamRefused(403, "origin not allowed"), [])
        return
    if body is None:
        refuse(proto, StreamRefused(413, "no Content-Length, or over --max-message-size"), cors)
        return
    status, answer = post_op(proto, request.query("stream")[0], body)
    _answer(proto, status, answer, cors)


def _count_forwarded(proto: Any, request: StreamRequest) -> None:
    """
    Behind trusted proxies (--trust-x-forwarded-for N): the client is the
    first of the last N addresses of ``X-Forwarded-For`` (as Autobahn takes
    it for a socket), counted against --max-connections-per-ip.
    """
    factory = proto.factory
    forwarded = request.headers.get("x-forwarded-for")
    if forwarded:
        addresses = [a.strip() for a in forwarded.split(",")]
        proto.peer = addresses[-int(factory.options.trust_x_forwarded_for):][0]
    ip = _address(proto.peer)
    if not ip:
        return
    count = factory.per_ip.get(ip, 0) + 1
    factory.per_ip[ip] = count
    proto._counted_ip = ip
    if count > factory.options.max_connections_per_ip:
        raise StreamRefused(429, "too many connections from this address")
