"""Unit tests for the Redis side: RESP bytes in, hub calls out; URL parsing."""

from __future__ import annotations

import pytest
import pytest_twisted
import txredisapi
from conftest import RedisServer, free_port, wait_for
from twisted.internet import reactor
from twisted.internet.testing import StringTransport

from sockdrawer.brokers.subscriber import HIREDIS, RedisSubscriberProtocol
from sockdrawer.brokers.url import RedisURL
from sockdrawer.core.channels import Namespace
from sockdrawer.core.hub import MemoryChannelHub
from sockdrawer.testing import RecordingSink


def bulk(*parts: bytes) -> bytes:
    out = b"*%d\r\n" % len(parts)
    for p in parts:
        out += b"$%d\r\n%s\r\n" % (len(p), p)
    return out


def pmessage(channel: bytes, payload: bytes, pattern: bytes = b"sock-drawer/*") -> bytes:
    return bulk(b"pmessage", pattern, channel, payload)


def connected_protocol(max_message_size: int = 0, name: str = "sock-drawer") -> tuple[
        RedisSubscriberProtocol, StringTransport, MemoryChannelHub]:
    hub = MemoryChannelHub()
    p = RedisSubscriberProtocol(charset=None, convertNumbers=False)
    p.hub = hub
    p.namespace = Namespace(name)
    p.max_message_size = max_message_size
    transport = StringTransport()
    p.makeConnection(transport)
    return p, transport, hub


def test_hiredis_is_used() -> None:
    """txredisapi parses with hiredis (a dependency), not its slow pure-Python parser."""
    assert HIREDIS


def test_psubscribes_to_namespace_on_connect() -> None:
    """On connect the protocol sends exactly one PSUBSCRIBE, for '<name>/*' and (messages with history)
    '<name>#/*'."""
    _, transport, _ = connected_protocol(name="my-app")
    assert transport.value() == bulk(b"PSUBSCRIBE", b"my-app/*", b"my-app#/*")


def test_history_messages_carry_their_offset() -> None:
    """A pmessage on '<name>#/news' with payload '<offset>\\n<message>' reaches the hub as the message with its
    offset; a raw one has no offset."""
    from sockdrawer.core.interfaces import Batch

    p, _, hub = connected_protocol()
    got: list[tuple[bytes, list[bytes], list[str | None] | None]] = []

    class Sink:
        receivers = 1

        def receive(self, batch: Batch) -> None:
            got.append((batch.key, list(batch.messages), batch.offsets))

    hub.subscribe(b"news", Sink())
    p.dataReceived(b"*3\r\n$10\r\npsubscribe\r\n$13\r\nsock-drawer/*\r\n:1\r\n")
    p.dataReceived(pmessage(b"sock-drawer#/news", b"e1:5-0\nhello\nworld") + pmessage(b"sock-drawer/news", b"raw"))
    assert got == [(b"news", [b"hello\nworld", b"raw"], ["e1:5-0", None])]


def test_pmessage_goes_to_hub_as_bytes() -> None:
    """A pmessage on '<name>/news' reaches the hub's 'news' sinks with its payload bytes unchanged."""
    p, _, hub = connected_protocol()
    sink = RecordingSink()
    hub.subscribe(b"news", sink)
    p.dataReceived(b"*3\r\n$10\r\npsubscribe\r\n$13\r\nsock-drawer/*\r\n:1\r\n")
    for payload in (b"hello", b"123", b"1.5", b"\xff\xfe\x00", b""):
        p.dataReceived(pmessage(b"sock-drawer/news", payload))
    assert sink.messages == [b"hello", b"123", b"1.5", b"\xff\xfe\x00", b""]
    assert all(type(m) is bytes for m in sink.messages)


def test_root_and_nested_channels() -> None:
    """Redis channel '<name>/' is the root key b'' and '<name>/rooms/42' is b'rooms/42'."""
    p, _, hub = connected_protocol()
    root, room = RecordingSink(), RecordingSink()
    hub.subscribe(b"", root)
    hub.subscribe(b"rooms/42", room)
    p.dataReceived(pmessage(b"sock-drawer/", b"r") + pmessage(b"sock-drawer/rooms/42", b"x"))
    assert root.messages == [b"r"] and room.messages == [b"x"]


