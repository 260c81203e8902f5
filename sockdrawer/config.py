"""
Settings: every address, name and limit of a sockdrawer service, with safe,
finite defaults.  The command line, a config file and embedding code all end
up here.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, fields
from typing import Any

from ._channels import DEFAULT_NAMESPACE, Namespace

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Settings:
    """
    The configuration of one sockdrawer service.

    Field names are the command-line options with ``_`` for ``-``
    (``--max-message-size`` is :attr:`max_message_size`).  Call
    :meth:`validate` (the service does) to check values.
    """

    #: WebSocket endpoint: a Twisted server endpoint string or a port number.
    port: str | int = "tcp:8020"
    #: ``redis://``, ``rediss://`` or ``unix://`` URL; ``None``: embedded broker.
    redis: str | None = None
    #: Channel namespace: Redis channel ``<name>/<channel>``.
    name: str = DEFAULT_NAMESPACE
    #: Listener classes, as ``"package.module:ClassName"`` or class objects.
    listeners: tuple[Any, ...] = ()
    #: HTTP API endpoint (or a port number, on all interfaces); ``None`` or
    #: ``"none"`` turns the API off.
    api: str | int | None = "tcp:8021:interface=127.0.0.1"
    #: When set, API requests need ``Authorization: Bearer <api_key>``.
    api_key: str | None = None
    #: Largest message (and frame) a browser may send, in bytes.
    max_message_size: int = 64 * KiB
    #: Largest message published to sockets (from Redis or the API), in bytes.
    max_publish_size: int = 1 * MiB
    #: Largest reply a listener may send back to a socket, in bytes; larger
    #: replies are logged and not sent.
    max_reply_size: int = 1 * MiB
    #: Largest channel name, in UTF-8 bytes.
    max_channel_length: int = 256
    #: Largest WebSocket opening handshake request, in bytes.
    max_handshake_size: int = 16 * KiB
    #: Most simultaneous WebSocket connections; more get HTTP 503.
    max_connections: int = 50_000
    #: Listen backlog for the WebSocket endpoint, unless the endpoint string
    #: sets ``backlog=`` itself (Twisted's default of 50 drops connection
    #: storms: every dropped SYN costs the client a 1-second retry).
    backlog: int = 1024
    #: Seconds a client has to complete the opening handshake.
    open_handshake_timeout: float = 5.0
    #: Seconds to wait for the client's close frame before dropping.
    close_handshake_timeout: float = 1.0
    #: Seconds between pings to each idle socket; 0 disables.
    auto_ping_interval: float = 25.0
    #: Seconds to wait for a pong before dropping the socket.
    auto_ping_timeout: float = 10.0
    #: Bytes a paused (slow) socket may queue before it is cut off.
    send_buffer: int = 1 * MiB
    #: Seconds a socket may stay paused (not reading) before it is cut off.
    slow_timeout: float = 10.0
    #: Origins allowed to connect, as ``scheme://host:port`` patterns.
    allowed_origins: tuple[str, ...] = ("*",)
    #: How many trusted proxies add X-Forwarded-For in front of sockdrawer.
    trust_x_forwarded_for: int = 0
    #: Seconds to connect to Redis, and to wait for any Redis reply.
    redis_timeout: float = 5.0
    #: Seconds between liveness PINGs on the Redis links.
    redis_ping_interval: float = 30.0
    #: Longest wait between Redis reconnection attempts, in seconds.
    redis_retry_max: float = 30.0
    #: Seconds to wait for sockets to close at shutdown before dropping them.
    shutdown_timeout: float = 5.0
    #: Accept permessage-deflate (RFC 7692) from clients that offer it.
    compression: bool = False
    #: With compression, messages shorter than this many bytes are sent
    #: uncompressed (deflate makes small frames grow).
    compression_threshold: int = 64

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> Settings:
        """
        Check every value.

        :raises ValueError: with a one-line message naming the option.
        :return: ``self``, so ``Settings(...).validate()`` chains.
        """
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("--name must be a non-empty string")
        if isinstance(self.port, bool) or not isinstance(self.port, (str, int)) or self.port == "":
            raise ValueError("--port must be an endpoint string or a port number")
        if self.api is not None and (isinstance(self.api, bool) or not isinstance(self.api, (str, int))):
            raise ValueError("--api must be an endpoint string, a port number or 'none'")
        for name in ("redis", "api_key"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"--{_opt(name)} must be a string")
        for name in ("allowed_origins", "listeners"):
            if not isinstance(getattr(self, name), (tuple, list)):
                raise ValueError(f"{name} must be a tuple (of strings), not {type(getattr(self, name)).__name__}")
        if not all(isinstance(o, str) and o for o in self.allowed_origins):
            raise ValueError("--allowed-origin values must be non-empty strings")
        ints = {
            "max_message_size": 1,
            "max_publish_size": 1,
            "max_reply_size": 1,
            "compression_threshold": 0,
            "max_channel_length": 1,
            "max_handshake_size": 1024,
            "max_connections": 1,
            "backlog": 1,
            "send_buffer": 1,
            "trust_x_forwarded_for": 0,
        }
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"--{_opt(name)} must be an integer >= {low}")
        for name in (
            "open_handshake_timeout",
            "close_handshake_timeout",
            "auto_ping_interval",
            "auto_ping_timeout",
            "slow_timeout",
            "redis_ping_interval",
            "shutdown_timeout",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 86400:
                raise ValueError(f"--{_opt(name)} must be a number of seconds from 0 to 86400")
        for name in ("redis_timeout", "redis_retry_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 86400:
                raise ValueError(f"--{_opt(name)} must be a number of seconds above 0, at most 86400")
        try:
            Namespace(self.name)
        except ValueError as e:
            raise ValueError(f"--name: {e}") from None
        if not isinstance(self.compression, bool):
            raise ValueError("--compression must be true or false")
        if not self.allowed_origins:
            raise ValueError("--allowed-origin: at least one origin pattern is needed")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key must not be empty")
        if self.redis is not None:
            from .redislink import RedisURL

            try:
                url = RedisURL.parse(self.redis)
                if url.ssl_ca_certs:
                    url.trust_root()
            except ValueError as e:
                raise ValueError(f"--redis: {e}") from None
        return self

    @property
    def api_enabled(self) -> bool:
        return bool(self.api) and str(self.api).lower() != "none"


_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def endpoint_string(value: str | int, backlog: int | None = None) -> str:
    """
    Turn a bare port number into a ``tcp:`` endpoint string, and give
    stream endpoints without an explicit ``backlog=`` the ``backlog``.
    """
    value = str(value).strip()
    if value.isdigit():
        value = f"tcp:{value}"
    kind = value.split(":", 1)[0].lower()
    if backlog and kind in _BACKLOG_TYPES and "backlog=" not in value:
        value = f"{value}:backlog={backlog}"
    return value


def _opt(name: str) -> str:
    return name.replace("_", "-")


_FIELDS = {f.name: f for f in fields(Settings)}
#: config-file keys whose option name differs from the field name
_ALIASES = {"listener": "listeners", "allowed_origin": "allowed_origins"}


def load_config_file(path: str) -> dict[str, Any]:
    """
    Read a TOML config file into :class:`Settings` field values.

    Keys are option names (``max-message-size`` or ``max_message_size``),
    at the top level or under a ``[sockdrawer]`` table.

    :raises ValueError: for an unreadable file, bad TOML or an unknown key.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ValueError(f"cannot read config file {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config file {path}: {e}") from None
    if isinstance(data.get("sockdrawer"), dict):
        data = data["sockdrawer"]
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        name = _ALIASES.get(name, name)
        if name not in _FIELDS:
            raise ValueError(f"config file {path}: unknown option {key!r}")
        if name in ("listeners", "allowed_origins"):
            value = (value,) if isinstance(value, str) else tuple(value)
        elif name == "port" and isinstance(value, int):
            value = str(value)
        values[name] = value
    return values
