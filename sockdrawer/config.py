"""
Settings: every address, name and limit of a sockdrawer service, with safe,
finite defaults, in one table.

Each field of :class:`Settings` is one option, declared once with
:func:`option`: its type (the annotation), default, bounds, help text and
the part that consumes it.  The ``twistd`` command line, the config file
keys, the ``SOCKDRAWER_<NAME>`` environment variables, validation and the
option reference in the docs are all generated from it, so adding an option
means adding one field.

Precedence: built-in defaults < config file < environment < command line.
This module imports the standard library, :mod:`sockdrawer.options` and
:mod:`sockdrawer.core.channels`; the checks that need a broker's URL parser
or the token verifier import them when they run.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sockdrawer.core.channels import DEFAULT_NAMESPACE, Namespace
from sockdrawer.options import ENV_PREFIX as ENV_PREFIX
from sockdrawer.options import OptionSpec as OptionSpec
from sockdrawer.options import build_table
from sockdrawer.options import endpoint_string as endpoint_string
from sockdrawer.options import option as option

KiB = 1024
MiB = 1024 * KiB
#: the longest time any option accepts, in seconds (a day)
MAX_SECONDS = 86400.0

# Which part of sockdrawer reads an option (for the docs and --print-config).
SERVICE = "service"
WEBSOCKET = "websocket"
REDIS = "redis"
API = "api"
LISTENERS = "listeners"
AUTH = "auth"


@dataclass(frozen=True)
class Settings:
    """
    The configuration of one sockdrawer service.

    Field names are the command-line options with ``_`` for ``-``
    (``--max-message-size`` is :attr:`max_message_size`).  Call
    :meth:`validate` (the service does) to check values.
    """

    port: str | int = option(
        "tcp:8020", "WebSocket endpoint: a port number or a Twisted endpoint string (tcp:8020:interface=127.0.0.1, "
        "ssl:8443:privateKey=key.pem:certKey=cert.pem, unix:/run/sd.sock)", part=SERVICE, short="p")
    redis: str | None = option(
        None, "Redis URL: redis://[:password@]host[:port][/db], rediss://... or unix:///path.sock. Without it, "
        "sockdrawer runs on its embedded in-process broker", part=REDIS, short="r", secret=True)
    name: str = option(DEFAULT_NAMESPACE, "channel namespace: Redis channel <name>/<channel> is path /<channel>",
                       part=SERVICE)
    listeners: tuple[Any, ...] = option(
        (), "listener class to load, as package.module:ClassName (repeatable)", part=LISTENERS, cli="listener",
        short="l")
    api: str | int | None = option(
        "tcp:8021:interface=127.0.0.1", "HTTP API endpoint (POST /publish/<channel>, GET /health); 'none' turns "
        "it off", part=API)
    api_key: str | None = option(None, "require 'Authorization: Bearer <key>' on API requests", part=API,
                                 secret=True)
    max_message_size: int = option(
        64 * KiB, "largest message and frame a browser may send, in bytes (larger: close 1009)", part=WEBSOCKET,
        low=1)
    max_publish_size: int = option(
        1 * MiB, "largest message published to sockets, from Redis or the API, in bytes", part=REDIS, low=1)
    max_reply_size: int = option(
        1 * MiB, "largest reply a listener may send back to a socket, in bytes (larger: logged, not sent)",
        part=WEBSOCKET, low=1)
    max_channel_length: int = option(
        256, "largest channel name, in UTF-8 bytes (longer paths: HTTP 400)", part=WEBSOCKET, low=1)
    max_handshake_size: int = option(
        16 * KiB, "largest WebSocket opening handshake request, in bytes (larger: HTTP 431)", part=WEBSOCKET,
        low=1024)
    max_connections: int = option(
        50_000, "most simultaneous WebSocket connections (more: HTTP 503)", part=WEBSOCKET, low=1)
    backlog: int = option(
        1024, "listen backlog of the WebSocket endpoint, unless --port sets backlog= itself (Twisted's 50 turns "
        "connection storms into 1-second SYN retries)", part=SERVICE, low=1)
    open_handshake_timeout: float = option(
        5.0, "seconds a client has to complete the opening handshake", part=WEBSOCKET, low=0, high=MAX_SECONDS)
    close_handshake_timeout: float = option(
        1.0, "seconds to wait for a client's close frame", part=WEBSOCKET, low=0, high=MAX_SECONDS)
    auto_ping_interval: float = option(
        25.0, "seconds between pings to each socket; 0 turns pings off", part=WEBSOCKET, low=0, high=MAX_SECONDS)
    auto_ping_timeout: float = option(
        10.0, "seconds to wait for a pong before dropping the socket", part=WEBSOCKET, low=0, high=MAX_SECONDS)
    send_buffer: int = option(
        1 * MiB, "bytes a socket that does not read may queue before it is cut off (close 1008)", part=WEBSOCKET,
        low=1)
    slow_timeout: float = option(
        10.0, "seconds a socket may stay too slow to read before it is cut off (close 1008)", part=WEBSOCKET,
        low=0, high=MAX_SECONDS)
    allowed_origins: tuple[str, ...] = option(
        ("*",), "origin allowed to connect, as a scheme://host:port pattern with * wildcards, e.g. "
        "https://app.example.com:443 (repeatable; default: *, any origin)", part=WEBSOCKET, cli="allowed-origin")
    trust_x_forwarded_for: int = option(
        0, "number of trusted proxies that add X-Forwarded-For", part=WEBSOCKET, low=0)
    compression: bool = option(
        False, "accept permessage-deflate (RFC 7692) from clients that offer it; each message is compressed "
        "once per channel, not per socket", part=WEBSOCKET)
    compression_threshold: int = option(
        64, "with compression, messages shorter than this many bytes are sent uncompressed", part=WEBSOCKET,
        low=0)
    redis_timeout: float = option(
        5.0, "seconds to connect to Redis and to wait for any Redis reply", part=REDIS, above=0, high=MAX_SECONDS)
    redis_ping_interval: float = option(
        30.0, "seconds between liveness PINGs on the Redis links; 0 turns them off", part=REDIS, low=0,
        high=MAX_SECONDS)
    redis_retry_max: float = option(
        30.0, "longest wait between Redis reconnection attempts, in seconds", part=REDIS, above=0,
        high=MAX_SECONDS)
    shutdown_timeout: float = option(
        5.0, "seconds to wait for sockets to close at shutdown", part=SERVICE, low=0, high=MAX_SECONDS)
    drain_delay: float = option(
        0.0, "at shutdown (SIGTERM), seconds to keep serving after /ready turns 503, for load balancers to "
        "notice", part=SERVICE, low=0, high=MAX_SECONDS)
    drain_window: float = option(
        0.0, "at shutdown, seconds over which sockets are closed, evenly spread, so that their reconnects do not "
        "all land at once; 0 closes all at once", part=SERVICE, low=0, high=MAX_SECONDS)
    drain_close_code: int = option(
        1012, "close code sent to sockets at shutdown: 1012 (service restart: reconnect) or 1001 (going away)",
        part=SERVICE, low=1001, high=1012)
    metrics_public: bool = option(
        False, "serve GET /metrics without the API key (when --api-key is set)", part=API)
    log_format: str = option(
        "text", "log format: text, or json (one JSON object per line, for log shippers; with twistd -n)",
        part=SERVICE)
    history_size: int = option(
        0, "messages kept per channel for sockdrawer.v1 clients that resume (a Redis stream per channel, or an "
        "in-memory ring with the embedded broker); 0 keeps none", part=SERVICE, low=0, high=1_000_000)
    history_ttl: float = option(
        300.0, "seconds a channel's history is kept after its last message", part=SERVICE, above=0,
        high=30 * MAX_SECONDS)
    max_subscriptions: int = option(
        100, "most channels one sockdrawer.v1 socket may subscribe to", part=WEBSOCKET, low=1)
    auth_secret_file: tuple[str, ...] = option(
        (), "file holding a shared secret (HS256/384/512) that signs browser tokens; with any key configured, "
        "every WebSocket needs a token except on --public-channel channels (repeatable: key rotation)",
        part=AUTH)
    auth_secret: str | None = option(
        None, "a shared secret that signs browser tokens, from the environment or the config file only (never "
        "the command line: every user of the machine can read it)", part=AUTH, secret=True, command_line=False)
    auth_public_key: tuple[str, ...] = option(
        (), "PEM file of a public key (RSA, EC P-256/384/521, Ed25519) that verifies browser tokens "
        "(repeatable)", part=AUTH)
    auth_audience: str | None = option(None, "tokens must name this audience (aud)", part=AUTH)
    auth_issuer: str | None = option(None, "tokens must come from this issuer (iss)", part=AUTH)
    auth_leeway: float = option(
        30.0, "seconds of clock skew allowed when checking a token's exp, nbf and iat", part=AUTH, low=0,
        high=MAX_SECONDS)
    public_channel: tuple[str, ...] = option(
        (), "channel pattern that needs no token when keys are configured: exact, prefix/* or * (repeatable)",
        part=AUTH)
    connect_proxy: str | None = option(
        None, "URL of the app's backend the node POSTs each handshake to (JSON, with the browser's Cookie and "
        "Authorization): 200 {\"user\", \"channels\", \"expires\"} admits it as that user, 401/403 refuse it, "
        "anything else (a timeout, an error) refuses it with 503", part=AUTH)
    subscribe_proxy: str | None = option(
        None, "URL of the app's backend the node POSTs each sockdrawer.v1 subscribe to (JSON: user, client, "
        "channel, remote): 200 allows it, 401/403 answer the v1 error with that status, anything else 503",
        part=AUTH)
    proxy_timeout: float = option(
        5.0, "seconds the connect proxy may take to answer a handshake (then 503)", part=AUTH, above=0,
        high=MAX_SECONDS)
    proxy_max_concurrent: int = option(
        100, "connect proxy requests in flight at once; a handshake beyond them is refused with 503", part=AUTH,
        low=1)
    proxy_header: tuple[str, ...] = option(
        ("Cookie", "Authorization"), "browser request header forwarded to the connect proxy (repeatable)",
        part=AUTH)
    pusher_app_id: str | None = option(
        None, "turns on the Pusher Channels protocol: the app id the Pusher server libraries use (HTTP API "
        "/apps/<id>/...); with --pusher-key and --pusher-secret-file", part=AUTH)
    pusher_key: str | None = option(
        None, "the Pusher app key: SDKs connect to ws://host:port/app/<key>", part=AUTH)
    pusher_secret_file: str | None = option(
        None, "file holding the Pusher app secret (signs private and presence channel auths and API requests)",
        part=AUTH)
    pusher_webhook: str | None = option(
        None, "URL the nodes POST Pusher's webhooks to (channel_occupied, channel_vacated, member_added, "
        "member_removed, client_event), signed with X-Pusher-Key and X-Pusher-Signature, at least once as "
        "--webhook's events are", part=AUTH)
    webhook: str | None = option(
        None, "URL the nodes POST lifecycle events to (connect, disconnect, channel_occupied, channel_vacated), "
        "one JSON object per request, at least once: queued in Redis first (in memory on the embedded broker)",
        part=SERVICE)
    webhook_secret: str | None = option(
        None, "signs each webhook request: X-Sockdrawer-Signature: sha256=<hex HMAC-SHA256 of the body>",
        part=SERVICE, secret=True)
    webhook_timeout: float = option(
        10.0, "seconds a webhook request may take (then it counts as failed and is tried again)", part=SERVICE,
        above=0, high=MAX_SECONDS)
    webhook_queue_max: int = option(
        100_000, "most webhook events waiting to be delivered, across the nodes; beyond, new events are "
        "dropped (logged and counted)", part=SERVICE, low=1, high=100_000_000)
    max_frames_per_second: float = option(
        100.0, "frames a socket may send per second, on average (more: close 1008)", part=WEBSOCKET, above=0,
        high=1e9)
    frame_burst: int = option(
        200, "frames a socket may send at once above that rate", part=WEBSOCKET, low=1)
    max_fragments: int = option(
        1000, "most frames in one message from a browser (more: close 1009)", part=WEBSOCKET, low=1)
    max_pending_handshakes: int = option(
        1000, "most connections still in their opening handshake, per node (more: dropped at once)",
        part=WEBSOCKET, low=1)
    max_pending_handshakes_per_ip: int = option(
        250, "most connections from one client address still in their opening handshake (more: dropped at "
        "once), and at most half of --max-pending-handshakes, so one address cannot hold the whole pool; not "
        "counted with --trust-x-forwarded-for (the proxy's address is everyone's)", part=WEBSOCKET, low=1)
    max_connections_per_ip: int = option(
        1000, "most connections from one client address, open or in their handshake (more: HTTP 429); with "
        "--trust-x-forwarded-for, the forwarded address", part=WEBSOCKET, low=1)
    max_connections_per_user: int = option(
        0, "most open connections of one user (a token's sub, or the connect proxy's user) across every node; "
        "more: HTTP 429 (0: no limit)", part=WEBSOCKET, low=0)
    api_timeout: float = option(
        10.0, "seconds an API request has to arrive whole, headers and body (slower: HTTP 408)", part=API,
        above=0, high=MAX_SECONDS)
    api_max_connections: int = option(
        100, "most simultaneous API connections (more: refused)", part=API, low=1)
    workers: int = option(
        1, "processes that accept on the same port (SO_REUSEPORT), each with its own Redis subscription, "
        "supervised by the parent (a crashed worker is restarted); more than 1 needs --redis, --redis-cluster or "
        "--sentinel", part=SERVICE, low=1, high=256)
    subscribe: str = option(
        "pattern", "how a node subscribes to Redis: pattern (PSUBSCRIBE <name>/*: every message of the "
        "namespace reaches every node) or channels (SUBSCRIBE to exactly the channels this node has sockets "
        "or listeners on)", part=REDIS, metavar="MODE")
    redis_cluster: tuple[str, ...] = option(
        (), "seed node of a Redis Cluster, as redis://[:password@]host:port (repeatable): channels are "
        "subscribed with SSUBSCRIBE on the shard that owns them and published with SPUBLISH (Redis 7 sharded "
        "pub/sub; a plain PUBLISH does not reach the nodes); instead of --redis", part=REDIS, secret=True)
    sentinel: tuple[str, ...] = option(
        (), "Redis Sentinel to ask where the master is, as HOST:PORT (port 26379 when left out), or "
        "rediss://HOST:PORT[?ssl_ca_certs=/path/ca.pem] for TLS to the sentinels and the master (repeatable; "
        "all with TLS or none): the node connects to the master they name for --sentinel-master, checks its "
        "ROLE, and follows +switch-master to the new one; instead of --redis", part=REDIS)
    sentinel_master: str | None = option(
        None, "with --sentinel: the name the sentinels monitor the master under (sentinel monitor <name> ...)",
        part=REDIS, metavar="NAME")
    sentinel_password: str | None = option(
        None, "with --sentinel: the sentinels' own password (their requirepass), if they have one", part=REDIS,
        secret=True)
    sentinel_master_password: str | None = option(
        None, "with --sentinel: the password of the master (and of the replica that replaces it), if it has "
        "one", part=REDIS, secret=True)
    no_gc_freeze: bool = option(
        False, "do not move open sockets into the garbage collector's permanent generation (gc.freeze); by "
        "default they are, as they open, so full collections do not walk them (no 50 ms pauses after "
        "connection storms), at a cost: reference cycles among objects alive at a freeze are reclaimed only "
        "when the service stops", part=WEBSOCKET)
    max_subscriptions_per_ip: int = option(
        10_000, "most sockdrawer.v1 subscriptions of all the sockets of one client address (more: error 429); "
        "with --trust-x-forwarded-for, the forwarded address", part=WEBSOCKET, low=1)
    max_presence_joins_per_second: float = option(
        5.0, "sockdrawer.v1 subscriptions with presence one socket may make per second (each costs every member "
        "of the room an event; more: error 429)", part=WEBSOCKET, above=0)
    presence_join_burst: int = option(
        20, "subscriptions with presence a socket may make at once above that rate", part=WEBSOCKET, low=1)
    presence_timeout: float = option(
        30.0, "seconds after which the presence entries of a node that stopped refreshing them expire (nodes "
        "refresh every third of it)", part=SERVICE, above=0, high=MAX_SECONDS)

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> Settings:
        """
        Check every value.

        :raises ValueError: with a one-line message naming the option.
        :return: ``self``, so ``Settings(...).validate()`` chains.
        """
        for spec in OPTIONS:
            spec.check(getattr(self, spec.field))
        if not self.name:
            raise ValueError("--name must be a non-empty string")
        if self.port == "":
            raise ValueError("--port must be an endpoint string or a port number")
        if not all(isinstance(o, str) and o for o in self.allowed_origins):
            raise ValueError("--allowed-origin values must be non-empty strings")
        try:
            Namespace(self.name)
        except ValueError as e:
            raise ValueError(f"--name: {e}") from None
        if not self.allowed_origins:
            raise ValueError("--allowed-origin: at least one origin pattern is needed")
        if self.connect_proxy is not None and not str(self.connect_proxy).startswith(("http://", "https://")):
            raise ValueError(f"--connect-proxy must be an http:// or https:// URL, not {self.connect_proxy!r}")
        if self.subscribe_proxy is not None and not str(self.subscribe_proxy).startswith(("http://", "https://")):
            raise ValueError(f"--subscribe-proxy must be an http:// or https:// URL, not {self.subscribe_proxy!r}")
        pusher = (self.pusher_app_id, self.pusher_key, self.pusher_secret_file)
        if any(pusher) and not all(pusher):
            raise ValueError("--pusher-app-id, --pusher-key and --pusher-secret-file go together: give all three")
        if self.pusher_webhook is not None and not all(pusher):
            raise ValueError("--pusher-webhook needs --pusher-app-id, --pusher-key and --pusher-secret-file")
        if self.pusher_webhook is not None and not str(self.pusher_webhook).startswith(("http://", "https://")):
            raise ValueError(f"--pusher-webhook must be an http:// or https:// URL, not {self.pusher_webhook!r}")
        if self.webhook is not None and not str(self.webhook).startswith(("http://", "https://")):
            raise ValueError(f"--webhook must be an http:// or https:// URL, not {self.webhook!r}")
        if self.webhook_secret is not None and not self.webhook_secret:
            raise ValueError("--webhook-secret must not be empty")
        if not all(isinstance(h, str) and h and ":" not in h for h in self.proxy_header):
            raise ValueError("--proxy-header values must be header names")
        if self.drain_close_code not in (1001, 1012):
            raise ValueError("--drain-close-code must be 1001 or 1012")
        if self.log_format not in ("text", "json"):
            raise ValueError("--log-format must be text or json")
        if self.subscribe not in ("pattern", "channels"):
            raise ValueError("--subscribe must be pattern or channels")
        if self.sentinel and (self.redis or self.redis_cluster):
            raise ValueError("--sentinel excludes --redis and --redis-cluster: give one")
        if self.redis and self.redis_cluster:
            raise ValueError("--redis and --redis-cluster exclude each other: give one")
        self._check_sentinel()
        if self.workers > 1 and not (self.redis or self.redis_cluster or self.sentinel):
            raise ValueError("--workers above 1 needs --redis, --redis-cluster or --sentinel: each worker is its "
                             "own process, and the embedded broker cannot carry messages between processes")
        if self.api_key is not None and not self.api_key:
            raise ValueError("--api-key must not be empty")
        for pattern in self.public_channel:
            from sockdrawer.core.tokens import check_pattern

            try:
                check_pattern(pattern)
            except ValueError as e:
                raise ValueError(f"--public-channel: {e}") from None
        self.token_verifier()
        self.pusher_app()
        for seed in self.redis_cluster:
            from sockdrawer.brokers.url import RedisURL

            try:
                url = RedisURL.parse(seed)
            except ValueError as e:
                raise ValueError(f"--redis-cluster: {e}") from None
            if url.scheme == "unix":
                raise ValueError("--redis-cluster: seed nodes are host:port URLs, not Unix sockets")
        if self.redis is not None:
            from sockdrawer.brokers.url import RedisURL

            try:
                url = RedisURL.parse(self.redis)
                if url.ssl_ca_certs:
                    url.trust_root()
            except ValueError as e:
                raise ValueError(f"--redis: {e}") from None
        return self

    def _check_sentinel(self) -> None:
        if not self.sentinel:
            for option_name, value in (("--sentinel-master", self.sentinel_master),
                                       ("--sentinel-password", self.sentinel_password),
                                       ("--sentinel-master-password", self.sentinel_master_password)):
                if value is not None:
                    raise ValueError(f"{option_name} needs --sentinel")
            return
        if not self.sentinel_master:
            raise ValueError("--sentinel needs --sentinel-master NAME: the name the sentinels monitor the master "
                             "under")
        if any(c.isspace() for c in self.sentinel_master):
            raise ValueError("--sentinel-master must be a name without spaces")
        from sockdrawer.brokers.sentinelwire import parse_sentinel

        try:
            urls = [parse_sentinel(text) for text in self.sentinel]
            if len({url.scheme for url in urls}) > 1:
                raise ValueError("give every sentinel with TLS (rediss://) or none")
            for url in urls:
                if url.ssl_ca_certs:
                    url.trust_root()
        except ValueError as e:
            raise ValueError(f"--sentinel: {e}") from None

    @property
    def auth_enabled(self) -> bool:
        """Whether browsers need tokens (a key is configured)."""
        return bool(self.auth_secret_file or self.auth_secret or self.auth_public_key)

    def token_verifier(self) -> Any:
        """
        The :class:`~sockdrawer.tokens.TokenVerifier` for the configured keys,
        or ``None`` without keys.

        :raises ValueError: for an unreadable key file or a bad key, naming the option.
        """
        if not self.auth_enabled:
            return None
        from sockdrawer.core.tokens import TokenVerifier

        secrets: list[bytes] = []
        for path in self.auth_secret_file:
            secrets.append(_read_key_file("--auth-secret-file", path).strip())
        if self.auth_secret:
            secrets.append(self.auth_secret.encode("utf-8"))
        keys = [_read_key_file("--auth-public-key", path) for path in self.auth_public_key]
        try:
            return TokenVerifier(secrets, keys, audience=self.auth_audience, issuer=self.auth_issuer,
                                 leeway=self.auth_leeway)
        except ValueError as e:
            raise ValueError(f"--auth: {e}") from None

    def pusher_app(self) -> Any:
        """
        The :class:`~sockdrawer.core.pusher.PusherApp` of the Pusher options, or ``None`` without them.

        :raises ValueError: for an unreadable or empty secret file.
        """
        if not (self.pusher_app_id and self.pusher_key and self.pusher_secret_file):
            return None
        from sockdrawer.core.pusher import PusherApp

        secret = _read_key_file("--pusher-secret-file", self.pusher_secret_file).strip()
        if not secret:
            raise ValueError(f"--pusher-secret-file: {self.pusher_secret_file} is empty")
        return PusherApp(str(self.pusher_app_id), str(self.pusher_key), secret)

    @property
    def api_enabled(self) -> bool:
        return bool(self.api) and str(self.api).lower() != "none"


def _read_key_file(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{option}: cannot read {path}: {e.strerror}") from None


# -- the table -----------------------------------------------------------------


#: every option, in declaration order
OPTIONS: tuple[OptionSpec, ...] = build_table(Settings)
_BY_KEY: dict[str, OptionSpec] = {}
for _spec in OPTIONS:
    for _key in {_spec.field, _spec.cli, _spec.cli.replace("-", "_"), _spec.field.replace("_", "-")}:
        _BY_KEY[_key] = _spec


def spec_for(key: str) -> OptionSpec | None:
    """The option called ``key`` (field name, option name, with ``-`` or ``_``), or ``None``."""
    return _BY_KEY.get(key)


# -- sources -------------------------------------------------------------------


def load_config_file(path: str) -> dict[str, Any]:
    """
    Read a TOML config file into :class:`Settings` field values.

    Keys are option names (``max-message-size`` or ``max_message_size``),
    at the top level or under a ``[sockdrawer]`` table.

    :raises ValueError: for an unreadable file, bad TOML, an unknown key or a
        value of the wrong type, naming the file and the key.
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
        spec = spec_for(key)
        if spec is None:
            raise ValueError(f"config file {path}: unknown option {key!r}")
        if spec.repeatable:
            value = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value
        elif spec.kind == "endpoint" and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        elif spec.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        try:
            spec.check(value)
        except ValueError as e:
            raise ValueError(relabel(str(e), spec, f"config file {path}: {key}")) from None
        values[spec.field] = value
    return values


