"""
How an open socket's bytes leave: the direct path (straight to the kernel
while nothing waits in Twisted's buffer: the answer to the opening handshake,
the fan-out's frames), the queued path through Twisted's buffer, and the
slow-reader limits on what waits there.  A mixin of
:class:`~sockdrawer.transports.websocket.protocol.SockDrawerServerProtocol`;
the socket is its transport's streaming producer, so Twisted tells it when
its buffer fills past ``bufferSize`` (64 KiB) and when it has drained.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import IDelayedCall

from sockdrawer import _private
from sockdrawer.core.channels import printable
from sockdrawer.core.v1 import V1Session

CLOSE_POLICY_VIOLATION = 1008
#: Twisted's write-buffer size above which a socket counts as "too slow"
#: while the ``slow_timeout`` clock runs
HIGH_WATER = 64 * 1024
_STATE_OPEN = _private.GuardedServerProtocol.STATE_OPEN


class SendPath:
    """The sending side of a socket (see the module's docstring)."""

    factory: Any
    transport: Any
    state: int
    key: bytes | None
    peer: str
    _group: Any
    _session: Any
    _log: Any
    send_queue: Any
    sendCloseFrame: Callable[..., None]

    #: the socket, when the transport is a plain TCP or UNIX connection whose
    #: buffer the fast path may bypass (not TLS)
    _sock: socket.socket | None = None
    #: without ``_sock``: the Twisted TCP connection whose write buffer holds
    #: this socket's backlog (the one under TLS); with it, that is the transport
    _tcp: tcp.Connection | None = None
    _slow_timer: IDelayedCall | None = None
    #: set when cutting off a slow reader: no waiting for its buffer to drain
    _abort_on_close = False
    #: whether the transport took this socket as its producer (hears of its buffer filling and draining): the
    #: usual case, so the class holds True and only a socket it failed for holds False (read once open)
    _watched = True
    #: Twisted's BaseProtocol sets it to 1 in makeConnection and never back: as a class attribute it needs no
    #: room in each socket's dict (handshake_done drops the copy)
    connected = 1

    def attach_send_path(self) -> None:
        """At the open: find the socket for direct sends, and become the transport's producer."""
        conn, direct = _private.tcp_connection(self.transport)
        if direct:
            self._sock = conn.getHandle()  # type: ignore[union-attr]
        elif conn is not None:
            self._tcp = conn
        register = getattr(self.transport, "registerProducer", None)
        try:
            if register is None:
                raise RuntimeError("no producer support")
            register(self, True)
        except RuntimeError:  # no producer support, or one registered already (under a Site)
            self._watched = False

    def handshake_done(self) -> None:
        """Open, with everything the opening set: shrink what an idle socket keeps."""
        if self.__dict__.get("connected") == 1:
            del self.__dict__["connected"]
        _private.compact(self)
        conn = self._tcp if self._sock is None else self.transport
        if conn is not None:
            _private.compact_transport(conn)

    def send_now(self, data: bytes) -> int:
        """
        Send what Autobahn sends (the answer to the opening handshake,
        pings, pongs, close frames) and replies straight to the kernel while
        nothing waits in Twisted's buffer (plain TCP or UNIX): no write turn
        of the reactor, and the buffer stays untouched (and small).  Returns
        how many bytes went; the rest goes the usual way, behind them.
        """
        sock = self._sock
        if sock is None:
            if self.state != self.STATE_CONNECTING:  # type: ignore[attr-defined]
                return 0
            conn, direct = _private.tcp_connection(self.transport)
            if not direct:
                return 0
            sock = conn.getHandle()  # type: ignore[union-attr]
        if _private.has_write_backlog(self.transport) or len(self.send_queue):
            return 0
        try:
            sent: int = sock.send(data)
        except OSError:
            return 0
        return sent

    # -- delivery, driven by the ChannelGroup (fanout.Member)

    def direct_send(self) -> Callable[[bytes], int] | None:
        sock = self._sock
        if sock is None or _private.has_write_backlog(self.transport):
            return None
        return sock.send

    def deliver_queued(self, data: bytes) -> None:
        """
        Deliver ``data`` through Twisted's buffer, or directly when nothing
        waits there (then back to direct sends from the group, if any).  Also
        the outbox's ``write`` of a sockdrawer.v1 session: its frames take the
        same path, one call from the fan-out.
        """
        if self.state != _STATE_OPEN:
            return
        sock = self._sock
        if sock is not None and not _private.has_write_backlog(self.transport):
            # Twisted's buffer has drained: back to direct sends
            try:
                sent = sock.send(data)
            except OSError:
                sent = 0
            if sent == len(data):
                group = self._group
                if group is not None:
                    group.promote(self)
                return
            if sent:
                data = data[sent:]
        self.queueing()
        self.transport.write(data)
        self._check_backlog(len(data))

    def backlog(self, rest: bytes) -> None:
        self.queueing()
        self.transport.write(rest)
        self._check_backlog(len(rest))

    def queueing(self) -> None:
        """
        Bytes are about to wait in Twisted's buffer: no group may send to
        this socket directly until it has drained (a direct write would land
        in the middle of what waits).  The channel group, and the envelope
        groups of its sockdrawer.v1 subscriptions, stop; each finds out
        again that the buffer drained when it next writes through it.
        """
        group = self._group
        if group is not None:
            group.demote(self)
        session = self._session
        if isinstance(session, V1Session):
            for sub in session.subscriptions.values():
                forget = getattr(sub.group, "forget", None)
                if forget is not None:
                    forget(sub)

    def _check_backlog(self, just_queued: int) -> None:
        """
        Enforce the slow-reader limits after ``just_queued`` bytes went into
        Twisted's buffer: over ``send_buffer`` bytes queued *before* them
        means the socket fell that far behind; above the high-water mark
        starts (or keeps) the ``slow_timeout`` clock.
        """
        buffered = self._buffered()
        if buffered > HIGH_WATER:
            factory = self.factory
            if buffered - just_queued > factory.send_buffer:
                self._cut_off("queued too much")
            elif self._slow_timer is None and factory.slow_timeout > 0 and not self._watched:
                # no producer registered (a transport without producer
                # support): time from here, check at the end
                self._slow_timer = factory.clock.callLater(factory.slow_timeout, self._check_slow)

    # -- Twisted's producer API (the socket is its transport's streaming
    # producer): the buffer went over bufferSize / drained

    def pauseProducing(self) -> None:
        self.buffer_full()

    def resumeProducing(self) -> None:
        self.buffer_drained()

    def stopProducing(self) -> None:
        pass

    def buffer_full(self) -> None:
        """Twisted's write buffer went over its limit (64 KiB): start the ``slow_timeout`` clock."""
        factory = self.factory
        if self._slow_timer is None and factory.slow_timeout > 0 and self.state == _STATE_OPEN:
            self._slow_timer = factory.clock.callLater(factory.slow_timeout, self._stayed_slow)

    def buffer_drained(self) -> None:
        """Twisted's write buffer is empty again: the socket kept up."""
        self._cancel_slow_timer()

    def _stayed_slow(self) -> None:
        self._slow_timer = None
        if self._group is not None or self._session is not None:
            self._cut_off("stayed too slow")

    def _buffered(self) -> int:
        """Bytes waiting in Twisted for this socket."""
        conn = self._tcp if self._sock is None else self.transport
        return 0 if conn is None else _private.write_backlog(conn)

    def _check_slow(self) -> None:
        self._slow_timer = None
        if (self._group is not None or self._session is not None) and self._buffered() > HIGH_WATER:
            self._cut_off("stayed too slow")

    def _cut_off(self, why: str) -> None:
        self._cancel_slow_timer()
        if self.state != _STATE_OPEN:
            return
        self._log.info(
            "cutting off a slow reader on {channel!r} from {peer}: {why}",
            channel=printable(self.key),
            peer=self.peer,
            why=why,
        )
        self.factory.slow_cut_offs += 1
        # a slow reader's backlog may never drain: without a close
        # handshake timer, abort instead of waiting for it
        self._abort_on_close = True
        self.sendCloseFrame(code=CLOSE_POLICY_VIOLATION, reasonUtf8=b"slow reader", isReply=False)

    def _cancel_slow_timer(self) -> None:
        timer, self._slow_timer = self._slow_timer, None
        if timer is not None and timer.active():
            timer.cancel()
