"""
What the Sentinel support says on the wire: sentinel addresses, their endpoints and AUTH, the
one-shot query connection (``SENTINEL get-master-addr-by-name``) and its errors.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any
from urllib.parse import urlsplit

import hiredis
from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from sockdrawer.brokers.linkparts import _command
from sockdrawer.brokers.url import RedisURL

_log = Logger(namespace="sockdrawer.sentinel")


#: Sentinel's port when an address leaves it out
DEFAULT_PORT = 26379

Address = tuple[str, int]


class SentinelError(Exception):
    """A sentinel or the master it named refused, did not answer in time, or named no master."""


class NotMaster(SentinelError):
    """The server a sentinel named as the master says (``ROLE``) it is not one."""


def parse_sentinel(text: str) -> RedisURL:
    """
    A sentinel's address: ``HOST:PORT``, ``HOST`` (port 26379),
    ``redis://HOST:PORT`` or ``rediss://HOST:PORT[?ssl_ca_certs=/path/ca.pem]``
    (TLS).  Credentials do not go here (``--sentinel-password``).

    :raises ValueError: with a one-line reason.
    """
    text = text.strip()
    if not text:
        raise ValueError("empty sentinel address")
    url_text = text if "://" in text else f"redis://{text}"
    try:
        parts = urlsplit(url_text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad sentinel address {text!r}: {e}") from None
    if parts.scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f"a sentinel is HOST:PORT, redis://HOST:PORT or rediss://HOST:PORT, not {text!r}")
    if parts.username or parts.password is not None or "password=" in parts.query:
        raise ValueError("give the sentinels' password with --sentinel-password, not in the address")
    url = RedisURL.parse(url_text)
    return url if port is not None else dataclasses.replace(url, port=DEFAULT_PORT)


def _endpoint(url: RedisURL, reactor: Any, timeout: float) -> IStreamClientEndpoint:
    """
    ``url.endpoint()``, but for an IP address (what sentinels name) a plain
    TCP endpoint: a refused connection fails at once, not after
    ``HostnameEndpoint``'s 0.3-second attempt delay.
    """
    try:
        ipaddress.ip_address(url.host)
    except ValueError:
        return url.endpoint(reactor, timeout)
    kind = TCP6ClientEndpoint if ":" in url.host else TCP4ClientEndpoint
    tcp = kind(reactor, url.host, url.port, timeout=timeout)
    if url.scheme != "rediss":
        return tcp
    return wrapClientTLS(ssl.optionsForClientTLS(url.host, trustRoot=url.trust_root()), tcp)


def _auth(username: str | None, password: str) -> bytes:
    if username:
        return _command(b"AUTH", username.encode(), password.encode())
    return _command(b"AUTH", password.encode())


def _where(url: RedisURL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{host}:{url.port}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _describe(e: BaseException) -> str:
    if isinstance(e, defer.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


class _Replies(Protocol):
    """Parses RESP replies with hiredis and hands each to :meth:`reply`."""

    #: a TCP or TLS transport (abortConnection), or None before the connection
    transport: Any

    def __init__(self) -> None:
        self.reader = hiredis.Reader()

    def dataReceived(self, data: bytes) -> None:
        self.reader.feed(data)
        while self.transport is not None and (reply := self.reader.gets()) is not False:
            self.reply(reply)

    def reply(self, reply: Any) -> None:
        raise NotImplementedError


class _Query(_Replies):
    """Writes some commands; :attr:`done` fires with the last reply, or fails at the first error or a loss."""

    def __init__(self, commands: list[bytes]) -> None:
        super().__init__()
        self.commands = commands
        self.replies: list[Any] = []
        self.done: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(b"".join(self.commands))

    def reply(self, reply: Any) -> None:
        if self.done.called:
            return
        if isinstance(reply, hiredis.ReplyError):
            self.done.errback(SentinelError(str(reply)))
            return
        self.replies.append(reply)
        if len(self.replies) == len(self.commands):
            self.done.callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.done.called:
            self.done.errback(reason)


class _QueryFactory(Factory):
    def __init__(self, commands: list[bytes]) -> None:
        self.commands = commands
        self.protocol_made: _Query | None = None
        self.noisy = False

    def buildProtocol(self, addr: Any) -> _Query:
        self.protocol_made = _Query(self.commands)
        self.protocol_made.factory = self
        return self.protocol_made
