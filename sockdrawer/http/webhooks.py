"""
The lifecycle webhook sender (``--webhook URL``): takes events off the queue
(:class:`~sockdrawer.core.lifecycle.IEventQueue`) and ``POST``s each, one JSON
object per request, signed ``X-Sockdrawer-Signature: sha256=<hex HMAC-SHA256
of the body>`` with ``--webhook-secret``.

An event leaves the queue only once the receiver answered 2xx.  Anything
else (an error, a timeout, another status) keeps it, and the sender waits
before it tries again, one second at first, doubling up to
:attr:`WebhookSender.max_backoff`; each failed try is one warning line, and one
info line says when the receiver answers again.  At most
:attr:`WebhookSender.concurrency` requests are in flight per node, so events
may arrive out of order; a node that dies with events in flight leaves them
to another node, which sends them again (at least once: the ``id`` tells
duplicates apart).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import random
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

_log = Logger(namespace="sockdrawer.webhook")

#: the signature header
SIGNATURE_HEADER = b"X-Sockdrawer-Signature"


def signature(secret: bytes, body: bytes) -> str:
    """The ``X-Sockdrawer-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def with_id(event_id: str, body: bytes) -> bytes:
    """An event's request body: its queued JSON object with ``"id"`` first."""
    return b'{"id":"' + event_id.encode("ascii") + b'",' + body[1:]


class WebhookFailed(Exception):
    """The receiver did not take an event (status or error in the message)."""


