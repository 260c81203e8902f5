"""
The members of a fan-out group: an insertion-ordered set that holds its
first member alone, with no container (a channel per user makes most groups
a group of one), and a ``dict`` from the second on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_NONE: Any = object()


class Members(Generic[T]):
    """
    An ordered set with the ``dict`` spelling the groups used before it:
    ``members[x] = None`` adds, ``members.pop(x, default)`` removes (``None``
    when ``x`` was a member, else ``default``); ``in``, ``len`` and iteration
    in the order members came.  Members are compared by identity while alone
    and by hash and equality in the dict (the same for objects that define
    neither, as group members do).
    """

    __slots__ = ("_one", "_many")

    def __init__(self) -> None:
        self._one: Any = _NONE
        self._many: dict[T, None] | None = None

    def __setitem__(self, member: T, value: None) -> None:
        many = self._many
        if many is not None:
            many[member] = None
        elif self._one is _NONE:
            self._one = member
        elif self._one is not member:
            self._many, self._one = {self._one: None, member: None}, _NONE

    def pop(self, member: T, default: Any = _NONE) -> Any:
        many = self._many
        if many is not None:
            if member in many:
                del many[member]
                if not many:
                    self._many = None
                return None
        elif self._one is member:
            self._one = _NONE
            return None
        if default is _NONE:
            raise KeyError(member)
        return default

    def __contains__(self, member: object) -> bool:
        many = self._many
        return member in many if many is not None else self._one is member

    def __len__(self) -> int:
        many = self._many
        if many is not None:
            return len(many)
        return 0 if self._one is _NONE else 1

    def __iter__(self) -> Iterator[T]:
        many = self._many
        if many is not None:
            return iter(many)
        return iter(() if self._one is _NONE else (self._one,))

    def __repr__(self) -> str:
        return f"Members({list(self)!r})"
