"""
The Redis Cluster broker (``--redis-cluster``): Redis 7 sharded pub/sub.

A sharded channel lives on the shard that owns its hash slot, and
``SPUBLISH`` sends a message only to the nodes of that shard, so a cluster
carries pub/sub traffic the way it carries keys: spread over its masters.
Sharded pub/sub has no pattern form, so the link always subscribes per
channel, following the hub (:class:`~sockdrawer.interfaces.IChannelObserver`).

The pieces:

- a *control* connection to any node (the seeds, then every node the
  cluster reported), which reads the slot map (``CLUSTER SLOTS``);
- per master, a :class:`ShardSubscriberProtocol` connection that
  ``SSUBSCRIBE``\\ s the channels of its slots, and a command connection for
  ``SPUBLISH``, history and the commands and scripts of presence and
  ``@on(once=True)`` claims, each routed to the master of its first key;
- every connection is kept by a :class:`~twisted.application.internet.ClientService`
  with :class:`~sockdrawer.redislink.Backoff`, and pinged.

When slots move (a failover, resharding), Redis tells the subscriber with a
``sunsubscribe`` for each of their channels, a command gets ``MOVED``, or a
master's connection drops: the link reads the slot map again (and again,
backing off, until it changes or every master is back), connects to the new
masters, moves each channel's subscription to its new owner, and then calls
:meth:`~sockdrawer.interfaces.IChannelHub.broker_gap`, so that ``sockdrawer.v1``
sockets catch up from history.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import txredisapi
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer import _private
from sockdrawer.brokers import slots as _slots
from sockdrawer.brokers.linkparts import (
    Backoff,
    BatchedChannelChanges,
    HistoryLibrary,
    ReportingEndpoint,
    RetryLog,
    _ping,
    read_history,
)
from sockdrawer.brokers.shards import (
    ShardedPresence,
    ShardSubscriberProtocol,
    _CommandFactory,
    _configure,
    _FactoryMixin,
    _key_bytes,
)
from sockdrawer.brokers.slotmap import Address, FollowsSlotMap
from sockdrawer.brokers.url import RedisURL
from sockdrawer.core import history
from sockdrawer.core.channels import Namespace
from sockdrawer.core.interfaces import IBroker, IChannelHub, IChannelObserver
from sockdrawer.core.stats import Histogram

_log = Logger(namespace="sockdrawer.redis")



class _ShardSubscriberFactory(_FactoryMixin, txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = ShardSubscriberProtocol

    def __init__(self, link: ClusterLink, shard: _Shard) -> None:
        super().__init__()
        self.link = link
        self.shard = shard
        self.backoff = shard.sub_backoff
        _configure(self, shard.url, link.timeout)

    def buildProtocol(self, addr: Any) -> ShardSubscriberProtocol:
        p: ShardSubscriberProtocol = super().buildProtocol(addr)
        p.link = self.link
        p.shard = self.shard
        p.hub = self.link.hub
        p.namespace = self.link.namespace
        p.max_message_size = self.link.max_message_size
        return p


@implementer(IStreamClientEndpoint)
class _AnyNodeEndpoint:
    """Connects to the next of the link's known nodes at each attempt (the control connection)."""

    def __init__(self, link: ClusterLink) -> None:
        self._link = link
        self._next = 0
        #: the address of the last attempt
        self.address: Address | None = None

    def connect(self, factory: Any) -> Deferred[Any]:
        candidates = self._link._candidates()
        address = candidates[self._next % len(candidates)]
        self._next += 1
        self.address = address
        url = self._link._node_url(address)
        # the password is the seed's (every node has the same); the address, for the logs, this node's
        factory.url = url
        d: Deferred[Any] = url.endpoint(self._link._reactor, self._link.timeout).connect(factory)
        return d