class WebhookSender(Service):
    """
    :param queue: where events wait.
    :param url: where to ``POST``.
    :param secret: the signing secret (``None``: requests go unsigned).
    :param timeout: seconds a request may take.
    :param reactor: the reactor.
    """

    #: requests in flight at once, per node
    concurrency = 8
    #: the longest wait between tries while the receiver fails, in seconds
    max_backoff = 30.0
    #: seconds between looks at the queue for events other nodes left (new ones nudge the sender)
    poll_interval = 1.0

    def __init__(self, queue: Any, url: str, secret: str | None, timeout: float, reactor: Any) -> None:
        self.queue = queue
        self.url = url.encode("ascii")
        self.secret = secret.encode("utf-8") if secret else None
        self.timeout = timeout
        self._reactor = reactor
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = self.concurrency  # (2 by default: the others would connect anew each time)
        self._agent = Agent(reactor, pool=pool)
        #: events taken and not yet delivered: id -> body
        self.in_flight: dict[str, bytes] = {}
        #: those that failed, waiting for the next try
        self._retry: dict[str, bytes] = {}
        self._taking = False
        #: the wait between tries while the receiver fails, and the one event tried after it
        self._resume: Any = None
        self._probe: str | None = None
        self._backoff = 0.0
        self._failures_in_a_row = 0
        #: delivered events, failed tries, and the queue's length when last read
        self.sent = 0
        self.failures = 0
        self.queued = 0
        self._poll = LoopingCall(self._look)
        self._poll.clock = reactor
        queue.on_added = self.nudge

    def startService(self) -> None:
        super().startService()
        self._poll.start(self.poll_interval, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._poll.running:
            self._poll.stop()
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        return None

    def nudge(self) -> None:
        """Events were queued: take them now (while the receiver fails: at the next try)."""
        if self.running and not self._waiting():
            self._reactor.callLater(0, self._pump)

    def _waiting(self) -> bool:
        """Whether the sender waits on a failing receiver: the pause between tries, or one try in flight."""
        return self._resume is not None or self._probe is not None

    @inlineCallbacks
    def _look(self) -> Any:
        try:
            self.queued = yield self.queue.length()
        except Exception as e:
            _log.debug("cannot read the webhook queue's length: {error}", error=e)
        self._pump()

    @inlineCallbacks
    def _pump(self) -> Any:
        """Send the failed events again, then take new ones, until ``concurrency`` are in flight."""
        if self._taking or not self.running or self._waiting():
            return
        self._taking = True
        try:
            while self._retry and len(self.in_flight) < self.concurrency:
                event_id = next(iter(self._retry))
                self._send(event_id, self._retry.pop(event_id))
            while self.running and not self._waiting():
                room = self.concurrency - len(self.in_flight)
                if room <= 0:
                    break
                events = yield self.queue.take(room)
                if not events:
                    break
                for event_id, body in events:
                    if event_id not in self.in_flight and event_id not in self._retry:
                        self._send(event_id, body)
        except Exception as e:
            _log.debug("cannot take webhook events: {error}", error=e)
        finally:
            self._taking = False

    def _send(self, event_id: str, body: bytes) -> None:
        self.in_flight[event_id] = body
        payload = self.payload(event_id, body)
        headers = Headers({b"content-type": [b"application/json"], b"user-agent": [b"sockdrawer-webhook"]})
        self.sign(headers, payload)
        d: Deferred[Any] = self._agent.request(b"POST", self.url, headers, FileBodyProducer(io.BytesIO(payload)))
        d.addCallback(self._answered)
        d.addTimeout(self.timeout, self._reactor)
        d.addCallbacks(self._delivered, self._failed, callbackArgs=(event_id,), errbackArgs=(event_id,))

    def payload(self, event_id: str, body: bytes) -> bytes:
        """The request body of a queued event: the event with its ``id``."""
        return with_id(event_id, body)

    def sign(self, headers: Headers, payload: bytes) -> None:
        if self.secret is not None:
            headers.addRawHeader(SIGNATURE_HEADER, signature(self.secret, payload).encode("ascii"))

    def _answered(self, response: Any) -> Deferred[Any]:
        # the body is read (and dropped) so that the connection can be kept alive
        d: Deferred[Any] = Deferred()
        response.deliverBody(_Drain(d))

        def check(_: Any) -> None:
            if not 200 <= response.code < 300:
                raise WebhookFailed(f"answered {response.code}")

        return d.addCallback(check)

    def _delivered(self, _: Any, event_id: str) -> None:
        self.in_flight.pop(event_id, None)
        self.sent += 1
        if self._probe == event_id:
            self._probe = None
        if self._failures_in_a_row:
            _log.info("webhook receiver {url} answers again (after {count} failed tries)", url=self.url.decode(),
                      count=self._failures_in_a_row)
            self._failures_in_a_row = 0
            self._backoff = 0.0
        self.queue.done(event_id).addErrback(
            lambda f: _log.warn("cannot acknowledge webhook event {id} (it may be sent again): {error}",
                                id=event_id, error=f.getErrorMessage()))
        self._pump()

    def _failed(self, failure: Failure, event_id: str) -> None:
        body = self.in_flight.pop(event_id, None)
        if body is None:
            return
        self.failures += 1
        self._retry[event_id] = body
        probe = self._probe == event_id
        if probe:
            self._probe = None
        elif self._waiting():
            return  # the wait started with an earlier failure: this one goes again after it
        self._failures_in_a_row += 1
        self._backoff = min(self.max_backoff, max(1.0, self._backoff * 2))
        delay = self._backoff * random.uniform(0.8, 1.0)
        _log.warn("webhook receiver {url} failed: {error}; {count} event(s) wait; trying again in {delay:.1f} s "
                  "({failures} failed in a row)", url=self.url.decode(), error=_why(failure),
                  count=max(self.queued, len(self._retry) + len(self.in_flight)), delay=delay,
                  failures=self._failures_in_a_row)
        self._resume = self._reactor.callLater(delay, self._try_again)

    def _try_again(self) -> None:
        """After a wait: one failed event goes again; once it is delivered, the rest follow."""
        self._resume = None
        if not self._retry:
            self._pump()
            return
        # the failed events stay this sender's (no other node takes them) while it keeps trying
        self.queue.keep(list(self._retry)).addErrback(lambda f: None)
        event_id = next(iter(self._retry))
        self._probe = event_id
        self._send(event_id, self._retry.pop(event_id))


class PusherWebhookSender(WebhookSender):
    """
    Pusher's webhooks (``--pusher-webhook``): each request is ``{"time_ms": ..., "events": [{"name": ...,
    "channel": ..., ...}]}``, signed as Pusher signs them (``X-Pusher-Key``, and ``X-Pusher-Signature``: the
    hex HMAC-SHA256 of the body with the app's secret), so the server libraries' ``validate_webhook`` takes it.

    :param app_key: the Pusher app's key; ``secret``: its secret.
    """

    def __init__(self, queue: Any, url: str, app_key: str, secret: bytes, timeout: float, reactor: Any) -> None:
        super().__init__(queue, url, None, timeout, reactor)
        self.app_key = app_key.encode("utf-8")
        self.app_secret = secret

    def payload(self, event_id: str, body: bytes) -> bytes:
        fields = json.loads(body)
        time_ms = fields.pop("time", 0)
        event = {"name": fields.pop("event"), **fields}
        if "event_name" in event:  # a client event's own name
            event["event"] = event.pop("event_name")
        return json.dumps({"time_ms": time_ms, "events": [event]}, separators=(",", ":")).encode()

    def sign(self, headers: Headers, payload: bytes) -> None:
        headers.addRawHeader(b"X-Pusher-Key", self.app_key)
        headers.addRawHeader(b"X-Pusher-Signature",
                             hmac.new(self.app_secret, payload, hashlib.sha256).hexdigest().encode("ascii"))


class _Drain(Protocol):
    """Reads a response body to its end, keeping none of it."""

    def __init__(self, done: Deferred[Any]) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.done.called:  # not cancelled by the timeout
            self.done.callback(None)


def _why(failure: Failure) -> str:
    reasons = getattr(failure.value, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons)
    if failure.check(WebhookFailed):
        return str(failure.value)
    return failure.getErrorMessage() or type(failure.value).__name__
