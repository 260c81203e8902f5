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
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from sockdrawer.config import Settings
from sockdrawer.core.channels import DEFAULT_NAMESPACE, Namespace, validate_channel
from sockdrawer.core.control import CONTROL_KEY, DISCONNECT_CODE, DISCONNECT_REASON, command, encode

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
    :param history_size: not needed with Redis 7: the nodes write their
        history policy into Redis (a function, ``sockdrawer_publish``) and
        :meth:`pub` follows it.  Given (above 0), it overrides that policy
        for this client's messages (one Lua script appends and publishes),
        for a Redis without functions.
    :param history_ttl: with ``history_size``, the server's ``--history-ttl``.
    :param retry_for: seconds :meth:`pub` keeps retrying while Redis is
        unreachable, read-only (a failover) or loading, before it raises
        :class:`PublishError`; 0 tries once.  A retry of a message kept in
        history cannot duplicate it (see :meth:`pub`).  With an explicit
        ``history_size`` (no message id), only failures where the message
        certainly was not published are retried.
    :param cluster: seed nodes of a Redis Cluster (``redis://`` or
        ``rediss://`` URLs, as the server's ``--redis-cluster``), instead of
        ``url``: messages go out with ``SPUBLISH`` to the shard that owns the
        channel (redis-py's :class:`~redis.cluster.RedisCluster` follows the
        slot map).
    :param sentinels: Redis Sentinel addresses, as the server's
        ``--sentinel``: ``("host", port)`` pairs or ``"host:port"`` strings
        (``"rediss://host:port[?ssl_ca_certs=/path/ca.pem]"`` for TLS to
        the sentinels and the master), with ``master``, instead of ``url``:
        messages go to the master the sentinels name (redis-py's
        :class:`~redis.sentinel.Sentinel`), found again after a failover.
    :param master: the name the sentinels monitor the master under (the
        server's ``--sentinel-master``).
    :param sentinel_password: the sentinels' own password, if any.
    :param master_password: the master's password, if any.
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
        sentinels: Sequence[str | tuple[str, int]] | None = None,
        master: str | None = None,
        sentinel_password: str | None = None,
        master_password: str | None = None,
        retry_for: float = 15.0,
    ) -> None:
        self._namespace = Namespace(name)
        self._log = logger if logger is not None else logging.getLogger("sockdrawer.client")
        self._timeout = timeout
        self._api_key = api_key
        self._max_channel_length = max_channel_length
        self._max_message_size = max_message_size
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._retry_for = retry_for
        #: until when (time.monotonic) the history function is known to be missing
        self._no_function_until = 0.0
        self._script: Any = None
        self._read_script: Any = None
        self._http: str | None = None
        self._redis: _Publisher | None = None
        self._owns_redis = False
        self._cluster = cluster is not None
        if sentinels is not None or master is not None:
            if url is not None or redis is not None or cluster is not None:
                raise ValueError("give one of url, redis, cluster and sentinels")
            self._redis, self.url = _sentinel_client(sentinels, master, timeout, sentinel_password,
                                                     master_password)
            self._owns_redis = True
            return
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
                url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=_no_retry()
            )
            self._owns_redis = True
        else:
            raise ValueError("url must start with redis://, rediss://, unix://, http:// or https://")

    def pub(self, message: str | bytes, channel: str = "", *, id: str | None = None) -> Any:
        """
        Publish ``message`` on ``channel``.

        On Redis, the message follows the history policy the nodes wrote
        into Redis: kept in the channel's history when they keep one (so
        ``sockdrawer.v1`` clients that resume get it), published plainly
        otherwise (or while no node has written a policy yet).

        Delivery: while Redis cannot be reached, is read-only (a failover)
        or loading, ``pub`` retries for up to ``retry_for`` seconds.  A
        message kept in history carries an id (``id``, or one made per
        call), and a retry whose message Redis did keep before the
        connection failed gets that message's offset back instead of
        publishing it twice: exactly once, as long as the message is among
        the channel's last 100.  Pass your own ``id`` to make your own
        retries (after a :class:`PublishError`) as safe.  Without history,
        a retry after a timeout may publish twice (at least once).

        :param message: ``str`` (sent as UTF-8, a text frame) or ``bytes``
            (a binary frame unless it is valid UTF-8).
        :param channel: the channel without namespace: ``"news"`` reaches
            sockets on ``/news``; ``""`` (the default) the root ``/``.
        :param id: the message's id (at most 64 characters), for publishing
            idempotently.
        :return: for a message kept in history, its offset (a ``str``);
            otherwise what the broker reports: for Redis, the number of
            subscribed sockdrawer nodes; for the HTTP API, the count (or
            offset) it answers.
        :raises ValueError: for a bad channel name, message type, size or id.
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
        if id is not None and (not isinstance(id, str) or not 0 < len(id) <= 64):
            raise ValueError("id must be a string of 1 to 64 characters")
        self._log.debug("publishing %d bytes on channel %r", len(payload), channel)
        if self._http is not None:
            return self._pub_http(channel, payload)
        message_id = id if id is not None else uuid.uuid4().hex
        deadline = time.monotonic() + self._retry_for
        attempt = 0
        while True:
            try:
                return self._pub_redis(key, payload, message_id, retry=attempt > 0 or id is not None)
            except Exception as e:
                # the explicit history script carries no id: retrying it after a timeout could keep the
                # message twice, so it is retried only when it certainly did not run
                sure = not self._history_size or _not_run(e)
                if not sure or not _retryable(e) or time.monotonic() >= deadline:
                    raise PublishError(f"could not publish on {self._where()}: {type(e).__name__}: {e}") from e
                self._log.debug("publishing on %s failed (%s); retrying", self._where(), e)
            time.sleep(min(0.05 * 2 ** attempt, 1.0, max(0.0, deadline - time.monotonic())))
            attempt += 1

    def _pub_redis(self, key: bytes, payload: bytes, message_id: str, retry: bool) -> Any:
        """One attempt: the history function, the explicit script, or a plain (S)PUBLISH."""
        assert self._redis is not None
        if self._history_size:
            return self._pub_history(key, payload)
        fcall = getattr(self._redis, "fcall", None)
        if fcall is not None and time.monotonic() >= self._no_function_until:
            from sockdrawer.core.history import function_name, history_channel

            check = "1" if retry else ""
            try:
                if self._cluster:
                    from sockdrawer.brokers.slots import hash_tag

                    channel = history_channel(self._namespace.name, key)
                    result = fcall(function_name(self._namespace.name), 1, hash_tag(channel), payload,
                                   message_id, check, channel)
                else:
                    result = fcall(function_name(self._namespace.name), 1, key, payload, message_id, check)
            except Exception as e:
                text = str(e)
                if "function not found" not in text.lower() and not text.startswith("NOHISTORY"):
                    raise
                # no node wrote a policy (or it keeps no history on a cluster): plainly, and look again soon
                self._no_function_until = time.monotonic() + 1.0
            else:
                return result.decode("ascii") if isinstance(result, bytes) else int(result)
        redis_channel = self._namespace.redis_channel(key)
        if self._cluster:
            result = self._redis.spublish(redis_channel, payload)  # type: ignore[attr-defined]
        else:
            result = self._redis.publish(redis_channel, payload)
        return int(result) if result is not None else 0

    def disconnect(self, user: str | None = None, *, client: str | None = None, code: int = DISCONNECT_CODE,
                   reason: str = DISCONNECT_REASON) -> None:
        """
        Close every connection of ``user`` (or the one with presence id
        ``client``) on every node: sockets with ``code`` (4000-4999) and
        ``reason``, event streams by ending them.  A user the nodes do not
        know is not an error (nothing is closed).

        :raises ValueError: for a bad code, reason, or not exactly one of user and client.
        :raises PublishError: when the command could not be sent.
        """
        fields: dict[str, Any] = {"op": "disconnect", "code": code, "reason": reason, "user": user,
                                  "client": client}
        self._control(command(fields, self._max_channel_length))

    def unsubscribe(self, user: str, channel: str) -> None:
        """
        End ``user``'s subscriptions to ``channel`` on every node: a
        ``sockdrawer.v1`` subscription gets ``{"op": "unsubscribed"}``, a raw
        socket on that channel is closed with 4003.

        :raises ValueError: for a bad channel or user.
        :raises PublishError: when the command could not be sent.
        """
        self._control(command({"op": "unsubscribe", "user": user, "channel": channel}, self._max_channel_length))

    def _control(self, cmd: dict[str, Any]) -> None:
        if self._http is not None:
            body = json.dumps({k: v for k, v in cmd.items() if k != "op"}).encode()
            request = urllib.request.Request(f"{self._http}/{cmd['op']}", data=body, method="POST")
            request.add_header("Content-Type", "application/json")
            self._request(request, refused="refused the command", failed="could not send the command to")
            return
        channel = self._namespace.redis_channel(CONTROL_KEY)
        redis: Any = self._redis
        try:
            if self._cluster:
                redis.spublish(channel, encode(cmd))
            else:
                redis.publish(channel, encode(cmd))
        except Exception as e:
            raise PublishError(f"could not send the command to {self._where()}: {e}") from e

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
        from sockdrawer.core.presence import READ_SCRIPT, hash_key, parse_entries

        register = getattr(self._redis, "register_script", None)
        if register is None:
            raise TypeError("presence needs a redis-py client (or an http:// URL)")
        if self._read_script is None:
            self._read_script = register(READ_SCRIPT)
        try:
            if self._cluster:
                from sockdrawer.brokers.slots import presence_key as hash_key
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
        from sockdrawer.core.history import PUBLISH_SCRIPT, history_channel, redis_keys

        if self._cluster:
            from sockdrawer.brokers.slots import SHARDED_PUBLISH_SCRIPT as PUBLISH_SCRIPT
            from sockdrawer.brokers.slots import history_keys as redis_keys
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


def _no_retry() -> Any:
    """
    redis-py's retry policy for our connections: none.  Its own retry would
    send a timed-out command again unchanged, without the check that makes a
    retried publish safe; :meth:`Client.pub` retries itself.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def _not_run(error: Exception) -> bool:
    """Whether a failed command certainly did not run: refused before sending, or refused by Redis."""
    text = str(error)
    if text.startswith(("READONLY", "LOADING", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")):
        return True
    return "Error connecting" in text or "Connection refused" in text


def _retryable(error: Exception) -> bool:
    """Whether a failed attempt may succeed later: Redis unreachable, read-only (a failover), loading, busy."""
    try:
        from redis import exceptions
    except ImportError:  # pragma: no cover - redis-py is a dependency
        return False
    if isinstance(error, (exceptions.ConnectionError, exceptions.TimeoutError, exceptions.ReadOnlyError,
                          exceptions.BusyLoadingError)):
        return True
    text = str(error)
    # the command did not run: NOREPLICAS (min-replicas-to-write), READONLY (a demoted master), ...
    return text.startswith(("READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "NOREPLICAS"))


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


def _sentinel_client(sentinels: Sequence[str | tuple[str, int]] | None, master: str | None, timeout: float,
                     sentinel_password: str | None, master_password: str | None) -> tuple[Any, str]:
    """
    A redis-py client for the master the sentinels name ``master`` (found
    again on each new connection), and how to name it in errors.
    """
    if not master or any(c.isspace() for c in master):
        raise ValueError("sentinels need master=, the name the sentinels monitor the master under (no spaces)")
    if sentinels is None or isinstance(sentinels, str) or not sentinels:
        raise ValueError("sentinels must be a list of addresses, e.g. [('10.0.0.1', 26379)] or "
                         "['10.0.0.1:26379']")
    addresses: list[tuple[str, int]] = []
    schemes: set[str] = set()
    ca: str | None = None
    for entry in sentinels:
        if isinstance(entry, (tuple, list)):
            if len(entry) != 2:
                raise ValueError(f"a sentinel is (host, port), not {entry!r}")
            addresses.append((str(entry[0]), int(entry[1])))
            schemes.add("redis")
            continue
        text = str(entry).strip()
        parts = urlsplit(text if "://" in text else f"redis://{text}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad sentinel address {text!r}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss") or not parts.hostname:
            raise ValueError(f"a sentinel is host:port, redis://host:port or rediss://host:port, not {text!r}")
        if parts.username or parts.password is not None:
            raise ValueError("give the sentinels' password as sentinel_password=, not in the address")
        addresses.append((parts.hostname, 26379 if port is None else port))
        schemes.add(scheme)
        for key, _, value in (p.partition("=") for p in parts.query.split("&")):
            if key == "ssl_ca_certs":
                ca = value
    if len(schemes) > 1:
        raise ValueError("give every sentinel with TLS (rediss://) or none")
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout, "retry": _no_retry()}
    if schemes == {"rediss"}:
        common["ssl"] = True
        if ca:
            common["ssl_ca_certs"] = ca
    from redis.sentinel import Sentinel

    sentinel = Sentinel(addresses, sentinel_kwargs={**common, "password": sentinel_password}, **common)
    where = ", ".join(f"{host}:{port}" for host, port in addresses)
    # connects (asking the sentinels where the master is) on first use, like Redis.from_url
    client = sentinel.master_for(master, password=master_password,
                                 connection_class=_sentinel_connection_class(schemes == {"rediss"}), **common)
    return client, f"Sentinel master {master!r} (sentinels {where})"


def _sentinel_connection_class(tls: bool) -> Any:
    """
    redis-py's connection to a Sentinel master, which also takes
    ``NOREPLICAS`` (a master with ``min-replicas-to-write`` whose replica was
    just promoted: it refuses writes, and runs none of the command) as a sign
    of a failover, as redis-py takes ``READONLY``: it disconnects, so that
    the next attempt asks the sentinels again, and raises ConnectionError.
    """
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError
    from redis.sentinel import SentinelManagedConnection, SentinelManagedSSLConnection

    base: Any = SentinelManagedSSLConnection if tls else SentinelManagedConnection

    class _FailoverAwareConnection(base):  # type: ignore[misc]
        def read_response(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return super().read_response(*args, **kwargs)
            except ResponseError as e:
                if not str(e).startswith("NOREPLICAS"):
                    raise
                self.disconnect()
                raise RedisConnectionError(f"the master refused the write ({e}): a failover?") from e

    return _FailoverAwareConnection
