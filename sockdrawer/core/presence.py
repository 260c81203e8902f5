"""
Presence: who is on a channel, across every node, for ``sockdrawer.v1``
subscriptions made with ``"presence": true`` (see ``docs/protocol.rst``).

A channel's presence is a set of *entries*, one per socket that subscribed
with presence: ``{"user": <the token's sub or null>, "client": <the socket's
id>}``.  Joins and leaves travel as *events* on the hub key
``/presence/<channel>`` (:func:`events_key`): a channel name never starts with
``/``, so no socket, listener or publisher can use that key, and a Redis
subscriber receives it like any other key (``<name>//presence/<channel>``
matches the namespace pattern, and a per-channel subscription names it).

An event is ``<nonce>\\n<json>``: ``<json>`` is the ``join`` or ``leave``
message exactly as clients get it, and ``<nonce>`` is empty except on the
event of a :meth:`join` or :meth:`sync` call, where it marks the point of the
event stream that the call's snapshot shows (a ``sync`` event has no JSON).
A node that needs the whole list (:class:`sockdrawer.v1.PresenceGroup`)
buffers events until it sees the marker of a snapshot it holds, takes the
snapshot, and applies the events after the marker: no join or leave is lost or
counted twice, whichever of the snapshot and the marker arrives first.

With Redis (:class:`RedisPresence`), a channel's entries are a hash
``<name>#presence/<channel>``, field ``<node>/<client>``, value
``{"user": .., "client": .., "expires": <unix time, Redis's clock>}``.  Each
node refreshes its own entries every third of ``presence_timeout``; every
script first removes the expired entries of the hash and publishes a
``leave`` for each (:data:`JOIN_SCRIPT`, :data:`SYNC_SCRIPT`,
:data:`REFRESH_SCRIPT`), so the sockets of a node that died leave within about
``presence_timeout`` plus a third of it, as long as some node has a presence
subscriber on the channel; readers ignore expired entries
(:data:`READ_SCRIPT`).  Redis 7.0 has no per-field expiry: these scripts are
it.  The hash itself expires one ``presence_timeout`` after its last refresh.

Without Redis, :class:`MemoryPresence` keeps the same entries in the process
(a socket leaves when it closes; there is no other node to outlive).

This module imports only the standard library: the synchronous
:class:`~sockdrawer.Client` reads presence with the same script.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Any

#: hub keys of presence events start with this (no channel name does)
EVENTS_PREFIX = b"/presence/"

_PRELUDE = r"""
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function parse(value)
  local inner, expires = string.match(value, '^{(.*),"expires":([%d.]+)}$')
  return inner, expires and tonumber(expires)
end
-- KEYS[1] the hash, ARGV[1] the events channel, ARGV[2] the channel as JSON:
-- removes the expired (or unreadable) entries, publishing a leave for each;
-- returns the set of live fields
local function reap(t)
  local all = redis.call('HGETALL', KEYS[1])
  local live = {}
  for i = 1, #all, 2 do
    local inner, expires = parse(all[i + 1])
    if expires and expires > t then
      live[all[i]] = true
    else
      redis.call('HDEL', KEYS[1], all[i])
      if inner then
        redis.call('PUBLISH', ARGV[1], '\n{"op":"leave","channel":' .. ARGV[2] .. ',' .. inner .. '}')
      end
    end
  end
  return live
end
-- ARGV[3] the timeout in seconds, ARGV[4] the hash's time to live
local function put(field, inner, t)
  local expires = string.format('%.3f', t + tonumber(ARGV[3]))
  redis.call('HSET', KEYS[1], field, '{' .. inner .. ',"expires":' .. expires .. '}')
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
"""

#: adds entry ARGV[7] (``"user":..,"client":..``) as field ARGV[6], publishes
#: its join marked with nonce ARGV[5]; with ARGV[8] = "1", removes expired
#: entries first and returns every live entry (with it), else nothing (a node
#: that has the list already needs no snapshot: a join costs O(1), not O(n))
JOIN_SCRIPT = _PRELUDE + r"""
local t = now()
local snapshot = ARGV[8] == '1'
local existed
if snapshot then
  existed = reap(t)[ARGV[6]]
else
  existed = redis.call('HEXISTS', KEYS[1], ARGV[6]) == 1
