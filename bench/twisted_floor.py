"""
The least a Twisted server does to open a WebSocket: a plain ``Protocol``
that answers the opening handshake with a 101 computed from the key and
then ignores the socket (no Autobahn, no checks, no Redis).  What it costs
per connection is Twisted's part (accept, ``tcp.Server``, the reactor's
dispatch of each event) plus the kernel's; sockdrawer's handshake costs that
much and what Autobahn and sockdrawer do on top.  It holds one Redis
``PSUBSCRIBE`` (the harness waits for one) and delivers nothing: only for
the idle scenarios::

    python bench/run.py --scenario idle --no-baseline --label twisted-floor \\
        --server-cmd "{python} bench/twisted_floor.py --port {port} --redis-port {redis_port}"
"""

from __future__ import annotations

import argparse
import base64
import hashlib

from twisted.internet import protocol, reactor

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Answer(protocol.Protocol):
    head = b""

    def dataReceived(self, data: bytes) -> None:
        if self.head is None:
            return  # open: frames are ignored
        head = self.head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            self.head = head
            return
        self.head = None  # type: ignore[assignment]
        key = b""
        for line in head[:end].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


class Subscribe(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$13\r\nsock-drawer/*\r\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True, help="ignored (the harness passes it)")
    args = parser.parse_args()
    reactor.listenTCP(args.port, protocol.Factory.forProtocol(Answer), backlog=1024, interface="127.0.0.1")
    protocol.ClientCreator(reactor, Subscribe).connectTCP("127.0.0.1", args.redis_port)
    reactor.run()


if __name__ == "__main__":
    main()
