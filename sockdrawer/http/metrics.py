"""
Prometheus metrics for one service, through prometheus-client.

The hot path only adds to plain integers (per batch, never per socket; see
:mod:`sockdrawer.stats`); this collector turns them into metric families
when Prometheus scrapes ``GET /metrics``.  Every service has its own
registry, so several services in one process do not mix.  No metric has a
per-channel label: channels are unbounded.

The exposition is rendered in the reactor thread with
``prometheus_client.generate_latest``: prometheus-client's own Twisted
resource runs the collection in a thread pool, where reading counters that
the reactor thread is changing would race.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from sockdrawer.core.stats import Histogram


class MetricsSource(Protocol):
    """What the metrics read on the node (the service provides it): its parts' own counters."""

    #: the WebSocket factory (sockets, handshakes, refusals, deliveries, limits)
    factory: Any
    #: the broker (connected, messages, reconnects, subscriptions, ...)
    broker: Any
    #: the hub (fan-out turns)
    hub: Any
    #: the listener registry (errors)
    listeners: Any
    #: messages published into the node, by source
    published: dict[str, int]
    #: the connect and subscribe proxies (``answers`` by outcome, ``in_flight``), or ``None``
    connect_proxy: Any
    subscribe_proxy: Any
    #: the webhook sender (``sent``, ``failures``, ``queued``, ``queue.dropped``), or ``None``
    webhook: Any
    #: the Pusher HTTP API (``requests`` by outcome), or ``None``
    pusher_api: Any

    def channel_count(self) -> int:
        """Channels with sockets or listeners."""

#: the label values of ``sockdrawer_messages_total{source=...}``
SOURCES = ("redis", "api", "listener", "service")


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, buckets=histogram.cumulative(), sum_value=histogram.total)


