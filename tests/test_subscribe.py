"""
Interest-based subscriptions (``--subscribe channels``): a node SUBSCRIBEs to
exactly the channels it has sockets or listeners for.

Unit tests drive the subscriber protocol with a StringTransport and the
link's reactor turns with a clock; the integration tests use a real
redis-server and real WebSocket clients.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
import txredisapi
from conftest import commands, wait_for
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from wsclient import connect

from sockdrawer.brokers.redis import RedisLink, _SubscriberFactory
from sockdrawer.brokers.subscriber import RedisSubscriberProtocol
from sockdrawer.brokers.url import RedisURL
from sockdrawer.core.channels import Namespace
from sockdrawer.core.hub import MemoryChannelHub
from sockdrawer.core.interfaces import Batch
from sockdrawer.testing import RecordingSink


def bulk(*parts: bytes) -> bytes:
    out = b"*%d\r\n" % len(parts)
    for p in parts:
        out += b"$%d\r\n%s\r\n" % (len(p), p)
    return out


def confirm(kind: bytes, channel: bytes, count: int) -> bytes:
    return b"*3\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n:%d\r\n" % (len(kind), kind, len(channel), channel, count)


def message(channel: bytes, payload: bytes) -> bytes:
    return bulk(b"message", channel, payload)


def names(*keys: bytes, name: bytes = b"sock-drawer") -> list[bytes]:
    """The two Redis channels of each key: raw messages, and messages with history."""
    return [n for key in keys for n in (name + b"/" + key, name + b"#/" + key)]


class Node:
    """A link by channel on a fake reactor, with a hub and a way to connect protocols."""

    def __init__(self, subscribe: str = "channels") -> None:
        self.reactor = MemoryReactorClock()
        self.hub = MemoryChannelHub()
        self.link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), self.hub, reactor=self.reactor,
                              ping_interval=0, subscribe=subscribe)
        self.link.startService()
        self.sinks: dict[bytes, RecordingSink] = {}

    def connect(self) -> tuple[RedisSubscriberProtocol, StringTransport]:
        p = _SubscriberFactory(self.link).buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
        transport = StringTransport()
        p.makeConnection(transport)  # no password: ready at once
        return p, transport

    def open(self, *keys: bytes) -> None:
        for key in keys:
            sink = self.sinks.setdefault(key, RecordingSink(key.decode()))
            self.hub.subscribe(key, sink)

    def close(self, *keys: bytes) -> None:
        for key in keys:
            self.hub.unsubscribe(key, self.sinks[key])

    def turn(self) -> None:
        self.reactor.advance(0)

    def stop(self) -> None:
        self.link.stopService()


@pytest.fixture
def node() -> Any:
    n = Node()
    yield n
    n.stop()


def confirm_all(p: RedisSubscriberProtocol, kind: bytes, channels: list[bytes], start: int = 0) -> None:
    count = start
    data = b""
    for channel in channels:
        count += 1 if kind == b"subscribe" else -1
        data += confirm(kind, channel, count)
    p.dataReceived(data)


# -- unit tests: protocol and link by channel


def test_connect_subscribes_to_the_hubs_channels_and_is_ready_once_confirmed(node: Node) -> None:
    """A new connection by channel sends one SUBSCRIBE for every channel the hub has (raw and history channel
    each), no PSUBSCRIBE; the link counts as connected only once Redis confirmed all of them."""
    node.open(b"news", b"rooms/1")
    p, transport = node.connect()
    assert commands(transport.value()) == [[b"SUBSCRIBE", *names(b"news", b"rooms/1")]]
    assert not node.link.is_connected()
    confirm_all(p, b"subscribe", names(b"news", b"rooms/1")[:3])
    assert not node.link.is_connected()
    p.dataReceived(confirm(b"subscribe", names(b"rooms/1")[1], 4))
    assert node.link.is_connected() and node.link.subscriptions == 4
    assert node.link.subscribe_commands == 1


def test_connect_with_no_channels_sends_nothing_and_is_ready(node: Node) -> None:
    """With no sockets or listeners, a new connection sends no command and the link is connected at once."""
    _, transport = node.connect()
    assert transport.value() == b"" and node.link.is_connected()


def test_pattern_mode_does_not_watch_the_hub() -> None:
    """By pattern (the default) the link PSUBSCRIBEs and ignores channels opening."""
    n = Node("pattern")
    try:
        _, transport = n.connect()
        assert commands(transport.value()) == [[b"PSUBSCRIBE", b"sock-drawer/*", b"sock-drawer#/*"]]
        transport.clear()
        n.open(b"news")
        n.turn()
        assert transport.value() == b"" and n.hub._observers == ()
    finally:
        n.stop()
    with pytest.raises(ValueError, match="pattern or channels"):
        RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), MemoryChannelHub(), subscribe="glob",
                  reactor=reactor)


def test_changes_of_one_turn_are_one_command(node: Node) -> None:
    """100 channels opening in one reactor turn (10 sinks each) make one SUBSCRIBE, sent at the end of the
    turn; 100 closing make one UNSUBSCRIBE."""
    _, transport = node.connect()
    keys = [b"c%d" % i for i in range(100)]
    for key in keys:
        for i in range(10):
            node.hub.subscribe(key, RecordingSink(f"{key!r}{i}"))
    assert transport.value() == b""
    node.turn()
    assert commands(transport.value()) == [[b"SUBSCRIBE", *names(*keys)]]
    transport.clear()
    for key in keys:
        for sink in node.hub.sinks(key):
            node.hub.unsubscribe(key, sink)
    node.turn()
    assert commands(transport.value()) == [[b"UNSUBSCRIBE", *names(*keys)]]
    assert (node.link.subscribe_commands, node.link.unsubscribe_commands) == (1, 1)


def test_close_and_reopen_in_one_turn_sends_nothing(node: Node) -> None:
    """A channel that loses its last sink and gets one again within the turn sends no command."""
    node.open(b"news")
    _, transport = node.connect()
    transport.clear()
    node.close(b"news")
    node.open(b"news")
    node.open(b"brief")
    node.close(b"brief")
    node.turn()
    assert transport.value() == b""


def test_reopened_before_the_unsubscribe_reply_ends_subscribed(node: Node) -> None:
    """A channel closed (UNSUBSCRIBE sent) and opened again before Redis answered is subscribed again at once;
    the late replies change nothing, and its messages are delivered."""
    node.open(b"news")
    p, transport = node.connect()
    confirm_all(p, b"subscribe", names(b"news"))
    transport.clear()
    node.close(b"news")
    node.turn()
    node.open(b"news")
    node.turn()
    assert commands(transport.value()) == [[b"UNSUBSCRIBE", *names(b"news")], [b"SUBSCRIBE", *names(b"news")]]
    confirm_all(p, b"unsubscribe", names(b"news"), start=2)
    p.dataReceived(message(b"sock-drawer/news", b"in between"))
    confirm_all(p, b"subscribe", names(b"news"))
    p.dataReceived(message(b"sock-drawer/news", b"after"))
    assert node.sinks[b"news"].messages == [b"in between", b"after"]
    assert node.link.subscriptions == 2 and p.subscribed == set(names(b"news"))


def test_messages_for_a_channel_just_unsubscribed_are_dropped(node: Node) -> None:
    """Messages Redis sent before it took the UNSUBSCRIBE are dropped and counted as stale, not as received."""
    node.open(b"news", b"sport")
    p, transport = node.connect()
    confirm_all(p, b"subscribe", names(b"news", b"sport"))
    node.close(b"news")
    node.turn()
    p.dataReceived(message(b"sock-drawer/news", b"late") + message(b"sock-drawer#/news", b"e:1-0\nlate")
                   + message(b"sock-drawer/sport", b"live"))
    assert (node.link.messages, node.link.stale_messages) == (1, 2)
    assert node.sinks[b"sport"].messages == [b"live"] and node.sinks[b"news"].messages == []
    # the pure-Python parser's way in applies the same rule
    p.messageReceived(None, b"sock-drawer/news", b"late")
    p.messageReceived(None, b"sock-drawer/sport", b"live")
    assert (node.link.messages, node.link.stale_messages) == (2, 3)


def test_messages_before_the_subscribe_reply_are_delivered(node: Node) -> None:
    """Messages that come in the same read as (or before) their SUBSCRIBE's confirmation are delivered, with
    offsets on the history channel; the confirmation still counts."""
    p, transport = node.connect()
    got: list[tuple[bytes, list[bytes], Any]] = []

    class Sink:
        receivers = 1

        def receive(self, batch: Batch) -> None:
            got.append((batch.key, list(batch.messages), batch.offsets))

    node.hub.subscribe(b"news", Sink())
    node.turn()
    p.dataReceived(message(b"sock-drawer/news", b"early") + message(b"sock-drawer#/news", b"e1:5-0\nwith offset")
                   + confirm(b"subscribe", b"sock-drawer/news", 1) + confirm(b"subscribe", b"sock-drawer#/news", 2))
    assert got == [(b"news", [b"early", b"with offset"], [None, "e1:5-0"])]
    assert node.link.subscriptions == 2 and p._outstanding == 0


def test_confirmations_never_reach_txredisapis_reply_queue(node: Node) -> None:
    """A PING sent while SUBSCRIBE confirmations are outstanding gets its own pong, not a confirmation (one
    SUBSCRIBE of n channels gets n replies)."""
    node.open(b"a", b"b")
    p, transport = node.connect()
    replies: list[object] = []
    p.ping().addCallback(replies.append)
    confirm_all(p, b"subscribe", names(b"a", b"b"))
    assert replies == []
    p.dataReceived(bulk(b"pong", b""))
    assert replies == [[b"pong", b""]]
    p.ping().addCallback(replies.append)
    p.dataReceived(bulk(b"pong", b""))
    assert replies == [[b"pong", b""]] * 2


def test_a_refused_subscribe_drops_the_connection(node: Node) -> None:
    """An error reply while SUBSCRIBE confirmations are due (an ACL refusing a channel) drops the connection,
    so the link reconnects and subscribes again."""
    node.open(b"secret")
    p, transport = node.connect()
    p.dataReceived(b"-NOPERM this user has no permissions to access one of the channels\r\n")
    assert transport.disconnecting and not node.link.is_connected()


def test_a_new_connection_subscribes_everything_again(node: Node) -> None:
    """After the connection drops, changes go nowhere; the next connection SUBSCRIBEs to the hub's channels as
    they are then, and the hub is told about the gap once it is confirmed (as after the first subscription:
    history read before it may have missed messages too); the loss is told when the connection drops."""
    from twisted.python.failure import Failure

    gaps: list[bytes] = []

    class GapSink(RecordingSink):
        def gap(self) -> None:
            gaps.append(b"gap")

    node.hub.subscribe(b"news", GapSink())
    p, transport = node.connect()
    confirm_all(p, b"subscribe", names(b"news"))
    assert gaps == [b"gap"] and node.hub.broker_whole
    p.connectionLost(Failure(ConnectionError("gone")))
    assert node.link.subscriptions == 0 and not node.hub.broker_whole
    transport.clear()
    node.open(b"sport")
    node.turn()
    assert transport.value() == b""
    p2, transport2 = node.connect()
    assert commands(transport2.value()) == [[b"SUBSCRIBE", *names(b"news", b"sport")]]
    assert gaps == [b"gap"]
    confirm_all(p2, b"subscribe", names(b"news", b"sport"))
    assert gaps == [b"gap", b"gap"] and node.link.reconnects == 1 and node.link.is_connected()
    assert node.hub.broker_whole


def test_changes_while_the_first_subscribe_is_pending(node: Node) -> None:
    """Channels opened after a connection's first SUBSCRIBE went out but before its replies come get their own
    SUBSCRIBE; the link is ready after the first command's replies alone."""
    node.open(b"a")
    p, transport = node.connect()
    node.open(b"b")
    node.turn()
    assert commands(transport.value()) == [[b"SUBSCRIBE", *names(b"a")], [b"SUBSCRIBE", *names(b"b")]]
    confirm_all(p, b"subscribe", names(b"a"))
    assert node.link.is_connected() and p._outstanding == 2


