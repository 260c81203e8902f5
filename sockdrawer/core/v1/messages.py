"""
The sockdrawer.v1 messages: envelopes, control messages, offsets as positions,
and the checks of what a client sends.  Standard library only.
"""

from __future__ import annotations

import base64
import json
from typing import Any

SUBPROTOCOL = "sockdrawer.v1"


def _position(offset: str) -> tuple[str, tuple[int, ...]]:
    epoch, _, position = offset.partition(":")
    try:
        return epoch, tuple(int(part) for part in position.split("-"))
    except ValueError:
        return epoch, ()


def _at_or_before(offset: str, seen: tuple[str, tuple[int, ...]]) -> bool:
    """Whether ``offset`` is ``seen`` (a :func:`_position`) or older, in the same epoch."""
    here = _position(offset)
    return here[0] == seen[0] and here[1] <= seen[1]


def envelope(channel_json: str, offset: str | None, message: bytes) -> bytes:
    """The ``message`` envelope of one message (UTF-8 as text, anything else as base64)."""
    try:
        data, encoding = json.dumps(message.decode("utf-8"), ensure_ascii=False), ""
    except UnicodeDecodeError:
        data, encoding = '"' + base64.b64encode(message).decode("ascii") + '"', ',"encoding":"base64"'
    off = "null" if offset is None else json.dumps(offset)
    return (f'{{"op":"message","channel":{channel_json},"offset":{off},"data":{data}{encoding}}}').encode()


#: the longest message id a client may send with ``send`` (echoed in the reply)
MAX_ID_LENGTH = 128


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unicode(msg: Any) -> bool:
    """Whether every string in ``msg`` is Unicode text (no lone surrogate from a ``\\ud800`` escape)."""
    try:
        json.dumps(msg, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def _id_ok(id: Any) -> bool:
    """A ``send`` id: absent, a string of at most :data:`MAX_ID_LENGTH` characters, or a number."""
    if id is None or (isinstance(id, (int, float)) and not isinstance(id, bool)):
        return True
    return isinstance(id, str) and len(id) <= MAX_ID_LENGTH


def control(op: str, **fields: Any) -> bytes:
    """A control message (``subscribed``, ``reset``, ``error``, ``reply``) as JSON bytes."""
    return json.dumps({"op": op, **fields}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
