"""
Channel groups: the open sockets of one channel that share an encoding, as
one sink of the hub.

Each batch is framed once per encoding (plain, or permessage-deflate with a
given window) and the same bytes go to every member.  Members whose Twisted
write buffer is empty (plain TCP or UNIX, no TLS) are *direct*: the frames go
straight to the kernel with one ``send()``, which saves the two ``epoll_ctl``
calls of Twisted's startWriting/stopWriting and a reactor turn per socket.
A member becomes *queued* as soon as anything waits in its Twisted buffer
(the kernel took only part of a write, or Autobahn sent a ping, pong, reply
or close frame): its frames then go through the transport, in order, until
the buffer has drained.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from zope.interface import implementer

from sockdrawer.core.interfaces import Batch, ISink
from sockdrawer.core.members import Members
from sockdrawer.core.v1.messages import envelope
from sockdrawer.core.v1.session import State, Subscription
from sockdrawer.transports.websocket.frames import TEXT, Deflater, encode_batch, encode_frame

#: the encoding of sockets without compression
PLAIN = 0
_LIVE = State.LIVE


class Member(Protocol):
    """What a group needs of a socket (:class:`~sockdrawer.websocket.SockDrawerServerProtocol`)."""

    _group: ChannelGroup | None

    def direct_send(self) -> Callable[[bytes], int] | None:
        """The socket's ``send`` when the direct path is allowed and nothing is queued, else ``None``."""

    def deliver_queued(self, data: bytes) -> None:
        """Deliver ``data`` through the socket's Twisted buffer (or directly, once it has drained)."""

    def backlog(self, rest: bytes) -> None:
        """The kernel did not take all of a direct send: queue ``rest`` behind it."""


class FanoutStats:
    """Totals over every group of a server, counted once per group per batch."""

    __slots__ = ("deliveries", "bytes_sent")

    def __init__(self) -> None:
        #: messages times sockets
        self.deliveries = 0
        #: bytes of frames handed to sockets (each socket's copy counted)
        self.bytes_sent = 0


class Encoders:
    """
    The batch encoders of one server, one per encoding, made when first
    needed.  Every group with the same encoding shares one (a compressor holds
    about 256 KiB; each message is compressed on its own, so sharing is safe).

    :param threshold: see :class:`~sockdrawer.frames.Deflater`.
    """

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._deflaters: dict[int, Deflater] = {}

    def deflater(self, encoding: int) -> Deflater | None:
        """The shared deflater of ``encoding`` (``None`` for :data:`PLAIN`)."""
        return None if encoding == PLAIN else self._deflater(encoding)

    def _deflater(self, encoding: int) -> Deflater:
        deflater = self._deflaters.get(encoding)
        if deflater is None:
            deflater = self._deflaters[encoding] = Deflater(encoding, self.threshold)
        return deflater

    def get(self, encoding: int) -> Callable[[Sequence[bytes]], bytes]:
        """The function that frames a batch's messages for sockets of ``encoding``."""
        if encoding == PLAIN:
            return encode_batch
        return self._deflater(encoding).encode_batch

    def frame(self, encoding: int, message: bytes, opcode: int | None = None) -> bytes:
        """One frame of ``message`` for a socket of ``encoding`` (a reply)."""
        if encoding == PLAIN:
            return encode_frame(message, opcode)
        return self._deflater(encoding).encode_frame(message, opcode)


