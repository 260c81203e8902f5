"""
Channel naming rules, shared by every part of sockdrawer.

A *channel* is the text after the namespace: WebSocket path ``/rooms/42`` is
channel ``rooms/42``, which is Redis channel ``sock-drawer/rooms/42``.  The
root path ``/`` is the empty channel, Redis channel ``sock-drawer/``.

Inside sockdrawer a channel travels as UTF-8 :class:`bytes` (the *key*),
because that is what Redis hands us and what the hub is keyed by.

This module imports nothing but the standard library: the synchronous
:class:`sockdrawer.Client` uses it too.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

DEFAULT_NAMESPACE = "sock-drawer"
DEFAULT_MAX_CHANNEL_LENGTH = 256

# C0 controls, DEL and C1 controls: never part of a channel name.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class ChannelNameError(ValueError):
    """
    A channel name or WebSocket path that sockdrawer refuses.

    ``str(error)`` is a fixed, short reason that is safe to show to a client:
    it never contains the refused input.
    """


def validate_channel(channel: str, max_length: int = DEFAULT_MAX_CHANNEL_LENGTH) -> bytes:
    """
    Check a channel name and return its key.

    :param channel: the channel as text, without a leading ``/``; ``""`` is
        the root channel.
    :param max_length: the largest key, in UTF-8 bytes.
    :raises ChannelNameError: with the reason, when the name is not valid.
    :return: the channel's UTF-8 key.
    """
    if not isinstance(channel, str):
        raise ChannelNameError("channel must be a str")
    if channel.startswith("/"):
        raise ChannelNameError("channel must not start with '/'")
    key = channel.encode("utf-8", "surrogatepass")
    if len(key) > max_length:
        raise ChannelNameError("channel name too long")
    if _CONTROL.search(channel):
        raise ChannelNameError("control character in channel name")
    try:
        key.decode("utf-8")
    except UnicodeDecodeError:
        raise ChannelNameError("channel name is not valid UTF-8") from None
    if channel:
        for segment in channel.split("/"):
            if segment == "":
                raise ChannelNameError("empty segment in channel name")
            if segment in (".", ".."):
                raise ChannelNameError("'.' or '..' segment in channel name")
    return key


def channel_from_path(path: str, max_length: int = DEFAULT_MAX_CHANNEL_LENGTH) -> bytes:
    """
    Turn a request path, as it came on the wire, into a channel key.

    :param path: the percent-encoded path, without the query string.
    :param max_length: the largest key, in UTF-8 bytes.
    :raises ChannelNameError: when the path is not a valid channel.
    :return: the channel's UTF-8 key; ``b""`` for ``/``.
    """
    # Percent-encoding at most triples the length; anything longer is refused
    # before any decoding work.
    if len(path) > 3 * max_length + 1:
        raise ChannelNameError("channel name too long")
    if not path.startswith("/"):
        raise ChannelNameError("path must start with '/'")
    if _BAD_PERCENT.search(path):
        raise ChannelNameError("bad percent-encoding in path")
    try:
        raw = path[1:].encode("ascii")
    except UnicodeEncodeError:
        raise ChannelNameError("path must be percent-encoded ASCII") from None
    try:
        channel = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise ChannelNameError("path is not valid UTF-8") from None
    if channel.startswith("/"):
        raise ChannelNameError("empty segment in channel name")
    return validate_channel(channel, max_length)


class Namespace:
    """
    Maps channel keys to Redis channels and back, for one namespace.

    :param name: the namespace, ``sock-drawer`` by default.
    """

    def __init__(self, name: str = DEFAULT_NAMESPACE) -> None:
        if not name or "/" in name or "#" in name or _CONTROL.search(name) or any(c in name for c in "*?[]\\"):
            raise ValueError(
                "namespace must be non-empty, without '/', '#', control or glob characters"
            )
        self.name = name
        self.prefix: bytes = name.encode("utf-8") + b"/"
        self.pattern: bytes = self.prefix + b"*"
        #: messages published with history: ``<name>#/<channel>``, payload
        #: ``<offset>\n<message>`` (see :mod:`sockdrawer.history`)
        self.history_prefix: bytes = name.encode("utf-8") + b"#/"
        self.history_pattern: bytes = self.history_prefix + b"*"

    def redis_channel(self, key: bytes) -> bytes:
        """
        :param key: a channel key.
        :return: the Redis channel that carries it.
        """
        return self.prefix + key

    def key_from_redis(self, redis_channel: bytes) -> bytes | None:
        """
        :param redis_channel: a channel name as Redis reported it.
        :return: the channel key, or ``None`` when the name is outside this
            namespace.
        """
        if redis_channel.startswith(self.prefix):
            return redis_channel[len(self.prefix) :]
        return None

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"


def printable(channel: bytes | str | None) -> str:
    """A channel name for a log line: text, never a ``b'...'`` repr (undecodable bytes replaced)."""
    if isinstance(channel, bytes):
        return channel.decode("utf-8", "replace")
    return str(channel)
