"""
The listener DSL: Python classes that react to channels inside the server.

::

    from sockdrawer import Subscriber, on

    class Chat(Subscriber):
        @on("echo")
        def echo(self, message, source):
            return message

This module imports only the standard library, so listener modules can be
imported (and unit-tested) without Twisted.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from sockdrawer.core.channels import validate_channel

if TYPE_CHECKING:  # pragma: no cover
    from sockdrawer.core.interfaces import IChannelHub

_F = TypeVar("_F", bound=Callable[..., Any])

_CHANNELS_ATTR = "__sockdrawer_channels__"
_ONCE_ATTR = "__sockdrawer_once__"

#: :attr:`Source.kind` of a message published through the broker (Redis, or
#: the embedded broker standing in for it).
BROKER = "broker"
#: :attr:`Source.kind` of a frame sent by a browser.
SOCKET = "socket"


@dataclass(frozen=True)
class Source:
    """
    Where a message given to a handler came from.

    :ivar kind: :data:`BROKER` for a message published on the broker (Redis
        channel ``<namespace>/<channel>``), :data:`SOCKET` for a frame a
        browser sent.
    :ivar channel: the channel, e.g. ``"rooms/42"``; ``""`` for the root.
    :ivar peer: for a socket, its peer address (``"tcp4:127.0.0.1:52152"``);
        ``None`` for the broker.
    :ivar user: for a socket that presented a token, the token's ``sub``
        claim; ``None`` otherwise.
    """

    kind: str
    channel: str
    peer: str | None = None
    user: str | None = None

    @property
    def from_socket(self) -> bool:
        """Whether a browser sent this message (and a reply goes back to it)."""
        return self.kind == SOCKET

    @property
    def path(self) -> str:
        """The WebSocket path of the channel, e.g. ``"/rooms/42"``."""
        return "/" + self.channel


def on(*channels: str, once: bool = False) -> Callable[[_F], _F]:
    """
    Register the decorated method as a handler for each of ``channels``.

    The method is called as ``method(message, source)`` (or
    ``method(message)`` when it takes a single argument) for every message
    published on the channel and every frame a browser sends on it.
    ``message`` is a :class:`str` when the payload is UTF-8 text and
    :class:`bytes` otherwise.

    :param channels: channel names without the namespace, e.g. ``"echo"``;
        ``""`` is the root channel.
    :param once: run the handler on one node of the cluster per message
        published on the broker, instead of on every node (frames from
        browsers run on their own node anyway); see ``docs/listeners.rst``.
    :raises sockdrawer.ChannelNameError: for a name that is not a valid channel.
    """
    if not channels:
        raise TypeError("@on() needs at least one channel name")
    for channel in channels:
        validate_channel(channel)

    def decorate(method: _F) -> _F:
        existing = getattr(method, _CHANNELS_ATTR, ())
        setattr(method, _CHANNELS_ATTR, tuple(existing) + tuple(channels))
        if once:
            setattr(method, _ONCE_ATTR, True)
        return method

    return decorate


def _takes_source(method: Callable[..., Any]) -> bool:
    params = [
        p
        for p in inspect.signature(method).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
    ]
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    # unbound function: self, message[, source]
    return len(params) >= 3


class Subscriber:
    """
    Base class for listeners.

    sockdrawer makes one instance of each listener class, with no arguments,
    and attaches it to the running service before any handler runs; from then
    on :attr:`hub` and :meth:`publish` are usable.

    :cvar handlers: channel name -> ``(method name, takes source)`` pairs,
        collected from the ``@on`` decorations of the class and its bases.
    """

    handlers: ClassVar[dict[str, tuple[tuple[str, bool], ...]]] = {}
    #: the names of the methods declared with ``@on(..., once=True)``
    once_handlers: ClassVar[frozenset[str]] = frozenset()

    #: The service's hub, for local delivery and introspection.
    hub: IChannelHub | None = None
    _publish: Callable[[str | bytes, str], Any] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        found: dict[str, list[tuple[str, bool]]] = {}
        once: set[str] = set()
        seen: set[str] = set()
        for klass in cls.__mro__:
            for name, attr in vars(klass).items():
                if name in seen:
                    continue
                seen.add(name)
                for channel in getattr(attr, _CHANNELS_ATTR, ()):
                    found.setdefault(channel, []).append((name, _takes_source(attr)))
                if getattr(attr, _ONCE_ATTR, False):
                    once.add(name)
        cls.handlers = {channel: tuple(names) for channel, names in found.items()}
        cls.once_handlers = frozenset(once)

    def attach(self, publish: Callable[[str | bytes, str], Any], hub: IChannelHub) -> None:
        """
        Called by sockdrawer once, before any handler runs.

        :param publish: publishes ``(message, channel)`` through the broker and
            returns a Deferred.
        :param hub: the service's channel hub.
        """
        self._publish = publish
        self.hub = hub

    def publish(self, message: str | bytes, channel: str = "") -> Any:
        """
        Publish ``message`` on ``channel`` through the broker, so every socket
        on that channel, on every node, receives it.

        :return: a Deferred firing with what the broker reports.
        :raises RuntimeError: when the listener is not attached to a service.
        """
        if self._publish is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a sockdrawer service")
        return self._publish(message, channel)
