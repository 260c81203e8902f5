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

import random
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer import _private
from sockdrawer.brokers import slots as _slots
from sockdrawer.core import history
from sockdrawer.core.channels import Namespace
from sockdrawer.core.interfaces import IBroker, IChannelHub, IChannelObserver
from sockdrawer.core.stats import Histogram

_log = Logger(namespace="sockdrawer.redis")

HIREDIS = txredisapi.RedisProtocol is txredisapi.HiredisProtocol

# Twisted reads at most 64 KiB per doRead (over rediss:// the TLS layer hands
# over at most one 16 KiB record at a time, so this hint stays silent there)
_FULL_READ = 60 * 1024
# that many full reads in a row when the link drops: Redis probably dropped us
_BEHIND = 8

#: most Redis channel names in one SUBSCRIBE or UNSUBSCRIBE command
MAX_CHANNELS_PER_COMMAND = 10_000

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class RedisURL:
    """
    A parsed ``redis://``, ``rediss://`` or ``unix://`` URL.

    Accepted forms (as redis-py accepts them)::

        redis://[[username]:password@]host[:port][/db]
        rediss://[[username]:password@]host[:port][/db][?ssl_ca_certs=/path/ca.pem]
        unix://[[username]:password@]/path/to/redis.sock[?db=0&password=...]

    The database number is accepted and checked, and has no effect: Redis
    pub/sub channels are the same in every database.
    """

    scheme: str
    host: str = "localhost"
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """
        :raises ValueError: with a one-line reason.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad Redis URL: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("Redis URL must start with redis://, rediss:// or unix://")
        query = parse_qs(parts.query)

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else one("password")
        db_text = one("db")
        if scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// Redis URL needs a socket path, e.g. unix:///run/redis.sock")
            host, path = "", unquote(parts.path)
            port = 0
        else:
            if not parts.hostname:
                raise ValueError("Redis URL has no host")
            host, path = parts.hostname, ""
            port = 6379 if port is None else port
            dbpath = parts.path.lstrip("/")
            if dbpath:
                db_text = dbpath
        db = 0
        if db_text is not None:
            if not db_text.isdigit():
                raise ValueError("Redis database number must be a non-negative integer")
            db = int(db_text)
        ca = one("ssl_ca_certs")
        if ca is not None and scheme != "rediss":
            raise ValueError("ssl_ca_certs is only for rediss:// URLs")
        return cls(scheme, host, port, path, db, username, password, ca)

    def endpoint(self, reactor: Any, timeout: float = 5.0) -> IStreamClientEndpoint:
        """The client endpoint that connects to this Redis server."""
        if self.scheme == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.scheme == "redis":
            return tcp
        options = ssl.optionsForClientTLS(self.host, trustRoot=self.trust_root())
        return wrapClientTLS(options, tcp)

    def trust_root(self) -> Any:
        """
        The certificates a ``rediss://`` server must chain to: the PEM file
        in ``ssl_ca_certs``, or the platform's trust store.

        :raises ValueError: for an unreadable file or one without certificates.
        """
        if not self.ssl_ca_certs:
            return ssl.platformTrust()
        try:
            with open(self.ssl_ca_certs, "rb") as f:
                pems = _PEM.findall(f.read())
        except OSError as e:
            raise ValueError(f"cannot read ssl_ca_certs file {self.ssl_ca_certs}: {e.strerror}") from None
        if not pems:
            raise ValueError(f"no PEM certificate in {self.ssl_ca_certs}")
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])

    def __str__(self) -> str:
        """The URL without its password, for logs."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}/{self.db}"


class RedisAddress(Protocol):
    """
    What a :class:`RedisLink` connects to: a :class:`RedisURL`, or a master
    found through Redis Sentinel (:class:`~sockdrawer.sentinel.SentinelMaster`,
    whose ``follower()`` service the link runs as its child).  Its ``str()``
    names it in logs, without the password.
    """

    @property
    def password(self) -> str | None: ...

    @property
    def username(self) -> str | None: ...

    def endpoint(self, reactor: Any, timeout: float = 5.0) -> IStreamClientEndpoint: ...


class SubscriberLink(Protocol):
    """What a :class:`RedisSubscriberProtocol` tells its link (a :class:`RedisLink`, or one per cluster shard)."""

    messages: int
    stale_messages: int
    subscriptions: int
    subscribe_commands: int
    unsubscribe_commands: int
    fanout_latency: Histogram

    def _subscribed(self, protocol: RedisSubscriberProtocol) -> None: ...

    def _channels_connection(self, protocol: RedisSubscriberProtocol) -> None: ...

    def _lost(self, protocol: RedisSubscriberProtocol, why: Failure) -> None: ...


