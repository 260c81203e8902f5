"""
A v1 subscription in its transport's envelope group: the group frames each
batch once and counts deliveries; the subscription drops what its replay
held, keeps live messages aside while it is not live, and takes back from
the count what it did not send.  A recording outbox, no reactor.
"""

from __future__ import annotations

from typing import Any

import fakes
from fakes import RecordingOutbox

from sockdrawer.core.history import Replay
from sockdrawer.core.interfaces import Batch
from sockdrawer.core.v1 import State, Subscription
from sockdrawer.transports.websocket.fanout import PLAIN, EnvelopeGroup, FanoutStats


def _data(sent: list[Any]) -> list[Any]:
    return [m["data"] if isinstance(m, dict) else m for m in sent if not isinstance(m, dict) or m["op"] == "message"]


def _v1_subscription(replies: list[Any]) -> tuple[RecordingOutbox, Subscription, EnvelopeGroup, list[str | None]]:
    """A subscription to ``c`` of a session whose history answers ``replies``, in a plain envelope group;
    and the offsets its history was read from."""
    session, outbox, reads = fakes.session(replies)
    sub = Subscription(session, b"c")
    sub.state = State.READING
    session.subscriptions[b"c"] = sub
    sub.group = group = EnvelopeGroup(b"c", PLAIN, None, FanoutStats())
    group.members[sub] = None
    return outbox, sub, group, reads


def test_live_messages_the_replay_held_are_dropped() -> None:
    """A live message at or before the last offset the replay sent (it was still on the subscriber connection
    when the replay was read) is not sent again, nor counted as delivered; a batch partly held is sent from the
    first new message; once a newer message came, batches go as their shared frames again."""
    outbox, sub, group, reads = _v1_subscription([])
    stats = group.stats
    sub.go_live(Replay("e:5-0", (("e:4-0", b"four"), ("e:5-0", b"five"))), reset=False)
    group.receive(Batch(b"c", [b"four"], ["e:4-0"]))
    group.receive(Batch(b"c", [b"five", b"six"], ["e:5-0", "e:6-0"]))
    seven = Batch(b"c", [b"seven"], ["e:7-0"])
    group.receive(seven)
    assert _data(outbox.out) == ["four", "five", "six", group.frames(seven)]
    assert sub.last == "e:7-0" and stats.deliveries == 2
    sub.deliver(Batch(b"c", [b"other"], ["f:1-0"]), b"OTHER")  # another epoch is never taken for a repeat
    assert _data(outbox.out)[-1] == b"OTHER"


def test_kept_messages_move_the_last_offset() -> None:
    """Messages kept aside during a replay and sent after it (those the replay did not hold) move the
    subscription's last offset, so a later catch-up starts after them."""
    outbox, sub, group, reads = _v1_subscription([])
    sub.deliver(Batch(b"c", [b"two", b"three"], ["e:2-0", "e:3-0"]), b"KEPT")
    sub.go_live(Replay("e:2-0", (("e:2-0", b"two"),)), reset=False)
    assert _data(outbox.out) == ["two", "three"]
    assert sub.last == "e:3-0" and reads == []


def test_a_gap_during_a_replay_catches_up_again_from_the_replays_end() -> None:
    """A broker gap while the replay was read (the broker may have lost messages between the replay and the
    live ones kept meanwhile): the replay is sent, the kept messages with an offset are not (history gives them
    again, in order), those without one are, and the subscription catches up from the replay's last offset."""
    outbox, sub, group, reads = _v1_subscription([Replay("e:2-0")])
    assert sub.state is State.READING  # its replay is being read
    sub.deliver(Batch(b"c", [b"nine"], ["e:9-0"]), b"KEPT")  # after a hole: 3 to 8 never came live
    sub.deliver(Batch(b"c", [b"plain"]), b"PLAIN")
    sub.session.catch_up(sub)  # the gap, while the replay is read
    assert sub.state is State.READING_GAP
    sub.go_live(Replay("e:2-0", (("e:2-0", b"two"),)), reset=False)
    assert _data(outbox.out) == ["two", "plain"]
    assert sub.last == "e:2-0"
    assert reads == ["e:2-0"] and sub.state is State.LIVE


def test_live_messages_after_a_lost_subscription_wait_for_the_gap_and_history() -> None:
    """Between the broker's lost and its gap (a Redis Cluster shard failing over while others deliver), live
    messages are kept, not sent: one after a hole must not move the last offset. At the gap the catch-up reads
    from the last offset sent before the loss and sends the hole and the kept message once each, in order."""
    outbox, sub, group, reads = _v1_subscription([
        Replay("e:8-0", (("e:6-0", b"six"), ("e:7-0", b"seven"), ("e:8-0", b"eight"))),
    ])
    sub.go_live(Replay("e:5-0", (("e:5-0", b"five"),)), reset=False)
    group.lost()
    assert sub.state is State.SUSPENDED
    group.receive(Batch(b"c", [b"eight"], ["e:8-0"]))
    assert [m.get("data") for m in outbox.out] == [None, "five"] and sub.last == "e:5-0"
    group.gap()
    assert reads == ["e:5-0"]
    assert [m.get("data") for m in outbox.out] == [None, "five", "six", "seven", "eight"]
    assert sub.state is State.LIVE and sub.last == "e:8-0"
    assert group.stats.deliveries == 0  # the kept copy of "eight" was not sent: not counted


