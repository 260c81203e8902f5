"""Lifecycle: this node's counts decide which events reach the queue; the memory queue's bound."""

from __future__ import annotations

import json

from twisted.internet.task import Clock

from sockdrawer.core.lifecycle import CONNECT, DISCONNECT, OCCUPY, VACATE, Lifecycle, MemoryEventQueue


class Recording:
    def __init__(self) -> None:
        self.ops: list[tuple[str, str, dict]] = []

    def add(self, op: str, name: str, body: bytes) -> None:
        self.ops.append((op, name, json.loads(body)))


def test_only_a_channels_first_and_last_connection_are_events() -> None:
    """Two connections on a channel: one OCCUPY at the first, one VACATE at the last, with the time in ms."""
    clock = Clock()
    clock.advance(12.5)
    queue = Recording()
    life = Lifecycle(queue, clock)
    life.joined(b"news")
    life.joined(b"news")
    life.left(b"news")
    assert [op for op, _, _ in queue.ops] == [OCCUPY]
    life.left(b"news")
    life.left(b"news")  # one too many: nothing
    assert queue.ops == [(OCCUPY, "news", {"event": "channel_occupied", "time": 12500, "channel": "news"}),
                         (VACATE, "news", {"event": "channel_vacated", "time": 12500, "channel": "news"})]


def test_a_disconnect_follows_only_a_connect_and_the_snapshot_holds_what_is_open() -> None:
    """A disconnect for a client never connected is no event; the snapshot names open clients and channels."""
    queue = Recording()
    life = Lifecycle(queue, Clock())
    life.connected("c1", "alice", "websocket", b"news")
    life.joined(b"news")
    life.disconnected("zz", None, "sse", None)
    assert [(op, name) for op, name, _ in queue.ops] == [(CONNECT, "c1"), (OCCUPY, "news")]
    assert queue.ops[0][2] == {"event": "connect", "time": 0, "user": "alice", "client": "c1", "channel": "news",
                               "transport": "websocket"}
    assert sorted((op, name) for op, name, _ in life.snapshot()) == [(CONNECT, "c1"), (OCCUPY, "news")]
    life.disconnected("c1", "alice", "websocket", b"news")
    assert queue.ops[-1][:2] == (DISCONNECT, "c1") and queue.ops[-1][2]["event"] == "disconnect"
    assert [op for op, _, _ in life.snapshot()] == [OCCUPY]


def test_the_memory_queue_drops_new_events_at_its_bound() -> None:
    """At its bound (taken events count until done) a new event is dropped and counted; done frees room."""
    queue = MemoryEventQueue(2)
    queue.add(CONNECT, "a", b'{"n":1}')
    queue.add(CONNECT, "b", b'{"n":2}')
    queue.add(CONNECT, "c", b'{"n":3}')
    assert queue.dropped == 1
    taken = queue.take(5).result
    assert [body for _, body in taken] == [b'{"n":1}', b'{"n":2}'] and queue.length().result == 2
    queue.add(CONNECT, "d", b'{"n":4}')
    assert queue.dropped == 2
    queue.done(taken[0][0])
    queue.add(CONNECT, "e", b'{"n":5}')
    assert queue.length().result == 2 and [b for _, b in queue.take(5).result] == [b'{"n":5}']
