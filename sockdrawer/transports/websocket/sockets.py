"""
What a WebSocket server keeps of its sockets, apart from Autobahn: its
options, counters, the fan-out groups of each channel, and what its
sockdrawer.v1 sessions share.  The protocol reads it as its ``factory``;
:class:`~sockdrawer.transports.websocket.factory.SockDrawerServerFactory` is
this and Autobahn's factory in one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed

from sockdrawer.core.control import CONTROL_KEY
from sockdrawer.core.interfaces import IChannelHub
from sockdrawer.core.pusher import PusherHost
from sockdrawer.core.subscriber import Source
from sockdrawer.core.tokens import pattern_matches
from sockdrawer.core.v1 import SessionHost, Subscription
from sockdrawer.transports.sse.stream import StreamRegistry
from sockdrawer.transports.sse.v1 import StreamFanout
from sockdrawer.transports.websocket.control import ControlSink
from sockdrawer.transports.websocket.fanout import PLAIN, ChannelGroup, Encoders, EnvelopeGroup, FanoutStats
from sockdrawer.transports.websocket.frames import MAX_WINDOW_BITS
from sockdrawer.transports.websocket.options import WebSocketOptions
from sockdrawer.transports.websocket.origins import OriginPolicy
from sockdrawer.transports.websocket.timers import CollectorFreeze

#: Called with each frame a browser sends: returns one Deferred per handler,
#: each firing with the reply to send back (or ``None``).
FrameHandler = Callable[[Source, "str | bytes"], Sequence[Deferred[Any]]]


class SocketRegistry:
    """
    The sockets of one server and the state they share.

    :param hub: where sockets subscribe.
    :param frame_handler: gets the frames browsers send; ``None`` ignores them.
    :param settings: the transport's options.
    :param clock: the reactor.
    :param authorize: asks the listeners whether a socket may open or subscribe.
    """

    def __init__(self, hub: IChannelHub, frame_handler: FrameHandler | None, settings: WebSocketOptions,
                 clock: Any, authorize: Callable[[Source], Deferred[bool] | None] | None) -> None:
        #: keeps full GC passes short with many sockets (see CollectorFreeze)
        self.freezer = CollectorFreeze(clock) if not settings.no_gc_freeze else None
        self.hub = hub
        self.frame_handler = frame_handler
        self.clock = clock
        self.options = settings
        self.max_channel_length = settings.max_channel_length
        self.max_handshake_size = settings.max_handshake_size
        self.max_reply_size = settings.max_reply_size
        self.send_buffer = settings.send_buffer
        self.slow_timeout = settings.slow_timeout
        self.compression = settings.compression
        self.encoders = Encoders(settings.compression_threshold)
        self.origins = OriginPolicy(settings.allowed_origins)
        self.verifier = settings.verifier
        self.public_channels = settings.public_channel
        #: asks the listeners whether a socket may open (``None``: nobody asks)
        self.authorize = authorize
        #: connections in their opening handshake, open sockets, and
        #: connections per client address
        self.pending = 0
        self.open_sockets = 0
        self.per_ip: dict[str, int] = {}
        #: open connections by user (with --max-connections-per-user)
        self.per_user: dict[str, int] = {}
        #: connections in their opening handshake, and v1 subscriptions, by client address
        self.pending_per_ip: dict[str, int] = {}
        self.max_pending_per_ip = min(settings.max_pending_handshakes_per_ip,
                                      max(1, settings.max_pending_handshakes // 2))
        #: refused handshakes by HTTP status
        self.refusals: dict[int, int] = {}
        self.rate_limited = 0
        #: v1 frames that raised out of the session (each closed its socket with 1011)
        self.frame_failures = 0
        self.last_frame_failure_logged = float("-inf")
        self.connections_total = 0
        self.v1_groups: dict[tuple[bytes, int], EnvelopeGroup] = {}
        #: what the sockdrawer.v1 sessions of this factory's sockets share; the
        #: node sets its ``history`` and ``presence`` when it offers them
        self.sessions = SessionHost(
            hub, _V1Fanout(self), clock, settings.session_limits(),
            requires_token=(lambda channel: not self.is_public(channel)) if self.verifier is not None else None,
            authorize=authorize, frame_handler=frame_handler,
        )
        self.frames_received = 0
        self.stats = FanoutStats()
        self.connections: dict[Any, None] = {}
        #: channel key -> the group of its plain sockets; (key, window bits)
        #: -> the group of its sockets with that permessage-deflate window
        #: (apart, so that the usual plain group costs no key tuple)
        self.groups: dict[bytes, ChannelGroup] = {}
        self.deflate_groups: dict[tuple[bytes, int], ChannelGroup] = {}
        self.slow_cut_offs = 0
        self._empty_waiters: list[Deferred[None]] = []
        #: the event streams served on the same port (Server-Sent Events), their v1 sessions sharing
        #: this server's limits, listeners and per-address subscription counts
        self.streams = StreamRegistry(hub, clock, settings.send_buffer)
        self.streams.sessions = SessionHost(
            hub, StreamFanout(self.streams), clock, settings.session_limits(),
            requires_token=self.sessions.requires_token, authorize=authorize, frame_handler=frame_handler,
        )
        self.streams.sessions.subscriptions_per_ip = self.sessions.subscriptions_per_ip
        # the v1 refresh op checks tokens as the handshake does
        self.sessions.verifier = self.streams.sessions.verifier = self.verifier
        #: the app backend's commands to this node's connections (disconnect, unsubscribe), from every node
        self.control = ControlSink(self)
        hub.subscribe(CONTROL_KEY, self.control)
        #: told of connections and of channels' first and last ones (--webhook)
        self.lifecycle = self.streams.lifecycle = settings.lifecycle
        #: the Pusher sessions' shared parts (--pusher-key; ``None``: no Pusher door)
        self.pusher: PusherHost | None = None
        if settings.pusher is not None:
            self.pusher = PusherHost(settings.pusher, hub, settings.publish, self.stats, settings.max_subscriptions,
                                     settings.max_channel_length,
                                     public=(lambda c: self.verifier is None or self.is_public(c)))
            self.pusher.lifecycle = self.lifecycle
            self.pusher.hooks = settings.pusher_hooks

    def is_public(self, channel: str) -> bool:
        """Whether ``channel`` needs no token (``--public-channel``)."""
        return any(pattern_matches(p, channel) for p in self.public_channels)

    def origin_allowed(self, origin: str) -> bool:
        """Whether a browser from ``origin`` may connect (see :class:`~sockdrawer.origins.OriginPolicy`)."""
        return self.origins.allows(origin)

    def _groups_of(self, key: bytes, encoding: int) -> tuple[dict[Any, ChannelGroup], Any]:
        """Where the group of ``key`` with ``encoding`` is kept, and under which index."""
        if encoding == PLAIN:
            return self.groups, key
        return self.deflate_groups, (key, encoding)

    def join(self, key: bytes, proto: Any) -> None:
        """Add an open socket to its channel's group for its encoding (subscribing the group)."""
        encoding = proto.encoding
        groups, index = self._groups_of(key, encoding)
        group = groups.get(index)
        if group is None:
            group = groups[index] = ChannelGroup(key, encoding, self.encoders.get(encoding), self.stats)
            self.hub.subscribe(key, group)
        group.add(proto)
        if self.lifecycle is not None:
            self.lifecycle.joined(key)

    def leave(self, proto: Any) -> None:
        """Take a socket out of its group; the last one out unsubscribes the group."""
        group: ChannelGroup | None = proto._group
        if group is None:
            return
        group.remove(proto)
        key = group.key
        if self.lifecycle is not None:
            self.lifecycle.left(key)
        if len(group):
            return
        groups, index = self._groups_of(key, group.encoding)
        if groups.get(index) is group:
            del groups[index]
            self.hub.unsubscribe(key, group)

    @property
    def subscriptions_per_ip(self) -> dict[str, int]:
        """v1 subscriptions by the client address they count against."""
        return self.sessions.subscriptions_per_ip

    def join_v1(self, sub: Subscription, encoding: int) -> None:
        """Add a v1 subscription to its channel's envelope group for ``encoding``."""
        index = (sub.key, encoding)
        group = self.v1_groups.get(index)
        if group is None:
            group = self.v1_groups[index] = EnvelopeGroup(sub.key, encoding, self.encoders.deflater(encoding),
                                                          self.stats)
            self.hub.subscribe(sub.key, group)
        if self.lifecycle is not None and sub not in group.members:
            self.lifecycle.joined(sub.key)
        group.members[sub] = None
        sub.group = group

    def leave_v1(self, sub: Subscription) -> None:
        group: EnvelopeGroup | None = sub.group
        sub.group = None
        if group is None:
            return
        group.forget(sub)
        if group.members.pop(sub, 0) is None and self.lifecycle is not None:
            self.lifecycle.left(group.key)
        index = (group.key, group.encoding)
        if not group.members and self.v1_groups.get(index) is group:
            del self.v1_groups[index]
            self.hub.unsubscribe(group.key, group)

    def group(self, key: bytes, encoding: int = PLAIN) -> ChannelGroup | None:
        """The group of the sockets on ``key`` with ``encoding``, if any."""
        if encoding == PLAIN:
            return self.groups.get(key)
        return self.deflate_groups.get((key, encoding))

    def sockets(self, key: bytes) -> int:
        """How many open sockets (not counting sockdrawer.v1 subscriptions) are on channel ``key``."""
        count = len(self.groups.get(key) or ())
        if self.deflate_groups:
            for bits in range(9, MAX_WINDOW_BITS + 1):
                group = self.deflate_groups.get((key, bits))
                if group is not None:
                    count += len(group)
        return count

    def census(self) -> dict[bytes, int]:
        """This server's connections by channel: raw and v1 sockets, raw and v1 event streams."""
        counts: dict[bytes, int] = {}
        parts: list[tuple[bytes, int]] = [(key, len(g)) for key, g in self.groups.items()]
        parts += [(key, len(g)) for (key, _), g in self.deflate_groups.items()]
        parts += [(key, len(g.members)) for (key, _), g in self.v1_groups.items()]
        parts += [(key, len(g.streams)) for key, g in self.streams.groups.items()]
        parts += [(key, len(g.members)) for key, g in self.streams.sessions.fanout.groups.items()]
        if self.pusher is not None:
            parts += [(key, len(g.members)) for key, g in self.pusher.groups.items()]
        for key, count in parts:
            if count:
                counts[key] = counts.get(key, 0) + count
        return counts

    def when_all_closed(self) -> Deferred[None]:
        """A Deferred that fires once no connection is left."""
        if not self.connections:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._empty_waiters.append(d)
        return d

    def _forget(self, proto: Any) -> None:
        self.connections.pop(proto, None)
        if not self.connections and self._empty_waiters:
            waiters, self._empty_waiters = self._empty_waiters, []
            for d in waiters:
                d.callback(None)




class _V1Fanout:
    """The factory's envelope groups, as the fan-out of its v1 sessions (:class:`~sockdrawer.core.v1.host.Fanout`)."""

    __slots__ = ("_factory",)

    def __init__(self, factory: SocketRegistry) -> None:
        self._factory = factory

    def join(self, sub: Any, encoding: int) -> None:
        self._factory.join_v1(sub, encoding)

    def leave(self, sub: Any) -> None:
        self._factory.leave_v1(sub)
