"""
What the Redis and Redis Cluster links share: the reconnection backoff, the batching of a
turn's channel changes, the history function library and replay answers, RESP and pings.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from sockdrawer.brokers import slots as _slots
from sockdrawer.core import history

_log = Logger(namespace="sockdrawer.redis")


class Backoff:
    """
    How long to wait before each Redis reconnection attempt: the first one
    right away (a healthy link that dropped should lose no more messages than
    it must), then ``initial`` seconds doubling up to ``maximum``, each with
    up to ``jitter`` (a fraction) more at random, never above ``maximum``.

    The count starts over only when the link is usable again (subscribed,
    or for publishing, past AUTH), not at every TCP connect: a wrong
    password backs off like an unreachable server.  Used as a
    ``ClientService`` retry policy (its attempt number is ignored).
    """

    def __init__(self, initial: float = 0.5, maximum: float = 30.0, factor: float = 2.0, jitter: float = 0.25,
                 random: Callable[[], float] = random.random, report: RetryLog | None = None) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._random = random
        self.failures = 0
        #: says in the log why a try failed and when the next one is
        self.report = report

    def __call__(self, attempt: int = 0) -> float:
        n, self.failures = self.failures, self.failures + 1
        if n == 0:
            delay = 0.0
        else:
            base = min(self.maximum, self.initial * self.factor ** min(n - 1, 64))
            delay = min(self.maximum, base * (1 + self.jitter * self._random()))
        if self.report is not None:
            self.report.retrying(delay)
        return delay

    def reset(self) -> None:
        self.failures = 0
        if self.report is not None:
            self.report.working()


class RetryLog:
    """
    One Redis connection's failed tries, said once each in sockdrawer's
    words: what failed (the connect's error, or Redis refusing AUTH or
    SELECT) and when the next try is, with the count of failed tries in a
    row; and, when it works again, one line saying so.  A working connection
    that drops is not a failed try (the link says that itself).

    ``loud`` says whether this connection's failures are news: the
    publishing and history connections of a link whose subscriber connection
    also fails say nothing, so a node that cannot reach Redis says so once
    per try, not once per connection.
    """

    def __init__(self, url: str, what: str = "", loud: Callable[[], bool] = lambda: True,
                 log: Logger = _log) -> None:
        self.url = url
        self.what = what
        self.loud = loud
        self.log = log
        #: failed tries in a row
        self.tries = 0
        self._reason: str | None = None
        self._said = False

    def failed(self, reason: str) -> None:
        """This try failed, for ``reason`` (its line comes with the next try's delay)."""
        self._reason = reason

    def retrying(self, delay: float) -> None:
        reason, self._reason = self._reason, None
        if reason is None:
            return  # a working connection dropped: not a failed try
        self.tries += 1
        if not self.loud():
            return
        self._said = True
        reason = reason.rstrip(".").replace("Redis error: could not auth: ", "AUTH refused: ")
        when = f"in {delay:.1f} s" if delay > 0 else "now"
        self.log.warn("cannot use Redis at {url}{what}: {reason}; trying again {when} ({tries} failed in a row)",
                      url=self.url, what=self.what, reason=reason, when=when, tries=self.tries)

    def working(self) -> None:
        if self._said:
            self.log.info("Redis at {url}{what} works again after {tries} failed tries",
                          url=self.url, what=self.what, tries=self.tries)
        self.tries = 0
        self._reason = None
        self._said = False


@implementer(IStreamClientEndpoint)
class ReportingEndpoint:
    """An endpoint that tells a :class:`RetryLog` why a connect failed."""

    def __init__(self, endpoint: IStreamClientEndpoint, report: RetryLog) -> None:
        self.endpoint = endpoint
        self.report = report

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.endpoint.connect(factory)

        def failed(f: Failure) -> Failure:
            self.report.failed(f.getErrorMessage())
            return f

        d.addErrback(failed)
        return d

    def __repr__(self) -> str:
        return repr(self.endpoint)


class BatchedChannelChanges:
    """
    :class:`IChannelObserver` for links that subscribe per channel: the
    channels opened or closed during one reactor turn are collected, and
    :meth:`_apply_changes` gets them all at the end of the turn, so many
    sockets connecting at once make one command, not one each.
    """

    _clock: Any
    _changed: dict[bytes, None]
    _update: Any

    def channel_opened(self, key: bytes) -> None:
        self._change(key)

    def channel_closed(self, key: bytes) -> None:
        self._change(key)

    def _change(self, key: bytes) -> None:
        self._changed[key] = None
        if self._update is None:
            self._update = self._clock.callLater(0, self._send_changes)

    def _send_changes(self) -> None:
        self._update = None
        changed, self._changed = self._changed, {}
        self._apply_changes(changed)

    def _apply_changes(self, changed: dict[bytes, None]) -> None:
        """Act on the channels whose state changed this turn (read the hub for where they stand now)."""
        raise NotImplementedError




def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _replay_result(result: Any, since: str | None, wanted_epoch: str | None, after: str,
                   limit: int) -> history.Replay:
    """:data:`~sockdrawer.history.REPLAY_SCRIPT`'s answer as a Replay; HistoryReset when it cannot cover ``since``."""
    if not result or result[0] is None:
        raise history.HistoryReset("no history")
    epoch, first, last, whole = _text(result[0]), _text(result[1]), _text(result[2]), _text(result[3])
    latest = f"{epoch}:{last}"
    if since is None:
        return history.Replay(latest)
    if wanted_epoch != epoch:
        raise history.HistoryReset("another epoch")
    position = history.stream_id(after)
    if position > history.stream_id(last):
        raise history.HistoryReset("offset from the future")
    if whole != "1" and history.stream_id(first) > position:
        # the cap dropped entries, and maybe some after this position
        raise history.HistoryReset("older than the history")
    pairs = result[4:]
    messages = tuple((f"{epoch}:{_text(pairs[i])}", bytes(pairs[i + 1])) for i in range(0, len(pairs), 2))
    # a page: full (by count or by bytes), unless it ends at the last message
    more = bool(messages) and messages[-1][0] != latest and (
        len(messages) >= limit or sum(len(m) for _, m in messages) >= history.PAGE_BYTES)
    return history.Replay(latest, messages, more)


def read_history(run: Callable[[list[Any], list[Any]], Deferred[Any]], keys: tuple[bytes, bytes],
                 since: str | None, limit: int, ttl: int) -> Deferred[history.Replay]:
    """
    One page of a channel's history after ``since`` (its position alone
    without): :data:`~sockdrawer.core.history.REPLAY_SCRIPT` run by ``run``
    on the stream and epoch ``keys``; fails with ``HistoryReset`` when
    history cannot cover ``since``.
    """
    after = ""
    wanted_epoch: str | None = None
    if since is not None:
        try:
            wanted_epoch, after = history.split_offset(since)
            history.stream_id(after)
        except history.HistoryReset as e:
            return fail(e)
    d = run(list(keys), [after, limit, ttl, wanted_epoch or "", history.PAGE_BYTES])
    d.addCallback(_replay_result, since, wanted_epoch, after, limit)
    return d


class HistoryLibrary:
    """
    The history policy (size and TTL) a node writes into Redis, as a Redis 7
    function library (:func:`sockdrawer.history.library_code`), so that
    every publisher (``sockdrawer.Client``, ``FCALL`` from any language,
    this node) keeps the same history without being told the nodes'
    options.  Loaded on every new publishing connection (a replica promoted
    by a failover has it already: functions replicate); replaced, with a
    warning, when another node loaded a different policy.  Where Redis has
    no functions (before 7.0, or an ACL without ``FUNCTION``), the node
    publishes with the equivalent script and its own options.
    """

    def __init__(self, namespace: str, size: int, ttl: float, sharded: bool) -> None:
        self.namespace = namespace
        self.size = size
        self.ttl = max(1, int(ttl))
        self.sharded = sharded
        self.name = history.library_name(namespace)
        self.function = history.function_name(namespace)
        self.code = history.library_code(namespace, size, ttl, sharded)
        self.policy = history.policy_line(namespace, size, ttl, sharded)
        #: whether the function is there to call (None: not known yet)
        self.loaded: bool | None = None
        self._warned = False

    def load(self, protocol: Any, where: str) -> Deferred[bool]:
        """Make sure ``protocol``'s Redis has this policy's library; fires with whether it does."""
        d: Deferred[Any] = protocol.execute_command("FUNCTION", "LIST", "LIBRARYNAME", self.name, "WITHCODE")
        d.addCallback(self._listed, protocol, where)
        d.addCallbacks(self._done, self._failed, errbackArgs=(where,))
        return d

    def _listed(self, listing: Any, protocol: Any, where: str) -> Any:
        theirs = None
        for library in listing or ():
            fields = [_text(v) if isinstance(v, bytes) else v for v in library]
            named = dict(zip(fields[::2], fields[1::2], strict=False))
            if named.get("library_name") == self.name and isinstance(named.get("library_code"), str):
                theirs = history.loaded_policy(named["library_code"])
        if theirs == self.policy:
            return True
        if theirs is not None:
            _log.warn("replacing the history policy {theirs} on Redis at {url} with this node's {ours}: give "
                      "every node of namespace {name!r} the same --history-size and --history-ttl",
                      theirs=theirs, ours=self.policy, url=where, name=self.namespace)
        else:
            _log.info("loaded the history function {function} (history size {size}, ttl {ttl} s) on Redis at "
                      "{url}", function=self.function, size=self.size, ttl=self.ttl, url=where)
        loaded: Deferred[Any] = protocol.execute_command("FUNCTION", "LOAD", "REPLACE", self.code)
        return loaded

    def _done(self, _: object) -> bool:
        self.loaded = True
        return True

    def _failed(self, failure: Failure, where: str) -> bool:
        self.loaded = False
        if not self._warned:
            self._warned = True
            _log.warn("could not load the history function on Redis at {url} ({error}): this node publishes "
                      "with its own --history-size, and other publishers must be given it "
                      "(Client(history_size=...))", url=where, error=failure.getErrorMessage())
        return False

    def publish(self, execute: Callable[..., Deferred[Any]], eval: Callable[..., Deferred[Any]],
                call: list[Any], keys: list[Any], args: list[Any]) -> Deferred[str]:
        """
        Publish with history: ``FCALL`` of the library with ``call`` (the
        channel, or its hash tag on a cluster, then the payload and the
        optional arguments), or, before it is loaded or where it cannot be,
        the script with ``keys`` and ``args``.
        """
        if self.loaded:
            d = execute("FCALL", self.function, 1, *call)
            d.addErrback(self._fcall_failed, eval, keys, args)
        else:
            script = _slots.SHARDED_PUBLISH_SCRIPT if self.sharded else history.PUBLISH_SCRIPT
            d = eval(script, keys, args)
        d.addCallback(_text)
        return d

    def _fcall_failed(self, failure: Failure, eval: Callable[..., Deferred[Any]], keys: list[Any],
                      args: list[Any]) -> Any:
        if "function not found" not in failure.getErrorMessage().lower():
            return failure
        # flushed (FUNCTION FLUSH, a new Redis): the next connection loads it again
        self.loaded = None
        script = _slots.SHARDED_PUBLISH_SCRIPT if self.sharded else history.PUBLISH_SCRIPT
        return eval(script, keys, args)


def _command(*parts: bytes) -> bytes:
    """One Redis command in RESP, an array of bulk strings."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


def _ping(protocol: Any) -> Any:
    return protocol.ping() if protocol.connected else None