def test_one_read_is_one_batch() -> None:
    """All messages parsed from one read reach a sink as one batch, in order."""
    p, _, hub = connected_protocol()
    news, sport = RecordingSink(), RecordingSink()
    hub.subscribe(b"news", news)
    hub.subscribe(b"sport", sport)
    p.dataReceived(
        pmessage(b"sock-drawer/news", b"1")
        + pmessage(b"sock-drawer/sport", b"a")
        + pmessage(b"sock-drawer/news", b"2")
    )
    assert news.batches == [(b"news", [b"1", b"2"])]
    assert sport.batches == [(b"sport", [b"a"])]


def test_message_split_across_reads() -> None:
    """A message split over two reads is delivered once, whole, after the second read."""
    p, _, hub = connected_protocol()
    sink = RecordingSink()
    hub.subscribe(b"news", sink)
    data = pmessage(b"sock-drawer/news", b"x" * 1000)
    p.dataReceived(data[:500])
    assert sink.messages == []
    p.dataReceived(data[500:])
    assert sink.messages == [b"x" * 1000]


def test_oversized_message_dropped() -> None:
    """A message over max_message_size is dropped (and logged); later ones still arrive."""
    p, _, hub = connected_protocol(max_message_size=10)
    sink = RecordingSink()
    hub.subscribe(b"news", sink)
    p.dataReceived(pmessage(b"sock-drawer/news", b"x" * 11) + pmessage(b"sock-drawer/news", b"ok"))
    assert sink.messages == [b"ok"]


def test_hub_released_when_parsing_fails() -> None:
    """Even if parsing raises, the hub is not left held: the next message is delivered."""
    p, _, hub = connected_protocol()
    sink = RecordingSink()
    hub.subscribe(b"news", sink)
    with pytest.raises(txredisapi.InvalidData):
        p.dataReceived(b"*1\r\n$x\r\n")
    hub.deliver(b"news", b"after")
    assert sink.messages == [b"after"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost", RedisURL("redis", "localhost", 6379)),
        ("redis://127.0.0.1:7000/3", RedisURL("redis", "127.0.0.1", 7000, db=3)),
        ("redis://:s%40cret@h:1/0", RedisURL("redis", "h", 1, password="s@cret")),
        ("redis://user:pw@h", RedisURL("redis", "h", 6379, username="user", password="pw")),
        ("rediss://h:6380?ssl_ca_certs=/ca.pem", RedisURL("rediss", "h", 6380, ssl_ca_certs="/ca.pem")),
        ("unix:///run/redis.sock?db=2&password=pw",
         RedisURL("unix", "", 0, path="/run/redis.sock", db=2, password="pw")),
    ],
)
def test_redis_url_parsing(url: str, expected: RedisURL) -> None:
    """redis://, rediss:// and unix:// URLs parse into host, port, db, credentials and CA file."""
    assert RedisURL.parse(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://h", "Redis URL must start with"),
        ("redis://", "Redis URL has no host"),
        ("redis://h:notaport", "bad Redis URL"),
        ("redis://h/x", "Redis database number must be a non-negative integer"),
        ("redis://h/X", "Redis database number must be a non-negative integer"),
        ("unix://", "unix:// Redis URL needs a socket path"),
        ("redis://h?ssl_ca_certs=/x", "ssl_ca_certs is only for rediss:// URLs"),
    ],
)
def test_bad_redis_urls(url: str, reason: str) -> None:
    """A bad Redis URL raises ValueError with a one-line reason."""
    with pytest.raises(ValueError) as e:
        RedisURL.parse(url)
    assert str(e.value).startswith(reason)
    assert "\n" not in str(e.value)


def test_redis_url_str_hides_password() -> None:
    """The URL as logged carries no password."""
    assert "pw" not in str(RedisURL.parse("redis://user:pw@h:1/2"))
    assert str(RedisURL.parse("redis://user:pw@h:1/2")) == "redis://h:1/2"


def test_other_replies_still_reach_txredisapi() -> None:
    """Replies other than pmessages (PSUBSCRIBE confirmation, PING's pong) go through txredisapi as usual."""
    p, transport, _ = connected_protocol()
    p.dataReceived(b"*3\r\n$10\r\npsubscribe\r\n$13\r\nsock-drawer/*\r\n:1\r\n")
    transport.clear()
    replies: list[object] = []
    p.ping().addCallback(replies.append)
    assert transport.value() == bulk(b"PING")
    p.dataReceived(bulk(b"pong", b""))
    assert replies == [[b"pong", b""]]


