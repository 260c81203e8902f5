"""
The synchronous publisher, for code that does not run Twisted (Django, Flask,
Celery, scripts)::

    from sockdrawer import Client

    Client().pub("new model!", channel="model_created")

It publishes on Redis (redis-py), or through a sockdrawer node's HTTP API
when that node runs on its embedded broker.  Importing this module does not
import Twisted.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from ._channels import DEFAULT_NAMESPACE, Namespace, validate_channel
from .config import Settings

# the server's defaults, from its option table
_DEFAULTS = Settings()

DEFAULT_URL = "redis://localhost:6379/0"
#: Read when no ``url`` is given.
URL_ENV = "SOCKDRAWER_URL"


class PublishError(Exception):
    """Publishing failed: the broker is unreachable, refused, or timed out."""


class _Publisher(Protocol):
    def publish(self, channel: Any, message: Any) -> Any: ...


class Client:
    """
    Publishes messages to sockdrawer channels.

    :param url: ``redis://``, ``rediss://`` or ``unix://`` for Redis;
        ``http://`` or ``https://`` for a sockdrawer node's API (e.g.
        ``http://127.0.0.1:8021``).  Default: ``$SOCKDRAWER_URL``, else
        ``redis://localhost:6379/0``.
    :param name: the channel namespace, as the server's ``--name``.
    :param logger: a :class:`logging.Logger`; messages are logged (channel and
        size, never the body) at DEBUG.
    :param redis: any object with a ``publish(channel, message)`` method, used
        instead of ``url`` (as the Ruby client took ``redis:``).
    :param api_key: the API key, for an HTTP API started with ``--api-key``.
    :param timeout: seconds to connect and to wait for an answer.
    :param max_channel_length: the server's ``--max-channel-length``.
    :param max_message_size: the server's ``--max-publish-size``: larger
        messages would be dropped by every node, so they are refused here.
    :param history_size: the server's ``--history-size``: when above 0,
        messages published on Redis are kept in the channel's history (one
        Lua script appends and publishes), so ``sockdrawer.v1`` clients can
        resume; :meth:`pub` then returns the message's offset.
    :param history_ttl: the server's ``--history-ttl``.
    :param cluster: seed nodes of a Redis Cluster (``redis://`` or
        ``rediss://`` URLs, as the server's ``--redis-cluster``), instead of
        ``url``: messages go out with ``SPUBLISH`` to the shard that owns the
        channel (redis-py's :class:`~redis.cluster.RedisCluster` follows the
        slot map).
    """

    def __init__(
        self,
        url: str | None = None,
        name: str = DEFAULT_NAMESPACE,
        logger: logging.Logger | None = None,
        redis: _Publisher | None = None,
        api_key: str | None = None,
        timeout: float = _DEFAULTS.redis_timeout,
        max_channel_length: int = _DEFAULTS.max_channel_length,
        max_message_size: int = _DEFAULTS.max_publish_size,
        history_size: int = 0,
        history_ttl: float = _DEFAULTS.history_ttl,
        cluster: Sequence[str] | None = None,
    ) -> None:
        self._namespace = Namespace(name)
        self._log = logger if logger is not None else logging.getLogger("sockdrawer.client")
        self._timeout = timeout
        self._api_key = api_key
        self._max_channel_length = max_channel_length
        self._max_message_size = max_message_size
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._script: Any = None
        self._read_script: Any = None
        self._http: str | None = None
        self._redis: _Publisher | None = None
        self._owns_redis = False
        self._cluster = cluster is not None
        if cluster is not None:
            if url is not None or redis is not None:
                raise ValueError("give one of url, redis and cluster")
            self._redis = _cluster_client(cluster, timeout)
            self._owns_redis = True
            self.url = str(cluster[0])
            return
        if redis is not None:
            if url is not None:
                raise ValueError("give either url or redis, not both")
            self._redis = redis
            self.url = f"<{type(redis).__name__}>"
            return
        url = url or os.environ.get(URL_ENV) or DEFAULT_URL
        self.url = url
        scheme = url.split(":", 1)[0].lower()
        if scheme in ("http", "https"):
            self._http = url.rstrip("/")
        elif scheme in ("redis", "rediss", "unix"):
            import redis as redis_py

            self._redis = redis_py.Redis.from_url(
                url, socket_timeout=timeout, socket_connect_timeout=timeout
            )
            self._owns_redis = True
        else:
            raise ValueError("url must start with redis://, rediss://, unix://, http:// or https://")

    def pub(self, message: str | bytes, channel: str = "") -> Any:
        """
        Publish ``message`` on ``channel``.

        :param message: ``str`` (sent as UTF-8, a text frame) or ``bytes``
            (a binary frame unless it is valid UTF-8).
        :param channel: the channel without namespace: ``"news"`` reaches
            sockets on ``/news``; ``""`` (the default) the root ``/``.
        :return: what the broker reports: for Redis, the number of subscribed
            sockdrawer nodes (with ``history_size``, the message's offset);
            for the HTTP API, the count (or offset) it answers.
        :raises ValueError: for a bad channel name, message type or size.
        :raises PublishError: when the message could not be published.
        """
        key = validate_channel(channel, self._max_channel_length)
        if isinstance(message, str):
            payload = message.encode("utf-8")
        elif isinstance(message, (bytes, bytearray, memoryview)):
            payload = bytes(message)
        else:
            raise ValueError(f"message must be str or bytes, not {type(message).__name__}")
        if len(payload) > self._max_message_size:
            raise ValueError(
                f"message of {len(payload)} bytes is over the limit of {self._max_message_size} bytes"
            )
        self._log.debug("publishing %d bytes on channel %r", len(payload), channel)
        if self._http is not None:
            return self._pub_http(channel, payload)
        assert self._redis is not None
        redis_channel = self._namespace.redis_channel(key)
        try:
            if self._history_size:
                return self._pub_history(key, payload)
            if self._cluster:
                result = self._redis.spublish(redis_channel, payload)  # type: ignore[attr-defined]
            else:
                result = self._redis.publish(redis_channel, payload)
        except Exception as e:
            raise PublishError(f"could not publish on {self._where()}: {type(e).__name__}: {e}") from e
        return int(result) if result is not None else 0

    def presence(self, channel: str) -> list[dict[str, Any]]:
        """
        Who is on ``channel``: the live presence entries of the
        ``sockdrawer.v1`` sockets subscribed to it with ``"presence": true``,
        on every node (see ``docs/protocol.rst``).

        :return: ``[{"user": <token sub or None>, "client": <socket id>}, ...]``
            in no particular order.
        :raises ValueError: for a bad channel name.
        :raises TypeError: for a ``redis=`` object that is not a redis-py client.
        :raises PublishError: when the broker could not be read.
        """
        key = validate_channel(channel, self._max_channel_length)
        if self._http is not None:
            body = self._http_get(f"/presence/{quote(channel, safe='/')}")
            return list(body.get("clients", []))
        from .presence import READ_SCRIPT, hash_key, parse_entries

        register = getattr(self._redis, "register_script", None)
        if register is None:
            raise TypeError("presence needs a redis-py client (or an http:// URL)")
        if self._read_script is None:
            self._read_script = register(READ_SCRIPT)
        try:
            if self._cluster:
                from ._slots import presence_key as hash_key
            values = self._read_script(keys=[hash_key(self._namespace.name, key)], args=[])
        except Exception as e:
            raise PublishError(f"could not read presence on {self._where()}: {type(e).__name__}: {e}") from e
        return parse_entries(values)

    def _http_get(self, path: str) -> dict[str, Any]:
        request = urllib.request.Request(f"{self._http}{path}", method="GET")
        return self._request(request, refused="refused", failed="could not read")

    def _request(self, request: urllib.request.Request, *, refused: str, failed: str) -> dict[str, Any]:
        """Send ``request`` to the HTTP API (with the key, if any); its JSON body, or :class:`PublishError`."""
        if self._api_key:
            request.add_header("Authorization", f"Bearer {self._api_key}")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                body: dict[str, Any] = json.loads(response.read() or b"{}")
                return body
        except urllib.error.HTTPError as e:
            try:
                reason = json.loads(e.read()).get("error", e.reason)
            except Exception:
                reason = e.reason
            raise PublishError(f"{self._where()} {refused}: HTTP {e.code}: {reason}") from e
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise PublishError(f"{failed} {self._where()}: {e}") from e

    def _pub_history(self, key: bytes, payload: bytes) -> str:
        from .history import PUBLISH_SCRIPT, history_channel, redis_keys

        if self._cluster:
            from ._slots import SHARDED_PUBLISH_SCRIPT as PUBLISH_SCRIPT
            from ._slots import history_keys as redis_keys
        if self._script is None:
            self._script = self._redis.register_script(PUBLISH_SCRIPT)  # type: ignore[union-attr]
        name = self._namespace.name
        offset = self._script(keys=list(redis_keys(name, key)),
                              args=[history_channel(name, key), payload, self._history_size,
                                    max(1, int(self._history_ttl))])
        return offset.decode("ascii") if isinstance(offset, bytes) else str(offset)

    def _pub_http(self, channel: str, payload: bytes) -> Any:
        url = f"{self._http}/publish/{quote(channel, safe='/')}"
        request = urllib.request.Request(url, data=payload, method="POST")
        request.add_header("Content-Type", "application/octet-stream")
        body = self._request(request, refused="refused the message", failed="could not publish on")
        if "offset" in body:
            return body["offset"]
        return int(body.get("subscribers", 0))

    def _where(self) -> str:
        """The broker's address for error messages, without credentials."""
        if self._http is not None:
            return self._http
        parts = urlsplit(self.url)
        if not parts.scheme:
            return self.url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return f"{parts.scheme}://{host}{parts.path}"

    def close(self) -> None:
        """Close the Redis connections this client opened (not a ``redis=`` object)."""
        if self._owns_redis:
            close = getattr(self._redis, "close", None)
            if callable(close):
                close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cluster_client(seeds: Sequence[str], timeout: float) -> Any:
    """A redis-py :class:`~redis.cluster.RedisCluster` on ``seeds`` (password and TLS from the first)."""
    if isinstance(seeds, str) or not seeds:
        raise ValueError("cluster must be a list of seed node URLs, e.g. ['redis://10.0.0.1:7000']")
    from redis.cluster import ClusterNode, RedisCluster

    nodes = []
    for seed in seeds:
        parts = urlsplit(seed)
        if parts.scheme.lower() not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"cluster seed must be a redis:// or rediss:// URL with a host, not {seed!r}")
        nodes.append(ClusterNode(parts.hostname, parts.port or 6379))
    first = urlsplit(seeds[0])
    options: dict[str, Any] = {}
    if first.scheme.lower() == "rediss":
        options["ssl"] = True
        ca = [v for k, _, v in (p.partition("=") for p in first.query.split("&")) if k == "ssl_ca_certs"]
        if ca:
            options["ssl_ca_certs"] = ca[-1]
    from urllib.parse import unquote

    try:
        # reads the slot map now
        return RedisCluster(startup_nodes=nodes, username=unquote(first.username) if first.username else None,
                            password=unquote(first.password) if first.password is not None else None,
                            socket_timeout=timeout, socket_connect_timeout=timeout, **options)
    except Exception as e:
        where = ", ".join(f"{n.host}:{n.port}" for n in nodes)
        raise PublishError(f"could not reach the Redis Cluster at {where}: {type(e).__name__}: {e}") from e