end
put(ARGV[6], ARGV[7], t)
local body = ''
if not existed then body = '{"op":"join","channel":' .. ARGV[2] .. ',' .. ARGV[7] .. '}' end
redis.call('PUBLISH', ARGV[1], ARGV[5] .. '\n' .. body)
if snapshot then return redis.call('HVALS', KEYS[1]) end
return {}
"""

#: publishes the marker ARGV[3] (a nonce) and returns every live entry
SYNC_SCRIPT = _PRELUDE + r"""
local live = reap(now())
redis.call('PUBLISH', ARGV[1], ARGV[3] .. '\n')
return redis.call('HVALS', KEYS[1])
"""

#: renews the entries ARGV[5], ARGV[6], ... (field, entry pairs) for ARGV[3]
#: more seconds, publishing a join for each that was missing (expired, or lost
#: in an outage); returns how many were missing
REFRESH_SCRIPT = _PRELUDE + r"""
local t = now()
local live = reap(t)
local missing = 0
for i = 5, #ARGV, 2 do
  if not live[ARGV[i]] then
    missing = missing + 1
    redis.call('PUBLISH', ARGV[1], '\n{"op":"join","channel":' .. ARGV[2] .. ',' .. ARGV[i + 1] .. '}')
  end
  put(ARGV[i], ARGV[i + 1], t)
end
return missing
"""

#: removes the fields ARGV[3], ARGV[4], ..., publishing a leave for each that
#: was there; returns how many were
LEAVE_SCRIPT = _PRELUDE + r"""
local removed = 0
for i = 3, #ARGV do
  local value = redis.call('HGET', KEYS[1], ARGV[i])
  if value then
    removed = removed + 1
    redis.call('HDEL', KEYS[1], ARGV[i])
    local inner = parse(value)
    if inner then
      redis.call('PUBLISH', ARGV[1], '\n{"op":"leave","channel":' .. ARGV[2] .. ',' .. inner .. '}')
    end
  end
end
return removed
"""

#: the live entries of hash KEYS[1] (changes nothing)
READ_SCRIPT = _PRELUDE + r"""
local t = now()
local all = redis.call('HGETALL', KEYS[1])
local result = {}
for i = 2, #all, 2 do
  local inner, expires = parse(all[i])
  if expires and expires > t then table.insert(result, all[i]) end
end
return result
"""


def events_key(key: bytes) -> bytes:
    """The hub key that carries ``key``'s presence events."""
    return EVENTS_PREFIX + key


def hash_key(namespace: str, key: bytes) -> bytes:
    """The Redis hash of ``key``'s entries: ``<name>#presence/<channel>`` (a namespace has no ``#``)."""
    return namespace.encode("utf-8") + b"#presence/" + key


def events_channel(namespace: str, key: bytes) -> bytes:
    """The Redis channel of ``key``'s events: ``<name>/`` and :func:`events_key`."""
    return namespace.encode("utf-8") + b"/" + events_key(key)


def channel_json(key: bytes) -> str:
    """The channel as a JSON string, as events carry it."""
    return json.dumps(key.decode("utf-8"), ensure_ascii=False)


def entry_fields(user: str | None, client: str) -> str:
    """An entry's JSON members without braces: ``"user":..,"client":..``."""
    return json.dumps({"user": user, "client": client}, ensure_ascii=False, separators=(",", ":"))[1:-1]


def parse_entries(values: Iterable[Any]) -> list[dict[str, Any]]:
    """The ``{"user", "client"}`` entries of hash values (unreadable ones are left out)."""
    entries = []
    for value in values:
        try:
            entry = json.loads(value)
            entries.append({"user": entry["user"], "client": entry["client"]})
        except (ValueError, TypeError, KeyError):
            continue
    return entries


def parse_event(message: bytes) -> tuple[str, dict[str, Any] | None, bytes]:
    """
    :return: an event's nonce (``""`` for none), its JSON as a ``dict`` (``None``
        for a bare marker or an unreadable event), and the JSON's bytes.
    """
    nonce, _, body = message.partition(b"\n")
    event: dict[str, Any] | None = None
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict) and parsed.get("op") in ("join", "leave") and isinstance(parsed.get("client"), str):
            event = parsed
    return nonce.decode("ascii", "replace"), event, body


def _event(op: str, channel: str, fields: str) -> str:
    return f'{{"op":"{op}","channel":{channel},{fields}}}'


