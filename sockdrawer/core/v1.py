"""
The ``sockdrawer.v1`` subprotocol: many channels on one socket, offsets, and
resume from history.  (The raw mode, path = channel and payload = frame, is
unchanged.)

A client that offers ``Sec-WebSocket-Protocol: sockdrawer.v1`` on ``/``
speaks JSON text frames; every message and error is in ``docs/protocol.rst``.
Fan-out stays framed once per channel per batch: an envelope is the same
bytes for every v1 socket on the channel (:class:`EnvelopeGroup`).
"""

from __future__ import annotations

import base64
import json
import secrets
from collections import deque
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer.core import presence as _presence
from sockdrawer.core.channels import ChannelNameError, validate_channel
from sockdrawer.core.history import HistoryReset, Replay
from sockdrawer.core.interfaces import Batch, IChannelHub, ISink
from sockdrawer.core.subscriber import SOCKET, Source
from sockdrawer.transports.websocket.fanout import FanoutStats
from sockdrawer.transports.websocket.frames import TEXT, Deflater, encode_frame


class SessionSocket(Protocol):
    """
    The socket a :class:`V1Session` speaks through (the WebSocket protocol
    provides it): who is on it, its framing, its node's parts (``factory``),
    and a way out for frames.
    """

    factory: Any
    state: Any
    STATE_OPEN: Any
    #: the framing of this socket's frames (plain or a deflate variant)
    encoding: int
    user: str | None
    peer: str | None
    grant: Any

    @property
    def counted_ip(self) -> str | None:
        """The address its subscriptions count against (``--max-subscriptions-per-ip``)."""

    def deliver_queued(self, data: bytes) -> None:
        """Send frames, behind whatever waits for the socket."""


SUBPROTOCOL = "sockdrawer.v1"
_log = Logger(namespace="sockdrawer.v1")


def _position(offset: str) -> tuple[str, tuple[int, ...]]:
    epoch, _, position = offset.partition(":")
    try:
        return epoch, tuple(int(part) for part in position.split("-"))
    except ValueError:
        return epoch, ()


def _at_or_before(offset: str, seen: tuple[str, tuple[int, ...]]) -> bool:
    """Whether ``offset`` is ``seen`` (a :func:`_position`) or older, in the same epoch."""
    here = _position(offset)
    return here[0] == seen[0] and here[1] <= seen[1]


def envelope(channel_json: str, offset: str | None, message: bytes) -> bytes:
    """The ``message`` envelope of one message (UTF-8 as text, anything else as base64)."""
    try:
        data, encoding = json.dumps(message.decode("utf-8"), ensure_ascii=False), ""
    except UnicodeDecodeError:
        data, encoding = '"' + base64.b64encode(message).decode("ascii") + '"', ',"encoding":"base64"'
    off = "null" if offset is None else json.dumps(offset)
    return (f'{{"op":"message","channel":{channel_json},"offset":{off},"data":{data}{encoding}}}').encode()