class RedisSubscriberProtocol(txredisapi.SubscriberProtocol):  # type: ignore[misc]
    """
    A txredisapi subscriber that subscribes as soon as the connection is
    ready (after AUTH), and hands every message to the hub.

    By pattern (the default), it PSUBSCRIBEs to the namespace.  By channel
    (:attr:`by_channel`), it SUBSCRIBEs to each channel the hub has sinks for
    (the raw channel and the one carrying messages with history), and
    :meth:`update_channels` follows the hub from there; those commands are
    written as they are and their confirmations counted here, out of
    txredisapi's reply queue (one SUBSCRIBE of n channels gets n replies,
    which that queue would hand to the next caller, such as a PING).

    Everything parsed from one read of the socket is delivered inside one
    :meth:`IChannelHub.hold`, so the hub can send each socket the messages of
    one read in one write.
    """

    hub: IChannelHub
    namespace: Namespace
    link: SubscriberLink | None = None
    max_message_size: int = 0
    #: subscribe per channel (``--subscribe channels``) instead of by pattern
    by_channel: bool = False
    #: by channel, once subscribing: the Redis channels whose last command
    #: on this connection was SUBSCRIBE (Redis runs a connection's commands
    #: in order, so this is what it ends up with); messages on others are
    #: for channels just unsubscribed, and dropped.  ``None`` by pattern.
    subscribed: set[bytes] | None = None
    #: (un)subscribe confirmations still to come
    _outstanding = 0
    #: Redis channels written in (un)subscribe commands, and confirmed, so far
    _sent = 0
    _acked = 0
    #: (value _acked must reach, Deferred) per notify_confirmed caller, in order
    _waiters: deque[tuple[int, Deferred[None]]] | None = None
    #: confirmations still to come for the first SUBSCRIBE on this connection
    _initial = 0

    #: by channel: the commands, their confirmations, and the message reply
    #: (Redis Cluster's sharded pub/sub has its own: SSUBSCRIBE, ...)
    SUBSCRIBE = b"SUBSCRIBE"
    UNSUBSCRIBE = b"UNSUBSCRIBE"
    CONFIRMATIONS = (b"subscribe", b"unsubscribe")
    MESSAGE = b"message"

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        # a connection lost before it was ready (AUTH refused) fails this
        # Deferred: the link has said why already
        self.whenConnected().addCallback(self._subscribe).addErrback(lambda f: None)
        return d

    def _subscribe(self, _: object) -> Deferred[Any] | None:
        if self.by_channel:
            names = [name for key in self.hub.channels() for name in self._names(key) if self._owns(name)]
            self.subscribed = set(names)
            self._initial = self._write(self.SUBSCRIBE, names)
            if self.link is not None:
                self.link._channels_connection(self)
            if not self._initial:
                self._subscribed(None)
            return None
        # raw messages, and messages published with history
        d: Deferred[Any] = self.psubscribe([self.namespace.pattern, self.namespace.history_pattern])
        d.addCallback(self._subscribed)
        d.addErrback(self._subscribe_failed)
        return d

    def _names(self, key: bytes) -> tuple[bytes, bytes]:
        # each channel is two Redis channels: raw messages, and messages with history
        return self.namespace.prefix + key, self.namespace.history_prefix + key

    def _owns(self, name: bytes) -> bool:
        """Whether this connection is the one to subscribe to Redis channel ``name`` (all of them, here)."""
        return True

    def update_channels(self, keys: Iterable[bytes]) -> None:
        """
        By channel: SUBSCRIBE to the Redis channels of those of ``keys``
        that have sinks in the hub now and are not subscribed, UNSUBSCRIBE
        from those that have none (or are not this connection's any more)
        and are; one command each at most (per
        :data:`MAX_CHANNELS_PER_COMMAND` names).
        """
        subscribed = self.subscribed
        if subscribed is None:
            return
        has_sinks = self.hub.subscribers
        owns = self._owns
        wanted: list[bytes] = []
        unwanted: list[bytes] = []
        for key in keys:
            sinks = has_sinks(key)
            for name in self._names(key):
                if sinks and owns(name):
                    if name not in subscribed:
                        subscribed.add(name)
                        wanted.append(name)
                elif name in subscribed:
                    subscribed.discard(name)
                    unwanted.append(name)
        self._write(self.UNSUBSCRIBE, unwanted)
        self._write(self.SUBSCRIBE, wanted)

    def _write(self, command: bytes, names: list[bytes]) -> int:
        if not names or self.transport is None:
            return 0
        commands = [names[start:start + MAX_CHANNELS_PER_COMMAND]
                    for start in range(0, len(names), MAX_CHANNELS_PER_COMMAND)]
        return self._write_commands(command, commands)

    def _write_commands(self, command: bytes, commands: list[list[bytes]]) -> int:
        # all in one write: one send() for the whole batch
        self.transport.write(b"".join(_command(command, *names) for names in commands))
        count = sum(len(names) for names in commands)
        self._outstanding += count
        self._sent += count
        link = self.link
        if link is not None:
            if command == self.SUBSCRIBE:
                link.subscribe_commands += len(commands)
            else:
                link.unsubscribe_commands += len(commands)
        return count

    def replyReceived(self, reply: Any) -> None:
        if self.subscribed is not None:
            if type(reply) is list and len(reply) == 3 and reply[0] in self.CONFIRMATIONS:
                self._confirmed(reply[0], reply[1], reply[2])
                return
            if isinstance(reply, Exception) and self._outstanding:
                self._subscribe_failed(Failure(reply))
                return
        super().replyReceived(reply)

    def notify_confirmed(self, d: Deferred[None]) -> None:
        """By channel: fire ``d`` once Redis confirmed every (un)subscription written so far on this connection."""
        if self._acked >= self._sent:
            d.callback(None)
            return
        if self._waiters is None:
            self._waiters = deque()
        self._waiters.append((self._sent, d))

    def _confirmed(self, kind: bytes, name: bytes, count: Any) -> None:
        if self._outstanding:
            self._outstanding -= 1
        self._acked += 1
        waiters = self._waiters
        while waiters and waiters[0][0] <= self._acked:
            waiters.popleft()[1].callback(None)
        if self.link is not None and isinstance(count, int):
            self.link.subscriptions = count
        if self._initial:
            self._initial -= 1
            if not self._initial:
                self._subscribed(None)

    def _subscribed(self, reply: Any) -> None:
        if self.link is not None:
            self.link._subscribed(self)

    def _subscribe_failed(self, failure: Failure) -> None:
        command = (self.SUBSCRIBE if self.by_channel else b"PSUBSCRIBE").decode()
        _log.warn("{command} failed ({error}); dropping the Redis link to retry", command=command,
                  error=failure.getErrorMessage() or type(failure.value).__name__)
        if self.transport is not None:
            self.transport.loseConnection()

    #: consecutive reads that filled Twisted's read buffer: this node is
    #: behind, and Redis is queueing messages for it
    full_reads = 0

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        started = perf_counter()
        if len(data) >= _FULL_READ:
            self.full_reads += 1
        elif self.full_reads:
            self.full_reads = 0
        hub = self.hub
        hub.hold()
        try:
            if HIREDIS:
                self._parse(data)
            else:
                super().dataReceived(data, unpause)
        finally:
            hub.release()
            link = self.link
            if link is not None:
                # from reading the batch off Redis to its last socket write
                link.fanout_latency.observe(perf_counter() - started)

    def _parse(self, data: bytes) -> None:
        # HiredisProtocol.dataReceived, with a short path for the replies
        # that make up nearly all traffic on this connection: pmessages (by
        # pattern) or messages (by channel), whose parts are already bytes
        # (charset=None) and need none of txredisapi's conversions or
        # transaction bookkeeping.
        reader = _private.hiredis_reader(self)
        if data:
            reader.feed(data)
        prefix = self.namespace.prefix
        cut = len(prefix)
        hprefix = self.namespace.history_prefix
        hcut = len(hprefix)
        limit = self.max_message_size
        deliver = self.hub.deliver
        subscribed = self.subscribed
        kind = self.MESSAGE
        received = stale = 0
        reply = reader.gets()
        while reply is not False:
            if type(reply) is list and len(reply) == 4 and reply[0] == b"pmessage":
                channel, message = reply[2], reply[3]
            elif subscribed is not None and type(reply) is list and len(reply) == 3 and reply[0] == kind:
                channel, message = reply[1], reply[2]
                if channel not in subscribed:
                    stale += 1
                    reply = reader.gets()
                    continue
            else:
                # everything else exactly as HiredisProtocol does it
                _private.dispatch_reply(self, reply)
                reply = reader.gets()
                continue
            if channel.startswith(prefix):
                key = channel[cut:]
                offset = None
            elif channel.startswith(hprefix):
                key = channel[hcut:]
                offset, _, message = message.partition(b"\n")
            else:
                reply = reader.gets()
                continue
            if limit and len(message) > limit:
                self._dropped(key, len(message))
            elif offset is None:
                deliver(key, message)
                received += 1
            else:
                deliver(key, message, offset.decode("ascii", "replace"))
                received += 1
            reply = reader.gets()
        link = self.link
        if link is not None:
            if received:
                link.messages += received
            if stale:
                link.stale_messages += stale

    def messageReceived(self, pattern: Any, channel: bytes, message: bytes) -> None:
        # the pure-Python parser's way in (hiredis takes the path in _parse)
        offset: str | None = None
        key = self.namespace.key_from_redis(channel)
        if key is None:
            if not channel.startswith(self.namespace.history_prefix):
                return
            key = channel[len(self.namespace.history_prefix):]
            raw_offset, _, message = message.partition(b"\n")
            offset = raw_offset.decode("ascii", "replace")
        if self.subscribed is not None and channel not in self.subscribed:
            if self.link is not None:
                self.link.stale_messages += 1
            return
        if self.max_message_size and len(message) > self.max_message_size:
            self._dropped(key, len(message))
            return
        self.hub.deliver(key, message, offset)
        if self.link is not None:
            self.link.messages += 1

    def _dropped(self, key: bytes, size: int) -> None:
        _log.warn(
            "dropped a {size}-byte message on {channel!r}: over the limit of {limit} bytes",
            size=size,
            channel=key,
            limit=self.max_message_size,
        )

    def connectionLost(self, why: Failure = connectionDone) -> None:
        super().connectionLost(why)
        if self.link is not None:
            self.link._lost(self, why)


