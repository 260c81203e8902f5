"""
Running listener handlers inside the server: loading listener classes,
subscribing them to the hub, and calling their handlers safely.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .interfaces import Batch, IChannelHub, ISink
from .subscriber import BROKER, Source, Subscriber


class ListenerLoadError(ValueError):
    """A ``--listener`` value that does not name a usable listener class."""


def load_listener_class(spec: str) -> type[Subscriber]:
    """
    Import a listener class from ``"package.module:ClassName"``.

    :raises ListenerLoadError: with a one-line reason.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ListenerLoadError(f"listener {spec!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ListenerLoadError(
            f"cannot import listener module {module_name!r}: {type(e).__name__}: {e}"
        ) from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ListenerLoadError(f"module {module_name!r} has no {attr!r}") from None
    if not (isinstance(obj, type) and issubclass(obj, Subscriber)):
        raise ListenerLoadError(f"listener {spec!r} is not a subclass of sockdrawer.Subscriber")
    return obj


def _decode(message: bytes) -> str | bytes:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        return message


@implementer(ISink)
class _ChannelSink:
    """Feeds the broker's messages on one channel to the registry."""

    receivers = 1

    def __init__(self, registry: ListenerRegistry, channel: str) -> None:
        self._registry = registry
        self._source = Source(BROKER, channel)

    def receive(self, batch: Batch) -> None:
        for message in batch.messages:
            self._registry.dispatch(self._source, _decode(message))

    def __repr__(self) -> str:
        return f"<listener sink {self._source.channel!r}>"


#: a handler call that holds the reactor longer than this is logged
BLOCKING_WARNING = 0.1
#: after a handler's first traceback, its failures are counted and logged
#: once per this many seconds
FAILURE_SUMMARY_INTERVAL = 60.0


class _FailureLog:
    """
    Logs the first failure of each handler with its traceback, then only a
    count per :data:`FAILURE_SUMMARY_INTERVAL`, so a handler that raises on
    every frame cannot flood the log.
    """

    _log = Logger(namespace="sockdrawer.listeners")

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self._seen: set[str] = set()
        self._suppressed: dict[str, int] = {}
        self._summary: Any = None
        #: every failure so far
        self.count = 0

    def failed(self, handler: str, failure: Failure, source: Source) -> None:
        self.count += 1
        if handler not in self._seen:
            self._seen.add(handler)
            self._log.failure(
                "listener handler {handler} failed on channel {channel!r} ({kind}); further failures of this "
                "handler are counted and logged once a minute",
                failure,
                handler=handler,
                channel=source.channel,
                kind=source.kind,
            )
            return
        self._suppressed[handler] = self._suppressed.get(handler, 0) + 1
        if self._summary is None:
            clock = self._clock
            if clock is None:
                from twisted.internet import reactor as clock
            self._summary = clock.callLater(FAILURE_SUMMARY_INTERVAL, self._report)

    def _report(self) -> None:
        self._summary = None
        counts, self._suppressed = self._suppressed, {}
        for handler, count in counts.items():
            self._log.error("listener handler {handler} failed {count} more times in the last minute",
                            handler=handler, count=count)

    def stop(self) -> None:
        if self._summary is not None and self._summary.active():
            self._summary.cancel()
        self._summary = None
        if self._suppressed:
            self._report()


