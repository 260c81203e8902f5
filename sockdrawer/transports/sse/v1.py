"""
sockdrawer.v1 over Server-Sent Events: ``GET /?channel=a&channel=b`` streams
the envelopes a v1 WebSocket gets, one event each.  Each event's ``id`` is a
cursor for every channel of the stream (their offsets, in the order of the
``channel`` parameters, comma-separated), so the ``Last-Event-ID`` a browser
sends when it reconnects resumes each channel from where it was.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from zope.interface import implementer

from sockdrawer.core.channels import ChannelNameError, validate_channel
from sockdrawer.core.interfaces import Batch, ISink
from sockdrawer.core.members import Members
from sockdrawer.core.v1 import Peer, V1Session
from sockdrawer.core.v1.messages import envelope
from sockdrawer.transports.sse.stream import EventStream, StreamRefused, StreamRequest, start_response
from sockdrawer.transports.websocket.fanout import SubscriptionGroup

#: the "encoding" of every event-stream outbox: their frames are alike (each stream adds its own ids)
SSE_ENCODING = -1
#: the longest Last-Event-ID taken (64 bytes an offset, and a comma, per channel, is below it)
MAX_CURSOR = 64 * 1024


def v1_positions(request: StreamRequest, channels: list[str], max_subscriptions: int) -> list[str | None]:
    """
    Where each channel resumes: from ``Last-Event-ID`` (the header a
    browser's ``EventSource`` sends, or ``lastEventId`` in the query for
    clients that cannot set it), one offset per channel in order; none for
    a fresh stream.  A cursor that does not fit the channels is refused (400).
    """
    if len(channels) > max_subscriptions:
        raise StreamRefused(400, "too many channels")
    cursor = request.headers.get("last-event-id")
    if cursor is None:
        given = request.query("lastEventId")
        cursor = given[0] if given else None
    if not cursor:
        return [None] * len(channels)
    if len(cursor) > MAX_CURSOR or not cursor.isascii():
        raise StreamRefused(400, "Last-Event-ID is not a cursor of this stream")
    offsets = cursor.split(",")
    if len(offsets) != len(channels):
        raise StreamRefused(400, "Last-Event-ID is not a cursor of this stream")
    return [offset or None for offset in offsets]


class StreamOutbox:
    """
    The outbox of a v1 session on an event stream.  Its frames are the
    envelopes themselves, each ended with a newline (a JSON text has none of
    its own); on the way out each becomes one event, whose ``id`` is the
    stream's cursor once that envelope's offset is counted in.
    """

    __slots__ = ("stream", "index", "cursor")

    encoding = SSE_ENCODING

    def __init__(self, stream: EventStream, channels: list[str], since: list[str | None]) -> None:
        self.stream = stream
        self.index = {channel: i for i, channel in enumerate(channels)}
        self.cursor = [offset or "" for offset in since]

    @property
    def can_send(self) -> bool:
        return self.stream.open

    def frame(self, payload: bytes) -> bytes:
        return payload + b"\n"

    def expires(self, when: float) -> None:
        """A refreshed token: the stream ends at its expiry, not the old one's."""
        stream = self.stream
        if stream.expiry is not None and stream.expiry.active():
            stream.expiry.cancel()
        clock = stream.registry.clock
        stream.expiry = clock.callLater(max(0.0, when - clock.seconds()), stream.close)

    def write(self, data: bytes) -> None:
        events = []
        for payload in data.split(b"\n"):
            if not payload:
                continue
            msg = json.loads(payload)
            i = self.index.get(msg.get("channel"))
            offset = msg.get("offset")
            if i is not None and isinstance(offset, str):
                self.cursor[i] = offset
            events.append(b"id: " + ",".join(self.cursor).encode("ascii") + b"\ndata: " + payload + b"\n\n")
        self.stream.write(b"".join(events))


