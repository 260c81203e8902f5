"""
The WebSocket server factory: Autobahn's, with safe options, building
:class:`~sockdrawer.transports.websocket.protocol.SockDrawerServerProtocol`
sockets that share a :class:`~sockdrawer.transports.websocket.sockets.SocketRegistry`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketServerFactory
from twisted.internet.defer import Deferred

from sockdrawer import _private
from sockdrawer.core.interfaces import IChannelHub
from sockdrawer.core.subscriber import Source
from sockdrawer.transports.websocket.compression import accept_deflate
from sockdrawer.transports.websocket.options import WebSocketOptions
from sockdrawer.transports.websocket.protocol import SockDrawerServerProtocol
from sockdrawer.transports.websocket.sockets import FrameHandler, SocketRegistry
from sockdrawer.transports.websocket.timers import BucketTimer


class SockDrawerServerFactory(SocketRegistry, WebSocketServerFactory):
    """
    Builds :class:`SockDrawerServerProtocol` connections with safe, finite
    options: no status page (no open redirect), no ``Server`` header, size
    limits on incoming frames and messages, handshake timeouts, auto-ping.

    :param hub: where sockets subscribe.
    :param frame_handler: gets the frames browsers send; ``None`` ignores them.
    :param options: the transport's options (limits, timeouts, origins,
        compression, the token verifier); the defaults when ``None``.
    :param clock: the reactor (timers, rates, the next page of a replay).
    :param authorize: asks the listeners whether a socket may open or subscribe.
    """

    protocol = SockDrawerServerProtocol  # type: ignore[assignment]
    noisy = False  # no "Starting factory <... at 0x...>" lines

    def __init__(self, hub: IChannelHub, frame_handler: FrameHandler | None = None,
                 options: WebSocketOptions | None = None, *, clock: Any,
                 authorize: Callable[[Source], Deferred[bool] | None] | None = None) -> None:
        settings = options if options is not None else WebSocketOptions()
        WebSocketServerFactory.__init__(self, server="")
        SocketRegistry.__init__(self, hub, frame_handler, settings, clock, authorize)
        _private.set_connection_timer(self, BucketTimer(clock))
        extra: dict[str, Any] = {}
        if settings.compression:
            extra["perMessageCompressionAccept"] = accept_deflate
        self.setProtocolOptions(
            webStatus=False,
            maxFramePayloadSize=settings.max_message_size,
            maxMessagePayloadSize=settings.max_message_size,
            # counted by sockdrawer: open sockets only (Autobahn counts every
            # TCP connection, so silent ones would lock real clients out)
            maxConnections=0,
            openHandshakeTimeout=settings.open_handshake_timeout,
            closeHandshakeTimeout=settings.close_handshake_timeout,
            autoPingInterval=settings.auto_ping_interval,
            autoPingTimeout=settings.auto_ping_timeout,
            # origins are checked in onConnect, to answer 403 with a fixed reason
            allowedOrigins=["*"],
            allowNullOrigin=True,
            trustXForwardedFor=settings.trust_x_forwarded_for,
            # send the close code (1002, 1007, 1009) instead of just dropping TCP
            failByDrop=False,
            **extra,
        )

    def setProtocolOptions(self, *args: Any, **kwargs: Any) -> None:
        """
        As Autobahn's, and the options become class attributes of this
        factory's own protocol subclass: Autobahn then copies nothing into
        each connection (35 attributes, and a pretty-printed debug line it
        formats even with debug logging off), which saves memory and
        handshake time per socket.
        """
        super().setProtocolOptions(*args, **kwargs)
        self.protocol = _private.options_as_class(SockDrawerServerProtocol, self)  # type: ignore[assignment]

    def startFactory(self) -> None:
        super().startFactory()
        if self.freezer is not None:
            self.freezer.start()

