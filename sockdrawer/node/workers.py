"""
``--workers N``: N processes accepting on the same port, supervised.

With ``--workers`` above 1, ``twistd sockdrawer`` becomes a supervisor
(:class:`WorkerSupervisor`). It binds the WebSocket address itself (with
``SO_REUSEPORT``, without listening: this reserves the port and, for port 0,
picks it), then runs N workers through Twisted's
:class:`~twisted.runner.procmon.ProcessMonitor`: each worker is
``twistd -n sockdrawer`` with the same options and the environment variable
``SOCKDRAWER_WORKER=<index>`` (``SOCKDRAWER_WORKER_PORT`` carries the port).
A worker is a complete :class:`~sockdrawer.service.SockDrawerService` with
its own Redis subscription; it listens with its own ``SO_REUSEPORT`` socket
(:class:`ReusePortEndpoint`), so the kernel spreads new connections over the
workers, and its HTTP API listens on the ``--api`` port plus its index.

The supervisor restarts a worker that exits (with ProcessMonitor's backoff
when it keeps dying young) and logs why it exited. On SIGTERM it sends
SIGTERM to every worker, which drains as a single node does, and exits once
they all have; a worker still running after
``drain_delay + drain_window + shutdown_timeout + KILL_MARGIN`` seconds gets
SIGKILL. Workers log JSON lines on their standard output; the supervisor
decodes them and logs them as its own events, prefixed ``[worker-<index>]``.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer, error, fdesc, main
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import quoteStringArgument
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReadDescriptor, IStreamServerEndpoint
from twisted.logger import Logger, LogLevel, eventFromJSON
from twisted.python.failure import Failure
from twisted.runner.procmon import ProcessMonitor
from zope.interface import implementer

from sockdrawer import _private
from sockdrawer.config import Settings, endpoint_string

if TYPE_CHECKING:
    from sockdrawer.node.service import SockDrawerService

_log = Logger(namespace="sockdrawer")

#: set by the supervisor in each worker's environment: the worker's index
WORKER_ENV = "SOCKDRAWER_WORKER"
#: set by the supervisor in each worker's environment: the WebSocket port number
WORKER_PORT_ENV = "SOCKDRAWER_WORKER_PORT"
#: seconds a worker gets after the drain (delay, window, shutdown timeout) before SIGKILL
KILL_MARGIN = 10
#: a worker that dies within this many seconds of its start is restarted with a growing delay
YOUNG_DEATH = 10
#: the longest wait before restarting a worker that keeps dying young, in seconds
MAX_RESTART_DELAY = 60

_TWISTD = "from twisted.scripts.twistd import run; run()"


# -- endpoints -----------------------------------------------------------------


@dataclass(frozen=True)
class TCPAddress:
    """A ``tcp:`` or ``tcp6:`` server endpoint, as the worker binds it."""

    kind: str  # "tcp" or "tcp6"
    host: str
    port: int
    backlog: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.kind == "tcp6" or ":" in self.host else socket.AF_INET

    def with_port(self, port: int) -> TCPAddress:
        return TCPAddress(self.kind, self.host, port, self.backlog)

    def description(self) -> str:
        """Back to an endpoint string Twisted parses."""
        text = f"{self.kind}:{self.port}:backlog={self.backlog}"
        if self.host:
            text += f":interface={quoteStringArgument(self.host)}"
        return text


def _split(description: str) -> list[str]:
    """Split an endpoint string on its unescaped colons (``\\:`` is a colon inside an argument)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(description)
    for c in chars:
        if c == "\\":
            current.append(next(chars, ""))
        elif c == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(c)
    parts.append("".join(current))
    return parts