def test_pure_python_parser_path() -> None:
    """messageReceived (txredisapi's way in when it parses without hiredis) applies the same keys, limits and
    payloads as the hiredis path."""
    p, _, hub = connected_protocol(max_message_size=5)
    sink = RecordingSink()
    hub.subscribe(b"news", sink)
    p.messageReceived(b"sock-drawer/*", b"sock-drawer/news", b"hello")
    p.messageReceived(b"sock-drawer/*", b"sock-drawer/news", b"too long")
    p.messageReceived(b"sock-drawer/*", b"other/news", b"elsewhere")
    assert sink.messages == [b"hello"]


def test_both_parsers_count_and_log_what_they_drop() -> None:
    """Both ways in (hiredis and txredisapi's own parser) count each delivered message once on the link, and the
    warning for a dropped message names its channel and size."""
    from twisted.logger import globalLogPublisher

    from sockdrawer.brokers.redis import RedisLink

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        p, _, hub = connected_protocol(max_message_size=5)
        p.link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), hub, ping_interval=0, reactor=reactor)
        hub.subscribe(b"news", RecordingSink())
        p.messageReceived(b"sock-drawer/*", b"sock-drawer/news", b"hello")
        assert p.link.messages == 1
        p.messageReceived(b"sock-drawer/*", b"sock-drawer/news", b"hello")
        assert p.link.messages == 2
        p.dataReceived(pmessage(b"sock-drawer/news", b"one") + pmessage(b"sock-drawer/news", b"two"))
        assert p.link.messages == 4
        p.messageReceived(b"sock-drawer/*", b"sock-drawer/news", b"too long")
        p.dataReceived(pmessage(b"sock-drawer/sport", b"longer still"))
        assert p.link.messages == 4
    finally:
        globalLogPublisher.removeObserver(events.append)
    dropped = [(e["channel"], e["size"], e["limit"]) for e in events if "dropped a" in str(e.get("log_format"))]
    assert dropped == [("news", 8, 5), ("sport", 12, 5)]  # text: the log line shows 'news', not b'news'


def test_link_lost_while_behind_explains_itself() -> None:
    """When the link drops during a run of full reads, the log says Redis probably cut the node off."""
    from twisted.logger import globalLogPublisher
    from twisted.python.failure import Failure

    from sockdrawer.brokers.redis import RedisLink

    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        hub = MemoryChannelHub()
        link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), hub, ping_interval=0, reactor=reactor)
        link.running = True
        p, _, _ = connected_protocol()
        p.link = link
        link._subscribed(p)
        chunk = pmessage(b"sock-drawer/x", b"y" * 65536)
        for _ in range(10):
            p.dataReceived(chunk)
        assert p.full_reads == 10
        p.connectionLost(Failure(ConnectionError("closed")))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any("client-output-buffer-limit" in str(e.get("log_format")) for e in events)
    assert not link.is_connected()


def test_failed_psubscribe_drops_the_connection() -> None:
    """A refused PSUBSCRIBE drops the connection, so the link reconnects and tries again."""
    from twisted.python.failure import Failure

    p, transport, _ = connected_protocol()
    p._subscribe_failed(Failure(txredisapi.ResponseError("NOPERM")))
    assert transport.disconnecting


def test_reconnects_count_each_new_subscription_after_the_first() -> None:
    """The first subscription is not a reconnect; each one after it is."""
    from sockdrawer.brokers.redis import RedisLink

    link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), MemoryChannelHub(), ping_interval=0,
                     reactor=reactor)
    for _ in range(3):
        p, _, _ = connected_protocol()
        link._subscribed(p)
    assert link.reconnects == 2 and link.is_connected()


@pytest_twisted.ensureDeferred
async def test_link_stop_waits_for_its_connections() -> None:
    """stopService returns a Deferred (what twistd waits on) that fires once both connections are stopped."""
    from twisted.internet.defer import Deferred

    from sockdrawer.brokers.redis import RedisLink

    link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), MemoryChannelHub(), ping_interval=0.05,
                     timeout=0.5, reactor=reactor)
    link.startService()
    d = link.stopService()
    assert isinstance(d, Deferred)
    await d
    assert not link.running and not link._ping.running


