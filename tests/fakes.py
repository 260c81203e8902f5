"""
Fakes for unit tests of the core: a recording :class:`Outbox` and a
:class:`SessionHost` on a ``task.Clock``, with history answered from a list.
No reactor, no socket.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from sockdrawer.core.hub import MemoryChannelHub
from sockdrawer.core.v1 import Peer, SessionHost, SessionLimits, V1Session


class RecordingOutbox:
    """An outbox whose framing leaves payloads as they are: ``out`` holds what was sent, JSON decoded."""

    encoding = 0

    def __init__(self) -> None:
        self.can_send = True
        self.out: list[Any] = []
        self.writes = 0
        #: when the connection's token expires, as the session last said (a refresh)
        self.expiry: float | None = None

    def frame(self, payload: bytes) -> bytes:
        return payload

    def expires(self, when: float) -> None:
        self.expiry = when

    def write(self, data: bytes) -> None:
        self.writes += 1
        # one payload (the fake framing leaves it JSON), or a group's shared frames as they are
        self.out.append(json.loads(data) if data[:1] == b"{" else data)

    def direct_send(self) -> Any:
        """No socket to send to directly: every write goes through :meth:`write`."""
        return None


class RecordingFanout:
    """Records which subscriptions joined a fan-out group."""

    def __init__(self) -> None:
        self.members: list[Any] = []

    def join(self, sub: Any, encoding: int) -> None:
        self.members.append(sub)

    def leave(self, sub: Any) -> None:
        self.members.remove(sub)


def session_host(replies: list[Any] | None = None, **limits: Any) -> tuple[SessionHost, list[str | None]]:
    """A host on a Clock whose history answers with ``replies`` in turn (``None``: no history), and its reads."""
    reads: list[str | None] = []
    host = SessionHost(MemoryChannelHub(), RecordingFanout(), Clock(), SessionLimits(**limits))
    if replies is not None:
        def history(key: bytes, since: str | None) -> Deferred[Any]:
            reads.append(since)
            return succeed(replies.pop(0))

        host.history = history
    return host, reads


def session(replies: list[Any] | None = None, peer: Peer | None = None,
            **limits: Any) -> tuple[V1Session, RecordingOutbox, list[str | None]]:
    """A session with a recording outbox (see :func:`session_host`)."""
    host, reads = session_host(replies, **limits)
    outbox = RecordingOutbox()
    return V1Session(host, outbox, peer or Peer()), outbox, reads
