"""Logging helpers: a class attribute logger that keeps the namespace it was given, and lazy log text."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger


class NamedLogger(Logger):
    """
    A :class:`~twisted.logger.Logger` for a class attribute that keeps its
    namespace when read through an instance or the class.  Twisted's
    ``Logger.__get__`` names the logger after the class's module and name,
    dropping the ``namespace`` given; sockdrawer's log namespaces are part of
    what operators filter on (docs/operations.rst quotes them), so they must
    not follow the module layout.
    """

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        return Logger(self.namespace, owner if instance is None else instance, self.observer)


class _LazyText:
    """Text made when first formatted (log arguments that cost something to make)."""

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


def lazy_text(func: Callable[..., str]) -> Callable[..., Any]:
    """``func`` as a function whose result formats ``func(*args, **kwargs)`` only when it is turned into text."""

    def lazy(*args: Any, **kwargs: Any) -> _LazyText:
        return _LazyText(func, args, kwargs)

    lazy.__sockdrawer_lazy__ = True  # type: ignore[attr-defined]
    lazy.__wrapped__ = func  # type: ignore[attr-defined]
    return lazy


class _Quiet:
    """A txaio-style logger that logs nothing (for the lines a refusal would repeat)."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


QUIET: Any = _Quiet()
