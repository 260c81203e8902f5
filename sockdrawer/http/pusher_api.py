"""
The HTTP API the Pusher server libraries call (``/apps/<app_id>/...`` on the
API port), each request signed with the app's secret (see
:mod:`sockdrawer.core.pusher.auth`); a bad signature gets 401, whatever
``--api-key`` says (the Pusher libraries cannot send it).

- ``POST /apps/ID/events`` and ``/apps/ID/batch_events``: publish named
  events through the node's broker (every node's Pusher connections get the
  event, raw and v1 sockets its data);
- ``GET /apps/ID/channels`` (``filter_by_prefix``, ``info=user_count``),
  ``/apps/ID/channels/NAME`` (``info=subscription_count,user_count``),
  ``/apps/ID/channels/NAME/users``;
- ``POST /apps/ID/users/USER/terminate_connections``: the control API's
  disconnect of that user, on every node.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

from twisted.internet.defer import DeferredList, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from sockdrawer.core.channels import ChannelNameError, validate_channel
from sockdrawer.core.control import encode
from sockdrawer.core.events import wrap
from sockdrawer.core.pusher.auth import CHANNEL_NAME, SOCKET_ID, PusherApp
from sockdrawer.core.pusher.session import USER_CHANNEL

_log = Logger(namespace="sockdrawer.pusher")

#: the most channels one event goes to, events in one batch, and bytes of an event's name
MAX_CHANNELS = 100
MAX_BATCH = 100
MAX_NAME = 200
#: the close code of POST /apps/ID/users/USER/terminate_connections
TERMINATED = 4009


class BadRequest(Exception):
    """A request the API answers 400 (the message says why)."""


def _send(request: Request, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body).encode()


class PusherApi:
    """
    :param app: the Pusher app.
    :param node: the node (``publish_key``, ``channels``, ``control``).
    :param clock: the reactor (the signatures' time window).
    :param max_channel_length: ``--max-channel-length``.
    :param members: ``channel key -> Deferred[list of (user_id, user_info)]``, a presence channel's members.
    """

    def __init__(self, app: PusherApp, node: Any, clock: Any, max_channel_length: int,
                 members: Callable[[bytes], Any] | None = None) -> None:
        self.app = app
        self.node = node
        self.clock = clock
        self.max_channel_length = max_channel_length
        self.members = members
        self.prefix = f"/apps/{app.app_id}/".encode()
        #: requests by outcome: "ok", "401", "400"
        self.requests: dict[str, int] = {}

    def _count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def render(self, request: Request) -> Any:
        path = request.path
        # the Python server library calls /users/<id>/terminate_connections without the app's prefix
        prefix = self.prefix if not path.startswith(b"/users/") else b"/"
        if not path.startswith(prefix):
            return _send(request, 404, {"error": "unknown app id"})
        body = request.content.read() if request.content is not None else b""
        query = {k.decode("utf-8", "replace"): v[0].decode("utf-8", "replace") for k, v in (request.args or {}).items()}
        method = request.method.decode("ascii", "replace")
        why = self.app.check_request(method, path.decode("utf-8", "replace"), query, body, self.clock.seconds())
        if why is not None:
            self._count("401")
            _log.info("refused a Pusher API request to {path}: {why}", path=path.decode("utf-8", "replace"), why=why)
            return _send(request, 401, {"error": why})
        rest = unquote(path[len(prefix):].decode("utf-8", "replace"))
        try:
            if method == "POST" and rest == "events":
                return self._events(request, [self._event(_json_object(body))])
            if method == "POST" and rest == "batch_events":
                batch = _json_object(body).get("batch")
                if not isinstance(batch, list) or not 0 < len(batch) <= MAX_BATCH:
                    raise BadRequest(f"batch must be a list of 1 to {MAX_BATCH} events")
                return self._events(request, [self._event(e, single=True) for e in batch], batch=True)
            if method == "GET" and rest == "channels":
                return self._channels(request, query)
            if method == "GET" and rest.startswith("channels/") and rest.endswith("/users"):
                return self._users(request, rest[len("channels/"):-len("/users")])
            if method == "GET" and rest.startswith("channels/"):
                return self._channel(request, rest[len("channels/"):], query)
            if method == "POST" and rest.startswith("users/") and rest.endswith("/events"):
                user = rest[len("users/"):-len("/events")]
                fields = _json_object(body)
                if not user:
                    raise BadRequest("a user id is needed")
                keys, message = self._event({**fields, "channel": USER_CHANNEL + user}, single=True)
                return self._events(request, [(keys, message)])
            if method == "POST" and rest.startswith("users/") and rest.endswith("/terminate_connections"):
                return self._terminate(request, rest[len("users/"):-len("/terminate_connections")])
        except BadRequest as e:
            self._count("400")
            return _send(request, 400, {"error": str(e)})
        return _send(request, 404, {"error": "not found"})

    def _key(self, channel: Any) -> bytes:
        user_channel = isinstance(channel, str) and channel.startswith(USER_CHANNEL)
        if not isinstance(channel, str) or not (user_channel or CHANNEL_NAME.fullmatch(channel)):
            raise BadRequest(f"invalid channel name {str(channel)[:80]!r}")
        try:
            return validate_channel(channel, self.max_channel_length)
        except ChannelNameError as e:
            raise BadRequest(str(e)) from None

    def _event(self, fields: Any, single: bool = False) -> tuple[list[bytes], bytes]:
        """The channel keys and the message (data with its name and excluded socket) of one event."""
        if not isinstance(fields, dict):
            raise BadRequest("an event is a JSON object")
        name, data = fields.get("name"), fields.get("data")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise BadRequest(f"name must be a string of 1 to {MAX_NAME} characters")
        if not isinstance(data, str):
            raise BadRequest("data must be a string (the server libraries encode objects as JSON)")
        channels = [fields.get("channel")] if single or "channel" in fields else fields.get("channels")
        if not isinstance(channels, list) or not 0 < len(channels) <= MAX_CHANNELS:
            raise BadRequest(f"channels must be a list of 1 to {MAX_CHANNELS} channel names")
        keys = [self._key(c) for c in channels]
        meta: dict[str, Any] = {"event": name}
        socket_id = fields.get("socket_id")
        if socket_id is not None:
            if not isinstance(socket_id, str) or not SOCKET_ID.fullmatch(socket_id):
                raise BadRequest("invalid socket_id")
            meta["socket_id"] = socket_id
        return keys, wrap(meta, data.encode("utf-8"))

    def _events(self, request: Request, events: list[tuple[list[bytes], bytes]], batch: bool = False) -> Any:
        sends = [maybeDeferred(self.node.publish_key, key, message) for keys, message in events for key in keys]

        def done(results: list[tuple[bool, Any]]) -> None:
            failed = [r for ok, r in results if not ok]
            if failed:
                reason: Failure = failed[0]
                self._count("400" if reason.check(ValueError) else "503")
                request.write(_send(request, 400 if reason.check(ValueError) else 503,
                                    {"error": reason.getErrorMessage()}))
            else:
                self._count("ok")
                request.write(_send(request, 200, {"batch": [{} for _ in events]} if batch else {}))
            request.finish()

        DeferredList(sends, consumeErrors=True).addCallback(done)
        return NOT_DONE_YET

    def _channels(self, request: Request, query: dict[str, str]) -> Any:
        prefix = query.get("filter_by_prefix", "")
        info = set(filter(None, query.get("info", "").split(",")))
        if "user_count" in info and not prefix.startswith("presence-"):
            raise BadRequest("info=user_count needs filter_by_prefix=presence-")
        d = maybeDeferred(self.node.channels, None)

        def done(counts: dict[str, int]) -> Any:
            names = [c for c in counts if c.startswith(prefix) and CHANNEL_NAME.fullmatch(c)]
            if "user_count" not in info or self.members is None:
                return {"channels": {c: {} for c in names}}
            return DeferredList([self.members(c.encode()) for c in names], consumeErrors=True).addCallback(
                lambda results: {"channels": {c: {"user_count": len(r) if ok else 0}
                                              for c, (ok, r) in zip(names, results, strict=True)}})

        return self._answer(request, d.addCallback(done))

    def _channel(self, request: Request, channel: str, query: dict[str, str]) -> Any:
        key = self._key(channel)
        info = set(filter(None, query.get("info", "").split(",")))
        if "user_count" in info and not channel.startswith("presence-"):
            raise BadRequest("user_count is only for presence channels")
        d = maybeDeferred(self.node.channels, None)

        def done(counts: dict[str, int]) -> Any:
            count = counts.get(channel, 0)
            answer: dict[str, Any] = {"occupied": count > 0}
            if "subscription_count" in info:
                answer["subscription_count"] = count
            if "user_count" in info and self.members is not None:
                return self.members(key).addCallback(lambda m: {**answer, "user_count": len(m)})
            return answer

        return self._answer(request, d.addCallback(done))

    def _users(self, request: Request, channel: str) -> Any:
        key = self._key(channel)
        if not channel.startswith("presence-") or self.members is None:
            raise BadRequest("users are only listed for presence channels")
        d = self.members(key).addCallback(lambda members: {"users": [{"id": u} for u, _ in members]})
        return self._answer(request, d)

    def _terminate(self, request: Request, user: str) -> Any:
        if not user:
            raise BadRequest("a user id is needed")
        d = maybeDeferred(self.node.control, encode({"op": "disconnect", "user": user, "code": TERMINATED,
                                                     "reason": "connections terminated"}))
        return self._answer(request, d.addCallback(lambda _: {}))

    def _answer(self, request: Request, d: Any) -> Any:
        def done(body: dict[str, Any]) -> None:
            self._count("ok")
            request.write(_send(request, 200, body))
            request.finish()

        def failed(failure: Failure) -> None:
            self._count("503")
            request.write(_send(request, 503, {"error": failure.getErrorMessage()}))
            request.finish()

        d.addCallbacks(done, failed)
        return NOT_DONE_YET


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("body is not a JSON object")
    return value
