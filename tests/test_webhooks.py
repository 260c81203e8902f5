"""
Lifecycle webhooks (``--webhook``): connect, disconnect, channel_occupied and
channel_vacated posted to a receiver on loopback, signed, at least once;
queued in Redis so that a node killed with events in hand leaves them to
another node; a receiver that is down loses nothing; the queue is bounded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
from typing import Any

import pytest
import pytest_twisted
from childnode import ChildNode
from conftest import RedisServer, wait_for, wait_subscribed
from test_production import scrape
from test_sse import stream_request
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site
from wsclient import connect

from sockdrawer import Client, make_token
from sockdrawer.brokers.eventqueue import RedisEventQueue
from sockdrawer.http.webhooks import WebhookSender

SECRET = "s" * 32
HOOK_SECRET = "hook-secret"


class Receiver(Resource):
    """The app's webhook view: keeps each event whose signature holds; answers ``status``."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.bad_signatures = 0
        self.status = 200
        self.tries = 0

    def render_POST(self, request: Any) -> bytes:
        self.tries += 1
        body = request.content.read()
        if self.status != 200:
            request.setResponseCode(self.status)
            return b"down"
        expected = "sha256=" + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        if request.getHeader("x-sockdrawer-signature") != expected:
            self.bad_signatures += 1
            request.setResponseCode(400)
            return b"bad signature"
        self.bodies.append(body)
        self.events.append(json.loads(body))
        return b"ok"

    def of(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event and all(e.get(k) == v for k, v in fields.items())]


async def start_receiver() -> tuple[Receiver, str]:
    receiver = Receiver()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(receiver))
    receiver.port = port  # type: ignore[attr-defined]
    return receiver, f"http://127.0.0.1:{port.getHost().port}/hooks"


def token(user: str) -> str:
    return make_token(SECRET, user=user, channels=["news", "chat"])


