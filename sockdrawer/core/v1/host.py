"""
What a sockdrawer.v1 session is given, so that it needs no transport: an
:class:`Outbox` for its frames, the :class:`Peer` on the other end, and the
node's parts in one :class:`SessionHost`.  A transport provides the outbox and
the fan-out; the core never frames, writes or imports a transport.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from sockdrawer.core.history import Replay
from sockdrawer.core.interfaces import IChannelHub
from sockdrawer.core.subscriber import Source
from sockdrawer.core.tokens import Grant

#: reads ``(key, since)`` of a channel's history: a Deferred of the :class:`Replay` after ``since``
HistoryReader = Callable[[bytes, "str | None"], "Deferred[Replay]"]
#: gets a frame a client sends: one Deferred per listener, each firing with its reply (or ``None``)
FrameHandler = Callable[[Source, "str | bytes"], Sequence["Deferred[Any]"]]
#: asks the listeners whether a source may subscribe: a Deferred of the answer, or ``None`` (nobody asks)
Authorize = Callable[[Source], "Deferred[bool] | None"]


class Outbox(Protocol):
    """
    Where a session's frames go.  The transport frames (``frame``) and sends
    (``write``, in order, behind whatever waits for the connection); frames
    many sessions share are framed once per ``encoding`` (see
    :meth:`~sockdrawer.core.v1.session.V1Session.send_shared`).
    """

    #: which framing this connection's frames have (equal encodings frame equally)
    encoding: int

    @property
    def can_send(self) -> bool:
        """Whether frames may still go out (replies that come late are dropped)."""

    def frame(self, payload: bytes) -> bytes:
        """``payload``, a text message, framed for this connection."""

    def write(self, data: bytes) -> None:
        """Send framed bytes."""

    def expires(self, when: float) -> None:
        """The connection's token now expires at ``when`` (seconds since the epoch): end it then, not before."""


class Fanout(Protocol):
    """The transport's fan-out groups, which a subscription joins to get its channel's messages."""

    def join(self, sub: Any, encoding: int) -> None:
        """Add ``sub`` (a :class:`~sockdrawer.core.v1.session.Subscription`) to its channel's group."""

    def leave(self, sub: Any) -> None:
        """Take ``sub`` out of its group."""


class PresenceJoins(Protocol):
    """The node's presence as a session uses it (:class:`~sockdrawer.core.v1.presence.PresenceService`)."""

    def join(self, sub: Any) -> None:
        """Add ``sub``'s entry."""

    def leave(self, sub: Any) -> None:
        """Remove ``sub``'s entry."""


@dataclass(frozen=True, slots=True)
class Peer:
    """Who is on the other end of a session."""

    #: the client's address, as the transport names it (for logs and listeners)
    address: str | None = None
    #: the ``sub`` of the token it presented
    user: str | None = None
    #: what its token allows (``None``: no token)
    grant: Grant | None = None
    #: the address its subscriptions count against (``--max-subscriptions-per-ip``; ``None``: not counted)
    counted_ip: str | None = None


@dataclass(frozen=True)
class SessionLimits:
    """The options a session obeys (see docs/configuration.rst for each)."""

    max_channel_length: int = 256
    max_subscriptions: int = 100
    max_subscriptions_per_ip: int = 10_000
    max_presence_joins_per_second: float = 5.0
    presence_join_burst: int = 20
    max_reply_size: int = 1024 * 1024


class SessionHost:
    """
    The node's parts that every session of one transport uses, and the
    state they share (subscriptions per address).  Built once by the
    transport's factory; ``history`` and ``presence`` are set by the node
    when it offers them.

    :param hub: the node's hub (sessions ask whether the broker is whole).
    :param fanout: the transport's groups.
    :param clock: for rates and the next page of a replay.
    :param requires_token: whether a channel needs a token that covers it
        (``None``: no channel does).
    """

    def __init__(self, hub: IChannelHub, fanout: Fanout, clock: IReactorTime, limits: SessionLimits, *,
                 requires_token: Callable[[str], bool] | None = None,
                 authorize: Authorize | None = None, frame_handler: FrameHandler | None = None) -> None:
        self.hub = hub
        self.fanout = fanout
        self.clock = clock
        self.limits = limits
        self.requires_token = requires_token
        self.authorize = authorize
        self.frame_handler = frame_handler
        #: reads a channel's history (``None``: the node keeps none)
        self.history: HistoryReader | None = None
        #: who is on each channel (``None``: presence is not offered)
        self.presence: PresenceJoins | None = None
        #: v1 subscriptions by the address they count against
        self.subscriptions_per_ip: dict[str, int] = {}
        #: asks the app's backend about each subscribe (``--subscribe-proxy``): a Deferred that fails with a
        #: ``status`` to refuse it (``None``: no subscribe proxy)
        self.subscribe_proxy: Callable[[dict[str, Any]], Deferred[Any]] | None = None
        #: verifies the tokens of the ``refresh`` op (``verify``, ``leeway``; ``None``: no token keys)
        self.verifier: Any = None

    def decide(self, source: Source, session: Any) -> Deferred[tuple[int, str] | None] | None:
        """
        Whether a subscription may start: ``None`` (yes, at once), or a
        Deferred of ``None`` (yes) or ``(status, reason)`` (no).  The
        subscribe proxy answers first, then the listeners' ``authorize``.
        """
        proxy = self.subscribe_proxy
        if proxy is None:
            return self._listeners(source)
        remote = source.peer  # the address alone, as the connect proxy gets it
        if remote and remote.startswith(("tcp4:", "tcp6:")):
            remote = remote[5:].rsplit(":", 1)[0]
        asked = proxy({"user": source.user, "client": session.client, "channel": source.channel, "remote": remote})

        def answered(_: Any) -> Any:
            return self._listeners(source)

        def refused(failure: Any) -> tuple[int, str]:
            return (getattr(failure.value, "status", 503), getattr(failure.value, "reason", "subscribe refused"))

        return asked.addCallbacks(answered, refused)

    def _listeners(self, source: Source) -> Deferred[tuple[int, str] | None] | None:
        decision = self.authorize(source) if self.authorize is not None else None
        if decision is None:
            return None
        return decision.addCallback(lambda allowed: None if allowed else (403, "refused by a listener"))

    def allowed(self, channel: str, grant: Grant | None) -> bool:
        """Whether a peer with ``grant`` may use ``channel``."""
        requires = self.requires_token
        if requires is not None and not requires(channel):
            return True  # a public channel
        if grant is not None:  # a token's, or the connect proxy's (which restricts without keys too)
            return grant.allows(channel)
        return requires is None
