"""A Pusher channel's fan-out group: each message framed once per encoding, to every member but the excluded."""

from __future__ import annotations

from typing import Any

from sockdrawer.core.hub import MemoryChannelHub
from sockdrawer.core.pusher.auth import PusherApp
from sockdrawer.core.pusher.session import PusherHost, PusherSession
from sockdrawer.transports.websocket.fanout import FanoutStats


class Outbox:
    encoding = 0
    can_send = True

    def __init__(self, on_write: Any = None) -> None:
        self.frames: list[bytes] = []
        self.on_write = on_write

    def frame(self, payload: bytes) -> bytes:
        return payload

    def write(self, data: bytes) -> None:
        self.frames.append(data)
        if self.on_write is not None:
            self.on_write()


def test_a_member_that_leaves_during_the_fan_out_does_not_cost_the_others_the_message() -> None:
    """The first member's write makes it leave (a slow reader cut off with its close frame): the members
    after it still get the message, and the group counts three deliveries."""
    hub = MemoryChannelHub()
    host = PusherHost(PusherApp("1", "key", b"secret"), hub, lambda key, message: None, FanoutStats(), 100, 200,
                      lambda channel: True)
    sessions = [PusherSession(host, Outbox(), ("127.0.0.1", None)) for _ in range(3)]
    first = sessions[0]
    first.outbox.on_write = lambda: host.leave(first, b"news")
    for session in sessions:
        host.join(session, b"news")
    hub.deliver(b"news", b"hello")
    assert [len(s.outbox.frames) for s in sessions] == [1, 1, 1]
    assert host.subscriptions(b"news") == 2 and host.stats.deliveries == 3
