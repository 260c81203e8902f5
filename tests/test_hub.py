"""Contract tests for IChannelHub, run against every implementation."""

from __future__ import annotations

from typing import Any

import pytest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from sockdrawer.core.hub import EmbeddedBroker, MemoryChannelHub
from sockdrawer.core.interfaces import Batch, IBroker, IChannelHub, IChannelObserver, ISink
from sockdrawer.testing import RecordingSink


class HubContract:
    """Behaviour every IChannelHub must have; subclasses provide make_hub()."""

    def make_hub(self) -> Any:
        raise NotImplementedError

    def test_provides_interface(self) -> None:
        """The hub fully provides IChannelHub."""
        assert verifyObject(IChannelHub, self.make_hub())

    def test_deliver_reaches_only_that_channel(self) -> None:
        """A message reaches every sink on its channel and none on other channels."""
        hub = self.make_hub()
        a, b, other = RecordingSink("a"), RecordingSink("b"), RecordingSink("other")
        hub.subscribe(b"news", a)
        hub.subscribe(b"news", b)
        hub.subscribe(b"sport", other)
        assert hub.deliver(b"news", b"m1") == 2
        assert a.messages == [b"m1"] and b.messages == [b"m1"]
        assert other.messages == []

    def test_deliver_to_unknown_channel(self) -> None:
        """Delivering on a channel without sinks returns 0 and creates no entry."""
        hub = self.make_hub()
        assert hub.deliver(b"nobody", b"m") == 0
        assert hub.channels() == []

    def test_duplicate_subscribe_is_a_no_op(self) -> None:
        """Subscribing the same sink twice still gives it each message once."""
        hub = self.make_hub()
        sink = RecordingSink()
        hub.subscribe(b"news", sink)
        hub.subscribe(b"news", sink)
        assert hub.subscribers(b"news") == 1
        hub.deliver(b"news", b"m")
        assert sink.messages == [b"m"]

    def test_last_unsubscribe_forgets_channel(self) -> None:
        """When the last sink leaves a path, the path's entry is gone (the Ruby original leaked it)."""
        hub = self.make_hub()
        a, b = RecordingSink(), RecordingSink()
        hub.subscribe(b"news", a)
        hub.subscribe(b"news", b)
        hub.unsubscribe(b"news", a)
        assert hub.channels() == [b"news"]
        hub.unsubscribe(b"news", b)
        assert hub.channels() == []
        assert hub.subscribers(b"news") == 0
        assert hub.deliver(b"news", b"m") == 0
        assert a.messages == [] and b.messages == []

    def test_receivers_sums_sinks(self) -> None:
        """receivers() adds up what each sink stands for; 0 for an unknown channel."""
        hub = self.make_hub()
        group = RecordingSink()
        group.receivers = 3  # type: ignore[misc]
        hub.subscribe(b"news", group)
        hub.subscribe(b"news", RecordingSink())
        assert hub.receivers(b"news") == 4
        assert hub.receivers(b"nowhere") == 0

    def test_unsubscribe_unknown_is_ignored(self) -> None:
        """Unsubscribing from an unknown channel, or a sink that never subscribed, changes nothing."""
        hub = self.make_hub()
        a, stranger = RecordingSink(), RecordingSink()
        hub.unsubscribe(b"nowhere", a)
        hub.subscribe(b"news", a)
        hub.unsubscribe(b"news", stranger)
        assert hub.subscribers(b"news") == 1

    def test_sink_on_several_channels(self) -> None:
        """A sink subscribed to two channels receives each channel's messages."""
        hub = self.make_hub()
        sink = RecordingSink()
        hub.subscribe(b"a", sink)
        hub.subscribe(b"", sink)
        hub.deliver(b"a", b"1")
        hub.deliver(b"", b"2")
        assert sink.batches == [(b"a", [b"1"]), (b"", [b"2"])]

    def test_order_is_kept(self) -> None:
        """Messages reach a sink in the order they were delivered."""
        hub = self.make_hub()
        sink = RecordingSink()
        hub.subscribe(b"n", sink)
        for i in range(100):
            hub.deliver(b"n", b"%d" % i)
        assert sink.messages == [b"%d" % i for i in range(100)]

    def test_hold_batches_per_channel(self) -> None:
        """While held, messages are collected; at release each channel's come as one ordered batch."""
        hub = self.make_hub()
        a, b = RecordingSink("a"), RecordingSink("b")
        hub.subscribe(b"x", a)
        hub.subscribe(b"y", b)
        hub.hold()
        hub.deliver(b"x", b"1")
        hub.deliver(b"y", b"2")
        hub.deliver(b"x", b"3")
        hub.deliver(b"zzz", b"dropped")
        assert a.batches == [] and b.batches == []
        hub.release()
        assert a.batches == [(b"x", [b"1", b"3"])]
        assert b.batches == [(b"y", [b"2"])]

    def test_hold_nests(self) -> None:
        """Only the outermost release fans out; release without hold is an error."""
        hub = self.make_hub()
        sink = RecordingSink()
        hub.subscribe(b"x", sink)
        hub.hold()
        hub.hold()
        hub.deliver(b"x", b"1")
        hub.release()
        assert sink.batches == []
        hub.release()
        assert sink.messages == [b"1"]
        with pytest.raises(RuntimeError):
            hub.release()

    def test_unsubscribe_during_fan_out(self) -> None:
        """A sink that unsubscribes another while receiving does not break the fan-out in progress."""
        hub = self.make_hub()
        late = RecordingSink("late")

        @implementer(ISink)
        class Leaver:
            receivers = 1

            def receive(self, batch: Batch) -> None:
                hub.unsubscribe(b"x", late)
                hub.unsubscribe(b"x", self)

        hub.subscribe(b"x", Leaver())
        hub.subscribe(b"x", late)
        hub.deliver(b"x", b"1")
        hub.deliver(b"x", b"2")
        assert late.messages == [b"1"]
        assert hub.channels() == []

    def test_failing_sink_does_not_stop_others(self) -> None:
        """A sink that raises is logged, and the other sinks still get the message."""
        hub = self.make_hub()

        @implementer(ISink)
        class Bad:
            receivers = 1

            def receive(self, batch: Batch) -> None:
                raise ValueError("boom")

        good = RecordingSink()
        hub.subscribe(b"x", Bad())
        hub.subscribe(b"x", good)
        hub.deliver(b"x", b"1")
        assert good.messages == [b"1"]

    def test_observers_hear_first_and_last_sink(self) -> None:
        """A watching observer hears of a channel's first sink and of its last leaving, once each, after the
        change (the hub already counts the sink, or no longer has the channel); other sinks coming and going
        are not reported, nor channels that had sinks before the watch."""
        hub = self.make_hub()
        before = RecordingSink()
        hub.subscribe(b"old", before)
        events: list[tuple[str, bytes, int]] = []

        @implementer(IChannelObserver)
        class Observer:
            def channel_opened(self, key: bytes) -> None:
                events.append(("opened", key, hub.subscribers(key)))

            def channel_closed(self, key: bytes) -> None:
                events.append(("closed", key, hub.subscribers(key)))

        observer = Observer()
        assert verifyObject(IChannelObserver, observer)
        hub.watch(observer)
        hub.watch(observer)  # twice: still told once
        a, b = RecordingSink("a"), RecordingSink("b")
        hub.subscribe(b"news", a)
        hub.subscribe(b"news", b)
        hub.subscribe(b"news", a)
        hub.unsubscribe(b"news", a)
        hub.unsubscribe(b"news", a)
        hub.unsubscribe(b"news", b)
        hub.unsubscribe(b"old", before)
        hub.unsubscribe(b"never", a)
        assert events == [("opened", b"news", 1), ("closed", b"news", 0), ("closed", b"old", 0)]
        hub.unwatch(observer)
        hub.unwatch(observer)
        hub.subscribe(b"news", a)
        assert len(events) == 3

    def test_failing_observer_changes_nothing_else(self) -> None:
        """An observer that raises is logged; the sink is subscribed all the same and other observers are told."""
        hub = self.make_hub()
        told: list[bytes] = []

        @implementer(IChannelObserver)
        class Bad:
            def channel_opened(self, key: bytes) -> None:
                raise ValueError("boom")

            def channel_closed(self, key: bytes) -> None:
                raise ValueError("boom")

        @implementer(IChannelObserver)
        class Good:
            def channel_opened(self, key: bytes) -> None:
                told.append(key)

            def channel_closed(self, key: bytes) -> None:
                told.append(b"-" + key)

        hub.watch(Bad())
        hub.watch(Good())
        sink = RecordingSink()
        hub.subscribe(b"x", sink)
        hub.deliver(b"x", b"1")
        hub.unsubscribe(b"x", sink)
        assert sink.messages == [b"1"] and hub.channels() == [] and told == [b"x", b"-x"]


