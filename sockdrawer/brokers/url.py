"""
Where Redis is: ``redis://``, ``rediss://`` and ``unix://`` URLs (as redis-py reads them), and
what a link connects to.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import ssl
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


@dataclass(frozen=True)
class RedisURL:
    """
    A parsed ``redis://``, ``rediss://`` or ``unix://`` URL.

    Accepted forms (as redis-py accepts them)::

        redis://[[username]:password@]host[:port][/db]
        rediss://[[username]:password@]host[:port][/db][?ssl_ca_certs=/path/ca.pem]
        unix://[[username]:password@]/path/to/redis.sock[?db=0&password=...]

    The database number is accepted and checked, and has no effect: Redis
    pub/sub channels are the same in every database.
    """

    scheme: str
    host: str = "localhost"
    port: int = 6379
    path: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl_ca_certs: str | None = None

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        """
        :raises ValueError: with a one-line reason.
        """
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"bad Redis URL: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("Redis URL must start with redis://, rediss:// or unix://")
        query = parse_qs(parts.query)

        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else one("password")
        db_text = one("db")
        if scheme == "unix":
            if not parts.path:
                raise ValueError("unix:// Redis URL needs a socket path, e.g. unix:///run/redis.sock")
            host, path = "", unquote(parts.path)
            port = 0
        else:
            if not parts.hostname:
                raise ValueError("Redis URL has no host")
            host, path = parts.hostname, ""
            port = 6379 if port is None else port
            dbpath = parts.path.lstrip("/")
            if dbpath:
                db_text = dbpath
        db = 0
        if db_text is not None:
            if not db_text.isdigit():
                raise ValueError("Redis database number must be a non-negative integer")
            db = int(db_text)
        ca = one("ssl_ca_certs")
        if ca is not None and scheme != "rediss":
            raise ValueError("ssl_ca_certs is only for rediss:// URLs")
        return cls(scheme, host, port, path, db, username, password, ca)

    def endpoint(self, reactor: Any, timeout: float = 5.0) -> IStreamClientEndpoint:
        """The client endpoint that connects to this Redis server."""
        if self.scheme == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        tcp = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if self.scheme == "redis":
            return tcp
        options = ssl.optionsForClientTLS(self.host, trustRoot=self.trust_root())
        return wrapClientTLS(options, tcp)

    def trust_root(self) -> Any:
        """
        The certificates a ``rediss://`` server must chain to: the PEM file
        in ``ssl_ca_certs``, or the platform's trust store.

        :raises ValueError: for an unreadable file or one without certificates.
        """
        if not self.ssl_ca_certs:
            return ssl.platformTrust()
        try:
            with open(self.ssl_ca_certs, "rb") as f:
                pems = _PEM.findall(f.read())
        except OSError as e:
            raise ValueError(f"cannot read ssl_ca_certs file {self.ssl_ca_certs}: {e.strerror}") from None
        if not pems:
            raise ValueError(f"no PEM certificate in {self.ssl_ca_certs}")
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])

    def __str__(self) -> str:
        """The URL without its password, for logs."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        return f"{self.scheme}://{self.host}:{self.port}/{self.db}"


class RedisAddress(Protocol):
    """
    What a :class:`RedisLink` connects to: a :class:`RedisURL`, or a master
    found through Redis Sentinel (:class:`~sockdrawer.sentinel.SentinelMaster`,
    whose ``follower()`` service the link runs as its child).  Its ``str()``
    names it in logs, without the password.
    """

    @property
    def password(self) -> str | None: ...

    @property
    def username(self) -> str | None: ...

    def endpoint(self, reactor: Any, timeout: float = 5.0) -> IStreamClientEndpoint: ...