#: the longest message id a client may send with ``send`` (echoed in the reply)
MAX_ID_LENGTH = 128


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unicode(msg: Any) -> bool:
    """Whether every string in ``msg`` is Unicode text (no lone surrogate from a ``\\ud800`` escape)."""
    try:
        json.dumps(msg, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return False
    return True


def _id_ok(id: Any) -> bool:
    """A ``send`` id: absent, a string of at most :data:`MAX_ID_LENGTH` characters, or a number."""
    if id is None or (isinstance(id, (int, float)) and not isinstance(id, bool)):
        return True
    return isinstance(id, str) and len(id) <= MAX_ID_LENGTH


def control(op: str, **fields: Any) -> bytes:
    """A control message (``subscribed``, ``reset``, ``error``, ``reply``) as JSON bytes."""
    return json.dumps({"op": op, **fields}, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


@implementer(ISink)
class EnvelopeGroup:
    """
    The v1 subscriptions of one channel with one encoding, as one sink: each
    batch becomes envelope frames once, and the same bytes go to every
    subscription.
    """

    __slots__ = ("key", "encoding", "_channel_json", "_deflater", "stats", "members", "__weakref__")

    def __init__(self, key: bytes, encoding: int, deflater: Deflater | None, stats: FanoutStats) -> None:
        self.key = key
        self.encoding = encoding
        self._channel_json = json.dumps(key.decode("utf-8"), ensure_ascii=False)
        self._deflater = deflater
        self.stats = stats
        self.members: dict[Subscription, None] = {}

    @property
    def receivers(self) -> int:
        return len(self.members)

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
            data = cache[cache_key] = b"".join(frame(envelope(self._channel_json, off, m), TEXT) for m, off in pairs)
        return data

    def gap(self) -> None:
        """The broker may have lost messages: every subscription catches up from history."""
        for sub in tuple(self.members):
            sub.session.catch_up(sub)

    def lost(self) -> None:
        """The broker's subscription no longer covers every channel: subscriptions wait for its gap."""
        for sub in tuple(self.members):
            sub.suspend()

    def receive(self, batch: Batch) -> None:
        data = self.frames(batch)
        members = tuple(self.members)
        self.stats.deliveries += len(members) * len(batch.messages)
        self.stats.bytes_sent += len(members) * len(data)
        for sub in members:
            sub.deliver(batch, data)


class Subscription:
    """
    One channel of one v1 socket.  While its replay is being read it keeps
    live messages aside; then it sends the replay, the kept messages that
    came after it (never one twice), and goes live.

    The replay is read on another Redis connection than the one live
    messages arrive on, so a message the replay already held can still be
    on its way on the subscriber connection when the subscription goes live:
    until the first live message newer than the replay arrives, live
    messages at or before the last offset sent are dropped (``_guard``).

    While the broker's subscription does not cover the channel (from the
    hub's ``broker_lost`` to its ``broker_gap``), live messages cannot be
    taken as following the last one sent: some may be missing in between.
    The subscription is *suspended*: it keeps them aside, and at the gap it
    reads history from its last offset, which holds them all, in order.
    """

    __slots__ = ("session", "key", "channel", "group", "live", "_kept", "last", "presence", "present", "_guard",
                 "gap_pending", "reading", "suspended")

    def __init__(self, session: V1Session, key: bytes) -> None:
        self.session = session
        self.key = key
        self.channel = key.decode("utf-8")
        self.group: EnvelopeGroup | None = None
        #: live messages go to the client as they come (else they are kept aside)
        self.live = False
        #: live messages kept aside while not live (an empty tuple until the first: no list per subscription)
        self._kept: list[tuple[str | None, bytes]] | tuple[()] = ()
        #: the offset of the last message sent to the client
        self.last: str | None = None
        #: subscribed with ``"presence": true``
        self.presence = False
        #: its presence entry has been added (once ``subscribed`` was sent)
        self.present = False
        #: live since a replay, and no live message newer than it seen yet
        self._guard = False
        #: a broker gap came while a replay was being read: catch up again after it
        self.gap_pending = False
        #: a replay is being read
        self.reading = False
        #: the broker lost messages and has not said it is whole again
        self.suspended = False

    def deliver(self, batch: Batch, data: bytes) -> None:
        if self.live:
            offsets = batch.offsets
            if self._guard and offsets is not None and self._drop_replayed(batch, data):
                return
            self.session.write(data)
            if offsets is not None:
                for offset in reversed(offsets):
                    if offset is not None:
                        self.last = offset
                        break
        else:
            offsets = batch.offsets or [None] * len(batch.messages)
            kept = self._kept
            if not isinstance(kept, list):
                kept = self._kept = []
            kept.extend(zip(offsets, batch.messages, strict=True))

    def _uncount(self, messages: int, data: bytes = b"") -> None:
        """Take back what the group counted as delivered to this subscription and was not sent."""
        group = self.group
        if group is not None:
            group.stats.deliveries -= messages
            group.stats.bytes_sent -= len(data)

    def _drop_replayed(self, batch: Batch, data: bytes) -> bool:
        """
        Send this batch's messages that came after the last offset sent, one
        by one, and return True; or return False, sending nothing, when every
        message is new (the batch's shared frames can go as they are).
        """
        assert self.last is not None and batch.offsets is not None
        seen = _position(self.last)
        fresh: list[tuple[str | None, bytes]] = []
        pairs = list(zip(batch.offsets, batch.messages, strict=True))
        dropped = 0
        for i, (offset, message) in enumerate(pairs):
            if offset is not None:
                if not _at_or_before(offset, seen):
                    # pub/sub keeps order: this one and every later message are new
                    self._guard = False
                    if not dropped:
                        return False
                    fresh.extend(pairs[i:])
                    break
                dropped += 1
                continue  # the replay held it
            fresh.append((offset, message))
        if not dropped:
            return False
        self._uncount(dropped, data)
        channel_json = json.dumps(self.channel, ensure_ascii=False)
        for offset, message in fresh:
            self.session.send_text(envelope(channel_json, offset, message))
            if offset is not None:
                self.last = offset
        return True

    def suspend(self) -> None:
        """The broker lost messages: keep live ones aside until its gap (when history can say what they follow)."""
        if self.session.proto.factory.history is None:
            return  # nothing to catch up from: the gap sends reset
        self.suspended = True
        self.live = False

    def send_page(self, replay: Replay, reset: bool, announce: bool) -> None:
        """Send one page of a replay that goes on (the subscription keeps reading, live messages kept aside)."""
        session = self.session
        if reset:
            session.send_control("reset", channel=self.channel)
        if announce or reset:
            session.send_control("subscribed", channel=self.channel, offset=replay.latest)
        channel_json = json.dumps(self.channel, ensure_ascii=False)
        for offset, message in replay.messages:
            session.send_text(envelope(channel_json, offset, message))
        self.last = replay.messages[-1][0]

    def go_live(self, replay: Replay, reset: bool, announce: bool = True) -> None:
        """
        Send what the replay holds, then what arrived meanwhile after it, and
        go live; or, when the broker lost messages meanwhile, send the replay
        only and catch up from its end (at once when the broker is whole
        again, else at its gap).
        """
        session = self.session
        self.reading = False
        if reset:
            session.send_control("reset", channel=self.channel)
        if announce or reset:
            session.send_control("subscribed", channel=self.channel, offset=replay.latest)
        last: str | None = replay.latest
        channel_json = json.dumps(self.channel, ensure_ascii=False)
        for offset, message in replay.messages:
            session.send_text(envelope(channel_json, offset, message))
            last = offset
        seen = _position(last) if last is not None else None
        hold = self.gap_pending or self.suspended
        skipped = 0
        for kept_offset, message in self._kept:
            if kept_offset is not None:
                if hold:
                    # the broker lost messages while the replay was read: somewhere
                    # between the replay and these is a hole; the catch-up reads
                    # them again from history, in order, after the replay
                    skipped += 1
                    continue
                if seen is not None and _at_or_before(kept_offset, seen):
                    skipped += 1
                    continue  # already in the replay
            session.send_text(envelope(channel_json, kept_offset, message))
            if kept_offset is not None:
                last = kept_offset
        if skipped:
            self._uncount(skipped)
        self._kept = ()
        self.last = last
        self._guard = last is not None
        if self.presence and not self.present:
            self.present = True
            service = self.session.presence
            if service is not None:
                service.join(self)
        if self.gap_pending:
            self.gap_pending = False
            self.session.catch_up(self)
        elif not self.suspended:
            self.live = True


class V1Session:
    """
    The v1 state of one socket: its subscriptions, and the handling of the
    client's messages.
    """

    def __init__(self, proto: SessionSocket) -> None:
        self.proto = proto
        self.subscriptions: dict[bytes, Subscription] = {}
        self._client: str | None = None
        #: history reads waiting for this socket's one read in flight
        self._reads: deque[tuple[Subscription, str | None, bool, bool]] = deque()
        self._reading = False
        self._pumping = False
        #: the address its subscriptions are counted against (--max-subscriptions-per-ip)
        self._ip: str | None = None
        #: presence joins left in this socket's bucket, as of when (None: full)
        self._joins = 0.0
        self._joins_at: float | None = None

    @property
    def client(self) -> str:
        """This socket's id in presence entries (random, made on first use)."""
        if self._client is None:
            self._client = secrets.token_urlsafe(9)
        return self._client

    @property
    def presence(self) -> PresenceService | None:
        """The node's presence (``None`` when the factory was not given one)."""
        presence: PresenceService | None = self.proto.factory.presence
        return presence

    # -- out

    def write(self, frames: bytes) -> None:
        self.proto.deliver_queued(frames)

    def send_text(self, payload: bytes) -> None:
        self.proto.deliver_queued(self.proto.factory.encoders.frame(self.proto.encoding, payload, TEXT))

    def send_control(self, op: str, **fields: Any) -> None:
        self.send_text(control(op, **fields))

    def send_shared(self, payloads: list[bytes], frames: dict[int, bytes]) -> None:
        """:meth:`send_text` of payloads many sockets get: framed once per encoding, kept in ``frames``."""
        encoding = self.proto.encoding
        data = frames.get(encoding)
        if data is None:
            frame = self.proto.factory.encoders.frame
            data = frames[encoding] = b"".join(frame(encoding, payload, TEXT) for payload in payloads)
        self.write(data)

    def error(self, status: int, reason: str, channel: str | None = None, id: Any = None) -> None:
        fields: dict[str, Any] = {"status": status, "reason": reason}
        if channel is not None:
            fields["channel"] = channel
        if id is not None:
            fields["id"] = id
        self.send_control("error", **fields)

    # -- in

    def received(self, payload: bytes, binary: bool) -> None:
        if binary:
            self.error(400, "binary frames are not part of sockdrawer.v1")
            return
        try:
            # NaN and Infinity are not JSON (a reply echoing them would not be either)
            msg = json.loads(payload, parse_constant=_refuse_constant)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than Python's stack
            self.error(400, "not JSON")
            return
        if not isinstance(msg, dict):
            self.error(400, "a message is a JSON object")
            return
        if b"\\u" in payload and not _unicode(msg):
            self.error(400, "a string is not Unicode (a lone surrogate escape)")
            return
        op, channel = msg.get("op"), msg.get("channel")
        if op not in ("subscribe", "unsubscribe", "send"):
            self.error(400, "unknown op")
            return
        if not isinstance(channel, str):
            self.error(400, "channel must be a string")
            return
        try:
            key = validate_channel(channel, self.proto.factory.max_channel_length)
        except ChannelNameError as e:
            self.error(400, str(e), channel=channel if len(channel) < 300 else None)
            return
        if op == "subscribe":
            since = msg.get("since")
            if since is not None and not isinstance(since, str):
                self.error(400, "since must be an offset string", channel)
                return
            presence = msg.get("presence", False)
            if not isinstance(presence, bool):
                self.error(400, "presence must be true or false", channel)
                return
            if presence and self.presence is None:
                self.error(501, "presence is not available on this node", channel)
                return
            if presence and key not in self.subscriptions and not self._take_presence_join():
                self.error(429, "too many presence subscriptions (see --max-presence-joins-per-second)", channel)
                return
            self.subscribe(key, channel, since, presence)
        elif op == "unsubscribe":
            self.unsubscribe(key)
        else:
            id = msg.get("id")
            if not _id_ok(id):
                self.error(400, f"id must be a string of at most {MAX_ID_LENGTH} characters or a number", channel)
                return
            self.send(key, channel, msg.get("data"), id)

    def _uncount(self) -> None:
        """One subscription less for this socket's address."""
        ip = self._ip
        if ip is not None:
            per_ip = self.proto.factory.subscriptions_per_ip
            left = per_ip.get(ip, 1) - 1
            if left > 0:
                per_ip[ip] = left
            else:
                per_ip.pop(ip, None)

    def _take_presence_join(self) -> bool:
        """One presence join from this socket's bucket (each join and its leave cost every member an event)."""
        settings = self.proto.factory.settings
        now = self.proto.factory.clock.seconds()
        if self._joins_at is None:
            tokens = float(settings.presence_join_burst)
        else:
            tokens = min(float(settings.presence_join_burst),
                         self._joins + (now - self._joins_at) * settings.max_presence_joins_per_second)
        self._joins_at = now
        if tokens < 1:
            self._joins = tokens
            return False
        self._joins = tokens - 1
        return True

    def _allowed(self, channel: str) -> bool:
        factory = self.proto.factory
        if factory.verifier is None or factory.is_public(channel):
            return True
        grant = self.proto.grant
        return grant is not None and grant.allows(channel)

    def subscribe(self, key: bytes, channel: str, since: str | None, presence: bool = False) -> None:
        factory = self.proto.factory
        if key in self.subscriptions:
            self.error(409, "already subscribed", channel)
            return
        if len(self.subscriptions) >= factory.settings.max_subscriptions:
            self.error(429, "too many subscriptions", channel)
            return
        ip = self.proto.counted_ip
        if ip is not None:
            count = factory.subscriptions_per_ip.get(ip, 0)
            if count >= factory.settings.max_subscriptions_per_ip:
                self.error(429, "too many subscriptions from this address", channel)
                return
        if not self._allowed(channel):
            self.error(403, "token does not cover this channel", channel)
            return
        sub = Subscription(self, key)
        sub.presence = presence
        self.subscriptions[key] = sub
        if ip is not None:
            factory.subscriptions_per_ip[ip] = count + 1
            self._ip = ip
        decision = factory.authorize(Source(SOCKET, channel, self.proto.peer, self.proto.user)) \
            if factory.authorize is not None else None
        if decision is None:
            self._start(sub, since)
        else:
            decision.addCallback(self._authorized, sub, since)

    def _authorized(self, allowed: bool, sub: Subscription, since: str | None) -> None:
        if self.subscriptions.get(sub.key) is not sub:
            return
        if not allowed:
            del self.subscriptions[sub.key]
            self._uncount()
            self.error(403, "refused by a listener", sub.channel)
            return
        self._start(sub, since)

    def _start(self, sub: Subscription, since: str | None) -> None:
        factory = self.proto.factory
        factory.join_v1(sub, self.proto.encoding)
        history = factory.history
        if history is None:
            if since is not None:
                sub.go_live(Replay(None), reset=True)
            else:
                sub.go_live(Replay(None), reset=False)
            return
        if not factory.hub.broker_whole:
            sub.suspended = True  # what comes live until the broker's gap may follow a hole
        sub.reading = True
        self._read(sub, since, False, True)

    # -- history reads: one at a time per socket, a page at a time

    def _read(self, sub: Subscription, since: str | None, reset: bool, announce: bool, first: bool = False) -> None:
        """
        Queue a read of ``sub``'s history after ``since``.  A socket reads one
        page at a time, whatever it asks: the work its subscriptions cause in
        the broker is bounded by the socket, not by how many it subscribes
        (the next page of a replay goes first, so a subscription finishes
        before the next starts).
        """
        entry = (sub, since, reset, announce)
        if first:
            self._reads.appendleft(entry)
        else:
            self._reads.append(entry)
        self._pump()

    def _pump(self) -> None:
        # a loop, not recursion: reads that answer at once (the embedded
        # broker) go on here instead of nesting one call per page
        if self._pumping:
            return
        self._pumping = True
        try:
            history = self.proto.factory.history
            while not self._reading and self._reads and history is not None:
                sub, since, reset, announce = self._reads.popleft()
                if self.subscriptions.get(sub.key) is not sub:
                    continue  # unsubscribed meanwhile
                self._reading = True
                d: Deferred[Replay] = history(sub.key, since)
                d.addCallbacks(self._replayed, self._replay_failed, callbackArgs=(sub, reset, announce),
                               errbackArgs=(sub, since))
                d.addErrback(lambda f: _log.failure("reading history failed", f))
                d.addBoth(self._read_done)
        finally:
            self._pumping = False

    def _read_done(self, _: object) -> None:
        self._reading = False
        if self._reads:
            # the next page in a later turn: a replay that answers at once (the
            # embedded broker) takes turns with everything else, not one long turn
            self.proto.factory.clock.callLater(0, self._pump)

    def _replayed(self, replay: Replay, sub: Subscription, reset: bool, announce: bool = True) -> None:
        if self.subscriptions.get(sub.key) is not sub or self.proto.state != self.proto.STATE_OPEN:
            return
        if replay.more and replay.messages:
            sub.send_page(replay, reset, announce)
            self._read(sub, replay.messages[-1][0], False, False, first=True)
            return
        sub.go_live(replay, reset, announce)

    def catch_up(self, sub: Subscription) -> None:
        """
        After a broker outage: replay what ``sub`` missed since its last
        offset (keeping live messages aside meanwhile), or ``reset`` it when
        history cannot say.
        """
        history = self.proto.factory.history
        if sub.reading:
            # it may have been read before what the gap lost was published, so
            # the subscription catches up again from where that replay ends
            sub.gap_pending = True
            return
        sub.live = False
        if history is None:
            sub.go_live(Replay(None), reset=True)
            return
        # lost again already (a gap that came during a replay, then another loss)
        sub.suspended = not self.proto.factory.hub.broker_whole
        sub.reading = True
        if sub.last is None:
            # nothing with an offset sent yet: no place to resume from
            self._read(sub, None, True, False)
            return
        self._read(sub, sub.last, False, False)

    def _replay_failed(self, failure: Failure, sub: Subscription, since: str | None) -> None:
        if self.subscriptions.get(sub.key) is not sub:
            return
        history = self.proto.factory.history
        if failure.check(HistoryReset) and since is not None and history is not None:
            self._read(sub, None, True, True, first=True)
            return
        _log.warn("history of {channel!r} unavailable: {error}", channel=sub.channel,
                  error=failure.getErrorMessage())
        self.unsubscribe(sub.key)
        self.error(503, "history unavailable", sub.channel)

    def unsubscribe(self, key: bytes) -> None:
        sub = self.subscriptions.pop(key, None)
        if sub is not None:
            self._uncount()
            self.proto.factory.leave_v1(sub)
            if sub.present:
                service = self.presence
                if service is not None:
                    service.leave(sub)

    def send(self, key: bytes, channel: str, data: Any, id: Any) -> None:
        factory = self.proto.factory
        if not self._allowed(channel):
            self.error(403, "token does not cover this channel", channel, id)
            return
        handler = factory.frame_handler
        if handler is None:
            self.send_control("reply", id=id, data=None)
            return
        message = data if isinstance(data, str) else json.dumps(data)
        source = Source(SOCKET, channel, self.proto.peer, self.proto.user)
        for d in handler(source, message):
            d.addCallback(self._reply, id)

    def _reply(self, result: Any, id: Any) -> None:
        if result is None or self.proto.state != self.proto.STATE_OPEN:
            return
        if isinstance(result, (bytes, bytearray, memoryview)):
            result = {"data": base64.b64encode(bytes(result)).decode("ascii"), "encoding": "base64"}
        try:
            payload = control("reply", id=id, data=result)
        except (TypeError, ValueError) as e:
            _log.error("listener reply is not JSON: {error}", error=e)
            return
        limit = self.proto.factory.max_reply_size
        if len(payload) > limit:
            _log.warn("listener reply of {size} bytes not sent: over --max-reply-size ({limit})",
                      size=len(payload), limit=limit)
            return
        self.send_text(payload)

    def close(self) -> None:
        """Leave every channel (the socket is closing)."""
        for key in list(self.subscriptions):
            self.unsubscribe(key)


#: seconds a presence group waits for the marker of its snapshot before it
#: asks for another (a per-channel Redis subscription may still be on its
#: way), doubling up to the second number
RESYNC_DELAY = (0.05, 1.0)
#: events a presence group keeps while it waits for a snapshot
MAX_BUFFERED = 10_000
#: seconds over which a channel's join and leave events are gathered before they go out: a client that joins
#: and leaves (or leaves and comes back) within it costs the others nothing, and each client costs each member
#: at most one event per period, whatever its rate
PRESENCE_PERIOD = 0.1

_Store = _presence.MemoryPresence | _presence.RedisPresence


@implementer(ISink)
class PresenceGroup:
    """
    The presence subscriptions of one channel on this node, subscribed to the
    channel's presence events (:func:`sockdrawer.presence.events_key`).

    It keeps the channel's list of entries (:attr:`view`) from one snapshot
    and the events after it (see :mod:`sockdrawer.presence` for the markers
    that line them up).  A new subscription waits for the marker of its own
    join: then it is sent the list (itself in it) and, from there on, every
    event.  After a broker gap the group takes a new snapshot and sends every
    subscription the list again.
    """

    def __init__(self, service: PresenceService, key: bytes) -> None:
        self.service = service
        self.key = key
        self.channel = key.decode("utf-8")
        #: client id -> user, as of the last event applied
        self.view: dict[str, Any] = {}
        self.synced = False
        self.closed = False
        #: subscriptions that get every event
        self.live: dict[Subscription, None] = {}
        #: nonce of its join -> a subscription waiting for that marker
        self.pending: dict[str, Subscription] = {}
        #: live before a gap: they get the list again once synced
        self._stale: dict[Subscription, None] = {}
        self._buffer: list[tuple[str, dict[str, Any] | None, bytes]] = []
        self._snapshots: dict[str, list[Any]] = {}
        self._retry: IDelayedCall | None = None
        self._delay = RESYNC_DELAY[0]
        #: a failure was logged since the group last had its list (retries are not)
        self._warned = False
        #: snapshots asked for and not answered yet
        self._asking = 0
        #: client id -> nonce, of :attr:`pending`
        self._pending_clients: dict[str, str] = {}
        #: the events for the live subscriptions not sent yet, by client: (the last event's body, whether the
        #: client was in the view and as which user when the period began)
        self._out: dict[str, tuple[bytes, bool, Any]] = {}
        self._flush_call: IDelayedCall | None = None

    @property
    def receivers(self) -> int:
        return len(self.live) + len(self.pending) + len(self._stale)

    def add(self, sub: Subscription) -> None:
        nonce = secrets.token_hex(8)
        self.pending[nonce] = sub
        session = sub.session
        self._pending_clients[session.client] = nonce
        fields = _presence.entry_fields(session.proto.user, session.client)
        # one snapshot at a time is enough: a join after it is an event after its marker (a crowd joining at
        # once costs one O(n) read, not n of them)
        snapshot = not self.synced and not self._asking
        d = maybeDeferred(self.service.store.join, self.key, self.service.field(session), fields, nonce, snapshot)
        if snapshot:
            self._asking += 1
            d.addCallbacks(self._snapshot, self._snapshot_failed, callbackArgs=(nonce,))
        else:
            d.addErrback(self._failed)

    def remove(self, sub: Subscription) -> None:
        self.live.pop(sub, None)
        self._stale.pop(sub, None)
        nonce = self._pending_clients.pop(sub.session.client, None)
        if nonce is not None:
            self.pending.pop(nonce, None)

    def close(self) -> None:
        self.closed = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        self._out.clear()

    # -- snapshots

    def _snapshot(self, values: Any, nonce: str) -> None:
        self._asking -= 1
        if self.closed or self.synced:
            return
        self._snapshots[nonce] = list(values or ())
        for i, (marker, _, _) in enumerate(self._buffer):
            if marker == nonce:
                self._sync_at(i)
                return
        self._schedule_resync()

    def _snapshot_failed(self, failure: Failure) -> None:
        self._asking -= 1
        self._failed(failure)

    def _failed(self, failure: Failure) -> None:
        if self.closed:
            return
        if not self._warned:
            self._warned = True
            _log.warn("presence of {channel!r} unavailable ({error}); retrying", channel=self.channel,
                      error=failure.getErrorMessage() or type(failure.value).__name__)
        if not self.synced:
            self._schedule_resync()

    def _schedule_resync(self) -> None:
        if self._retry is None or not self._retry.active():
            self._retry = self.service.clock.callLater(self._delay, self.resync)
            self._delay = min(RESYNC_DELAY[1], self._delay * 2)

    def resync(self) -> None:
        """Ask for a snapshot (and its marker) again."""
        self._retry = None
        if self.closed or self.synced:
            return
        nonce = secrets.token_hex(8)
        self._asking += 1
        d = maybeDeferred(self.service.store.sync, self.key, nonce)
        d.addCallbacks(self._snapshot, self._snapshot_failed, callbackArgs=(nonce,))

    def gap(self) -> None:
        """
        The broker may have lost events (and Redis its entries, if it
        restarted): put this node's entries back, then take a new snapshot
        (the same connection runs both in order, so the snapshot has them).
        """
        if self.closed:
            return
        self.synced = False
        self._stale.update(self.live)
        self.live.clear()
        self._buffer = []
        self._snapshots = {}
        for d in self.service.store.refresh([self.key]):
            d.addErrback(lambda f: None)  # the snapshot's failure is reported
        self.resync()

    def _sync_at(self, index: int) -> None:
        marker = self._buffer[index][0]
        values = self._snapshots[marker]
        before = {nonce for nonce, _, _ in self._buffer[: index + 1] if nonce}
        rest = self._buffer[index + 1:]
        self._buffer = []
        self._snapshots = {}
        self.synced = True
        self._delay = RESYNC_DELAY[0]
        self._warned = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self.view = {entry["client"]: entry["user"] for entry in _presence.parse_entries(values)}
        starting = list(self._stale)
        self._stale.clear()
        for nonce, sub in list(self.pending.items()):
            # its join is in the snapshot: its marker came before, or was lost
            if nonce in before or sub.session.client in self.view:
                del self.pending[nonce]
                self._pending_clients.pop(sub.session.client, None)
                starting.append(sub)
        for sub in starting:
            self.live[sub] = None
            self._send_list(sub)
        for nonce, event, body in rest:
            self._apply(nonce, event, body)

    # -- events

    def receive(self, batch: Batch) -> None:
        for message in batch.messages:
            nonce, event, body = _presence.parse_event(message)
            if self.synced:
                self._apply(nonce, event, body)
                continue
            if len(self._buffer) >= MAX_BUFFERED:
                self._buffer = []
                self._snapshots = {}
            self._buffer.append((nonce, event, body))
            if nonce and nonce in self._snapshots:
                self._sync_at(len(self._buffer) - 1)

    def _flush_later(self) -> None:
        self._flush_call = None
        self._flush()

    def _flush(self) -> None:
        """Send the period's events, one per client whose presence changed, in one write to each socket."""
        out = self._out
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not out:
            return
        view = self.view
        payloads = [body for client, (body, was_in, user) in out.items()
                    if (client in view) != was_in or (was_in and view[client] != user)]
        out.clear()
        if not payloads:
            return
        frames: dict[int, bytes] = {}
        for sub in tuple(self.live):
            sub.session.send_shared(payloads, frames)

    def _apply(self, nonce: str, event: dict[str, Any] | None, body: bytes) -> None:
        client: str | None = None
        if event is not None:
            client = event["client"]
            out = self._out
            if self.live and client not in out:
                out[client] = (body, client in self.view, self.view.get(client))
            if event["op"] == "join":
                self.view[client] = event.get("user")
            else:
                self.view.pop(client, None)
            if self.live:
                out[client] = (body, *out[client][1:])
                if self._flush_call is None:
                    self._flush_call = self.service.clock.callLater(PRESENCE_PERIOD, self._flush_later)
            if event["op"] != "join":
                client = None
        # its own marker, or its entry came back by a refresh (its join failed)
        waiting = self.pending.pop(nonce, None) if nonce else None
        if waiting is None and client is not None:
            marker = self._pending_clients.get(client)
            waiting = self.pending.pop(marker, None) if marker is not None else None
        if waiting is not None:
            self._pending_clients.pop(waiting.session.client, None)
            self._flush()  # the events so far are in the list it gets, not after it
            self.live[waiting] = None
            self._send_list(waiting)

    def _send_list(self, sub: Subscription) -> None:
        clients = [{"user": user, "client": client} for client, user in self.view.items()]
        sub.session.send_text(control("presence", channel=self.channel, self=sub.session.client, clients=clients))


class PresenceService(Service):
    """
    Presence on this node: the :class:`PresenceGroup` of each channel with
    presence subscriptions, and the store of entries (in memory, or Redis
    with :meth:`refresh` every third of ``timeout``).  When it stops, it
    removes this node's entries at once (other nodes see them leave).

    :param store: a :class:`~sockdrawer.presence.MemoryPresence` or
        :class:`~sockdrawer.presence.RedisPresence`.
    :param hub: where presence events arrive.
    :param clock: the reactor.
    :param timeout: the ``presence_timeout`` setting.
    """

    def __init__(self, store: _Store, hub: IChannelHub, clock: Any, timeout: float) -> None:
        self.store = store
        self.hub = hub
        self.clock = clock
        self.timeout = timeout
        #: this process's id in presence fields (``<node>/<client>``)
        self.node = secrets.token_hex(6)
        self.groups: dict[bytes, PresenceGroup] = {}
        self._refresh = LoopingCall(self.refresh)
        self._refresh.clock = clock
        self._stopped = False
        #: the last renewal failed (logged once, until one works again)
        self.refresh_failing = False

    def field(self, session: V1Session) -> str:
        return f"{self.node}/{session.client}"

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        if isinstance(self.store, _presence.RedisPresence):
            self._refresh.start(self.timeout / 3, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._refresh.running:
            self._refresh.stop()
        self._stopped = True
        calls: list[Deferred[Any]] = []
        for call in self.store.leave_all():
            # the link may be down or stopping: then the entries expire
            calls.append(call.addErrback(lambda f: None))
        groups, self.groups = self.groups, {}
        for key, group in groups.items():
            group.close()
            self.hub.unsubscribe(_presence.events_key(key), group)
        return DeferredList(calls)

    def join(self, sub: Subscription) -> None:
        """Add ``sub``'s entry; it gets the list, then joins and leaves."""
        if self._stopped:
            return
        group = self.groups.get(sub.key)
        if group is None:
            group = self.groups[sub.key] = PresenceGroup(self, sub.key)
            self.hub.subscribe(_presence.events_key(sub.key), group)
        group.add(sub)

    def leave(self, sub: Subscription) -> None:
        """Remove ``sub``'s entry (its socket unsubscribed or closed); the others see it leave."""
        group = self.groups.get(sub.key)
        if group is not None:
            group.remove(sub)
            if not group.receivers:
                group.close()
                del self.groups[sub.key]
                self.hub.unsubscribe(_presence.events_key(sub.key), group)
        if self._stopped:
            return
        d = maybeDeferred(self.store.leave, sub.key, [self.field(sub.session)])
        d.addErrback(self._leave_failed, sub.channel)

    def _leave_failed(self, failure: Failure, channel: str) -> None:
        _log.warn("presence leave on {channel!r} failed ({error}); the entry expires", channel=channel,
                  error=failure.getErrorMessage() or type(failure.value).__name__)

    def entries(self, key: bytes) -> Deferred[list[dict[str, Any]]]:
        """Fires with the live entries of ``key`` (``{"user", "client"}`` each)."""
        d = maybeDeferred(self.store.read, key)
        d.addCallback(_presence.parse_entries)
        return d

    def refresh(self) -> Deferred[None]:
        """
        Renew this node's entries (and remove the expired ones of every
        channel it has entries on); a failing renewal is logged once, until
        one works again.
        """
        calls = self.store.refresh()
        failures: list[Failure] = []
        for d in calls:
            d.addErrback(failures.append)
        done: Deferred[Any] = DeferredList(calls)

        def report(_: object) -> None:
            if failures and not self.refresh_failing:
                self.refresh_failing = True
                _log.warn("presence entries of {count} channel(s) not renewed ({error}); they expire in "
                          "{timeout} s unless a renewal works", count=len(failures), timeout=self.timeout,
                          error=failures[0].getErrorMessage() or type(failures[0].value).__name__)
            elif not failures and calls and self.refresh_failing:
                self.refresh_failing = False
                _log.info("presence entries renewed again")

        done.addCallback(report)
        return done
