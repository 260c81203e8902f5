"""
The default channel hub: plain, Deferred-free fan-out lists per channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from time import perf_counter
from typing import Any

from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.task import deferLater
from zope.interface import implementer

from sockdrawer.core.channels import printable
from sockdrawer.core.events import unwrap
from sockdrawer.core.history import HistoryReset, MemoryHistory, Replay
from sockdrawer.core.interfaces import Batch, IBroker, IChannelHub, IChannelObserver, ISink
from sockdrawer.core.logs import NamedLogger
from sockdrawer.core.stats import Histogram

_Receive = Callable[[Batch], None]


@implementer(IChannelHub)
class MemoryChannelHub:
    """
    Keeps sinks per channel in memory and hands each batch to them in the
    calling thread (the reactor's).

    A channel with one sink (the usual case: a channel's sockets are one
    group) keeps that sink alone, with no container; a second sink makes it
    an insertion-ordered ``dict``, so a mass disconnect removes each sink in
    constant time.  The fan-out over several sinks runs over a tuple of their
    ``receive`` methods, built when membership changes and reused for every
    message until it changes again.

    :ivar messages: messages handed to :meth:`deliver` for a channel with sinks.
    :ivar deliveries: messages times sinks, fanned out so far (a channel's
        group of sockets is one sink).
    :ivar turns: a histogram of fan-out durations, in seconds.

    Observers (:meth:`watch`) hear of a channel's first sink and last one
    right after the change, from a plain tuple that is empty unless some
    broker subscribes per channel.
    """

    _log = NamedLogger(namespace="sockdrawer.hub.MemoryChannelHub")

    def __init__(self) -> None:
        #: per channel: its only sink, or a dict of its sinks (sinks are never dicts)
        self._sinks: dict[bytes, ISink | dict[ISink, None]] = {}
        self._fanout: dict[bytes, tuple[_Receive, ...]] = {}
        self._held = 0
        self._pending: dict[bytes, list[bytes]] = {}
        #: per channel with pending messages that have offsets: one per message
        self._offsets: dict[bytes, list[str | None]] = {}
        #: the same for messages with meta (sockdrawer.core.events)
        self._meta: dict[bytes, list[bytes | None]] = {}
        #: messages fanned out per channel, counted once someone reads (and empties) them: the admin page
        self.per_channel: dict[bytes, int] | None = None
        self.messages = 0
        self.deliveries = 0
        #: see IChannelHub.broker_whole
        self.broker_whole = True
        #: how long each fan-out (the flush of one hold, or one delivery) took
        self.turns = Histogram()
        self._observers: tuple[IChannelObserver, ...] = ()

    def watch(self, observer: IChannelObserver) -> None:
        if observer not in self._observers:
            self._observers += (observer,)

    def unwatch(self, observer: IChannelObserver) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def _tell(self, opened: bool, key: bytes) -> None:
        for observer in self._observers:
            try:
                if opened:
                    observer.channel_opened(key)
                else:
                    observer.channel_closed(key)
            except Exception:
                self._log.failure("channel observer {observer!r} failed on channel {channel!r}",
                                  observer=observer, channel=printable(key))

    def subscribe(self, key: bytes, sink: ISink) -> None:
        sinks = self._sinks.get(key)
        if sinks is None:
            self._sinks[key] = sink
            if self._observers:
                self._tell(True, key)
        elif not isinstance(sinks, dict):
            if sinks is not sink:
                self._sinks[key] = {sinks: None, sink: None}
                self._fanout.pop(key, None)
        elif sink not in sinks:
            sinks[sink] = None
            self._fanout.pop(key, None)

    def unsubscribe(self, key: bytes, sink: ISink) -> None:
        sinks = self._sinks.get(key)
        if isinstance(sinks, dict):
            if sink not in sinks:
                return
            del sinks[sink]
            self._fanout.pop(key, None)
            if len(sinks) > 1:
                return
            if sinks:
                self._sinks[key] = next(iter(sinks))
                return
        elif sinks is None or sinks is not sink:
            return
        del self._sinks[key]
        if self._observers:
            self._tell(False, key)

    def sinks(self, key: bytes) -> list[ISink]:
        """The sinks of channel ``key``, in the order they subscribed."""
        sinks = self._sinks.get(key)
        if sinks is None:
            return []
        return list(sinks) if isinstance(sinks, dict) else [sinks]

    def deliver(self, key: bytes, message: bytes, offset: str | None = None) -> int:
        sinks = self._sinks.get(key)
        if sinks is None:
            return 0
        self.messages += 1
        meta = None
        if message[:1] == b"\x00":  # perhaps a named event: its data goes out, its meta beside
            message, meta = unwrap(message)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = [message]
        else:
            pending.append(message)
        if offset is not None or key in self._offsets:
            offsets = self._offsets.get(key)
            if offsets is None:
                offsets = self._offsets[key] = [None] * (len(pending) - 1)
            offsets.append(offset)
        if meta is not None or (self._meta and key in self._meta):  # no lookup per message while none has meta
            metas = self._meta.get(key)
            if metas is None:
                metas = self._meta[key] = [None] * (len(pending) - 1)
            metas.append(meta)
        if not self._held:
            self._flush()
        return len(sinks) if isinstance(sinks, dict) else 1

    def hold(self) -> None:
        self._held += 1

    def release(self) -> None:
        if self._held <= 0:
            raise RuntimeError("release() without hold()")
        self._held -= 1
        if self._held == 0 and self._pending:
            self._flush()

    def _flush(self) -> None:
        # Held while fanning out: a sink that delivers again (a listener
        # publishing through the embedded broker) queues its message behind
        # the one in progress instead of overtaking it.
        started = perf_counter()
        self._held += 1
        try:
            while self._pending:
                pending, self._pending = self._pending, {}
                offsets, self._offsets = self._offsets, {}
                metas, self._meta = self._meta, {}
                for key, messages in pending.items():
                    self._fan_out(key, messages, offsets.get(key), metas.get(key) if metas else None)
        finally:
            self._held -= 1
            self.turns.observe(perf_counter() - started)

    def subscribers(self, key: bytes) -> int:
        sinks = self._sinks.get(key)
        if sinks is None:
            return 0
        return len(sinks) if isinstance(sinks, dict) else 1

    def receivers(self, key: bytes) -> int:
        return sum(getattr(sink, "receivers", 1) for sink in self.sinks(key))

    def channels(self) -> list[bytes]:
        return list(self._sinks)

    def broker_lost(self) -> None:
        self.broker_whole = False
        self._tell_sinks("lost", "sink {sink!r} failed on a lost broker subscription")

    def broker_gap(self) -> None:
        self.broker_whole = True
        self._tell_sinks("gap", "sink {sink!r} failed to recover a gap")

    def _tell_sinks(self, name: str, failed: str) -> None:
        for key in list(self._sinks):
            for sink in self.sinks(key):
                method = getattr(sink, name, None)
                if method is not None:
                    try:
                        method()
                    except Exception:
                        self._log.failure(failed, sink=sink)

    def _fan_out(self, key: bytes, messages: list[bytes], offsets: list[str | None] | None = None,
                 meta: list[bytes | None] | None = None) -> None:
        sinks = self._sinks.get(key)
        if sinks is None:
            return
        if not isinstance(sinks, dict):
            fanout: tuple[_Receive, ...] = (sinks.receive,)
        else:
            fanout = self._fanout.get(key)  # type: ignore[assignment]
            if fanout is None:
                fanout = self._fanout[key] = tuple(sink.receive for sink in sinks)
        batch = Batch(key, messages, offsets, meta)
        self.deliveries += len(fanout) * len(messages)
        per_channel = self.per_channel
        if per_channel is not None:
            per_channel[key] = per_channel.get(key, 0) + len(messages)
        for receive in fanout:
            try:
                receive(batch)
            except Exception:
                self._log.failure("sink {sink!r} failed on channel {channel!r}",
                                  sink=receive, channel=printable(key))


#: a history read that fails while the broker is connected (a shard failing over, a timeout) is tried again
#: this many times, after 0.2 s, then twice as long each time (6 s in all), before the subscription fails
READ_RETRIES = 5
READ_RETRY_DELAY = 0.2


def history_reader(broker: IBroker, limit: int, clock: Any = None) -> Callable[[bytes, str | None], Deferred[Replay]]:
    """
    What ``sockdrawer.v1`` subscriptions read history with: ``broker.replay``
    with ``limit``, once the broker's subscription covers the channel
    (``when_subscribed``, when the broker has it and is connected).  A node
    that subscribes per channel (``--subscribe channels``) sends its
    SUBSCRIBE to a channel new to it when the socket asks; history read
    before Redis took it would miss what is published in between, which
    reaches neither the history read nor the socket.
    """

    def read(key: bytes, since: str | None, tries: int) -> Deferred[Replay]:
        wait = getattr(broker, "when_subscribed", None)
        if wait is None or not broker.is_connected():
            # down: the read fails now, as it always did, instead of waiting
            return maybeDeferred(broker.replay, key, since, limit)
        d: Deferred[Any] = wait(key)
        d.addCallback(lambda _: broker.replay(key, since, limit))
        if clock is not None and tries < READ_RETRIES:
            d.addErrback(again, key, since, tries)
        return d

    def again(failure: Any, key: bytes, since: str | None, tries: int) -> Any:
        if failure.check(HistoryReset):
            return failure
        return deferLater(clock, READ_RETRY_DELAY * 2 ** tries, read, key, since, tries + 1)

    def replay(key: bytes, since: str | None) -> Deferred[Replay]:
        return read(key, since, 0).addCallback(_data_only)

    return replay


def _data_only(replay: Replay) -> Replay:
    """History holds named events whole (:mod:`sockdrawer.core.events`): a replay gives their data."""
    if not any(message[:1] == b"\x00" for _, message in replay.messages):
        return replay
    return dataclasses.replace(replay, messages=tuple((o, unwrap(m)[0]) for o, m in replay.messages))


@implementer(IBroker)
class EmbeddedBroker:
    """
    The in-process broker used when no Redis is configured: publishing
    delivers straight to this process's hub.  One process only.  Publishing
    reports the number of receivers: sockets on the channel, plus one per
    listener channel.
    """

    description = "embedded"

    def __init__(self, hub: IChannelHub, history: MemoryHistory | None = None) -> None:
        self._hub = hub
        self._history = history

    def publish(self, key: bytes, message: bytes) -> Deferred[int]:
        receivers = self._hub.receivers(key)
        self._hub.deliver(key, message)
        return succeed(receivers)

    def publish_history(self, key: bytes, message: bytes, size: int, ttl: float) -> Deferred[str]:
        """Keep ``message`` in the channel's in-memory ring, deliver it with its offset; fires with the offset."""
        if self._history is None:
            self._history = MemoryHistory(size, ttl)
        offset = self._history.append(key, message)
        self._hub.deliver(key, message, offset)
        return succeed(offset)

    def replay(self, key: bytes, since: str | None, limit: int) -> Deferred[Replay]:
        """See :meth:`sockdrawer.history.MemoryHistory.replay`."""
        if self._history is None:
            return fail(HistoryReset("no history")) if since is not None else succeed(Replay(None))
        d: Deferred[Replay] = maybeDeferred(self._history.replay, key, since, limit)
        return d

    def is_connected(self) -> bool:
        return True

    def tail(self, key: bytes, count: int) -> Deferred[list[tuple[str, bytes]]]:
        """The last ``count`` messages of ``key``'s history (see :meth:`MemoryHistory.tail`)."""
        return succeed(self._history.tail(key, count) if self._history is not None else [])

    def when_subscribed(self, key: bytes) -> Deferred[None]:
        """Fires at once: every delivery reaches the hub (see ``RedisLink.when_subscribed``)."""
        return succeed(None)
