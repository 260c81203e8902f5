"""
What a connection of the WebSocket port does when its request asks for an
event stream: the WebSocket protocol class mixes this in, and hands the
request over as soon as its head is complete (before Autobahn parses it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sockdrawer.transports.sse.admission import answer_post, answer_preflight, open_stream
from sockdrawer.transports.sse.stream import EventStream, StreamRequest, event_stream_request


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

    #: a POST for a stream's session, while its body arrives
    _post: StreamRequest | None = None
    _body = b""

    def take_stream_request(self, data: bytes, end: int, token: str | None) -> bool:
        """
        Whether the request in ``data`` (its head ends at ``end``) is one for
        the event-stream side, which then answers it: a stream, a post for
        a stream's session (its body may follow), or a preflight.
        """
        request = event_stream_request(data[:end])
        if request is None:
            return False
        self.streaming = True
        self._token = None  # the stream's to check, then forgotten
        if request.method == "GET":
            open_stream(self, request, token)
        elif request.method == "OPTIONS":
            answer_preflight(self, request)
        else:
            self._post = request
            self.stream_data(data[end + 4:])
        return True

    def stream_data(self, data: bytes) -> None:
        """Bytes after a stream request's head: a post's body, up to its ``Content-Length``."""
        request = self._post
        if request is None:
            return  # a stream's client has nothing more to say
        self._body += data
        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > self.factory.options.max_message_size:
            self._post = None
            answer_post(self, request, None)
        elif len(self._body) >= int(length):
            self._post = None
            answer_post(self, request, self._body[:int(length)])

    def stream_opened(self, key: bytes) -> EventStream:
        """The stream is accepted: out of the handshake counts, into the open connections."""
        self._handshake_over()
        self._opened = True
        self.factory.open_sockets += 1
        self._stream_key = key
        self.count_user()
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

    if TYPE_CHECKING:  # the WebSocket protocol's (its admission mixin)
        def count_user(self) -> None: ...

    _opened: bool
    _token: str | None
    #: the raw stream's channel (``None`` for a v1 stream)
    _stream_key: bytes | None = None