def parse_tcp(option: str, value: str | int, backlog: int | None = None) -> TCPAddress:
    """
    Read a port number or a ``tcp:``/``tcp6:`` endpoint string.

    :raises ValueError: ``"--workers above 1 supports tcp: endpoints ..."``
        for any other endpoint type (TLS, UNIX sockets, systemd).
    """
    description = endpoint_string(value, backlog)
    kind, *args = _split(description)
    kind = kind.lower()
    if kind not in ("tcp", "tcp6"):
        raise ValueError(
            f"--workers above 1 supports tcp: endpoints (and port numbers) for {option}, not {str(value)!r}: "
            "every worker binds the same TCP port with SO_REUSEPORT; terminate TLS at a proxy in front")
    positional = [a for a in args if "=" not in a]
    named = dict(a.split("=", 1) for a in args if "=" in a)
    order = ("port", "interface", "backlog") if kind == "tcp" else ("port", "backlog", "interface")
    for name, arg in zip(order, positional, strict=False):
        named.setdefault(name, arg)
    try:
        port = int(named["port"])
        listen_backlog = int(named.get("backlog", 50))
    except (KeyError, ValueError):
        raise ValueError(f"{option}: bad endpoint {str(value)!r}: no port number") from None
    host = named.get("interface", "::" if kind == "tcp6" else "")
    return TCPAddress(kind, host, port, listen_backlog)


def check_workers(settings: Settings) -> None:
    """
    What ``--workers`` above 1 needs besides ``--redis`` (checked by
    :meth:`Settings.validate`): ``tcp:`` endpoints, and API ports
    (``--api`` port + index) that do not run into the WebSocket port.

    :raises ValueError: with a one-line message.
    """
    if settings.workers <= 1:
        return
    ws = parse_tcp("--port", settings.port)
    if not settings.api_enabled:
        return
    assert settings.api is not None
    api = parse_tcp("--api", settings.api)
    if api.port and api.port + settings.workers - 1 > 65535:
        raise ValueError(f"--api: worker {settings.workers - 1} would listen on port "
                         f"{api.port + settings.workers - 1}, above 65535")
    if api.port and ws.port and api.port <= ws.port < api.port + settings.workers:
        raise ValueError(f"--api: workers listen on API ports {api.port} to {api.port + settings.workers - 1} "
                         f"(port + worker index), which includes the WebSocket port {ws.port}")


def worker_api(api: str | int, index: int) -> str:
    """Worker ``index``'s API endpoint: the ``--api`` port plus ``index`` (port 0 stays 0)."""
    address = parse_tcp("--api", api)
    if address.port:
        address = address.with_port(address.port + index)
    return address.description()


def reuseport_socket(address: TCPAddress) -> socket.socket:
    """A TCP socket bound to ``address`` with ``SO_REUSEADDR`` and ``SO_REUSEPORT``, not listening yet."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        host = address.host or ("::" if address.family == socket.AF_INET6 else "")
        sock.bind((host, address.port))
    except BaseException:
        sock.close()
        raise
    return sock


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """
    A server endpoint listening with ``SO_REUSEPORT``: several processes
    listen on the same address and the kernel spreads connections over them.
    Twisted's ``tcp:`` endpoint has no such option; this creates the socket
    and hands it to :meth:`~twisted.internet.interfaces.IReactorSocket.adoptStreamPort`.
    """

    def __init__(self, reactor: Any, address: TCPAddress) -> None:
        self._reactor = reactor
        self.address = address

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return defer.execute(self._listen, factory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        sock = reuseport_socket(self.address)
        try:
            sock.listen(self.address.backlog)
            sock.setblocking(False)
            port: IListeningPort = self._reactor.adoptStreamPort(sock.fileno(), sock.family, factory)
            return port
        finally:
            sock.close()  # the reactor listens on its own duplicate


# -- the worker side -----------------------------------------------------------


def worker_index(environ: Mapping[str, str]) -> int | None:
    """This process's worker index, or ``None`` when it is not a worker."""
    raw = environ.get(WORKER_ENV)
    return int(raw) if raw is not None and raw.isdigit() else None


def make_worker(settings: Settings, environ: Mapping[str, str], reactor: Any = None) -> SockDrawerService:
    """
    The service of worker ``$SOCKDRAWER_WORKER``: a complete node, listening
    with ``SO_REUSEPORT`` on ``$SOCKDRAWER_WORKER_PORT``, its API on the
    ``--api`` port plus its index.
    """
    from sockdrawer.node.service import SockDrawerService

    if reactor is None:
        from twisted.internet import reactor
    index = worker_index(environ)
    assert index is not None, f"{WORKER_ENV} is not set"
    address = parse_tcp("--port", settings.port, settings.backlog)
    port = environ.get(WORKER_PORT_ENV, "")
    if port.isdigit():
        address = address.with_port(int(port))
    if settings.api_enabled:
        assert settings.api is not None
        settings = settings.replace(api=worker_api(settings.api, index))
    service = SockDrawerService(settings, reactor)
    service.websocket.endpoint = ReusePortEndpoint(reactor, address)
    service.websocket.description = address.description()
    WorkerProcess(index, settings.workers, reactor).setServiceParent(service)
    return service


