"""
Redis Sentinel (``--sentinel``, ``Client(sentinels=..., master=...)``): a real master, a replica and three
sentinels, all redis-server child processes on free ports; the option checks as unit tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
from conftest import INSTALL_HINT, free_port, wait_for
from twisted.internet import defer, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.python.usage import UsageError
from wsclient import connect

from sockdrawer import Client
from sockdrawer.config import Settings

V1 = ["sockdrawer.v1"]
MASTER = "mymaster"


class Node:
    """One redis-server child (a data node, or a sentinel with ``sentinel`` config lines)."""

    def __init__(self, directory: str, args: list[str], sentinel: list[str] | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary = binary
        self.dir = tempfile.mkdtemp(prefix="node-", dir=directory)
        self.args = args
        self.sentinel = sentinel
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        for _ in range(5):
            self.port = free_port()
            base = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir, "--loglevel", "warning"]
            if self.sentinel is not None:
                # a sentinel rewrites its config file: one of its own, writable
                conf = os.path.join(self.dir, "sentinel.conf")
                with open(conf, "w") as f:
                    f.write("\n".join(self.sentinel) + "\n")
                command = [self.binary, conf, "--sentinel", *base]
            else:
                command = [self.binary, *base, "--save", "", "--appendonly", "no", *self.args]
            self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                    return
                except OSError:
                    time.sleep(0.01)
            self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def client(self, password: str | None = None) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, password=password)


class SentinelSet:
    """A master, a replica and ``count`` sentinels watching it as ``mymaster`` (fast failover settings)."""

    def __init__(self, count: int = 3, password: str | None = None, sentinel_password: str | None = None,
                 master_args: tuple[str, ...] = ()) -> None:
        self.tmp = tempfile.mkdtemp(prefix="sockdrawer-sentinel-")
        auth = ["--requirepass", password, "--masterauth", password] if password else []
        # no diskless-sync delay: the replica is in sync at once (it becomes the master in a failover)
        auth += ["--repl-diskless-sync-delay", "0"]
        self.master = Node(self.tmp, [*auth, *master_args])
        self.master.start()
        self.replica = Node(self.tmp, [*auth, "--replicaof", "127.0.0.1", str(self.master.port)])
        self.replica.start()
        self.password = password
        self.sentinel_password = sentinel_password
        lines = [f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2",
                 f"sentinel down-after-milliseconds {MASTER} 1000",
                 f"sentinel failover-timeout {MASTER} 5000",
                 f"sentinel parallel-syncs {MASTER} 1"]
        if password:
            lines.append(f"sentinel auth-pass {MASTER} {password}")
        if sentinel_password:
            lines += [f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}"]
        self.sentinels = [Node(self.tmp, [], sentinel=lines) for _ in range(count)]
        for s in self.sentinels:
            s.start()

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def data_nodes(self) -> list[Node]:
        return [self.master, self.replica]

    def ask(self, command: str, *args: Any, index: int = 0) -> Any:
        with self.sentinels[index].client(self.sentinel_password) as r:
            return r.execute_command(command, *args)

    def master_port(self, index: int = 0) -> int:
        host, port = self.ask("SENTINEL", "get-master-addr-by-name", MASTER, index=index)
        return int(port)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Every sentinel knows the replica (synced) and the other sentinels: a failover can start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ready(i) for i in range(len(self.sentinels))):
                return
            time.sleep(0.05)
        raise AssertionError("the sentinels did not find the replica and each other in time")

    def _ready(self, index: int) -> bool:
        replicas = self.ask("SENTINEL", "replicas", MASTER, index=index)
        others = self.ask("SENTINEL", "sentinels", MASTER, index=index)

        def fields(entry: Any) -> dict[str, str]:
            # redis-py parses each entry into a dict of bytes
            return {k.decode(): v.decode() if isinstance(v, bytes) else v for k, v in dict(entry).items()}

        with self.replica.client(self.password) as r:
            synced = r.info("replication").get("master_link_status") == "up"
        known = [r for r in map(fields, replicas) if r.get("flags") == "slave"]
        return synced and bool(known) and len(others) == len(self.sentinels) - 1

    def stop(self) -> None:
        for node in [*self.sentinels, self.master, self.replica]:
            node.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    """A set shared by the tests that do not fail it over."""
    s = SentinelSet()
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


# -- options (unit)


@pytest.mark.parametrize(("settings", "message"), [
    ({"sentinel": ("a:1",), "sentinel_master": "m", "redis": "redis://h:1/0"},
     "--sentinel excludes --redis and --redis-cluster: give one"),
    ({"sentinel": ("a:1",), "sentinel_master": "m", "redis_cluster": ("redis://h:1",)},
     "--sentinel excludes --redis and --redis-cluster: give one"),
    ({"sentinel": ("a:1",)}, "--sentinel needs --sentinel-master NAME"),
    ({"sentinel_master": "m"}, "--sentinel-master needs --sentinel"),
    ({"sentinel_password": "pw"}, "--sentinel-password needs --sentinel"),
    ({"sentinel_master_password": "pw"}, "--sentinel-master-password needs --sentinel"),
    ({"sentinel": ("a:1",), "sentinel_master": "my master"}, "--sentinel-master must be a name without spaces"),
    ({"sentinel": ("redis://:pw@a:1",), "sentinel_master": "m"},
     "--sentinel: give the sentinels' password with --sentinel-password"),
    ({"sentinel": ("unix:///run/s.sock",), "sentinel_master": "m"}, "--sentinel: a sentinel is HOST:PORT"),
    ({"sentinel": ("a:port",), "sentinel_master": "m"}, "--sentinel: bad sentinel address 'a:port'"),
    ({"sentinel": ("a:1", "rediss://b:2"), "sentinel_master": "m"},
     "--sentinel: give every sentinel with TLS (rediss://) or none"),
    ({"sentinel": ("rediss://a:1?ssl_ca_certs=/nonexistent.pem",), "sentinel_master": "m"},
     "--sentinel: cannot read ssl_ca_certs file /nonexistent.pem"),
    ({"sentinel": ("a:1",), "sentinel_master": "m", "workers": 2, "port": "tcp:0"}, None),
])
def test_options_are_checked(settings: dict[str, Any], message: str | None) -> None:
    """--sentinel excludes --redis and --redis-cluster, needs --sentinel-master, takes no password in its
    addresses, and is all TLS or none; the other Sentinel options need --sentinel; --workers accepts it."""
    if message is None:
        Settings(**settings).validate()
        return
    with pytest.raises(ValueError) as e:
        Settings(**settings).validate()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_addresses_and_the_command_line() -> None:
    """HOST:PORT (26379 when left out) and redis(s):// forms; repeatable on the command line and in the
    environment (comma-separated); a conflict is a one-line usage error."""
    from sockdrawer.brokers.sentinel import SentinelMaster
    from sockdrawer.brokers.sentinelwire import parse_sentinel
    from sockdrawer.node.tap import Options

    assert (parse_sentinel("10.0.0.1:26380").host, parse_sentinel("10.0.0.1:26380").port) == ("10.0.0.1", 26380)
    assert parse_sentinel("s1.example").port == 26379
    tls = parse_sentinel("rediss://s1.example?ssl_ca_certs=/ca.pem")
    assert (tls.scheme, tls.port, tls.ssl_ca_certs) == ("rediss", 26379, "/ca.pem")
    options = Options()
    options.environ = {}
    options.parseOptions(["--sentinel", "10.0.0.1:26379", "--sentinel", "10.0.0.2", "--sentinel-master", "m"])
    s = options.settings
    assert (s.sentinel, s.sentinel_master) == (("10.0.0.1:26379", "10.0.0.2"), "m")
    assert s.sentinel_master is not None
    master = SentinelMaster.from_options(s.sentinel, s.sentinel_master, password=s.sentinel_master_password,
                                         sentinel_password=s.sentinel_password)
    assert str(master) == "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/m"
    options = Options()
    options.environ = {"SOCKDRAWER_SENTINEL": "a:1, b:2", "SOCKDRAWER_SENTINEL_MASTER": "m",
                       "SOCKDRAWER_SENTINEL_PASSWORD": "pw"}
    options.parseOptions([])
    assert (options.settings.sentinel, options.settings.sentinel_password) == (("a:1", "b:2"), "pw")
    options = Options()
    options.environ = {}
    with pytest.raises(UsageError, match="^--sentinel excludes --redis and --redis-cluster: give one$"):
        options.parseOptions(["--sentinel", "a:1", "--sentinel-master", "m", "--redis", "redis://h:1/0"])


def test_client_arguments() -> None:
    """Client(sentinels=..., master=...) excludes url, redis and cluster, needs master, and connects lazily."""
    with pytest.raises(ValueError, match="give one of url, redis, cluster and sentinels"):
        Client("redis://h:1/0", sentinels=["a:1"], master="m")
    with pytest.raises(ValueError, match="give one of url, redis, cluster and sentinels"):
        Client(cluster=["redis://h:1"], sentinels=["a:1"], master="m")
    with pytest.raises(ValueError, match="sentinels need master="):
        Client(sentinels=["a:1"])
    with pytest.raises(ValueError, match="sentinels must be a list"):
        Client(sentinels="a:1", master="m")
    with pytest.raises(ValueError, match="TLS"):
        Client(sentinels=["a:1", "rediss://b:2"], master="m")
    client = Client(sentinels=[("127.0.0.1", free_port()), "127.0.0.1"], master="m", timeout=0.5, retry_for=0)
    from sockdrawer.client import PublishError

    with pytest.raises(PublishError, match="Sentinel master 'm'"):
        client.pub("nobody there", "x")
    client.close()


# -- the endpoint (integration)


class _Hello(protocol.Protocol):
    def connectionMade(self) -> None:
        self.factory.made.append(self)  # type: ignore[attr-defined]


class _FakeSentinel(protocol.Protocol):
    """Answers every command, whatever it is, with the address in its factory."""

    def dataReceived(self, data: bytes) -> None:
        host, port = self.factory.address  # type: ignore[attr-defined]
        port_text = str(port).encode()
        self.transport.write(b"*2\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(host), host, len(port_text), port_text))


@pytest_twisted.ensureDeferred
async def test_the_endpoint_connects_to_the_master_and_refuses_a_replica(sentinels: SentinelSet) -> None:
    """connect() asks the sentinels in turn (a dead one is skipped), connects to the master they name and hands
    the connection over once ROLE says master; a server that says it is a replica fails the attempt, and so does
    a name no sentinel knows."""
    from sockdrawer.brokers.sentinel import SentinelMaster
    from sockdrawer.brokers.sentinelwire import NotMaster, SentinelError
    from sockdrawer.brokers.url import RedisURL

    dead = RedisURL("redis", "127.0.0.1", free_port())
    urls = [dead] + [RedisURL("redis", "127.0.0.1", s.port) for s in sentinels.sentinels]
    master = SentinelMaster(urls, MASTER)
    factory = protocol.Factory.forProtocol(_Hello)
    factory.made = []  # type: ignore[attr-defined]
    proto = await master.endpoint(reactor, 2.0).connect(factory)
    assert factory.made == [proto]  # type: ignore[attr-defined]
    assert proto.transport.getPeer().port == sentinels.master.port
    assert master.address == ("127.0.0.1", sentinels.master.port)
    assert master.sentinels[0] is urls[1]  # the sentinel that answered is asked first next time
    assert len(master.connections) == 1
    proto.transport.loseConnection()
    await wait_for(lambda: not master.connections)

    fake = protocol.Factory.forProtocol(_FakeSentinel)
    fake.address = (b"127.0.0.1", sentinels.replica.port)  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, fake, interface="127.0.0.1")
    try:
        lying = SentinelMaster([RedisURL("redis", "127.0.0.1", port.getHost().port)], MASTER)
        with pytest.raises(NotMaster, match=f"127.0.0.1:{sentinels.replica.port} is a slave"):
            await lying.endpoint(reactor, 2.0).connect(factory)
        assert factory.made == [proto] and not lying.connections  # type: ignore[attr-defined]
    finally:
        await port.stopListening()
    unknown = SentinelMaster(urls[1:], "nobody")
    with pytest.raises(SentinelError, match="no sentinel named a master 'nobody'"):
        await unknown.endpoint(reactor, 2.0).connect(factory)


@pytest_twisted.ensureDeferred
async def test_passwords_of_the_sentinels_and_the_master(run_service: Any) -> None:
    """With requirepass on the sentinel and on the data nodes, --sentinel-password and
    --sentinel-master-password get the node subscribed, and Client's sentinel_password and master_password
    publish."""
    s = await deferToThread(SentinelSet, 1, "datapw", "sentinelpw")
    try:
        svc = await run_service(sentinel=tuple(s.addresses), sentinel_master=MASTER, sentinel_password="sentinelpw",
                                sentinel_master_password="datapw", name="pw", redis_retry_max=0.5)
        await wait_for(svc.broker.is_connected)
        raw = await connect(svc.ws_port, "/news")

        def publish() -> Any:
            with Client(sentinels=s.addresses, master=MASTER, sentinel_password="sentinelpw",
                        master_password="datapw", name="pw") as client:
                return client.pub("through the sentinel", "news")

        await deferToThread(publish)
        assert await raw.next_text() == "through the sentinel"
        raw.abort()
    finally:
        await deferToThread(s.stop)


@pytest_twisted.ensureDeferred
async def test_ready_is_503_until_the_sentinels_name_a_master(sentinels: SentinelSet, own_redis: Any,
                                                              run_service: Any) -> None:
    """While no sentinel names a master for --sentinel-master, the node has no Redis link and /ready answers
    503; once they do (SENTINEL MONITOR), it connects, subscribes, and /ready answers 200."""
    svc = await run_service(sentinel=tuple(sentinels.addresses), sentinel_master="later", redis_retry_max=0.5)
    assert not svc.broker.is_connected()
    assert await deferToThread(http_status, svc.api_port, "/ready") == 503
    try:
        for i in range(len(sentinels.sentinels)):
            sentinels.ask("SENTINEL", "MONITOR", "later", "127.0.0.1", own_redis.port, 2, index=i)
        await wait_for(svc.broker.is_connected, timeout=10)
        assert await deferToThread(http_status, svc.api_port, "/ready") == 200
        await wait_for(lambda: own_redis.numpat() >= 1)
    finally:
        for i in range(len(sentinels.sentinels)):
            sentinels.ask("SENTINEL", "REMOVE", "later", index=i)


# -- failover


@pytest.fixture
def failing_over() -> Iterator[SentinelSet]:
    """
    A set of the test's own, which it fails over.  Its master refuses writes without a replica in sync
    (min-replicas-to-write 1): after the promotion, until Sentinel turns it into a replica (8 to 20 s later),
    it would otherwise take writes, and they would be lost (docs/operations.rst).  The replica, which has
    no replica of its own once promoted, takes writes without one.
    """
    s = SentinelSet(master_args=("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"))
    try:
        s.wait_ready()
        yield s
    finally:
        s.stop()


@pytest.mark.timeout(60)
@pytest_twisted.ensureDeferred
async def test_node_follows_a_failover_and_v1_misses_nothing(failing_over: SentinelSet, run_service: Any) -> None:
    """SENTINEL FAILOVER while a Client(sentinels=..., master=...) publishes 300 messages with history: the node
    sees +switch-master, drops its connections to the old master, reconnects to the new one (/ready 200 again),
    and a v1 socket gets every message whose pub() returned exactly once, in order, without a reset."""
    s = failing_over
    old_port = s.master.port
    svc = await run_service(sentinel=tuple(s.addresses), sentinel_master=MASTER, name="fo", history_size=1000,
                            redis_retry_max=0.5)
    await wait_for(svc.broker.is_connected)
    link = svc.broker
    watcher = next(c for c in link if type(c).__name__ == "SwitchWatcher")
    lost: list[bool] = []
    original_lost = svc.hub.broker_lost

    def counting_lost() -> None:
        lost.append(svc.ready()[0])
        original_lost()

    svc.hub.broker_lost = counting_lost
    await wait_for(lambda: watcher.watching is not None)
    assert await deferToThread(http_status, svc.api_port, "/ready") == 200
    # the sentinel it watches dies: it watches the next one
    watched = watcher.watching.sentinel.port
    killed = next(i for i, node in enumerate(s.sentinels) if node.port == watched)
    s.sentinels[killed].stop()
    await wait_for(lambda: watcher.watching is not None and watcher.watching.sentinel.port != watched)
    alive = next(i for i in range(len(s.sentinels)) if i != killed)
    client = await connect(svc.ws_port, "/", subprotocols=V1)
    client.send_json({"op": "subscribe", "channel": "f"})
    assert (await client.next_json())["op"] == "subscribed"

    from sockdrawer.client import PublishError

    published: list[str] = []
    failed: list[str] = []
    errors: list[str] = []
    failover_at = threading.Event()

    def publish() -> None:
        with Client(sentinels=s.addresses, master=MASTER, name="fo", timeout=2) as publisher:
            for i in range(300):
                if i == 100:
                    failover_at.set()
                try:
                    publisher.pub(f"m{i}", "f")
                except PublishError as e:
                    failed.append(f"m{i}")
                    errors.append(str(e))
                    continue
                published.append(f"m{i}")
                time.sleep(0.01)  # pacing: the 300 span the failover

    publishing = deferToThread(publish)
    await wait_for(failover_at.is_set, timeout=20)
    started = time.monotonic()
    s.ask("SENTINEL", "FAILOVER", MASTER, index=alive)
    await wait_for(lambda: watcher.switches >= 1, timeout=20)
    switched = time.monotonic() - started
    await wait_for(lambda: link.is_connected() and link.reconnects >= 1, timeout=20)
    resubscribed = time.monotonic() - started
    assert s.master_port(alive) == s.replica.port != old_port
    assert await deferToThread(http_status, svc.api_port, "/ready") == 200
    await publishing

    def publish_after() -> None:
        # a publisher that starts now asks the sentinels and finds the new master
        with Client(sentinels=s.addresses, master=MASTER, name="fo", timeout=2) as publisher:
            for i in range(300, 305):
                publisher.pub(f"m{i}", "f")
                published.append(f"m{i}")

    await deferToThread(publish_after)
    print(f"\n+switch-master seen {switched:.2f} s after SENTINEL FAILOVER; subscribed on the new master after "
          f"{resubscribed:.2f} s; {len(published)} pub() returned, {len(failed)} raised: {errors[:3]}")

    got: list[str] = []
    ops: list[str] = []

    @defer.inlineCallbacks
    def drain() -> Any:
        while not set(published) <= set(got):
            message = yield client.next_json(timeout=10)
            ops.append(message["op"])
            if message["op"] != "message":
                print(f"\nv1: {message}")
            if message["op"] == "message":
                got.append(message["data"])
        return True

    try:
        await drain()
    except Exception:
        pass
    missing = [m for m in published if m not in got]
    from sockdrawer.core.history import redis_keys

    with s.replica.client() as r:
        held = [fields[b"d"].decode() for _, fields in r.xrange(redis_keys("fo", b"f")[0])]
    lost_by_replication = [m for m in got if m not in held]
    print(f"new master's history: {len(held)} entries; the socket got {lost_by_replication} that it lacks")
    print(f"socket got {len(got)}; missing {len(missing)}: {missing[:10]}; ops other than message: "
          f"{[op for op in ops if op != 'message']}")
    # No reset, unless the old master acknowledged (and published to the node) a message after the replica's
    # promotion, which the new master's history never got: Redis' asynchronous replication loses it (a few ms
    # window; about one run in six here), history cannot cover the socket's position, and reset is the right
    # answer (docs/operations.rst, Redis Sentinel).
    if lost_by_replication:
        assert [op for op in ops if op != "message"] in ([], ["reset", "subscribed"])
    else:
        assert [op for op in ops if op != "message"] == []
    assert len(got) == len(set(got))  # exactly once
    assert got == sorted(got, key=lambda m: int(m[1:]))  # in order
    assert missing == []  # every message whose pub() returned
    assert lost == [False]  # the link lost its subscription once, and /ready said 503 then
    client.abort()
