"""
Each node's end of the control commands (:mod:`sockdrawer.core.control`):
a sink on the control key that finds this node's connections of a user (or
with a client id) among sockets and event streams, and closes or
unsubscribes them.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from sockdrawer.core.channels import validate_channel
from sockdrawer.core.control import UNSUBSCRIBED_CODE, command
from sockdrawer.core.interfaces import Batch, ISink

_log = Logger(namespace="sockdrawer.control")


def _who(proto: Any) -> tuple[Any, str | None]:
    """A connection's v1 session (or ``None``) and its user."""
    stream = getattr(proto, "stream", None)
    session = proto._session if stream is None else stream.session
    if session is not None:
        return session, session.peer.user
    return None, (stream.user if stream is not None else proto.user)


def describe(proto: Any) -> dict[str, Any]:
    """One connection as the admin page lists it: its ids, user, transport, channels and address."""
    session, user = _who(proto)
    client = getattr(proto, "client_id", None) or (session._client if session is not None else None)
    stream = getattr(proto, "stream", None)
    if session is not None:
        channels = sorted(k.decode("utf-8", "replace") for k in session.subscriptions)
    else:
        key = stream.key if stream is not None else proto.key
        channels = [key.decode("utf-8", "replace")] if key is not None else []
    kind = "pusher" if hasattr(session, "socket_id") else "v1" if session is not None else "raw"
    return {"client": client, "user": user, "transport": "sse" if stream is not None else "websocket",
            "protocol": kind, "channels": channels, "peer": getattr(proto, "peer", None)}


def matching(registry: Any, user: str | None, client: str | None) -> list[dict[str, Any]]:
    """This node's open connections of ``user`` (or with id ``client``), described."""
    found = []
    for proto in list(registry.connections):
        if not getattr(proto, "_opened", False):
            continue
        entry = describe(proto)
        if (user is not None and entry["user"] == user) or (client is not None and entry["client"] == client):
            found.append(entry)
    return found


@implementer(ISink)
class ControlSink:
    """Acts on the commands published on the control key, for the connections of ``registry``."""

    receivers = 1

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        #: commands acted on, by op; connections they reached
        self.commands: dict[str, int] = {}
        self.affected = 0

    def receive(self, batch: Batch) -> None:
        for payload in batch.messages:
            try:
                cmd = command(json.loads(payload), self.registry.max_channel_length)
            except ValueError as e:  # json's errors are ValueErrors too
                _log.warn("ignored a control command: {error}", error=e)
                continue
            op = cmd["op"]
            self.commands[op] = self.commands.get(op, 0) + 1
            count = self._disconnect(cmd) if op == "disconnect" else self._unsubscribe(cmd)
            self.affected += count
            target = f"user {cmd['user']!r}" if "user" in cmd else f"client {cmd['client']!r}"
            _log.info("control {op} for {target}: {count} connection(s) on this node", op=op, target=target,
                      count=count)

    def _disconnect(self, cmd: dict[str, Any]) -> int:
        count = 0
        for proto in list(self.registry.connections):
            session, user = _who(proto)
            if "user" in cmd:
                hit = user == cmd["user"]
            else:
                # a v1 session's id, or (with --webhook) any connection's id from its events
                hit = cmd["client"] in (getattr(proto, "client_id", None),
                                        session._client if session is not None else None)
            if hit:
                count += 1
                _close(proto, cmd["code"], cmd["reason"])
        return count

    def _unsubscribe(self, cmd: dict[str, Any]) -> int:
        key = validate_channel(cmd["channel"], self.registry.max_channel_length)
        count = 0
        for proto in list(self.registry.connections):
            session, user = _who(proto)
            if user != cmd["user"]:
                continue
            if session is not None:
                if key in session.subscriptions:
                    count += 1
                    session.unsubscribe(key)
                    session.send_control("unsubscribed", channel=cmd["channel"])
            elif (proto.stream.key if getattr(proto, "stream", None) is not None else proto.key) == key:
                count += 1
                _close(proto, UNSUBSCRIBED_CODE, "unsubscribed")
        return count


def _close(proto: Any, code: int, reason: str) -> None:
    if getattr(proto, "streaming", False):
        proto.transport.loseConnection()  # an event stream ends (no close code in SSE)
    elif proto.state == proto.STATE_OPEN:
        proto.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8"), isReply=False)
