"""
Running listener handlers inside the server: loading listener classes,
subscribing them to the hub, and calling their handlers safely.
"""

from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, maybeDeferred, succeed
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer.core.channels import printable
from sockdrawer.core.interfaces import Batch, IChannelHub, ISink
from sockdrawer.core.logs import NamedLogger
from sockdrawer.core.subscriber import BROKER, Source, Subscriber


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
        offsets = batch.offsets
        for i, message in enumerate(batch.messages):
            self._registry.dispatch(self._source, _decode(message), offsets[i] if offsets else None)

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

    _log = NamedLogger(namespace="sockdrawer.listeners.ListenerRegistry")

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
            # an application's error, not sockdrawer's: error, not critical
            self._log.failure(
                "listener handler {handler} failed on channel {channel!r} ({kind}); further failures of this "
                "handler are counted and logged once a minute",
                failure,
                level=LogLevel.error,
                handler=handler,
                channel=printable(source.channel),
                kind=source.kind,
            )
            return
        self._suppressed[handler] = self._suppressed.get(handler, 0) + 1
        if self._summary is None:
            self._summary = self._clock.callLater(FAILURE_SUMMARY_INTERVAL, self._report)

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


#: seconds a ``once`` handler's claim on a message is kept in Redis: every
#: node receives a message within milliseconds, so this only needs to outlast
#: a node that is behind; it is also how long identical messages published
#: without history on one channel count as one
ONCE_WINDOW = 60.0

#: ``claim(handler, channel, message, offset)``: a Deferred firing with whether
#: this node runs a ``once`` handler on that message
Claim = Callable[[str, str, bytes, "str | None"], Deferred[bool]]


def redis_claim(execute: Callable[..., Deferred[Any]], namespace: str, node: str,
                window: float = ONCE_WINDOW) -> Claim:
    """
    The claim for ``once`` handlers on Redis: the nodes race to ``SET NX`` a
    key naming the handler and the message; the one that sets it runs the
    handler.  A message is named by its history offset when it has one (unique
    per message), else by a hash of its bytes.

    :param execute: runs one Redis command (:meth:`RedisLink.execute`).
    :param namespace: the channel namespace (the keys are ``<namespace>:once:...``).
    :param node: this node's name, stored as the key's value (for operators).
    """
    millis = max(1, int(window * 1000))

    def claim(handler: str, channel: str, message: bytes, offset: str | None) -> Deferred[bool]:
        ident = offset if offset else "sha256:" + hashlib.sha256(message).hexdigest()
        key = f"{namespace}:once:{handler}:{channel}:{ident}"
        d = execute("SET", key, node, "NX", "PX", millis)
        d.addCallback(lambda reply: reply in ("OK", b"OK"))
        return d

    return claim


class ListenerRegistry:
    """
    The listener instances of one service, and the handlers per channel.

    :param listeners: listener classes, ``"module:Class"`` strings, or
        ready-made :class:`Subscriber` instances; one instance per class is
        made, in the order given.
    :param clock: the reactor, for the once-a-minute failure counts.
    """

    _log = NamedLogger(namespace="sockdrawer.listeners.ListenerRegistry")

    def __init__(self, listeners: Iterable[str | type[Subscriber] | Subscriber] = (), *, clock: Any) -> None:
        self.instances: list[Subscriber] = []
        self._handlers: dict[str, list[tuple[Callable[..., Any], bool, bool]]] = {}
        self._authorizers: dict[str, list[Callable[[Source], Any]]] = {}
        self._sinks: dict[bytes, _ChannelSink] = {}
        self._failures = _FailureLog(clock)
        self._claim: Claim | None = None
        #: broker messages whose ``once`` handler this node ran / left to another node
        self.once_won = 0
        self.once_lost = 0
        for spec in listeners:
            if isinstance(spec, str):
                spec = load_listener_class(spec)
            instance = spec() if isinstance(spec, type) else spec
            self.instances.append(instance)
            veto = getattr(instance, "authorize", None)
            once = type(instance).once_handlers
            for channel, methods in type(instance).handlers.items():
                for name, takes_source in methods:
                    self._handlers.setdefault(channel, []).append(
                        (getattr(instance, name), takes_source, name in once)
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

    def has_once_handlers(self) -> bool:
        """Whether any handler is declared with ``@on(..., once=True)``."""
        return any(once for handlers in self._handlers.values() for _, _, once in handlers)

    def attach(self, hub: IChannelHub, publish: Callable[[str | bytes, str], Any],
               claim: Claim | None = None) -> None:
        """
        Give each listener the hub and publisher, and subscribe to the hub.

        :param claim: decides which node runs a ``once`` handler on a broker
            message (:func:`redis_claim`); ``None`` for a single node (the
            embedded broker), where every ``once`` handler runs.
        """
        self._claim = claim
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

    def dispatch(self, source: Source, message: str | bytes, offset: str | None = None) -> list[Deferred[Any]]:
        """
        Run every handler of ``source.channel`` on ``message``.

        A ``once`` handler runs on a broker message only when this node wins
        the message's claim (see :meth:`attach`); when the claim cannot be
        made (Redis does not answer), the handler does not run here, and the
        failure is logged like a handler's.  ``offset`` is the message's
        history offset, when it has one.

        A handler that raises, or whose Deferred or coroutine fails, is logged
        with its traceback (the first time; then counted) and gives no
        result.  A call that holds the reactor longer than
        :data:`BLOCKING_WARNING` seconds is logged as a warning naming the
        handler: while it runs, no socket of the node is served.

        :return: one Deferred per handler, in registration order, firing with
            the handler's result (``None`` for none or for a failure).
        """
        results: list[Deferred[Any]] = []
        for handler, takes_source, once in self._handlers.get(source.channel, ()):
            if once and self._claim is not None and source.kind == BROKER:
                raw = message.encode("utf-8") if isinstance(message, str) else message
                claimed = self._claim(_name(handler), source.channel, raw, offset)
                claimed.addCallback(self._run_claimed, handler, takes_source, message, source)
                claimed.addErrback(self._handler_failed, handler, source)
                results.append(claimed)
                continue
            results.append(self._run(handler, takes_source, message, source))
        return results

    def _run_claimed(self, won: bool, handler: Callable[..., Any], takes_source: bool, message: str | bytes,
                     source: Source) -> Deferred[Any] | None:
        if not won:
            self.once_lost += 1
            return None
        self.once_won += 1
        return self._run(handler, takes_source, message, source)

    def _run(self, handler: Callable[..., Any], takes_source: bool, message: str | bytes,
             source: Source) -> Deferred[Any]:
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
                        handler=_name(handler), ms=held * 1000, channel=printable(source.channel),
                    )
        except Exception:
            self._failures.failed(_name(handler), Failure(), source)
            return succeed(None)
        if isinstance(result, Deferred):
            d = result
        elif hasattr(result, "__await__"):
            d = ensureDeferred(result)
        else:
            return succeed(result)
        d.addErrback(self._handler_failed, handler, source)
        return d

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