class _Shard(MultiService):
    """One master: its subscriber connection and its command connection."""

    def __init__(self, link: ClusterLink, address: Address) -> None:
        super().__init__()
        self.address = address
        self.node = f"{address[0]}:{address[1]}"
        self.url = link._node_url(address)
        endpoint = self.url.endpoint(link._reactor, link.timeout)
        # failed tries said once each; the command connection's only while the subscriber works
        sub_report = RetryLog(str(self.url))
        pub_report = RetryLog(str(self.url), " (commands)", lambda: self.following is not None)
        self.sub_backoff = Backoff(maximum=link.retry_max_delay, report=sub_report)
        self.pub_backoff = Backoff(maximum=link.retry_max_delay, report=pub_report)
        self.sub = _private.QuietClientService(ReportingEndpoint(endpoint, sub_report),
                                               _ShardSubscriberFactory(link, self), retryPolicy=self.sub_backoff,
                                               clock=link._reactor)
        self.sub.setServiceParent(self)
        library, node = link.library, self.node
        self.pub = _private.QuietClientService(ReportingEndpoint(endpoint, pub_report),
                                               _CommandFactory(self.url, link.timeout, self.pub_backoff,
                                                               lambda p: library.load(p, node)),
                                               retryPolicy=self.pub_backoff, clock=link._reactor)
        self.pub.setServiceParent(self)
        #: the subscriber connection, once past AUTH (its channels sent)
        self.following: ShardSubscriberProtocol | None = None
        #: no longer a master in the slot map: stopping
        self.retired = False

    def __repr__(self) -> str:
        return f"<shard {self.node}>"


