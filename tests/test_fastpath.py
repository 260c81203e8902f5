"""
What the fan-out fast path (direct sends, joined frames) must keep: order
per socket under bursts, no frame after a close frame, pings and pongs in the
middle of bursts, text and binary mixed.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import wait_for
from twisted.internet import protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from websockets.frames import Opcode
from wsclient import RawClient, connect

from sockdrawer import _private


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
    """On the wire, no data frame follows the server's close frame, though the burst goes on."""
    # Autobahn's close timer rounds down to whole seconds: with less than 1 s
    # it may fire before the close frame is even flushed
    svc = await run_service(close_handshake_timeout=2)
    raw = RawClient(b"/c")
    await TCP4ClientEndpoint(reactor, "127.0.0.1", svc.ws_port).connect(
        protocol.Factory.forProtocol(lambda: raw))
    await wait_for(lambda: svc.factory.sockets(b"c") == 1)
    staying = await connect(svc.ws_port, "/c")
    proto = next(p for p in svc.factory.connections if p.peer.endswith(f":{raw.transport.getHost().port}"))
    burst(svc, b"c", 0, 100)
    proto.sendCloseFrame(code=1000, reasonUtf8=b"bye", isReply=False)
    burst(svc, b"c", 100, 100)
    await reactor_turn()
    burst(svc, b"c", 200, 100)
    await raw.lost  # the client never answers the close: the server drops it
    opcodes = [opcode for opcode, _ in raw.frames()]
    assert opcodes == [2 if i % 4 == 0 else 1 for i in range(100)] + [8]
    assert [await staying.next_message() for _ in range(300)] == expected(0, 300)


def test_partial_direct_send_queues_the_rest_in_order() -> None:
    """When the kernel takes part of a direct send, the rest goes through Twisted first, in order, and the
    socket returns to direct sends once that has drained."""
    from sockdrawer.core.hub import MemoryChannelHub
    from sockdrawer.core.interfaces import Batch
    from sockdrawer.transports.websocket.factory import SockDrawerServerFactory
    from sockdrawer.transports.websocket.fanout import ChannelGroup
    from sockdrawer.transports.websocket.protocol import SockDrawerServerProtocol

    class Kernel:
        def __init__(self) -> None:
            self.accepted = b""
            self.room = 10**9

        def send(self, data: bytes) -> int:
            n = min(len(data), self.room)
            self.accepted += data[:n]
            return n

    class Transport:
        """The part of Twisted's tcp.Connection the fast path reads."""

        def __init__(self, kernel: Kernel) -> None:
            self.kernel = kernel
            self._tempDataLen = 0
            self.dataBuffer = b""
            self.offset = 0
            self.queued: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.queued.append(data)
            self._tempDataLen += len(data)

        def drain(self) -> None:  # what doWrite does once the kernel has room
            self.kernel.accepted += b"".join(self.queued)
            self.queued.clear()
            self._tempDataLen = 0

    factory = SockDrawerServerFactory(MemoryChannelHub(), clock=task.Clock())
    proto = factory.protocol()
    proto.factory = factory
    proto.state = SockDrawerServerProtocol.STATE_OPEN
    kernel = Kernel()
    proto.transport = proto._tcp = Transport(kernel)
    proto._sock = kernel  # type: ignore[assignment]
    group = ChannelGroup(b"k")
    group.add(proto)
    group.receive(Batch(b"k", [b"m0"]))  # a new member starts queued: finds an empty buffer, goes direct
    assert group.direct and not group.queued
    kernel.room = 3
    group.receive(Batch(b"k", [b"m1-long", b"m2"]))  # partial: the rest is queued
    assert group.queued and not group.direct
    kernel.room = 10**9
    group.receive(Batch(b"k", [b"m3"]))  # buffer not drained yet: behind the rest
    assert group.queued
    proto.transport.drain()
    group.receive(Batch(b"k", [b"m4"]))  # drained: direct again
    assert group.direct and not group.queued
    from sockdrawer.transports.websocket.frames import encode_batch

    assert kernel.accepted == b"".join(encode_batch([m]) for m in (b"m0", b"m1-long", b"m2", b"m3", b"m4"))