def test_endpoints_for_each_scheme() -> None:
    """unix:// connects to its socket path, redis:// over TCP, rediss:// over TLS; each with the given connect
    timeout (5 s by default)."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

    unix = RedisURL.parse("unix:///run/redis.sock").endpoint(reactor, 3)
    assert isinstance(unix, UNIXClientEndpoint) and (unix._path, unix._timeout) == ("/run/redis.sock", 3)
    assert unix._reactor is reactor
    tcp = RedisURL.parse("redis://h:1").endpoint(reactor)
    assert isinstance(tcp, HostnameEndpoint) and tcp._timeout == 5.0
    tls = RedisURL.parse("rediss://h:1").endpoint(reactor, 2)
    assert not isinstance(tls, HostnameEndpoint) and tls._wrappedEndpoint._timeout == 2


def test_refused_psubscribe_reply_drops_the_connection() -> None:
    """An error reply to PSUBSCRIBE (an ACL without pattern subscriptions) drops the connection to retry."""
    p, transport, _ = connected_protocol()
    p.dataReceived(b"-NOPERM this user has no permissions to access one of the channels\r\n")
    assert transport.disconnecting


def test_full_reads_are_counted_in_a_row() -> None:
    """A read of at least 60 KiB counts as full; a shorter one ends the run; the fan-out latency is recorded per
    read, in seconds."""
    from sockdrawer.brokers.redis import RedisLink
    from sockdrawer.brokers.subscriber import _FULL_READ

    p, _, hub = connected_protocol()
    p.link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), hub, ping_interval=0, reactor=reactor)
    size = _FULL_READ - len(pmessage(b"sock-drawer/x", b""))
    while len(pmessage(b"sock-drawer/x", b"y" * size)) > _FULL_READ:
        size -= 1
    exact = pmessage(b"sock-drawer/x", b"y" * size)
    assert len(exact) == _FULL_READ
    p.dataReceived(exact)
    p.dataReceived(exact)
    assert p.full_reads == 2
    p.dataReceived(pmessage(b"sock-drawer/x", b"short"))
    assert p.full_reads == 0
    p.dataReceived(exact)
    assert p.full_reads == 1
    latency = p.link.fanout_latency
    assert latency.count == 4 and 0 <= latency.total < 1


def test_factories_wire_their_protocols_to_the_link() -> None:
    """The subscriber factory gives each protocol the link's hub, namespace, link and message limit; the
    publisher factory starts the publish backoff over once a connection is ready."""
    from twisted.internet.address import IPv4Address

    from sockdrawer.brokers.redis import RedisLink, _PublisherFactory, _SubscriberFactory

    hub = MemoryChannelHub()
    link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace("app"), hub, ping_interval=0,
                     max_message_size=123, reactor=reactor)
    addr = IPv4Address("TCP", "127.0.0.1", 1)
    sub = _SubscriberFactory(link).buildProtocol(addr)
    assert (sub.hub, sub.namespace, sub.link, sub.max_message_size) == (hub, link.namespace, link, 123)
    link._pub_backoff.failures = 5
    pub = _PublisherFactory(link).buildProtocol(addr)
    pub.makeConnection(StringTransport())  # no password: ready at once
    assert link._pub_backoff.failures == 0


@pytest_twisted.ensureDeferred
async def test_liveness_pings_start_one_interval_after_start() -> None:
    """The first liveness PING goes out one --redis-ping-interval after start, not at once; interval 0 sends none."""
    from sockdrawer.brokers.redis import RedisLink

    for interval, running in ((30.0, True), (0.0, False)):
        link = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), MemoryChannelHub(),
                         ping_interval=interval, reactor=reactor)
        calls: list[None] = []
        link._ping.f = lambda calls=calls: calls.append(None)
        link.startService()
        try:
            assert (link._ping.running, calls) == (running, [])
        finally:
            await link.stopService()


def test_link_settings_reach_both_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """The link's defaults, and its timeout, retry maximum, limit and password reaching the endpoint, both
    backoffs and both factories (bytes in and out, no factory noise)."""
    from twisted.internet import reactor

    from sockdrawer.brokers import redis as redislink
    from sockdrawer.brokers.linkparts import Backoff
    from sockdrawer.brokers.redis import RedisLink

    default = RedisLink(RedisURL.parse("redis://127.0.0.1:1"), Namespace(), MemoryChannelHub(), ping_interval=0,
                        reactor=reactor)
    assert (default.timeout, default._sub_backoff.maximum, default._pub_backoff.maximum) == (5.0, 30.0, 30.0)
    assert Backoff().maximum == 30.0 and Backoff().jitter == 0.25
    services: list[tuple[object, ...]] = []

    class Recorder:
        def __init__(self, endpoint: object, factory: object, retryPolicy: object, clock: object) -> None:
            services.append((endpoint, factory, retryPolicy, clock))

        def setServiceParent(self, parent: object) -> None:
            pass

    monkeypatch.setattr(redislink._private, "QuietClientService", Recorder)
    url = RedisURL.parse("redis://user:pw@127.0.0.1:1/0")
    link = RedisLink(url, Namespace(), MemoryChannelHub(), ping_interval=0, timeout=2.5, retry_max_delay=7,
                     max_message_size=99, reactor=reactor)
    assert (link.max_message_size, link.description, link._subscribed_once) == (99, "redis://127.0.0.1:1/0", False)
    assert link._clock is reactor and not link.is_connected()
    assert link._sub_backoff.maximum == link._pub_backoff.maximum == link._read_backoff.maximum == 7
    assert [s[2] for s in services] == [link._sub_backoff, link._pub_backoff, link._read_backoff]
    for endpoint, factory, _, clock in services:
        assert endpoint.endpoint._timeout == 2.5 and clock is reactor  # type: ignore[attr-defined]
        assert factory.link is link  # type: ignore[attr-defined]
        assert (factory.noisy, factory.charset, factory.convertNumbers, factory.replyTimeout,  # type: ignore
                factory.password, factory.username) == (False, None, False, 2.5, "pw", "user")  # type: ignore


# -- what the log says when Redis cannot be used --------------------------------


def _retry_lines(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if str(e.get("log_format", "")).startswith("cannot use Redis")]


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_is_said_once_per_try_and_its_return(own_redis: RedisServer) -> None:
    """With Redis unreachable at start, the link says once per failed try, in its own words, what failed and
    when the next try is, with a count that climbs (no Twisted "Scheduling retry" line, no line per
    connection); when Redis answers, one line says it works again."""
    from twisted.logger import formatEvent, globalLogPublisher

    from sockdrawer.brokers.redis import RedisLink

    port = free_port()
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    link = RedisLink(RedisURL.parse(f"redis://127.0.0.1:{port}/0"), Namespace(), MemoryChannelHub(),
                     ping_interval=0, timeout=1.0, reactor=reactor)
    link.startService()
    try:
        await wait_for(lambda: len(_retry_lines(events)) >= 3)
        lines = _retry_lines(events)
        assert [e["tries"] for e in lines] == list(range(1, len(lines) + 1))
        assert all("refused" in str(e["reason"]) and e["log_level"].name == "warn" for e in lines)  # type: ignore
        assert formatEvent(lines[1]).startswith(f"cannot use Redis at redis://127.0.0.1:{port}/0: ")
        assert "trying again in " in formatEvent(lines[1])
        assert not [e for e in events if "Scheduling retry" in str(e.get("log_format", ""))]
        own_redis.start(port)
        await wait_for(link.is_connected)
        again = [formatEvent(e) for e in events if "works again" in str(e.get("log_format", ""))]
        assert len(again) == 1 and again[0].startswith(f"Redis at redis://127.0.0.1:{port}/0 works again after ")
    finally:
        globalLogPublisher.removeObserver(events.append)
        await link.stopService()


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_said_once_per_try_with_a_climbing_count(own_redis: RedisServer) -> None:
    """A password Redis refuses: one line per failed try naming the refusal (not one per connection, not
    the same count again and again), and the backoff grows."""
    from twisted.logger import formatEvent, globalLogPublisher

    from sockdrawer.brokers.redis import RedisLink

    with own_redis.client() as r:
        r.config_set("requirepass", "right")
    events: list[dict[str, object]] = []
    globalLogPublisher.addObserver(events.append)
    link = RedisLink(RedisURL.parse(f"redis://:wrong@127.0.0.1:{own_redis.port}/0"), Namespace(),
                     MemoryChannelHub(), ping_interval=0, timeout=1.0, reactor=reactor)
    link.startService()
    try:
        await wait_for(lambda: len(_retry_lines(events)) >= 3)
        lines = _retry_lines(events)
        assert [e["tries"] for e in lines] == list(range(1, len(lines) + 1))
        assert all(str(e["reason"]).startswith("AUTH refused: WRONGPASS") for e in lines)
        assert "trying again now" in formatEvent(lines[0]) and "trying again in " in formatEvent(lines[2])
        assert not [e for e in events if "Redis link to" in str(e.get("log_format", ""))]
    finally:
        globalLogPublisher.removeObserver(events.append)
        await link.stopService()
