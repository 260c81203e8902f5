"""
The sockdrawer.v1 session without I/O: payloads in, frames out through a
recording outbox, time on a ``task.Clock``.  No reactor, no socket, no
transport.
"""

from __future__ import annotations

import json
from typing import Any

import fakes
import pytest
from twisted.internet.defer import Deferred, fail, succeed

from sockdrawer.core.history import HistoryReset, Replay
from sockdrawer.core.subscriber import Source
from sockdrawer.core.v1 import Peer, State


def _op(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def test_subscribe_without_history_goes_live_at_once() -> None:
    """On a node without history a subscription joins the fan-out, is told ``subscribed`` without an offset,
    and is live; with ``since`` it is told ``reset`` first (nothing can be resumed)."""
    session, outbox, _ = fakes.session()
    session.received(_op(op="subscribe", channel="a"), False)
    session.received(_op(op="subscribe", channel="b", since="e:1-0"), False)
    assert outbox.out == [
        {"op": "subscribed", "channel": "a", "offset": None},
        {"op": "reset", "channel": "b"},
        {"op": "subscribed", "channel": "b", "offset": None},
    ]
    assert [sub.channel for sub in session.host.fanout.members] == ["a", "b"]  # type: ignore[attr-defined]
    assert all(sub.state is State.LIVE for sub in session.subscriptions.values())


@pytest.mark.parametrize(("payload", "binary", "reason"), [
    (b"\x00", True, "binary frames are not part of sockdrawer.v1"),
    (b"{", False, "not JSON"),
    (b"[]", False, "a message is a JSON object"),
    (b'{"op": "publish", "channel": "a"}', False, "unknown op"),
    (b'{"op": "subscribe", "channel": 1}', False, "channel must be a string"),
    (b'{"op": "subscribe", "channel": "a", "since": 5}', False, "since must be an offset string"),
])
def test_bad_messages_get_one_error_each(payload: bytes, binary: bool, reason: str) -> None:
    """A message the protocol does not allow gets one 400 error naming what is wrong, and changes nothing."""
    session, outbox, _ = fakes.session()
    session.received(payload, binary)
    assert [(m["op"], m["status"], m["reason"]) for m in outbox.out] == [("error", 400, reason)]
    assert session.subscriptions == {}


def test_a_replay_goes_a_page_at_a_time_in_later_turns() -> None:
    """A replay of several pages is sent page by page, the next page read in a later turn of the clock (a
    replay that answers at once takes turns with everything else), live messages kept aside until the end."""
    pages = [
        Replay("e:3-0", (("e:1-0", b"one"),), more=True),
        Replay("e:3-0", (("e:2-0", b"two"), ("e:3-0", b"three"))),
    ]
    session, outbox, reads = fakes.session(pages)
    session.received(_op(op="subscribe", channel="c", since="e:0-0"), False)
    sub = session.subscriptions[b"c"]
    assert reads == ["e:0-0"] and sub.state is State.READING
    assert [m.get("data") for m in outbox.out] == [None, "one"]
    session.host.clock.advance(0)  # type: ignore[attr-defined]
    assert reads == ["e:0-0", "e:1-0"]
    assert [m.get("data") for m in outbox.out] == [None, "one", "two", "three"]
    assert sub.state is State.LIVE and sub.last == "e:3-0"


def test_an_unknown_offset_replays_from_the_start_with_reset() -> None:
    """An offset history does not know (another epoch, trimmed) reads from the start and tells ``reset``."""
    replies: list[Any] = [Replay("e:1-0", (("e:1-0", b"one"),))]
    session, outbox, reads = fakes.session(replies)
    history = session.host.history
    assert history is not None

    def reader(key: bytes, since: str | None) -> Deferred[Any]:
        if since == "old:1-0":
            reads.append(since)
            return fail(HistoryReset("unknown epoch"))
        return history(key, since)

    session.host.history = reader
    session.received(_op(op="subscribe", channel="c", since="old:1-0"), False)
    session.host.clock.advance(0)  # type: ignore[attr-defined]
    assert reads == ["old:1-0", None]
    assert [m["op"] for m in outbox.out] == ["reset", "subscribed", "message"]


def test_presence_joins_are_rate_limited_per_session() -> None:
    """Presence subscriptions take a token each from the session's bucket (burst, then a rate per second of
    the clock); one over gets 429 and is not subscribed."""
    joined: list[Any] = []
    session, outbox, _ = fakes.session(presence_join_burst=2, max_presence_joins_per_second=1.0)
    session.host.presence = type("P", (), {"join": lambda self, sub: joined.append(sub),
                                           "leave": lambda self, sub: joined.remove(sub)})()
    for channel in ("a", "b", "c"):
        session.received(_op(op="subscribe", channel=channel, presence=True), False)
    assert [sub.channel for sub in joined] == ["a", "b"]
    assert outbox.out[-1] == {"op": "error", "status": 429, "channel": "c",
                              "reason": "too many presence subscriptions (see --max-presence-joins-per-second)"}
    session.host.clock.advance(1.0)  # type: ignore[attr-defined]
    session.received(_op(op="subscribe", channel="c", presence=True), False)
    assert [sub.channel for sub in joined] == ["a", "b", "c"]
    session.close()
    assert joined == []


def test_a_listener_decides_before_the_subscription_starts() -> None:
    """With an authorizing listener the subscription waits (``AUTHORIZING``, not in the fan-out, counted
    against its address); refused, it is dropped with 403 and its count given back."""
    decisions: list[Deferred[bool]] = []

    def authorize(source: Source) -> Deferred[bool]:
        decisions.append(Deferred())
        return decisions[-1]

    session, outbox, _ = fakes.session(peer=Peer(counted_ip="192.0.2.1"))
    session.host.authorize = authorize
    session.received(_op(op="subscribe", channel="a"), False)
    session.received(_op(op="subscribe", channel="b"), False)
    assert [sub.state for sub in session.subscriptions.values()] == [State.AUTHORIZING] * 2
    assert session.host.subscriptions_per_ip == {"192.0.2.1": 2} and outbox.out == []
    decisions[0].callback(True)
    decisions[1].callback(False)
    assert session.subscriptions[b"a"].state is State.LIVE and b"b" not in session.subscriptions
    assert outbox.out[-1] == {"op": "error", "status": 403, "channel": "b", "reason": "refused by a listener"}
    assert session.host.subscriptions_per_ip == {"192.0.2.1": 1}


def test_replies_obey_the_outbox_and_the_size_limit() -> None:
    """A listener's reply goes out as a ``reply`` with the request's id (bytes as base64); one over
    ``max_reply_size``, or one that comes after the connection stopped sending, is not sent."""
    answers: list[Any] = [{"ok": 1}, b"\x01\x02", "x" * 100, "late"]
    session, outbox, _ = fakes.session(max_reply_size=80)
    session.host.frame_handler = lambda source, message: [succeed(answers.pop(0))]
    for i in range(3):
        session.received(_op(op="send", channel="a", data={"n": i}, id=i), False)
    outbox.can_send = False
    session.received(_op(op="send", channel="a", data=None, id=3), False)
    assert outbox.out == [
        {"op": "reply", "id": 0, "data": {"ok": 1}},
        {"op": "reply", "id": 1, "data": {"data": "AQI=", "encoding": "base64"}},
    ]


def test_a_read_answered_after_unsubscribe_is_dropped() -> None:
    """History that answers after the subscription was dropped sends nothing (and the next read goes on)."""
    pending: list[Deferred[Any]] = []
    session, outbox, _ = fakes.session([])

    def reader(key: bytes, since: str | None) -> Deferred[Any]:
        pending.append(Deferred())
        return pending[-1]

    session.host.history = reader
    session.received(_op(op="subscribe", channel="a"), False)
    session.received(_op(op="subscribe", channel="b"), False)
    assert len(pending) == 1  # one read at a time per session
    session.received(_op(op="unsubscribe", channel="a"), False)
    pending[0].callback(Replay("e:0-0"))
    assert outbox.out == []
    session.host.clock.advance(0)  # type: ignore[attr-defined]
    pending[1].callback(Replay("e:0-0"))
    assert outbox.out == [{"op": "subscribed", "channel": "b", "offset": "e:0-0"}]


def test_a_refresh_replaces_the_token_of_the_same_user() -> None:
    """The refresh op checks the new token as a handshake does: the same user's replaces the connection's
    grant (its channels) and moves its expiry (answered "refreshed"); another user's token, a bad one, or a
    node without token keys gets an error, and the grant stays."""
    from sockdrawer.core.tokens import Grant, TokenVerifier, make_token

    secret = "s" * 32
    sess, outbox, _ = fakes.session(peer=Peer("tcp4:1.2.3.4:5", "u1", Grant("u1", ("a",), 100.0)))
    sess.received(json.dumps({"op": "refresh", "token": "x"}).encode(), False)
    assert outbox.out[-1] == {"op": "error", "status": 400, "reason": "this node takes no tokens"}
    sess.host.verifier = TokenVerifier([secret.encode()], leeway=5)
    token = make_token(secret, user="u1", channels=["b"], ttl=60)
    sess.received(json.dumps({"op": "refresh", "token": token}).encode(), False)
    assert outbox.out[-1]["op"] == "refreshed" and outbox.expiry == outbox.out[-1]["expires"] + 5
    assert sess.peer.grant is not None and sess.peer.grant.channels == ("b",) and sess.peer.address
    for bad, status in ((make_token(secret, user="u2", channels=["b"]), 403), ("not a token", 401), (7, 400)):
        sess.received(json.dumps({"op": "refresh", "token": bad}).encode(), False)
        assert (outbox.out[-1]["op"], outbox.out[-1]["status"]) == ("error", status)
    assert sess.peer.grant.channels == ("b",) and sess.peer.user == "u1"