def test_large_batches_are_split(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    """More Redis channels than MAX_CHANNELS_PER_COMMAND go out in several commands, all counted."""
    from sockdrawer.brokers import subscriber as redislink  # where the link splits its commands

    monkeypatch.setattr(redislink, "MAX_CHANNELS_PER_COMMAND", 4)
    node.open(b"a", b"b", b"c")
    p, transport = node.connect()
    assert commands(transport.value()) == [[b"SUBSCRIBE", *names(b"a", b"b")], [b"SUBSCRIBE", *names(b"c")]]
    assert node.link.subscribe_commands == 2
    confirm_all(p, b"subscribe", names(b"a", b"b", b"c"))
    assert node.link.is_connected()


def test_stopped_link_stops_watching(node: Node) -> None:
    """A stopped link no longer watches the hub, and a pending batch of changes is dropped."""
    _, transport = node.connect()
    node.open(b"news")
    node.stop()
    node.turn()
    assert transport.value() == b"" and node.hub._observers == ()


def test_pure_python_replies_are_confirmations_too(node: Node) -> None:
    """txredisapi's own parser hands (un)subscribe replies to replyReceived: they count as confirmations there
    too, and an error reply while they are due drops the connection."""
    node.open(b"x")
    p, transport = node.connect()
    p.replyReceived([b"subscribe", b"sock-drawer/x", 1])
    p.replyReceived([b"subscribe", b"sock-drawer#/x", 2])
    assert node.link.is_connected() and p._outstanding == 0
    node.open(b"y")
    node.turn()
    p.replyReceived(txredisapi.ResponseError("NOPERM"))
    assert transport.disconnecting


def test_when_subscribed_waits_for_the_confirmation(node: Node) -> None:
    """when_subscribed(key) fires once Redis confirmed the SUBSCRIBE carrying key's channels (not when it is
    written), after a reconnect once the new connection's first SUBSCRIBE is confirmed, and at once when
    nothing is outstanding."""
    from twisted.python.failure import Failure

    p, transport = node.connect()
    node.open(b"news")
    fired: list[str] = []
    node.link.when_subscribed(b"news").addCallback(lambda _: fired.append("news"))
    node.turn()
    assert commands(transport.value()) == [[b"SUBSCRIBE", *names(b"news")]] and fired == []
    p.dataReceived(confirm(b"subscribe", b"sock-drawer/news", 1))
    assert fired == []
    p.dataReceived(confirm(b"subscribe", b"sock-drawer#/news", 2))
    assert fired == ["news"]
    node.link.when_subscribed(b"news").addCallback(lambda _: fired.append("again"))
    assert fired == ["news", "again"]
    # lost before the confirmation: the next connection's first SUBSCRIBE covers it
    node.open(b"sport")
    node.turn()
    node.link.when_subscribed(b"sport").addCallback(lambda _: fired.append("sport"))
    p.connectionLost(Failure(ConnectionError("gone")))
    p2, transport2 = node.connect()
    assert commands(transport2.value()) == [[b"SUBSCRIBE", *names(b"news", b"sport")]] and fired[2:] == []
    confirm_all(p2, b"subscribe", names(b"news", b"sport"))
    assert fired[2:] == ["sport"]


def test_when_subscribed_by_pattern() -> None:
    """By pattern, when_subscribed fires at once while subscribed, else on the next subscription."""
    n = Node("pattern")
    try:
        fired: list[bytes] = []
        n.link.when_subscribed(b"news").addCallback(lambda _: fired.append(b"before"))
        p, _ = n.connect()
        assert fired == []
        p.dataReceived(b"*3\r\n$10\r\npsubscribe\r\n$13\r\nsock-drawer/*\r\n:1\r\n")
        assert fired == [b"before"]
        n.link.when_subscribed(b"x").addCallback(lambda _: fired.append(b"after"))
        assert fired == [b"before", b"after"]
    finally:
        n.stop()


# -- integration: a real redis-server, real WebSocket clients


def redis_channels(redis: Any, name: str) -> list[bytes]:
    """The Redis channels of namespace ``name`` someone subscribes to, sorted (not the nodes' control key,
    which every node holds: ``<name>//control`` and its history name)."""
    with redis.client() as r:
        return sorted(c for c in r.pubsub_channels(f"{name}*") if not c.endswith(b"//control"))


def numsub(redis: Any, *channels: str) -> list[int]:
    with redis.client() as r:
        return [count for _, count in r.pubsub_numsub(*channels)]


def expected(name: str, *keys: str) -> list[bytes]:
    return sorted(names(*(k.encode() for k in keys), name=name.encode()))


@pytest_twisted.ensureDeferred
async def test_redis_sees_exactly_the_nodes_channels(redis_server: Any, run_service: Any) -> None:
    """PUBSUB CHANNELS shows exactly the channels a node has sockets or listeners on (raw and history channel
    each), and PUBSUB NUMSUB one subscriber for each, as sockets come and go; no pattern is subscribed."""
    svc = await run_service(redis=redis_server.url, name="interest", subscribe="channels",
                            listeners=["listeners:Shout"])
    await wait_for(svc.broker.is_connected)
    # the listener's channels are interest too
    await wait_for(lambda: redis_channels(redis_server, "interest") == expected("interest", "echo", "rooms/lobby"))
    assert redis_server.numpat() == 0
    news = [await connect(svc.ws_port, "/news") for _ in range(3)]
    room = await connect(svc.ws_port, "/rooms/1")
    want = expected("interest", "echo", "rooms/lobby", "news", "rooms/1")
    await wait_for(lambda: redis_channels(redis_server, "interest") == want)
    assert numsub(redis_server, "interest/news", "interest#/news", "interest/rooms/1") == [1, 1, 1]
    await wait_for(lambda: svc.broker.subscriptions == 10)  # with the control key's two
    for ws in news[:2]:
        ws.close()
        await ws.wait_closed()
    await wait_for(lambda: svc.factory.sockets(b"news") == 1)
    assert redis_channels(redis_server, "interest") == want  # one socket left on /news
    news[2].close()
    room.abort()
    await news[2].wait_closed()
    await room.wait_closed()
    await wait_for(lambda: redis_channels(redis_server, "interest") == expected("interest", "echo", "rooms/lobby"))
    await wait_for(lambda: svc.broker.subscriptions == 6)
    body = (await deferToThread(http_get, svc.api_port, "/metrics")).decode()
    assert "sockdrawer_redis_subscriptions 6.0" in body
    assert 'sockdrawer_redis_commands_total{command="unsubscribe"}' in body


def http_get(port: int, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        data: bytes = r.read()
        return data


@pytest_twisted.ensureDeferred
async def test_a_message_published_once_subscribed_arrives(redis_server: Any, run_service: Any) -> None:
    """A message published from the reactor thread the moment when_subscribed(key) fired reaches a sink on a
    channel new to the node, every time: it fires on Redis' confirmation, not when the SUBSCRIBE is written."""
    svc = await run_service(redis=redis_server.url, name="ready", subscribe="channels")
    await wait_for(svc.broker.is_connected)
    pub = redis_server.client()
    pub.ping()
    try:
        for i in range(20):
            sink = RecordingSink()
            key = b"fresh/%d" % i
            svc.hub.subscribe(key, sink)
            await svc.broker.when_subscribed(key)
            # from the reactor thread, at once: before the reactor could even write a SUBSCRIBE not yet sent
            pub.publish(b"ready/" + key, b"first")
            await wait_for(lambda sink=sink: sink.messages == [b"first"])
            svc.hub.unsubscribe(key, sink)
    finally:
        pub.close()


@pytest_twisted.ensureDeferred
async def test_a_thousand_sockets_at_once_make_few_commands(own_redis: Any, run_service: Any) -> None:
    """1000 sockets on 100 channels connecting at once make far fewer SUBSCRIBE commands than channels (Redis'
    own command count agrees with the link's), and every channel ends up subscribed."""
    svc = await run_service(redis=own_redis.url, subscribe="channels", max_connections_per_ip=2000,
                            max_pending_handshakes=2000, max_pending_handshakes_per_ip=1000)
    await wait_for(svc.broker.is_connected)
    sockets = await defer.gatherResults([connect(svc.ws_port, f"/c/{i % 100}") for i in range(1000)])
    try:
        want = expected("sock-drawer", *(f"c/{i}" for i in range(100)))
        await wait_for(lambda: redis_channels(own_redis, "sock-drawer") == want)
        with own_redis.client() as r:
            calls = r.info("commandstats")["cmdstat_subscribe"]["calls"]
        print(f"\n1000 sockets on 100 channels: {svc.broker.subscribe_commands} SUBSCRIBE commands")
        assert calls == svc.broker.subscribe_commands
        assert svc.broker.subscribe_commands <= 25
    finally:
        for ws in sockets:
            ws.abort()
        await wait_for(lambda: not svc.factory.connections)


@pytest_twisted.ensureDeferred
async def test_messages_for_channels_without_sockets_never_reach_the_node(redis_server: Any,
                                                                         run_service: Any) -> None:
    """Messages on channels the node has no sockets for are not sent to it at all: its received-messages counter
    counts only the message for its own channel (in pattern mode it would count all of them)."""
    svc = await run_service(redis=redis_server.url, name="quiet", subscribe="channels")
    await wait_for(svc.broker.is_connected)
    ws = await connect(svc.ws_port, "/mine")
    await wait_for(lambda: numsub(redis_server, "quiet/mine") == [1])

    def publish() -> None:
        with redis_server.client() as r:
            for i in range(50):
                r.publish(f"quiet/elsewhere/{i % 5}", "not for this node")
            r.publish("quiet/mine", "fence")

    await deferToThread(publish)
    assert (await ws.next_text()) == "fence"
    assert (svc.broker.messages, svc.broker.stale_messages) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_redis_restart_subscribes_every_channel_again(own_redis: Any, run_service: Any) -> None:
    """After redis-server is stopped and started again on the same port, the node subscribes to every channel
    again (sockets' and listeners') and delivery resumes on each."""
    svc = await run_service(redis=own_redis.url, subscribe="channels", listeners=["listeners:Echo"],
                            redis_retry_max=0.5)
    await wait_for(svc.broker.is_connected)
    sockets = {path: await connect(svc.ws_port, f"/{path}") for path in ("a", "b/c", "")}
    want = expected("sock-drawer", "a", "b/c", "", "echo")
    await wait_for(lambda: redis_channels(own_redis, "sock-drawer") == want)
    port = own_redis.port
    own_redis.stop()
    await wait_for(lambda: not svc.broker.is_connected())
    await deferToThread(own_redis.start, port)
    await wait_for(lambda: svc.broker.reconnects == 1 and svc.broker.is_connected())
    assert redis_channels(own_redis, "sock-drawer") == want
    for path, ws in sockets.items():
        await deferToThread(own_redis.publish, f"sock-drawer/{path}", f"back on /{path}")
        assert (await ws.next_text()) == f"back on /{path}"


@pytest_twisted.ensureDeferred
async def test_leaving_and_rejoining_quickly_ends_subscribed(redis_server: Any, run_service: Any) -> None:
    """A channel whose last socket leaves while another arrives at once, again and again (and a sink that
    leaves and comes back right after its UNSUBSCRIBE went out) ends subscribed, and its messages arrive."""
    svc = await run_service(redis=redis_server.url, name="churn", subscribe="channels")
    await wait_for(svc.broker.is_connected)
    ws = await connect(svc.ws_port, "/news")
    for _ in range(10):
        old = ws
        old.close()
        ws = await connect(svc.ws_port, "/news")
        await old.wait_closed()
    await wait_for(lambda: numsub(redis_server, "churn/news", "churn#/news") == [1, 1])
    await deferToThread(redis_server.publish, "churn/news", "still here")
    assert (await ws.next_text()) == "still here"

    # the same at the hub: the UNSUBSCRIBE is written, then the sink is back before Redis answered it
    sink = RecordingSink()
    svc.hub.subscribe(b"race", sink)
    await wait_for(lambda: numsub(redis_server, "churn/race") == [1])
    sent = svc.broker.unsubscribe_commands
    svc.hub.unsubscribe(b"race", sink)
    await wait_for(lambda: svc.broker.unsubscribe_commands > sent, interval=0)
    svc.hub.subscribe(b"race", sink)
    await wait_for(lambda: svc.broker.unconfirmed() == 0, interval=0.01)
    assert numsub(redis_server, "churn/race", "churn#/race") == [1, 1]
    await deferToThread(redis_server.publish, "churn/race", "raced")
    await wait_for(lambda: sink.messages == [b"raced"])


@pytest_twisted.ensureDeferred
async def test_ten_nodes_each_get_a_tenth_of_the_traffic(own_redis: Any, run_service: Any) -> None:
    """Ten nodes, each with sockets on its own 10 of 100 channels; 1000 messages spread evenly over the 100: by
    pattern every node receives all 1000 from Redis, by channel each receives its 100, and Redis sends under a
    fifth of the bytes (every socket gets its messages either way)."""
    sent: dict[str, int] = {}
    payload = "x" * 100
    for mode in ("pattern", "channels"):
        nodes = [await run_service(redis=own_redis.url, subscribe=mode, api="none") for _ in range(10)]
        for svc in nodes:
            await wait_for(svc.broker.is_connected)
        sockets = [[await connect(svc.ws_port, f"/ch/{n * 10 + c}") for c in range(10)]
                   for n, svc in enumerate(nodes)]
        if mode == "channels":
            await wait_for(lambda: len(redis_channels(own_redis, "sock-drawer")) == 200)

        def publish() -> int:
            with own_redis.client() as r:
                before = int(r.info("stats")["total_net_output_bytes"])
                with r.pipeline(transaction=False) as pipe:
                    for i in range(1000):
                        pipe.publish(f"sock-drawer/ch/{i % 100}", payload)
                    pipe.execute()
                return before

        before = await deferToThread(publish)
        for per_node in sockets:
            for ws in per_node:
                for _ in range(10):
                    assert (await ws.next_text()) == payload
        with own_redis.client() as r:
            sent[mode] = int(r.info("stats")["total_net_output_bytes"]) - before
        received = [svc.broker.messages for svc in nodes]
        assert received == ([1000] * 10 if mode == "pattern" else [100] * 10), (mode, received)
        for per_node in sockets:
            for ws in per_node:
                ws.abort()
        for svc in nodes:
            await svc.stopService()
    print(f"\nRedis bytes out for 1000 x 100 B messages to 10 nodes: pattern {sent['pattern']}, "
          f"channels {sent['channels']} ({sent['channels'] / sent['pattern']:.2f}x)")
    assert sent["channels"] < sent["pattern"] / 5


def test_twistd_node_subscribes_by_channel(tmp_path: Any, redis_server: Any) -> None:
    """``twistd sockdrawer --subscribe channels`` logs its subscription, subscribes a websockets client's channel
    and no pattern, and delivers what is published there."""
    from childnode import ChildNode
    from websockets.sync.client import connect as ws_connect

    from sockdrawer import Client

    with ChildNode(tmp_path, ["--redis", redis_server.url, "--name", "bychannel", "--subscribe", "channels"]) as node:
        assert "subscribed to 0 channel(s) of 'bychannel'" in node.log_text()
        with ws_connect(node.url("/news"), open_timeout=5) as ws:
            node.wait_sockets(1)
            deadline = time.monotonic() + 10
            while numsub(redis_server, "bychannel/news") != [1]:
                assert time.monotonic() < deadline, "never subscribed to bychannel/news"
                time.sleep(0.02)
            assert redis_server.numpat() == 0
            publisher = Client(redis_server.url, name="bychannel")
            assert publisher.pub("hello", "news") == 1
            assert publisher.pub("nobody", "elsewhere") == 0
            assert ws.recv(timeout=5) == "hello"
        node.assert_no_traceback()


@pytest_twisted.ensureDeferred
async def test_v1_history_is_read_once_the_channel_is_subscribed(redis_server: Any, run_service: Any) -> None:
    """With --subscribe channels and history, a sockdrawer.v1 subscription to a channel new to the node reads
    the channel's history only once Redis confirmed the node's SUBSCRIBE to it (read earlier, a message
    published in between would be in neither the history read nor the live messages); then it is live."""
    svc = await run_service(redis=redis_server.url, name="resume", subscribe="channels", history_size=10)
    await wait_for(svc.broker.is_connected)
    link = svc.broker
    reads: list[tuple[bytes, int, bool]] = []
    replay = link.replay

    def recording_replay(key: bytes, since: str | None, limit: int) -> Any:
        held = link.subscriber.subscribed >= set(names(key, name=b"resume"))
        reads.append((key, link.unconfirmed(), held))
        return replay(key, since, limit)

    link.replay = recording_replay
    client = await connect(svc.ws_port, "/", subprotocols=["sockdrawer.v1"])
    client.send_json({"op": "subscribe", "channel": "news"})
    reply = await client.next_json()
    assert reply["op"] == "subscribed" and reply["channel"] == "news"
    assert reads == [(b"news", 0, True)]
    await svc.publish("live", "news")
    assert (await client.next_json())["data"] == "live"