@implementer(IReadDescriptor)
class _SupervisorPipe:
    """Standard input, a pipe from the supervisor: end of file means the supervisor is gone."""

    def __init__(self, gone: Callable[[], None]) -> None:
        self._gone = gone

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor-pipe"

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason: Failure) -> None:
        self._gone()


class WorkerProcess(Service):
    """
    What makes a node a good worker: the first SIGTERM or SIGINT drains, a
    second one (systemd's ``KillMode=control-group`` and a terminal's Ctrl-C
    signal every process, then the supervisor signals its workers) is
    ignored instead of stopping a stopped reactor; and when the supervisor
    dies (its pipe on standard input closes), the worker stops too instead
    of holding the port as an orphan.
    """

    def __init__(self, index: int, count: int, reactor: Any) -> None:
        self.index = index
        self.count = count
        self._reactor = reactor
        self._pipe: _SupervisorPipe | None = None
        self._stopping = False

    def startService(self) -> None:
        super().startService()
        _log.info("worker {worker} (pid {pid}) of {count}", worker=self.index, pid=os.getpid(), count=self.count)
        self._reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)
        # after the reactor's own signal handlers are installed
        self._reactor.callWhenRunning(self._install)

    def _shutting_down(self) -> None:
        self._stopping = True

    def _install(self) -> None:
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def once(signum: int, frame: Any) -> None:
            for sig in handlers:
                signal.signal(sig, signal.SIG_IGN)
            original = handlers[signal.Signals(signum)]
            if callable(original):
                original(signum, frame)

        for sig, original in handlers.items():
            if callable(original):
                signal.signal(sig, once)
        if stat.S_ISFIFO(os.fstat(0).st_mode):
            fdesc.setNonBlocking(0)
            self._pipe = _SupervisorPipe(self._supervisor_gone)
            self._reactor.addReader(self._pipe)

    def _supervisor_gone(self) -> None:
        self._pipe = None
        if not self._stopping:
            self._stopping = True
            _log.warn("worker {worker}: the supervisor is gone (its pipe closed); stopping", worker=self.index)
            self._reactor.stop()

    def stopService(self) -> None:
        super().stopService()
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            self._reactor.removeReader(pipe)


# -- the supervisor side -------------------------------------------------------