class ListenerRegistry:
    """
    The listener instances of one service, and the handlers per channel.

    :param listeners: listener classes, ``"module:Class"`` strings, or
        ready-made :class:`Subscriber` instances; one instance per class is
        made, in the order given.
    :param clock: the reactor, for the once-a-minute failure counts.
    """

    _log = Logger()

    def __init__(self, listeners: Iterable[str | type[Subscriber] | Subscriber] = (), clock: Any = None) -> None:
        self.instances: list[Subscriber] = []
        self._handlers: dict[str, list[tuple[Callable[..., Any], bool]]] = {}
        self._authorizers: dict[str, list[Callable[[Source], Any]]] = {}
        self._sinks: dict[bytes, _ChannelSink] = {}
        self._failures = _FailureLog(clock)
        for spec in listeners:
            if isinstance(spec, str):
                spec = load_listener_class(spec)
            instance = spec() if isinstance(spec, type) else spec
            self.instances.append(instance)
            veto = getattr(instance, "authorize", None)
            for channel, methods in type(instance).handlers.items():
                for name, takes_source in methods:
                    self._handlers.setdefault(channel, []).append(
                        (getattr(instance, name), takes_source)
                    )
                if callable(veto) and veto not in self._authorizers.get(channel, ()):
                    self._authorizers.setdefault(channel, []).append(veto)

    @property
    def errors(self) -> int:
        """Handler (and authorize) failures so far."""
        return self._failures.count

    def has_authorizers(self) -> bool:
        """Whether any listener defines ``authorize``."""
        return bool(self._authorizers)

    def authorize(self, source: Source) -> Deferred[bool] | None:
        """
        Ask every listener of ``source.channel`` that defines
        ``authorize(source)`` whether the socket may open.  A handler that
        raises or fails counts as a refusal (and is logged).

        :return: ``None`` when no listener of the channel decides, else a
            Deferred firing with whether all of them allow it.
        """
        vetoes = self._authorizers.get(source.channel)
        if not vetoes:
            return None
        decisions = []
        for veto in vetoes:
            d = maybeDeferred(_call_maybe_coroutine, veto, source)
            d.addErrback(self._veto_failed, veto, source)
            decisions.append(d)
        return gatherResults(decisions).addCallback(lambda results: all(r is True for r in results))

    def _veto_failed(self, failure: Failure, veto: Callable[..., Any], source: Source) -> bool:
        self._failures.failed(_name(veto), failure, source)
        return False

    def channels(self) -> Sequence[str]:
        """The channels that have at least one handler."""
        return list(self._handlers)

    def attach(self, hub: IChannelHub, publish: Callable[[str | bytes, str], Any]) -> None:
        """Give each listener the hub and publisher, and subscribe to the hub."""
        for instance in self.instances:
            instance.attach(publish, hub)
        for channel in self._handlers:
            key = channel.encode("utf-8")
            sink = self._sinks[key] = _ChannelSink(self, channel)
            hub.subscribe(key, sink)

    def detach(self, hub: IChannelHub) -> None:
        """Unsubscribe from the hub."""
        for key, sink in self._sinks.items():
            hub.unsubscribe(key, sink)
        self._sinks.clear()
        self._failures.stop()

    def dispatch(self, source: Source, message: str | bytes) -> list[Deferred[Any]]:
        """
        Run every handler of ``source.channel`` on ``message``.

        A handler that raises, or whose Deferred or coroutine fails, is logged
        with its traceback (the first time; then counted) and gives no
        result.  A call that holds the reactor longer than
        :data:`BLOCKING_WARNING` seconds is logged as a warning naming the
        handler: while it runs, no socket of the node is served.

        :return: one Deferred per handler, in registration order, firing with
            the handler's result (``None`` for none or for a failure).
        """
        results: list[Deferred[Any]] = []
        for handler, takes_source in self._handlers.get(source.channel, ()):
            started = time.monotonic()
            try:
                try:
                    result = handler(message, source) if takes_source else handler(message)
                finally:
                    held = time.monotonic() - started
                    if held > BLOCKING_WARNING:
                        self._log.warn(
                            "listener handler {handler} held the reactor for {ms:.0f} ms on channel {channel!r}: "
                            "no socket is served meanwhile; return a Deferred or use deferToThread for slow work",
                            handler=_name(handler), ms=held * 1000, channel=source.channel,
                        )
                if isinstance(result, Deferred):
                    d = result
                elif hasattr(result, "__await__"):
                    d = ensureDeferred(result)
                else:
                    results.append(succeed(result))
                    continue
            except Exception:
                self._failures.failed(_name(handler), Failure(), source)
                results.append(succeed(None))
                continue
            d.addErrback(self._handler_failed, handler, source)
            results.append(d)
        return results

    def _handler_failed(self, failure: Failure, handler: Callable[..., Any], source: Source) -> None:
        self._failures.failed(_name(handler), failure, source)
        return None


def _call_maybe_coroutine(func: Callable[..., Any], *args: Any) -> Any:
    result = func(*args)
    if hasattr(result, "__await__") and not isinstance(result, Deferred):
        return ensureDeferred(result)
    return result


def _name(handler: Callable[..., Any]) -> str:
    owner = getattr(handler, "__self__", None)
    prefix = type(owner).__qualname__ + "." if owner is not None else ""
    return prefix + getattr(handler, "__name__", repr(handler))
