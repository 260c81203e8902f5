"""A class attribute logger that keeps the namespace it was given."""

from __future__ import annotations

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