@implementer(ISink)
class StreamEnvelopeGroup(SubscriptionGroup):
    """The v1 stream subscriptions of one channel: each batch's envelopes made once, for every stream."""

    __slots__ = ("key", "_channel_json", "members", "registry", "stats")

    def __init__(self, key: bytes, registry: Any) -> None:
        self.key = key
        self._channel_json = json.dumps(key.decode("utf-8"), ensure_ascii=False)
        self.members: Members[Any] = Members()
        self.registry = registry
        #: what the subscriptions take back from when they drop a replayed message
        self.stats = registry.stats

    @property
    def receivers(self) -> int:
        return len(self.members)

    def receive(self, batch: Batch) -> None:
        offsets = batch.offsets or [None] * len(batch.messages)
        data = b"".join(envelope(self._channel_json, off, m) + b"\n"
                        for m, off in zip(batch.messages, offsets, strict=True))
        self.stats.deliveries += len(self.members) * len(batch.messages)
        self.stats.bytes_sent += len(self.members) * len(data)
        for sub in tuple(self.members):
            sub.deliver(batch, data)



class StreamFanout:
    """The fan-out of v1 stream sessions (:class:`~sockdrawer.core.v1.host.Fanout`): one group per channel."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.groups: dict[bytes, StreamEnvelopeGroup] = {}

    def join(self, sub: Any, encoding: int) -> None:
        group = self.groups.get(sub.key)
        if group is None:
            group = self.groups[sub.key] = StreamEnvelopeGroup(sub.key, self.registry)
            self.registry.hub.subscribe(sub.key, group)
        lifecycle = self.registry.lifecycle
        if lifecycle is not None and sub not in group.members:
            lifecycle.joined(sub.key)
        group.members[sub] = None
        sub.group = group

    def leave(self, sub: Any) -> None:
        group: StreamEnvelopeGroup | None = sub.group
        sub.group = None
        if group is None:
            return
        if group.members.pop(sub, 0) is None and self.registry.lifecycle is not None:
            self.registry.lifecycle.left(group.key)
        if not group.members and self.groups.get(group.key) is group:
            del self.groups[group.key]
            self.registry.hub.unsubscribe(group.key, group)


def start_v1_stream(proto: Any, channels: list[str], since: list[str | None], grant: Any, presence: bool,
                    cors: list[tuple[str, str]]) -> None:
    """Open a v1 stream: the response, then a session subscribed to each channel from its position."""
    stream = start_response(proto, None, cors, grant)
    registry = proto.factory.streams
    # its name for the ops the page posts (POST /?stream=<id>): a secret, told only on the stream
    stream.id = secrets.token_urlsafe(16)
    registry.by_id[stream.id] = stream
    stream.write(b"event: stream\ndata: " + json.dumps({"id": stream.id}).encode() + b"\n\n")
    peer = Peer(proto.peer, grant.user if grant is not None else None, grant, proto._counted_ip)
    session = V1Session(registry.sessions, StreamOutbox(stream, channels, since), peer)
    session._client = proto.client_id  # the id of its webhook events, if any
    stream.session = session
    for channel, offset in zip(channels, since, strict=True):
        if not stream.open:
            return
        try:
            key = validate_channel(channel, registry.sessions.limits.max_channel_length)
        except ChannelNameError as e:
            session.error(400, str(e), channel=channel if len(channel) < 300 else None)
            continue
        if presence and session.presence is None:
            session.error(501, "presence is not available on this node", channel)
            presence = False
        session.subscribe(key, channel, offset, presence)


def post_op(proto: Any, stream_id: str, body: bytes) -> tuple[int, bytes]:
    """
    An op a page posts for its stream (``subscribe``, ``unsubscribe`` or
    ``send``, as on a v1 WebSocket): handed to that stream's session, whose
    answers (``subscribed``, ``reply``, ``error``) come on the stream.
    """
    stream = proto.factory.streams.by_id.get(stream_id)
    if stream is None or stream.session is None:
        return 404, b'{"error": "no such stream"}'
    stream.session.received(body, False)
    return 202, b'{"accepted": true}'
