"""The private state of twisted that sockdrawer relies on (see :mod:`sockdrawer._private`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.internet import ClientService
from twisted.internet import tcp
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import FilteringLogObserver, Logger, LogLevel, LogLevelFilterPredicate, globalLogPublisher


def write_backlog(conn: tcp.Connection) -> int:
    """
    Bytes waiting in Twisted for ``conn``.

    Assumption (Twisted ``abstract.FileDescriptor``): unsent bytes are
    ``_tempDataLen`` (written since the last doWrite) plus ``dataBuffer``
    from ``offset`` on.
    """
    pending: int = conn._tempDataLen + len(conn.dataBuffer) - conn.offset
    return pending


def has_write_backlog(conn: tcp.Connection) -> bool:
    """
    Whether any byte waits in Twisted for ``conn`` (the same attributes as
    :func:`write_backlog`; an empty buffer is ``b""`` with ``_tempDataLen`` 0).
    """
    return bool(conn._tempDataLen or conn.dataBuffer)


#: attributes of a Twisted TCP connection that hold their class default while it idles
#: (nothing waits in its buffer), and the one only ``__init__`` reads
_TRANSPORT_DEFAULTS = (("dataBuffer", b""), ("offset", 0), ("producer", None), ("streamingProducer", False))
_TRANSPORT_INIT_ONLY = ("hostname",)


def compact_transport(conn: tcp.Connection) -> None:
    """
    Shrink an open TCP connection's instance dict: drop the attributes that
    hold their class defaults and the one read only while it was built, then
    rebuild the dict (it grew one key at a time: a rebuilt one is about half
    the size).

    Assumptions (Twisted ``abstract.FileDescriptor`` and ``tcp.Server``):
    ``dataBuffer``, ``offset``, ``producer`` and ``streamingProducer`` are
    class attributes with these defaults, which instance values shadow only
    while set; ``hostname`` is read only in ``Server.__init__`` (for
    ``logstr``).
    """
    state = conn.__dict__
    for name, default in _TRANSPORT_DEFAULTS:
        value = state.get(name, default)
        if type(value) is type(default) and value == default:
            state.pop(name, None)
    for name in _TRANSPORT_INIT_ONLY:
        state.pop(name, None)
    conn.__dict__ = dict(state)


def handling_request(channel: Any) -> bool:
    """
    Whether an HTTP connection has a whole request in hand (received, its
    answer not finished): the API's connection limit evicts the others (idle,
    or still receiving a request, as a slowloris client always is).

    Assumptions (Twisted ``http``): a ``Site`` builds a
    ``_GenericHTTPChannelProtocol`` whose ``_channel`` is the
    ``HTTPChannel``; the channel's ``_handlingRequest`` is set when a
    request's content has all arrived and cleared when its response is
    finished.
    """
    # not an HTTP channel: nothing to tell, so never evicted
    return bool(getattr(getattr(channel, "_channel", channel), "_handlingRequest", True))


def tcp_connection(transport: Any) -> tuple[tcp.Connection | None, bool]:
    """
    The Twisted TCP (or UNIX) connection whose write buffer holds this
    transport's backlog, and whether bytes may be sent straight to its socket
    (not when TLS is in between).

    Assumption: ``tcp.Connection`` (which UNIX connections subclass) is
    where Twisted buffers writes; a ``TLSMemoryBIOProtocol`` wraps one as
    its ``transport``.  The TLS checks themselves are public
    (``ISSLTransport``).
    """
    if isinstance(transport, tcp.Connection):
        return transport, not ISSLTransport.providedBy(transport)
    inner = getattr(transport, "transport", None)
    if isinstance(inner, tcp.Connection):
        return inner, False
    return None, False




def watch_process_end(monitor: Any, name: str, ended: Callable[[int, Any], None]) -> int | None:
    """
    The pid of the process ``monitor`` (a ``ProcessMonitor``) just started
    as ``name``, and have ``ended(pid, reason)`` called after the monitor's
    own handling when it exits; ``None`` when it could not be spawned.

    Assumption: ``ProcessMonitor.startProcess`` keeps the process protocol in
    ``monitor.protocols[name]`` and its own restart scheduling in that
    protocol's ``processEnded``.
    """
    proto = monitor.protocols.get(name)
    if proto is None or proto.transport is None:
        return None
    pid: int = proto.transport.pid
    own = proto.processEnded

    def processEnded(reason: Any) -> None:
        own(reason)  # ProcessMonitor's own: schedules the restart
        ended(pid, reason)

    proto.processEnded = processEnded
    return pid


def restart_pending(monitor: Any, name: str) -> Any:
    """
    The delayed call that will restart ``name`` (or ``None``).

    Assumption: ``ProcessMonitor`` keeps them in ``monitor.restart[name]``.
    """
    return monitor.restart.get(name)


def running_processes(monitor: Any) -> int:
    """
    How many processes ``monitor`` has running.

    Assumption: ``ProcessMonitor`` keeps one protocol per running process in
    ``monitor.protocols``.
    """
    return len(monitor.protocols)


class QuietClientService(ClientService):
    """
    A ``ClientService`` without its info line for each retry ("Scheduling
    retry 2 to connect <HostnameEndpoint ...> in 0.5284137140728176
    seconds"): the Redis links say once, in their own words, what failed and
    when the next try is (``sockdrawer.brokers.linkparts.RetryLog``).  Its
    warnings and errors still reach the log.

    Assumption (Twisted ``application._client_service``): ``ClientService``
    logs through its class attribute ``_log``, a ``Logger`` that ``__init__``
    hands to its state machine.
    """

    _log = Logger(observer=FilteringLogObserver(globalLogPublisher,
                                                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)]))
