"""
The internal HTTP API: ``POST /publish/<channel>`` publishes the request body
through the service's broker; ``GET /health`` (liveness: 200 while the
reactor runs) and ``GET /ready`` (200 when the node can serve, 503 while
starting, with the broker down or while draining) report the service's
state; ``GET /metrics`` is the Prometheus exposition; ``GET /presence/<channel>``
lists who is on a channel (``sockdrawer.v1`` presence).

It listens on loopback by default; with an API key, publish and metrics
requests must carry ``Authorization: Bearer <key>`` (``/health`` and
``/ready`` stay open; ``--metrics-public`` opens ``/metrics``).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from sockdrawer import _private
from sockdrawer.core.channels import ChannelNameError, channel_from_path, printable
from sockdrawer.core.control import command, encode
from sockdrawer.core.tokens import check_pattern
from sockdrawer.http.admin import ASSETS, serve_asset


class NodeView(Protocol):
    """What the API reads and does on the node (the service provides it)."""

    #: messages published into the node, by source (the API counts its own)
    published: dict[str, int]

    def state(self) -> dict[str, Any]:
        """``/health`` and ``/ready``: counts, and ``ready``."""

    def publish_key(self, key: bytes, message: bytes) -> Any:
        """Publish on a validated channel; a Deferred firing with the count or the offset."""

    def history_tail(self, key: bytes, count: int) -> Any:
        """The last ``count`` messages kept for ``key`` (``(offset, message)``, oldest first)."""

    def connections(self, user: str | None, client: str | None) -> list[dict[str, Any]]:
        """This node's connections of ``user`` or with id ``client``."""

    def presence_entries(self, key: bytes) -> Any:
        """A Deferred firing with the presence entries of a channel."""

    def control(self, payload: bytes) -> Any:
        """Publish a checked control command to every node (a Deferred)."""

    def channels(self, pattern: str | None) -> Any:
        """A Deferred of ``{channel: connections}`` across every node."""

    @property
    def broker_description(self) -> str:
        """The broker's address, without credentials (in 503 answers)."""


@dataclass(frozen=True)
class ApiOptions:
    """The options the API reads."""

    api_key: str | None = None
    metrics_public: bool = False
    max_channel_length: int = 256
    max_publish_size: int = 1024 * 1024
    #: the Pusher HTTP API (``/apps/<id>/...``, signed by the app's secret, not the API key), if on
    pusher: Any = None
    #: the admin page's feed (:class:`~sockdrawer.http.admin.AdminFeed`; ``None``: no admin page)
    admin: Any = None


_log = Logger(namespace="sockdrawer.api")

_PUBLISH_PREFIX = b"/publish/"
_PRESENCE_PREFIX = b"/presence/"
_HISTORY_PREFIX = b"/history/"


def client_js() -> bytes:
    """
    The browser client ``sockdrawer.js``: shipped inside the package
    (``sockdrawer/static/``), or from the checkout's ``js/`` when running
    from a source tree.
    """
    from importlib import resources
    from pathlib import Path

    packaged = resources.files("sockdrawer") / "static" / "sockdrawer.js"
    if packaged.is_file():
        return packaged.read_bytes()
    return (Path(__file__).resolve().parents[2] / "js" / "sockdrawer.js").read_bytes()


class _BoundedRequest(Request):
    """
    A request that keeps at most ``max_body`` bytes of its body, and must
    arrive whole (request line, headers, body) within ``timeout`` seconds
    of its first line, or is answered 408.
    """

    max_body = 1024 * 1024
    timeout = 10.0
    clock: Any = None
    body_too_large = False
    _body_seen = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = self.clock.callLater(self.timeout, self._too_slow)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._deadline.active():
            self._deadline.cancel()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Any) -> None:
        if self._deadline.active():
            self._deadline.cancel()
        super().connectionLost(reason)

    def _too_slow(self) -> None:
        transport = getattr(self.channel, "transport", None)
        if transport is None:
            return
        _log.info("API request from {peer} did not arrive within {timeout} s: 408", peer=transport.getPeer(),
                  timeout=self.timeout)
        transport.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        transport.loseConnection()

    def handleContentChunk(self, data: bytes) -> None:
        self._body_seen += len(data)
        if self._body_seen > self.max_body:
            self.body_too_large = True
            return
        super().handleContentChunk(data)


