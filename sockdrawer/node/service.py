"""
The one place that wires the hub, the broker (Redis or embedded), the
listeners, the WebSocket server and the HTTP API into a service.
"""

from __future__ import annotations

import functools
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockdrawer.brokers.cluster import ClusterLink
from sockdrawer.brokers.eventqueue import RedisEventQueue
from sockdrawer.brokers.redis import RedisLink
from sockdrawer.brokers.sentinel import SentinelMaster
from sockdrawer.brokers.url import RedisURL
from sockdrawer.config import Settings, endpoint_string
from sockdrawer.core.channels import Namespace, validate_channel
from sockdrawer.core.control import CONTROL_KEY
from sockdrawer.core.history import PAGE_MESSAGES, MemoryHistory
from sockdrawer.core.hub import EmbeddedBroker, MemoryChannelHub, history_reader
from sockdrawer.core.interfaces import IBroker, IChannelHub
from sockdrawer.core.lifecycle import Lifecycle, MemoryEventQueue, PusherLifecycle
from sockdrawer.core.listeners import ListenerRegistry, redis_claim
from sockdrawer.core.presence import MemoryPresence, RedisPresence
from sockdrawer.core.pusher.presence import PusherPresence
from sockdrawer.core.v1 import PresenceService
from sockdrawer.http.admin import AdminFeed
from sockdrawer.http.api import ApiOptions, ApiResource, ApiSite, ConnectionLimit
from sockdrawer.http.metrics import registry_for, render
from sockdrawer.http.proxy import ConnectProxy
from sockdrawer.http.pusher_api import PusherApi
from sockdrawer.http.webhooks import PusherWebhookSender, WebhookSender
from sockdrawer.node.census import Census
from sockdrawer.transports.websocket.control import matching
from sockdrawer.transports.websocket.factory import SockDrawerServerFactory
from sockdrawer.transports.websocket.options import WebSocketOptions

_log = Logger(namespace="sockdrawer")


