"""
What a connection of the WebSocket port does when its request asks for an
event stream: the WebSocket protocol class mixes this in, and hands the
request over as soon as its head is complete (before Autobahn parses it).
"""

from __future__ import annotations

from typing import Any

from sockdrawer.transports.sse.stream import EventStream, event_stream_request, open_stream


class StreamingConnection:
    """
    Mixed into the WebSocket server protocol: a request head that asks for
    ``text/event-stream`` becomes an :class:`EventStream` on the same
    connection (counted as an open connection like a socket, drained at
    shutdown like one); Autobahn never sees it.
    """

    factory: Any
    transport: Any
    #: the request asked for an event stream: Autobahn is out of it
    streaming = False
    #: the stream, once open
    stream: EventStream | None = None

    def take_stream_request(self, head: bytes, token: str | None) -> bool:
        """Whether ``head`` (the request head, up to its blank line) asked for a stream, which is then answered."""
        request = event_stream_request(head)
        if request is None:
            return False
        self.streaming = True
        self._token = None  # the stream's to check, then forgotten
        open_stream(self, request, token)
        return True

    def stream_opened(self, key: bytes) -> EventStream:
        """The stream is accepted: out of the handshake counts, into the open connections."""
        self._handshake_over()
        self._opened = True
        self.factory.open_sockets += 1
        self.stream = EventStream(self.factory.streams, self.transport, key, getattr(self, "peer", ""))
        return self.stream

    def stream_lost(self) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.lost()

    def onOpenHandshakeTimeout(self) -> None:
        # Autobahn's timer for the opening handshake: a stream has none
        if not self.streaming:
            super().onOpenHandshakeTimeout()  # type: ignore[misc]

    def _handshake_over(self) -> None:
        raise NotImplementedError

    _opened: bool
    _token: str | None
