"""The per-connection timers: batched, never early, on an injectable clock."""

from __future__ import annotations

import inspect

import autobahn.websocket.protocol
from twisted.internet.task import Clock

from sockdrawer.transports.websocket.timers import BucketTimer


def test_timers_never_fire_early() -> None:
    """A call due in d seconds runs after d seconds and at most one bucket later, wherever in a second it was set."""
    for start in (0.0, 0.05, 0.55, 0.999):
        clock = Clock()
        clock.advance(start)
        timer = BucketTimer(clock, bucket=0.1)
        fired: list[float] = []
        timer.call_later(1.0, lambda fired=fired, clock=clock: fired.append(clock.seconds()))
        clock.advance(0.99)
        assert not fired, start
        clock.advance(0.11)
        assert fired and start + 1.0 <= fired[0] <= start + 1.1 + 1e-9, (start, fired)


def test_calls_share_buckets_and_cancel() -> None:
    """Calls due in the same bucket share one reactor timer; cancelling the last one cancels that timer too."""
    clock = Clock()
    timer = BucketTimer(clock, bucket=0.1)
    calls = [timer.call_later(5.001 + i / 1000, lambda: None) for i in range(48)]
    assert len(clock.getDelayedCalls()) == 1
    assert timer.pending() == 48
    for call in calls:
        call.cancel()
    assert timer.pending() == 0 and not clock.getDelayedCalls()


def test_big_buckets_run_in_chunks() -> None:
    """A bucket with more calls than the chunk size runs them over several reactor turns, in order."""
    clock = Clock()
    turns: list[int] = []
    original = clock.callLater

    def call_later(delay: float, func: object, *args: object) -> object:
        turns.append(len(ran))
        return original(delay, func, *args)

    clock.callLater = call_later  # type: ignore[method-assign]
    timer = BucketTimer(clock, bucket=0.1, chunk=10)
    ran: list[int] = []
    for i in range(25):
        timer.call_later(1.0, ran.append, i)
    clock.advance(1.1)
    assert ran == list(range(25))
    assert turns == [0, 10, 20]  # the bucket's timer, then one more turn after each chunk of 10


def test_autobahn_schedules_connection_timers_through_the_factory() -> None:
    """Autobahn schedules its handshake timeouts and pings with factory._batched_timer.call_later and only ever
    cancels what it returns (the assumption behind _private.set_connection_timer)."""
    source = inspect.getsource(autobahn.websocket.protocol)
    assert source.count("self.factory._batched_timer.call_later(") >= 4
    for name in ("openHandshakeTimeoutCall", "closeHandshakeTimeoutCall", "autoPingTimeoutCall",
                 "autoPingPendingCall"):
        uses = [line.strip() for line in source.splitlines() if f"self.{name}." in line]
        assert uses and all(u.startswith(f"self.{name}.cancel()") for u in uses), (name, uses)
