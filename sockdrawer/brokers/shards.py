"""
One Redis Cluster master as the cluster link sees it: the slot map's parsing, the sharded
subscriber connection (SSUBSCRIBE by slot, confirmations, smessages to the hub), the command
connection's factory, and presence on the cluster's keys.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockdrawer import _private
from sockdrawer.brokers import slots as _slots
from sockdrawer.brokers.linkparts import Backoff, _command
from sockdrawer.brokers.subscriber import HIREDIS, MAX_CHANNELS_PER_COMMAND
from sockdrawer.brokers.url import RedisURL
from sockdrawer.core.channels import Namespace, printable
from sockdrawer.core.interfaces import IChannelHub
from sockdrawer.core.presence import READ_SCRIPT, RedisPresence, channel_json, events_channel

_log = Logger(namespace="sockdrawer.redis")



def _key_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    return str(value).encode("ascii")


def parse_slots(reply: Any) -> list[tuple[int, int, str, int]]:
    """
    ``(first slot, last slot, master host, master port)`` from a ``CLUSTER
    SLOTS`` reply (an empty host, which Redis 7 sends for a node it knows no
    address of, is kept empty).

    :raises ValueError: for a reply of another shape.
    """
    if not isinstance(reply, list):
        raise ValueError(f"CLUSTER SLOTS answered {type(reply).__name__}")
    ranges = []
    for entry in reply:
        if not isinstance(entry, list) or len(entry) < 3 or not isinstance(entry[2], list) or len(entry[2]) < 2:
            raise ValueError("CLUSTER SLOTS entry is not [start, end, [host, port, ...], ...]")
        host = entry[2][0]
        host = host.decode("utf-8", "replace") if isinstance(host, bytes) else str(host)
        ranges.append((int(entry[0]), int(entry[1]), host, int(entry[2][1])))
    return ranges


class _Command:
    """An SSUBSCRIBE or SUNSUBSCRIBE sent, whose replies (one per channel) are still coming."""

    __slots__ = ("kind", "names", "replied", "initial", "waiters")

    def __init__(self, kind: bytes, names: list[bytes], initial: bool) -> None:
        self.kind = kind
        self.names = names
        self.replied = 0
        self.initial = initial
        #: Deferreds that fire once this command (and all before it) is answered
        self.waiters: list[Deferred[None]] = []

    def answered(self) -> None:
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)


class ShardSubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """
    The subscriber connection to one master: ``SSUBSCRIBE``\\ s the channels
    the link gives it, hands ``smessage``\\ s to the hub.

    Its commands are written as they are (one per slot: Redis refuses a
    sharded command whose channels are in different slots) and their replies
    matched here, command by command, out of txredisapi's reply queue.  A
    ``sunsubscribe`` that answers no SUNSUBSCRIBE of ours is Redis dropping
    the channel because its slot moved away: the link is told.  Like
    :class:`~sockdrawer.brokers.subscriber.RedisSubscriberProtocol`, everything parsed
    from one read is delivered inside one hub hold.
    """

    #: the ClusterLink and the _Shard this connection belongs to
    link: Any
    shard: Any
    hub: IChannelHub
    namespace: Namespace
    max_message_size: int = 0
    #: Redis channel names whose last command on this connection was
    #: SSUBSCRIBE; messages on others are for channels just left, dropped
    subscribed: set[bytes]
    #: the subscription count Redis last reported on this connection
    count = 0
    #: whether the first SSUBSCRIBE (everything of this shard) was confirmed
    ready = False

    def connectionMade(self) -> Any:
        self.subscribed = set()
        self._pending: deque[_Command] = deque()
        d = super().connectionMade()
        # a connection lost before it was ready (AUTH refused) fails this
        # Deferred: the factory has logged why already
        ready: Deferred[Any] = self.whenConnected()
        ready.addCallbacks(lambda _: self.link._sub_connected(self), lambda f: None)
        ready.addErrback(lambda f: _log.failure("subscribing on {node} failed", f, node=self.shard.node))
        return d

    def subscribe_all(self, names: list[bytes]) -> None:
        """SSUBSCRIBE to ``names``, everything this connection is to carry; ready once all are confirmed."""
        if not self._send(b"SSUBSCRIBE", names, initial=True):
            self._all_subscribed()

    def ssubscribe(self, names: Iterable[bytes]) -> None:
        self._send(b"SSUBSCRIBE", names)

    def sunsubscribe(self, names: Iterable[bytes]) -> None:
        self._send(b"SUNSUBSCRIBE", names)

    def notify_confirmed(self) -> Deferred[None]:
        """A Deferred that fires once Redis answered every command written so far on this connection."""
        d: Deferred[None] = Deferred()
        if self._pending:
            self._pending[-1].waiters.append(d)
        else:
            d.callback(None)
        return d

    def unconfirmed(self) -> int:
        """Channel names sent in commands that Redis has not answered yet."""
        return sum(len(c.names) - c.replied for c in self._pending)

    def _send(self, kind: bytes, names: Iterable[bytes], initial: bool = False) -> int:
        by_slot: dict[int, list[bytes]] = {}
        for name in names:
            by_slot.setdefault(_slots.slot(name), []).append(name)
        if not by_slot or self.transport is None:
            return 0
        subscribing = kind == b"SSUBSCRIBE"
        out = []
        sent = 0
        for group in by_slot.values():
            for start in range(0, len(group), MAX_CHANNELS_PER_COMMAND):
                chunk = group[start:start + MAX_CHANNELS_PER_COMMAND]
                out.append(_command(kind, *chunk))
                self._pending.append(_Command(kind, chunk, initial))
                sent += len(chunk)
                if subscribing:
                    self.subscribed.update(chunk)
                    self.link.subscribe_commands += 1
                else:
                    self.subscribed.difference_update(chunk)
                    self.link.unsubscribe_commands += 1
        # every command of this turn for this shard in one write
        self.transport.write(b"".join(out))
        return sent

    def replyReceived(self, reply: Any) -> None:
        if type(reply) is list and len(reply) == 3:
            kind = reply[0]
            if kind == b"ssubscribe" or kind == b"sunsubscribe":
                self._confirmation(kind, reply[1], reply[2])
                return
            if kind == b"smessage":
                self._message(reply[1], reply[2])
                return
        elif isinstance(reply, Exception) and self._pending:
            self._refused(self._pending.popleft(), reply)
            return
        super().replyReceived(reply)

    def _confirmation(self, kind: bytes, name: bytes, count: Any) -> None:
        if isinstance(count, int):
            self.count = count
        head = self._pending[0] if self._pending else None
        expected = head.kind.lower() == kind and head.names[head.replied] == name if head is not None else False
        if not expected:
            if kind == b"sunsubscribe" and name in self.subscribed:
                # Redis dropped it: its slot is no longer served here
                self.subscribed.discard(name)
                self.link._dropped_by_redis(self, name)
            return
        assert head is not None
        head.replied += 1
        if head.replied == len(head.names):
            self._pending.popleft()
            head.answered()
            if head.initial and not any(c.initial for c in self._pending):
                self._all_subscribed()
        self.link._confirmed()

    def _refused(self, command: _Command, error: Exception) -> None:
        # one error answers the whole command (MOVED: our slot map is old)
        if command.kind == b"SSUBSCRIBE":
            self.subscribed.difference_update(command.names)
        command.answered()
        self.link._refused(self, command.kind, command.names, error)
        if command.initial and not any(c.initial for c in self._pending):
            self._all_subscribed()
        self.link._confirmed()

    def _all_subscribed(self) -> None:
        if not self.ready:
            self.ready = True
            self.link._sub_ready(self)

    def _message(self, channel: bytes, message: bytes) -> None:
        # the pure-Python parser's way in, and anything hiredis left to
        # dispatch_reply (nothing, in practice)
        self._deliver(channel, message)

    def _deliver(self, channel: bytes, message: bytes) -> bool:
        link = self.link
        if channel not in self.subscribed:
            link.stale_messages += 1
            return False
        namespace = self.namespace
        offset: str | None = None
        if channel.startswith(namespace.prefix):
            key = channel[len(namespace.prefix):]
        elif channel.startswith(namespace.history_prefix):
            key = channel[len(namespace.history_prefix):]
            raw_offset, _, message = message.partition(b"\n")
            offset = raw_offset.decode("ascii", "replace")
        else:
            return False
        if self.max_message_size and len(message) > self.max_message_size:
            _log.warn("dropped a {size}-byte message on {channel!r}: over the limit of {limit} bytes",
                      size=len(message), channel=printable(key), limit=self.max_message_size)
            return False
        self.hub.deliver(key, message, offset)
        link.messages += 1
        return True

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        started = perf_counter()
        hub = self.hub
        hub.hold()
        try:
            if HIREDIS:
                self._parse(data)
            else:
                super().dataReceived(data, unpause)
        finally:
            hub.release()
            self.link.fanout_latency.observe(perf_counter() - started)

    def _parse(self, data: bytes) -> None:
        # HiredisProtocol.dataReceived with a short path for smessages, as
        # RedisSubscriberProtocol._parse has for messages and pmessages
        reader = _private.hiredis_reader(self)
        if data:
            reader.feed(data)
        deliver = self._deliver
        reply = reader.gets()
        while reply is not False:
            if type(reply) is list and len(reply) == 3 and reply[0] == b"smessage":
                deliver(reply[1], reply[2])
            else:
                _private.dispatch_reply(self, reply)
            reply = reader.gets()

    def connectionLost(self, why: Failure = connectionDone) -> None:
        super().connectionLost(why)
        # waiters go on (a history read fails or succeeds on its own; the
        # link calls broker_gap once the channels are back)
        for command in self._pending:
            command.answered()
        self.link._sub_lost(self, why)


class _FactoryMixin(_private.ConnectionPoolBypass):
    url: RedisURL
    backoff: Backoff | None = None

    def connectionError(self, why: str) -> None:
        # txredisapi reports AUTH failures here; the connection is then
        # closed and ClientService retries with backoff, whose RetryLog says
        # why, with the next try's delay
        if self.backoff is not None and self.backoff.report is not None:
            self.backoff.report.failed(why)
        else:
            _log.error("Redis Cluster node {url}: {why}", url=str(self.url), why=why)


def _configure(factory: Any, url: RedisURL, timeout: float) -> None:
    _private.configure_factory(factory, url.password, url.username, timeout)
    factory.url = url



class _CommandFactory(_FactoryMixin, txredisapi.RedisFactory):  # type: ignore[misc]
    def __init__(self, url: RedisURL, timeout: float, backoff: Backoff | None,
                 ready: Callable[[Any], Any] | None = None) -> None:
        super().__init__(None, None, 1)
        self.backoff = backoff
        self.ready = ready
        _configure(self, url, timeout)

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        backoff, ready = self.backoff, self.ready
        if backoff is not None or ready is not None:
            connected = p.whenConnected()
            if backoff is not None:
                # ready means AUTH passed: only then does the backoff start over
                connected.addCallback(lambda _: backoff.reset())
            if ready is not None:
                connected.addCallback(lambda _: ready(p))
            connected.addErrback(lambda f: None)
        return p



class ShardedPresence(RedisPresence):
    """
    :class:`~sockdrawer.presence.RedisPresence` on a cluster: a channel's
    hash is :func:`sockdrawer._slots.presence_key`, in the slot of its events
    channel, and the scripts ``SPUBLISH`` the events there.
    """

    def __init__(self, eval: Callable[[str, list[Any], list[Any]], Any], namespace: str, timeout: float) -> None:
        super().__init__(lambda script, keys, args: eval(_slots.sharded_script(script), keys, args),
                         namespace, timeout)

    def _head(self, key: bytes) -> tuple[list[Any], list[Any]]:
        return [_slots.presence_key(self._name, key)], [events_channel(self._name, key), channel_json(key)]

    def read(self, key: bytes) -> Any:
        """Fires with every live entry of ``key``, as JSON objects."""
        return self._eval(READ_SCRIPT, [_slots.presence_key(self._name, key)], [])
