"""
The interfaces that sockdrawer's parts meet through.

The Redis side and the WebSocket side never import each other: the Redis
subscriber hands messages to an :class:`IChannelHub`, and the hub hands them
to the :class:`ISink` objects (sockets, listeners) subscribed to a channel.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class Batch:
    """
    The messages for one channel that arrived together, in publish order.

    One batch object is given to every sink on the channel, so work that is
    the same for all of them (framing the messages for the wire) is done once
    and kept in :attr:`encoded` by the first sink that needs it.

    :ivar key: the channel key the messages were published on.
    :ivar messages: the payloads, as bytes, in publish order.
    :ivar encoded: a cache for the plain wire encoding of all messages,
        ``None`` until a sink fills it.  All sinks that read it encode the
        same way.
    :ivar encodings: a cache for other encodings (permessage-deflate, by
        window bits; ``sockdrawer.v1`` envelopes), ``None`` until a sink
        needs one.
    :ivar offsets: the history offset of each message (``None`` for a
        message without history), or ``None`` when no message has one.
    :ivar meta: each message's meta JSON (:mod:`sockdrawer.core.events`:
        a Pusher event's name, its sender), or ``None`` when no message has any.
    """

    __slots__ = ("key", "messages", "encoded", "encodings", "offsets", "meta")

    def __init__(self, key: bytes, messages: list[bytes], offsets: list[str | None] | None = None,
                 meta: list[bytes | None] | None = None) -> None:
        self.key = key
        self.messages = messages
        self.offsets = offsets
        self.meta = meta
        self.encoded: bytes | None = None
        self.encodings: dict[Any, bytes] | None = None

    def __repr__(self) -> str:
        return f"<Batch {self.key!r} messages={len(self.messages)}>"


class ISink(Interface):
    """
    Something that receives the messages of the channels it subscribed to:
    the group of WebSocket connections on a channel, or a listener.
    """

    receivers = Attribute(
        "How many end receivers this sink stands for right now: the number of sockets in a "
        "group, 1 for a listener.  Optional: a sink without it counts as 1."
    )

    def receive(batch: Batch) -> None:
        """
        Take the messages of one batch.

        Called in the reactor thread, while the hub is fanning out: it must not
        block, and it should not raise (the hub logs and carries on if it
        does).  The sink must not keep ``batch`` beyond the call.
        """


class IChannelHub(Interface):
    """
    Keeps, for each channel key, the sinks subscribed to it, and fans messages
    out to them.

    Channel keys are UTF-8 :class:`bytes` as returned by
    :func:`sockdrawer._channels.channel_from_path`; the root channel is
    ``b""``.  A hub does no I/O of its own and holds no Deferreds.
    """

    def subscribe(key: bytes, sink: ISink) -> None:
        """
        Add ``sink`` to the channel ``key``.  Subscribing a sink that is
        already subscribed to that channel changes nothing (it still receives
        each message once).  A sink may be subscribed to several channels.
        """

    def unsubscribe(key: bytes, sink: ISink) -> None:
        """
        Remove ``sink`` from the channel ``key``.  An unknown channel or a sink
        that is not subscribed is ignored.  When the last sink leaves a
        channel, the hub forgets the channel: it is no longer in
        :meth:`channels`.
        """

    def deliver(key: bytes, message: bytes, offset: str | None = None) -> int:
        """
        Give ``message`` (with its history ``offset``, if it has one) to
        every sink subscribed to ``key`` when it is
        fanned out, in the order of calls: at once, or, while the hub is held
        (see :meth:`hold`), at the matching :meth:`release`, all messages of
        one channel in one :class:`Batch`.  A delivery made by a sink while it
        receives is queued behind the batch in progress.

        :return: the number of sinks the message is for; ``0`` for a channel
            without sinks, whose message is dropped.
        """

    def hold() -> None:
        """
        Start collecting delivered messages instead of fanning each out at
        once.  Calls nest; delivery happens when the outermost hold is
        released.
        """

    def release() -> None:
        """
        End one :meth:`hold`.  At the outermost release, fan out everything
        collected since the hold: per channel, one batch with its messages in
        order.  Channels are flushed in the order their first message came.
        """

    def subscribers(key: bytes) -> int:
        """
        :return: the number of sinks subscribed to ``key``; ``0`` for an
            unknown channel.
        """

    def receivers(key: bytes) -> int:
        """
        :return: the sum of the :attr:`ISink.receivers` of the sinks on
            ``key`` (sockets and listeners); ``0`` for an unknown channel.
        """

    def channels() -> list[bytes]:
        """
        :return: the keys of the channels that have at least one sink.
        """

    broker_whole = Attribute(
        "False from broker_lost() until the next broker_gap(): the broker's "
        "subscription does not cover every channel, messages may be missed"
    )

    def broker_lost() -> None:
        """
        The broker's subscription stopped covering some or all channels (a
        link dropped, a Redis Cluster slot moved): every sink that defines
        ``lost()`` is called, so that those that recover from history stop
        taking live messages as contiguous until :meth:`broker_gap`.
        Brokers also call it before their first subscription.
        """

    def broker_gap() -> None:
        """
        The broker may have lost messages (its link was down and is back, or
        it has just subscribed for the first time): every sink that defines
        ``gap()`` is called, so that those that can recover what they missed
        from history do.
        """

    def watch(observer: IChannelObserver) -> None:
        """
        Tell ``observer`` from now on when a channel gets its first sink and
        when it loses its last (channels that have sinks already are not
        reported: read :meth:`channels`).  Watching twice changes nothing.
        """

    def unwatch(observer: IChannelObserver) -> None:
        """Stop telling ``observer``; an observer not watching is ignored."""


class IChannelObserver(Interface):
    """
    Learns which channels have sinks, as they come and go: what a broker
    that subscribes per channel (``--subscribe channels``) needs.

    Both methods are called synchronously inside :meth:`IChannelHub.subscribe`
    and :meth:`IChannelHub.unsubscribe`, once the change is made: they must
    be quick, must not subscribe or unsubscribe sinks themselves, and
    should not raise (the hub logs and carries on if they do).  A channel
    may open and close several times within one reactor turn.
    """

    def channel_opened(key: bytes) -> None:
        """Channel ``key`` has its first sink."""

    def channel_closed(key: bytes) -> None:
        """Channel ``key`` lost its last sink."""


class IBroker(Interface):
    """
    Where messages are published so that every sockdrawer node gets them:
    Redis, or the embedded in-process broker.
    """

    description = Attribute("A short text for logs and health checks, e.g. 'redis://host:6379'.")

    def publish(key: bytes, message: bytes) -> Any:
        """
        Publish ``message`` on channel ``key``.

        :return: a Deferred that fires with what the broker reports (for
            Redis, the number of sockdrawer nodes subscribed; for the embedded
            broker, the number of local sinks), or fails when the broker cannot
            take the message.
        """

    def publish_history(key: bytes, message: bytes, size: int, ttl: float) -> Any:
        """
        Publish ``message`` on channel ``key`` and keep it in the channel's
        history (at most ``size`` messages, kept ``ttl`` seconds after the
        last one), atomically.

        :return: a Deferred firing with the message's offset.
        """

    def replay(key: bytes, since: str | None, limit: int) -> Any:
        """
        What the history of ``key`` holds after offset ``since``.

        :return: a Deferred firing with a :class:`sockdrawer.history.Replay`
            (the latest offset, and the messages after ``since`` when given),
            or failing with :class:`sockdrawer.history.HistoryReset` when the
            history cannot cover ``since``.
        """

    def is_connected() -> bool:
        """
        :return: whether messages published now are expected to be delivered.
        """
