"""
Redis Sentinel (``--sentinel``): the Redis link connects to whichever
server the sentinels name as the master, and follows it through failovers.

- :class:`SentinelMaster` stands where a :class:`~sockdrawer.redislink.RedisURL`
  stands for :class:`~sockdrawer.redislink.RedisLink`: it has the master's
  credentials, a ``str()`` for logs, and :meth:`SentinelMaster.endpoint`.
- :class:`SentinelEndpoint`, on every ``connect()``, asks the sentinels in
  turn (``SENTINEL get-master-addr-by-name``, each within the timeout),
  connects to the address the first one gives, and checks with ``ROLE``
  that this server is a master; otherwise the attempt fails and the link's
  ``ClientService`` tries again with backoff.  The sentinel that answered is
  asked first next time.
- :class:`SwitchWatcher`, a service the link runs, keeps a pub/sub
  connection to one sentinel (the next one after each loss, with backoff)
  subscribed to ``+switch-master``; when the master under our name moves,
  it aborts the link's connections to any other address, and the link
  reconnects (through the endpoint) to the new master.  The link's usual
  bookkeeping follows: ``/ready`` is 503 until it is subscribed again, and
  ``sockdrawer.v1`` subscriptions catch up from history, as after any outage.

Replies are parsed with hiredis (a dependency of sockdrawer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import hiredis
from twisted.application.internet import ClientService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer.brokers.linkparts import Backoff, _command
from sockdrawer.brokers.sentinelwire import (
    Address,
    NotMaster,
    SentinelError,
    _auth,
    _describe,
    _endpoint,
    _QueryFactory,
    _Replies,
    _text,
    _where,
    parse_sentinel,
)
from sockdrawer.brokers.url import RedisURL

_log = Logger(namespace="sockdrawer.sentinel")

class SentinelMaster:
    """
    The master the sentinels know as ``name``: what
    :class:`~sockdrawer.redislink.RedisLink` takes instead of a
    :class:`~sockdrawer.redislink.RedisURL`.

    :param sentinels: the sentinels' addresses (:func:`parse_sentinel`); the
        first one's scheme (``rediss``: TLS) and ``ssl_ca_certs`` are used
        for the master too.
    :param name: the master's name in the sentinels' configuration.
    :param password: the master's password (``AUTH``), if any.
    :param sentinel_password: the sentinels' own password, if any.
    :param username: the master's ACL user, if any.
    :param sentinel_username: the sentinels' ACL user, if any.
    """

    def __init__(self, sentinels: Sequence[RedisURL], name: str, password: str | None = None,
                 sentinel_password: str | None = None, username: str | None = None,
                 sentinel_username: str | None = None) -> None:
        if not sentinels:
            raise ValueError("at least one sentinel is needed")
        if not name or any(c.isspace() for c in name):
            raise ValueError("the master's name must be non-empty, without spaces")
        #: every sentinel, in the order given (the watcher goes round them)
        self.all_sentinels = tuple(sentinels)
        #: the order they are asked in: the last one that answered first
        self.sentinels = list(sentinels)
        self.name = name
        self.password = password
        self.username = username
        self.sentinel_password = sentinel_password
        self.sentinel_username = sentinel_username
        first = sentinels[0]
        self.tls = first.scheme == "rediss"
        self.ssl_ca_certs = first.ssl_ca_certs
        #: master connections past their ROLE check, open now
        self.connections: set[_RoleChecked] = set()
        #: the address the sentinels last named
        self.address: Address | None = None

    @classmethod
    def from_options(cls, sentinels: Sequence[str], master: str, password: str | None = None,
                     sentinel_password: str | None = None) -> SentinelMaster:
        """The master of ``--sentinel`` addresses, ``--sentinel-master`` and their passwords."""
        return cls([parse_sentinel(text) for text in sentinels], master, password=password,
                   sentinel_password=sentinel_password)

    def __str__(self) -> str:
        """For logs: ``redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster``."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}+sentinel://{','.join(_where(u) for u in self.all_sentinels)}/{self.name}"

    def endpoint(self, reactor: Any, timeout: float = 5.0) -> SentinelEndpoint:
        """The client endpoint that connects to the current master."""
        return SentinelEndpoint(self, reactor, timeout)

    def follower(self, reactor: Any, timeout: float = 5.0, ping_interval: float = 30.0,
                 retry_max_delay: float = 30.0) -> SwitchWatcher:
        """The service that follows the master's switches (the link runs it as its child)."""
        return SwitchWatcher(self, reactor, timeout, ping_interval, retry_max_delay)

    def master_url(self, address: Address) -> RedisURL:
        """The master at ``address``, with the sentinels' scheme and CA file."""
        return RedisURL("rediss" if self.tls else "redis", address[0], address[1], ssl_ca_certs=self.ssl_ca_certs)

    # -- asking the sentinels

    @defer.inlineCallbacks
    def locate(self, reactor: Any, timeout: float) -> Any:
        """
        Ask the sentinels in turn where the master is; fires with ``(host,
        port)`` from the first that knows, or fails with
        :class:`SentinelError` saying what each one answered.
        """
        failures: list[str] = []
        for url in list(self.sentinels):
            try:
                reply = yield self._ask(url, reactor, timeout)
            except CancelledError:
                raise
            except Exception as e:
                why = _describe(e)
                failures.append(f"{_where(url)}: {why}")
                _log.warn("Sentinel at {sentinel} did not answer where master {name!r} is ({why}); asking the "
                          "next", sentinel=_where(url), name=self.name, why=why)
                self._last(url)
                continue
            if not (isinstance(reply, list) and len(reply) == 2):
                failures.append(f"{_where(url)}: does not know master {self.name!r}")
                _log.warn("Sentinel at {sentinel} does not know master {name!r}; asking the next",
                          sentinel=_where(url), name=self.name)
                self._last(url)
                continue
            address = (_text(reply[0]), int(reply[1]))
            if self.sentinels[0] is not url:
                self.sentinels.remove(url)
                self.sentinels.insert(0, url)
            if address != self.address:
                _log.info("Sentinel at {sentinel} names {host}:{port} as master {name!r}", sentinel=_where(url),
                          host=address[0], port=address[1], name=self.name)
            self.address = address
            return address
        raise SentinelError(f"no sentinel named a master {self.name!r} ({'; '.join(failures)})")

    def _last(self, url: RedisURL) -> None:
        # a sentinel that failed is asked last next time
        if url in self.sentinels:
            self.sentinels.remove(url)
            self.sentinels.append(url)

    def _ask(self, url: RedisURL, reactor: Any, timeout: float) -> Deferred[Any]:
        commands = []
        if self.sentinel_password is not None:
            commands.append(_auth(self.sentinel_username, self.sentinel_password))
        commands.append(_command(b"SENTINEL", b"get-master-addr-by-name", self.name.encode()))
        factory = _QueryFactory(commands)
        d: Deferred[Any] = _endpoint(url, reactor, timeout).connect(factory)
        d.addCallback(lambda p: p.done)
        d.addTimeout(timeout, reactor)

        def close(result: Any) -> Any:
            if factory.protocol_made is not None and factory.protocol_made.transport is not None:
                factory.protocol_made.transport.abortConnection()
            return result

        d.addBoth(close)
        return d

    # -- following switches

    def drop(self, keep: Address | None) -> int:
        """Abort the master connections to any address but ``keep``; how many."""
        dropped = 0
        for connection in list(self.connections):
            if connection.address != keep and connection.transport is not None:
                connection.transport.abortConnection()
                dropped += 1
        return dropped