def _respond(request: Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8") + b"\n"


class ApiResource(Resource):
    """The API's root resource; every path is handled here."""

    isLeaf = True

    def __init__(self, node: NodeView, options: ApiOptions, metrics: Callable[[], tuple[bytes, str]]) -> None:
        super().__init__()
        self._node = node
        self._options = options
        self._metrics_text = metrics
        key = options.api_key
        self._expected = key.encode() if key else None

    def _authorized(self, request: Request) -> bool:
        if self._expected is None:
            return True
        given = request.getHeader(b"authorization") or b""
        scheme, _, credentials = given.strip().partition(b" ")
        # the scheme is case-insensitive (RFC 9110 11.1)
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._expected)

    def render(self, request: Request) -> Any:
        request.setHeader(b"server", b"sockdrawer")
        path = request.path
        if path in (b"/health", b"/ready"):
            # open to health checkers (load balancers, orchestrators) without
            # the key: they tell only counts and whether the node can serve
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                return _respond(request, 405, {"error": "use GET"})
            state = self._node.state()
            if path == b"/health":  # liveness: the reactor runs
                return _respond(request, 200, state)
            return _respond(request, 200 if state["ready"] else 503, state)
        if path == b"/sockdrawer.js":
            return self._client_js(request)
        if path == b"/metrics" and self._options.metrics_public:
            return self._metrics(request)
        if path in ASSETS and self._options.admin is not None:
            return serve_asset(request, path)  # the page and its files; what it shows needs the key
        if path.startswith((b"/apps/", b"/users/")) and self._options.pusher is not None:
            return self._options.pusher.render(request)  # signed with the Pusher app's secret
        if not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="sockdrawer"')
            return _respond(request, 401, {"error": "missing or wrong API key"})
        if path == b"/metrics":
            return self._metrics(request)
        if path == b"/admin/stream" and self._options.admin is not None:
            return self._options.admin.open(request)
        if path.startswith(_PUBLISH_PREFIX) or path == _PUBLISH_PREFIX[:-1]:
            if request.method != b"POST":
                request.setHeader(b"allow", b"POST")
                return _respond(request, 405, {"error": "use POST"})
            return self._publish(request)
        if path == b"/channels":
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                return _respond(request, 405, {"error": "use GET"})
            return self._channels(request)
        if path in (b"/disconnect", b"/unsubscribe"):
            if request.method != b"POST":
                request.setHeader(b"allow", b"POST")
                return _respond(request, 405, {"error": "use POST"})
            return self._control(request, path[1:].decode("ascii"))
        if path.startswith(_HISTORY_PREFIX) or path == b"/connections":
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                return _respond(request, 405, {"error": "use GET"})
            return self._history(request) if path != b"/connections" else self._connections(request)
        if path.startswith(_PRESENCE_PREFIX):
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"allow", b"GET, HEAD")
                return _respond(request, 405, {"error": "use GET"})
            return self._presence(request)
        return _respond(request, 404, {"error": "not found; use POST /publish/<channel>"})

    def _channels(self, request: Request) -> Any:
        # GET /channels[?pattern=news/*]: connections by channel across every node
        given = (request.args or {}).get(b"pattern")
        pattern = given[0].decode("utf-8", "replace") if given else None
        if pattern is not None:
            try:
                check_pattern(pattern)
            except ValueError as e:
                return _respond(request, 400, {"error": str(e)})
        finished: list[bool] = []
        request.notifyFinish().addErrback(lambda f: finished.append(True))

        def done(counts: dict[str, int]) -> None:
            if not finished:
                request.write(_respond(request, 200, {"channels": {c: {"sockets": n} for c, n in counts.items()}}))
                request.finish()

        def failed(failure: Failure) -> None:
            _log.warn("GET /channels failed: {error}", error=failure.getErrorMessage())
            if not finished:
                request.write(_respond(request, 503, {"error": "broker unavailable",
                                                      "broker": self._node.broker_description}))
                request.finish()

        self._node.channels(pattern).addCallbacks(done, failed)
        return NOT_DONE_YET

    def _control(self, request: Request, op: str) -> Any:
        # the control API: a command for every node's connections of a user (or a client)
        assert request.content is not None
        request.content.seek(0)
        try:
            fields = json.loads(request.content.read())
            if isinstance(fields, dict):
                fields = {**fields, "op": op}
            cmd = command(fields, self._options.max_channel_length)
        except (ValueError, RecursionError) as e:
            return _respond(request, 400, {"error": str(e) if not isinstance(e, json.JSONDecodeError)
                                           else "body is not JSON"})
        finished: list[bool] = []
        request.notifyFinish().addErrback(lambda f: finished.append(True))

        def done(_: Any) -> None:
            if not finished:
                request.write(_respond(request, 202, {"accepted": cmd}))
                request.finish()

        def failed(failure: Failure) -> None:
            _log.warn("control {op} failed: {error}", op=op, error=failure.getErrorMessage())
            if not finished:
                request.write(_respond(request, 503, {"error": "broker unavailable",
                                                      "broker": self._node.broker_description}))
                request.finish()

        self._node.control(encode(cmd)).addCallbacks(done, failed)
        return NOT_DONE_YET

    def _history(self, request: Request) -> Any:
        # GET /history/<channel>[?limit=20]: the last messages kept for a channel, with their offsets
        raw_channel = request.path[len(_HISTORY_PREFIX) - 1:] or b"/"
        try:
            key = channel_from_path(raw_channel.decode("ascii", "replace"), self._options.max_channel_length)
            limit = int((request.args or {}).get(b"limit", [b"20"])[0])
            if not 1 <= limit <= 100:
                raise ValueError("limit must be from 1 to 100")
        except (ChannelNameError, ValueError) as e:
            return _respond(request, 400, {"error": str(e)})
        d = maybeDeferred(self._node.history_tail, key, limit)

        def done(messages: list[tuple[str, bytes]]) -> None:
            request.write(_respond(request, 200, {"channel": key.decode("utf-8"), "messages": [
                {"offset": offset, "data": data.decode("utf-8", "replace")} for offset, data in messages]}))
            request.finish()

        def failed(failure: Failure) -> None:
            request.write(_respond(request, 503, {"error": "history unavailable"}))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET

    def _connections(self, request: Request) -> Any:
        # GET /connections?user=<id> or ?client=<id>: this node's connections of a user, or with a client id
        args = request.args or {}
        user = args.get(b"user", [None])[0]
        client = args.get(b"client", [None])[0]
        if (user is None) == (client is None):
            return _respond(request, 400, {"error": "give one of user or client"})
        found = self._node.connections(user.decode("utf-8", "replace") if user is not None else None,
                                       client.decode("utf-8", "replace") if client is not None else None)
        return _respond(request, 200, {"connections": found})

    def _presence(self, request: Request) -> Any:
        # who is on a channel (v1 presence): GET /presence/<channel>
        raw_channel = request.path[len(_PRESENCE_PREFIX) - 1 :]
        try:
            key = channel_from_path(
                raw_channel.decode("ascii", "replace"), self._options.max_channel_length
            )
        except ChannelNameError as e:
            return _respond(request, 400, {"error": f"bad channel: {e}"})
        finished: list[bool] = []
        request.notifyFinish().addErrback(lambda f: finished.append(True))

        def done(entries: list[dict[str, Any]]) -> None:
            if not finished:
                request.write(_respond(request, 200, {"channel": key.decode("utf-8"), "clients": entries}))
                request.finish()

        def failed(failure: Failure) -> None:
            _log.warn("presence of {channel!r} unavailable: {error}", channel=printable(key),
                      error=failure.getErrorMessage() or repr(failure.value))
            if not finished:
                request.write(_respond(request, 503, {"error": "broker unavailable"}))
                request.finish()

        self._node.presence_entries(key).addCallbacks(done, failed)
        return NOT_DONE_YET

    def _client_js(self, request: Request) -> bytes:
        # the browser client, for pages that load it from the node (public:
        # it is the same file as on npm)
        request.setHeader(b"content-type", b"text/javascript; charset=utf-8")
        request.setHeader(b"access-control-allow-origin", b"*")
        return client_js()

    def _metrics(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _respond(request, 405, {"error": "use GET"})
        body, content_type = self._metrics_text()
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body

    def _publish(self, request: Request) -> Any:
        if getattr(request, "body_too_large", False):
            limit = self._options.max_publish_size
            return _respond(request, 413, {"error": f"body over the limit of {limit} bytes"})
        raw_channel = request.path[len(_PUBLISH_PREFIX) - 1 :] or b"/"
        try:
            key = channel_from_path(
                raw_channel.decode("ascii", "replace"), self._options.max_channel_length
            )
        except ChannelNameError as e:
            return _respond(request, 400, {"error": f"bad channel: {e}"})
        assert request.content is not None
        request.content.seek(0)
        body = request.content.read()
        self._node.published["api"] += 1
        d = self._node.publish_key(key, body)
        finished = []
        request.notifyFinish().addErrback(lambda f: finished.append(True))

        def done(result: int | str) -> None:
            if not finished:
                answer: dict[str, Any] = {"channel": key.decode("utf-8")}
                if isinstance(result, str):
                    answer["offset"] = result  # kept in history
                else:
                    answer["subscribers"] = result
                request.write(_respond(request, 200, answer))
                request.finish()

        def failed(failure: Failure) -> None:
            _log.warn(
                "publish on {channel!r} failed: {error}",
                channel=key.decode("utf-8"),
                error=failure.getErrorMessage() or repr(failure.value),
            )
            if not finished:
                request.write(
                    _respond(
                        request,
                        503,
                        {"error": "broker unavailable", "broker": self._node.broker_description},
                    )
                )
                request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


class ApiSite(Site):
    """
    The API's site: request bodies bounded by ``max_body``, each request due
    whole within ``timeout`` seconds (and idle connections closed after as
    long), no access log (publishers may call it thousands of times a second;
    failures are logged).
    """

    def __init__(self, resource: Resource, max_body: int, timeout: float = 10.0, *, clock: Any) -> None:
        request_factory = type("BoundedRequest", (_BoundedRequest,),
                               {"max_body": max_body, "timeout": timeout, "clock": clock})
        super().__init__(resource, requestFactory=request_factory, timeout=timeout, reactor=clock)
        self.displayTracebacks = False
        self.noisy = False

    def log(self, request: http.Request) -> None:
        pass


class ConnectionLimit(WrappingFactory):
    """
    At most ``limit`` simultaneous connections to the wrapped factory.  At
    the limit, a new connection takes the place of the oldest one that has
    no whole request in hand (idle, or still sending one, as slow clients
    that hold connections open do), so health probes and publishers get in
    while a slowloris holds the pool; when every connection is working on a
    request, the new one is closed at once.
    """

    noisy = False

    def __init__(self, wrapped: Any, limit: int) -> None:
        super().__init__(wrapped)
        self.limit = limit
        self.refused = 0
        #: connections closed to make room for a new one
        self.evicted = 0
        self._evicting: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) - len(self._evicting) >= self.limit and not self._evict():
            self.refused += 1
            return None
        return super().buildProtocol(addr)

    def _evict(self) -> bool:
        for wrapper in self.protocols:  # oldest first
            if wrapper in self._evicting or wrapper.transport is None:
                continue
            if not _private.handling_request(wrapper.wrappedProtocol):
                self._evicting.add(wrapper)
                self.evicted += 1
                wrapper.transport.abortConnection()
                return True
        return False

    def unregisterProtocol(self, p: Any) -> None:
        self._evicting.discard(p)
        super().unregisterProtocol(p)
