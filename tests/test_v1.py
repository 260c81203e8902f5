"""
The sockdrawer.v1 subprotocol, message by message, with a real client (the
``websockets`` library's protocol), on the embedded broker and on a real
redis-server: subscriptions, envelopes, replies, errors, history and resume.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
import pytest_twisted
from conftest import RedisServer, wait_for, wait_subscribed
from twisted.internet.threads import deferToThread
from wsclient import connect

from sockdrawer import Client, Source, Subscriber, make_token, on

V1 = ["sockdrawer.v1"]


class Answers(Subscriber):
    @on("ask")
    def answer(self, message: Any, source: Source) -> Any:
        return {"you said": message, "user": source.user} if source.from_socket else None


async def v1(svc: Any, path: str = "/", **kwargs: Any) -> Any:
    client = await connect(svc.ws_port, path, subprotocols=V1, **kwargs)
    assert client.response.headers["Sec-WebSocket-Protocol"] == "sockdrawer.v1"
    return client


async def subscribe(client: Any, channel: str, **fields: Any) -> dict[str, Any]:
    client.send_json({"op": "subscribe", "channel": channel, **fields})
    reply: dict[str, Any] = await client.next_json()
    return reply


@pytest_twisted.ensureDeferred
async def test_many_channels_on_one_socket(run_service: Any) -> None:
    """One v1 socket subscribes to several channels and gets each channel's messages as envelopes, text as
    text and binary as base64; after unsubscribe it gets no more from that channel; raw sockets are unchanged."""
    svc = await run_service()
    client = await v1(svc)
    raw = await connect(svc.ws_port, "/news")
    assert await subscribe(client, "news") == {"op": "subscribed", "channel": "news", "offset": None}
    assert (await subscribe(client, "rooms/1"))["op"] == "subscribed"
    await svc.publish("hello", "news")
    await svc.publish(b"\xff\x00", "rooms/1")
    assert await client.next_json() == {"op": "message", "channel": "news", "offset": None, "data": "hello"}
    msg = await client.next_json()
    assert msg["channel"] == "rooms/1" and msg["encoding"] == "base64"
    assert base64.b64decode(msg["data"]) == b"\xff\x00"
    assert await raw.next_text() == "hello"
    client.send_json({"op": "unsubscribe", "channel": "news"})
    await wait_for(lambda: svc.hub.subscribers(b"news") == 1)  # only the raw socket's group is left
    await svc.publish("after", "news")
    await svc.publish("still", "rooms/1")
    assert (await client.next_json())["data"] == "still"


@pytest_twisted.ensureDeferred
async def test_envelopes_are_framed_once_per_channel(run_service: Any, monkeypatch: Any) -> None:
    """Every v1 socket on a channel gets the same envelope bytes, built once per batch."""
    from sockdrawer.transports.websocket import fanout as v1module  # where the envelope groups build them

    built: list[bytes] = []
    original = v1module.envelope

    def counting(*args: Any) -> bytes:
        built.append(args[2])
        return original(*args)

    monkeypatch.setattr(v1module, "envelope", counting)
    svc = await run_service()
    clients = [await v1(svc) for _ in range(5)]
    for c in clients:
        await subscribe(c, "news")
    await svc.publish("once", "news")
    for c in clients:
        assert (await c.next_json())["data"] == "once"
    assert built == [b"once"]


@pytest_twisted.ensureDeferred
async def test_send_gets_the_listeners_reply(run_service: Any) -> None:
    """'send' reaches the channel's listeners; their reply comes back with the request's id."""
    svc = await run_service(listeners=(Answers,))
    client = await v1(svc)
    client.send_json({"op": "send", "channel": "ask", "data": "hi", "id": 7})
    assert await client.next_json() == {"op": "reply", "id": 7, "data": {"you said": "hi", "user": None}}


@pytest.mark.parametrize(("message", "status"), [
    ("not json", 400), ('["a list"]', 400), ('{"op": "dance", "channel": "x"}', 400),
    ('{"op": "subscribe", "channel": 5}', 400), ('{"op": "subscribe", "channel": "a//b"}', 400),
    ('{"op": "subscribe", "channel": "x", "since": 5}', 400),
    ('{"op": "subscribe", "channel": "x", "presence": "yes"}', 400),
])
@pytest_twisted.ensureDeferred
async def test_bad_messages_get_errors(run_service: Any, message: str, status: int) -> None:
    """A malformed message gets an error with its status, and the socket stays usable."""
    svc = await run_service()
    client = await v1(svc)
    client.send_text(message)
    error = await client.next_json()
    assert error["op"] == "error" and error["status"] == status
    assert (await subscribe(client, "ok"))["op"] == "subscribed"


@pytest_twisted.ensureDeferred
async def test_subscription_limits_and_tokens(run_service: Any) -> None:
    """Subscriptions are checked against the token's channels (403), the same channel twice is 409, and more
    than --max-subscriptions is 429; a bad token is refused at the handshake (401)."""
    secret = "s" * 40
    svc = await run_service(auth_secret=secret, max_subscriptions=2, public_channel=("public/*",))
    from wsclient import connect_refused

    refusal = await connect_refused(svc.ws_port, "/?token=nope", subprotocols=V1)
    assert refusal.status == 401
    client = await v1(svc, f"/?token={make_token(secret, user='u', channels=['user/u', 'rooms/*'])}")
    assert (await subscribe(client, "user/u"))["op"] == "subscribed"
    assert (await subscribe(client, "user/u"))["status"] == 409
    denied = await subscribe(client, "user/other")
    assert (denied["op"], denied["status"], denied["channel"]) == ("error", 403, "user/other")
    assert (await subscribe(client, "rooms/1"))["op"] == "subscribed"
    assert (await subscribe(client, "rooms/2"))["status"] == 429
    anonymous = await v1(svc)
    assert (await subscribe(anonymous, "public/news"))["op"] == "subscribed"
    assert (await subscribe(anonymous, "user/u"))["status"] == 403


# -- history and resume ----------------------------------------------------------


async def resume_case(svc: Any, publish: Any) -> None:
    client = await v1(svc)
    first = await subscribe(client, "news")
    await publish("m0")
    got = await client.next_json()
    assert got["data"] == "m0" and got["offset"]
    last = got["offset"]
    assert first["offset"] != last
    client.close()
    await client.wait_closed()
    for i in range(1, 11):
        await publish(f"m{i}")
    again = await v1(svc)
    subscribed = await subscribe(again, "news", since=last)
    assert subscribed["op"] == "subscribed"
    replayed = [await again.next_json() for _ in range(10)]
    assert [m["data"] for m in replayed] == [f"m{i}" for i in range(1, 11)]
    offsets = [m["offset"] for m in replayed]
    assert len(set(offsets)) == 10 and subscribed["offset"] == offsets[-1]
    await publish("live")
    assert (await again.next_json())["data"] == "live"
    assert again.pending() == 0
    stale = await v1(svc)
    assert (await subscribe(stale, "news", since="another-epoch:1"))["op"] == "reset"
    assert (await stale.next_json())["op"] == "subscribed"


@pytest_twisted.ensureDeferred
async def test_resume_on_the_embedded_broker(run_service: Any) -> None:
    """Embedded broker: 10 messages published while a client is away arrive exactly once, in order, after it
    subscribes with since; an offset of another epoch gets reset."""
    svc = await run_service(history_size=100)
    await resume_case(svc, lambda m: svc.publish(m, "news"))


@pytest_twisted.ensureDeferred
async def test_resume_on_redis(own_redis: RedisServer, run_service: Any) -> None:
    """Redis streams: the same, with messages published by the synchronous Client from another process' view;
    and a since older than the kept history gets reset."""
    svc = await run_service(redis=own_redis.url, history_size=100)
    await wait_subscribed(svc, own_redis)
    client = Client(own_redis.url, history_size=100)
    await resume_case(svc, lambda m: deferToThread(client.pub, m, "news"))
    small = await run_service(redis=own_redis.url, history_size=3, name="small")
    await wait_subscribed(small, own_redis)
    watcher = await v1(small)
    await subscribe(watcher, "c")
    await small.publish("a", "c")
    first = (await watcher.next_json())["offset"]
    for i in range(5):
        await small.publish(f"b{i}", "c")
    late = await v1(small)
    assert (await subscribe(late, "c", since=first))["op"] == "reset"


@pytest_twisted.ensureDeferred
async def test_plain_publish_reaches_v1_without_offset(own_redis: RedisServer, run_service: Any) -> None:
    """A plain redis-cli PUBLISH still reaches v1 sockets, as a message without an offset."""
    svc = await run_service(redis=own_redis.url, history_size=10)
    await wait_subscribed(svc, own_redis)
    client = await v1(svc)
    await subscribe(client, "news")
    await deferToThread(own_redis.publish, "sock-drawer/news", "plain")
    assert await client.next_json() == {"op": "message", "channel": "news", "offset": None, "data": "plain"}


@pytest_twisted.ensureDeferred
async def test_node_redis_outage_is_caught_up(own_redis: RedisServer, run_service: Any) -> None:
    """When the node's Redis link drops and comes back, a v1 socket gets what was published meanwhile from the
    stream, each message exactly once and in order; without history it is told reset instead."""
    svc = await run_service(redis=own_redis.url, history_size=100, redis_retry_max=0.3)
    plain = await run_service(redis=own_redis.url, name="plain", redis_retry_max=0.3)
    await wait_subscribed(svc, own_redis)
    await wait_for(lambda: plain.broker.is_connected())
    client = await v1(svc)
    await subscribe(client, "news")
    no_history = await v1(plain)
    await subscribe(no_history, "news")
    publisher = Client(own_redis.url, history_size=100)
    await deferToThread(publisher.pub, "before", "news")
    assert (await client.next_json())["data"] == "before"
    reconnects = svc.broker.reconnects

    def outage() -> None:
        with own_redis.client() as r:
            r.client_kill_filter(_type="pubsub")
        for i in range(5):
            publisher.pub(f"during{i}", "news")

    await deferToThread(outage)
    await wait_for(lambda: svc.broker.reconnects > reconnects and plain.broker.reconnects >= 1)
    await deferToThread(publisher.pub, "after", "news")
    got = []
    while not got or got[-1] != "after":
        got.append((await client.next_json())["data"])
    assert got == [f"during{i}" for i in range(5)] + ["after"]
    assert (await no_history.next_json())["op"] == "reset"


@pytest_twisted.ensureDeferred
async def test_resume_under_load_has_no_gap_and_no_duplicate(own_redis: RedisServer, run_service: Any) -> None:
    """While 3,000 messages are published as fast as one publisher can, clients subscribe with since (from
    offsets along the way) and without it, and the node's subscriber connection is killed half-way: every
    client gets every message after its starting offset exactly once and in order, up to a final one."""
    from twisted.internet.defer import Deferred, gatherResults

    total = 3000
    svc = await run_service(redis=own_redis.url, history_size=total + 10, redis_retry_max=0.2)
    await wait_subscribed(svc, own_redis)
    publisher = Client(own_redis.url, history_size=total + 10)
    subscribed: list[Deferred[None]] = []

    async def until_final(client: Any) -> list[int]:
        got: list[int] = []
        while not got or got[-1] != total:
            message = await client.next_json(timeout=20)
            assert message["op"] == "message", message
            got.append(int(message["data"][1:]))
        return got

    async def resume(since: str, after: int, ready: Deferred[None]) -> None:
        client = await v1(svc)
        assert (await subscribe(client, "load", since=since))["op"] == "subscribed"
        ready.callback(None)
        assert await until_final(client) == list(range(after + 1, total + 1))

    async def fresh(ready: Deferred[None]) -> None:
        client = await v1(svc)
        offset = (await subscribe(client, "load"))["offset"]
        ready.callback(None)
        got = await until_final(client)
        assert got == list(range(offsets.index(offset) + 1, total + 1))

    def start(case: Any, *args: Any) -> None:
        ready: Deferred[None] = Deferred()
        subscribed.append(ready)
        others.append(Deferred.fromCoroutine(case(*args, ready)))

    def kill_subscriber() -> None:
        with own_redis.client() as r:
            assert r.client_kill_filter(_type="pubsub") >= 1

    watcher = await v1(svc)
    await subscribe(watcher, "load")
    publishing = deferToThread(lambda: [publisher.pub(f"m{i}", "load") for i in range(total)])
    offsets: list[str] = []
    others: list[Deferred[None]] = []
    while len(offsets) < total:
        message = await watcher.next_json(timeout=20)
        assert message["data"] == f"m{len(offsets)}", message
        offsets.append(message["offset"])
        i = len(offsets) - 1
        if i % 50 == 0:
            start(resume, offsets[i], i)
            start(fresh)
        if i == total // 2:
            others.append(deferToThread(kill_subscriber))
    await publishing
    await gatherResults(subscribed)
    await deferToThread(publisher.pub, f"m{total}", "load")
    await gatherResults(others, consumeErrors=True)
    assert svc.broker.reconnects >= 1 and len(others) > 100
