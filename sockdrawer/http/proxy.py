"""
The connect proxy: at each handshake (WebSocket or event stream) the node
asks the application's backend who the browser is, forwarding the browser's
own ``Cookie`` and ``Authorization`` headers, so an app that knows its users
from a session cookie needs no tokens.  The transports get :meth:`ConnectProxy.ask`
as a plain callable (the node hands it in); they never import this module.
"""

from __future__ import annotations

import io
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from sockdrawer.core.tokens import Grant, check_pattern

_log = Logger(namespace="sockdrawer.proxy")

#: the most of an answer read (a larger one is a failure: 503)
MAX_ANSWER = 64 * 1024


class ProxyRefused(Exception):
    """The proxy's verdict against a handshake: ``status`` (401, 403, or 503 when it could not answer)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Capped(Protocol):
    """Reads a response body up to :data:`MAX_ANSWER` bytes; more fails it."""

    def __init__(self, done: Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_ANSWER:
            if not self.done.called:
                self.done.errback(ProxyRefused(503, f"connect proxy answer over {MAX_ANSWER} bytes"))
            transport: Any = self.transport
            transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if self.done.called:
            return
        # PotentialDataLoss: an HTTP/1.0 answer without Content-Length, ended by closing (as readBody takes it)
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(ProxyRefused(503, f"connect proxy answer cut short: {reason.getErrorMessage()}"))


def grant_from_answer(body: bytes, now: float) -> Grant:
    """
    The :class:`Grant` of a ``200`` answer: ``{"user": ..., "channels":
    [patterns], "expires": seconds since the epoch}``, each optional
    (no ``channels``: every channel; no ``expires``: the connection's life).

    :raises ProxyRefused: 503 for an answer that is not such an object.
    """
    try:
        answer = json.loads(body)
    except ValueError:
        raise ProxyRefused(503, "connect proxy answer is not JSON") from None
    if not isinstance(answer, dict):
        raise ProxyRefused(503, "connect proxy answer is not a JSON object")
    user = answer.get("user")
    if user is not None and not isinstance(user, str):
        raise ProxyRefused(503, "connect proxy answer: user must be a string")
    channels = answer.get("channels", ["*"])
    if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
        raise ProxyRefused(503, "connect proxy answer: channels must be a list of patterns")
    try:
        patterns = tuple(check_pattern(c) for c in channels)
    except ValueError as e:
        raise ProxyRefused(503, f"connect proxy answer: {e}") from None
    expires = answer.get("expires", math.inf)
    if isinstance(expires, bool) or not isinstance(expires, (int, float)) or expires <= now:
        raise ProxyRefused(503, "connect proxy answer: expires must be a time in the future")
    return Grant(user, patterns, float(expires))


class ConnectProxy:
    """
    Asks the application's backend about each handshake.

    :param url: where to ``POST`` (``http://`` or ``https://``).
    :param timeout: seconds an answer may take (then 503: fail closed).
    :param max_concurrent: requests in flight at once; a handshake beyond them
        is refused with 503 at once (no queue grows).
    :param headers: the browser's request headers forwarded as the request's own.
    :param reactor: the reactor.
    """

    def __init__(self, url: str, timeout: float, max_concurrent: int, headers: Sequence[str], reactor: Any,
                 grants: bool = True, what: str = "connect proxy") -> None:
        self.url = url.encode("ascii")
        #: a 200 answer names a grant (the connect proxy), or only allows (the subscribe proxy: body ignored)
        self.grants = grants
        self.what = what
        self.timeout = timeout
        self.max_concurrent = max_concurrent
        self.headers = tuple(h.lower() for h in headers)
        self._reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=True)
        # keep-alive connections kept for the next handshakes (2 by default: the others would connect anew)
        pool.maxPersistentPerHost = min(max_concurrent, 16)
        self._agent = Agent(reactor, pool=pool)
        self.in_flight = 0
        #: answers by outcome: "admitted", "401", "403", "unavailable" (timeouts, errors, bad answers, busy)
        self.answers: dict[str, int] = {}

    def ask(self, request: Mapping[str, Any], browser_headers: Mapping[str, str]) -> Deferred[Grant]:
        """
        Ask about one handshake: ``request`` is the JSON sent (transport,
        path or channel, subprotocol, remote address, origin); a client id is
        added.  Fires with the :class:`Grant` to admit it as, or fails with
        :class:`ProxyRefused`.
        """
        if self.in_flight >= self.max_concurrent:
            self._count("unavailable")
            _log.warn("{what} busy ({count} requests in flight): refusing with 503", what=self.what,
                      count=self.in_flight)
            return fail(ProxyRefused(503, f"{self.what} busy"))
        body = json.dumps({"client": secrets.token_urlsafe(9), **request}).encode()
        headers = Headers({b"content-type": [b"application/json"]})
        for name in self.headers:
            value = browser_headers.get(name)
            if value is not None:
                headers.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
        self.in_flight += 1
        d = self._post(headers, body)
        d.addCallback(self._answered)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=_timed_out)
        d.addErrback(self._failed)

        def done(result: Any) -> Any:
            self.in_flight -= 1
            return result

        d.addBoth(done)
        return d

    def _post(self, headers: Headers, body: bytes, again: bool = True) -> Deferred[Any]:
        """
        The request, on a kept-alive connection when one is free.  A server
        may close an idle connection just as it is reused (Twisted retries
        only idempotent requests): asking who a browser is has no side
        effect, so a request that never got an answer on it goes once more.
        """
        d: Deferred[Any] = self._agent.request(b"POST", self.url, headers, FileBodyProducer(io.BytesIO(body)))
        if again:
            def retry(failure: Failure) -> Any:
                failure.trap(ResponseNeverReceived, RequestTransmissionFailed)
                reasons = getattr(failure.value, "reasons", [])
                if any(r.check(CancelledError) for r in reasons):
                    return failure  # cancelled (the timeout): no second try
                return self._post(headers, body, again=False)

            d.addErrback(retry)
        return d

    def _answered(self, response: Any) -> Deferred[Grant]:
        status = response.code
        if status in (401, 403):
            response.deliverBody(_Discard())
            self._count(str(status))
            raise ProxyRefused(status, f"refused by the {self.what} ({status})")
        if status != 200:
            response.deliverBody(_Discard())
            raise ProxyRefused(503, f"{self.what} answered {status}")
        if not self.grants:
            response.deliverBody(_Discard())
            self._count("admitted")
            return None  # type: ignore[return-value]
        read: Deferred[bytes] = Deferred()
        response.deliverBody(_Capped(read))
        return read.addCallback(lambda body: self._admitted(grant_from_answer(body, self._reactor.seconds())))

    def _admitted(self, grant: Grant) -> Grant:
        self._count("admitted")
        return grant

    def _failed(self, failure: Failure) -> Failure:
        refused: Any = failure.value
        if isinstance(refused, ProxyRefused) and refused.status in (401, 403):
            return failure
        if isinstance(refused, ProxyRefused):
            why = refused.reason
        else:
            why = f"{self.what} unreachable: {failure.getErrorMessage()}"
        self._count("unavailable")
        _log.warn("{why}: refusing with 503", why=why)
        return Failure(ProxyRefused(503, why))

    def _count(self, outcome: str) -> None:
        self.answers[outcome] = self.answers.get(outcome, 0) + 1


def _timed_out(result: Any, timeout: float) -> Failure:
    return Failure(ProxyRefused(503, f"connect proxy did not answer within {timeout} s"))


class _Discard(Protocol):
    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        pass
