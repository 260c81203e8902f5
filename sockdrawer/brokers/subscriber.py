"""
The Redis subscriber connection of a node (pattern or per channel), batching what each read
brings to the hub.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from time import perf_counter
from typing import Any, Protocol

import txredisapi
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockdrawer import _private
from sockdrawer.brokers.linkparts import _command
from sockdrawer.core.channels import Namespace, printable
from sockdrawer.core.interfaces import IChannelHub
from sockdrawer.core.stats import Histogram

_log = Logger(namespace="sockdrawer.redis")


HIREDIS = txredisapi.RedisProtocol is txredisapi.HiredisProtocol

# Twisted reads at most 64 KiB per doRead (over rediss:// the TLS layer hands
# over at most one 16 KiB record at a time, so this hint stays silent there)
_FULL_READ = 60 * 1024
# that many full reads in a row when the link drops: Redis probably dropped us
_BEHIND = 8

#: most Redis channel names in one SUBSCRIBE or UNSUBSCRIBE command
MAX_CHANNELS_PER_COMMAND = 10_000


class SubscriberLink(Protocol):
    """What a :class:`RedisSubscriberProtocol` tells its link (a :class:`RedisLink`, or one per cluster shard)."""

    messages: int
    stale_messages: int
    subscriptions: int
    subscribe_commands: int
    unsubscribe_commands: int
    fanout_latency: Histogram

    def _subscribed(self, protocol: RedisSubscriberProtocol) -> None: ...

    def _channels_connection(self, protocol: RedisSubscriberProtocol) -> None: ...

    def _lost(self, protocol: RedisSubscriberProtocol, why: Failure) -> None: ...


class RedisSubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """
    A txredisapi subscriber that subscribes as soon as the connection is
    ready (after AUTH), and hands every message to the hub.

    By pattern (the default), it PSUBSCRIBEs to the namespace.  By channel
    (:attr:`by_channel`), it SUBSCRIBEs to each channel the hub has sinks for
    (the raw channel and the one carrying messages with history), and
    :meth:`update_channels` follows the hub from there; those commands are
    written as they are and their confirmations counted here, out of
    txredisapi's reply queue (one SUBSCRIBE of n channels gets n replies,
    which that queue would hand to the next caller, such as a PING).

    Everything parsed from one read of the socket is delivered inside one
    :meth:`IChannelHub.hold`, so the hub can send each socket the messages of
    one read in one write.
    """

    hub: IChannelHub
    namespace: Namespace
    link: SubscriberLink | None = None
    max_message_size: int = 0
    #: subscribe per channel (``--subscribe channels``) instead of by pattern
    by_channel: bool = False
    #: by channel, once subscribing: the Redis channels whose last command
    #: on this connection was SUBSCRIBE (Redis runs a connection's commands
    #: in order, so this is what it ends up with); messages on others are
    #: for channels just unsubscribed, and dropped.  ``None`` by pattern.
    subscribed: set[bytes] | None = None
    #: (un)subscribe confirmations still to come
    _outstanding = 0
    #: Redis channels written in (un)subscribe commands, and confirmed, so far
    _sent = 0
    _acked = 0
    #: (value _acked must reach, Deferred) per notify_confirmed caller, in order
    _waiters: deque[tuple[int, Deferred[None]]] | None = None
    #: confirmations still to come for the first SUBSCRIBE on this connection
    _initial = 0

    #: by channel: the commands, their confirmations, and the message reply
    #: (Redis Cluster's sharded pub/sub has its own: SSUBSCRIBE, ...)
    SUBSCRIBE = b"SUBSCRIBE"
    UNSUBSCRIBE = b"UNSUBSCRIBE"
    CONFIRMATIONS = (b"subscribe", b"unsubscribe")
    MESSAGE = b"message"

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        # a connection lost before it was ready (AUTH refused) fails this
        # Deferred: the link has said why already
        self.whenConnected().addCallback(self._subscribe).addErrback(lambda f: None)
        return d

    def _subscribe(self, _: object) -> Deferred[Any] | None:
        if self.by_channel:
            names = [name for key in self.hub.channels() for name in self._names(key) if self._owns(name)]
            self.subscribed = set(names)
            self._initial = self._write(self.SUBSCRIBE, names)
            if self.link is not None:
                self.link._channels_connection(self)
            if not self._initial:
                self._subscribed(None)
            return None
        # raw messages, and messages published with history
        d: Deferred[Any] = self.psubscribe([self.namespace.pattern, self.namespace.history_pattern])
        d.addCallback(self._subscribed)
        d.addErrback(self._subscribe_failed)
        return d

    def _names(self, key: bytes) -> tuple[bytes, bytes]:
        # each channel is two Redis channels: raw messages, and messages with history
        return self.namespace.prefix + key, self.namespace.history_prefix + key

    def _owns(self, name: bytes) -> bool:
        """Whether this connection is the one to subscribe to Redis channel ``name`` (all of them, here)."""
        return True

    def update_channels(self, keys: Iterable[bytes]) -> None:
        """
        By channel: SUBSCRIBE to the Redis channels of those of ``keys``
        that have sinks in the hub now and are not subscribed, UNSUBSCRIBE
        from those that have none (or are not this connection's any more)
        and are; one command each at most (per
        :data:`MAX_CHANNELS_PER_COMMAND` names).
        """
        subscribed = self.subscribed
        if subscribed is None:
            return
        has_sinks = self.hub.subscribers
        owns = self._owns
        wanted: list[bytes] = []
        unwanted: list[bytes] = []
        for key in keys:
            sinks = has_sinks(key)
            for name in self._names(key):
                if sinks and owns(name):
                    if name not in subscribed:
                        subscribed.add(name)
                        wanted.append(name)
                elif name in subscribed:
                    subscribed.discard(name)
                    unwanted.append(name)
        self._write(self.UNSUBSCRIBE, unwanted)
        self._write(self.SUBSCRIBE, wanted)

    def _write(self, command: bytes, names: list[bytes]) -> int:
        if not names or self.transport is None:
            return 0
        commands = [names[start:start + MAX_CHANNELS_PER_COMMAND]
                    for start in range(0, len(names), MAX_CHANNELS_PER_COMMAND)]
        return self._write_commands(command, commands)

    def _write_commands(self, command: bytes, commands: list[list[bytes]]) -> int:
        # all in one write: one send() for the whole batch
        self.transport.write(b"".join(_command(command, *names) for names in commands))
        count = sum(len(names) for names in commands)
        self._outstanding += count
        self._sent += count
        link = self.link
        if link is not None:
            if command == self.SUBSCRIBE:
                link.subscribe_commands += len(commands)
            else:
                link.unsubscribe_commands += len(commands)
        return count

    def replyReceived(self, reply: Any) -> None:
        if self.subscribed is not None:
            if type(reply) is list and len(reply) == 3 and reply[0] in self.CONFIRMATIONS:
                self._confirmed(reply[0], reply[1], reply[2])
                return
            if isinstance(reply, Exception) and self._outstanding:
                self._subscribe_failed(Failure(reply))
                return
        super().replyReceived(reply)

    def notify_confirmed(self, d: Deferred[None]) -> None:
        """By channel: fire ``d`` once Redis confirmed every (un)subscription written so far on this connection."""
        if self._acked >= self._sent:
            d.callback(None)
            return
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append((self._sent, d))

    def _confirmed(self, kind: bytes, name: bytes, count: Any) -> None:
        if self._outstanding:
            self._outstanding -= 1
        self._acked += 1
        waiters = self._waiters
        while waiters and waiters[0][0] <= self._acked:
            waiters.popleft()[1].callback(None)
        if self.link is not None and isinstance(count, int):
            self.link.subscriptions = count
        if self._initial:
            self._initial -= 1
            if not self._initial:
                self._subscribed(None)

    def _subscribed(self, reply: Any) -> None:
        if self.link is not None:
            self.link._subscribed(self)

    def _subscribe_failed(self, failure: Failure) -> None:
        command = (self.SUBSCRIBE if self.by_channel else b"PSUBSCRIBE").decode()
        _log.warn("{command} failed ({error}); dropping the Redis link to retry", command=command,
                  error=failure.getErrorMessage() or type(failure.value).__name__)
        if self.transport is not None:
            self.transport.loseConnection()

    #: consecutive reads that filled Twisted's read buffer: this node is
    #: behind, and Redis is queueing messages for it
    full_reads = 0

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        started = perf_counter()
        if len(data) >= _FULL_READ:
            self.full_reads += 1
        elif self.full_reads:
            self.full_reads = 0
        hub = self.hub
        hub.hold()
        try:
            if HIREDIS:
                self._parse(data)
            else:
                super().dataReceived(data, unpause)
        finally:
            hub.release()
            link = self.link
            if link is not None:
                # from reading the batch off Redis to its last socket write
                link.fanout_latency.observe(perf_counter() - started)

    def _parse(self, data: bytes) -> None:
        # HiredisProtocol.dataReceived, with a short path for the replies
        # that make up nearly all traffic on this connection: pmessages (by
        # pattern) or messages (by channel), whose parts are already bytes
        # (charset=None) and need none of txredisapi's conversions or
        # transaction bookkeeping.
        reader = _private.hiredis_reader(self)
        if data:
            reader.feed(data)
        prefix = self.namespace.prefix
        cut = len(prefix)
        hprefix = self.namespace.history_prefix
        hcut = len(hprefix)
        limit = self.max_message_size
        deliver = self.hub.deliver
        subscribed = self.subscribed
        kind = self.MESSAGE
        received = stale = 0
        reply = reader.gets()
        while reply is not False:
            if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                channel, message = reply[2], reply[3]
            elif subscribed is not None and type(reply) is list and len(reply) == 3 and reply[0] == kind:
                channel, message = reply[1], reply[2]
                if channel not in subscribed:
                    stale += 1
                    reply = reader.gets()
                    continue
            else:
                # everything else exactly as HiredisProtocol does it
                _private.dispatch_reply(self, reply)
                reply = reader.gets()
                continue
            if channel.startswith(prefix):
                key = channel[cut:]
                offset = None
            elif channel.startswith(hprefix):
                key = channel[hcut:]
                offset, _, message = message.partition(b"\n")
            else:
                reply = reader.gets()
                continue
            if limit and len(message) > limit:
                self._dropped(key, len(message))
            elif offset is None:
                deliver(key, message)
                received += 1
            else:
                deliver(key, message, offset.decode("ascii", "replace"))
                received += 1
            reply = reader.gets()
        link = self.link
        if link is not None:
            if received:
                link.messages += received
            if stale:
                link.stale_messages += stale

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        # the pure-Python parser's way in (hiredis takes the path in _parse)
        offset: str | None = None
        key = self.namespace.key_from_redis(channel)
        if key is None:
            if not channel.startswith(self.namespace.history_prefix):
                return
            key = channel[len(self.namespace.history_prefix):]
            raw_offset, _, message = message.partition(b"\n")
            offset = raw_offset.decode("ascii", "replace")
        if self.subscribed is not None and channel not in self.subscribed:
            if self.link is not None:
                self.link.stale_messages += 1
            return
        if self.max_message_size and len(message) > self.max_message_size:
            self._dropped(key, len(message))
            return
        self.hub.deliver(key, message, offset)
        if self.link is not None:
            self.link.messages += 1

    def _dropped(self, key: bytes, size: int) -> None:
        _log.warn(
            "dropped a {size}-byte message on {channel!r}: over the limit of {limit} bytes",
            size=size,
            channel=printable(key),
            limit=self.max_message_size,
        )

    def connectionLost(self, why: Failure = connectionDone) -> None:
        super().connectionLost(why)
        if self.link is not None:
            self.link._lost(self, why)