def test_group_of_one_and_of_many_deliver_the_same() -> None:
    """A group keeps a single member in slots and several in dicts: through joins, partial sends, drains and
    leaves in any order, every member gets every batch once, in order, direct or queued."""
    from sockdrawer.core.interfaces import Batch
    from sockdrawer.transports.websocket.fanout import ChannelGroup
    from sockdrawer.transports.websocket.frames import encode_batch

    class Member:
        _group: ChannelGroup | None = None

        def __init__(self) -> None:
            self.got = b""
            self.buffered = b""  # what waits in "Twisted"
            self.room = 10**9

        def send(self, data: bytes) -> int:
            n = min(len(data), self.room)
            self.got += data[:n]
            return n

        def direct_send(self) -> Any:
            return None if self.buffered else self.send

        def deliver_queued(self, data: bytes) -> None:
            if not self.buffered:
                sent = self.send(data)
                if sent == len(data):
                    assert self._group is not None
                    self._group.promote(self)
                    return
                data = data[sent:]
            self.buffered += data

        def backlog(self, rest: bytes) -> None:
            assert self._group is not None
            self._group.demote(self)
            self.buffered += rest

        def drain(self) -> None:
            self.got += self.buffered
            self.buffered = b""

    group = ChannelGroup(b"k")
    members = [Member() for _ in range(3)]
    sent: dict[int, list[bytes]] = {id(m): [] for m in members}
    count = [0]

    def batch(n: int = 2) -> None:
        messages = [b"m%d" % (count[0] + i) for i in range(n)]
        count[0] += n
        for m in members:
            if m._group is group:
                sent[id(m)].extend(messages)
        group.receive(Batch(b"k", messages))

    a, b, c = members
    group.add(a)
    assert len(group) == 1 and group.queued == 1
    batch()
    assert group.direct == 1 and group._direct is None  # one member: no dict
    a.room = 3
    batch()  # partial send: a is queued now
    assert group.queued == 1
    a.room = 10**9
    group.add(b)  # two members: the dicts, a still queued
    assert len(group) == 2 and group.queued == 2
    batch()
    a.drain()
    batch()
    group.add(c)
    batch()
    assert group.direct == 3
    group.remove(b)
    batch()
    group.remove(a)
    group.remove(c)
    assert len(group) == 0
    batch()
    group.add(b)
    assert len(group) == 1 and group._direct is None
    b.drain()
    batch()
    batch()
    for m in members:
        m.drain()
        assert m.got == encode_batch(sent[id(m)]), "a member missed, repeated or reordered a message"
    assert group.direct == 1


@pytest_twisted.ensureDeferred
async def test_pings_and_pongs_during_bursts(run_service: Any) -> None:
    """Server pings and the pongs to client pings interleave with bursts without breaking frames or order."""
    svc = await run_service(auto_ping_interval=0.02, auto_ping_timeout=2)
    client = await connect(svc.ws_port, "/p")
    sent = 0
    deadline = reactor.seconds() + 10
    while client.pings_received < 3 or client.pongs_received < 3:
        assert reactor.seconds() < deadline, "no pings or pongs seen during the bursts"
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
    """A pong goes straight to the kernel too while nothing is queued (the socket stays direct); a socket whose
    writes were queued (a frame Autobahn sent through Twisted's buffer) goes back to direct sends once that
    buffer drains, and every frame arrives in order."""
    svc = await run_service()
    client = await connect(svc.ws_port, "/q")
    group = svc.factory.group(b"q")
    assert group is not None
    (proto,) = svc.factory.connections
    burst(svc, b"q", 0, 1)
    await wait_for(lambda: client.pending() == 1)
    burst(svc, b"q", 1, 1)  # buffer drained: this one goes direct
    assert group.direct == 1
    client.ping(b"x")
    await wait_for(lambda: client.pongs_received == 1)
    assert group.direct == 1 and "dataBuffer" not in proto.transport.__dict__  # the pong went direct
    proto.sendMessage(b"queued", sync=True)  # Autobahn's own queue, then Twisted's buffer
    assert group.queued == 1
    await wait_for(lambda: client.pending() == 3)
    burst(svc, b"q", 2, 1)
    assert group.direct == 1
    got = [await client.next_message() for _ in range(4)]
    assert got == [*expected(0, 2), (Opcode.TEXT, b"queued"), *expected(2, 1)]


