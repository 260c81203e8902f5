"""
The control API: the app's backend closes or unsubscribes a user's
connections on every node, through Redis (``sockdrawer.Client``) or a node's
HTTP API; bad commands get 400 and touch nothing.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
import pytest_twisted
from conftest import RedisServer, wait_for, wait_subscribed
from test_production import scrape
from twisted.internet.threads import deferToThread
from wsclient import connect

from sockdrawer import Client, make_token

SECRET = "s" * 32


def post(port: int, path: str, body: bytes, key: str | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method="POST")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def nodes(run_service: Any, redis_server: RedisServer, **settings: Any) -> tuple[Any, Any]:
    first = await run_service(redis=redis_server.url, auth_secret=SECRET, **settings)
    second = await run_service(redis=redis_server.url, auth_secret=SECRET, **settings)
    await wait_subscribed(first, redis_server)
    await wait_subscribed(second, redis_server)
    return first, second


def token(user: str) -> str:
    return make_token(SECRET, user=user, channels=["news", "chat"])


@pytest_twisted.ensureDeferred
async def test_disconnect_closes_a_users_connections_on_every_node(run_service: Any,
                                                                    redis_server: RedisServer) -> None:
    """Client.disconnect(user) through Redis closes that user's sockets on both nodes (a raw one and a v1
    one) with the code and reason given; another user's socket stays open and keeps receiving."""
    first, second = await nodes(run_service, redis_server)
    alice_v1 = await connect(first.ws_port, f"/?token={token('alice')}", subprotocols=["sockdrawer.v1"])
    alice_raw = await connect(second.ws_port, f"/news?token={token('alice')}")
    bob = await connect(first.ws_port, f"/news?token={token('bob')}")
    with Client(redis_server.url) as client:
        await deferToThread(client.disconnect, "alice", code=4010, reason="banned")
    assert await alice_v1.wait_closed() == (4010, "banned")
    assert await alice_raw.wait_closed() == (4010, "banned")
    await first.publish("still", "news")
    assert await bob.next_text() == "still"
    assert first.factory.control.commands == {"disconnect": 1} and second.factory.control.affected == 1


@pytest_twisted.ensureDeferred
async def test_unsubscribe_through_the_api_reaches_every_node(run_service: Any, redis_server: RedisServer) -> None:
    """POST /unsubscribe {"user", "channel"} on one node's API: the user's v1 subscription to that channel on
    the other node ends with {"op": "unsubscribed"} (the socket stays, its other subscriptions too), and
    their raw socket on that channel is closed with 4003."""
    first, second = await nodes(run_service, redis_server)
    v1 = await connect(second.ws_port, f"/?token={token('alice')}", subprotocols=["sockdrawer.v1"])
    for channel in ("news", "chat"):
        v1.send_json({"op": "subscribe", "channel": channel})
        assert (await v1.next_json())["op"] == "subscribed"
    raw = await connect(second.ws_port, f"/news?token={token('alice')}")
    status, answer = await deferToThread(post, first.api_port, "/unsubscribe",
                                         b'{"user": "alice", "channel": "news"}')
    assert (status, answer) == (202, {"accepted": {"op": "unsubscribe", "user": "alice", "channel": "news"}})
    assert await v1.next_json() == {"op": "unsubscribed", "channel": "news"}
    assert await raw.wait_closed() == (4003, "unsubscribed")
    await wait_for(lambda: b"news" not in second.hub.channels())
    await first.publish("hi", "chat")
    assert (await v1.next_json())["data"] == "hi"


@pytest.mark.parametrize("path, body, error", [
    ("/disconnect", b'{"user": "a", "client": "b"}', "disconnect takes one of user or client"),
    ("/disconnect", b'{"user": "a", "code": 1000}', "code must be an integer from 4000 to 4999"),
    ("/disconnect", b"not json", "body is not JSON"),
    ("/unsubscribe", b'{"user": "a", "channel": "a\\u0000b"}', "control character in channel name"),
])
@pytest_twisted.ensureDeferred
async def test_bad_commands_get_400_and_touch_nothing(run_service: Any, path: str, body: bytes,
                                                      error: str) -> None:
    """A malformed command is answered 400 naming what is wrong, and no connection is touched."""
    svc = await run_service(auth_secret=SECRET)
    socket = await connect(svc.ws_port, f"/news?token={token('a')}")
    status, answer = await deferToThread(post, svc.api_port, path, body)
    assert status == 400 and answer["error"].startswith(error), answer
    await svc.publish("fine", "news")
    assert await socket.next_text() == "fine"
    assert svc.factory.control.commands == {}


@pytest_twisted.ensureDeferred
async def test_the_control_api_takes_the_api_key_and_an_unknown_user_is_no_error(run_service: Any) -> None:
    """With --api-key the control calls need it (401 without); a disconnect for a user no node knows is
    accepted (202) and closes nothing, with one log line per node saying so, and counted in the metrics."""
    from twisted.logger import globalLogPublisher

    svc = await run_service(auth_secret=SECRET, api_key="k" * 24)
    assert (await deferToThread(post, svc.api_port, "/disconnect", b'{"user": "x"}'))[0] == 401
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        status, _ = await deferToThread(post, svc.api_port, "/disconnect", b'{"user": "nobody"}', "k" * 24)
        assert status == 202
        await wait_for(lambda: svc.factory.control.commands.get("disconnect") == 1)
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_namespace") == "sockdrawer.control"]
    assert len(lines) == 1 and lines[0]["count"] == 0 and lines[0]["target"] == "user 'nobody'"
    samples = await deferToThread(scrape, svc.api_port, {"Authorization": "Bearer " + "k" * 24})
    assert samples["sockdrawer_control_commands_total{op=disconnect}"] == 1
    assert samples["sockdrawer_control_connections_total"] == 0