def queue_length(redis: RedisServer, name: str = "sock-drawer") -> int:
    """The events in the queue in Redis (delivered ones leave it)."""
    with redis.client() as r:
        return int(r.xlen("{" + name + ":hooks}:events"))


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short waits: a failing receiver is tried again within 0.2 s; lost nodes found within 3 s."""
    monkeypatch.setattr(WebhookSender, "max_backoff", 0.2)
    monkeypatch.setattr(WebhookSender, "poll_interval", 0.2)
    monkeypatch.setattr(RedisEventQueue, "beat_interval", 0.5)
    monkeypatch.setattr(RedisEventQueue, "dead_after", 3.0)
    monkeypatch.setattr(RedisEventQueue, "claim_idle", 1.0)


@pytest_twisted.ensureDeferred
async def test_connects_disconnects_and_channels_are_posted_signed(run_service: Any, own_redis: RedisServer,
                                                                   quick: None) -> None:
    """A raw socket, a v1 socket and an event stream each post connect and disconnect (user, client,
    transport, channel), the first connection on a channel posts channel_occupied and the last one
    channel_vacated; every request is one JSON object signed with HMAC-SHA256 of its body, with an id unique
    per event; the queue in Redis is empty once all are delivered."""
    receiver, url = await start_receiver()
    svc = await run_service(redis=own_redis.url, auth_secret=SECRET, webhook=url, webhook_secret=HOOK_SECRET)
    await wait_subscribed(svc, own_redis)
    raw = await connect(svc.ws_port, f"/news?token={token('alice')}")
    v1 = await connect(svc.ws_port, f"/?token={token('bob')}", subprotocols=["sockdrawer.v1"])
    v1.send_json({"op": "subscribe", "channel": "chat"})
    assert (await v1.next_json())["op"] == "subscribed"
    stream = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
    stream.sendall(stream_request(f"/news?token={token('carol')}"))
    await wait_for(lambda: len(receiver.of("connect")) == 3 and len(receiver.of("channel_occupied")) == 2)
    by_user = {e["user"]: e for e in receiver.of("connect")}
    assert by_user["alice"]["transport"] == "websocket" and by_user["alice"]["channel"] == "news"
    assert by_user["bob"]["transport"] == "websocket" and by_user["bob"]["channel"] is None
    assert by_user["carol"]["transport"] == "sse" and by_user["carol"]["channel"] == "news"
    assert {e["channel"] for e in receiver.of("channel_occupied")} == {"news", "chat"}
    raw.close()
    await raw.wait_closed()
    assert not receiver.of("channel_vacated")  # the stream is still on news
    v1.close()
    stream.close()
    await wait_for(lambda: len(receiver.of("disconnect")) == 3 and len(receiver.of("channel_vacated")) == 2)
    for user, event in by_user.items():
        gone = receiver.of("disconnect", user=user)
        assert len(gone) == 1 and gone[0]["client"] == event["client"] and gone[0]["time"] >= event["time"]
    ids = [e["id"] for e in receiver.events]
    assert len(ids) == len(set(ids)) == 10 and receiver.bad_signatures == 0
    assert all(body.startswith(b'{"id":') for body in receiver.bodies)
    await wait_for(lambda: queue_length(own_redis) == 0)
    metrics = await deferToThread(scrape, svc.api_port)
    assert metrics["sockdrawer_webhook_sent_total"] == 10.0


@pytest_twisted.ensureDeferred
async def test_a_channel_is_occupied_and_vacated_once_across_nodes(run_service: Any, own_redis: RedisServer,
                                                                   quick: None) -> None:
    """Sockets on one channel on two nodes: channel_occupied once (the first socket on any node),
    channel_vacated once (the last one gone from every node), each node's connects posted."""
    receiver, url = await start_receiver()
    first = await run_service(redis=own_redis.url, auth_secret=SECRET, webhook=url, webhook_secret=HOOK_SECRET)
    second = await run_service(redis=own_redis.url, auth_secret=SECRET, webhook=url, webhook_secret=HOOK_SECRET)
    for svc in (first, second):
        await wait_subscribed(svc, own_redis)
    a = await connect(first.ws_port, f"/news?token={token('a')}")
    await wait_for(lambda: receiver.of("channel_occupied", channel="news"))
    b = await connect(second.ws_port, f"/news?token={token('b')}")
    await wait_for(lambda: len(receiver.of("connect")) == 2)
    a.close()
    await wait_for(lambda: len(receiver.of("disconnect")) == 1)
    b.close()
    await wait_for(lambda: receiver.of("channel_vacated", channel="news"))
    await wait_for(lambda: len(receiver.of("disconnect")) == 2 and queue_length(own_redis) == 0)
    assert len(receiver.of("channel_occupied")) == 1 and len(receiver.of("channel_vacated")) == 1


@pytest_twisted.ensureDeferred
async def test_a_receiver_down_loses_nothing_and_says_so(run_service: Any, own_redis: RedisServer,
                                                         quick: None) -> None:
    """While the receiver answers 503, events stay queued in Redis, each failed try is a warning naming the
    receiver and counted in sockdrawer_webhook_failures_total; once it answers 200 every event arrives,
    one info line says so, and the queue empties."""
    from twisted.logger import globalLogPublisher

    receiver, url = await start_receiver()
    receiver.status = 503
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        svc = await run_service(redis=own_redis.url, auth_secret=SECRET, webhook=url,
                                webhook_secret=HOOK_SECRET)
        await wait_subscribed(svc, own_redis)
        sockets = [await connect(svc.ws_port, f"/news?token={token(f'u{i}')}") for i in range(5)]
        # the last connect's events reach Redis at the end of the turn that opened it (its 101 may arrive first)
        await wait_for(lambda: receiver.tries >= 4 and queue_length(own_redis) == 6)
        assert not receiver.events  # 5 connects, 1 channel_occupied: all queued
        metrics = await deferToThread(scrape, svc.api_port)
        assert metrics["sockdrawer_webhook_failures_total"] >= 2
        assert metrics["sockdrawer_webhook_sent_total"] == 0
        receiver.status = 200
        await wait_for(lambda: len(receiver.events) == 6)
        await wait_for(lambda: queue_length(own_redis) == 0)
    finally:
        globalLogPublisher.removeObserver(logged)
    from twisted.logger import LogLevel

    hooks = [e for e in logged if e.get("log_namespace") == "sockdrawer.webhook"]
    assert any(e["log_level"] == LogLevel.warn and e.get("url") == url and e.get("error") == "answered 503"
               for e in hooks), hooks
    assert any(e["log_level"] == LogLevel.info and "answers again" in e["log_format"] for e in hooks)
    for s in sockets:
        s.close()