class _LinkFactoryMixin(_private.ConnectionPoolBypass):
    link: RedisLink

    def connectionError(self, why: str) -> None:
        # txredisapi reports AUTH and SELECT failures here; the connection is
        # then closed and ClientService retries with backoff.
        _log.error("Redis link to {url}: {why}", url=str(self.link.url), why=why)


class _SubscriberFactory(_LinkFactoryMixin, txredisapi.SubscriberFactory):  # type: ignore[misc]
    protocol = RedisSubscriberProtocol

    def __init__(self, link: RedisLink) -> None:
        super().__init__()
        self.link = link
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
    def __init__(self, link: RedisLink) -> None:
        super().__init__(None, None, 1)
        self.link = link
        _configure(self, link)

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        link = self.link
        # ready means AUTH passed: only then does the backoff start over
        ready = p.whenConnected()
        ready.addCallback(lambda _: link._pub_backoff.reset())
        ready.addCallback(lambda _: link.library.load(p, link.description))
        ready.addErrback(lambda f: None)
        return p


def _configure(factory: Any, link: RedisLink) -> None:
    factory.noisy = False
    factory.charset = None
    factory.convertNumbers = False
    factory.password = link.url.password
    factory.username = link.url.username
    factory.replyTimeout = link.timeout
    # SubscriberFactory/RedisFactory report the first AUTH failure through
    # this Deferred; the link logs it instead.
    factory.deferred.addErrback(lambda f: None)