class TestMemoryChannelHub(HubContract):
    def make_hub(self) -> MemoryChannelHub:
        return MemoryChannelHub()

    def test_counts(self) -> None:
        """The hub counts messages with sinks and deliveries (messages x sinks)."""
        hub = self.make_hub()
        hub.subscribe(b"x", RecordingSink())
        hub.subscribe(b"x", RecordingSink())
        hub.deliver(b"x", b"1")
        hub.deliver(b"nobody", b"2")
        assert (hub.messages, hub.deliveries) == (1, 2)


def test_embedded_broker_delivers_locally() -> None:
    """The embedded broker provides IBroker and publishes straight into the hub; its subscription covers every
    channel at once."""
    hub = MemoryChannelHub()
    broker = EmbeddedBroker(hub)
    assert verifyObject(IBroker, broker)
    sink = RecordingSink()
    hub.subscribe(b"news", sink)
    results: list[int] = []
    broker.publish(b"news", b"hello").addCallback(results.append)
    assert results == [1]
    assert sink.messages == [b"hello"]
    assert broker.is_connected()
    fired: list[None] = []
    broker.when_subscribed(b"news").addCallback(fired.append)
    assert fired == [None]


def test_receivers_counts_a_plain_sink_as_one() -> None:
    """A sink without a ``receivers`` attribute (a listener's) counts as one receiver; a group counts its sockets."""
    from sockdrawer.core.hub import MemoryChannelHub

    class Plain:
        def receive(self, batch: object) -> None:
            pass

    class Group:
        receivers = 3

        def receive(self, batch: object) -> None:
            pass

    hub = MemoryChannelHub()
    hub.subscribe(b"news", Plain())  # type: ignore[arg-type]
    assert hub.receivers(b"news") == 1
    hub.subscribe(b"news", Group())  # type: ignore[arg-type]
    assert hub.receivers(b"news") == 4 and hub.receivers(b"other") == 0
