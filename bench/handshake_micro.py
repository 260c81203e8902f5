"""
Where the Python work of one opening handshake goes, without sockets: a
sockdrawer node's protocol over Twisted's ``StringTransport``, 20,000
handshakes of a plain request (``GET /ch<n>``, one channel each), timed in
two parts (``buildProtocol`` + ``makeConnection``, then ``dataReceived`` of
the request head up to the open socket); with ``--profile``, the
cumulative time of the main steps, scaled to the unprofiled total (the
profiler inflates every call; the shares hold).  Twisted's accept, the
reactor's dispatch and the system calls are not in it (``twisted_floor.py``
measures those)::

    python bench/handshake_micro.py [--profile] [--count 20000]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from sockdrawer.service import SockDrawerService

REQUEST = (b"GET /ch%d HTTP/1.1\r\nHost: 127.0.0.1:8020\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

#: (label, function name as cProfile names it) of the steps reported with --profile
STEPS = (
    ("connectionMade: the admission counts, around Autobahn's", "sockdrawer/transports/websocket/protocol.py",
     "connectionMade"),
    ("  of which Autobahn's connection setup", "autobahn/twisted/websocket.py", "connectionMade"),
    ("the fast path: the head parsed and checked, then all below", "sockdrawer/_private/of_autobahn.py",
     "fast_handshake"),
    ("  of which onConnect (tokens, origin, path, counts)", "sockdrawer/transports/websocket/protocol.py",
     "onConnect"),
    ("  of which Autobahn's succeedHandshake (the 101, state, onOpen)", "autobahn/websocket/protocol.py",
     "succeedHandshake"),
    ("    of which onOpen (the channel's group joined)", "sockdrawer/transports/websocket/protocol.py", "onOpen"),
    ("  of which the compaction of the open socket", "sockdrawer/transports/websocket/sendpath.py",
     "handshake_done"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    svc = SockDrawerService(port="tcp:0:interface=127.0.0.1", api="none", max_connections=10**7,
                            max_connections_per_ip=10**7, auto_ping_interval=0)
    factory = svc.factory
    addr = IPv4Address("TCP", "127.0.0.1", 4242)
    kept = []

    def run(count: int, first: int) -> tuple[float, float]:
        made = received = 0.0
        for i in range(first, first + count):
            t0 = time.perf_counter()
            proto = factory.buildProtocol(addr)
            proto.makeConnection(StringTransport(peerAddress=addr))
            t1 = time.perf_counter()
            proto.dataReceived(REQUEST % i)
            made += t1 - t0
            received += time.perf_counter() - t1
            kept.append(proto)
        return made, received

    run(2000, 0)  # warm up
    made, received = run(args.count, 10**6)
    n = args.count
    total = (made + received) / n * 1e6
    print(f"{total:.1f} µs per handshake: {made / n * 1e6:.1f} µs building the connection, "
          f"{received / n * 1e6:.1f} µs from the request head to the open socket")
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        run(args.count, 2 * 10**6)
        profile.disable()
        stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
        whole = sum(tt for (_, _, tt, _, _) in stats.values())
        scale = total / (whole / n * 1e6)
        for label, path, name in STEPS:
            cumulative = sum(ct for (file, _, func), (_, _, _, ct, _) in stats.items()
                             if func == name and file.endswith(path))
            print(f"  {cumulative / n * 1e6 * scale:5.1f} µs  {label}")


if __name__ == "__main__":
    main()