@implementer(IBroker, IChannelObserver)
class ClusterLink(FollowsSlotMap, BatchedChannelChanges, MultiService):
    """
    The Redis Cluster broker: subscribes each hub channel (its raw Redis
    channel ``<name>/<channel>`` and its history channel ``<name>#/<channel>``)
    with ``SSUBSCRIBE`` on the master that owns its slot, and publishes with
    ``SPUBLISH`` there.

    The changes of one reactor turn go out as one write per master (one
    command per slot); a new connection subscribes to everything of its
    slots again.  The link is connected (:meth:`is_connected`) while the
    slot map covers every slot and every master's subscription is
    confirmed.

    History (``--history-size``) works: the stream and epoch keys get the
    hash tag of the history channel (:func:`sockdrawer._slots.history_keys`),
    and the script ``SPUBLISH``\\ es.

    :param seeds: cluster nodes to read the slot map from first (their
        scheme, password and ``ssl_ca_certs`` are used for every node).
    :param namespace: the channel namespace.
    :param hub: where messages go.
    :param reactor: the reactor; the global one when ``None``.
    :param timeout: seconds to connect, and to wait for any reply.
    :param ping_interval: seconds between liveness PINGs (and slot map reads).
    :param retry_max_delay: the longest wait between reconnection attempts
        and between slot map reads while a master is missing.
    :param max_message_size: messages larger than this are dropped (logged).
    :param history_size: messages kept per channel (the policy loaded on
        every master, see :class:`~sockdrawer.redislink.HistoryLibrary`).
    :param history_ttl: seconds a channel's history lives after its last
        message or read.
    :raises ValueError: without seeds, or for a ``unix://`` seed.
    """

    def __init__(
        self,
        seeds: Sequence[RedisURL],
        namespace: Namespace,
        hub: IChannelHub,
        reactor: Any,
        timeout: float = 5.0,
        ping_interval: float = 30.0,
        retry_max_delay: float = 30.0,
        max_message_size: int = 1024 * 1024,
        history_size: int = 0,
        history_ttl: float = 300.0,
    ) -> None:
        super().__init__()
        #: the history policy this node loads on every master (see RedisLink)
        self.library = HistoryLibrary(namespace.name, history_size, history_ttl, sharded=True)
        if not seeds:
            raise ValueError("a Redis Cluster needs at least one seed node")
        for seed in seeds:
            if seed.scheme == "unix":
                raise ValueError("Redis Cluster seed nodes are host:port URLs, not Unix sockets")
        self._reactor = reactor
        self._clock: IReactorTime = reactor
        self.seeds = tuple(seeds)
        self.namespace = namespace
        self.hub = hub
        self.timeout = timeout
        self.retry_max_delay = retry_max_delay
        self.max_message_size = max_message_size
        self.description = "Redis Cluster " + ",".join(f"{u.scheme}://{u.host}:{u.port}" for u in self.seeds)
        #: master address -> shard, for the masters of the current slot map
        self.shards: dict[Address, _Shard] = {}
        #: every node (masters and replicas) of the last slot map
        self._nodes: list[Address] = []
        self._slots: list[_Shard | None] | None = None
        #: slots of the last map that have a master
        self._covered = 0
        self._control_endpoint = _AnyNodeEndpoint(self)
        # the slot map reads say their failed tries while no shard is there to say them
        control_report = RetryLog(self.description, " (slot map reads)", lambda: not self.shards)
        self._control_backoff = Backoff(maximum=retry_max_delay, report=control_report)
        self._control = _private.QuietClientService(ReportingEndpoint(self._control_endpoint, control_report),
                                                    _CommandFactory(self.seeds[0], timeout, self._control_backoff),
                                                    retryPolicy=self._control_backoff, clock=reactor)
        self._control.setServiceParent(self)
        #: how long to wait before reading the slot map again while it is not settled
        self._refresh_backoff = Backoff(initial=0.25, maximum=retry_max_delay)
        self._refresh_call: Any = None
        self._refreshing = False
        self._refresh_again = False
        #: refresh() callers, for the next read to start, and for the one under way
        self._refresh_waiters: list[Deferred[None]] = []
        self._reading_for: list[Deferred[None]] = []
        #: channels Redis dropped (their slot moved) since the last slot map read
        self._moved = False
        self._unchanged_reads = 0
        #: channels opened or closed this turn, in order
        self._changed: dict[bytes, None] = {}
        self._update: Any = None
        #: when_subscribed callers waiting for this turn's changes or a master
        self._later: list[tuple[bytes, Deferred[None]]] = []
        #: connected once, so a later loss of any subscription is a gap
        self._up_once = False
        self._gap = False
        self._ping = LoopingCall(self._tick)
        self._ping.clock = reactor
        self._ping_interval = ping_interval
        #: messages received from Redis for this node's channels
        self.messages = 0
        #: times the subscriptions were whole again after some were lost
        self.reconnects = 0
        #: slot map reads that changed the map
        self.map_changes = 0
        #: sharded channels Redis dropped because their slot moved away
        self.dropped_by_redis = 0
        #: seconds from reading a batch off Redis to its last socket write
        self.fanout_latency = Histogram()
        #: SSUBSCRIBE and SUNSUBSCRIBE commands sent
        self.subscribe_commands = 0
        self.unsubscribe_commands = 0
        #: messages that came for channels just unsubscribed, dropped
        self.stale_messages = 0

    # -- service

    def startService(self) -> None:
        _log.info("connecting to {description}", description=self.description)
        self.hub.watch(self)
        # nothing is subscribed yet: history read now may miss what comes before the subscriptions
        self.hub.broker_lost()
        super().startService()
        self._schedule_refresh(0)
        if self._ping_interval > 0:
            self._ping.start(self._ping_interval, now=False)

    def stopService(self) -> Deferred[None]:
        if self._ping.running:
            self._ping.stop()
        self.hub.unwatch(self)
        for call in (self._update, self._refresh_call):
            if call is not None and call.active():
                call.cancel()
        self._update = self._refresh_call = None
        self._changed.clear()
        later, self._later = self._later, []
        for _, waiting in later:
            waiting.callback(None)
        refreshing, self._refresh_waiters = self._refresh_waiters, []
        for waiting in refreshing:
            waiting.errback(ConnectionError("the Redis Cluster link stopped"))
        d: Deferred[None] = super().stopService()
        return d

    # -- IBroker

    def is_connected(self) -> bool:
        if self._slots is None or not self.shards or self._covered < _slots.SLOTS:
            return False
        for shard in self.shards.values():
            following = shard.following
            if following is None or not following.ready:
                return False
        return True

    @property
    def subscriptions(self) -> int:
        """Sharded channels the node holds, as each master last counted them (two per channel)."""
        return sum(s.following.count for s in self.shards.values() if s.following is not None)

    def shard_states(self) -> dict[str, bool]:
        """``{"host:port": subscribed}`` for each master of the slot map (for ``/health``)."""
        return {s.node: s.following is not None and s.following.ready for s in self.shards.values()}

    def unconfirmed(self) -> int:
        """Channels sent in SSUBSCRIBE or SUNSUBSCRIBE commands not answered yet, or still to send."""
        return len(self._changed) + sum(s.following.unconfirmed() for s in self.shards.values()
                                        if s.following is not None)

    def when_subscribed(self, key: bytes) -> Deferred[None]:
        """
        A Deferred that fires once the node's subscriptions cover channel
        ``key`` as the hub has it now (both its Redis channels confirmed by
        the masters that own them), for a caller that reads the channel's
        history and must not miss what is published between that read and
        the subscription (:func:`sockdrawer.hub.history_reader`).
        """
        d: Deferred[None] = Deferred()
        self._later.append((key, d))
        if key not in self._changed:
            self._release_later()
        return d

    def _release_later(self) -> None:
        """Chain each :meth:`when_subscribed` waiter whose channel's commands are written to their confirmation."""
        later, self._later = self._later, []
        for key, d in later:
            if key in self._changed:
                self._later.append((key, d))
                continue
            following = []
            for name in self._names(key):
                owner = self._owner(name)
                if owner is None or owner.following is None:
                    break
                following.append(owner.following)
            else:
                confirmed = [p.notify_confirmed() for p in dict.fromkeys(following)]
                gatherResults(confirmed).addCallback(lambda _: None).chainDeferred(d)
                continue
            # a master is missing: once it is back
            self._later.append((key, d))

    def publish(self, key: bytes, message: bytes) -> Deferred[int]:
        """``SPUBLISH`` on the master of the channel's slot; fires with the count it reports."""
        channel = self.namespace.redis_channel(key)
        return self._route(channel, lambda p: p.execute_command("SPUBLISH", channel, message))

    def publish_history(self, key: bytes, message: bytes, size: int, ttl: float) -> Deferred[str]:
        """
        Append ``message`` to ``key``'s history stream and ``SPUBLISH`` it with
        its offset, in one call of the history function on the master of the
        history channel's slot (see ``RedisLink.publish_history``); fires
        with the offset.
        """
        stream, epoch = _slots.history_keys(self.namespace.name, key)
        channel = history.history_channel(self.namespace.name, key)
        tag = _slots.hash_tag(channel)
        def fcall(*args: Any) -> Deferred[Any]:
            return self._route(tag, lambda p: p.execute_command(*args))

        return self.library.publish(fcall, self.eval, [tag, message, b"", b"", channel],
                                    [stream, epoch], [channel, message, size, max(1, int(ttl))])

    def tail(self, key: bytes, count: int) -> Deferred[list[tuple[str, bytes]]]:
        """As :meth:`sockdrawer.brokers.redis.RedisLink.tail`, on the cluster's history keys."""
        d: Deferred[Any] = self.eval(history.TAIL_SCRIPT, list(_slots.history_keys(self.namespace.name, key)),
                                     [count])
        return d.addCallback(history.tail_from_script)

    def replay(self, key: bytes, since: str | None, limit: int) -> Deferred[history.Replay]:
        """As :meth:`sockdrawer.brokers.redis.RedisLink.replay`, on the cluster's history keys."""
        return read_history(lambda keys, args: self.eval(history.REPLAY_SCRIPT, keys, args),
                            _slots.history_keys(self.namespace.name, key), since, limit, self.library.ttl)

    def execute(self, command: str, *args: Any) -> Deferred[Any]:
        """
        Run one Redis command on the master of its first argument's slot (the
        key, for the commands sockdrawer runs: ``SET``, ``GET``, ...); fails
        after ``timeout`` seconds, or at once while that master is down.
        """
        routing = _key_bytes(args[0]) if args else b""
        return self._route(routing, lambda p: p.execute_command(command, *args))

    def eval(self, script: str, keys: list[Any], args: list[Any]) -> Deferred[Any]:
        """Run a Lua ``script`` on the master of its first key's slot (all keys must share it)."""
        routing = _key_bytes(keys[0]) if keys else b""
        return self._route(routing, lambda p: p.eval(script, keys, args))

    def presence_store(self, timeout: float) -> ShardedPresence:
        """The presence store of ``sockdrawer.v1`` subscriptions on this cluster."""
        return ShardedPresence(self.eval, self.namespace.name, timeout)

    def _route(self, routing: bytes, run: Callable[[Any], Any], retried: bool = False) -> Deferred[Any]:
        slots = self._slots
        shard = slots[_slots.slot(routing)] if slots is not None else None
        if shard is None:
            return fail(ConnectionError("no Redis Cluster master for that slot (slot map not read yet, "
                                        "or the cluster does not cover it)"))
        d: Deferred[Any] = shard.pub.whenConnected(failAfterFailures=1)
        d.addCallback(lambda p: p.whenConnected())
        d.addCallback(run)
        if not retried:
            d.addErrback(self._moved_retry, routing, run)
            d.addTimeout(self.timeout, self._clock)
        return d

    def _moved_retry(self, failure: Failure, routing: bytes, run: Callable[[Any], Any]) -> Any:
        text = str(failure.value)
        if not (failure.check(txredisapi.ResponseError) and text.startswith(("MOVED ", "ASK "))):
            return failure
        # the slot map is old: read it again, then try once more
        _log.info("Redis Cluster answered {answer}: reading the slot map again", answer=text.split(" ", 1)[0])
        d = self.refresh()
        d.addCallback(lambda _: self._route(routing, run, retried=True))
        return d

    # -- IChannelObserver: every change of a reactor turn in one write per master

    def _apply_changes(self, changed: dict[bytes, None]) -> None:
        self._sync(changed)
        if self._later:
            self._release_later()

    def _names(self, key: bytes) -> tuple[bytes, bytes]:
        namespace = self.namespace
        return namespace.prefix + key, namespace.history_prefix + key

    def _key(self, name: bytes) -> bytes | None:
        namespace = self.namespace
        if name.startswith(namespace.prefix):
            return name[len(namespace.prefix):]
        if name.startswith(namespace.history_prefix):
            return name[len(namespace.history_prefix):]
        return None

    def _owner(self, name: bytes) -> _Shard | None:
        slots = self._slots
        return slots[_slots.slot(name)] if slots is not None else None

    def _sync(self, keys: Iterable[bytes]) -> int:
        """
        Make each connected master's subscriptions to the channels of
        ``keys`` what they should be: held by the owner of their slot while
        the hub has sinks, by nobody otherwise.

        :return: how many Redis channels were subscribed.
        """
        following = [s.following for s in self.shards.values() if s.following is not None]
        if not following:
            return 0
        has_sinks = self.hub.subscribers
        adds: dict[ShardSubscriberProtocol, list[bytes]] = {}
        removes: dict[ShardSubscriberProtocol, list[bytes]] = {}
        for key in keys:
            wanted = bool(has_sinks(key))
            for name in self._names(key):
                owner = self._owner(name) if wanted else None
                for p in following:
                    held = name in p.subscribed
                    should = p.shard is owner
                    if should and not held:
                        adds.setdefault(p, []).append(name)
                    elif held and not should:
                        removes.setdefault(p, []).append(name)
        for p, names in removes.items():
            p.sunsubscribe(names)
        for p, names in adds.items():
            p.ssubscribe(names)
        return sum(len(names) for names in adds.values())

    def _resync(self) -> int:
        """:meth:`_sync` for every channel the hub has or a master holds (after the slot map changed)."""
        keys: dict[bytes, None] = dict.fromkeys(self.hub.channels())
        for shard in self.shards.values():
            if shard.following is not None:
                for name in shard.following.subscribed:
                    key = self._key(name)
                    if key is not None:
                        keys[key] = None
        return self._sync(keys)

    # -- subscriber connections, called by the protocol

    def _sub_connected(self, p: ShardSubscriberProtocol) -> None:
        shard: _Shard = p.shard
        if shard.retired or self.shards.get(shard.address) is not shard:
            p.transport.loseConnection()
            return
        shard.following = p
        names = [name for key in self.hub.channels() for name in self._names(key) if self._owner(name) is shard]
        p.subscribe_all(names)

    def _sub_ready(self, p: ShardSubscriberProtocol) -> None:
        shard = p.shard
        shard.sub_backoff.reset()
        _log.info("subscribed to {count} sharded channel(s) on Redis Cluster master {node}",
                  count=len(p.subscribed), node=shard.node)
        if self._later:
            self._release_later()
        self._check_whole()

    def _confirmed(self) -> None:
        if self._gap or not self._up_once:
            self._check_whole()

    def _check_whole(self) -> None:
        # whole: every master subscribed, nothing unconfirmed, the map settled
        if not self.is_connected() or self.unconfirmed() or self._moved or self._refreshing:
            return
        if not self._up_once:
            self._up_once = True
            _log.info("subscribed on every master of {description} ({count})", description=self.description,
                      count=len(self.shards))
            # history read before every master had subscribed may have missed messages
            self.hub.broker_gap()
            return
        if self._gap:
            self._gap = False
            self.reconnects += 1
            _log.info("every channel is subscribed again on {description}; sockets catch up from history",
                      description=self.description)
            # messages published while some channels were not subscribed never reached us
            self.hub.broker_gap()

    def _lose(self) -> None:
        """Some channels are not covered for a while: the hub hears of it now, and of the gap once whole again."""
        if self._up_once:
            self._gap = True
        self.hub.broker_lost()

    def _sub_lost(self, p: ShardSubscriberProtocol, why: Failure) -> None:
        shard = p.shard
        if shard.following is not p:
            return
        shard.following = None
        if not self.running or shard.retired:
            return
        self._lose()
        _log.warn("lost the Redis Cluster master {node} ({reason}); reading the slot map again",
                  node=shard.node, reason=why.getErrorMessage())
        self._schedule_refresh(0)

    def _dropped_by_redis(self, p: ShardSubscriberProtocol, name: bytes) -> None:
        # a failover or resharding moved the slot away (one call per channel)
        self.dropped_by_redis += 1
        self._lose()
        if not self._moved:
            _log.info("Redis Cluster master {node} dropped sharded channels (their slot moved); reading the "
                      "slot map again", node=p.shard.node)
        self._moved = True
        self._schedule_refresh(0)

    def _refused(self, p: ShardSubscriberProtocol, kind: bytes, names: list[bytes], error: Exception) -> None:
        _log.warn("Redis Cluster master {node} refused {command} of {count} channel(s): {error}",
                  node=p.shard.node, command=kind.decode(), count=len(names), error=str(error))
        if kind == b"SSUBSCRIBE":
            self._lose()
            self._moved = True
            self._schedule_refresh(0)

    def _new_shard(self, address: Address) -> _Shard:
        return _Shard(self, address)

    # -- liveness

    def _tick(self) -> None:
        services = [self._control] + [c for s in self.shards.values() for c in (s.sub, s.pub)]
        for service in services:
            d = service.whenConnected(failAfterFailures=1)
            d.addCallback(_ping)
            # a timed-out PING aborts the connection (txredisapi), which
            # makes ClientService reconnect; nothing else to do here
            d.addErrback(lambda f: None)
        # slots may move without any of our channels in them
        self._schedule_refresh(0)


