"""
Autobahn computes the arguments of its debug log lines eagerly, even with
debug logging off: ``hltype(...)`` and ``hlval(...)`` style type names and
values for a terminal (with click, when installed) on every connection and
every ``sendData``.  On the handshake path that was about 90 µs per
connection, more than the rest of the handshake.

:func:`make_log_arguments_lazy` swaps the two helpers, in the Autobahn modules
that call them, for versions that return a small object formatting itself
only when a log line is actually written.  Log output is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import autobahn.twisted.websocket
import autobahn.websocket.protocol
from autobahn import util


class _LazyText:
    __slots__ = ("_func", "_args", "_kwargs")

    def __init__(self, func: Callable[..., str], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._func = func
        self._args = args
        self._kwargs = kwargs

    def __str__(self) -> str:
        return self._func(*self._args, **self._kwargs)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return str(self)

    def __add__(self, other: str) -> str:
        return str(self) + other

    def __radd__(self, other: str) -> str:
        return other + str(self)


def _lazy(func: Callable[..., str]) -> Callable[..., Any]:
    def lazy(*args: Any, **kwargs: Any) -> _LazyText:
        return _LazyText(func, args, kwargs)

    lazy.__sockdrawer_lazy__ = True  # type: ignore[attr-defined]
    lazy.__wrapped__ = func  # type: ignore[attr-defined]
    return lazy


def make_log_arguments_lazy() -> None:
    """Install the lazy helpers (idempotent)."""
    for module in (autobahn.websocket.protocol, autobahn.twisted.websocket):
        for name in ("hltype", "hlval"):
            current = getattr(module, name, None)
            if current is not None and not getattr(current, "__sockdrawer_lazy__", False):
                setattr(module, name, _lazy(getattr(util, name)))
