"""
Lifecycle events for the app's backend (``--webhook``): ``connect`` and
``disconnect`` of each connection (socket or event stream), and
``channel_occupied`` / ``channel_vacated`` when a channel gets its first
connection or loses its last one, across every node.

The transports tell a :class:`Lifecycle` what happens on this node; it keeps
this node's counts and puts each event on an :class:`IEventQueue`: in Redis
(:mod:`sockdrawer.brokers.eventqueue`, where the counts of every node meet and
a crashed node's events are kept) or in memory (:class:`MemoryEventQueue`, the
embedded broker).  A sender (:mod:`sockdrawer.http.webhooks`) takes them off
the queue and posts them.

An event is queued as its JSON body without its id; the id is the queue's
(a Redis stream entry id), added when it is sent, so every retry of one event
sends the same bytes.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

#: the queue's operations: a connection opened or closed (named by its client id), a channel with a
#: first connection on this node or without its last one (named by its key; a presence member's name is
#: ``member_name(channel, user)``), an event queued as it is
CONNECT, DISCONNECT, OCCUPY, VACATE, EVENT = "c", "d", "o", "v", "e"


def member_name(channel: str, user: str) -> str:
    """The name a presence member is counted under (no channel name holds a NUL)."""
    return f"\x00m\x00{channel}\x00{user}"


class IEventQueue(Interface):
    """Where lifecycle events wait until a webhook request delivered them."""

    dropped: int  # events not queued: the queue was at its bound

    def add(op: str, name: str, body: bytes) -> None:
        """
        Queue the event ``body`` for ``op`` on ``name`` (a client id or a channel
        key).  ``OCCUPY`` and ``VACATE`` are this node's first and last
        connection on a channel: the queue keeps the event only when it is the
        first or last across every node.
        """

    def take(count: int) -> Deferred[list[tuple[str, bytes]]]:
        """Up to ``count`` events to send, as ``(id, body)``: new ones, and those another sender left."""

    def keep(ids: list[str]) -> Deferred[Any]:
        """Events this sender is still trying: no other sender should take them yet."""

    def done(event_id: str) -> Deferred[Any]:
        """An event was delivered: it leaves the queue."""

    def length() -> Deferred[int]:
        """The events in the queue, sent or not yet acknowledged."""


@implementer(IEventQueue)
class MemoryEventQueue:
    """
    The embedded broker's queue: events wait in this process (lost when it
    stops), at most ``bound`` of them; beyond, new events are dropped and counted.
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.dropped = 0
        self._waiting: deque[tuple[str, bytes]] = deque()
        self._taken: dict[str, bytes] = {}
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        #: called after an event is queued (the sender's nudge)
        self.on_added: Callable[[], None] | None = None

    def add(self, op: str, name: str, body: bytes) -> None:
        if len(self._waiting) + len(self._taken) >= self.bound:
            self.dropped += 1
            return
        self._waiting.append((f"{self._prefix}-{next(self._ids)}", body))
        if self.on_added is not None:
            self.on_added()

    def take(self, count: int) -> Deferred[list[tuple[str, bytes]]]:
        out: list[tuple[str, bytes]] = []
        while self._waiting and len(out) < count:
            event_id, body = self._waiting.popleft()
            self._taken[event_id] = body
            out.append((event_id, body))
        return succeed(out)

    def keep(self, ids: list[str]) -> Deferred[Any]:
        return succeed(None)

    def done(self, event_id: str) -> Deferred[Any]:
        self._taken.pop(event_id, None)
        return succeed(None)

    def length(self) -> Deferred[int]:
        return succeed(len(self._waiting) + len(self._taken))


def _text(key: bytes | str | None) -> str | None:
    return key.decode("utf-8") if isinstance(key, bytes) else key


