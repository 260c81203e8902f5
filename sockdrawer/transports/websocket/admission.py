"""
The parts of a socket's admission around Autobahn's handshake: its address
counted against ``--max-connections-per-ip``, refusals with a reason of our
own, and the connect proxy asked who the browser is (``--connect-proxy``; the
node hands in the asking function, the transport never imports the HTTP side).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from sockdrawer import _private
from sockdrawer.core.tokens import Grant
from sockdrawer.core.v1 import SUBPROTOCOL
from sockdrawer.transports.websocket.handshake import _address


def uncount(counts: dict[str, int], key: str) -> None:
    """One fewer in ``counts[key]``; at none, the key goes."""
    left = counts.get(key, 1) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


class Admission:
    """Mixed into the WebSocket server protocol (see the module docstring)."""

    factory: Any
    peer: str
    _counted_ip: str | None
    _own_reason: str | None
    grant: Grant | None
    user: str | None
    _log: Any

    if TYPE_CHECKING:  # the protocol's own (Autobahn's, and its admission's last steps)
        def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None: ...

        def _admitted(self, request: ConnectionRequest, key: bytes, v1: bool) -> Any: ...

    def _count_ip(self, ip: str | None) -> bool:
        """Count this connection against its address; refuse with 429 when that is over the limit."""
        if not ip:
            return True
        factory = self.factory
        count = factory.per_ip.get(ip, 0) + 1
        factory.per_ip[ip] = count
        self._counted_ip = ip
        if count > factory.options.max_connections_per_ip:
            self._own_reason = "too many connections from this address"
            self.failHandshake(self._own_reason, 429)
            return False
        return True

    #: the user counted against --max-connections-per-user while open
    _counted_user: str | None = None

    #: the connection's id in webhook events (and the control API's ``client``), with --webhook
    client_id: str | None = None

    def count_user(self) -> None:
        """
        An open connection of its user (``--max-connections-per-user``), and
        its ``connect`` event (``--webhook``).
        """
        user = self.user
        lifecycle = self.factory.lifecycle
        if lifecycle is not None:
            self.client_id = secrets.token_urlsafe(9)
            lifecycle.connected(self.client_id, user, *self._lifecycle_where())
        if user is not None and self.factory.options.max_connections_per_user:
            per_user = self.factory.per_user
            per_user[user] = per_user.get(user, 0) + 1
            self._counted_user = user

    def _lifecycle_where(self) -> tuple[str, bytes | None]:
        """The transport and raw channel of this connection's webhook events."""
        if getattr(self, "streaming", False):
            return "sse", getattr(self, "_stream_key", None)
        session_only = getattr(self, "_v1", False) or getattr(self, "_pusher_open", None) is not None
        return "websocket", None if session_only else getattr(self, "key", None)

    def uncount_user(self) -> None:
        """The connection closed: no longer counted against its user; its ``disconnect`` event."""
        client = self.client_id
        if client is not None:
            self.client_id = None
            self.factory.lifecycle.disconnected(client, self.user, *self._lifecycle_where())
        user, self._counted_user = self._counted_user, None
        if user is not None:
            uncount(self.factory.per_user, user)

    def within_user_cap(self, then: Callable[[], Any]) -> Any:
        """
        ``then()``, once the connection's user has fewer than
        ``--max-connections-per-user`` open connections on every node (this
        node's counted here, the others' as their last census says); else 429.
        """
        cap = self.factory.options.max_connections_per_user
        user = self.user
        if not cap or user is None:
            return then()

        def decide(elsewhere: int) -> Any:
            if self.factory.per_user.get(user, 0) + elsewhere >= cap:
                self._deny(429, "too many connections for this user")
            return then()

        others = self.factory.options.user_connections
        if others is None:
            return decide(0)
        d: Deferred[int] = others(user)
        return d.addCallback(decide)

    def over_rate_limit(self) -> None:
        """Too many frames from the client: counted, one log line (the admin page lists it), closed with 1008."""
        self.factory.rate_limited += 1
        self._log.info("closing a socket from {peer}: over the frame rate limit (1008)", peer=self.peer)
        _private.fail_connection(self, 1008, "rate limit")

    def _deny(self, code: int, reason: str) -> NoReturn:
        self._own_reason = reason
        raise ConnectionDeny(code, reason)

    def ask_connect_proxy(self, proxy: Any, request: ConnectionRequest, target: str, key: bytes,
                          v1: bool) -> Deferred[Any]:
        """
        Ask the app's backend about this handshake (no token came with it):
        its answer admits the socket as the user it names, with the channels
        it allows; 401 or 403 refuse with that status; anything else with 503.
        """
        channel = key.decode("utf-8")
        info = {"transport": "websocket", "path": target, "channel": None if v1 else channel,
                "subprotocol": SUBPROTOCOL if v1 else None, "remote": _address(self.peer), "origin": request.origin}
        d: Deferred[Grant] = proxy(info, request.headers)

        def admitted(grant: Grant) -> Any:
            if not v1 and not grant.allows(channel):
                self._deny(ConnectionDeny.FORBIDDEN, "the connect proxy does not allow this channel")
            self.grant = grant
            self.user = grant.user
            if grant.expires != math.inf:
                self._expires_at = grant.expires
            return self._admitted(request, key, v1)

        def refused(failure: Failure) -> Any:
            status = getattr(failure.value, "status", None)
            if status is None:
                return failure  # a ConnectionDeny of ours, or an error: Autobahn's refusal
            self._deny(status, getattr(failure.value, "reason", "refused"))

        return d.addCallbacks(admitted, refused)

    _expires_at: float