class ListeningService(Service):
    """
    Listens on a server endpoint while running.

    Unlike ``StreamServerEndpointService`` it keeps the listening port
    reachable (:meth:`when_listening`), and a listen failure raises from
    :meth:`startService` when it happens synchronously (as for TCP), so
    ``twistd`` stops with the error instead of running without its port.

    :param description: a server endpoint string.
    :param factory: the protocol factory.
    :param reactor: the reactor.
    """

    port: IListeningPort | None = None
    #: the endpoint to listen on instead of ``serverFromString(description)``
    #: (``--workers``: a :class:`~sockdrawer.workers.ReusePortEndpoint`)
    endpoint: IStreamServerEndpoint | None = None
    #: under twistd: a listen failure ends the process with a one-line
    #: message instead of a traceback
    exit_on_failure = False

    #: what is served, for the log line once listening: ``"ws"`` or ``"http"``
    scheme = "http"
    #: what follows host and port in that line's URL
    url_suffix = ""

    def __init__(self, description: str, factory: IProtocolFactory, reactor: Any) -> None:
        self.description = description
        self.factory = factory
        self._reactor = reactor
        self._waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor
        endpoint = self.endpoint if self.endpoint is not None else serverFromString(reactor, self.description)
        failed_at_once: list[Failure] = []
        self._starting = True
        endpoint.listen(self.factory).addCallbacks(self._listened, self._listen_failed, errbackArgs=(failed_at_once,))
        self._starting = False
        if failed_at_once:  # as with TCP: raise to whoever started the service
            if self.exit_on_failure:
                # one line of ours, then exit status 1 (a message in SystemExit would reach the
                # log as a line of "stderr")
                _log.error("cannot listen on {endpoint}: {why}", endpoint=self.description,
                           why=failed_at_once[0].getErrorMessage())
                raise SystemExit(1)
            failed_at_once[0].raiseException()

    def _listen_failed(self, failure: Failure, failed_at_once: list[Failure]) -> None:
        if self._starting:
            failed_at_once.append(failure)
            return
        _log.failure("cannot listen on {endpoint}", failure, endpoint=self.description)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.errback(failure)

    def _listened(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        _log.info("listening on {url}", url=listening_url(
            self.scheme, port, self.url_suffix, tls=self.description.split(":", 1)[0].lower() in ("ssl", "tls")
        ))
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(port)
        return port

    def when_listening(self) -> Deferred[IListeningPort]:
        """A Deferred that fires with the listening port."""
        if self.port is not None:
            return defer.succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()


def listening_url(scheme: str, port: IListeningPort, suffix: str = "", tls: bool = False) -> str:
    """
    A URL a person can paste for a listening port: ``ws://0.0.0.0:8020/<channel>``,
    ``http://127.0.0.1:8021``, ``ws+unix:///run/sd.sock``.
    """
    address = port.getHost()
    host = getattr(address, "host", None)
    if host is None:  # a UNIX socket
        return f"{scheme}+unix://{getattr(address, 'name', address)!s}"
    if ":" in host:
        host = f"[{host}]"
    if tls:
        scheme += "s"
    return f"{scheme}://{host}:{getattr(address, 'port', 0)}{suffix}"


class WebSocketService(ListeningService):
    """
    The WebSocket listener, with a graceful stop: stop accepting, close every
    open socket with ``close_code`` (1012 "service restart" by default),
    spread evenly over ``drain_window`` seconds, wait up to
    ``shutdown_timeout`` seconds more for them to close, then drop the rest.
    """

    factory: SockDrawerServerFactory
    scheme = "ws"
    url_suffix = "/<channel>"

    def __init__(self, description: str, factory: SockDrawerServerFactory, shutdown_timeout: float,
                 reactor: Any, drain_window: float = 0.0, close_code: int = 1012) -> None:
        super().__init__(description, factory, reactor)
        self.shutdown_timeout = shutdown_timeout
        self.drain_window = drain_window
        self.close_code = close_code

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        try:
            yield super().stopService()
            connections = list(self.factory.connections)
            if not connections:
                return
            window = self.drain_window
            _log.info("closing {count} sockets with {code}, over {window} s", count=len(connections),
                      code=self.close_code, window=window)
            all_closed = self.factory.when_all_closed()
            clock = self.factory.clock
            step = window / len(connections)
            for i, proto in enumerate(connections):
                if i == 0 or not step:
                    proto.close_for_shutdown(self.close_code)
                else:
                    clock.callLater(i * step, proto.close_for_shutdown, self.close_code)
            all_closed.addTimeout(window + self.shutdown_timeout, clock)
            try:
                yield all_closed
            except defer.TimeoutError:
                pass
            for proto in list(self.factory.connections):
                # dropConnection does nothing once Autobahn thinks the socket
                # closed, while a loseConnection may wait on a backlog forever
                transport = proto.transport
                if transport is not None:
                    transport.abortConnection()
            # aborted connections are gone one reactor turn later
            gone = self.factory.when_all_closed().addTimeout(1.0, clock)
            try:
                yield gone
            except defer.TimeoutError:
                pass
        except Exception:
            _log.failure("error while closing sockets")


class SockDrawerService(MultiService):
    """
    A complete sockdrawer node, ready to be added to a Twisted application::

        from sockdrawer.service import SockDrawerService

        svc = SockDrawerService(port="tcp:8020", redis="redis://localhost:6379/0")
        svc.setServiceParent(application)
        ...
        svc.publish("hello", channel="news")   # through the broker, to every node

    :param settings: a :class:`Settings`; keyword arguments override its fields.
    :param reactor: the reactor to use; the global one when ``None``.
    :raises ValueError: for a bad setting.

    :ivar hub: the :class:`IChannelHub` sockets and listeners subscribe to.
    :ivar broker: the :class:`IBroker` (Redis link or embedded broker).
    :ivar factory: the WebSocket server factory.
    :ivar listeners: the :class:`ListenerRegistry` with listener instances.
    """

    def __init__(self, settings: Settings | None = None, reactor: Any = None, **overrides: Any) -> None:
        super().__init__()
        base = settings or Settings()
        unknown = sorted(set(overrides) - set(base.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r} (keyword arguments are Settings field names, "
                             f"e.g. max_message_size, listeners, allowed_origins)")
        settings = base.replace(**overrides)
        self.settings = settings.validate()
        if reactor is None:
            from twisted.internet import reactor
        check_endpoint("--port", settings.port, reactor)
        if settings.api_enabled:
            assert settings.api is not None
            check_endpoint("--api", settings.api, reactor)
        self.namespace = Namespace(settings.name)
        self.hub: IChannelHub = MemoryChannelHub()
        self._reactor = reactor
        self.listeners = ListenerRegistry(settings.listeners, clock=reactor)
        #: messages published into the node, by source (Redis counts its own)
        self.published = {"api": 0, "listener": 0, "service": 0}
        self.broker: IBroker
        # what the single-Redis link and the cluster link take alike
        link_options: dict[str, Any] = dict(
            reactor=reactor,
            timeout=settings.redis_timeout,
            ping_interval=settings.redis_ping_interval,
            retry_max_delay=settings.redis_retry_max,
            max_message_size=settings.max_publish_size,
            history_size=settings.history_size,
            history_ttl=settings.history_ttl,
        )
        if settings.redis or settings.sentinel:
            # with --sentinel, the link connects to the master the sentinels name, and follows it
            where = RedisURL.parse(settings.redis) if settings.redis else SentinelMaster.from_options(
                settings.sentinel, settings.sentinel_master or "", password=settings.sentinel_master_password,
                sentinel_password=settings.sentinel_password)
            link = RedisLink(where, self.namespace, self.hub,
                             subscribe=settings.subscribe, **link_options)
            link.setServiceParent(self)
            self.broker = link
            store: MemoryPresence | RedisPresence = RedisPresence(link.eval, settings.name,
                                                                  settings.presence_timeout)
        elif settings.redis_cluster:
            cluster = ClusterLink([RedisURL.parse(seed) for seed in settings.redis_cluster], self.namespace,
                                  self.hub, **link_options)
            cluster.setServiceParent(self)
            self.broker = cluster
            store = cluster.presence_store(settings.presence_timeout)
        else:
            history = MemoryHistory(settings.history_size, settings.history_ttl) if settings.history_size else None
            self.broker = EmbeddedBroker(self.hub, history)
            store = MemoryPresence(self.hub.deliver)
        #: who is on each channel, for v1 subscriptions with presence; stopped
        #: before the link (children stop in reverse), so its last leaves go out
        self.presence = PresenceService(store, self.hub, reactor, settings.presence_timeout)
        self.presence.setServiceParent(self)
        #: asks the app's backend about each handshake without a token (--connect-proxy)
        self.connect_proxy = (ConnectProxy(settings.connect_proxy, settings.proxy_timeout,
                                           settings.proxy_max_concurrent, settings.proxy_header, reactor)
                              if settings.connect_proxy else None)
        #: lifecycle events (--webhook): told by the transports, queued (in Redis, or here), posted by the sender
        self.lifecycle: Lifecycle | None = None
        self.webhook: WebhookSender | None = None
        queue: Any
        if settings.webhook:
            if isinstance(self.broker, (RedisLink, ClusterLink)):
                queue = RedisEventQueue(self.broker, settings.name, settings.webhook_queue_max, reactor,
                                        snapshot=lambda: self.lifecycle.snapshot() if self.lifecycle else [])
                queue.setServiceParent(self)
            else:
                queue = MemoryEventQueue(settings.webhook_queue_max)
            self.lifecycle = Lifecycle(queue, reactor)
            self.webhook = WebhookSender(queue, settings.webhook, settings.webhook_secret, settings.webhook_timeout,
                                         reactor)
            self.webhook.setServiceParent(self)
        #: Pusher's webhooks (--pusher-webhook): the same machinery, another queue, Pusher's format and signature
        self.pusher_hooks: PusherLifecycle | None = None
        self.pusher_webhook: PusherWebhookSender | None = None
        app = settings.pusher_app()
        if settings.pusher_webhook and app is not None:
            if isinstance(self.broker, (RedisLink, ClusterLink)):
                queue = RedisEventQueue(self.broker, settings.name, settings.webhook_queue_max, reactor,
                                        snapshot=lambda: self.pusher_hooks.snapshot() if self.pusher_hooks else [],
                                        kind="pusher-hooks")
                queue.setServiceParent(self)
            else:
                queue = MemoryEventQueue(settings.webhook_queue_max)
            self.pusher_hooks = PusherLifecycle(queue, reactor)
            self.pusher_webhook = PusherWebhookSender(queue, settings.pusher_webhook, app.key, app.secret,
                                                      settings.webhook_timeout, reactor)
            self.pusher_webhook.setServiceParent(self)
        self.factory = SockDrawerServerFactory(
            self.hub,
            self.listeners.dispatch if self.listeners.channels() else None,
            websocket_options(settings, self.connect_proxy, lambda user: self.census.others(user), self.lifecycle,
                              publish=lambda key, message: self.publish_key(key, message),
                              pusher_hooks=self.pusher_hooks),
            clock=reactor,
            authorize=self.listeners.authorize if self.listeners.has_authorizers() else None,
        )
        #: asks the app's backend about each v1 subscribe (--subscribe-proxy)
        self.subscribe_proxy = (ConnectProxy(settings.subscribe_proxy, settings.proxy_timeout,
                                             settings.proxy_max_concurrent, (), reactor, grants=False,
                                             what="subscribe proxy")
                                if settings.subscribe_proxy else None)
        hosts = (self.factory.sessions, self.factory.streams.sessions)  # the v1 sessions of sockets and of streams
        for host in hosts:
            if self.subscribe_proxy is not None:
                host.subscribe_proxy = functools.partial(self.subscribe_proxy.ask, browser_headers={})
            host.presence = self.presence
            if settings.history_size:
                # a replay reads pages of this many messages (and PAGE_BYTES), one at a time per socket
                host.history = history_reader(self.broker, PAGE_MESSAGES, clock=reactor)
        if self.factory.pusher is not None:  # Pusher presence channels on the same presence
            self.factory.pusher.presence = PusherPresence(self.presence, self.hub, reactor)
        #: connections by channel across every node (GET /channels)
        self.census = Census(self.factory.census, self.broker if isinstance(self.broker, RedisLink) else None,
                             self.namespace.name, reactor,
                             users=(lambda: dict(self.factory.per_user)) if settings.max_connections_per_user else None,
                             info=(lambda: self.admin.last if self.admin is not None else {}))
        self.census.setServiceParent(self)
        self.websocket = WebSocketService(
            endpoint_string(settings.port, settings.backlog), self.factory, settings.shutdown_timeout, reactor,
            drain_window=settings.drain_window, close_code=settings.drain_close_code,
        )
        self.metrics = registry_for(self)
        self.api: ListeningService | None = None
        #: what the admin page (GET /admin on the API port) shows, a second at a time
        self.admin: AdminFeed | None = None
        if settings.api_enabled:
            self.admin = AdminFeed(self.admin_figures, self.census.nodes, lambda: self.channels(None), reactor,
                                   hub=self.hub if isinstance(self.hub, MemoryChannelHub) else None)
            self.admin.setServiceParent(self)
            assert settings.api is not None
            pusher = self.factory.pusher
            if pusher is not None:
                self.pusher_api = PusherApi(pusher.app, self, reactor, settings.max_channel_length,
                                            members=pusher.presence.members if pusher.presence else None)
            options = ApiOptions(api_key=settings.api_key, metrics_public=settings.metrics_public,
                                 max_channel_length=settings.max_channel_length,
                                 max_publish_size=settings.max_publish_size, pusher=self.pusher_api,
                                 admin=self.admin)
            registry = self.metrics
            site = ApiSite(ApiResource(self, options, lambda: render(registry)), settings.max_publish_size,
                           settings.api_timeout, clock=reactor)
            limited = ConnectionLimit(site, settings.api_max_connections)
            self.api = ListeningService(endpoint_string(settings.api), limited, reactor)
            # added before the WebSocket listener, so it stops after it:
            # /ready and /metrics answer while sockets drain
            self.api.setServiceParent(self)
        self.websocket.setServiceParent(self)

    #: True from the start of a stop: /ready answers 503
    draining = False
    #: the Pusher HTTP API (with --pusher-key and the API on)
    pusher_api: PusherApi | None = None
    #: connections by channel and by user across every node
    census: Census

    def startService(self) -> None:
        self.draining = False
        self._started = self._reactor.seconds()
        claim = None
        if isinstance(self.broker, (RedisLink, ClusterLink)) and self.listeners.has_once_handlers():
            # once handlers: the nodes race for each broker message in Redis
            claim = redis_claim(self.broker.execute, self.namespace.name, _node_name())
        self.listeners.attach(self.hub, self._listener_publish, claim)
        _log.info(
            "sockdrawer starting: WebSocket on {port}, API {api}, broker {broker}, namespace {name!r}, "
            "{count} listener(s)",
            port=self.websocket.description,
            api=f"on {self.api.description}" if self.api else "off",
            broker=self.broker.description,
            name=self.namespace.name,
            count=len(self.listeners.instances),
        )
        super().startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        """
        Drain, then stop: ``/ready`` answers 503 at once; sockets are served
        for ``drain_delay`` more seconds (for load balancers to notice), then
        closed (see :class:`WebSocketService`); once they are, the API and
        the broker link stop.
        """
        self.draining = True
        delay = self.settings.drain_delay
        if delay > 0 and self.factory.connections:
            _log.info("draining: /ready answers 503; closing sockets in {delay} s", delay=delay)
            yield task.deferLater(self._reactor, delay, lambda: None)
        # the sockets first: the API answers (/ready with 503) until they are closed, then
        # stops with the rest (MultiService would stop every part at once)
        yield defer.maybeDeferred(self.websocket.stopService)
        for hooks in (self.lifecycle, self.pusher_hooks):
            if hooks is not None and isinstance(hooks.queue, RedisEventQueue):
                yield hooks.queue.close()  # the sockets' last events into Redis, before the link stops
        yield super().stopService()
        self.listeners.detach(self.hub)
        if self.factory.freezer is not None:
            self.factory.freezer.stop()  # the collector walks everything again

    def admin_figures(self) -> dict[str, Any]:
        """This node's figures for the admin page (totals; the page's feed makes rates of them)."""
        factory = self.factory
        return {
            "node": self.census.node, "uptime": self._reactor.seconds() - self._started,
            "sockets": factory.open_sockets, "channels": self.channel_count(),
            "subscriptions": sum(len(g.members) for g in factory.v1_groups.values()),
            "deliveries": factory.stats.deliveries + factory.streams.stats.deliveries,
            "messages": getattr(self.hub, "messages", 0),
            "broker": self.broker.description, "broker_connected": self.broker.is_connected(),
            "history_size": self.settings.history_size, "history_ttl": self.settings.history_ttl,
            "presence_timeout": self.settings.presence_timeout,
        }

    _started = 0.0

    def ready(self) -> tuple[bool, str]:
        """
        Whether the node can serve new sockets (``GET /ready``), and why not:
        ``"starting"``, ``"broker down"`` or ``"draining"``.
        """
        if self.draining:
            return False, "draining"
        if not self.running or self.websocket.port is None:
            return False, "starting"
        if not self.broker.is_connected():
            return False, "broker down"
        return True, "ready"

    def _listener_publish(self, message: str | bytes, channel: str = "") -> Deferred[int]:
        self.published["listener"] += 1
        return self._publish(message, channel)

    def publish(self, message: str | bytes, channel: str = "") -> Deferred[int]:
        """
        Publish ``message`` on ``channel`` through the broker: with Redis,
        every node's sockets get it; with the embedded broker, this node's.

        :param message: ``str`` (sent as UTF-8) or ``bytes``.
        :param channel: the channel, without namespace; ``""`` is the root.
        :return: a Deferred firing with what the broker reports, or failing
            with :class:`ValueError` for a bad channel or an oversized message.
        """
        self.published["service"] += 1
        return self._publish(message, channel)

    def _publish(self, message: str | bytes, channel: str) -> Deferred[int]:
        try:
            key = validate_channel(channel, self.settings.max_channel_length)
        except ValueError as e:
            return defer.fail(e)
        if isinstance(message, str):
            message = message.encode("utf-8")
        elif not isinstance(message, bytes):
            return defer.fail(TypeError("message must be str or bytes"))
        return self.publish_key(key, message)

    def channels(self, pattern: str | None) -> Deferred[dict[str, int]]:
        """Connections by channel across every node, for the channels matching ``pattern``."""
        d: Deferred[dict[str, int]] = self.census.read(pattern)
        return d

    def control(self, payload: bytes) -> Deferred[Any]:
        """Publish a control command (:mod:`sockdrawer.core.control`) to every node, this one included."""
        return defer.maybeDeferred(self.broker.publish, CONTROL_KEY, payload)

    def publish_key(self, key: bytes, message: bytes) -> Deferred[int]:
        """:meth:`publish` for an already validated channel key."""
        if len(message) > self.settings.max_publish_size:
            return defer.fail(
                ValueError(f"message over the limit of {self.settings.max_publish_size} bytes")
            )
        size = self.settings.history_size
        if size:
            # with history: the broker reports the message's offset
            kept: Deferred[Any] = defer.maybeDeferred(
                self.broker.publish_history, key, message, size, self.settings.history_ttl)
            return kept
        d: Deferred[int] = defer.maybeDeferred(self.broker.publish, key, message)
        return d

    @defer.inlineCallbacks
    def when_listening(self) -> Any:
        """
        A Deferred firing with ``{"websocket": port, "api": port or None}``
        once both are listening (useful with ``tcp:0``).
        """
        ws = yield self.websocket.when_listening()
        api = (yield self.api.when_listening()) if self.api is not None else None
        return {"websocket": ws, "api": api}

    def history_tail(self, key: bytes, count: int) -> Deferred[list[tuple[str, bytes]]]:
        """The last ``count`` messages kept for channel ``key`` (none without ``--history-size``)."""
        if not self.settings.history_size:
            return defer.succeed([])
        broker: Any = self.broker  # every broker has tail() (not in IBroker: only the admin page reads it)
        d: Deferred[list[tuple[str, bytes]]] = defer.maybeDeferred(broker.tail, key, count)
        return d

    def connections(self, user: str | None, client: str | None) -> list[dict[str, Any]]:
        """This node's open connections of ``user``, or with id ``client`` (GET /connections)."""
        return matching(self.factory, user, client)

    def presence_entries(self, key: bytes) -> Deferred[list[dict[str, Any]]]:
        """The presence entries of channel ``key`` (for ``GET /presence/<channel>``)."""
        return self.presence.entries(key)

    @property
    def broker_description(self) -> str:
        """The broker's address, without credentials."""
        return str(self.broker.description)

    def channel_count(self) -> int:
        """The channels with sockets or listeners (not the hub's internal keys, like presence events')."""
        # a channel name never starts with "/"; internal keys do
        return sum(1 for key in self.hub.channels() if not key.startswith(b"/"))

    def state(self) -> dict[str, Any]:
        """What ``GET /health`` and ``GET /ready`` report."""
        ready, why = self.ready()
        return {
            "status": "ok" if self.broker.is_connected() else "degraded",
            "ready": ready,
            "reason": why,
            "broker": self.broker.description,
            "broker_connected": self.broker.is_connected(),
            "sockets": len(self.factory.connections),
            "channels": self.channel_count(),
            **({"shards": self.broker.shard_states()} if isinstance(self.broker, ClusterLink) else {}),
        }


def websocket_options(settings: Settings, proxy: ConnectProxy | None = None,
                      user_connections: Any = None, lifecycle: Lifecycle | None = None,
                      publish: Any = None, pusher_hooks: Any = None) -> WebSocketOptions:
    """What the WebSocket transport reads of ``settings``, with the token verifier built once."""
    values = {name: getattr(settings, name) for name in WebSocketOptions.names()}
    return WebSocketOptions(verifier=settings.token_verifier(), connect_proxy=proxy.ask if proxy else None,
                            user_connections=user_connections, lifecycle=lifecycle,
                            pusher=settings.pusher_app(), publish=publish, pusher_hooks=pusher_hooks, **values)


def _node_name() -> str:
    """This process, for operators reading Redis keys: ``host:pid``."""
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def check_endpoint(option: str, description: str | int, reactor: Any) -> None:
    """
    :raises ValueError: ``"--port: bad endpoint 'x': <why>"`` when
        ``description`` is not a server endpoint Twisted can parse.
    """
    try:
        serverFromString(reactor, endpoint_string(description))
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{option}: bad endpoint {description!r}: {detail}") from None

