"""
A sockdrawer.v1 connection's state, without I/O: payloads come in
(:meth:`V1Session.received`), frames go out through an
:class:`~sockdrawer.core.v1.host.Outbox`; its subscriptions (each in one
:class:`State`), offsets, catch-up and replies.  No transport, no framing,
no reactor: the transport hands them in.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import json
import secrets
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockdrawer.core.channels import ChannelNameError, printable, validate_channel
from sockdrawer.core.history import HistoryReset, Replay
from sockdrawer.core.interfaces import Batch
from sockdrawer.core.subscriber import SOCKET, Source
from sockdrawer.core.tokens import TokenRefused
from sockdrawer.core.v1.host import Outbox, Peer, PresenceJoins, SessionHost
from sockdrawer.core.v1.messages import (
    MAX_ID_LENGTH,
    _at_or_before,
    _id_ok,
    _position,
    _refuse_constant,
    _unicode,
    control,
    envelope,
)

_log = Logger(namespace="sockdrawer.v1")


class State(enum.Enum):
    """
    Where a subscription is.  Live messages reach the client only in
    ``LIVE``; in every other state they are kept aside, and sent (or read
    again from history) when it goes live.
    """

    #: a listener is asked whether it may subscribe; not in the fan-out yet
    AUTHORIZING = "authorizing"
    #: its history is read; the live messages kept meanwhile follow it
    READING = "reading"
    #: its history is read, and the broker has lost messages since: it waits for the broker's gap when done
    READING_LOST = "reading, broker lost"
    #: its history is read, and a broker gap came meanwhile: it catches up again from the read's end
    READING_GAP = "reading, gap pending"
    #: the broker lost messages: it waits for the gap to catch up from history
    SUSPENDED = "suspended"
    #: live messages go to the client as they come
    LIVE = "live"


_READING = (State.READING, State.READING_LOST, State.READING_GAP)


class Subscription:
    """
    One channel of one v1 session.  While its replay is being read it keeps
    live messages aside; then it sends the replay, the kept messages that
    came after it (never one twice), and goes live.

    The replay is read on another Redis connection than live messages, so a
    message the replay held can still be on its way when the subscription
    goes live: until the first live message newer than the replay, live
    messages at or before the last offset sent are dropped (``_guard``).

    While the broker's subscription does not cover the channel (from the
    hub's ``broker_lost`` to its ``broker_gap``), live messages cannot be
    taken as following the last one sent: the subscription is
    ``SUSPENDED``, keeps them aside, and at the gap reads history from its
    last offset, which holds them all, in order.
    """

    __slots__ = ("session", "key", "group", "state", "_kept", "last", "presence", "present", "_guard")

    def __init__(self, session: V1Session, key: bytes) -> None:
        self.session = session
        self.key = key
        #: the transport's fan-out group this subscription is a member of
        self.group: Any = None
        self.state = State.AUTHORIZING
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

    channel = property(lambda self: self.key.decode("utf-8"), doc="The channel's name (made when read).")

    def __repr__(self) -> str:
        return f"<Subscription {self.channel!r} {self.state.value}>"

    def deliver(self, batch: Batch, data: bytes) -> None:
        """A batch of the channel's live messages, and ``data``: their frames as the fan-out group made them."""
        if self.state is State.LIVE:
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
        if self.session.host.history is None:
            return  # nothing to catch up from: the gap sends reset
        if self.state is State.LIVE:
            self.state = State.SUSPENDED
        elif self.state is State.READING:
            self.state = State.READING_LOST

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
        state = self.state
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
        hold = state in (State.READING_LOST, State.READING_GAP, State.SUSPENDED)
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
            service = session.host.presence
            if service is not None:
                service.join(self)
        if state is State.READING_GAP:
            self.state = State.SUSPENDED
            session.catch_up(self)
        elif hold:
            self.state = State.SUSPENDED
        else:
            self.state = State.LIVE