class Backoff:
    """
    How long to wait before each Redis reconnection attempt: the first one
    right away (a healthy link that dropped should lose no more messages than
    it must), then ``initial`` seconds doubling up to ``maximum``, each with
    up to ``jitter`` (a fraction) more at random, never above ``maximum``.

    The count starts over only when the link is usable again (subscribed,
    or for publishing, past AUTH), not at every TCP connect: a wrong
    password backs off like an unreachable server.  Used as a
    ``ClientService`` retry policy (its attempt number is ignored).
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0, jitter: float = 0.25,
                 random: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._random = random
        self.failures = 0

    def __call__(self, attempt: int = 0) -> float:
        n, self.failures = self.failures, self.failures + 1
        if n == 0:
            return 0.0
        base = min(self.maximum, self.initial * self.factor ** min(n - 1, 64))
        return min(self.maximum, base * (1 + self.jitter * self._random()))

    def reset(self) -> None:
        self.failures = 0


class BatchedChannelChanges:
    """
    :class:`IChannelObserver` for links that subscribe per channel: the
    channels opened or closed during one reactor turn are collected, and
    :meth:`_apply_changes` gets them all at the end of the turn, so many
    sockets connecting at once make one command, not one each.
    """

    _clock: Any
    _changed: dict[bytes, None]
    _update: Any

    def channel_opened(self, key: bytes) -> None:
        self._change(key)

    def channel_closed(self, key: bytes) -> None:
        self._change(key)

    def _change(self, key: bytes) -> None:
        self._changed[key] = None
        if self._update is None:
            self._update = self._clock.callLater(0, self._send_changes)

    def _send_changes(self) -> None:
        self._update = None
        changed, self._changed = self._changed, {}
        self._apply_changes(changed)

    def _apply_changes(self, changed: dict[bytes, None]) -> None:
        """Act on the channels whose state changed this turn (read the hub for where they stand now)."""
        raise NotImplementedError


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
        reactor: Any = None,
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
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
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
        self._sub_backoff = Backoff(maximum=retry_max_delay)
        self._pub_backoff = Backoff(maximum=retry_max_delay)
        self._sub = ClientService(endpoint, _SubscriberFactory(self), retryPolicy=self._sub_backoff, clock=reactor)
        self._sub.setServiceParent(self)
        self._pub = ClientService(endpoint, _PublisherFactory(self), retryPolicy=self._pub_backoff, clock=reactor)
        self._pub.setServiceParent(self)
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

    def eval(self, script: str, keys: list[Any], args: list[Any]) -> Deferred[Any]:
        """Run a Lua ``script`` on the publishing connection, like :meth:`execute`."""
        d: Deferred[Any] = self._pub.whenConnected(failAfterFailures=1)
        d.addCallback(lambda p: p.whenConnected())
        d.addCallback(lambda p: p.eval(script, keys, args))
        d.addTimeout(self.timeout, self._clock)
        return d

    def replay(self, key: bytes, since: str | None, limit: int) -> Deferred[history.Replay]:
        """
        The latest offset of ``key``'s history and, with ``since``, the
        messages after it; fails with :class:`~sockdrawer.history.HistoryReset`
        when history cannot cover ``since``.
        """
        stream, epoch_key = history.redis_keys(self.namespace.name, key)
        after = ""
        wanted_epoch: str | None = None
        if since is not None:
            try:
                wanted_epoch, after = history.split_offset(since)
                history.stream_id(after)
            except history.HistoryReset as e:
                return fail(e)
        d = self.eval(history.REPLAY_SCRIPT, [stream, epoch_key],
                      [after, limit, self.library.ttl, wanted_epoch or "", history.PAGE_BYTES])
        d.addCallback(_replay_result, since, wanted_epoch, after, limit)
        return d

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
                count=len(protocol.subscribed or ()) // 2,
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
        for service in (self._sub, self._pub):
            d = service.whenConnected(failAfterFailures=1)
            d.addCallback(_ping)
            # A timed-out PING aborts the connection (txredisapi), which makes
            # ClientService reconnect; nothing else to do here.
            d.addErrback(lambda f: None)


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _replay_result(result: Any, since: str | None, wanted_epoch: str | None, after: str,
                   limit: int) -> history.Replay:
    """:data:`~sockdrawer.history.REPLAY_SCRIPT`'s answer as a Replay; HistoryReset when it cannot cover ``since``."""
    if not result or result[0] is None:
        raise history.HistoryReset("no history")
    epoch, first, last, whole = _text(result[0]), _text(result[1]), _text(result[2]), _text(result[3])
    latest = f"{epoch}:{last}"
    if since is None:
        return history.Replay(latest)
    if wanted_epoch != epoch:
        raise history.HistoryReset("another epoch")
    position = history.stream_id(after)
    if position > history.stream_id(last):
        raise history.HistoryReset("offset from the future")
    if whole != "1" and history.stream_id(first) > position:
        # the cap dropped entries, and maybe some after this position
        raise history.HistoryReset("older than the history")
    pairs = result[4:]
    messages = tuple((f"{epoch}:{_text(pairs[i])}", bytes(pairs[i + 1])) for i in range(0, len(pairs), 2))
    # a page: full (by count or by bytes), unless it ends at the last message
    more = bool(messages) and messages[-1][0] != latest and (
        len(messages) >= limit or sum(len(m) for _, m in messages) >= history.PAGE_BYTES)
    return history.Replay(latest, messages, more)


