"""
Named events through the broker: a message that carries, beside its data,
what a protocol with event names needs (the Pusher protocol's event name, the
socket that sent it and must not get it back).  It travels as one Redis
message, ``MAGIC + <meta JSON> + "\\n" + <data>``; the hub takes it apart as
it arrives (:meth:`~sockdrawer.core.hub.MemoryChannelHub.deliver`), so raw
sockets, sockdrawer.v1 subscriptions, event streams and listeners get the
data alone, and sinks that want the meta read it beside (``Batch.meta``).
A subscriber reading the Redis channel directly sees the whole message.
"""

from __future__ import annotations

import json
from typing import Any

#: what starts a message with meta (a NUL first: no text message starts so)
MAGIC = b"\x00sockdrawer-event\x00"


def wrap(meta: dict[str, Any], data: bytes) -> bytes:
    """The message carrying ``data`` with ``meta`` (a JSON object without newlines)."""
    return MAGIC + json.dumps(meta, separators=(",", ":")).encode("utf-8") + b"\n" + data


def unwrap(message: bytes) -> tuple[bytes, bytes | None]:
    """``(data, meta JSON)`` of a message; ``(message, None)`` for one without meta."""
    if message[:1] != b"\x00" or not message.startswith(MAGIC):
        return message, None
    meta, _, data = message[len(MAGIC):].partition(b"\n")
    return data, meta
