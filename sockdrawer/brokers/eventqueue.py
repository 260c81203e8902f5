"""
The lifecycle events' queue in Redis (``--webhook`` with ``--redis``,
``--sentinel`` or ``--redis-cluster``): a stream every node adds to and every
node's sender reads from, as one consumer group, so an event queued by a node
that then crashes is sent by another (or by it, restarted).

Keys (one hash tag, so one slot on a cluster):

- ``{<ns>:hooks}:events``: the stream; an entry is one event's body
  (field ``e``), acknowledged and deleted once delivered, so its length is
  what waits.  At ``bound`` entries, new events are dropped and counted.
- ``{<ns>:hooks}:channels``: for each channel with connections, how many
  nodes have some: ``channel_occupied`` is queued by the node that makes it
  1, ``channel_vacated`` by the one that makes it 0.
- ``{<ns>:hooks}:nodes``: each node's last beat (Redis time, ms); a node
  silent for :attr:`RedisEventQueue.dead_after` seconds is presumed lost: a
  sweep queues ``disconnect`` (``"reason": "node lost"``) for each of its
  connections and ``channel_vacated`` for the channels it was the last on.
- ``{<ns>:hooks}:node:<node>:channels`` (set) and ``...:clients`` (hash of
  client id to its connect event): what each node holds, for that sweep.

Each change is one Lua script, so a count and the event it decides are
written together.  While Redis cannot be reached, events wait in this
process (up to ``bound``) and go in order once it can.
"""

from __future__ import annotations

import secrets
import socket
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer.core.lifecycle import IEventQueue

_log = Logger(namespace="sockdrawer.webhook")

#: Lua's stand-in for the Redis server's clock in ms (scores and sweep times from one clock, not the nodes')
_NOW = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_ADD_EVENT = """
local queued, dropped = 0, 0
local function add(body)
  if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
    dropped = dropped + 1
  else
    redis.call('XADD', KEYS[1], '*', 'e', body)
    queued = queued + 1
  end
end
"""

#: KEYS: stream, channels, nodes, this node's channels, this node's clients;
#: ARGV: bound, node, then (op, name, body) for each event
_ADD = _NOW + _ADD_EVENT + """
redis.call('ZADD', KEYS[3], now, ARGV[2])
for i = 3, #ARGV, 3 do
  local op, name, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if op == 'c' then
    if redis.call('HSET', KEYS[5], name, body) == 1 then add(body) end
  elseif op == 'd' then
    if redis.call('HDEL', KEYS[5], name) == 1 then add(body) end
  elseif op == 'o' then
    if redis.call('SADD', KEYS[4], name) == 1 and redis.call('HINCRBY', KEYS[2], name, 1) == 1 then add(body) end
  elseif op == 'v' then
    if redis.call('SREM', KEYS[4], name) == 1 then
      if redis.call('HINCRBY', KEYS[2], name, -1) <= 0 then
        redis.call('HDEL', KEYS[2], name)
        add(body)
      end
    end
  elseif op == 'e' then
    add(body)
  end
end
return {queued, dropped}
"""

#: KEYS: nodes; ARGV: node.  1 when the node was not there (new, or swept as lost)
_BEAT = _NOW + "return redis.call('ZADD', KEYS[1], now, ARGV[1])"

#: KEYS: stream, channels, nodes; ARGV: bound, dead after (ms), key prefix of nodes' sets
_SWEEP = _NOW + _ADD_EVENT + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[2]), 'LIMIT', 0, 10)
for _, node in ipairs(dead) do
  local chans, clients = ARGV[3] .. node .. ':channels', ARGV[3] .. node .. ':clients'
  local all = redis.call('HGETALL', clients)
  for i = 1, #all, 2 do
    local ev = cjson.decode(all[i + 1])
    ev['event'] = 'disconnect'
    ev['time'] = now
    ev['reason'] = 'node lost'
    add(cjson.encode(ev))
  end
  for _, ch in ipairs(redis.call('SMEMBERS', chans)) do
    if redis.call('HINCRBY', KEYS[2], ch, -1) <= 0 then
      redis.call('HDEL', KEYS[2], ch)
      local channel, user = string.match(ch, '^%zm%z(.-)%z(.*)$')
      if channel then
        add(cjson.encode({event = 'member_removed', time = now, channel = channel, user_id = user}))
      else
        add(cjson.encode({event = 'channel_vacated', time = now, channel = ch}))
      end
    end
  end
  redis.call('DEL', chans, clients)
  redis.call('ZREM', KEYS[3], node)
