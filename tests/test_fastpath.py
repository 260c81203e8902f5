"""
What the fan-out fast path (direct sends, joined frames) must keep: order
per socket under bursts, no frame after a close frame, pings and pongs in the
middle of bursts, text and binary mixed.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import wait_for
from twisted.internet import reactor, task
from websockets.frames import Opcode
from wsclient import connect


async def reactor_turn() -> None:
    await task.deferLater(reactor, 0, lambda: None)


def burst(svc: Any, key: bytes, start: int, count: int, per_read: int = 50) -> None:
    """Deliver messages start..start+count as the Redis link would: several per read."""
    hub = svc.hub
    for first in range(start, start + count, per_read):
        hub.hold()
        for i in range(first, min(first + per_read, start + count)):
            hub.deliver(key, (b"\xff%d" % i) if i % 4 == 0 else (b"%d" % i))
        hub.release()


def expected(start: int, count: int) -> list[tuple[Opcode, bytes]]:
    return [(Opcode.BINARY, b"\xff%d" % i) if i % 4 == 0 else (Opcode.TEXT, b"%d" % i)
            for i in range(start, start + count)]


@pytest_twisted.ensureDeferred
async def test_order_per_socket_under_bursts(run_service: Any) -> None:
    """Bursts of joined frames, over many reactor turns, reach every socket complete and in order."""
    svc = await run_service()
    clients = [await connect(svc.ws_port, "/burst") for _ in range(5)]
    for round_ in range(20):
        burst(svc, b"burst", round_ * 500, 500)
        await reactor_turn()
    for client in clients:
        got = [await client.next_message() for _ in range(10_000)]
        assert got == expected(0, 10_000)


@pytest_twisted.ensureDeferred
async def test_no_frame_after_close(run_service: Any) -> None:
    """Once the server sends a close frame, no data frame follows it, though the burst goes on."""
    svc = await run_service(close_handshake_timeout=5)
    closing = await connect(svc.ws_port, "/c")
    staying = await connect(svc.ws_port, "/c")
    burst(svc, b"c", 0, 100)
    proto = next(p for p in svc.factory.connections if p.peer.endswith(f":{closing.transport.getHost().port}"))
    proto.sendCloseFrame(code=1000, reasonUtf8=b"bye", isReply=False)
    burst(svc, b"c", 100, 100)
    await reactor_turn()
    burst(svc, b"c", 200, 100)
    code, _ = await closing.closed
    assert code == 1000
    after_close = closing.opcodes[closing.opcodes.index(Opcode.CLOSE):]
    assert after_close == [Opcode.CLOSE]
    got = [await closing.next_message() for _ in range(closing.pending())]
    assert got == expected(0, 100)
    assert [await staying.next_message() for _ in range(300)] == expected(0, 300)


@pytest_twisted.ensureDeferred
async def test_pings_and_pongs_during_bursts(run_service: Any) -> None:
    """Server pings and the pongs to client pings interleave with bursts without breaking frames or order."""
    svc = await run_service(auto_ping_interval=0.02, auto_ping_timeout=2)
    client = await connect(svc.ws_port, "/p")
    sent = 0
    while client.pings_received < 3 or client.pongs_received < 3:
        assert sent < 2_000_000, "no pings seen during the bursts"
        burst(svc, b"p", sent, 200)
        sent += 200
        client.ping(b"%d" % sent)
        await task.deferLater(reactor, 0.005, lambda: None)
    got = [await client.next_message() for _ in range(sent)]
    assert got == expected(0, sent)
    assert client.ws.state.name == "OPEN"
    assert svc.factory.sockets(b"p") == 1


@pytest_twisted.ensureDeferred
async def test_queued_socket_returns_to_direct_sends(run_service: Any) -> None:
    """A socket whose writes were queued (after a pong) goes back to direct sends once Twisted's buffer drains."""
    svc = await run_service()
    client = await connect(svc.ws_port, "/q")
    group = svc.factory.groups[b"q"]
    burst(svc, b"q", 0, 1)
    await wait_for(lambda: client.pending() == 1)
    burst(svc, b"q", 1, 1)  # buffer drained: this one goes direct
    assert len(group._direct) == 1
    client.ping(b"x")
    await wait_for(lambda: client.pongs_received == 1)
    assert len(group._queued) == 1  # Autobahn wrote the pong through Twisted
    burst(svc, b"q", 2, 1)
    assert len(group._direct) == 1
    assert [await client.next_message() for _ in range(3)] == expected(0, 3)