@implementer(IStreamClientEndpoint)
class SentinelEndpoint:
    """
    Connects to the master the sentinels name, once ``ROLE`` confirmed it is
    one: the connection is then handed to the protocol ``factory`` builds
    (which may ``AUTH`` again: harmless), and :meth:`connect` fires with it.
    """

    def __init__(self, master: SentinelMaster, reactor: Any, timeout: float) -> None:
        self.master = master
        self.reactor = reactor
        self.timeout = timeout

    @defer.inlineCallbacks
    def connect(self, protocolFactory: IProtocolFactory) -> Any:
        master = self.master
        address = yield master.locate(self.reactor, self.timeout)
        checking = _RoleCheckFactory(master, protocolFactory, address, self.reactor, self.timeout)
        wrapper = yield _endpoint(master.master_url(address), self.reactor, self.timeout).connect(checking)
        protocol = yield wrapper.ready
        return protocol


class _RoleChecked(_Replies):
    """
    ``AUTH`` (with a password) and ``ROLE`` on a new master connection; when
    the server is a master, the real protocol takes the connection over,
    this one passing on what arrives.
    """

    inner: IProtocol | None = None

    def __init__(self, master: SentinelMaster, factory: IProtocolFactory, address: Address, clock: Any,
                 timeout: float) -> None:
        super().__init__()
        self.master = master
        self.wrapped_factory = factory
        self.address = address
        self.clock = clock
        self.timeout = timeout
        self.ready: Deferred[IProtocol] = Deferred(self._cancel)
        self._expected = 0
        self._replies: list[Any] = []
        self._timer: Any = None

    def where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def connectionMade(self) -> None:
        commands = []
        if self.master.password is not None:
            commands.append(_auth(self.master.username, self.master.password))
        commands.append(_command(b"ROLE"))
        self._expected = len(commands)
        self.transport.write(b"".join(commands))
        self._timer = self.clock.callLater(self.timeout, self._fail,
                                           SentinelError(f"no ROLE reply from {self.where()} in time"))

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        super().dataReceived(data)

    def reply(self, reply: Any) -> None:
        if self.inner is not None or self.ready.called:
            return
        self._replies.append(reply)
        if len(self._replies) < self._expected:
            return
        self._stop_timer()
        errors = [r for r in self._replies if isinstance(r, hiredis.ReplyError)]
        role = self._replies[-1]
        if errors:
            self._fail(SentinelError(f"Redis at {self.where()}: {errors[0]}"))
            return
        kind = _text(role[0]) if isinstance(role, list) and role else repr(role)
        if kind != "master":
            _log.warn("Redis at {address}, named master {name!r} by Sentinel, says it is a {role}; trying again",
                      address=self.where(), name=self.master.name, role=kind)
            self._fail(NotMaster(f"Redis at {self.where()} is a {kind}, not the master"))
            return
        inner = self.wrapped_factory.buildProtocol(self.transport.getPeer())
        if inner is None:
            self._fail(SentinelError("the protocol factory built no protocol"))
            return
        self.inner = inner
        self.master.connections.add(self)
        inner.makeConnection(self.transport)
        self.ready.callback(inner)

    def _fail(self, error: Exception) -> None:
        self._stop_timer()
        if not self.ready.called:
            self.ready.errback(error)
        if self.transport is not None:
            self.transport.abortConnection()

    def _cancel(self, d: Deferred[IProtocol]) -> None:
        self._stop_timer()
        if self.transport is not None:
            self.transport.abortConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        self.master.connections.discard(self)
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(reason)


