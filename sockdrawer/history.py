"""
Message history per channel, for ``sockdrawer.v1`` clients that resume.

An *offset* names a message in a channel's history: ``"<epoch>:<position>"``.
Clients treat it as opaque.  The epoch changes whenever a channel's history
starts over (its stream expired, Redis was flushed, the process restarted
with the embedded broker), so a client that resumes from an offset of
another epoch is told ``reset`` instead of silently missing messages.

With Redis, a channel's history is a stream (capped at ``history_size``
entries, expiring ``history_ttl`` seconds after its last message) plus an
epoch key; :data:`PUBLISH_SCRIPT` appends and publishes atomically, so every
node learns each message's offset with the message.  A plain Redis
``PUBLISH`` still reaches every socket, as a message without history.

This module imports only the standard library: the synchronous
:class:`~sockdrawer.Client` runs the same script.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: appends ARGV[2] to the stream KEYS[1] (capped at ARGV[3] entries, both
#: keys expiring after ARGV[4] seconds), creating the epoch KEYS[2] when the
#: history starts, and publishes "<offset>\n<payload>" on channel ARGV[1];
#: returns the offset
PUBLISH_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], epoch)
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
local offset = epoch .. ':' .. id
redis.call('PUBLISH', ARGV[1], offset .. '\\n' .. ARGV[2])
return offset
"""

#: returns {epoch or false, first entry id, last entry id, entries after
#: stream id ARGV[1] ("" for none) as id, payload pairs, at most ARGV[2]}
#: (trimming removes the oldest entries first: when the entry a client saw
#: last is older than the first one kept, it may have missed some)
REPLAY_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then return {false} end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #first == 0 then return {epoch, '0-0', '0-0'} end
local result = {epoch, first[1][1], last[1][1]}
if ARGV[1] ~= '' then
  local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
  for _, entry in ipairs(entries) do
    table.insert(result, entry[1])
    table.insert(result, entry[2][2])
  end
end
return result
"""


class HistoryReset(Exception):
    """History cannot cover the requested offset: the client must start over (``reset``)."""


@dataclass(frozen=True)
class Replay:
    """
    What history holds for a subscription.

    :ivar latest: the offset of the channel's latest message (``None`` when
        it has none yet, and no epoch).
    :ivar messages: ``(offset, payload)`` after the requested offset, in order.
    """

    latest: str | None
    messages: tuple[tuple[str, bytes], ...] = ()


def split_offset(offset: str) -> tuple[str, str]:
    """``(epoch, position)``.  :raises HistoryReset: for text that is not an offset."""
    epoch, sep, position = offset.partition(":")
    if not sep or not epoch or not position:
        raise HistoryReset("not an offset")
    return epoch, position


def stream_id(position: str) -> tuple[int, int]:
    """A Redis stream id as a pair of numbers.  :raises HistoryReset: when it is not one."""
    ms, sep, seq = position.partition("-")
    if not (ms.isdigit() and seq.isdigit()) or not sep:
        raise HistoryReset("not a stream id")
    return int(ms), int(seq)


def redis_keys(namespace: str, channel: bytes) -> tuple[bytes, bytes]:
    """The stream and epoch keys of ``channel``'s history."""
    prefix = namespace.encode("utf-8")
    return prefix + b"#history/" + channel, prefix + b"#epoch/" + channel


def history_channel(namespace: str, channel: bytes) -> bytes:
    """The pub/sub channel history-bearing messages are published on (``<name>#/<channel>``)."""
    return namespace.encode("utf-8") + b"#/" + channel


class _Ring:
    __slots__ = ("epoch", "next", "entries", "last")

    def __init__(self, size: int, now: float) -> None:
        self.epoch = os.urandom(6).hex()
        self.next = 1
        self.entries: deque[tuple[int, bytes]] = deque(maxlen=size)
        self.last = now


class MemoryHistory:
    """
    The embedded broker's history: a ring of the last ``size`` messages per
    channel, forgotten ``ttl`` seconds after the channel's last message, as
    a Redis stream would expire.

    :param clock: returns the current time in seconds.
    """

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self._clock = clock
        self._rings: dict[bytes, _Ring] = {}

    def _ring(self, key: bytes, create: bool) -> _Ring | None:
        now = self._clock()
        ring = self._rings.get(key)
        if ring is not None and now - ring.last > self.ttl:
            del self._rings[key]
            ring = None
        if ring is None and create:
            ring = self._rings[key] = _Ring(self.size, now)
        return ring

    def append(self, key: bytes, message: bytes) -> str:
        """Keep ``message``; return its offset."""
        ring = self._ring(key, True)
        assert ring is not None
        position, ring.next = ring.next, ring.next + 1
        ring.entries.append((position, message))
        ring.last = self._clock()
        return f"{ring.epoch}:{position}"

    def replay(self, key: bytes, since: str | None) -> Replay:
        """
        The latest offset and, with ``since``, everything after it.

        :raises HistoryReset: when ``since`` is of another epoch or older than
            what is kept.
        """
        ring = self._ring(key, False)
        latest = f"{ring.epoch}:{ring.next - 1}" if ring is not None and ring.next > 1 else None
        if since is None:
            return Replay(latest)
        epoch, position = split_offset(since)
        if ring is None or epoch != ring.epoch or not position.isdigit():
            raise HistoryReset("another epoch")
        after = int(position)
        if after >= ring.next:
            raise HistoryReset("offset from the future")
        oldest = ring.entries[0][0] if ring.entries else ring.next
        if after < oldest - 1:
            raise HistoryReset("older than the history")
        return Replay(latest, tuple((f"{ring.epoch}:{p}", m) for p, m in ring.entries if p > after))