class WorkerLog(Logger):
    """
    ProcessMonitor's logger for the workers' output: a line that is a JSON
    log event (what workers write) is logged as that event, with
    ``[worker-<index>]`` in front of its text and a ``sockdrawer_worker``
    field; any other line (a traceback on standard error) as itself; an
    empty line not at all.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: Any) -> None:
        line = kwargs.get("line")
        tag = kwargs.get("tag")
        if line == "":
            return  # ProcessMonitor ends every worker's output with an empty line
        if isinstance(line, str) and line.startswith("{") and isinstance(tag, str):
            try:
                event = eventFromJSON(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("log_format"), str):
                event["log_format"] = f"[{tag}] {event['log_format']}"
                event["sockdrawer_worker"] = int(tag.rsplit("-", 1)[-1])
                self.observer(event)
                return
        super().emit(level, format, **kwargs)


def _exit_text(reason: Failure) -> str:
    value = reason.value
    if isinstance(value, error.ProcessTerminated):
        if value.signal is not None:
            return f"killed by signal {value.signal}"
        return f"exit status {value.exitCode}"
    if isinstance(value, error.ProcessDone):
        return "exit status 0"
    return reason.getErrorMessage()


class WorkerMonitor(ProcessMonitor):
    """
    ProcessMonitor (restarts, backoff, SIGTERM then SIGKILL), plus a log line
    for each worker start and exit and a Deferred for "all have exited".
    """

    threshold = YOUNG_DEATH
    maxRestartDelay = MAX_RESTART_DELAY

    def __init__(self, reactor: Any) -> None:
        super().__init__(reactor)
        self._now = reactor.seconds
        self.log = WorkerLog(namespace="sockdrawer")
        #: the current pid of each running worker, by process name
        self.pids: dict[str, int] = {}
        self._all_exited: list[Deferred[None]] = []

    def startProcess(self, name: str) -> None:
        super().startProcess(name)
        pid = _private.watch_process_end(self, name, lambda pid, reason: self._exited(name, pid, reason))
        if pid is None:
            return  # could not spawn: ProcessMonitor has scheduled another try
        self.pids[name] = pid
        _log.info("{name} started (pid {pid})", name=name, pid=pid)

    def _exited(self, name: str, pid: int, reason: Failure) -> None:
        if self.pids.get(name) == pid:
            del self.pids[name]
        restart = _private.restart_pending(self, name)
        if self.running and restart is not None and restart.active():
            _log.warn("{name} (pid {pid}) exited ({why}); restarting in {delay:.0f} s", name=name, pid=pid,
                      why=_exit_text(reason), delay=max(0.0, restart.getTime() - self._now()))
        else:
            _log.info("{name} (pid {pid}) stopped ({why})", name=name, pid=pid, why=_exit_text(reason))
        if not _private.running_processes(self):
            waiters, self._all_exited = self._all_exited, []
            for d in waiters:
                d.callback(None)

    def when_all_exited(self) -> Deferred[None]:
        """A Deferred firing once no worker process is running."""
        if not _private.running_processes(self):
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._all_exited.append(d)
        return d


class WorkerSupervisor(Service):
    """
    The parent process of ``--workers N``: reserves the WebSocket port and
    runs N workers on it (see the module docstring).

    :param settings: the validated settings (``workers`` above 1).
    :param argv: the ``sockdrawer`` subcommand's arguments, passed to each worker as they are.
    :param environ: the environment the workers inherit.
    :param reactor_name: the supervisor's ``twistd --reactor``, for the workers too.
    """

    #: under twistd: a bind failure ends the process with a one-line message
    exit_on_failure = False

    def __init__(self, settings: Settings, argv: Sequence[str], environ: Mapping[str, str],
                 reactor: Any = None, python: str = sys.executable, reactor_name: str | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        check_workers(settings)
        self.settings = settings
        self.argv = list(argv)
        self.environ = dict(environ)
        self.python = python
        self.reactor_name = reactor_name
        self._reactor = reactor
        self.address = parse_tcp("--port", settings.port, settings.backlog)
        self.monitor = WorkerMonitor(reactor)
        self.monitor.killTime = math.ceil(settings.drain_delay + settings.drain_window + settings.shutdown_timeout
                                          + KILL_MARGIN)
        self._reserved: socket.socket | None = None

    def worker_argv(self) -> list[str]:
        """The command line of every worker."""
        twistd = ["--nodaemon", "--pidfile=", "--logger=sockdrawer.logs.worker_stdout"]
        if self.reactor_name:
            twistd.append(f"--reactor={self.reactor_name}")
        return [self.python, "-c", _TWISTD, *twistd, "sockdrawer", *self.argv]

    def startService(self) -> None:
        super().startService()
        try:
            self._reserved = reuseport_socket(self.address)
        except OSError as e:
            if self.exit_on_failure:
                _log.error("cannot listen on {endpoint}: {why}", endpoint=self.address.description(), why=str(e))
                raise SystemExit(1) from None
            raise
        port = self._reserved.getsockname()[1]
        count = self.settings.workers
        api = "off"
        if self.settings.api_enabled:
            assert self.settings.api is not None
            api = (f"{worker_api(self.settings.api, 0)} to {worker_api(self.settings.api, count - 1)}"
                   if parse_tcp("--api", self.settings.api).port else "a free port each")
        _log.info("supervising {count} workers on port {port} (SO_REUSEPORT); API: {api}; a worker gets SIGKILL "
                  "{kill:g} s after SIGTERM", count=count, port=port, api=api, kill=self.monitor.killTime)
        for index in range(count):
            env = {**self.environ, WORKER_ENV: str(index), WORKER_PORT_ENV: str(port)}
            self.monitor.addProcess(f"worker-{index}", self.worker_argv(), env=env)
        self.monitor.startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        if self.monitor.running:
            _log.info("stopping {count} workers (SIGTERM: each drains)", count=len(self.monitor.protocols))
            self.monitor.stopService()
        yield self.monitor.when_all_exited()
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        _log.info("all workers stopped")