class _RoleCheckFactory(Factory):
    def __init__(self, master: SentinelMaster, factory: IProtocolFactory, address: Address, clock: Any,
                 timeout: float) -> None:
        self.master = master
        self.wrapped_factory = factory
        self.address = address
        self.clock = clock
        self.timeout = timeout
        self.noisy = False

    def buildProtocol(self, addr: Any) -> _RoleChecked:
        p = _RoleChecked(self.master, self.wrapped_factory, self.address, self.clock, self.timeout)
        p.factory = self
        return p


# -- following +switch-master


@implementer(IStreamClientEndpoint)
class _RotatingEndpoint:
    """Each connect() goes to the next sentinel, round the list."""

    def __init__(self, master: SentinelMaster, reactor: Any, timeout: float) -> None:
        self.master = master
        self.reactor = reactor
        self.timeout = timeout
        self.attempts = 0
        self.current: RedisURL = master.all_sentinels[0]

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        sentinels = self.master.all_sentinels
        self.current = sentinels[self.attempts % len(sentinels)]
        self.attempts += 1
        d: Deferred[IProtocol] = _endpoint(self.current, self.reactor, self.timeout).connect(protocolFactory)
        return d


class _Watch(_Replies):
    """
    A sentinel connection that asks where the master is, then subscribes to
    ``+switch-master`` and reports each switch (and PINGs, when subscribed,
    every ``ping_interval`` seconds: no PONG within the timeout drops it).
    """

    def __init__(self, watcher: SwitchWatcher, sentinel: RedisURL) -> None:
        super().__init__()
        self.watcher = watcher
        self.sentinel = sentinel
        self._expected: list[str] = []
        self.address: Address | None = None
        self.subscribed = False
        self._timer: Any = None
        self._pinger: LoopingCall | None = None
        self._pong_due: Any = None

    def connectionMade(self) -> None:
        watcher = self.watcher
        master = watcher.master
        commands = []
        if master.sentinel_password is not None:
            commands.append(_auth(master.sentinel_username, master.sentinel_password))
            self._expected.append("auth")
        commands.append(_command(b"SENTINEL", b"get-master-addr-by-name", master.name.encode()))
        self._expected.append("address")
        commands.append(_command(b"SUBSCRIBE", b"+switch-master"))
        self._expected.append("subscribe")
        self.transport.write(b"".join(commands))
        self._timer = watcher.clock.callLater(watcher.timeout, self._give_up, "no answer in time")

    def _give_up(self, why: str) -> None:
        self._timer = None
        _log.warn("Sentinel at {sentinel}: {why}; dropping the connection", sentinel=_where(self.sentinel), why=why)
        if self.transport is not None:
            self.transport.abortConnection()

    def reply(self, reply: Any) -> None:
        if isinstance(reply, hiredis.ReplyError):
            self._give_up(f"error {reply}")
            return
        if self._expected:
            step = self._expected.pop(0)
            if step == "address" and isinstance(reply, list) and len(reply) == 2:
                self.address = (_text(reply[0]), int(reply[1]))
            elif step == "subscribe":
                self._subscribed()
            return
        if not (isinstance(reply, list) and reply):
            return
        kind = reply[0]
        if kind == b"message" and len(reply) == 3 and reply[1] == b"+switch-master":
            self.watcher._switched(self, _text(reply[2]))
        elif kind == b"pong":
            if self._pong_due is not None and self._pong_due.active():
                self._pong_due.cancel()
            self._pong_due = None

    def _subscribed(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.subscribed = True
        watcher = self.watcher
        if watcher.ping_interval > 0:
            self._pinger = LoopingCall(self._ping)
            self._pinger.clock = watcher.clock
            self._pinger.start(watcher.ping_interval, now=False)
        watcher._watching(self)

    def _ping(self) -> None:
        if self._pong_due is not None or self.transport is None:
            return
        self.transport.write(_command(b"PING"))
        self._pong_due = self.watcher.clock.callLater(self.watcher.timeout, self._give_up, "no PONG in time")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for timer in (self._timer, self._pong_due):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._pong_due = None
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self.watcher._lost(self, reason)


class _WatchFactory(Factory):
    def __init__(self, watcher: SwitchWatcher) -> None:
        self.watcher = watcher
        self.noisy = False

    def buildProtocol(self, addr: Any) -> _Watch:
        p = _Watch(self.watcher, self.watcher.endpoint.current)
        p.factory = self
        return p


class SwitchWatcher(MultiService):
    """
    Keeps a connection to one sentinel (the next one after each loss, with
    capped backoff) subscribed to ``+switch-master``; when the master called
    ``master.name`` switches, or when a new connection finds the sentinels
    naming another address than the one the link is connected to, the
    master connections to any other address are aborted, so the link
    reconnects to the new master.

    :ivar switches: ``+switch-master`` messages seen for our master.
    """

    def __init__(self, master: SentinelMaster, reactor: Any, timeout: float = 5.0,
                 ping_interval: float = 30.0, retry_max_delay: float = 30.0) -> None:
        super().__init__()
        self.master = master
        self.clock = reactor
        self.timeout = timeout
        self.ping_interval = ping_interval
        self.switches = 0
        #: the subscribed sentinel connection, or None
        self.watching: _Watch | None = None
        self.endpoint = _RotatingEndpoint(master, reactor, timeout)
        self.backoff = Backoff(maximum=retry_max_delay)
        self._service = ClientService(self.endpoint, _WatchFactory(self), retryPolicy=self.backoff, clock=reactor)
        self._service.setServiceParent(self)

    def _watching(self, watch: _Watch) -> None:
        self.watching = watch
        self.backoff.reset()
        master = self.master
        _log.info("watching Sentinel at {sentinel} for switches of master {name!r}", sentinel=_where(watch.sentinel),
                  name=master.name)
        if watch.address is not None:
            dropped = master.drop(keep=watch.address)
            if dropped:
                _log.warn("Sentinel at {sentinel} names {host}:{port} as master {name!r}; dropped {count} "
                          "connection(s) to the old one, reconnecting", sentinel=_where(watch.sentinel),
                          host=watch.address[0], port=watch.address[1], name=master.name, count=dropped)

    def _switched(self, watch: _Watch, payload: str) -> None:
        # "<name> <old-ip> <old-port> <new-ip> <new-port>"
        parts = payload.split()
        if len(parts) != 5 or parts[0] != self.master.name:
            return
        try:
            old, new = (parts[1], int(parts[2])), (parts[3], int(parts[4]))
        except ValueError:
            return
        self.switches += 1
        dropped = self.master.drop(keep=new)
        _log.warn("Sentinel at {sentinel}: master {name!r} switched from {old} to {new}; dropped {count} "
                  "connection(s) to reconnect to the new master", sentinel=_where(watch.sentinel),
                  name=self.master.name, old=f"{old[0]}:{old[1]}", new=f"{new[0]}:{new[1]}", count=dropped)

    def _lost(self, watch: _Watch, reason: Failure) -> None:
        if self.watching is watch:
            self.watching = None
            if self.running:
                why = "closed" if reason.check(ConnectionDone) else reason.getErrorMessage()
                _log.warn("lost Sentinel at {sentinel} ({why}); watching the next one", sentinel=_where(watch.sentinel),
                          why=why)