@pytest_twisted.ensureDeferred
async def test_the_queue_is_bounded(run_service: Any, own_redis: RedisServer, quick: None) -> None:
    """At --webhook-queue-max events waiting, new events are dropped, logged and counted
    (sockdrawer_webhook_dropped_total); what was queued is delivered once the receiver answers."""
    receiver, url = await start_receiver()
    receiver.status = 500
    svc = await run_service(redis=own_redis.url, auth_secret=SECRET, webhook=url, webhook_secret=HOOK_SECRET,
                            webhook_queue_max=3)
    await wait_subscribed(svc, own_redis)
    sockets = [await connect(svc.ws_port, f"/news?token={token(f'u{i}')}") for i in range(4)]
    # 4 connects + occupied: 3 kept (counted dropped in this process while the kept ones may still be on their
    # way to Redis, or in Redis)
    await wait_for(lambda: svc.webhook.queue.dropped == 2 and queue_length(own_redis) == 3)
    metrics = await deferToThread(scrape, svc.api_port)
    assert metrics["sockdrawer_webhook_dropped_total"] == 2
    receiver.status = 200
    await wait_for(lambda: len(receiver.events) == 3 and queue_length(own_redis) == 0)
    for s in sockets:
        s.close()


@pytest_twisted.ensureDeferred
async def test_a_killed_nodes_events_are_sent_by_another(run_service: Any, own_redis: RedisServer,
                                                         quick: None, tmp_path: Any) -> None:
    """A node (a twistd process) queues a socket's connect and channel_occupied in Redis while its receiver
    fails, and is killed (SIGKILL): another node sends them (taken over from the dead node), then finds the
    node lost and posts that socket's disconnect ("reason": "node lost") and channel_vacated."""
    import signal

    receiver, url = await start_receiver()
    child = ChildNode(tmp_path, ["--redis", own_redis.url, "--webhook", url.replace("/hooks", "/down"),
                                 "--webhook-secret", "wrong"])
    await deferToThread(child.start)
    try:
        socket_ = await connect(child.ws_port, "/news")
        await wait_for(lambda: queue_length(own_redis) == 2)
        await wait_for(lambda: receiver.tries >= 1)  # taken by the child: pending under its name
        await deferToThread(child.stop, signal.SIGKILL)
        await socket_.wait_closed()
    finally:
        if child.proc is not None and child.proc.poll() is None:
            await deferToThread(child.stop, signal.SIGKILL)
    assert not receiver.events  # the child signed with the wrong secret: refused
    svc = await run_service(redis=own_redis.url, webhook=url, webhook_secret=HOOK_SECRET)
    await wait_for(lambda: len(receiver.events) == 4, timeout=20)
    connected = receiver.of("connect")[0]
    lost = receiver.of("disconnect")[0]
    assert lost["client"] == connected["client"] and lost["reason"] == "node lost"
    assert receiver.of("channel_occupied", channel="news") and receiver.of("channel_vacated", channel="news")
    await wait_for(lambda: queue_length(own_redis) == 0)
    assert svc.webhook.sent == 4