class V1Session:
    """
    The v1 state of one connection: its subscriptions, and the handling of
    the client's messages.  ``host``: the node's parts (history, presence,
    hub, listeners, limits); ``outbox``: where its frames go; ``peer``: who
    is on the other end.
    """

    def __init__(self, host: SessionHost, outbox: Outbox, peer: Peer) -> None:
        self.host = host
        self.outbox = outbox
        self.peer = peer
        self.subscriptions: dict[bytes, Subscription] = {}
        self._client: str | None = None
        #: history reads waiting for this session's one read in flight (a deque only while some wait)
        self._reads: deque[tuple[Subscription, str | None, bool, bool]] | None = None
        self._reading = False
        self._pumping = False
        #: the address its subscriptions are counted against (--max-subscriptions-per-ip)
        self._ip: str | None = None
        #: presence joins left in this session's bucket, as of when (None: full)
        self._joins = 0.0
        self._joins_at: float | None = None

    @property
    def client(self) -> str:
        """This session's id in presence entries (random, made on first use)."""
        if self._client is None:
            self._client = secrets.token_urlsafe(9)
        return self._client

    @property
    def presence(self) -> PresenceJoins | None:
        """The node's presence (``None`` when it offers none)."""
        return self.host.presence

    # -- out

    def write(self, frames: bytes) -> None:
        self.outbox.write(frames)

    def send_text(self, payload: bytes) -> None:
        outbox = self.outbox
        outbox.write(outbox.frame(payload))

    def send_control(self, op: str, **fields: Any) -> None:
        self.send_text(control(op, **fields))

    def send_shared(self, payloads: list[bytes], frames: dict[Any, bytes]) -> None:
        """:meth:`send_text` of payloads many sessions get: framed once per encoding, kept in ``frames``."""
        outbox = self.outbox
        encoding = outbox.encoding
        data = frames.get(encoding)
        if data is None:
            frame = outbox.frame
            data = frames[encoding] = b"".join(frame(payload) for payload in payloads)
        outbox.write(data)

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
        if op == "refresh":
            self.refresh(msg.get("token"))
            return
        if op not in ("subscribe", "unsubscribe", "send"):
            self.error(400, "unknown op")
            return
        if not isinstance(channel, str):
            self.error(400, "channel must be a string")
            return
        try:
            key = validate_channel(channel, self.host.limits.max_channel_length)
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

    def refresh(self, token: Any) -> None:
        """The ``refresh`` op: a fresh token for the same user replaces this connection's before it expires."""
        verifier = self.host.verifier
        if verifier is None or not isinstance(token, str) or not token:
            self.error(400, "refresh takes a token" if verifier is not None else "this node takes no tokens")
            return
        try:
            grant = verifier.verify(token)
        except TokenRefused as e:
            self.error(e.status, e.reason)
            return
        if self.peer.user is not None and grant.user != self.peer.user:
            self.error(403, "the token is for another user")
            return
        self.peer = dataclasses.replace(self.peer, user=grant.user, grant=grant)
        self.outbox.expires(grant.expires + verifier.leeway)
        self.send_control("refreshed", expires=grant.expires)

    def _uncount(self) -> None:
        """One subscription less for this socket's address."""
        ip = self._ip
        if ip is not None:
            per_ip = self.host.subscriptions_per_ip
            left = per_ip.get(ip, 1) - 1
            if left > 0:
                per_ip[ip] = left
            else:
                per_ip.pop(ip, None)

    def _take_presence_join(self) -> bool:
        """One presence join from this session's bucket (each join and its leave cost every member an event)."""
        settings = self.host.limits
        now = self.host.clock.seconds()
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
        return self.host.allowed(channel, self.peer.grant)

    def subscribe(self, key: bytes, channel: str, since: str | None, presence: bool = False) -> None:
        host = self.host
        if key in self.subscriptions:
            self.error(409, "already subscribed", channel)
            return
        if len(self.subscriptions) >= host.limits.max_subscriptions:
            self.error(429, "too many subscriptions", channel)
            return
        ip = self.peer.counted_ip
        if ip is not None:
            count = host.subscriptions_per_ip.get(ip, 0)
            if count >= host.limits.max_subscriptions_per_ip:
                self.error(429, "too many subscriptions from this address", channel)
                return
        if not self._allowed(channel):
            self.error(403, "token does not cover this channel", channel)
            return
        sub = Subscription(self, key)
        sub.presence = presence
        self.subscriptions[key] = sub
        if ip is not None:
            host.subscriptions_per_ip[ip] = count + 1
            self._ip = ip
        decision = host.decide(self._source(channel), self)
        if decision is None:
            self._start(sub, since)
        else:
            decision.addCallback(self._authorized, sub, since)

    def _authorized(self, refusal: tuple[int, str] | None, sub: Subscription, since: str | None) -> None:
        if self.subscriptions.get(sub.key) is not sub:
            return
        if refusal is not None:
            del self.subscriptions[sub.key]
            self._uncount()
            self.error(refusal[0], refusal[1], sub.channel)
            return
        self._start(sub, since)

    def _source(self, channel: str) -> Source:
        return Source(SOCKET, channel, self.peer.address, self.peer.user)

    def _start(self, sub: Subscription, since: str | None) -> None:
        host = self.host
        host.fanout.join(sub, self.outbox.encoding)
        if host.history is None:
            sub.go_live(Replay(None), reset=since is not None)
            return
        # what comes live until the broker's gap may follow a hole
        sub.state = State.READING if host.hub.broker_whole else State.READING_LOST
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
        reads = self._reads
        if reads is None:
            reads = self._reads = deque()
        (reads.appendleft if first else reads.append)((sub, since, reset, announce))
        self._pump()

    def _pump(self) -> None:
        # one read per call: when it is done, _read_done schedules the next in a later
        # turn, so reads that answer at once (the embedded broker) take turns with the rest
        if self._pumping:
            return
        self._pumping = True
        try:
            history = self.host.history
            while not self._reading and self._reads and history is not None:
                sub, since, reset, announce = self._reads.popleft()
                if not self._reads:
                    self._reads = None  # an idle session keeps no deque
                if self.subscriptions.get(sub.key) is not sub:
                    continue  # unsubscribed meanwhile
                self._reading = True
                d: Deferred[Replay] = history(sub.key, since)
                d.addCallbacks(self._replayed, self._replay_failed, callbackArgs=(sub, reset, announce),
                               errbackArgs=(sub, since))
                d.addErrback(lambda f: _log.failure("reading history failed", f))
                d.addBoth(self._read_done)
                break
        finally:
            self._pumping = False

    def _read_done(self, _: object) -> None:
        self._reading = False
        if self._reads:
            # the next page in a later turn: a replay that answers at once (the
            # embedded broker) takes turns with everything else, not one long turn
            self.host.clock.callLater(0, self._pump)

    def _replayed(self, replay: Replay, sub: Subscription, reset: bool, announce: bool = True) -> None:
        if self.subscriptions.get(sub.key) is not sub or not self.outbox.can_send:
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
        if sub.state in _READING:
            # it may have been read before what the gap lost was published, so
            # the subscription catches up again from where that replay ends
            sub.state = State.READING_GAP
            return
        if self.host.history is None:
            sub.go_live(Replay(None), reset=True)
            return
        # lost again already (a gap that came during a replay, then another loss)
        sub.state = State.READING if self.host.hub.broker_whole else State.READING_LOST
        if sub.last is None:
            # nothing with an offset sent yet: no place to resume from
            self._read(sub, None, True, False)
            return
        self._read(sub, sub.last, False, False)

    def _replay_failed(self, failure: Failure, sub: Subscription, since: str | None) -> None:
        if self.subscriptions.get(sub.key) is not sub:
            return
        if failure.check(HistoryReset) and since is not None and self.host.history is not None:
            self._read(sub, None, True, True, first=True)
            return
        _log.warn("history of {channel!r} unavailable: {error}", channel=printable(sub.channel),
                  error=failure.getErrorMessage())
        self.unsubscribe(sub.key)
        self.error(503, "history unavailable", sub.channel)

    def unsubscribe(self, key: bytes) -> None:
        sub = self.subscriptions.pop(key, None)
        if sub is not None:
            self._uncount()
            self.host.fanout.leave(sub)
            if sub.present:
                service = self.presence
                if service is not None:
                    service.leave(sub)

    def send(self, key: bytes, channel: str, data: Any, id: Any) -> None:
        if not self._allowed(channel):
            self.error(403, "token does not cover this channel", channel, id)
            return
        handler = self.host.frame_handler
        if handler is None:
            self.send_control("reply", id=id, data=None)
            return
        message = data if isinstance(data, str) else json.dumps(data)
        for d in handler(self._source(channel), message):
            d.addCallback(self._reply, id)

    def _reply(self, result: Any, id: Any) -> None:
        if result is None or not self.outbox.can_send:
            return
        if isinstance(result, (bytes, bytearray, memoryview)):
            result = {"data": base64.b64encode(bytes(result)).decode("ascii"), "encoding": "base64"}
        try:
            payload = control("reply", id=id, data=result)
        except (TypeError, ValueError) as e:
            _log.error("listener reply is not JSON: {error}", error=e)
            return
        limit = self.host.limits.max_reply_size
        if len(payload) > limit:
            _log.warn("listener reply of {size} bytes not sent: over --max-reply-size ({limit})",
                      size=len(payload), limit=limit)
            return
        self.send_text(payload)

    def close(self) -> None:
        """Leave every channel (the connection is closing)."""
        for key in list(self.subscriptions):
            self.unsubscribe(key)
