"""
The Redis side: one subscription per node, kept alive by Twisted's
:class:`~twisted.application.internet.ClientService`, feeding the hub; and a
second connection for publishing.

The subscription is a pattern (``PSUBSCRIBE <name>/*``: every message of the
namespace reaches the node) or, with ``--subscribe channels``, exactly the
channels the hub has sinks for: the link watches the hub
(:class:`~sockdrawer.interfaces.IChannelObserver`) and sends one SUBSCRIBE
and one UNSUBSCRIBE per reactor turn for what changed, and everything again
on each new connection.

Payloads stay :class:`bytes` end to end (``charset=None``,
``convertNumbers=False``), and hiredis parses when it is installed.
"""

from __future__ import annotations

from typing import Any

import txredisapi
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer import _private
from sockdrawer.brokers.linkparts import (
    Backoff,
    BatchedChannelChanges,
    HistoryLibrary,
    ReportingEndpoint,
    RetryLog,
    _ping,
    read_history,
)
from sockdrawer.brokers.subscriber import (
    _BEHIND,
    HIREDIS,
    RedisSubscriberProtocol,
)
from sockdrawer.brokers.url import RedisAddress
from sockdrawer.core import history
from sockdrawer.core.channels import Namespace
from sockdrawer.core.interfaces import IBroker, IChannelHub, IChannelObserver
from sockdrawer.core.stats import Histogram

_log = Logger(namespace="sockdrawer.redis")


class _LinkFactoryMixin(_private.ConnectionPoolBypass):
    link: RedisLink
    backoff: Backoff

    def connectionError(self, why: str) -> None:
        # txredisapi reports AUTH and SELECT failures here; the connection is
        # then closed and ClientService retries with backoff, whose RetryLog
        # says why, with the next try's delay
        if self.backoff.report is not None:
            self.backoff.report.failed(why)
        else:
            _log.error("Redis link to {url}: {why}", url=str(self.link.url), why=why)


