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
#: more defaults, which the compact ``tcp.Server`` classes (:func:`_compact_class`) hold
_SERVER_DEFAULTS = (("connected", 1), ("_tempDataLen", 0))


class _OwnOrMade:
    """
    A data descriptor for a per-connection attribute a compact class can
    make from what the connection holds anyway: the instance's own value when
    it has one (set, not yet dropped), else ``make(conn)``; deleting drops
    the own value.
    """

    __slots__ = ("_name", "_make")

    def __init__(self, name: str, make: Callable[[Any], Any]) -> None:
        self._name = name
        self._make = make

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        own = obj.__dict__.get(self._name, _MISSING)
        return own if own is not _MISSING else self._make(obj)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self._name] = value

    def made(self, obj: Any) -> Any:
        """What reading gives once ``obj`` has no value of its own."""
        return self._make(obj)

    def __delete__(self, obj: Any) -> None:
        obj.__dict__.pop(self._name, None)


_MISSING = object()


class _EmptyBuffer:
    """``_tempDataBuffer`` of a compact connection: a list of its own on first use (a non-data descriptor)."""

    __slots__ = ()

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        buffer: list[bytes] = []
        obj.__dict__["_tempDataBuffer"] = buffer
        return buffer


def _socket_fileno(conn: Any) -> Callable[[], int]:
    sock = conn.__dict__.get("socket")
    # gone (closed): FileDescriptor's own, which answers -1, as after Twisted's ``del self.fileno``
    return sock.fileno if sock is not None else super(tcp.Connection, conn).fileno  # type: ignore[no-any-return]


_compact_classes: dict[tuple[str, str, str], type] = {}


def _compact_class(conn: tcp.Server) -> type | None:
    """
    The compact subclass of ``tcp.Server`` for ``conn``, made once per log
    prefix and port: it makes ``logstr``, ``repstr`` and ``fileno`` from the
    connection's session number, client address and socket when read, and
    holds the defaults of :data:`_SERVER_DEFAULTS` and an empty
    ``_tempDataBuffer``.  ``None`` when ``conn``'s strings are not the shape
    ``Server.__init__`` builds.
    """
    state = conn.__dict__
    number, host = state.get("sessionno"), state.get("client", (None,))[0]
    logstr, repstr = state.get("logstr"), state.get("repstr")
    if not isinstance(logstr, str) or not isinstance(repstr, str) or not isinstance(number, int):
        return None
    suffix = f",{number},{host}"
    head, mark, tail = repstr.partition(f" #{number} on ")
    if not logstr.endswith(suffix) or not mark:
        return None
    prefix, head, tail = logstr[: -len(suffix)], head + " #", " on " + tail
    made = _compact_classes.get((prefix, head, tail))
    if made is None:
        attributes: dict[str, Any] = {
            "logstr": _OwnOrMade("logstr", lambda c: f"{prefix},{c.sessionno},{c.client[0]}"),
            "repstr": _OwnOrMade("repstr", lambda c: f"{head}{c.sessionno}{tail}"),
            "fileno": _OwnOrMade("fileno", _socket_fileno),
            "_tempDataBuffer": _EmptyBuffer(),
            **dict(_SERVER_DEFAULTS),
        }
        made = _compact_classes[(prefix, head, tail)] = type("CompactServer", (tcp.Server,), attributes)
    return made


def compact_transport(conn: tcp.Connection) -> None:
    """
    Shrink an open TCP connection's instance dict: drop the attributes that
    hold their class defaults and the one read only while it was built, then
    rebuild the dict (it grew one key at a time: a rebuilt one is about half
    the size).  A ``tcp.Server`` (not a subclass) also becomes a compact
    subclass (:func:`_compact_class`) and drops its log and repr strings,
    its ``fileno`` (the socket's bound method), its empty write list and the
    defaults of :data:`_SERVER_DEFAULTS`: each reads the same as before.

    Assumptions (Twisted ``abstract.FileDescriptor``, ``tcp.Connection`` and
    ``tcp.Server``): ``dataBuffer``, ``offset``, ``producer`` and
    ``streamingProducer`` are class attributes with these defaults, which
    instance values shadow only while set; ``hostname`` is read only in
    ``Server.__init__`` (for ``logstr``); ``logstr`` is
    ``"<prefix>,<sessionno>,<client host>"`` and ``repstr``
    ``"<... #<sessionno> on <port>>"``, set once in ``__init__``;
    ``fileno`` is the socket's bound ``fileno``, deleted with the socket at
    the close (FileDescriptor's own answers -1 after that); ``connected``
    is 1 while open and ``_tempDataLen``/``_tempDataBuffer`` are 0 and an
    empty list while nothing was written since the last ``doWrite``, each
    replaced (never changed in place except by ``write``'s ``append``) as
    they change.
    """
    state = conn.__dict__
    for name, default in _TRANSPORT_DEFAULTS:
        value = state.get(name, default)
        if type(value) is type(default) and value == default:
            state.pop(name, None)
    for name in _TRANSPORT_INIT_ONLY:
        state.pop(name, None)
    made = _compact_class(conn) if type(conn) is tcp.Server else None
    if made is not None:
        conn.__class__ = made
        for name, default in _SERVER_DEFAULTS:
            value = state.get(name, default)
            if type(value) is type(default) and value == default:
                state.pop(name, None)
        if state.get("_tempDataBuffer", None) == []:
            del state["_tempDataBuffer"]
        fileno = state.get("fileno")
        if getattr(fileno, "__self__", None) is state.get("socket", _MISSING):
            del state["fileno"]
        for name in ("logstr", "repstr"):
            if state.get(name) == getattr(made, name).made(conn):
                del state[name]
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
