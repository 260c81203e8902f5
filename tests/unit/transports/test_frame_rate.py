"""The frame rate limit of a socket: ``--frame-burst`` frames at once, then one per ``1/--max-frames-per-second``."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from sockdrawer.service import SockDrawerService

REQUEST = (b"GET /c HTTP/1.1\r\nHost: 127.0.0.1:8020\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def open_socket(burst: int, rate: float) -> tuple[Any, Clock]:
    svc = SockDrawerService(port="tcp:0:interface=127.0.0.1", api="none", auto_ping_interval=0,
                            max_frames_per_second=rate, frame_burst=burst)
    clock = Clock()
    clock.advance(1000.0)
    svc.factory.clock = clock
    addr = IPv4Address("TCP", "127.0.0.1", 4242)
    proto = svc.factory.buildProtocol(addr)
    proto.makeConnection(StringTransport(peerAddress=addr))
    proto.dataReceived(REQUEST)
    assert proto.state == proto.STATE_OPEN
    return proto, clock


def test_the_burst_then_one_frame_per_interval() -> None:
    """200 frames at once pass, a 201st at the same instant is refused; after the burst, a frame one full interval
    later passes and one half an interval after that is refused (the limit is exact, as a token bucket's)."""
    proto, clock = open_socket(200, 50.0)
    assert all(proto._take_frame() for _ in range(200))
    clock.advance(0.02)
    assert proto._take_frame()  # one interval (20 ms) later: one more
    clock.advance(0.01)
    assert not proto._take_frame()  # half an interval later: over the rate
    assert proto.factory.rate_limited == 1
    other, _ = open_socket(200, 50.0)
    assert all(other._take_frame() for _ in range(200))
    assert not other._take_frame()  # the 201st at the same instant


def test_a_quiet_socket_gets_its_whole_burst_back() -> None:
    """A socket that spent its burst and then sent nothing for burst intervals may send the whole burst again."""
    proto, clock = open_socket(3, 1.0)
    assert [proto._take_frame() for _ in range(3)] == [True] * 3
    clock.advance(3.0)
    assert [proto._take_frame() for _ in range(3)] == [True] * 3
    assert not proto._take_frame()