class ServiceCollector(Collector):
    """Collects a node's counters (a :class:`MetricsSource`)."""

    def __init__(self, service: MetricsSource) -> None:
        self._service = service

    def collect(self) -> Iterator[Metric]:
        svc = self._service
        factory = svc.factory
        yield GaugeMetricFamily("sockdrawer_sockets", "Open WebSocket connections and event streams",
                                value=factory.open_sockets)
        yield GaugeMetricFamily("sockdrawer_pending_handshakes", "Connections in their opening handshake",
                                value=factory.pending)
        yield GaugeMetricFamily("sockdrawer_channels", "Channels with at least one socket or listener",
                                value=svc.channel_count())
        yield CounterMetricFamily("sockdrawer_connections", "TCP connections accepted on the WebSocket port",
                                  value=factory.connections_total)
        refusals = CounterMetricFamily("sockdrawer_handshake_refusals", "Refused opening handshakes, by HTTP status",
                                       labels=["status"])
        for status, count in sorted(factory.refusals.items()):
            refusals.add_metric([str(status)], count)
        yield refusals
        messages = CounterMetricFamily("sockdrawer_messages", "Messages that entered the node, by where they came "
                                       "from", labels=["source"])
        counts = dict(svc.published)
        counts["redis"] = getattr(svc.broker, "messages", 0)
        for source in SOURCES:
            messages.add_metric([source], counts.get(source, 0))
        yield messages
        yield CounterMetricFamily("sockdrawer_deliveries", "Messages times sockets they were handed to",
                                  value=factory.stats.deliveries)
        yield CounterMetricFamily("sockdrawer_bytes_sent", "Bytes of fanned-out frames handed to sockets",
                                  value=factory.stats.bytes_sent)
        yield CounterMetricFamily("sockdrawer_slow_cutoffs", "Sockets cut off for reading too slowly (1008)",
                                  value=factory.slow_cut_offs)
        for kind, proxy in (("connect", svc.connect_proxy), ("subscribe", svc.subscribe_proxy)):
            if proxy is None:
                continue
            answers = CounterMetricFamily(f"sockdrawer_{kind}_proxy_answers", f"The {kind} proxy's verdicts, by "
                                          "outcome", labels=["outcome"])
            for outcome in ("admitted", "401", "403", "unavailable"):
                answers.add_metric([outcome], proxy.answers.get(outcome, 0))
            yield answers
            yield GaugeMetricFamily(f"sockdrawer_{kind}_proxy_in_flight", f"{kind.capitalize()} proxy requests "
                                    "waiting for an answer", value=proxy.in_flight)
        pusher = factory.pusher
        if pusher is not None:
            yield GaugeMetricFamily("sockdrawer_pusher_connections", "Open Pusher protocol connections (in "
                                    "sockdrawer_sockets too)", value=len(pusher.sessions))
            api = svc.pusher_api
            if api is not None:
                requests = CounterMetricFamily("sockdrawer_pusher_api_requests", "Pusher HTTP API requests, by "
                                               "outcome", labels=["outcome"])
                for outcome in ("ok", "400", "401", "503"):
                    requests.add_metric([outcome], api.requests.get(outcome, 0))
                yield requests
        hook = svc.webhook
        if hook is not None:
            yield CounterMetricFamily("sockdrawer_webhook_sent", "Lifecycle events this node delivered to --webhook",
                                      value=hook.sent)
            yield CounterMetricFamily("sockdrawer_webhook_failures", "Webhook requests that failed (the event is "
                                      "tried again)", value=hook.failures)
            yield CounterMetricFamily("sockdrawer_webhook_dropped", "Lifecycle events not queued: the queue was "
                                      "at --webhook-queue-max", value=hook.queue.dropped)
            yield GaugeMetricFamily("sockdrawer_webhook_queue", "Lifecycle events waiting in the queue (all nodes', "
                                    "as last read)", value=hook.queued)
        control = factory.control
        commands = CounterMetricFamily("sockdrawer_control_commands", "Control commands this node acted on, by op",
                                       labels=["op"])
        for op in ("disconnect", "unsubscribe"):
            commands.add_metric([op], control.commands.get(op, 0))
        yield commands
        yield CounterMetricFamily("sockdrawer_control_connections", "Connections of this node the control "
                                  "commands reached", value=control.affected)
        streams = factory.streams
        yield GaugeMetricFamily("sockdrawer_event_streams", "Open Server-Sent Events streams (in sockdrawer_sockets "
                                "too)", value=streams.open_streams)
        yield CounterMetricFamily("sockdrawer_event_stream_deliveries", "Messages times the event streams they "
                                  "were written to", value=streams.stats.deliveries)
        yield CounterMetricFamily("sockdrawer_event_stream_cutoffs", "Event streams cut off for reading too slowly",
                                  value=streams.cut_offs)
        yield CounterMetricFamily("sockdrawer_rate_limited", "Sockets closed for sending too many frames (1008)",
                                  value=factory.rate_limited)
        yield CounterMetricFamily("sockdrawer_frames_received", "Frames received from sockets",
                                  value=factory.frames_received)
        yield CounterMetricFamily("sockdrawer_listener_errors", "Listener handler failures",
                                  value=svc.listeners.errors)
        yield GaugeMetricFamily("sockdrawer_redis_connected", "1 while the Redis subscription is live, else 0",
                                value=1 if svc.broker.is_connected() else 0)
        yield CounterMetricFamily("sockdrawer_redis_reconnects", "Times the Redis subscription was made again",
                                  value=getattr(svc.broker, "reconnects", 0))
        broker = svc.broker
        subscriptions = getattr(broker, "subscriptions", None)
        if subscriptions is not None:
            yield GaugeMetricFamily("sockdrawer_redis_subscriptions", "Redis channels and patterns the node's "
                                    "subscriber holds, as Redis last counted them (--subscribe channels: two per "
                                    "channel with sockets or listeners)", value=subscriptions)
            sent = CounterMetricFamily("sockdrawer_redis_commands", "SUBSCRIBE and UNSUBSCRIBE commands sent "
                                       "(--subscribe channels; one each per reactor turn at most)",
                                       labels=["command"])
            sent.add_metric(["subscribe"], getattr(broker, "subscribe_commands", 0))
            sent.add_metric(["unsubscribe"], getattr(broker, "unsubscribe_commands", 0))
            yield sent
            yield CounterMetricFamily("sockdrawer_redis_stale_messages", "Messages Redis sent for channels the "
                                      "node had just unsubscribed from, dropped",
                                      value=getattr(broker, "stale_messages", 0))
        latency = getattr(svc.broker, "fanout_latency", None)
        if latency is not None:
            yield _histogram("sockdrawer_fanout_latency_seconds",
                             "From reading a batch off Redis to its last socket write", latency)
        shard_states = getattr(broker, "shard_states", None)
        if shard_states is not None:  # --redis-cluster
            masters = GaugeMetricFamily("sockdrawer_redis_cluster_masters", "Masters of the Redis Cluster slot map, "
                                        "by whether the node's subscription on each is live", labels=["state"])
            states = list(shard_states().values())
            masters.add_metric(["subscribed"], states.count(True))
            masters.add_metric(["down"], states.count(False))
            yield masters
            yield CounterMetricFamily("sockdrawer_redis_slot_map_changes", "Times the node read a changed "
                                      "Redis Cluster slot map (the first read included)",
                                      value=getattr(broker, "map_changes", 0))
        turns = getattr(svc.hub, "turns", None)
        if turns is not None:
            yield _histogram("sockdrawer_fanout_turn_seconds", "Duration of each fan-out in the reactor", turns)


def registry_for(service: MetricsSource) -> CollectorRegistry:
    """A registry with the service's collector (and nothing process-global)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(service))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The text exposition and its content type."""
    body: bytes = generate_latest(registry)
    return body, CONTENT_TYPE_LATEST