class Lifecycle:
    """
    This node's connections and its channels' connection counts, told to
    ``queue`` as events.

    :param queue: an :class:`IEventQueue`.
    :param clock: the reactor (each event's ``time``).
    """

    def __init__(self, queue: Any, clock: Any) -> None:
        self.queue = queue
        self.clock = clock
        #: connections by channel key on this node
        self.channels: dict[bytes, int] = {}
        #: this node's open connections: client id -> the body of its connect event
        self.clients: dict[str, bytes] = {}

    def _body(self, event: str, **fields: Any) -> bytes:
        fields = {"event": event, "time": int(self.clock.seconds() * 1000), **fields}
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    def connected(self, client: str, user: str | None, transport: str, channel: bytes | None) -> None:
        """A connection opened (``channel``: its raw channel; ``None`` for a sockdrawer.v1 session)."""
        body = self._body("connect", user=user, client=client, channel=_text(channel), transport=transport)
        self.clients[client] = body
        self.queue.add(CONNECT, client, body)

    def disconnected(self, client: str, user: str | None, transport: str, channel: bytes | None) -> None:
        """A connection closed."""
        if self.clients.pop(client, None) is None:
            return
        body = self._body("disconnect", user=user, client=client, channel=_text(channel), transport=transport)
        self.queue.add(DISCONNECT, client, body)

    def joined(self, key: bytes) -> None:
        """A connection (raw, or a v1 subscription) on channel ``key`` on this node."""
        count = self.channels.get(key, 0)
        self.channels[key] = count + 1
        if not count:
            self.queue.add(OCCUPY, _text(key), self._body("channel_occupied", channel=_text(key)))

    def left(self, key: bytes) -> None:
        """One fewer connection on channel ``key`` on this node."""
        count = self.channels.get(key, 0) - 1
        if count > 0:
            self.channels[key] = count
            return
        if self.channels.pop(key, None) is not None:
            self.queue.add(VACATE, _text(key), self._body("channel_vacated", channel=_text(key)))

    def snapshot(self) -> list[tuple[str, str, bytes]]:
        """
        What this node holds, as queue operations (after the queue lost this
        node's state, as when it was presumed dead): its channels and clients.
        """
        ops = [(OCCUPY, _text(key) or "", self._body("channel_occupied", channel=_text(key)))
               for key in self.channels]
        ops += [(CONNECT, client, body) for client, body in self.clients.items()]
        return ops


class PusherLifecycle(Lifecycle):
    """
    What the Pusher webhooks tell (``--pusher-webhook``): a channel's first and
    last Pusher subscription across every node, a presence channel's first and
    last connection of a user, and client events.
    """

    def __init__(self, queue: Any, clock: Any) -> None:
        super().__init__(queue, clock)
        #: presence members by :func:`member_name` on this node
        self.members: dict[str, int] = {}

    def connected(self, client: str, user: str | None, transport: str, channel: bytes | None) -> None:
        pass  # not a Pusher webhook

    def disconnected(self, client: str, user: str | None, transport: str, channel: bytes | None) -> None:
        pass

    def member_joined(self, key: bytes, user: str) -> None:
        name = member_name(key.decode("utf-8"), user)
        count = self.members.get(name, 0)
        self.members[name] = count + 1
        if not count:
            self.queue.add(OCCUPY, name, self._body("member_added", channel=_text(key), user_id=user))

    def member_left(self, key: bytes, user: str) -> None:
        name = member_name(key.decode("utf-8"), user)
        count = self.members.get(name, 0) - 1
        if count > 0:
            self.members[name] = count
        elif self.members.pop(name, None) is not None:
            self.queue.add(VACATE, name, self._body("member_removed", channel=_text(key), user_id=user))

    def client_event(self, key: bytes, event: str, data: str, socket_id: str, user: str | None) -> None:
        fields = {"channel": _text(key), "event_name": event, "data": data, "socket_id": socket_id}
        if user is not None:
            fields["user_id"] = user
        self.queue.add(EVENT, "", self._body("client_event", **fields))

    def snapshot(self) -> list[tuple[str, str, bytes]]:
        ops = super().snapshot()
        for name in self.members:
            _, _, channel, user = name.split("\x00", 3)
            ops.append((OCCUPY, name, self._body("member_added", channel=channel, user_id=user)))
        return ops