@pytest_twisted.ensureDeferred
async def test_v1_envelopes_go_direct_and_stay_in_order_with_pings(run_service: Any) -> None:
    """A sockdrawer.v1 socket gets its envelopes straight from send() while nothing waits in Twisted's buffer,
    and through the buffer behind pongs and replies otherwise: bursts with client pings in between arrive
    complete and in order, as JSON envelopes."""
    import json

    svc = await run_service()
    client = await connect(svc.ws_port, "/", subprotocols=["sockdrawer.v1"])
    client.send_json({"op": "subscribe", "channel": "v"})
    assert (await client.next_json())["op"] == "subscribed"
    proto = next(iter(svc.factory.connections))
    sends: list[int] = []
    sock = proto._sock
    assert sock is not None, "a v1 socket has no direct path"

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(sock, name)

        def send(self, data: bytes) -> int:
            sends.append(len(data))
            return sock.send(data)

    proto._sock = Counting()
    sent = 0
    for round_ in range(10):
        burst(svc, b"v", sent, 50)
        sent += 50
        client.ping(b"%d" % round_)
        await task.deferLater(reactor, 0.005, lambda: None)
    got = [json.loads((await client.next_message())[1]) for _ in range(sent)]
    assert [g["op"] for g in got] == ["message"] * sent
    data = [g.get("data") if "encoding" not in g else None for g in got]
    assert [d for d in data if d is not None] == [str(i) for i in range(sent) if i % 4], "reordered or lost"
    assert sends, "no envelope went straight to the socket"


@pytest_twisted.ensureDeferred
async def test_an_idle_socket_keeps_little(run_service: Any) -> None:
    """An open idle socket (raw and sockdrawer.v1, each after it sent a frame: a ping, a subscribe): its 101
    went straight to the kernel (Twisted's buffer never held it), its protocol and its transport each keep at
    most 10 attributes of their own (a dict of 272 bytes, not 464), its channel holds its group alone (no
    dict of sinks), and it still receives, pings and closes."""
    svc = await run_service(auto_ping_interval=0)
    raw = await connect(svc.ws_port, "/idle")
    v1 = await connect(svc.ws_port, "/", subprotocols=["sockdrawer.v1"])
    v1.send_json({"op": "subscribe", "channel": "idle-v1"})
    assert (await v1.next_json())["op"] == "subscribed"
    raw.ping(b"early")  # frames received: what they leave is dropped after the read
    await wait_for(lambda: raw.pongs_received == 1)
    await wait_for(lambda: len(svc.factory.connections) == 2)
    for proto in svc.factory.connections:
        conn = proto.transport
        assert len(proto.__dict__) <= 10, sorted(proto.__dict__)
        assert len(conn.__dict__) <= 10, sorted(conn.__dict__)
        assert not {"dataBuffer", "_tempDataBuffer", "logstr"} & set(conn.__dict__)
        assert conn.producer is proto  # the socket hears of its buffer filling and draining itself
    assert svc.hub.sinks(b"idle") == [svc.factory.group(b"idle")]
    burst(svc, b"idle", 0, 3)
    assert [await raw.next_message() for _ in range(3)] == expected(0, 3)
    raw.ping(b"x")
    await wait_for(lambda: raw.pongs_received == 2)
    for client in (raw, v1):
        client.close()
        assert (await client.wait_closed())[0] == 1000
    await wait_for(lambda: not svc.factory.connections)


@pytest_twisted.ensureDeferred
async def test_v1_socket_that_stops_reading_gets_every_channel_intact_and_in_order(run_service: Any) -> None:
    """A sockdrawer.v1 socket on two channels stops reading while both get large bursts: its kernel buffer
    fills and frames wait in Twisted's buffer, and then neither channel's group keeps sending straight to the
    socket; when it reads again every frame is whole (websockets parses each), each channel's messages come
    in order, and the next one goes direct again."""
    import json

    svc = await run_service(send_buffer=64 * 1024 * 1024, slow_timeout=0)
    client = await connect(svc.ws_port, "/", subprotocols=["sockdrawer.v1"])
    for channel in ("a", "b"):
        client.send_json({"op": "subscribe", "channel": channel})
        assert (await client.next_json())["op"] == "subscribed"
    (proto,) = svc.factory.connections
    client.transport.pauseProducing()
    pad = "." * 20_000
    for i in range(150):
        for key in (b"a", b"b"):
            svc.hub.deliver(key, b"%s %d %s" % (key, i, pad.encode()))
        if i == 10:
            await reactor_turn()
    assert _private.write_backlog(proto.transport) > 0, "the kernel took it all: nothing was queued"
    for sub in proto._session.subscriptions.values():  # neither channel's group may send past what waits
        assert sub not in (sub.group._sends or {}), f"{sub.channel}'s group still sends straight to the socket"
    client.transport.resumeProducing()
    got: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(300):
        envelope = json.loads((await client.next_message(timeout=20))[1])
        channel, number, _rest = envelope["data"].split(" ", 2)
        got[envelope["channel"]].append(int(number))
    assert got == {"a": list(range(150)), "b": list(range(150))}
    svc.hub.deliver(b"a", b"after")  # drained: direct again
    assert json.loads((await client.next_message())[1])["data"] == "after"