@implementer(ISink)
class ChannelGroup:
    """
    The open sockets of channel ``key`` with encoding ``encoding``:
    :data:`PLAIN`, or the permessage-deflate window bits (9 to 15).

    A group of one socket (the usual case with one channel per user) keeps
    it in two slots and allocates no container; a second member moves both
    into the dicts of direct and queued members.

    :param encode: frames a batch's messages (see :class:`Encoders`).
    """

    __slots__ = ("key", "encoding", "_encode", "_solo", "_solo_send", "_direct", "_queued", "_direct_items",
                 "_stats")

    def __init__(self, key: bytes, encoding: int = PLAIN,
                 encode: Callable[[Sequence[bytes]], bytes] = encode_batch, stats: FanoutStats | None = None) -> None:
        self.key = key
        self.encoding = encoding
        self._encode = encode
        self._stats = stats if stats is not None else FanoutStats()
        #: the only member, while there is just one (the dicts are then ``None``)
        self._solo: Member | None = None
        #: its socket's bound ``send`` while it is direct, else ``None``
        self._solo_send: Callable[[bytes], int] | None = None
        #: with several members: the direct ones, each with its socket's bound ``send``
        self._direct: dict[Member, Callable[[bytes], int]] | None = None
        self._queued: dict[Member, None] | None = None
        self._direct_items: tuple[tuple[Member, Callable[[bytes], int]], ...] | None = None

    def __len__(self) -> int:
        if self._solo is not None:
            return 1
        return len(self._direct) + len(self._queued) if self._direct is not None else 0  # type: ignore[arg-type]

    @property
    def receivers(self) -> int:
        """The number of sockets in the group."""
        return len(self)

    @property
    def direct(self) -> int:
        """How many members get their frames straight from ``send()``."""
        if self._solo is not None:
            return 1 if self._solo_send is not None else 0
        return len(self._direct) if self._direct is not None else 0

    @property
    def queued(self) -> int:
        """How many members get their frames through their Twisted buffer."""
        if self._solo is not None:
            return 0 if self._solo_send is not None else 1
        return len(self._queued) if self._queued is not None else 0

    def add(self, member: Member) -> None:
        member._group = self
        solo = self._solo
        if solo is None and self._direct is None:
            self._solo = member  # queued: the first batch finds out whether it can go direct
            return
        if solo is not None:
            send, self._solo, self._solo_send = self._solo_send, None, None
            self._direct, self._queued = ({solo: send}, {}) if send is not None else ({}, {solo: None})
            self._direct_items = None
        self._queued[member] = None  # type: ignore[index]

    def remove(self, member: Member) -> None:
        member._group = None
        if self._solo is member:
            self._solo = self._solo_send = None
            return
        direct, queued = self._direct, self._queued
        if direct is None or queued is None:
            return
        if direct.pop(member, None) is not None:
            self._direct_items = None
        queued.pop(member, None)
        if not direct and not queued:
            self._direct = self._queued = None

    def demote(self, member: Member) -> None:
        """``member`` has bytes queued in Twisted: stop sending to it directly."""
        if self._solo is member:
            self._solo_send = None
        elif self._direct is not None and self._direct.pop(member, None) is not None:
            self._direct_items = None
            self._queued[member] = None  # type: ignore[index]

    def promote(self, member: Member) -> None:
        """``member``'s Twisted buffer has drained: send to it directly again."""
        if self._solo is member:
            if self._solo_send is None:
                self._solo_send = member.direct_send()
        elif self._queued is not None and member in self._queued:
            send = member.direct_send()
            if send is not None:
                del self._queued[member]
                self._direct[member] = send  # type: ignore[index]
                self._direct_items = None

    def encoded(self, batch: Batch) -> bytes:
        """This group's encoding of ``batch``, built once and kept on the batch for other groups."""
        if self.encoding == PLAIN:
            data = batch.encoded
            if data is None:
                data = batch.encoded = self._encode(batch.messages)
            return data
        others = batch.encodings
        if others is None:
            others = batch.encodings = {}
        data = others.get(self.encoding)
        if data is None:
            data = others[self.encoding] = self._encode(batch.messages)
        return data

    def receive(self, batch: Batch) -> None:
        data = self.encoded(batch)
        size = len(data)
        stats = self._stats
        solo = self._solo
        if solo is not None:
            stats.deliveries += len(batch.messages)
            stats.bytes_sent += size
            send = self._solo_send
            if send is None:
                solo.deliver_queued(data)
                return
            try:
                sent = send(data)
            except OSError:
                sent = 0
            if sent != size:
                solo.backlog(data[sent:] if sent else data)
            return
        if self._direct is None:
            return
        # the queued members as they are now: a direct member demoted in the
        # loop below already has this batch in its Twisted buffer
        queued = tuple(self._queued) if self._queued else ()
        direct = self._direct_items
        if direct is None:
            direct = self._direct_items = tuple(self._direct.items())
        members = len(direct) + len(queued)
        stats.deliveries += members * len(batch.messages)
        stats.bytes_sent += members * size
        for member, send in direct:
            try:
                sent = send(data)
            except OSError:
                # EAGAIN, or a socket being torn down (Twisted finds out on
                # its own): queue it and let Twisted deal with it
                sent = 0
            if sent != size:
                member.backlog(data[sent:] if sent else data)
        for member in queued:
            if member._group is self:
                member.deliver_queued(data)

    def __repr__(self) -> str:
        return f"<ChannelGroup {self.key!r} encoding={self.encoding} direct={self.direct} queued={self.queued}>"


