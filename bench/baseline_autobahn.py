"""
The benchmark's baseline: a plain Twisted + Autobahn + txredisapi
Redis-to-WebSocket bridge written "as it comes", the way the libraries'
documentation suggests, with none of sockdrawer's work on top.

- ``WebSocketServerFactory`` with default options except ``webStatus=False``
  (so Nagle stays on: autobahn's ``tcpNoDelay`` ordering bug, STACK-NOTES 2.3);
- a dict path -> set of open protocols;
- one txredisapi ``SubscriberProtocol`` (``charset=None``, hiredis when
  installed) that PSUBSCRIBEs ``sock-drawer/*``;
- per message, one ``factory.prepareMessage()`` and a ``sendPreparedMessage()``
  to every socket of the path.

Message on Redis channel ``sock-drawer/<channel>`` -> every socket connected
to ``ws://host:port/<channel>``; a text frame when the payload is UTF-8, else
a binary frame.

Run by ``bench/run.py`` as::

    python bench/baseline_autobahn.py --port {port} --redis-port {redis_port} --no-click

``--no-click`` hides the ``click`` package from autobahn: when click is
importable (it is not an autobahn dependency; Flask brings it), autobahn
formats the arguments of a debug log call in every ``sendData()`` with
``click.style()`` even though debug logging is off, which costs about
20 us per frame sent.
"""

from __future__ import annotations

import argparse
import sys

if __name__ == "__main__" and "--no-click" in sys.argv:
    # autobahn.util.hl() colours every debug-log argument with click.style()
    # when click can be imported, even with debug logging off: sendData()
    # then costs ~20 us more per call.  click is not an autobahn dependency
    # (here it comes with Flask); hide it to measure autobahn as installed
    # on its own.
    sys.modules["click"] = None  # type: ignore[assignment]

import txredisapi
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.python import log

PREFIX = b"sock-drawer/"


class BridgeProtocol(WebSocketServerProtocol):
    path: str | None = None

    def onConnect(self, request):
        self.path = request.path

    def onOpen(self):
        self.factory.paths.setdefault(self.path, set()).add(self)

    def onClose(self, wasClean, code, reason):
        sockets = self.factory.paths.get(self.path)
        if sockets is not None:
            sockets.discard(self)
            if not sockets:
                del self.factory.paths[self.path]


class BridgeFactory(WebSocketServerFactory):
    protocol = BridgeProtocol

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.paths: dict[str, set[BridgeProtocol]] = {}

    def broadcast(self, path: str, message: bytes) -> None:
        sockets = self.paths.get(path)
        if not sockets:
            return
        try:
            message.decode("utf-8")
            binary = False
        except UnicodeDecodeError:
            binary = True
        prepared = self.prepareMessage(message, isBinary=binary)
        for proto in sockets:
            proto.sendPreparedMessage(prepared)


class RedisSubscriber(txredisapi.SubscriberProtocol):
    ws_factory: BridgeFactory

    def connectionMade(self):
        d = super().connectionMade()
        self.whenConnected().addCallback(lambda p: p.psubscribe([PREFIX + b"*"]))
        return d

    def messageReceived(self, pattern, channel, message):
        if channel.startswith(PREFIX):
            path = "/" + channel[len(PREFIX):].decode("utf-8", "replace")
            self.ws_factory.broadcast(path, message)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="WebSocket port (on --interface)")
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--redis-host", default="127.0.0.1")
    parser.add_argument("--redis-port", type=int, default=6379)
    parser.add_argument("--quiet", action="store_true", help="no Twisted log on stdout")
    parser.add_argument("--no-click", action="store_true",
                        help="hide the click package from autobahn (see the comment at the top)")
    args = parser.parse_args(argv)
    if not args.quiet:
        log.startLogging(sys.stdout)

    factory = BridgeFactory()
    factory.setProtocolOptions(webStatus=False)
    reactor.listenTCP(args.port, factory, interface=args.interface)

    class SubscriberFactory(txredisapi.SubscriberFactory):
        protocol = RedisSubscriber

        def buildProtocol(self, addr):
            p = super().buildProtocol(addr)
            p.ws_factory = factory
            return p

    subscribers = SubscriberFactory()
    subscribers.charset = None
    subscribers.convertNumbers = False
    subscribers.startConnecting(TCP4ClientEndpoint(reactor, args.redis_host, args.redis_port))
    reactor.run()


if __name__ == "__main__":
    main()
