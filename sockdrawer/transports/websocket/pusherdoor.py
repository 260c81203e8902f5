"""
The Pusher door of the WebSocket port: a handshake on ``/app/<key>`` (with
``--pusher-key``) opens a :class:`~sockdrawer.core.pusher.PusherSession`
instead of a raw socket; the session checks the key and the protocol
version once open, as Pusher does (an unknown key gets ``pusher:error``
4001 and a close with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from autobahn.websocket.types import ConnectionRequest

from sockdrawer import _private
from sockdrawer.core.pusher import PusherSession
from sockdrawer.core.v1 import Peer
from sockdrawer.transports.websocket.compression import acceptable_offers

#: where Pusher SDKs connect
PATH = "/app/"


class PusherDoor:
    """Mixed into the WebSocket server protocol."""

    factory: Any
    peer: str
    user: str | None
    key: bytes | None
    _counted_ip: str | None
    _session: Any
    #: the app key and protocol version of a Pusher handshake (``None``: not one)
    _pusher_open: tuple[str, str | None] | None = None

    def admit_pusher(self, request: ConnectionRequest, target: str) -> Any:
        """Accept a Pusher handshake (its key and version are answered once open)."""
        version = request.params.get("protocol", [None])[0]
        self._pusher_open = (target[len(PATH):], version)
        _private.set_extension_offers(self, acceptable_offers(request.extensions, self.factory.compression))
        self.key = b""
        return self.within_user_cap(lambda: None)

    def open_pusher(self) -> None:
        assert self._pusher_open is not None
        session = PusherSession(self.factory.pusher, self, Peer(self.peer, self.user, None, self._counted_ip))
        self._session = session
        session.open(*self._pusher_open)

    def end(self, code: int, reason: str) -> None:
        """Close with ``code`` (a Pusher session's refusal)."""
        self.sendCloseFrame(code=code, reasonUtf8=reason.encode("utf-8")[:123], isReply=False)

    if TYPE_CHECKING:  # the protocol's (its admission's, and Autobahn's)
        def within_user_cap(self, then: Any) -> Any: ...

        def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                           isReply: bool = False) -> None: ...