def test_a_subscription_made_while_the_broker_is_not_whole_waits_for_its_gap() -> None:
    """A subscription whose replay is read before the broker subscribed (a node just started) goes live only
    at the broker's gap, after a catch-up from the replay's end; a channel without history offsets yet gets
    reset with the latest offset (there is no place to resume from)."""
    outbox, sub, group, reads = _v1_subscription([Replay(None), Replay("e:1-0")])
    sub.session.host.hub.broker_lost()
    sub.session._start(sub, None)
    assert sub.state is State.SUSPENDED and outbox.out == [{"op": "subscribed", "channel": "c", "offset": None}]
    group.receive(Batch(b"c", [b"one"], ["e:1-0"]))
    sub.session.host.hub.broker_gap()  # the hub calls every sink's gap(); here the group is not in the hub
    group.gap()
    assert reads == [None, None]
    assert outbox.out[1:] == [{"op": "reset", "channel": "c"}, {"op": "subscribed", "channel": "c", "offset": "e:1-0"}]
    assert sub.state is State.LIVE and sub.last == "e:1-0"


def test_the_groups_live_path_writes_what_deliver_writes() -> None:
    """For a live subscription past its replay the group writes the batch's shared frames itself: the same
    bytes, and the same last offset (the batch's last message that has one), as Subscription.deliver."""
    by_group, sub_a, group, _ = _v1_subscription([])
    by_deliver, sub_b, _, _ = _v1_subscription([])
    for sub in (sub_a, sub_b):
        sub.go_live(Replay(None), reset=False)
    batches = [Batch(b"c", [b"one", b"two"], ["e:1-0", "e:2-0"]), Batch(b"c", [b"three", b"plain"], ["e:3-0", None]),
               Batch(b"c", [b"no offset"])]
    for batch in batches:
        group.receive(batch)
        sub_b.deliver(batch, group.frames(batch))
        assert sub_a.last == sub_b.last
    assert by_group.out == by_deliver.out and sub_a.last == "e:3-0"
    assert _data(by_group.out)[-3:] == [group.frames(b) for b in batches]


class DirectOutbox(RecordingOutbox):
    """An outbox with a socket: direct sends are recorded apart, and take ``room`` bytes at most (then what is
    left goes to ``backlog``, which, as the socket's does, makes every group forget it)."""

    def __init__(self) -> None:
        super().__init__()
        self.direct: list[bytes] = []
        self.backlogged: list[bytes] = []
        self.room = 1 << 20
        self.group: Any = None
        self.sub: Any = None

    def direct_send(self) -> Any:
        return None if self.backlogged else self._send

    def _send(self, data: bytes) -> int:
        taken = data[: self.room]
        self.direct.append(taken)
        return len(taken)

    def backlog(self, rest: bytes) -> None:
        self.backlogged.append(rest)
        self.group.forget(self.sub)


def test_a_live_subscription_gets_frames_straight_to_its_socket_until_it_queues() -> None:
    """The first batch goes through the outbox; then, while nothing waits in the socket's buffer, the group
    sends the frames itself; a partial send leaves the rest to the outbox's backlog and the group forgets the
    socket (the next batch goes through the outbox again); a subscription that leaves is forgotten too."""
    _, sub, group, _ = _v1_subscription([])
    outbox = DirectOutbox()
    sub.session.outbox = outbox
    outbox.group, outbox.sub = group, sub
    sub.go_live(Replay(None), reset=False)
    outbox.out.clear()
    first, second, third = (Batch(b"c", [b"%d" % i], [f"e:{i}-0"]) for i in (1, 2, 3))
    group.receive(first)
    assert outbox.out == [group.frames(first)] and outbox.direct == []
    group.receive(second)
    assert outbox.direct == [group.frames(second)] and sub.last == "e:2-0"
    outbox.room = 3
    group.receive(third)
    frames = group.frames(third)
    assert outbox.direct[-1] == frames[:3] and outbox.backlogged == [frames[3:]] and sub.last == "e:3-0"
    fourth = Batch(b"c", [b"4"], ["e:4-0"])
    group.receive(fourth)
    assert outbox.out[-1] == group.frames(fourth)  # through the outbox, behind what waits
    group.forget(sub)
    assert group._sends is None
