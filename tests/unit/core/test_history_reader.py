"""history_reader: a read that fails while the broker is connected is tried again with backoff; a reset, or a
broker that is down, fails at once."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock

from sockdrawer.core.history import HistoryReset, Replay
from sockdrawer.core.hub import READ_RETRIES, history_reader


class Broker:
    def __init__(self, failures: list[Exception], connected: bool = True) -> None:
        self.failures = failures
        self.connected = connected
        self.reads = 0

    def is_connected(self) -> bool:
        return self.connected

    def when_subscribed(self, key: bytes) -> Any:
        return succeed(None)

    def replay(self, key: bytes, since: str | None, limit: int) -> Any:
        self.reads += 1
        if self.failures:
            return fail(self.failures.pop(0))
        return succeed(Replay("e:1", (("e:1", b"m"),)))


def test_a_failed_read_is_tried_again_until_it_works() -> None:
    """Two failures (a shard failing over), then the read works: the reader fires with its replay after the
    backoff (0.2 s, then 0.4 s), having read three times."""
    clock = Clock()
    broker = Broker([ConnectionError("moved"), TimeoutError("slow")])
    results: list[Any] = []
    history_reader(broker, 10, clock=clock)(b"news", "e:0").addBoth(results.append)  # type: ignore[arg-type]
    assert results == [] and broker.reads == 1
    clock.advance(0.2)
    assert broker.reads == 2
    clock.advance(0.4)
    assert broker.reads == 3 and results[0].messages == (("e:1", b"m"),)


def test_a_reset_and_a_broker_down_fail_at_once_and_retries_end() -> None:
    """A HistoryReset is not retried; a broker that is down fails the read at once; a read that keeps failing
    fails after READ_RETRIES more tries."""
    clock = Clock()
    for broker in (Broker([HistoryReset("gone")]), Broker([ConnectionError("down")], connected=False)):
        results: list[Any] = []
        history_reader(broker, 10, clock=clock)(b"news", "e:0").addBoth(results.append)  # type: ignore[arg-type]
        assert broker.reads == 1 and len(results) == 1 and results[0].check(HistoryReset, ConnectionError)
    broker = Broker([ConnectionError("x")] * (READ_RETRIES + 1))
    results = []
    history_reader(broker, 10, clock=clock)(b"news", None).addBoth(results.append)  # type: ignore[arg-type]
    for _ in range(READ_RETRIES):
        clock.advance(10)
    assert broker.reads == READ_RETRIES + 1 and results[0].check(ConnectionError)
    with pytest.raises(ConnectionError):
        results[0].raiseException()