@pytest_twisted.ensureDeferred
async def test_the_embedded_broker_posts_events_too(run_service: Any, quick: None) -> None:
    """Without Redis the events wait in the node's memory and are posted the same way; the client id of a
    raw socket's connect event is what POST /disconnect {"client"} (Client.disconnect) takes."""
    receiver, url = await start_receiver()
    svc = await run_service(auth_secret=SECRET, webhook=url, webhook_secret=HOOK_SECRET)
    raw = await connect(svc.ws_port, f"/news?token={token('alice')}")
    await wait_for(lambda: receiver.of("connect") and receiver.of("channel_occupied"))
    client = receiver.of("connect")[0]["client"]
    with Client(f"http://127.0.0.1:{svc.api_port}") as c:
        await deferToThread(c.disconnect, client=client, code=4009, reason="bye")
    assert await raw.wait_closed() == (4009, "bye")
    await wait_for(lambda: receiver.of("disconnect", client=client) and receiver.of("channel_vacated"))


@pytest_twisted.ensureDeferred
async def test_a_frozen_node_is_presumed_lost_then_tells_again(run_service: Any, own_redis: RedisServer,
                                                                quick: None) -> None:
    """A node that stops beating (frozen) is swept by another: its socket's disconnect ("node lost") and its
    channel's channel_vacated are posted; when it beats again, it queues its open socket's connect and the
    channel's channel_occupied again, so the receiver's picture is right once more."""
    receiver, url = await start_receiver()
    frozen = await run_service(redis=own_redis.url, webhook=url, webhook_secret=HOOK_SECRET)
    await run_service(redis=own_redis.url, webhook=url, webhook_secret=HOOK_SECRET)
    sock = await connect(frozen.ws_port, "/news")
    await wait_for(lambda: receiver.of("connect") and receiver.of("channel_occupied"))
    queue = frozen.lifecycle.queue
    queue._beat.stop()
    await wait_for(lambda: receiver.of("disconnect", reason="node lost") and receiver.of("channel_vacated"))
    queue._beat.start(queue.beat_interval, now=True)
    await wait_for(lambda: len(receiver.of("connect")) == 2 and len(receiver.of("channel_occupied")) == 2)
    first, again = receiver.of("connect")
    assert again["client"] == first["client"] and again["id"] != first["id"]
    sock.close()
    await wait_for(lambda: len(receiver.of("disconnect")) == 2 and len(receiver.of("channel_vacated")) == 2)


def test_the_sweep_of_a_lost_node_removes_its_members_and_channels(own_redis: RedisServer) -> None:
    """The sweep script, on a real Redis, for a node silent too long: its presence members (the Pusher
    webhooks' member names) get member_removed with channel and user, its channels channel_vacated, its
    connections disconnect "node lost"; a channel another node still holds is not vacated."""
    from sockdrawer.brokers.eventqueue import _SWEEP
    from sockdrawer.core.lifecycle import member_name

    tag = "{t:hooks}"
    with own_redis.client() as r:
        r.zadd(f"{tag}:nodes", {"dead": 0, "alive": 10**13})
        member = member_name("presence-room", "u1")
        r.sadd(f"{tag}:node:dead:channels", member, "news", "shared")
        r.hset(f"{tag}:channels", mapping={member: 1, "news": 1, "shared": 2})
        r.hset(f"{tag}:node:dead:clients", "c1", json.dumps({"event": "connect", "time": 1, "user": "u1",
                                                              "client": "c1", "channel": None}))
        lost, queued, dropped = r.eval(_SWEEP, 3, f"{tag}:events", f"{tag}:channels", f"{tag}:nodes",
                                       100, 15000, f"{tag}:node:")
        assert (lost, queued, dropped) == (1, 3, 0)
        bodies = [json.loads(fields[b"e"]) for _, fields in r.xrange(f"{tag}:events")]
        assert r.zrange(f"{tag}:nodes", 0, -1) == [b"alive"] and r.hgetall(f"{tag}:channels") == {b"shared": b"1"}
    by_event = {b["event"]: b for b in bodies}
    assert by_event["disconnect"]["client"] == "c1" and by_event["disconnect"]["reason"] == "node lost"
    assert {k: by_event["member_removed"][k] for k in ("channel", "user_id")} == {"channel": "presence-room",
                                                                                    "user_id": "u1"}
    assert by_event["channel_vacated"]["channel"] == "news"
    assert [b["event"] for b in bodies].count("channel_vacated") == 1
