"""
Commands from the app's backend to live connections on every node (the
control API: ``POST /disconnect``, ``POST /unsubscribe``, and
``Client.disconnect`` / ``Client.unsubscribe``): one JSON object, published
on the hub key :data:`CONTROL_KEY` through the broker, so every node acts on
its own connections.  No client can subscribe to that key (a channel name
never starts with ``/``).
"""

from __future__ import annotations

import json
from typing import Any

from sockdrawer.core.channels import validate_channel

#: the hub key commands travel on (the Redis channel ``<namespace>//control``)
CONTROL_KEY = b"/control"
#: the close code and reason of a disconnect that names none
DISCONNECT_CODE = 4000
DISCONNECT_REASON = "disconnected"
#: what a raw socket is closed with when its user is unsubscribed from its channel
UNSUBSCRIBED_CODE = 4003


def command(fields: Any, max_channel_length: int = 256) -> dict[str, Any]:
    """
    A checked command: ``{"op": "disconnect", "user": ...}`` or ``"client"``
    (with optional ``code`` 4000-4999 and ``reason``), or ``{"op":
    "unsubscribe", "user": ..., "channel": ...}``.

    :raises ValueError: naming what is wrong.
    """
    if not isinstance(fields, dict):
        raise ValueError("a command is a JSON object")
    op = fields.get("op")
    if op == "disconnect":
        targets = [k for k in ("user", "client") if fields.get(k) is not None]
        if len(targets) != 1 or not isinstance(fields[targets[0]], str) or not fields[targets[0]]:
            raise ValueError("disconnect takes one of user or client, a non-empty string")
        code = fields.get("code", DISCONNECT_CODE)
        if isinstance(code, bool) or not isinstance(code, int) or not 4000 <= code <= 4999:
            raise ValueError("code must be an integer from 4000 to 4999")
        reason = fields.get("reason", DISCONNECT_REASON)
        if not isinstance(reason, str) or len(reason.encode("utf-8")) > 123:
            raise ValueError("reason must be a string of at most 123 bytes")
        return {"op": op, targets[0]: fields[targets[0]], "code": code, "reason": reason}
    if op == "unsubscribe":
        user, channel = fields.get("user"), fields.get("channel")
        if not isinstance(user, str) or not user or not isinstance(channel, str):
            raise ValueError("unsubscribe takes a user and a channel, strings")
        validate_channel(channel, max_channel_length)
        return {"op": op, "user": user, "channel": channel}
    raise ValueError("op must be disconnect or unsubscribe")


def encode(cmd: dict[str, Any]) -> bytes:
    return json.dumps(cmd, separators=(",", ":")).encode()