def from_environment(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """
    :class:`Settings` field values from ``SOCKDRAWER_<NAME>`` variables
    (repeatable options: comma-separated).

    :raises ValueError: naming the variable.
    """
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for spec in OPTIONS:
        raw = environ.get(spec.env)
        if raw is None:
            continue
        values[spec.field] = parse_value(spec, raw, spec.env)
    return values


#: ``SOCKDRAWER_*`` variables that are not options: the config file, a worker's index and port (set by the
#: supervisor), the publisher's API address (``sockdrawer.Client``)
NOT_OPTIONS = ("CONFIG", "WORKER", "WORKER_PORT", "URL")


def unknown_environment(environ: Mapping[str, str]) -> list[str]:
    """The ``SOCKDRAWER_*`` variables in ``environ`` that name no option (a typo sets nothing)."""
    known = {spec.env for spec in OPTIONS} | {ENV_PREFIX + name for name in NOT_OPTIONS}
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def parse_value(spec: OptionSpec, raw: str, label: str) -> Any:
    """
    Parse and check ``raw`` for ``spec``.

    :param label: the source, at the start of an error: ``--port``,
        ``SOCKDRAWER_PORT``.
    :raises ValueError: ``"<label> must be ..."``.
    """
    try:
        value = spec.parse(raw)
        spec.check(value)
    except ValueError as e:
        raise ValueError(relabel(str(e), spec, label)) from None
    return value


def relabel(message: str, spec: OptionSpec, label: str) -> str:
    """An error ``message`` about ``spec`` with the source ``label`` in front instead of ``--<option>``."""
    own = "--" + spec.cli
    if message.startswith(own):
        return label + message[len(own):]
    return f"{label} {message}"


def describe(settings: Settings, sources: Mapping[str, str] | None = None) -> Iterator[str]:
    """
    Lines for ``--print-config``: every option, its effective value (secrets
    masked) and where it came from.
    """
    sources = sources or {}
    width = max(len(spec.cli) for spec in OPTIONS)
    for spec in OPTIONS:
        value = getattr(settings, spec.field)
        if spec.secret and spec.repeatable and value:
            shown = ", ".join(_mask(spec, str(v)) for v in value)
        elif spec.secret and value not in (None, ()):
            shown = _mask(spec, value)
        elif spec.repeatable:
            shown = ", ".join(getattr(v, "__qualname__", None) and f"{v.__module__}:{v.__qualname__}" or str(v)
                              for v in value) or "none"
        elif spec.kind == "bool":
            shown = "on" if value else "off"
        else:
            shown = "none" if value is None else str(value)
        yield f"{spec.cli.ljust(width)}  {shown}  ({sources.get(spec.field, 'default')})"


def _mask(spec: OptionSpec, value: str) -> str:
    if spec.field in ("redis", "redis_cluster"):
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.password is not None:
            netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
            value = parts._replace(netloc=netloc).geturl()
        if "password=" in parts.query:
            value = value.split("?", 1)[0] + "?***"
        return value
    return "***"


