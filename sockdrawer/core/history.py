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

import json
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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

#: messages one page of a replay holds at most (a replay of more reads page after page)
PAGE_MESSAGES = 100
#: bytes of payload after which a page of a replay ends (one message may pass it)
PAGE_BYTES = 256 * 1024

#: ``KEYS``: the stream and the epoch key; ``ARGV``: the stream id after
#: which to read (``""``: none), the most entries to read, the history's TTL
#: in seconds, the epoch the position belongs to, the most payload bytes to
#: read.  Returns ``{epoch, first kept id, last id, whole, id, payload,
#: ...}``: ``whole`` is ``"1"`` when the stream never lost an entry to its
#: cap (so any position from ``0-0`` on is covered).  Entries after
#: ``ARGV[1]`` follow only when the position is covered (same epoch, not
#: trimmed away, not ahead of the last id): one page, read ten entries at a
#: time until the count or the bytes are reached, so no reply is larger than
#: a page.  A channel without an epoch gets one now when no position is asked
#: for (every subscription has a position, ``<epoch>:0-0`` on a channel that
#: never had a message), and ``{false}`` otherwise.  Reading keeps both keys
#: alive for another TTL (never shortening it, nor giving a TTL to a key without one), so a quiet channel that is
#: read keeps its position.
REPLAY_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  if ARGV[1] ~= '' then return {false} end
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], epoch, 'EX', ARGV[3])
  return {epoch, '0-0', '0-0', '1'}
end
local ttl = redis.call('TTL', KEYS[2])
if ttl >= 0 and ttl < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if redis.call('EXISTS', KEYS[1]) == 0 then return {epoch, '0-0', '0-0', '1'} end
ttl = redis.call('TTL', KEYS[1])
if ttl >= 0 and ttl < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local length, added, last, first = 0, 0, '0-0', '0-0'
for i = 1, #info, 2 do
  local name = info[i]
  if name == 'length' then length = info[i + 1]
  elseif name == 'entries-added' then added = info[i + 1]
  elseif name == 'last-generated-id' then last = info[i + 1]
  elseif name == 'first-entry' and info[i + 1] then first = info[i + 1][1]
  end