class MemoryPresence:
    """
    Presence in this process (the embedded broker): entries per channel in a
    ``dict``, events delivered straight to the hub.

    :param deliver: the hub's ``deliver(key, message)``.
    """

    #: entries here never expire: nothing to renew
    expires = False

    def __init__(self, deliver: Callable[[bytes, bytes], Any]) -> None:
        self._deliver = deliver
        #: channel key -> field -> entry fields (``"user":..,"client":..``)
        self.local: dict[bytes, dict[str, str]] = {}

    def join(self, key: bytes, field: str, fields: str, nonce: str, snapshot: bool = True) -> list[str]:
        """Add an entry, publish its join marked with ``nonce``; return every entry (with ``snapshot``)."""
        entries = self.local.setdefault(key, {})
        body = "" if field in entries else _event("join", channel_json(key), fields)
        entries[field] = fields
        self._deliver(events_key(key), f"{nonce}\n{body}".encode())
        return self.read(key) if snapshot else []

    def sync(self, key: bytes, nonce: str) -> list[str]:
        """Publish the marker ``nonce``; return every entry."""
        self._deliver(events_key(key), f"{nonce}\n".encode())
        return self.read(key)

    def leave(self, key: bytes, fields: Iterable[str]) -> int:
        """Remove entries, publishing a leave for each that was there."""
        entries = self.local.get(key)
        removed = 0
        for field in fields:
            if entries is None or field not in entries:
                continue
            removed += 1
            self._deliver(events_key(key), ("\n" + _event("leave", channel_json(key), entries.pop(field))).encode())
        if entries is not None and not entries:
            del self.local[key]
        return removed

    def read(self, key: bytes) -> list[str]:
        """Every entry of ``key``, as JSON objects."""
        return ["{" + fields + "}" for fields in self.local.get(key, {}).values()]

    def refresh(self, keys: Iterable[bytes] | None = None) -> list[Any]:
        """Nothing to renew in one process."""
        return []

    def leave_all(self) -> list[Any]:
        """Remove every entry (the node stops)."""
        for key in list(self.local):
            self.leave(key, list(self.local.get(key, ())))
        return []


class RedisPresence:
    """
    Presence in Redis, for one node: its own entries are kept in
    :attr:`local` too, and renewed by :meth:`refresh` (called every third
    of ``timeout``), so entries lost in an outage come back (with a join).

    :param eval: ``eval(script, keys, args)`` returning a Deferred
        (:meth:`sockdrawer.redislink.RedisLink.eval`).
    :param namespace: the namespace name.
    :param timeout: seconds an entry lives without being renewed.
    """

    #: entries expire unless renewed (the presence service renews them every third of the timeout)
    expires = True

    def __init__(self, eval: Callable[[str, list[Any], list[Any]], Any], namespace: str, timeout: float) -> None:
        self._eval = eval
        self._name = namespace
        self.timeout = timeout
        self._ttl = math.ceil(timeout) + 1
        self.local: dict[bytes, dict[str, str]] = {}

    def _head(self, key: bytes) -> tuple[list[Any], list[Any]]:
        return [hash_key(self._name, key)], [events_channel(self._name, key), channel_json(key)]

    def join(self, key: bytes, field: str, fields: str, nonce: str, snapshot: bool = True) -> Any:
        """Add an entry, publish its join marked with ``nonce``; fires with every live entry (with ``snapshot``)."""
        self.local.setdefault(key, {})[field] = fields
        keys, args = self._head(key)
        return self._eval(JOIN_SCRIPT, keys, [*args, repr(self.timeout), self._ttl, nonce, field, fields,
                                              "1" if snapshot else "0"])

    def sync(self, key: bytes, nonce: str) -> Any:
        """Publish the marker ``nonce``; fires with every live entry."""
        keys, args = self._head(key)
        return self._eval(SYNC_SCRIPT, keys, [*args, nonce])

    def leave(self, key: bytes, fields: Iterable[str]) -> Any:
        """Remove entries, publishing a leave for each that was there; fires with how many were."""
        fields = list(fields)
        entries = self.local.get(key)
        if entries is not None:
            for field in fields:
                entries.pop(field, None)
            if not entries:
                del self.local[key]
        keys, args = self._head(key)
        return self._eval(LEAVE_SCRIPT, keys, [*args, *fields])

    def read(self, key: bytes) -> Any:
        """Fires with every live entry of ``key``, as JSON objects."""
        return self._eval(READ_SCRIPT, [hash_key(self._name, key)], [])

    def refresh(self, keys: Iterable[bytes] | None = None) -> list[Any]:
        """Renew this node's entries (on ``keys``, else every channel), one script per channel; returns their
        Deferreds."""
        calls = []
        chosen = list(self.local) if keys is None else [key for key in keys if key in self.local]
        for key in chosen:
            entries = self.local[key]
            keys, args = self._head(key)
            pairs = [part for item in entries.items() for part in item]
            calls.append(self._eval(REFRESH_SCRIPT, keys, [*args, repr(self.timeout), self._ttl, *pairs]))
        return calls

    def leave_all(self) -> list[Any]:
        """Remove every entry of this node (it stops); returns the scripts' Deferreds."""
        return [self.leave(key, list(entries)) for key, entries in list(self.local.items())]
