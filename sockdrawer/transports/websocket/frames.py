"""
Server frames (RFC 6455 5.2), built from bytes and knowing no socket.

Every frame sockdrawer fans out is built here, once per batch and encoding:
plain frames for every socket, and permessage-deflate frames (RFC 7692) for
sockets that negotiated compression.  Server frames are never masked.  This
module imports only the standard library.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from typing import Any

TEXT = 0x1
BINARY = 0x2
_FIN = 0x80
_RSV1 = 0x40  # permessage-deflate: "this message is compressed"

#: the largest LZ77 window permessage-deflate allows (and zlib's default)
MAX_WINDOW_BITS = 15
#: messages shorter than this are sent uncompressed by default: deflate's
#: own overhead makes small frames grow
DEFAULT_COMPRESSION_THRESHOLD = 64
#: the empty stored block that ends a sync flush; RFC 7692 7.2.1 strips it
_TAIL = b"\x00\x00\xff\xff"

_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


def opcode_for(message: bytes) -> int:
    """:data:`TEXT` when ``message`` is valid UTF-8, :data:`BINARY` otherwise."""
    try:
        message.decode("utf-8")
    except UnicodeDecodeError:
        return BINARY
    return TEXT


def frame_header(first_byte: int, length: int) -> bytes:
    """The header of an unmasked frame: ``first_byte`` (FIN, RSV, opcode) and the payload length."""
    if length < 126:
        return bytes((first_byte, length))
    if length < 0x10000:
        return _HEADER_16(first_byte, 126, length)
    return _HEADER_64(first_byte, 127, length)


def encode_frame(message: bytes, opcode: int | None = None) -> bytes:
    """
    One unmasked, unfragmented server frame for ``message``: by default a
    text frame when it is valid UTF-8, a binary frame otherwise; or the
    ``opcode`` given.  Payload bytes are unchanged.

    These are the bytes Autobahn's ``PreparedMessage(..., applyMask=False,
    doNotCompress=True).payloadHybi`` holds, without the object around it:
    at 100,000 messages a second the object costs more than the framing.
    """
    if opcode is None:
        opcode = opcode_for(message)
    return frame_header(_FIN | opcode, len(message)) + message


def encode_batch(messages: Sequence[bytes]) -> bytes:
    """The plain frames of ``messages``, in order, joined for one write."""
    if len(messages) == 1:
        return encode_frame(messages[0])
    return b"".join([encode_frame(m) for m in messages])


class Deflater:
    """
    Builds permessage-deflate frames for every socket that negotiated the
    extension with the same window: each message is compressed on its own
    (``server_no_context_takeover``), so the same bytes are valid on every
    such socket, and a batch is deflated once however many sockets get it.

    One long-lived compressor is reused with a full flush after each message:
    the flush empties its window, so no message refers to the one before,
    and no compressor is built per message.

    :param window_bits: the LZ77 window, 9 to 15 (``server_max_window_bits``).
    :param threshold: messages shorter than this many bytes are sent as plain
        frames (allowed by RFC 7692: the RSV1 bit says which are compressed).
    """

    __slots__ = ("window_bits", "threshold", "_compressor")

    def __init__(self, window_bits: int = MAX_WINDOW_BITS, threshold: int = DEFAULT_COMPRESSION_THRESHOLD) -> None:
        if not 9 <= window_bits <= MAX_WINDOW_BITS:
            raise ValueError("window_bits must be from 9 to 15")
        self.window_bits = window_bits
        self.threshold = threshold
        self._compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -window_bits)

    def deflate(self, message: bytes) -> bytes:
        """``message`` compressed on its own, without the trailing ``00 00 ff ff``."""
        c = self._compressor
        data = c.compress(message) + c.flush(zlib.Z_FULL_FLUSH)
        if data.endswith(_TAIL):
            return data[:-4]
        return data  # pragma: no cover - zlib always ends a full flush with the tail

    def encode_frame(self, message: bytes, opcode: int | None = None) -> bytes:
        """
        One frame for ``message`` (opcode as :func:`encode_frame` chooses it):
        compressed (RSV1 set) unless it is under the threshold.
        """
        if len(message) < self.threshold:
            return encode_frame(message, opcode)
        if opcode is None:
            opcode = opcode_for(message)
        payload = self.deflate(message)
        return frame_header(_FIN | _RSV1 | opcode, len(payload)) + payload

    def encode_batch(self, messages: Sequence[bytes]) -> bytes:
        """The frames of ``messages``, in order, joined for one write."""
        if len(messages) == 1:
            return self.encode_frame(messages[0])
        return b"".join([self.encode_frame(m) for m in messages])


def reply_frame(result: Any) -> tuple[bytes, int]:
    """
    A listener's reply on a raw socket as a payload and its opcode: ``str``
    and JSON (``dict``, ``list``) go as text, bytes as binary.

    :raises TypeError: for anything else, saying what.
    """
    if isinstance(result, str):
        return result.encode("utf-8"), TEXT
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result), BINARY
    if isinstance(result, (dict, list)):
        try:
            return json.dumps(result).encode("utf-8"), TEXT
        except (TypeError, ValueError) as e:
            raise TypeError(f"is not JSON: {e}") from None
    raise TypeError(f"has type {type(result).__name__}; return str, bytes, dict, list or None")