end
local whole = added == length
local result = {epoch, first, last, whole and '1' or '0'}
if ARGV[1] == '' or ARGV[4] ~= epoch then return result end
local function id(text)
  local ms, seq = string.match(text, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function before(a, b)
  local ams, aseq = id(a)
  local bms, bseq = id(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
if before(last, ARGV[1]) or (not whole and before(ARGV[1], first)) then return result end
local after, count, bytes = ARGV[1], tonumber(ARGV[2]), 0
while count > 0 and bytes < tonumber(ARGV[5]) do
  local entries = redis.call('XRANGE', KEYS[1], '(' .. after, '+', 'COUNT', math.min(count, 10))
  if #entries == 0 then break end
  for _, entry in ipairs(entries) do
    table.insert(result, entry[1])
    table.insert(result, entry[2][2])
    bytes = bytes + #entry[2][2]
    after = entry[1]
    count = count - 1
    if bytes >= tonumber(ARGV[5]) then break end
  end
end
return result
"""


#: the version of the function library's calling convention
LIBRARY_VERSION = 1
#: entries a retried publish looks back through for its message id
DEDUPE_WINDOW = 100

_LIBRARY = """#!lua name={library}
-- sockdrawer history policy: {policy}
-- Written by the sockdrawer nodes at start (FUNCTION LOAD REPLACE): every
-- publisher that calls {function} follows the nodes' history policy.
local NS = {namespace}
local SIZE = {size}
local TTL = {ttl}
local SHARDED = {sharded}

local function publish(keys, args)
  local payload, id, check = args[1], args[2] or '', args[3] == '1'
  local stream, epoch_key, channel
  if SHARDED then
    stream, epoch_key = keys[1] .. ':history', keys[1] .. ':epoch'
    channel = args[4] or string.sub(keys[1], 2, -2)
    if SIZE == 0 then
      return redis.error_reply('NOHISTORY the sockdrawer nodes keep no history: SPUBLISH on ' .. NS .. '/<channel>')
    end
  else
    if SIZE == 0 then return redis.call('PUBLISH', NS .. '/' .. keys[1], payload) end
    stream, epoch_key = NS .. '#history/' .. keys[1], NS .. '#epoch/' .. keys[1]
    channel = NS .. '#/' .. keys[1]
  end
  local epoch = redis.call('GET', epoch_key)
  if not epoch then
    local t = redis.call('TIME')
    epoch = t[1] .. string.format('%06d', tonumber(t[2]))
    redis.call('DEL', stream)
    redis.call('SET', epoch_key, epoch)
  elseif check and id ~= '' then
    for _, entry in ipairs(redis.call('XREVRANGE', stream, '+', '-', 'COUNT', {window})) do
      if entry[2][4] == id then return epoch .. ':' .. entry[1] end
    end
  end
  local xid
  if id ~= '' then
    xid = redis.call('XADD', stream, 'MAXLEN', SIZE, '*', 'd', payload, 'i', id)
  else
    xid = redis.call('XADD', stream, 'MAXLEN', SIZE, '*', 'd', payload)
  end
  redis.call('EXPIRE', stream, TTL)
  redis.call('EXPIRE', epoch_key, TTL)
  local offset = epoch .. ':' .. xid
  redis.call({publish_command}, channel, offset .. '\\n' .. payload)
  return offset
end

redis.register_function('{function}', publish)
"""


def _suffix(namespace: str) -> str:
    """``""`` for the default namespace, else ``_`` and the name with every byte outside ``[A-Za-z0-9]`` as ``_xx``."""
    if namespace == "sock-drawer":
        return ""
    return "_" + "".join(chr(b) if chr(b).isalnum() and b < 128 else f"_{b:02x}" for b in namespace.encode("utf-8"))


def library_name(namespace: str) -> str:
    """The name of the function library the nodes of ``namespace`` load (``sockdrawer`` for the default)."""
    return "sockdrawer" + _suffix(namespace)


def function_name(namespace: str) -> str:
    """
    The Redis function that publishes on ``namespace`` with its history
    policy: ``sockdrawer_publish`` for the default namespace.
    """
    return "sockdrawer_publish" + _suffix(namespace)


def _lua_string(text: str) -> str:
    return '"' + "".join(chr(b) if chr(b).isalnum() and b < 128 or chr(b) in "-_/#.:" else f"\\{b:03d}"
                         for b in text.encode("utf-8")) + '"'


def policy_line(namespace: str, size: int, ttl: float, sharded: bool) -> str:
    """The policy as the library states it (one line of JSON), to compare what another node loaded."""
    return json.dumps({"namespace": namespace, "size": size, "ttl": max(1, int(ttl)), "sharded": sharded,
                       "version": LIBRARY_VERSION}, sort_keys=True)


def library_code(namespace: str, size: int, ttl: float, sharded: bool = False) -> str:
    """
    The Redis 7 function library that publishes with the nodes' history
    policy: ``FCALL <function_name> 1 <key> <payload> [<id> [<check>]]``,
    where ``<key>`` is the channel (on a Redis Cluster, the channel's hash
    tag ``{<name>#/<channel>}``, which routes the call to the shard that
    owns its history).  With ``<id>``, the message is kept with that id, and
    a call with ``<check>`` ``1`` (a retry) whose id is among the channel's
    last :data:`DEDUPE_WINDOW` messages returns that message's offset
    instead of publishing it again.  Returns the offset; with no history
    kept (size 0) on a single Redis, the count of nodes, as ``PUBLISH``.
    """
    return _LIBRARY.format(
        library=library_name(namespace), function=function_name(namespace),
        policy=policy_line(namespace, size, ttl, sharded), namespace=_lua_string(namespace), size=size,
        ttl=max(1, int(ttl)), sharded="true" if sharded else "false", window=DEDUPE_WINDOW,
        publish_command="'SPUBLISH'" if sharded else "'PUBLISH'")


def loaded_policy(code: str) -> str | None:
    """The policy line of a library's code (as :func:`policy_line` writes it), or ``None``."""
    for line in code.splitlines():
        if line.startswith("-- sockdrawer history policy: "):
            return line.partition(": ")[2]
    return None


#: the longest offset text accepted (an epoch, a colon and a stream id are far shorter)
MAX_OFFSET_LENGTH = 64


class HistoryReset(Exception):
    """History cannot cover the requested offset: the client must start over (``reset``)."""


@dataclass(frozen=True)
class Replay:
    """
    What history holds for a subscription.

    :ivar latest: the position of the channel's latest message
        (``<epoch>:0-0`` or ``<epoch>:0`` when it has none yet); ``None``
        only without history.
    :ivar messages: ``(offset, payload)`` after the requested offset, in order.
    :ivar more: the messages are one page, and more follow the last of them
        (read them with its offset).
    """

    latest: str | None
    messages: tuple[tuple[str, bytes], ...] = ()
    more: bool = False


def split_offset(offset: str) -> tuple[str, str]:
    """``(epoch, position)``.  :raises HistoryReset: for text that is not an offset."""
    epoch, sep, position = offset.partition(":")
    if not sep or not epoch or not position or len(offset) > MAX_OFFSET_LENGTH or not offset.isascii():
        raise HistoryReset("not an offset")
    return epoch, position


def stream_id(position: str) -> tuple[int, int]:
    """A Redis stream id as a pair of numbers.  :raises HistoryReset: when it is not one."""
    ms, sep, seq = position.partition("-")
    if not (ms.isdigit() and seq.isdigit()) or not sep or not position.isascii():
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
    __slots__ = ("epoch", "next", "entries", "last", "size")

    def __init__(self, size: int, now: float) -> None:
        self.epoch = os.urandom(6).hex()
        self.next = 1
        #: made with the first message (an empty deque is half a KiB: a subscription alone makes a ring)
        self.entries: deque[tuple[int, bytes]] | tuple[()] = ()
        self.size = size
        self.last = now


class MemoryHistory:
    """
    The embedded broker's history: a ring of the last ``size`` messages per
    channel, forgotten ``ttl`` seconds after the channel's last message or
    read (a subscription's position), as a Redis stream would expire.
    Forgotten rings are swept at most every ``ttl`` seconds (and at least
    once a minute), so channels that went quiet do not hold memory.

    :param clock: returns the current time in seconds.
    """

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self._clock = clock
        self._rings: dict[bytes, _Ring] = {}
        self._swept = clock()

    def __len__(self) -> int:
        """Channels with a ring (for tests and metrics)."""
        return len(self._rings)

    def _sweep(self, now: float) -> None:
        if now - self._swept < min(self.ttl, 60.0):
            return
        self._swept = now
        ttl = self.ttl
        for key in [key for key, ring in self._rings.items() if now - ring.last > ttl]:
            del self._rings[key]

    def _ring(self, key: bytes, create: bool) -> _Ring | None:
        now = self._clock()
        self._sweep(now)
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
        entries = ring.entries
        if not isinstance(entries, deque):
            entries = ring.entries = deque(maxlen=ring.size)
        entries.append((position, message))
        ring.last = self._clock()
        return f"{ring.epoch}:{position}"

    def tail(self, key: bytes, count: int) -> list[tuple[str, bytes]]:
        """The last ``count`` messages kept for ``key``, oldest first, with their offsets."""
        ring = self._ring(key, False)
        if ring is None or not ring.entries:
            return []
        return [(f"{ring.epoch}:{p}", m) for p, m in list(ring.entries)[-count:]]

    def replay(self, key: bytes, since: str | None, limit: int = PAGE_MESSAGES,
               max_bytes: int = PAGE_BYTES) -> Replay:
        """
        The latest offset (``<epoch>:0`` on a channel without messages yet,
        whose history starts now) and, with ``since``, one page of what
        follows it: at most ``limit`` messages, ending once ``max_bytes`` of
        payload are reached (``more`` when others follow).

        :raises HistoryReset: when ``since`` is of another epoch or older than
            what is kept.
        """
        ring = self._ring(key, since is None)
        if since is None:
            assert ring is not None
            ring.last = self._clock()
            return Replay(f"{ring.epoch}:{ring.next - 1}")
        epoch, position = split_offset(since)
        if ring is None or epoch != ring.epoch or not position.isdigit():  # ASCII: split_offset
            raise HistoryReset("another epoch")
        ring.last = self._clock()
        after = int(position)
        latest = f"{ring.epoch}:{ring.next - 1}"
        if after >= ring.next:
            raise HistoryReset("offset from the future")
        entries = ring.entries
        oldest = entries[0][0] if entries else ring.next
        if after < oldest - 1:
            raise HistoryReset("older than the history")
        page: list[tuple[str, bytes]] = []
        size = 0
        # positions are consecutive: the first one after ``after`` is at this index
        for i in range(after + 1 - oldest, len(entries)):
            if len(page) >= limit or size >= max_bytes:
                return Replay(latest, tuple(page), more=True)
            p, message = entries[i]
            page.append((f"{ring.epoch}:{p}", message))
            size += len(message)
        return Replay(latest, tuple(page))


#: KEYS: stream, epoch key; ARGV: count.  The epoch, then the last entries newest first (id, payload, ...)
TAIL_SCRIPT = """
local out = {redis.call('GET', KEYS[2]) or ''}
for _, entry in ipairs(redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', tonumber(ARGV[1]))) do
  table.insert(out, entry[1])
  table.insert(out, entry[2][2])
end
return out
"""


def tail_from_script(reply: Any) -> list[tuple[str, bytes]]:
    """:data:`TAIL_SCRIPT`'s reply as ``(offset, message)``, oldest first (none without an epoch)."""
    epoch = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0] or "")
    if not epoch:
        return []
    out = []
    for i in range(1, len(reply) - 1, 2):
        entry = reply[i].decode() if isinstance(reply[i], bytes) else str(reply[i])
        payload = reply[i + 1] if isinstance(reply[i + 1], bytes) else str(reply[i + 1]).encode("utf-8")
        out.append((f"{epoch}:{entry}", payload))
    return out[::-1]