class HistoryLibrary:
    """
    The history policy (size and TTL) a node writes into Redis, as a Redis 7
    function library (:func:`sockdrawer.history.library_code`), so that
    every publisher (``sockdrawer.Client``, ``FCALL`` from any language,
    this node) keeps the same history without being told the nodes'
    options.  Loaded on every new publishing connection (a replica promoted
    by a failover has it already: functions replicate); replaced, with a
    warning, when another node loaded a different policy.  Where Redis has
    no functions (before 7.0, or an ACL without ``FUNCTION``), the node
    publishes with the equivalent script and its own options.
    """

    def __init__(self, namespace: str, size: int, ttl: float, sharded: bool) -> None:
        self.namespace = namespace
        self.size = size
        self.ttl = max(1, int(ttl))
        self.sharded = sharded
        self.name = history.library_name(namespace)
        self.function = history.function_name(namespace)
        self.code = history.library_code(namespace, size, ttl, sharded)
        self.policy = history.policy_line(namespace, size, ttl, sharded)
        #: whether the function is there to call (None: not known yet)
        self.loaded: bool | None = None
        self._warned = False

    def load(self, protocol: Any, where: str) -> Deferred[bool]:
        """Make sure ``protocol``'s Redis has this policy's library; fires with whether it does."""
        d: Deferred[Any] = protocol.execute_command("FUNCTION", "LIST", "LIBRARYNAME", self.name, "WITHCODE")
        d.addCallback(self._listed, protocol, where)
        d.addCallbacks(self._done, self._failed, errbackArgs=(where,))
        return d

    def _listed(self, listing: Any, protocol: Any, where: str) -> Any:
        theirs = None
        for library in listing or ():
            fields = [_text(v) if isinstance(v, bytes) else v for v in library]
            named = dict(zip(fields[::2], fields[1::2], strict=False))
            if named.get("library_name") == self.name and isinstance(named.get("library_code"), str):
                theirs = history.loaded_policy(named["library_code"])
        if theirs == self.policy:
            return True
        if theirs is not None:
            _log.warn("replacing the history policy {theirs} on Redis at {url} with this node's {ours}: give "
                      "every node of namespace {name!r} the same --history-size and --history-ttl",
                      theirs=theirs, ours=self.policy, url=where, name=self.namespace)
        else:
            _log.info("loaded the history function {function} (history size {size}, ttl {ttl} s) on Redis at "
                      "{url}", function=self.function, size=self.size, ttl=self.ttl, url=where)
        loaded: Deferred[Any] = protocol.execute_command("FUNCTION", "LOAD", "REPLACE", self.code)
        return loaded

    def _done(self, _: object) -> bool:
        self.loaded = True
        return True

    def _failed(self, failure: Failure, where: str) -> bool:
        self.loaded = False
        if not self._warned:
            self._warned = True
            _log.warn("could not load the history function on Redis at {url} ({error}): this node publishes "
                      "with its own --history-size, and other publishers must be given it "
                      "(Client(history_size=...))", url=where, error=failure.getErrorMessage())
        return False

    def publish(self, execute: Callable[..., Deferred[Any]], eval: Callable[..., Deferred[Any]],
                call: list[Any], keys: list[Any], args: list[Any]) -> Deferred[str]:
        """
        Publish with history: ``FCALL`` of the library with ``call`` (the
        channel, or its hash tag on a cluster, then the payload and the
        optional arguments), or, before it is loaded or where it cannot be,
        the script with ``keys`` and ``args``.
        """
        if self.loaded:
            d = execute("FCALL", self.function, 1, *call)
            d.addErrback(self._fcall_failed, eval, keys, args)
        else:
            script = _slots.SHARDED_PUBLISH_SCRIPT if self.sharded else history.PUBLISH_SCRIPT
            d = eval(script, keys, args)
        d.addCallback(_text)
        return d

    def _fcall_failed(self, failure: Failure, eval: Callable[..., Deferred[Any]], keys: list[Any],
                      args: list[Any]) -> Any:
        if "function not found" not in failure.getErrorMessage().lower():
            return failure
        # flushed (FUNCTION FLUSH, a new Redis): the next connection loads it again
        self.loaded = None
        script = _slots.SHARDED_PUBLISH_SCRIPT if self.sharded else history.PUBLISH_SCRIPT
        return eval(script, keys, args)


def _command(*parts: bytes) -> bytes:
    """One Redis command in RESP, an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def _ping(protocol: Any) -> Any:
    return protocol.ping() if protocol.connected else None
