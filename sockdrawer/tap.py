"""
``twistd sockdrawer``: command-line options -> :class:`Settings` -> service.

Precedence: built-in defaults, then ``--config FILE``, then the command line.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from .config import Settings, endpoint_string, load_config_file

_DEFAULTS = Settings()

# option name -> (short, coerce, help); the default is read from Settings.
_PARAMETERS: list[tuple[str, str | None, Any, str]] = [
    ("port", "p", str,
     "WebSocket endpoint: a port number or a Twisted endpoint string "
     "(tcp:8020:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/run/sd.sock)"),
    ("redis", "r", str,
     "Redis URL: redis://[:password@]host[:port][/db], rediss://... or unix:///path.sock. "
     "Without it, sockdrawer runs on its embedded in-process broker"),
    ("name", None, str, "channel namespace: Redis channel <name>/<channel> is path /<channel>"),
    ("api", None, str, "HTTP API endpoint (POST /publish/<channel>, GET /health); 'none' turns it off"),
    ("api-key", None, str, "require 'Authorization: Bearer <key>' on API requests"),
    ("max-message-size", None, int, "largest message and frame a browser may send, in bytes (larger: close 1009)"),
    ("max-publish-size", None, int, "largest message published to sockets, from Redis or the API, in bytes"),
    ("max-reply-size", None, int, "largest reply a listener may send back to a socket, in bytes (larger: logged, "
     "not sent)"),
    ("max-channel-length", None, int, "largest channel name, in UTF-8 bytes (longer paths: HTTP 400)"),
    ("max-handshake-size", None, int, "largest WebSocket opening handshake request, in bytes (larger: HTTP 431)"),
    ("max-connections", None, int, "most simultaneous WebSocket connections (more: HTTP 503)"),
    ("backlog", None, int, "listen backlog of the WebSocket endpoint, unless --port sets backlog= itself"),
    ("open-handshake-timeout", None, float, "seconds a client has to complete the opening handshake"),
    ("close-handshake-timeout", None, float, "seconds to wait for a client's close frame"),
    ("auto-ping-interval", None, float, "seconds between pings to each socket; 0 turns pings off"),
    ("auto-ping-timeout", None, float, "seconds to wait for a pong before dropping the socket"),
    ("send-buffer", None, int, "bytes a socket that does not read may queue before it is cut off (close 1008)"),
    ("slow-timeout", None, float, "seconds a socket may stay too slow to read before it is cut off (close 1008)"),
    ("trust-x-forwarded-for", None, int, "number of trusted proxies that add X-Forwarded-For"),
    ("redis-timeout", None, float, "seconds to connect to Redis and to wait for any Redis reply"),
    ("redis-ping-interval", None, float, "seconds between liveness PINGs on the Redis links"),
    ("redis-retry-max", None, float, "longest wait between Redis reconnection attempts, in seconds"),
    ("shutdown-timeout", None, float, "seconds to wait for sockets to close at shutdown"),
    ("compression-threshold", None, int, "with --compression, messages shorter than this many bytes are sent "
     "uncompressed"),
]


def _describe(name: str, text: str) -> str:
    default = getattr(_DEFAULTS, name.replace("-", "_"))
    if default is None:
        return text
    return f"{text} [default: {default}]"


class Options(usage.Options):
    """Options of ``twistd sockdrawer``."""

    synopsis = "[options]"
    longdesc = (
        "Pushes messages published on Redis channel <name>/<channel> to every WebSocket "
        "connected to ws://host:port/<channel>, and passes frames from browsers to listener classes."
    )
    optParameters = [
        [name, short, None, _describe(name, text)] for name, short, _, text in _PARAMETERS
    ] + [["config", "c", None, "TOML config file with the same option names; the command line wins"]]
    optFlags = [
        ["compression", None, "accept permessage-deflate (RFC 7692) from clients that offer it; each message is "
         "compressed once per channel, not per socket [default: off]"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listeners"] = []
        self["allowed_origins"] = []

    def opt_listener(self, spec: str) -> None:
        """Listener class to load, as package.module:ClassName (repeatable)."""
        self["listeners"].append(spec)

    opt_l = opt_listener

    def opt_allowed_origin(self, pattern: str) -> None:
        """
        Origin allowed to connect, as a scheme://host:port pattern with * wildcards,
        e.g. https://app.example.com:443 (repeatable) [default: *, any origin]
        """
        self["allowed_origins"].append(pattern)

    def postOptions(self) -> None:
        values: dict[str, Any] = {}
        if self["config"]:
            try:
                values.update(load_config_file(self["config"]))
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        for name, _, coerce, _ in _PARAMETERS:
            raw = self[name]
            if raw is None:
                continue
            try:
                values[name.replace("-", "_")] = coerce(raw)
            except ValueError:
                kind = "an integer" if coerce is int else "a number"
                raise usage.UsageError(f"--{name} must be {kind}, not {raw!r}") from None
        if self["compression"]:
            values["compression"] = True
        if self["listeners"]:
            values["listeners"] = tuple(self["listeners"])
        if self["allowed_origins"]:
            values["allowed_origins"] = tuple(self["allowed_origins"])
        try:
            settings = Settings(**values).validate()
        except (TypeError, ValueError) as e:
            raise usage.UsageError(str(e).splitlines()[0]) from None
        _check_endpoint("--port", settings.port)
        if settings.api_enabled:
            assert settings.api is not None
            _check_endpoint("--api", settings.api)
        from .listeners import ListenerLoadError, load_listener_class

        loaded: list[Any] = []
        for spec in settings.listeners:
            try:
                loaded.append(load_listener_class(spec) if isinstance(spec, str) else spec)
            except ListenerLoadError as e:
                raise usage.UsageError(str(e)) from None
        self.settings = settings.replace(listeners=tuple(loaded))


def _check_endpoint(option: str, description: str | int) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    try:
        serverFromString(reactor, endpoint_string(description))
    except Exception as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise usage.UsageError(f"{option}: bad endpoint {description!r}: {detail}") from None


def makeService(options: Options) -> IService:
    """Build the service ``twistd`` runs."""
    from .service import SockDrawerService

    service = SockDrawerService(options.settings)
    for listener in (service.websocket, service.api):
        if listener is not None:
            listener.exit_on_failure = True
    return service
