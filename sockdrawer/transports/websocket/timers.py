"""
Per-connection timers (opening and closing handshake timeouts, pings),
batched into short buckets so that thousands of sockets cost a few timer
entries, and never fired early.

Autobahn's own batched timer (txaio's) truncates every due time to a whole
second before bucketing, so a timeout fires up to one second early: a
1-second close handshake timeout could fire at once and abort a socket
before its close frame was written.  This one rounds due times *up* to the
next bucket: a timer fires at most ``bucket`` seconds late, never early.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

_log = Logger(namespace="sockdrawer.timers")


class _Call:
    __slots__ = ("_timer", "_due", "_func", "_args", "_kwargs")

    def __init__(self, timer: BucketTimer, due: int, func: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> None:
        self._timer: BucketTimer | None = timer
        self._due = due
        self._func = func
        self._args = args
        self._kwargs = kwargs

    def cancel(self) -> None:
        """Cancel the call (a no-op once it ran or was cancelled)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer._remove(self._due, self)

    def active(self) -> bool:
        return self._timer is not None

    def _run(self) -> None:
        self._timer = None
        self._func(*self._args, **self._kwargs)


class BucketTimer:
    """
    ``call_later(delay, func, *args, **kwargs)`` with the calls due in the
    same ``bucket`` (seconds) sharing one reactor timer; what txaio's
    ``IBatchedTimer`` offers Autobahn, on an injectable clock.

    :param clock: the reactor, or a :class:`~twisted.internet.task.Clock`.
    :param bucket: the granularity, in seconds.
    :param chunk: at most this many calls run in one reactor turn; the rest
        follow in the next turns, so a bucket of 10,000 pings does not hold
        the reactor at once.
    """

    def __init__(self, clock: IReactorTime, bucket: float = 0.1, chunk: int = 1000) -> None:
        self._clock = clock
        self._bucket = bucket
        self._chunk = chunk
        self._buckets: dict[int, tuple[IDelayedCall, dict[_Call, None]]] = {}

    def call_later(self, delay: float, func: Callable[..., Any], *args: Any, **kwargs: Any) -> _Call:
        now = self._clock.seconds()
        due = math.ceil((now + max(0.0, delay)) / self._bucket)
        entry = self._buckets.get(due)
        if entry is None:
            delayed = self._clock.callLater(max(0.0, due * self._bucket - now), self._fire, due)
            entry = self._buckets[due] = (delayed, {})
        call = _Call(self, due, func, args, kwargs)
        entry[1][call] = None
        return call

    def pending(self) -> int:
        """How many calls are waiting."""
        return sum(len(calls) for _, calls in self._buckets.values())

    def _remove(self, due: int, call: _Call) -> None:
        entry = self._buckets.get(due)
        if entry is None:
            return
        entry[1].pop(call, None)
        if not entry[1]:
            del self._buckets[due]
            if entry[0].active():
                entry[0].cancel()

    def _fire(self, due: int) -> None:
        entry = self._buckets.pop(due, None)
        if entry is not None:
            self._run(list(entry[1]))

    def _run(self, calls: list[_Call]) -> None:
        for call in calls[: self._chunk]:
            if not call.active():
                continue
            try:
                call._run()
            except Exception:
                _log.failure("timer call {call!r} failed", call=call._func)
        if len(calls) > self._chunk:
            self._clock.callLater(0, self._run, calls[self._chunk:])


class CollectorFreeze:
    """
    Keeps the garbage collector's full passes short however many sockets are
    open, by moving what is alive into its permanent generation
    (:func:`gc.freeze`) when the server starts listening (after one full
    collection) and as sockets open: at most ``settle`` seconds after a
    socket opened, and at once after every ``chunk`` openings.  Before each
    freeze a young-generation pass (``gc.collect(1)``, a millisecond or so)
    reclaims the cyclic garbage made since.

    Without it, every object of every open socket stays in the oldest
    generation, which Python's collector walks whole each time it has grown
    by a quarter: with 10,000 sockets one such pass held the reactor for 15
    to 64 ms, and the passes come while sockets connect and for seconds
    after, every message waiting meanwhile.  With it, a full pass walks only
    what was made since the last freeze.

    The trade-off: an object that was alive at a freeze and later becomes
    garbage *in a reference cycle* is never reclaimed (reference counting
    still frees everything else, frozen or not).  sockdrawer's own sockets,
    groups and subscriptions are freed by reference counting once closed
    (tests check this with the collector off); what could leak is cyclic
    garbage made by code around it (a listener keeping a cycle alive across
    a freeze).  :meth:`stop` (the service's stop) unfreezes.

    :param clock: the reactor, or a :class:`~twisted.internet.task.Clock`.
    :param collector: the :mod:`gc` module, or a stand-in with ``collect``,
        ``freeze`` and ``unfreeze``.
    """

    def __init__(self, clock: IReactorTime, settle: float = 1.0, chunk: int = 1000, collector: Any = None) -> None:
        import gc

        self._clock = clock
        self._settle = settle
        self._chunk = chunk
        self._gc = collector if collector is not None else gc
        self._call: IDelayedCall | None = None
        self._since = 0
        #: freezes done so far
        self.freezes = 0

    def start(self) -> None:
        """The server starts listening: collect everything once, and freeze what is left (the imported code)."""
        self._gc.collect()
        self._gc.freeze()
        self.freezes += 1

    def opened(self) -> None:
        """A socket opened."""
        self._since += 1
        if self._since >= self._chunk:
            self.freeze()
        elif self._call is None:
            self._call = self._clock.callLater(self._settle, self.freeze)

    def freeze(self) -> None:
        """Collect the young generations, then freeze everything alive."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        self._since = 0
        self._gc.collect(1)
        self._gc.freeze()
        self.freezes += 1

    def stop(self) -> None:
        """Cancel a pending freeze and hand every frozen object back to the collector (until the next one)."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        self._since = 0
        if self.freezes:
            self._gc.unfreeze()
