"""
Presence on sockdrawer.v1 channels (``"presence": true``): the list, joins and
leaves, on the embedded broker and across nodes on a real redis-server, the
expiry of a dead node's entries, ``Client.presence``, ``GET /presence/...``,
and the Lua scripts that keep the entries.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from childnode import ChildNode
from conftest import RedisServer, wait_for, wait_subscribed
from twisted.internet.threads import deferToThread
from websockets.sync.client import connect as sync_connect
from wsclient import connect

from sockdrawer import Client, make_token
from sockdrawer.core import presence
from sockdrawer.core.interfaces import Batch
from sockdrawer.core.v1 import Peer

V1 = ["sockdrawer.v1"]
SECRET = "p" * 40


def token(user: str) -> str:
    return make_token(SECRET, user=user, channels=["room/*"])


async def v1(svc: Any, user: str | None = None) -> Any:
    path = "/" if user is None else f"/?token={token(user)}"
    return await connect(svc.ws_port, path, subprotocols=V1)


async def subscribe_with_presence(client: Any, channel: str) -> dict[str, Any]:
    """Subscribe with presence; return the ``presence`` message that follows ``subscribed``."""
    client.send_json({"op": "subscribe", "channel": channel, "presence": True})
    subscribed = await client.next_json()
    assert subscribed["op"] == "subscribed", subscribed
    listing: dict[str, Any] = await client.next_json()
    assert listing["op"] == "presence", listing
    return listing


def users(listing: dict[str, Any]) -> list[Any]:
    return sorted(entry["user"] for entry in listing["clients"])


# -- the embedded broker


@pytest_twisted.ensureDeferred
async def test_embedded_list_join_and_leave(run_service: Any) -> None:
    """On the embedded broker, a presence subscriber gets the list (itself in it, with its token's sub), then a
    join when another socket subscribes with presence, and a leave when it unsubscribes and when it closes."""
    svc = await run_service(auth_secret=SECRET)
    alice = await v1(svc, "alice")
    listing = await subscribe_with_presence(alice, "room/1")
    assert listing["channel"] == "room/1"
    assert listing["clients"] == [{"user": "alice", "client": listing["self"]}]
    bob = await v1(svc, "bob")
    bobs = await subscribe_with_presence(bob, "room/1")
    assert users(bobs) == ["alice", "bob"]
    assert await alice.next_json() == {"op": "join", "channel": "room/1", "user": "bob", "client": bobs["self"]}
    bob.send_json({"op": "unsubscribe", "channel": "room/1"})
    assert await alice.next_json() == {"op": "leave", "channel": "room/1", "user": "bob", "client": bobs["self"]}
    again = await subscribe_with_presence(bob, "room/1")
    assert again["self"] == bobs["self"]  # one id per socket
    assert (await alice.next_json())["op"] == "join"
    bob.close()
    assert await alice.next_json() == {"op": "leave", "channel": "room/1", "user": "bob", "client": bobs["self"]}
    assert list(svc.presence.store.local) == [b"room/1"]  # only alice's entry is left


@pytest_twisted.ensureDeferred
async def test_health_and_metrics_count_channels_not_presence_keys(run_service: Any) -> None:
    """A presence subscription holds an internal hub key for its events; /health and the channels gauge count
    the one channel the socket is on, not that key."""
    svc = await run_service(auth_secret=SECRET)
    alice = await v1(svc, "alice")
    await subscribe_with_presence(alice, "room/1")
    assert len(svc.hub.channels()) == 3  # room/1, its presence events' key, and the nodes' control key
    assert svc.state()["channels"] == 1
    from prometheus_client import generate_latest

    assert b"sockdrawer_channels 1.0" in generate_latest(svc.metrics)


@pytest_twisted.ensureDeferred
async def test_presence_is_opt_in_and_per_channel(run_service: Any) -> None:
    """A socket subscribed without presence neither gets presence messages nor shows in the list; presence on
    one channel says nothing of another; an anonymous socket on a public channel is listed with user null."""
    svc = await run_service(auth_secret=SECRET, public_channel=("lobby",))
    watcher = await v1(svc, "watcher")
    listing = await subscribe_with_presence(watcher, "room/1")
    quiet = await v1(svc, "quiet")
    quiet.send_json({"op": "subscribe", "channel": "room/1"})
    assert (await quiet.next_json())["op"] == "subscribed"
    other = await v1(svc, "other")
    await subscribe_with_presence(other, "room/2")
    anonymous = await v1(svc)
    lobby = await subscribe_with_presence(anonymous, "lobby")
    assert lobby["clients"] == [{"user": None, "client": lobby["self"]}]
    await svc.publish("fence", "room/1")
    # the next frame for the watcher is the message: no join came for quiet or for room/2's subscriber
    assert await watcher.next_json() == {"op": "message", "channel": "room/1", "offset": None, "data": "fence"}
    assert await quiet.next_json() == {"op": "message", "channel": "room/1", "offset": None, "data": "fence"}
    entries = await svc.presence.entries(b"room/1")
    assert entries == [{"user": "watcher", "client": listing["self"]}]


@pytest.mark.parametrize("value", ['"yes"', "1", "null", "{}"])
@pytest_twisted.ensureDeferred
async def test_presence_must_be_a_bool(run_service: Any, value: str) -> None:
    """"presence" that is not true or false is a 400 error on that channel, and the socket stays usable."""
    svc = await run_service()
    client = await v1(svc)
    client.send_text(f'{{"op": "subscribe", "channel": "room/1", "presence": {value}}}')
    error = await client.next_json()
    assert error == {"op": "error", "status": 400, "reason": "presence must be true or false", "channel": "room/1"}
    assert (await subscribe_with_presence(client, "room/1"))["clients"][0]["user"] is None


@pytest_twisted.ensureDeferred
async def test_presence_events_are_out_of_reach_of_channels(run_service: Any) -> None:
    """The hub key of a channel's presence events (/presence/<channel>) is no channel: a v1 subscribe, a raw
    socket, the HTTP API and Client.pub all refuse it, so nobody can listen to or forge presence events."""
    from wsclient import connect_refused

    svc = await run_service()
    client = await v1(svc)
    client.send_json({"op": "subscribe", "channel": "/presence/room/1"})
    assert (await client.next_json())["status"] == 400
    for path in ("//presence/room/1", "/%2Fpresence/room/1"):
        assert (await connect_refused(svc.ws_port, path)).status == 400

    def publish() -> int:
        request = urllib.request.Request(f"http://127.0.0.1:{svc.api_port}/publish//presence/room/1", data=b"x",
                                         method="POST")
        try:
            urllib.request.urlopen(request, timeout=5)
        except urllib.error.HTTPError as e:
            return e.code
        return 200

    assert await deferToThread(publish) == 400
    with pytest.raises(ValueError):
        Client("redis://127.0.0.1:1/0").pub("x", "/presence/room/1")


@pytest_twisted.ensureDeferred
async def test_presence_over_http_and_client(run_service: Any) -> None:
    """GET /presence/<channel> answers the channel's entries (with the API key), and Client(http://).presence
    reads them; a bad channel is 400."""
    svc = await run_service(api_key="k" * 20)
    client = await v1(svc)
    listing = await subscribe_with_presence(client, "room/1")
    base = f"http://127.0.0.1:{svc.api_port}"

    def read() -> Any:
        request = urllib.request.Request(f"{base}/presence/room/1", headers={"Authorization": "Bearer " + "k" * 20})
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.loads(response.read())
        with Client(base, api_key="k" * 20) as publisher:
            entries = publisher.presence("room/1")
        try:
            urllib.request.urlopen(urllib.request.Request(f"{base}/presence/a//b",
                                                          headers={"Authorization": "Bearer " + "k" * 20}))
        except urllib.error.HTTPError as e:
            status = e.code
        return body, entries, status

    body, entries, status = await deferToThread(read)
    assert body == {"channel": "room/1", "clients": [{"user": None, "client": listing["self"]}]}
    assert entries == body["clients"]
    assert status == 400


# -- two nodes on Redis


def recv_json(ws: Any, timeout: float = 5.0) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(timeout=timeout))
    return message


def sync_presence(ws: Any, channel: str) -> dict[str, Any]:
    ws.send(json.dumps({"op": "subscribe", "channel": channel, "presence": True}))
    assert recv_json(ws)["op"] == "subscribed"
    listing = recv_json(ws)
    assert listing["op"] == "presence", listing
    return listing


@pytest.mark.parametrize("mode", ["pattern", "channels"])
def test_two_nodes_join_leave_and_a_killed_node_expires(tmp_path: Path, redis_server: RedisServer,
                                                        mode: str) -> None:
    """With two nodes on one Redis (either --subscribe mode), a client on node A sees the list, a join when a
    client on node B subscribes with presence, a leave when it unsubscribes and when it closes; Client.presence
    returns the entries; when node B is SIGKILLed, its client leaves within --presence-timeout and a third of
    it (plus the poll)."""
    timeout = 1.5
    args = ["--redis", redis_server.url, "--name", "pres", "--presence-timeout", str(timeout), "--subscribe", mode]
    env = {"SOCKDRAWER_AUTH_SECRET": SECRET}  # a secret stays out of the command line
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    node_a = ChildNode(tmp_path / "a", args, env).start()
    node_b = ChildNode(tmp_path / "b", args, env).start()
    try:
        with sync_connect(node_a.url(f"/?token={token('alice')}"), subprotocols=V1, open_timeout=5) as alice:
            mine = sync_presence(alice, "room/1")
            assert mine["clients"] == [{"user": "alice", "client": mine["self"]}]
            with sync_connect(node_b.url(f"/?token={token('bob')}"), subprotocols=V1, open_timeout=5) as bob:
                bobs = sync_presence(bob, "room/1")
                assert users(bobs) == ["alice", "bob"]
                joined = {"op": "join", "channel": "room/1", "user": "bob", "client": bobs["self"]}
                assert recv_json(alice) == joined
                with Client(redis_server.url, name="pres") as backend:
                    assert sorted(backend.presence("room/1"), key=lambda e: e["user"]) == [
                        {"user": "alice", "client": mine["self"]}, {"user": "bob", "client": bobs["self"]}]
                    assert backend.presence("room/2") == []
                bob.send(json.dumps({"op": "unsubscribe", "channel": "room/1"}))
                assert recv_json(alice) == {**joined, "op": "leave"}
                sync_presence(bob, "room/1")
                assert recv_json(alice) == joined
            assert recv_json(alice) == {**joined, "op": "leave"}  # bob's socket closed
            # a client on node B that never leaves: node B dies
            with sync_connect(node_b.url(f"/?token={token('carol')}"), subprotocols=V1, open_timeout=5) as carol_ws:
                carol = sync_presence(carol_ws, "room/1")
                assert users(carol) == ["alice", "carol"]
                assert recv_json(alice)["user"] == "carol"
                assert node_b.proc is not None
                node_b.proc.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                node_b.proc.wait(10)
                left = recv_json(alice, timeout=10)
                elapsed = time.monotonic() - killed
            print(f"a SIGKILLed node's client left after {elapsed:.2f} s (--presence-timeout {timeout})")
            assert left == {"op": "leave", "channel": "room/1", "user": "carol", "client": carol["self"]}
            assert elapsed < timeout + timeout / 3 + 0.5, elapsed
            with Client(redis_server.url, name="pres") as backend:
                assert backend.presence("room/1") == [{"user": "alice", "client": mine["self"]}]
        node_a.assert_no_traceback()
    finally:
        for node in (node_a, node_b):
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


def _converge(messages: list[dict[str, Any]], view: dict[str, Any]) -> dict[str, Any]:
    for message in messages:
        if message["op"] == "presence":
            view = {e["client"]: e["user"] for e in message["clients"]}
        elif message["op"] == "join":
            view[message["client"]] = message["user"]
        elif message["op"] == "leave":
            view.pop(message["client"], None)
    return view


@pytest_twisted.ensureDeferred
async def test_redis_restart_puts_entries_back(own_redis: RedisServer, run_service: Any) -> None:
    """When Redis restarts empty, each node puts its entries back and sends its presence subscribers the list
    again (themselves in it), and the clients' lists come back to every socket on the channel."""
    settings = {"redis": own_redis.url, "name": "restart", "redis_retry_max": 0.3, "auth_secret": SECRET}
    one, two = await run_service(**settings), await run_service(**settings)
    for svc in (one, two):
        await wait_for(lambda svc=svc: svc.broker.is_connected())
    alice, bob = await v1(one, "alice"), await v1(two, "bob")
    mine = await subscribe_with_presence(alice, "room/1")
    theirs = await subscribe_with_presence(bob, "room/1")
    assert (await alice.next_json())["user"] == "bob"
    everyone = {mine["self"]: "alice", theirs["self"]: "bob"}
    reconnects = (one.broker.reconnects, two.broker.reconnects)
    await deferToThread(own_redis.stop)
    await deferToThread(own_redis.start, own_redis.port)
    await wait_for(lambda: one.broker.reconnects > reconnects[0] and two.broker.reconnects > reconnects[1])
    hkey = presence.hash_key("restart", b"room/1")
    await wait_for(lambda: own_redis.client().hlen(hkey) == 2)
    for client in (alice, bob):
        seen: list[dict[str, Any]] = []
        while not seen or _converge(seen, {}) != everyone:
            message = await client.next_json()
            if message["op"] in ("reset", "subscribed"):  # no history: the message side is told reset
                continue
            if not seen:
                assert message["op"] == "presence", message  # the list comes again first
                assert message["self"] in [c["client"] for c in message["clients"]]
            seen.append(message)


# -- the scripts, on a real redis-server


def _channel_events(redis: RedisServer, channel: bytes) -> Any:
    pubsub = redis.client().pubsub()
    pubsub.subscribe(channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    return pubsub


def _next(pubsub: Any) -> bytes:
    while True:
        message = pubsub.get_message(timeout=5)
        assert message is not None, "no event"
        if message["type"] == "message":
            data: bytes = message["data"]
            return data


def test_scripts_expire_refresh_and_leave(redis_server: RedisServer) -> None:
    """The scripts remove an expired entry with a leave, hide it from readers, renew live entries, put back a
    missing one with a join, join without a snapshot returns nothing, and leave publishes only for an entry
    that was there; sync publishes a bare marker."""
    r = redis_server.client()
    name, key = "scripts", b"room/9"
    hkey, channel = presence.hash_key(name, key), presence.events_channel(name, key)
    cj = presence.channel_json(key)
    r.delete(hkey)
    events = _channel_events(redis_server, channel)
    gone = presence.entry_fields("old", "c0")
    r.hset(hkey, "dead/c0", "{" + gone + ',"expires":1.000}')
    read = r.register_script(presence.READ_SCRIPT)
    assert read(keys=[hkey]) == []  # expired: invisible to readers
    join = r.register_script(presence.JOIN_SCRIPT)
    fields = presence.entry_fields("ann", "c1")
    values = join(keys=[hkey], args=[channel, cj, "30", 31, "n1", "node/c1", fields, "1"])
    assert presence.parse_entries(values) == [{"user": "ann", "client": "c1"}]
    assert _next(events) == b'\n{"op":"leave","channel":"room/9","user":"old","client":"c0"}'
    assert _next(events) == b'n1\n{"op":"join","channel":"room/9","user":"ann","client":"c1"}'
    assert r.hkeys(hkey) == [b"node/c1"]
    assert 29 <= r.ttl(hkey) <= 31
    first = json.loads(r.hget(hkey, "node/c1"))["expires"]
    refresh = r.register_script(presence.REFRESH_SCRIPT)
    ben = presence.entry_fields("ben", "c2")
    assert refresh(keys=[hkey], args=[channel, cj, "60", 61, "node/c1", fields, "node/c2", ben]) == 1
    assert _next(events) == b'\n{"op":"join","channel":"room/9","user":"ben","client":"c2"}'
    assert json.loads(r.hget(hkey, "node/c1"))["expires"] >= first + 29
    leave = r.register_script(presence.LEAVE_SCRIPT)
    assert leave(keys=[hkey], args=[channel, cj, "node/c2", "node/none"]) == 1
    assert _next(events) == b'\n{"op":"leave","channel":"room/9","user":"ben","client":"c2"}'
    cat = presence.entry_fields("cat", "c3")
    assert join(keys=[hkey], args=[channel, cj, "30", 31, "n3", "node/c3", cat, "0"]) == []  # no snapshot asked
    assert _next(events) == b'n3\n{"op":"join","channel":"room/9","user":"cat","client":"c3"}'
    assert leave(keys=[hkey], args=[channel, cj, "node/c3"]) == 1
    assert _next(events).startswith(b'\n{"op":"leave"')
    sync = r.register_script(presence.SYNC_SCRIPT)
    assert presence.parse_entries(sync(keys=[hkey], args=[channel, cj, "n2"])) == [{"user": "ann", "client": "c1"}]
    assert _next(events) == b"n2\n"
    events.close()


# -- the group's snapshot and markers, with fakes


class _Session:
    def __init__(self, client: str) -> None:
        self.client = client
        self.sent: list[Any] = []
        self.writes = 0

    def send_text(self, payload: bytes) -> None:
        self.sent.append(json.loads(payload))

    def send_shared(self, payloads: list[bytes], frames: dict[int, bytes]) -> None:
        self.writes += 1
        for payload in payloads:
            self.send_text(payload)

    def send_control(self, op: str, **fields: Any) -> None:
        self.sent.append({"op": op, **fields})


class _Sub:
    def __init__(self, client: str) -> None:
        self.session = _Session(client)
        self.key = b"c"


class _Store:
    """Records join and sync calls; the test answers them when it wants."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.snapshots: list[bool] = []
        from twisted.internet.defer import Deferred

        self._Deferred = Deferred

    def join(self, key: bytes, field: str, fields: str, nonce: str, snapshot: bool) -> Any:
        d = self._Deferred()
        self.calls.append((nonce, d))
        self.snapshots.append(snapshot)
        return d

    def sync(self, key: bytes, nonce: str) -> Any:
        d = self._Deferred()
        self.calls.append((nonce, d))
        return d

    def refresh(self, keys: Any = None) -> list[Any]:
        return []


def _group() -> tuple[Any, Any, Any, Any]:
    from twisted.internet.task import Clock

    from sockdrawer.core.v1 import PresenceGroup

    store, clock = _Store(), Clock()
    service: Any = type("S", (), {"store": store, "clock": clock, "field": lambda self, s: "n/" + s.client})()
    group = PresenceGroup(service, b"c")
    sub: Any = _Sub("me")
    sub.session.peer = Peer(user="me")
    return group, store, clock, sub


def _event(nonce: str, op: str = "", client: str = "", user: str = "u") -> bytes:
    body = json.dumps({"op": op, "channel": "c", "user": user, "client": client}) if op else ""
    return f"{nonce}\n{body}".encode()


@pytest.mark.parametrize("snapshot_first", [True, False])
def test_group_lines_up_snapshot_and_events(snapshot_first: bool) -> None:
    """A new subscription gets the snapshot of its own join with the events after its marker applied (those
    before it dropped), whether the snapshot or the marker arrives first; then each later event once."""
    from sockdrawer.core.v1 import PRESENCE_PERIOD

    group, store, clock, sub = _group()
    group.add(sub)
    nonce, d = store.calls[0]
    snapshot = ['{"user":"x","client":"x"}', '{"user":"me","client":"me"}']
    before, marker = _event("", "join", "x", "x"), _event(nonce, "join", "me", "me")
    after = _event("", "join", "y", "y")
    if snapshot_first:
        d.callback(snapshot)
    group.receive(Batch(b"/presence/c", [before, marker, after]))
    if not snapshot_first:
        assert sub.session.sent == []
        d.callback(snapshot)
    clock.advance(PRESENCE_PERIOD)  # events go out once per period
    listing, join_y = sub.session.sent
    assert listing == {"op": "presence", "channel": "c", "self": "me",
                       "clients": [{"user": "x", "client": "x"}, {"user": "me", "client": "me"}]}
    assert join_y["client"] == "y"
    group.receive(Batch(b"/presence/c", [_event("", "leave", "x", "x")]))
    clock.advance(PRESENCE_PERIOD)
    assert sub.session.sent[-1]["op"] == "leave" and len(sub.session.sent) == 3
    assert set(group.view) == {"me", "y"}
    group.close()


@pytest_twisted.ensureDeferred
async def test_node_stopping_removes_its_entries(redis_server: RedisServer, run_service: Any) -> None:
    """A node that stops removes its entries from Redis at once (other nodes see them leave, not expire)."""
    svc = await run_service(redis=redis_server.url, name="stopping")
    await wait_subscribed(svc, redis_server)
    client = await v1(svc)
    await subscribe_with_presence(client, "room/1")
    hkey = presence.hash_key("stopping", b"room/1")
    assert redis_server.client().hlen(hkey) == 1
    await svc.stopService()
    await wait_for(lambda: redis_server.client().hlen(hkey) == 0, timeout=5)


def test_group_asks_again_when_its_marker_never_comes() -> None:
    """When the marker of a new group's join never arrives (its Redis subscription was not in place yet), the
    group asks for another snapshot, soon, and the subscription gets the list from the one whose marker came."""
    group, store, clock, sub = _group()
    group.add(sub)
    store.calls[0][1].callback(['{"user":"me","client":"me"}'])
    assert len(store.calls) == 1
    clock.advance(0.05)  # the first retry comes after 50 ms
    nonce, d = store.calls[1]
    d.callback(['{"user":"me","client":"me"}', '{"user":"z","client":"z"}'])
    assert sub.session.sent == []
    group.receive(Batch(b"/presence/c", [_event(nonce)]))
    assert sub.session.sent == [{"op": "presence", "channel": "c", "self": "me",
                                 "clients": [{"user": "me", "client": "me"}, {"user": "z", "client": "z"}]}]
    clock.advance(5)
    assert len(store.calls) == 2  # synced: no more snapshots asked for
    group.close()


def test_group_sends_the_list_again_after_a_gap() -> None:
    """After a broker gap, the group takes a new snapshot and every live subscription gets the list again
    (events lost in the gap are not replayed one by one)."""
    group, store, clock, sub = _group()
    group.add(sub)
    nonce, d = store.calls[0]
    d.callback(['{"user":"me","client":"me"}'])
    group.receive(Batch(b"/presence/c", [_event(nonce, "join", "me", "me")]))
    assert [m["op"] for m in sub.session.sent] == ["presence"]
    group.gap()
    group.receive(Batch(b"/presence/c", [_event("", "join", "lost", "lost")]))  # before the new marker
    nonce, d = store.calls[1]
    group.receive(Batch(b"/presence/c", [_event(nonce)]))
    d.callback(['{"user":"me","client":"me"}', '{"user":"new","client":"new"}'])
    assert sub.session.sent[1:] == [{"op": "presence", "channel": "c", "self": "me",
                                     "clients": [{"user": "me", "client": "me"}, {"user": "new", "client": "new"}]}]
    group.close()


def test_failing_renewals_are_logged_once() -> None:
    """While renewing entries fails (Redis down), one warning is logged, not one per round; when a renewal
    works again, one line says so."""
    from twisted.internet import defer
    from twisted.internet.task import Clock
    from twisted.logger import globalLogPublisher

    from sockdrawer.core.v1 import PresenceService

    outcome: list[Any] = [ConnectionError("Redis is down")]

    def eval(script: str, keys: list[Any], args: list[Any]) -> Any:
        return defer.fail(outcome[0]) if isinstance(outcome[0], Exception) else defer.succeed(0)

    store = presence.RedisPresence(eval, "logs", 3.0)
    store.local[b"room/1"] = {"n/c": presence.entry_fields(None, "c")}
    service = PresenceService(store, None, Clock(), 3.0)  # type: ignore[arg-type]
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "sockdrawer.v1":
            lines.append(f"{event['log_level'].name} {event['log_format']}")

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(3):
            service.refresh()
        assert service.refresh_failing and len(lines) == 1 and lines[0].startswith("warn presence entries of")
        outcome[0] = 0
        service.refresh()
        service.refresh()
        assert not service.refresh_failing
        assert lines[1:] == ["info presence entries renewed again"]
    finally:
        globalLogPublisher.removeObserver(observe)


def test_group_asks_one_snapshot_at_a_time_and_batches_events() -> None:
    """Subscriptions joining a group that has no list yet ask for one snapshot between them (the others' joins
    are events after its marker); the events of one batch reach each live subscription in one write."""
    from sockdrawer.core.v1 import PRESENCE_PERIOD

    group, store, clock, first = _group()
    second: Any = _Sub("two")
    second.session.peer = Peer(user="two")
    group.add(first)
    group.add(second)
    assert store.snapshots == [True, False]
    (n1, d1), (n2, d2) = store.calls
    d2.callback([])  # a join without a snapshot answers nothing: not a list
    group.receive(Batch(b"/presence/c", [_event(n1, "join", "me", "me"), _event(n2, "join", "two", "two")]))
    assert first.session.sent == [] and second.session.sent == []
    d1.callback(['{"user":"me","client":"me"}'])
    assert first.session.sent == [{"op": "presence", "channel": "c", "self": "me",
                                   "clients": [{"user": "me", "client": "me"}]},
                                  {"op": "join", "channel": "c", "user": "two", "client": "two"}]
    assert [e["client"] for e in second.session.sent[0]["clients"]] == ["me", "two"]
    writes = first.session.writes
    group.receive(Batch(b"/presence/c", [_event("", "join", f"x{i}", "x") for i in range(5)]))
    clock.advance(PRESENCE_PERIOD)
    assert first.session.writes == writes + 1 and second.session.writes == 1
    assert len(first.session.sent) == 7 and len(second.session.sent) == 6
    group.close()


def test_group_coalesces_a_period_of_churn() -> None:
    """Within one presence period, a client that joins and leaves (or leaves and comes back) costs the members
    nothing, and a client that changes several times costs each member one event, its last; the members' view
    ends as the store's."""
    from sockdrawer.core.v1 import PRESENCE_PERIOD

    group, store, clock, sub = _group()
    group.add(sub)
    nonce, d = store.calls[0]
    d.callback(['{"user":"me","client":"me"}', '{"user":"old","client":"old"}'])
    group.receive(Batch(b"/presence/c", [_event(nonce, "join", "me", "me")]))
    assert [m["op"] for m in sub.session.sent] == ["presence"]
    churn = []
    for _ in range(45):  # a churning socket: join, leave, join, leave...
        churn += [_event("", "join", "churner", "c"), _event("", "leave", "churner", "c")]
    churn += [_event("", "leave", "old", "old"), _event("", "join", "old", "old")]  # away and back
    churn += [_event("", "join", "new", "n"), _event("", "leave", "new", "n"), _event("", "join", "new", "n")]
    group.receive(Batch(b"/presence/c", churn))
    assert [m["op"] for m in sub.session.sent] == ["presence"]  # nothing before the period ends
    clock.advance(PRESENCE_PERIOD)
    assert sub.session.sent[1:] == [{"op": "join", "channel": "c", "user": "n", "client": "new"}]
    assert set(group.view) == {"me", "old", "new"}
    group.close()


def test_a_gap_drops_the_events_gathered_for_the_old_view() -> None:
    """Events gathered in a presence period before a broker gap are not sent after it: the list the members
    get after the gap replaces them (no stale join or leave after the new list)."""
    from sockdrawer.core.v1 import PRESENCE_PERIOD

    group, store, clock, sub = _group()
    group.add(sub)
    nonce, d = store.calls[0]
    d.callback(['{"user":"me","client":"me"}', '{"user":"x","client":"x"}'])
    group.receive(Batch(b"/presence/c", [_event(nonce, "join", "me", "me")]))
    group.receive(Batch(b"/presence/c", [_event("", "leave", "x", "x")]))  # gathered, not sent yet
    group.gap()
    marker, synced = store.calls[-1]  # the snapshot the gap asked for
    synced.callback(['{"user":"me","client":"me"}'])  # x is gone from it
    group.receive(Batch(b"/presence/c", [_event(marker)]))  # its marker: the members get the new list
    clock.advance(PRESENCE_PERIOD)
    assert [m["op"] for m in sub.session.sent] == ["presence", "presence"]
    assert sub.session.sent[-1]["clients"] == [{"user": "me", "client": "me"}]
    group.close()
