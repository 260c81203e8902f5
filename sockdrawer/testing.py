"""
Test doubles for code that embeds sockdrawer or implements its interfaces.
"""

from __future__ import annotations

from zope.interface import implementer

from sockdrawer.core.interfaces import Batch, ISink


@implementer(ISink)
class RecordingSink:
    """
    An :class:`~sockdrawer.interfaces.ISink` that records what it receives.

    :ivar batches: ``(channel key, [messages])`` per batch received, in order.
    """

    receivers = 1

    def __init__(self, name: str = "sink") -> None:
        self.name = name
        self.batches: list[tuple[bytes, list[bytes]]] = []

    def receive(self, batch: Batch) -> None:
        self.batches.append((batch.key, list(batch.messages)))

    @property
    def messages(self) -> list[bytes]:
        """Every message received, flattened, in order."""
        return [m for _, messages in self.batches for m in messages]

    def __repr__(self) -> str:
        return f"<RecordingSink {self.name}>"
