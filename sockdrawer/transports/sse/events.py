"""
The Server-Sent Events wire format (the HTML standard, "Server-sent events"):
what one message, a comment, a ``retry:`` hint and the response head look like.
"""

from __future__ import annotations

import base64
import re

#: SSE ends a line at CRLF, LF or CR alone: each becomes its own ``data:`` line
_LINES = re.compile(rb"\r\n|\r|\n")
#: what a heartbeat is: a comment, ignored by ``EventSource``, keeping proxies from timing the stream out
HEARTBEAT = b":\n\n"
#: the event type of a payload that is not UTF-8: its ``data`` is the payload in base64
BINARY_EVENT = b"binary"


def message_event(payload: bytes, event_id: bytes | None = None) -> bytes:
    """
    One event carrying ``payload``: its lines as ``data:`` lines (a client
    joins them with ``\\n``); a payload that is not UTF-8 as one ``data:``
    line of base64 under the event type ``binary``.
    """
    head = b"id: " + event_id + b"\n" if event_id is not None else b""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return head + b"event: " + BINARY_EVENT + b"\ndata: " + base64.b64encode(payload) + b"\n\n"
    if b"\n" not in payload and b"\r" not in payload:
        return head + b"data: " + payload + b"\n\n"
    return head + b"".join(b"data: " + line + b"\n" for line in _LINES.split(payload)) + b"\n"


def retry_hint(milliseconds: int) -> bytes:
    """How long a client should wait before reconnecting (``EventSource`` honours it)."""
    return b"retry: %d\n\n" % milliseconds


def response_head(status: int, phrase: str, headers: list[tuple[str, str]]) -> bytes:
    """An HTTP/1.1 response head; the body ends with the connection (``Connection: close``)."""
    lines = [f"HTTP/1.1 {status} {phrase}", *(f"{name}: {value}" for name, value in headers), "Connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