class SubscriptionGroup:
    """What a fan-out group of v1 subscriptions does when the broker's subscription breaks (the hub tells it)."""

    __slots__ = ()

    members: Members[Subscription]

    def gap(self) -> None:
        """The broker may have lost messages: every subscription catches up from history."""
        for sub in tuple(self.members):
            sub.session.catch_up(sub)

    def lost(self) -> None:
        """The broker's subscription no longer covers every channel: subscriptions wait for its gap."""
        for sub in tuple(self.members):
            sub.suspend()


@implementer(ISink)
class EnvelopeGroup(SubscriptionGroup):
    """
    The v1 subscriptions of one channel with one encoding, as one sink: each
    batch becomes envelope frames once, and the same bytes go to every
    subscription: through its socket's outbox, or, for a live subscription
    whose socket had nothing waiting in Twisted's buffer at its last write,
    straight to the socket's ``send`` (until the socket queues anything:
    :meth:`forget`).
    """

    __slots__ = ("key", "encoding", "_channel_json", "_deflater", "stats", "members", "_sends", "__weakref__")

    def __init__(self, key: bytes, encoding: int, deflater: Deflater | None, stats: FanoutStats) -> None:
        self.key = key
        self.encoding = encoding
        self._channel_json: str | None = None  # made at the first batch: an idle group keeps no string
        self._deflater = deflater
        self.stats = stats
        self.members: Members[Subscription] = Members()
        #: the socket's ``send`` of each live member whose Twisted buffer was empty at its last write through
        #: it, until its socket queues anything (SendPath.queueing calls forget): frames go to those directly
        self._sends: dict[Subscription, Callable[[bytes], int]] | None = None

    @property
    def receivers(self) -> int:
        return len(self.members)

    def forget(self, sub: Subscription) -> None:
        """``sub``'s socket queues bytes in Twisted, or ``sub`` leaves: no more direct sends to it."""
        sends = self._sends
        if sends is not None and sends.pop(sub, None) is not None and not sends:
            self._sends = None

    def frames(self, batch: Batch) -> bytes:
        cache_key = ("v1", self.encoding)
        cache = batch.encodings
        if cache is None:
            cache = batch.encodings = {}
        data = cache.get(cache_key)
        if data is None:
            offsets = batch.offsets or [None] * len(batch.messages)
            frame = self._deflater.encode_frame if self._deflater is not None else encode_frame
            pairs = zip(batch.messages, offsets, strict=True)
            channel = self._channel_json
            if channel is None:
                channel = self._channel_json = json.dumps(self.key.decode("utf-8"), ensure_ascii=False)
            data = cache[cache_key] = b"".join(frame(envelope(channel, off, m), TEXT) for m, off in pairs)
        return data


    def receive(self, batch: Batch) -> None:
        data = self.frames(batch)
        members = tuple(self.members)
        self.stats.deliveries += len(members) * len(batch.messages)
        self.stats.bytes_sent += len(members) * len(data)
        last = None
        if batch.offsets is not None:
            last = next((offset for offset in reversed(batch.offsets) if offset is not None), None)
        size = len(data)
        for sub in members:
            # a live subscription past its replay (the usual case) takes the frames as they are: what
            # Subscription.deliver would do, without its calls; straight to the socket while nothing waits
            # in its Twisted buffer
            if sub.state is _LIVE and not sub._guard:
                sends = self._sends
                send = sends.get(sub) if sends is not None else None
                outbox: Any = sub.session.outbox  # a SockDrawerServerProtocol (transports.websocket.sendpath)
                if send is not None:
                    try:
                        sent = send(data)
                    except OSError:
                        sent = 0
                    if sent != size:
                        outbox.backlog(data[sent:] if sent else data)  # which forgets it
                else:
                    outbox.write(data)
                    send = outbox.direct_send()
                    if send is not None and sub.group is self and outbox.can_send:
                        if sends is None:
                            sends = self._sends = {}
                        sends[sub] = send
                if last is not None:
                    sub.last = last
            else:
                sub.deliver(batch, data)