def get_channels(port: int, query: str = "") -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/channels{query}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest_twisted.ensureDeferred
async def test_channels_counts_connections_across_every_node(run_service: Any, redis_server: RedisServer) -> None:
    """GET /channels adds up every node's connections by channel (raw and v1 sockets, event streams), this
    node's live and the others' as of their last census; ?pattern= narrows it; a bad pattern gets 400; a
    node that stops takes its counts with it."""
    import socket

    from test_sse import stream_request

    first, second = await nodes(run_service, redis_server)
    keep = [await connect(first.ws_port, f"/news?token={token('a')}") for _ in range(2)]
    v1 = await connect(first.ws_port, f"/?token={token('a')}", subprotocols=["sockdrawer.v1"])
    v1.send_json({"op": "subscribe", "channel": "chat"})
    assert (await v1.next_json())["op"] == "subscribed"
    keep.append(await connect(second.ws_port, f"/news?token={token('b')}"))
    stream = socket.create_connection(("127.0.0.1", second.ws_port), timeout=5)
    try:
        stream.sendall(stream_request(f"/news?token={token('b')}"))
        want = {"channels": {"chat": {"sockets": 1}, "news": {"sockets": 4}}}

        async def counted(port: int, query: str, expected: dict[str, Any]) -> bool:
            return await deferToThread(get_channels, port, query) == (200, expected)

        await wait_for(lambda: counted(first.api_port, "", want))
        assert await counted(first.api_port, "?pattern=news", {"channels": {"news": {"sockets": 4}}})
        assert (await deferToThread(get_channels, first.api_port, "?pattern=a*b"))[0] == 400
        await second.stopService()
        await wait_for(lambda: counted(first.api_port, "", {"channels": {"chat": {"sockets": 1},
                                                                          "news": {"sockets": 2}}}))
    finally:
        stream.close()


@pytest_twisted.ensureDeferred
async def test_census_writes_thousands_of_channels_and_then_only_changes(run_service: Any,
                                                                         redis_server: RedisServer) -> None:
    """A node's census hash holds all of 6,000 channels (more than one Lua unpack takes); the next write sends
    only what changed (one count, one channel gone, one new) and the hash matches again; a hash that vanished
    (expired while Redis was away) is written whole on the next write; after a write that failed (Redis may
    have run it or not) the next one replaces the hash whole, stale fields and all."""
    import redis as redis_py

    from sockdrawer.node.census import HashWriter

    svc = await run_service(redis=redis_server.url)
    await wait_subscribed(svc, redis_server)
    sent: list[int] = []
    link = svc.broker

    class Counting:
        fail = False

        def eval(self, script: str, keys: list[Any], args: list[Any]) -> Any:
            if self.fail:
                self.fail = False
                raise ConnectionError("timed out")
            sent.append(len(args))
            return link.eval(script, keys, args)

    counting = Counting()
    writer = HashWriter(counting, "test:census:big", 6)
    counts = {b"c%d" % i: 1 for i in range(6000)}
    await writer.write(counts)
    plain = redis_py.Redis.from_url(redis_server.url)

    def held() -> dict[bytes, int]:
        return {k: int(v) for k, v in plain.hgetall("test:census:big").items()}

    assert await deferToThread(held) == counts and 0 < plain.ttl("test:census:big") <= 6
    counts = {**counts, b"c1": 3, b"new": 2}
    del counts[b"c2"]
    sent.clear()
    await writer.write(counts)
    assert sent == [3 + 1 + 4]  # ttl, flag, one deletion and its field, two field/value pairs
    assert await deferToThread(held) == counts
    plain.delete("test:census:big")
    await writer.write(counts)
    assert await deferToThread(held) == counts
    plain.hset("test:census:big", "ghost", 1)  # what a write that failed on the node may have left in Redis
    counting.fail = True
    with pytest.raises(ConnectionError):
        await writer.write(counts)
    await writer.write(counts)
    assert await deferToThread(held) == counts
    plain.close()


@pytest_twisted.ensureDeferred
async def test_max_connections_per_user_counts_every_node(run_service: Any, redis_server: RedisServer) -> None:
    """--max-connections-per-user 2: a user's third connection gets 429, counting the sockets and event
    streams it holds on the other node (as that node's last census says); another user is not affected, and a
    closed connection frees a place."""
    import socket as sockets

    from test_sse import raw_request, stream_request
    from wsclient import connect_refused

    first, second = await nodes(run_service, redis_server, max_connections_per_user=2)
    one = await connect(first.ws_port, f"/news?token={token('alice')}")
    stream = sockets.create_connection(("127.0.0.1", first.ws_port), timeout=5)
    try:
        stream.sendall(stream_request(f"/news?token={token('alice')}"))
        await wait_for(lambda: first.factory.per_user.get("alice") == 2)
        # the other node learns of them from the first's next census
        await wait_for(lambda: second.census.others("alice").addCallback(lambda n: n == 2))
        refused = await connect_refused(second.ws_port, f"/news?token={token('alice')}")
        assert (refused.status, refused.reason) == (429, "too many connections for this user")
        answer = await deferToThread(raw_request, second.ws_port, stream_request(f"/news?token={token('alice')}"))
        assert answer.startswith(b"HTTP/1.1 429")
        assert (await connect(second.ws_port, f"/news?token={token('bob')}")).ws.state.name == "OPEN"
    finally:
        stream.close()
    await wait_for(lambda: first.factory.per_user.get("alice") == 1)
    await wait_for(lambda: second.census.others("alice").addCallback(lambda n: n == 1))
    again = await connect(second.ws_port, f"/news?token={token('alice')}")
    assert again.ws.state.name == "OPEN" and one.ws.state.name == "OPEN"