class _SubscriberFactory(_LinkFactoryMixin, txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = RedisSubscriberProtocol

    def __init__(self, link: RedisLink) -> None:
        super().__init__()
        self.link = link
        self.backoff = link._sub_backoff
        _configure(self, link)

    def buildProtocol(self, addr: Any) -> RedisSubscriberProtocol:
        p: RedisSubscriberProtocol = super().buildProtocol(addr)
        p.hub = self.link.hub
        p.namespace = self.link.namespace
        p.link = self.link
        p.max_message_size = self.link.max_message_size
        p.by_channel = self.link.subscribe == "channels"
        return p


class _PublisherFactory(_LinkFactoryMixin, txredisapi.RedisFactory):  # type: ignore[misc]
    """A command connection: publishing (which loads the history library), or reading history."""

    def __init__(self, link: RedisLink, backoff: Backoff | None = None, publishes: bool = True) -> None:
        super().__init__(None, None, 1)
        self.link = link
        self.backoff = backoff if backoff is not None else link._pub_backoff
        self.publishes = publishes
        _configure(self, link)

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        link = self.link
        backoff = self.backoff
        # ready means AUTH passed: only then does the backoff start over
        ready = p.whenConnected()
        ready.addCallback(lambda _: backoff.reset())
        if self.publishes:
            ready.addCallback(lambda _: link.library.load(p, link.description))
        ready.addErrback(lambda f: None)
        return p


def _configure(factory: Any, link: RedisLink) -> None:
    _private.configure_factory(factory, link.url.password, link.url.username, link.timeout)


@implementer(IBroker, IChannelObserver)
class RedisLink(BatchedChannelChanges, MultiService):
    """
    The Redis broker: subscribes the hub to ``<namespace>/*`` (or to each of
    its channels) and publishes through a second connection.

    Both connections are kept by a :class:`ClientService` with capped
    exponential backoff, and pinged every ``ping_interval`` seconds so that a
    link silently dropped by a NAT or load balancer is noticed within
    ``ping_interval + timeout`` seconds.  A new subscriber connection
    re-issues PSUBSCRIBE, so sockets stay connected through an outage and get
    the messages published after it.

    With ``subscribe="channels"`` the link watches the hub while it runs and
    subscribes to exactly the channels that have sinks (sockets, listeners):
    the changes of one reactor turn go out as one SUBSCRIBE and one
    UNSUBSCRIBE, and a new connection subscribes to all of them again.  A
    channel that closes and opens again within the turn sends nothing.

    :param url: where Redis is (a :class:`RedisAddress`).
    :param namespace: the channel namespace.
    :param hub: where messages go.
    :param reactor: the reactor; the global one when ``None``.
    :param timeout: seconds to connect, and to wait for any reply.
    :param ping_interval: seconds between liveness PINGs.
    :param retry_max_delay: the longest wait between reconnection attempts.
    :param max_message_size: messages larger than this are dropped (logged).
    :param subscribe: ``"pattern"`` or ``"channels"``.
    :param history_size: messages kept per channel (the policy this node
        loads into Redis as a function library, :class:`HistoryLibrary`).
    :param history_ttl: seconds a channel's history lives after its last
        message or read.
    """

    def __init__(
        self,
        url: RedisAddress,
        namespace: Namespace,
        hub: IChannelHub,
        reactor: Any,
        timeout: float = 5.0,
        ping_interval: float = 30.0,
        retry_max_delay: float = 30.0,
        max_message_size: int = 1024 * 1024,
        subscribe: str = "pattern",
        history_size: int = 0,
        history_ttl: float = 300.0,
    ) -> None:
        super().__init__()
        if subscribe not in ("pattern", "channels"):
            raise ValueError("subscribe must be pattern or channels")
        self.subscribe = subscribe
        self.url = url
        self.namespace = namespace
        self.hub = hub
        self.timeout = timeout
        self.max_message_size = max_message_size
        self.description = str(url)
        #: the history policy this node writes into Redis (see HistoryLibrary)
        self.library = HistoryLibrary(namespace.name, history_size, history_ttl, sharded=False)
        self._clock: IReactorTime = reactor
        self._subscribed_once = False
        self.subscriber: RedisSubscriberProtocol | None = None
        endpoint = url.endpoint(reactor, timeout)
        # each connection's failed tries are logged once, in our words; the
        # publishing and history connections only while the subscriber works
        # (when it fails too, its line says it all)
        def alone() -> bool:
            return self.subscriber is not None

        reports = (RetryLog(self.description), RetryLog(self.description, " (publishing)", alone),
                   RetryLog(self.description, " (history reads)", alone))
        self._sub_backoff, self._pub_backoff, self._read_backoff = (
            Backoff(maximum=retry_max_delay, report=report) for report in reports)
        self._sub = _private.QuietClientService(ReportingEndpoint(endpoint, reports[0]), _SubscriberFactory(self),
                                                retryPolicy=self._sub_backoff, clock=reactor)
        self._sub.setServiceParent(self)
        self._pub = _private.QuietClientService(ReportingEndpoint(endpoint, reports[1]), _PublisherFactory(self),
                                                retryPolicy=self._pub_backoff, clock=reactor)
        self._pub.setServiceParent(self)
        # history replays have a connection of their own: a page being read never delays a publish
        self._read = _private.QuietClientService(ReportingEndpoint(endpoint, reports[2]),
                                                 _PublisherFactory(self, self._read_backoff, publishes=False),
                                                 retryPolicy=self._read_backoff, clock=reactor)
        self._read.setServiceParent(self)
        # Sentinel: the service that follows the master's switches runs with the link
        follower = getattr(url, "follower", None)
        if follower is not None:
            follower(reactor, timeout, ping_interval, retry_max_delay).setServiceParent(self)
        #: messages received from Redis for this node's channels
        self.messages = 0
        #: times the subscription was lost and made again
        self.reconnects = 0
        #: seconds from reading a batch off Redis to its last socket write
        self.fanout_latency = Histogram()
        #: channels and patterns the subscriber connection holds, as Redis
        #: last reported (by channel: two per channel, raw and history)
        self.subscriptions = 0
        #: SUBSCRIBE and UNSUBSCRIBE commands sent (by channel)
        self.subscribe_commands = 0
        self.unsubscribe_commands = 0
        #: messages that came for channels just unsubscribed, dropped
        self.stale_messages = 0
        #: by channel: the connection that follows the hub's channels
        self._following: RedisSubscriberProtocol | None = None
        #: channels opened or closed this turn, in order
        self._changed: dict[bytes, None] = {}
        self._update: Any = None
        #: when_subscribed callers waiting for a flush or a connection
        self._later: list[Deferred[None]] = []
        self._ping = LoopingCall(self._send_pings)
        self._ping.clock = reactor
        self._ping_interval = ping_interval
        if not HIREDIS:
            _log.warn("hiredis is not installed: Redis parsing is several times slower")

    def startService(self) -> None:
        _log.info("connecting to Redis at {url}", url=self.description)
        if self.subscribe == "channels":
            self.hub.watch(self)
        # nothing is subscribed yet: history read now may miss what comes before the subscription
        self.hub.broker_lost()
        super().startService()
        if self._ping_interval > 0:
            self._ping.start(self._ping_interval, now=False)

    def stopService(self) -> Deferred[None]:
        if self._ping.running:
            self._ping.stop()
        self.hub.unwatch(self)
        if self._update is not None and self._update.active():
            self._update.cancel()
        self._update = None
        self._changed.clear()
        d: Deferred[None] = super().stopService()
        return d

    # -- IBroker

    def is_connected(self) -> bool:
        return self.subscriber is not None

    def publish(self, key: bytes, message: bytes) -> Deferred[int]:
        channel = self.namespace.redis_channel(key)
        d: Deferred[Any] = self._pub.whenConnected(failAfterFailures=1)
        d.addCallback(lambda p: p.whenConnected())
        d.addCallback(lambda p: p.publish(channel, message))
        d.addTimeout(self.timeout, self._clock)
        return d

    def publish_history(self, key: bytes, message: bytes, size: int, ttl: float) -> Deferred[str]:
        """
        Append ``message`` to ``key``'s history stream and publish it with its
        offset, in one call of the history function this node loaded (the
        policy in Redis, which ``size`` and ``ttl`` stand in for where Redis
        has no functions); fires with the offset.
        """
        stream, epoch = history.redis_keys(self.namespace.name, key)
        channel = history.history_channel(self.namespace.name, key)
        return self.library.publish(self.execute, self.eval, [key, message],
                                    [stream, epoch], [channel, message, size, max(1, int(ttl))])

    def execute(self, command: str, *args: Any) -> Deferred[Any]:
        """
        Run one Redis command on the publishing connection (for the parts that
        keep state in Redis, like presence); fails after ``timeout`` seconds
        or at once while no connection is ready.
        """
        d: Deferred[Any] = self._pub.whenConnected(failAfterFailures=1)
        d.addCallback(lambda p: p.whenConnected())
        d.addCallback(lambda p: p.execute_command(command, *args))
        d.addTimeout(self.timeout, self._clock)
        return d

    def eval(self, script: str, keys: list[Any], args: list[Any], service: ClientService | None = None
             ) -> Deferred[Any]:
        """Run a Lua ``script`` on the publishing connection (or ``service``'s), like :meth:`execute`."""
        d: Deferred[Any] = (service or self._pub).whenConnected(failAfterFailures=1)
        d.addCallback(lambda p: p.whenConnected())
        d.addCallback(lambda p: p.eval(script, keys, args))
        d.addTimeout(self.timeout, self._clock)
        return d

    def tail(self, key: bytes, count: int) -> Deferred[list[tuple[str, bytes]]]:
        """The last ``count`` messages of ``key``'s history with their offsets, oldest first (the admin page)."""
        d: Deferred[Any] = self.eval(history.TAIL_SCRIPT, list(history.redis_keys(self.namespace.name, key)),
                                     [count], self._read)
        return d.addCallback(history.tail_from_script)

    def replay(self, key: bytes, since: str | None, limit: int) -> Deferred[history.Replay]:
        """
        The latest offset of ``key``'s history and, with ``since``, a page of
        the messages after it, read on the history connection; fails with
        :class:`~sockdrawer.core.history.HistoryReset` when history cannot
        cover ``since``.
        """
        return read_history(lambda keys, args: self.eval(history.REPLAY_SCRIPT, keys, args, self._read),
                            history.redis_keys(self.namespace.name, key), since, limit, self.library.ttl)

    def when_subscribed(self, key: bytes) -> Deferred[None]:
        """
        A Deferred that fires once the node's subscription covers channel
        ``key`` as the hub has it now, for a caller that reads the channel's
        history and must not miss what is published between that read and
        the subscription: by pattern, once subscribed (at once while
        connected); by channel, once Redis confirmed the commands that carry
        this turn's changes, ``key``'s among them (after a reconnect, the
        new connection's first SUBSCRIBE).
        """
        d: Deferred[None] = Deferred()
        if self.subscribe == "pattern":
            if self.subscriber is not None:
                d.callback(None)
            else:
                self._later.append(d)
        elif self._following is None or key in self._changed:
            # not written yet: at the end of the turn, or on the next connection
            self._later.append(d)
        else:
            self._following.notify_confirmed(d)
        return d

    def _release_later(self, protocol: RedisSubscriberProtocol) -> None:
        later, self._later = self._later, []
        for d in later:
            protocol.notify_confirmed(d)

    def unconfirmed(self) -> int:
        """
        By channel: Redis channels subscribed or unsubscribed and not yet
        confirmed by Redis, plus channels changed this turn and not yet sent
        (0 once Redis holds exactly the hub's channels).
        """
        following = self._following
        return 0 if following is None else following._outstanding + len(self._changed)

    # -- IChannelObserver (by channel): every change of a reactor turn in one command

    def _apply_changes(self, changed: dict[bytes, None]) -> None:
        # with no connection following, the next one subscribes to the
        # hub's channels as they are then
        if self._following is not None:
            self._following.update_channels(changed)
            self._release_later(self._following)

    # -- link state, called by the protocol

    def _channels_connection(self, protocol: RedisSubscriberProtocol) -> None:
        self._following = protocol
        self._release_later(protocol)

    def _subscribed(self, protocol: RedisSubscriberProtocol) -> None:
        self.subscriber = protocol
        if not protocol.by_channel:
            self.subscriptions = 2
            later, self._later = self._later, []
            for d in later:
                d.callback(None)
        self._sub_backoff.reset()
        if self._subscribed_once:
            self.reconnects += 1
        # messages published while the link was down (or before it first
        # subscribed, for history read meanwhile) never reached us
        self.hub.broker_gap()
        again = "re" if self._subscribed_once else ""
        self._subscribed_once = True
        if protocol.by_channel:
            _log.info(
                "{again}subscribed to {count} channel(s) of {name!r} on Redis at {url}",
                again=again,
                # the nodes' own keys (control, presence events) are no channel of a user
                count=sum(1 for c in protocol.subscribed or () if b"//" not in c) // 2,
                name=self.namespace.name,
                url=self.description,
            )
            return
        _log.info(
            "{again}subscribed to {pattern} on Redis at {url}",
            again=again,
            pattern=self.namespace.pattern.decode("utf-8"),
            url=self.description,
        )

    def _lost(self, protocol: RedisSubscriberProtocol, why: Failure) -> None:
        if self._following is protocol:
            self._following = None
            self.subscriptions = 0
            # what this connection would have confirmed, the next one will
            self._later.extend(d for _, d in protocol._waiters or ())
            protocol._waiters = None
        if self.subscriber is protocol:
            self.subscriber = None
            self.subscriptions = 0
            self.hub.broker_lost()
            if self.running:
                _log.warn(
                    "lost the Redis link to {url} ({reason}); reconnecting",
                    url=self.description,
                    reason=why.getErrorMessage(),
                )
                if protocol.full_reads >= _BEHIND:
                    _log.warn(
                        "the link dropped while this node was behind on Redis ({reads} full reads in a "
                        "row): Redis probably closed it at its 'client-output-buffer-limit pubsub', and "
                        "the messages queued for this node are lost. The node cannot keep up with the "
                        "publish rate: add nodes, or raise that limit to ride out bursts.",
                        reads=protocol.full_reads,
                    )

    def _send_pings(self) -> None:
        for service in (self._sub, self._pub, self._read):
            d = service.whenConnected(failAfterFailures=1)
            d.addCallback(_ping)
            # A timed-out PING aborts the connection (txredisapi), which makes
            # ClientService reconnect; nothing else to do here.
            d.addErrback(lambda f: None)


