"""
Which channels have connections, across every node (``GET /channels``):
each node on Redis writes its own counts into a hash of its own every
:data:`INTERVAL` seconds (expiring after three), and a read adds up every
node's hash, this node's live counts in place of its own.  Counts from the
other nodes are as of their last write; on the embedded broker there is only
this node.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from sockdrawer.core.tokens import pattern_matches

_log = Logger(namespace="sockdrawer")

#: seconds between a node's writes of its counts
INTERVAL = 2.0

#: brings a node's hash up to date and sets it to expire.  KEYS[1]: the hash; ARGV[1]: its ttl; ARGV[2]: "1" when
#: the node wrote fields before (the hash must still be there: else it expired or Redis lost it, and the node
#: answers 0 and writes everything again), "full" to replace the hash with what follows; ARGV[3]: how many
#: fields to delete, those fields, then field, value pairs to set.  Lua's unpack takes a few thousand values at
#: most: the fields go in chunks.
_UPDATE = """
if ARGV[2] == '1' and redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if ARGV[2] == 'full' then
  redis.call('DEL', KEYS[1])
end
local dels = tonumber(ARGV[3])
for i = 4, 3 + dels, 1000 do
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, 3 + dels)))
end
for i = 4 + dels, #ARGV, 1000 do
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 1
"""

#: every this many writes the hash is replaced whole (a failover may have lost a write the node saw succeed)
FULL_EVERY = 30


class HashWriter:
    """
    Keeps one Redis hash equal to a node's counts: each :meth:`write` sends
    only what changed since the last one (and renews the expiry), so a node
    with 10,000 channels sends nothing but the expiry while they stay as they
    are, instead of 20,000 values every time (which cost the reactor about
    14 ms to encode and Redis a few ms to run, every two seconds).  The hash
    is replaced whole when it is gone (expired while Redis was away, or lost
    with it), after a write that failed (Redis may have run it or not), and
    every :data:`FULL_EVERY` writes (a failover may lose a write that
    succeeded).
    """

    def __init__(self, redis: Any, key: str, ttl: int) -> None:
        self.redis = redis
        self.key = key
        self.ttl = ttl
        #: what the hash holds, as of the last write that succeeded (``None``: not known, replace it whole)
        self.written: dict[Any, int] | None = None
        self._writes = 0

    @inlineCallbacks
    def write(self, counts: dict[Any, int]) -> Any:
        written, self.written = self.written, None  # unknown until this write is known to have succeeded
        self._writes += 1
        if written is None or self._writes % FULL_EVERY == 0:
            yield self._replace(counts)
            return
        gone = [field for field in written if field not in counts]
        args: list[Any] = [self.ttl, "1" if written else "0", len(gone), *gone]
        for field, count in counts.items():
            if written.get(field) != count:
                args += [field, count]
        done = yield self.redis.eval(_UPDATE, [self.key], args)
        if not int(done):
            yield self._replace(counts)
            return
        self.written = dict(counts)

    @inlineCallbacks
    def _replace(self, counts: dict[Any, int]) -> Any:
        yield self.redis.eval(_UPDATE, [self.key], [self.ttl, "full", 0, *_pairs(counts)])
        self.written = dict(counts)


def _pairs(counts: dict[Any, int]) -> list[Any]:
    pairs: list[Any] = []
    for field, count in counts.items():
        pairs += [field, count]
    return pairs


class Census(Service):
    """
    :param local: this node's connections by channel key.
    :param redis: the Redis link (``execute`` and ``eval``), or ``None`` on the embedded broker.
    :param namespace: the namespace name (the hashes are ``<namespace>:census:<node>``).
    :param clock: the reactor.
    """

    def __init__(self, local: Callable[[], dict[bytes, int]], redis: Any, namespace: str, clock: Any,
                 users: Callable[[], dict[str, int]] | None = None,
                 info: Callable[[], dict[str, Any]] | None = None) -> None:
        self.local = local
        self.redis = redis
        self.prefix = f"{namespace}:census:"
        node = f"{socket.gethostname()}:{secrets.token_hex(4)}"
        self.key = self.prefix + node
        #: open connections by user (--max-connections-per-user): this node's, and the hashes of the others
        self.users = users
        self.users_prefix = f"{namespace}:users:"
        self.users_key = self.users_prefix + node
        self._other_users: list[Any] = []
        #: this node's figures for the admin page (written as ``<namespace>:nodeinfo:<node>``, expiring)
        self.info = info
        self.node = node
        self.info_prefix = f"{namespace}:nodeinfo:"
        self._channels = HashWriter(redis, self.key, int(INTERVAL * 3))
        self._users = HashWriter(redis, self.users_key, int(INTERVAL * 3))
        self._loop = LoopingCall(self._write)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        if self.redis is not None:
            self._loop.start(INTERVAL, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self.redis is not None:
            return self.redis.execute("DEL", self.key, self.users_key, self.info_prefix + self.node).addErrback(
                lambda f: None)
        return None

    @inlineCallbacks
    def _write(self) -> Any:
        try:
            yield self._channels.write(self.local())
            if self.info is not None:
                yield self.redis.execute("SET", self.info_prefix + self.node, json.dumps(self.info()), "EX",
                                         int(INTERVAL * 3))
            if self.users is not None:
                yield self._users.write(self.users())
                self._other_users = [k for k in (yield self._scan(self.users_prefix))
                                     if (k.decode() if isinstance(k, bytes) else k) != self.users_key]
        except Exception as e:
            _log.debug("could not write the census: {e}", e=e)

    @inlineCallbacks
    def _scan(self, prefix: str) -> Any:
        found: list[Any] = []
        cursor: Any = b"0"
        while True:
            cursor, keys = yield self.redis.execute("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            found += keys
            if cursor in (0, b"0", "0"):
                return found

    @inlineCallbacks
    def nodes(self) -> Any:
        """The other nodes' figures, as they last wrote them (none on the embedded broker)."""
        found: list[dict[str, Any]] = []
        if self.redis is not None:
            mine = self.info_prefix + self.node
            for key in (yield self._scan(self.info_prefix)):
                if (key.decode() if isinstance(key, bytes) else key) == mine:
                    continue
                value = yield self.redis.execute("GET", key)
                if value:
                    try:
                        found.append(json.loads(value))
                    except ValueError:
                        continue
        return found

    @inlineCallbacks
    def others(self, user: str) -> Any:
        """A user's open connections on the other nodes, as their last census says (0 on the embedded broker)."""
        total = 0
        if self.redis is not None:
            for key in self._other_users:
                count = yield self.redis.execute("HGET", key, user)
                total += int(count or 0)
        return total

    @inlineCallbacks
    def read(self, pattern: str | None) -> Any:
        """``{channel: connections}`` across every node, for the channels matching ``pattern``."""
        totals: dict[str, int] = {}

        def add(key: bytes | str, count: int) -> None:
            name = key.decode("utf-8") if isinstance(key, bytes) else key
            if pattern is None or pattern_matches(pattern, name):
                totals[name] = totals.get(name, 0) + count

        for key, count in self.local().items():
            add(key, count)
        if self.redis is not None:
            for name in (yield self._scan(self.prefix)):
                if (name.decode() if isinstance(name, bytes) else name) == self.key:
                    continue
                fields = yield self.redis.execute("HGETALL", name)
                pairs = fields.items() if isinstance(fields, dict) else zip(fields[::2], fields[1::2], strict=True)
                for channel, count in pairs:
                    add(channel, int(count))
        return dict(sorted(totals.items()))
