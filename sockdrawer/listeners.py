"""
Running listener handlers inside the server: loading listener classes,
subscribing them to the hub, and calling their handlers safely.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred, succeed
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


class ListenerRegistry:
    """
    The listener instances of one service, and the handlers per channel.

    :param listeners: listener classes, ``"module:Class"`` strings, or
        ready-made :class:`Subscriber` instances; one instance per class is
        made, in the order given.
    """

    _log = Logger()

    def __init__(self, listeners: Iterable[str | type[Subscriber] | Subscriber] = ()) -> None:
        self.instances: list[Subscriber] = []
        self._handlers: dict[str, list[tuple[Callable[..., Any], bool]]] = {}
        self._sinks: dict[bytes, _ChannelSink] = {}
        for spec in listeners:
            if isinstance(spec, str):
                spec = load_listener_class(spec)
            instance = spec() if isinstance(spec, type) else spec
            self.instances.append(instance)
            for channel, methods in type(instance).handlers.items():
                for name, takes_source in methods:
                    self._handlers.setdefault(channel, []).append(
                        (getattr(instance, name), takes_source)
                    )

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

    def dispatch(self, source: Source, message: str | bytes) -> list[Deferred[Any]]:
        """
        Run every handler of ``source.channel`` on ``message``.

        A handler that raises, or whose Deferred or coroutine fails, is logged
        with its traceback and gives no result.

        :return: one Deferred per handler, in registration order, firing with
            the handler's result (``None`` for none or for a failure).
        """
        results: list[Deferred[Any]] = []
        for handler, takes_source in self._handlers.get(source.channel, ()):
            try:
                result = handler(message, source) if takes_source else handler(message)
                if isinstance(result, Deferred):
                    d = result
                elif hasattr(result, "__await__"):
                    d = ensureDeferred(result)
                else:
                    results.append(succeed(result))
                    continue
            except Exception:
                self._log.failure(
                    "listener handler {handler} failed on channel {channel!r} ({kind})",
                    handler=_name(handler),
                    channel=source.channel,
                    kind=source.kind,
                )
                results.append(succeed(None))
                continue
            d.addErrback(self._handler_failed, handler, source)
            results.append(d)
        return results

    def _handler_failed(self, failure: Failure, handler: Callable[..., Any], source: Source) -> None:
        self._log.failure(
            "listener handler {handler} failed on channel {channel!r} ({kind})",
            failure,
            handler=_name(handler),
            channel=source.channel,
            kind=source.kind,
        )
        return None


def _name(handler: Callable[..., Any]) -> str:
    owner = getattr(handler, "__self__", None)
    prefix = type(owner).__qualname__ + "." if owner is not None else ""
    return prefix + getattr(handler, "__name__", repr(handler))