end
return {#dead, queued, dropped}
"""

#: KEYS: stream, this node's channels, this node's clients, nodes; ARGV: node.  A clean leave
_LEAVE = """
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 1
end
return 0
"""

#: KEYS: stream; ARGV: group, consumer, count, claim idle (ms).  Flat id, body, id, body, ...
_TAKE = """
redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local out, want = {}, tonumber(ARGV[3])
local claimed = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[4], '0-0', 'COUNT', want)
for _, e in ipairs(claimed[2]) do
  if e and e[2] then
    table.insert(out, e[1])
    table.insert(out, e[2][2])
  end
end
local left = want - #out / 2
if left > 0 then
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', left, 'STREAMS', KEYS[1], '>')
  if read then
    for _, e in ipairs(read[1][2]) do
      table.insert(out, e[1])
      table.insert(out, e[2][2])
    end
  end
end
return out
"""

#: KEYS: stream; ARGV: group, ids...
_DONE = """
redis.call('XACK', KEYS[1], unpack(ARGV))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"""

#: KEYS: stream; ARGV: group, consumer, ids...
_KEEP = """
if #ARGV < 3 then return 0 end
return #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, unpack(ARGV, 3)) > 0 and 1 or 0
"""

_GROUP = "senders"


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@implementer(IEventQueue)
class RedisEventQueue(Service):
    """
    :param link: the Redis link (``eval``), single or cluster.
    :param namespace: the namespace name.
    :param bound: the most events in the queue.
    :param clock: the reactor.
    :param snapshot: what this node holds, as queue operations (after a sweep
        presumed it lost, it puts them back).
    """

    #: seconds between a node's beats (and its sweeps of lost nodes)
    beat_interval = 2.0
    #: seconds without a beat after which a node is presumed lost
    dead_after = 15.0
    #: seconds an event may stay taken by a sender without a word from it before another sender takes it
    claim_idle = 120.0
    #: seconds between tries to write events while Redis cannot be reached
    retry_delay = 1.0

    def __init__(self, link: Any, namespace: str, bound: int, clock: Any,
                 snapshot: Callable[[], list[tuple[str, str, bytes]]] = list, kind: str = "hooks") -> None:
        self.link = link
        self.bound = bound
        self.clock = clock
        self.snapshot = snapshot
        self.node = f"{socket.gethostname()}:{secrets.token_hex(4)}"
        tag = "{" + namespace + ":" + kind + "}"  # "hooks", or "pusher-hooks" for the Pusher webhooks
        self.stream = f"{tag}:events"
        self.channels = f"{tag}:channels"
        self.nodes = f"{tag}:nodes"
        self.node_prefix = f"{tag}:node:"
        self.my_channels = f"{self.node_prefix}{self.node}:channels"
        self.my_clients = f"{self.node_prefix}{self.node}:clients"
        #: events not queued: the queue (or this process's wait while Redis is away) was at its bound
        self.dropped = 0
        #: called after events are queued (the sender's nudge)
        self.on_added: Callable[[], None] | None = None
        self._waiting: deque[tuple[str, str, bytes]] = deque()
        self._writing: Deferred[Any] | None = None
        self._later: Any = None
        self._failing = False
        #: events delivered this reactor turn, and what fires once they are acknowledged
        self._done: list[tuple[str, Deferred[Any]]] = []
        self._beat = LoopingCall(self._beat_and_sweep)
        self._beat.clock = clock

    def startService(self) -> None:
        super().startService()
        self._beat.start(self.beat_interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._beat.running:
            self._beat.stop()
        if self._later is not None and self._later.active():
            self._later.cancel()
        self._later = None
        return None

    @inlineCallbacks
    def close(self) -> Any:
        """Write what waits (one try), then leave the nodes' list if nothing of this node is left in Redis."""
        try:
            if self._writing is not None:
                yield self._writing
            if self._waiting:
                yield self._write()
            yield self.link.eval(_LEAVE, [self.stream, self.my_channels, self.my_clients, self.nodes],
                                 [self.node])
        except Exception as e:
            _log.warn("could not queue the last webhook events in Redis: {error}", error=e)
        # out of the link's call stack (an answer fires inside its connection's state machine), so that
        # what stops next may call it
        yield deferLater(self.clock, 0, lambda: None)

    # -- adding

    def add(self, op: str, name: str, body: bytes) -> None:
        if len(self._waiting) >= self.bound:
            self.dropped += 1
            return
        self._waiting.append((op, name, body))
        if self._writing is None and self._later is None and self.running:
            self._later = self.clock.callLater(0, self._write)

    def _write(self) -> Deferred[Any]:
        self._later = None
        batch = [self._waiting[i] for i in range(min(len(self._waiting), 200))]
        if not batch:
            return succeed(None)
        args: list[Any] = [self.bound, self.node]
        for op, name, body in batch:
            args += [op, name, body]
        d: Deferred[Any] = self.link.eval(
            _ADD, [self.stream, self.channels, self.nodes, self.my_channels, self.my_clients], args)
        self._writing = d
        d.addCallbacks(self._written, self._not_written, callbackArgs=(len(batch),))
        return d

    def _written(self, result: Any, count: int) -> None:
        self._writing = None
        for _ in range(count):
            self._waiting.popleft()
        queued, dropped = int(result[0]), int(result[1])
        if dropped:
            self._dropped_in_redis(dropped)
        if self._failing:
            self._failing = False
            _log.info("webhook events go into Redis again")
        if queued and self.on_added is not None:
            self.on_added()
        if self._waiting and self.running:
            self._later = self.clock.callLater(0, self._write)

    def _not_written(self, failure: Any) -> None:
        self._writing = None
        if not self._failing:
            self._failing = True
            _log.warn("cannot queue webhook events in Redis: {error}; {count} wait in this process (at most "
                      "{bound})", error=failure.getErrorMessage(), count=len(self._waiting), bound=self.bound)
        if self.running:
            self._later = self.clock.callLater(self.retry_delay, self._write)

    def _dropped_in_redis(self, count: int) -> None:
        self.dropped += count
        _log.warn("webhook queue full ({bound} events): {count} event(s) dropped", bound=self.bound, count=count)

    @inlineCallbacks
    def _beat_and_sweep(self) -> Any:
        try:
            new = yield self.link.eval(_BEAT, [self.nodes], [self.node])
            if int(new):
                # first beat, or a sweep presumed this node lost: put back what it holds (no duplicates: the
                # script skips what is there)
                for op in self.snapshot():
                    self.add(*op)
            swept = yield self.link.eval(_SWEEP, [self.stream, self.channels, self.nodes],
                                         [self.bound, int(self.dead_after * 1000), self.node_prefix])
            lost, queued, dropped = (int(x) for x in swept)
            if lost:
                _log.warn("{count} node(s) silent for {seconds} s presumed lost: their connections' disconnect "
                          "events queued", count=lost, seconds=self.dead_after)
            if dropped:
                self._dropped_in_redis(dropped)
            if queued and self.on_added is not None:
                self.on_added()
        except Exception as e:
            _log.debug("webhook beat failed: {error}", error=e)

    # -- sending

    def take(self, count: int) -> Deferred[list[tuple[str, bytes]]]:
        d: Deferred[Any] = self.link.eval(_TAKE, [self.stream],
                                          [_GROUP, self.node, count, int(self.claim_idle * 1000)])

        def pairs(flat: list[Any]) -> list[tuple[str, bytes]]:
            return [(_text(flat[i]), flat[i + 1] if isinstance(flat[i + 1], bytes) else flat[i + 1].encode())
                    for i in range(0, len(flat or ()), 2)]

        return d.addCallback(pairs)

    def keep(self, ids: list[str]) -> Deferred[Any]:
        d: Deferred[Any] = self.link.eval(_KEEP, [self.stream], [_GROUP, self.node, *ids])
        return d

    def done(self, event_id: str) -> Deferred[Any]:
        """Acknowledged with the others delivered in the same reactor turn (one script for them all)."""
        if not self._done:
            self.clock.callLater(0, self._acknowledge)
        d: Deferred[Any] = Deferred()
        self._done.append((event_id, d))
        return d

    def _acknowledge(self) -> None:
        done, self._done = self._done, []

        def tell(result: Any) -> None:
            for _, d in done:
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

        self.link.eval(_DONE, [self.stream], [_GROUP, *(i for i, _ in done)]).addBoth(tell)

    def length(self) -> Deferred[int]:
        d: Deferred[int] = self.link.eval("return redis.call('XLEN', KEYS[1])", [self.stream], [])
        return d.addCallback(int)
