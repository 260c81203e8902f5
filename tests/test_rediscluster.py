"""
Redis Cluster (``--redis-cluster``): sharded pub/sub on a real local cluster.

The module's fixture starts six ``redis-server --cluster-enabled yes``
processes (three masters, three replicas) and joins them with ``redis-cli
--cluster create``, once for the module.  Unit tests drive the shard
subscriber protocol with a StringTransport and a fake reactor; the
integration tests use the cluster and real WebSocket clients (``websockets``
with its default settings, and the tests' own ``wsclient``, also built on
``websockets``).
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import redis as redis_py
from childnode import ChildNode
from conftest import INSTALL_HINT, commands, free_port, wait_for
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from websockets.sync.client import connect as ws_connect
from wsclient import connect
from zope.interface.verify import verifyObject

from sockdrawer import Client, Source, Subscriber, on
from sockdrawer.brokers import slots as _slots
from sockdrawer.brokers.cluster import ClusterLink, ShardSubscriberProtocol, _ShardSubscriberFactory
from sockdrawer.brokers.shards import parse_slots
from sockdrawer.brokers.url import RedisURL
from sockdrawer.core.channels import Namespace
from sockdrawer.core.hub import MemoryChannelHub
from sockdrawer.core.interfaces import IBroker, IChannelObserver
from sockdrawer.core.presence import events_channel
from sockdrawer.testing import RecordingSink

# -- the cluster


class _PortTaken(Exception):
    """A cluster node exited at once: its port or bus port was taken."""


class LocalCluster:
    """Six redis-server processes in cluster mode on free ports: three masters, one replica each."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None or shutil.which("redis-cli") is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="sockdrawer-cluster-"))
        self.ports: list[int] = []
        self.bus: dict[int, int] = {}
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        while len(self.ports) < 6:
            port, bus = free_port(), free_port()
            if port == bus or port in self.ports or port in self.bus.values() or bus in self.ports:
                continue
            self.bus[port] = bus
            try:
                self.start_node(port)
            except _PortTaken:  # another process took the port or its bus port meanwhile: other ports
                del self.bus[port]
                continue
            self.ports.append(port)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.wait_healthy()

    def start_node(self, port: int) -> None:
        """Start (or restart, with its nodes.conf) the node on ``port``; return once it accepts connections."""
        node_dir = self.dir / str(port)
        node_dir.mkdir(exist_ok=True)
        self.procs[port] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-port", str(self.bus[port]), "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", "1000", "--appendonly", "no", "--save", "", "--dir", str(node_dir),
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.procs[port].poll() is not None:  # it exited: it could not bind
                raise _PortTaken(port)
            return self._accepts(port)

        self._until(up, f"redis-server on {port} did not start")

    def _accepts(self, port: int) -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            return False

    @staticmethod
    def _until(predicate: Any, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(what)
            time.sleep(0.02)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node reports cluster_state:ok, agrees on the masters, and every replica is in sync."""
        def healthy() -> bool:
            try:
                views = set()
                for port in self.live():
                    with self.client(port) as r:
                        if b"cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
                            return False
                        info = r.info("replication")
                        if info["role"] == "slave" and info.get("master_link_status") != "up":
                            return False
                        views.add(tuple(sorted(self._masters(r))))
                return len(views) == 1
            except (redis_py.RedisError, OSError):
                return False

        self._until(healthy, "the cluster did not become healthy", timeout)

    def live(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def client(self, port: int) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    @staticmethod
    def _masters(r: redis_py.Redis) -> list[tuple[int, int, int]]:
        return [(int(e[0]), int(e[1]), int(e[2][1])) for e in r.execute_command("CLUSTER", "SLOTS")]

    def masters(self) -> list[int]:
        """The master ports, by slot range."""
        with self.client(self.live()[0]) as r:
            return [port for _, _, port in sorted(self._masters(r))]

    def owner(self, name: str | bytes) -> int:
        """The port of the master that owns ``name``'s slot."""
        slot = _slots.slot(name.encode() if isinstance(name, str) else name)
        with self.client(self.live()[0]) as r:
            for first, last, port in self._masters(r):
                if first <= slot <= last:
                    return port
        raise AssertionError(f"slot {slot} is not covered")

    def replica_of(self, master: int) -> int:
        with self.client(master) as r:
            replicas = r.info("replication")
        return int(replicas["slave0"]["port"])

    def channel_per_master(self, namespace: str, prefix: str) -> dict[int, str]:
        """``{master port: channel}``: a channel ``<prefix><n>`` whose Redis channel each master owns."""
        found: dict[int, str] = {}
        masters = self.masters()
        n = 0
        while len(found) < len(masters):
            channel = f"{prefix}{n}"
            owner = self.owner(f"{namespace}/{channel}")
            found.setdefault(owner, channel)
            n += 1
        return found

    def shard_channels(self, port: int) -> list[bytes]:
        """The shard channels subscribed on a master, sorted (not the nodes' control key)."""
        with self.client(port) as r:
            return sorted(c for c in r.execute_command("PUBSUB", "SHARDCHANNELS") if not c.endswith(b"//control"))

    def spublish(self, channel: str, message: str) -> int:
        with self.client(self.owner(channel)) as r:
            return int(r.execute_command("SPUBLISH", channel, message))

    @property
    def seeds(self) -> list[str]:
        return [f"redis://127.0.0.1:{p}" for p in self.ports[:2]]

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A three-master, three-replica Redis Cluster for this module's tests."""
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


def cluster_args(c: LocalCluster, *extra: str) -> list[str]:
    args = []
    for seed in c.seeds:
        args += ["--redis-cluster", seed]
    return [*args, *extra]


def wait_ready(node: ChildNode, timeout: float = 20.0) -> None:
    """Until the node's ``/ready`` answers 200 (subscribed on every master)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/ready", timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"node not ready:\n{node.log_text()}")
        time.sleep(0.05)


def health(node: ChildNode) -> dict[str, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/health", timeout=5) as r:
            body: dict[str, Any] = json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = json.loads(e.read())
    return body


def by_owner(c: LocalCluster, namespace: str, channels: list[str]) -> dict[int, list[bytes]]:
    """``{master port: sorted Redis channel names}`` for the raw and history channel of each of ``channels``."""
    want: dict[int, list[bytes]] = {port: [] for port in c.masters()}
    for channel in channels:
        for name in (f"{namespace}/{channel}", f"{namespace}#/{channel}"):
            want[c.owner(name)].append(name.encode())
    return {port: sorted(names) for port, names in want.items()}


def wait_shard_channels(c: LocalCluster, want: dict[int, list[bytes]], timeout: float = 10.0) -> None:
    c._until(lambda: {p: c.shard_channels(p) for p in want} == want,
             f"PUBSUB SHARDCHANNELS never became {want}: {[c.shard_channels(p) for p in want]}", timeout)


# -- integration: twistd children and websockets clients


def test_node_delivers_spublished_messages_from_every_shard(tmp_path: Path, cluster: LocalCluster) -> None:
    """A ``twistd sockdrawer --redis-cluster`` node delivers messages SPUBLISHed on channels owned by each of the
    three masters to websockets clients, and /health names every master as subscribed."""
    per_master = cluster.channel_per_master("sock-drawer", "room/")
    with ChildNode(tmp_path, cluster_args(cluster)) as node, ExitStack() as stack:
        wait_ready(node)
        sockets = {port: stack.enter_context(ws_connect(node.url(f"/{channel}"), open_timeout=5))
                   for port, channel in per_master.items()}
        node.wait_sockets(3)
        wait_shard_channels(cluster, by_owner(cluster, "sock-drawer", list(per_master.values())))
        for port, channel in per_master.items():
            assert cluster.spublish(f"sock-drawer/{channel}", f"from {port}") == 1
        for port, ws in sockets.items():
            assert ws.recv(timeout=5) == f"from {port}"
        state = health(node)
        assert state["broker_connected"] is True
        assert state["shards"] == {f"127.0.0.1:{p}": True for p in cluster.masters()}
        node.assert_no_traceback()


def test_two_nodes_each_socket_gets_each_message_once(tmp_path: Path, cluster: LocalCluster) -> None:
    """With two nodes on the cluster, every socket on either node gets every message SPUBLISHed by the
    synchronous Client on channels of all three shards exactly once, in order; SPUBLISH counts both nodes."""
    per_master = cluster.channel_per_master("twice", "c")
    channels = list(per_master.values())
    nodes = []
    for i in range(2):
        (tmp_path / f"n{i}").mkdir()
        nodes.append(ChildNode(tmp_path / f"n{i}", cluster_args(cluster, "--name", "twice")).start())
    stack = ExitStack()
    try:
        for node in nodes:
            wait_ready(node)
        sockets = [(channel, stack.enter_context(ws_connect(node.url(f"/{channel}"), open_timeout=5)))
                   for node in nodes for channel in channels for _ in range(2)]
        for node in nodes:
            node.wait_sockets(6)
        # the last to subscribe: both nodes on each channel
        cluster._until(lambda: all(
            cluster.client(cluster.owner(f"twice/{ch}")).execute_command("PUBSUB", "SHARDNUMSUB", f"twice/{ch}")[1]
            == 2 for ch in channels), "both nodes never subscribed")
        with Client(cluster=cluster.seeds, name="twice") as publisher:
            for channel in channels:
                assert publisher.pub("first", channel) == 2  # two nodes on the owning master
            for i in range(10):
                for channel in channels:
                    publisher.pub(f"{channel}:{i}", channel)
            for channel in channels:
                publisher.pub("fence", channel)
            for channel, ws in sockets:
                got = [ws.recv(timeout=5) for _ in range(12)]
                assert got == ["first", *(f"{channel}:{i}" for i in range(10)), "fence"]
            for channel in channels:
                publisher.pub("second fence", channel)
            for _, ws in sockets:
                assert ws.recv(timeout=5) == "second fence", "a message came twice"
        for node in nodes:
            node.assert_no_traceback()
    finally:
        stack.close()
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


# -- integration: in-process nodes


async def start_node(run_service: Any, c: LocalCluster, **settings: Any) -> Any:
    settings.setdefault("redis_retry_max", 0.5)
    svc = await run_service(redis_cluster=tuple(c.seeds), **settings)
    await wait_for(svc.broker.is_connected)
    return svc


@pytest_twisted.ensureDeferred
async def test_each_master_holds_exactly_the_channels_it_owns(cluster: LocalCluster, run_service: Any) -> None:
    """PUBSUB SHARDCHANNELS on each master shows exactly the Redis channels (raw and history) of the node's
    sockets that it owns, as sockets come and go (the masters ran as many SSUBSCRIBE commands as the link counts,
    at most one per Redis channel); the last socket leaving a channel SUNSUBSCRIBEs it; /metrics counts the
    subscriptions and the masters."""
    before = await deferToThread(command_calls, cluster, "ssubscribe")
    svc = await start_node(run_service, cluster, name="own")
    channels = [f"c/{i}" for i in range(12)]
    sockets = {ch: [await connect(svc.ws_port, f"/{ch}") for _ in range(2)] for ch in channels}
    await deferToThread(wait_shard_channels, cluster, by_owner(cluster, "own", channels))
    assert svc.broker.subscriptions == 26  # with the control key's two
    # one command per slot and turn, never one per socket: Redis counted what the link counted
    assert await deferToThread(command_calls, cluster, "ssubscribe") - before == svc.broker.subscribe_commands
    assert svc.broker.subscribe_commands <= 26  # 24, and the control key on its shard
    for ch in channels[:6]:
        sockets[ch][0].close()
        await sockets[ch][0].wait_closed()
    await wait_for(lambda: all(svc.factory.sockets(ch.encode()) == 1 for ch in channels[:6]))
    assert svc.broker.unsubscribe_commands == 0  # one socket left on each
    for ch in channels[:6]:
        sockets[ch][1].abort()
        await sockets[ch][1].wait_closed()
    await deferToThread(wait_shard_channels, cluster, by_owner(cluster, "own", channels[6:]))
    await wait_for(lambda: svc.broker.subscriptions == 14)
    assert svc.broker.unsubscribe_commands >= 1
    body = (await deferToThread(http_get, svc.api_port, "/metrics")).decode()
    assert "sockdrawer_redis_subscriptions 14.0" in body
    assert "sockdrawer_redis_connected 1.0" in body
    assert 'sockdrawer_redis_cluster_masters{state="subscribed"} 3.0' in body
    assert 'sockdrawer_redis_cluster_masters{state="down"} 0.0' in body
    assert "sockdrawer_redis_slot_map_changes_total 1.0" in body
    for ch in channels[6:]:
        for ws in sockets[ch]:
            ws.abort()
    await deferToThread(wait_shard_channels, cluster, {p: [] for p in cluster.masters()})


def command_calls(c: LocalCluster, command: str) -> int:
    """How many times the masters ran ``command``, by their INFO commandstats."""
    total = 0
    for port in c.masters():
        with c.client(port) as r:
            total += int(r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))
    return total


def http_get(port: int, path: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        data: bytes = r.read()
        return data


V1 = ["sockdrawer.v1"]


@pytest_twisted.ensureDeferred
async def test_history_and_resume_on_the_cluster(cluster: LocalCluster, run_service: Any) -> None:
    """With --history-size on a cluster, messages published by the node and by Client(cluster=...,
    history_size=...) carry offsets, a v1 client that comes back with since gets exactly what it missed, and the
    stream, epoch and history channel share a slot on every shard."""
    svc = await start_node(run_service, cluster, name="hist", history_size=50)
    channels = list(cluster.channel_per_master("hist#", "h").values())  # history channels on each master
    for channel in channels:
        stream, epoch = _slots.history_keys("hist", channel.encode())
        assert _slots.slot(stream) == _slots.slot(epoch) == _slots.slot(f"hist#/{channel}".encode())
        client = await connect(svc.ws_port, "/", subprotocols=V1)
        client.send_json({"op": "subscribe", "channel": channel})
        assert (await client.next_json())["op"] == "subscribed"
        first = await svc.publish("m0", channel)
        got = await client.next_json()
        assert (got["data"], got["offset"]) == ("m0", first)
        client.close()
        await client.wait_closed()

        def publish_more(channel: str = channel) -> list[str]:
            with Client(cluster=cluster.seeds, name="hist", history_size=50) as publisher:
                return [publisher.pub(f"m{i}", channel) for i in range(1, 6)]

        offsets = await deferToThread(publish_more)
        again = await connect(svc.ws_port, "/", subprotocols=V1)
        again.send_json({"op": "subscribe", "channel": channel, "since": first})
        assert (await again.next_json()) == {"op": "subscribed", "channel": channel, "offset": offsets[-1]}
        replayed = [await again.next_json() for _ in range(5)]
        assert [(m["data"], m["offset"]) for m in replayed] == [(f"m{i}", o) for i, o in zip(range(1, 6), offsets,
                                                                                               strict=True)]
        await svc.publish("live", channel)
        assert (await again.next_json())["data"] == "live"
        again.close()
        await again.wait_closed()


@pytest_twisted.ensureDeferred
async def test_empty_channels_have_positions_and_a_plain_client_keeps_history(cluster: LocalCluster,
                                                                              run_service: Any) -> None:
    """On a cluster, the node loads its history function on every master; a subscription to a channel of each
    shard that never had a message gets <epoch>:0-0, and messages a plain Client(cluster=...) publishes
    meanwhile (no history_size: it follows the function, once per id even when retried) come back to a client
    that resumes from that position."""
    from sockdrawer.core.history import function_name

    svc = await start_node(run_service, cluster, name="pos", history_size=50)

    def loaded_everywhere() -> bool:
        for port in cluster.masters():
            with cluster.client(port) as r:
                if not r.function_list(library=svc.broker.library.name):
                    return False
        return True

    await wait_for(loaded_everywhere)
    for channel in cluster.channel_per_master("pos#", "e").values():
        client = await connect(svc.ws_port, "/", subprotocols=V1)
        client.send_json({"op": "subscribe", "channel": channel})
        subscribed = await client.next_json()
        assert subscribed["op"] == "subscribed" and subscribed["offset"].endswith(":0-0")
        client.close()
        await client.wait_closed()

        def publish(channel: str = channel) -> list[str]:
            with Client(cluster=cluster.seeds, name="pos") as publisher:
                offsets = [publisher.pub(f"m{i}", channel) for i in range(3)]
                assert publisher.pub("m2", channel, id=f"again-{channel}") == \
                    publisher.pub("m2", channel, id=f"again-{channel}")
                return offsets

        offsets = await deferToThread(publish)
        assert all(isinstance(o, str) for o in offsets)
        again = await connect(svc.ws_port, "/", subprotocols=V1)
        again.send_json({"op": "subscribe", "channel": channel, "since": subscribed["offset"]})
        assert (await again.next_json())["op"] == "subscribed"
        assert [(await again.next_json())["data"] for _ in range(4)] == ["m0", "m1", "m2", "m2"]
        assert again.pending() == 0
        again.close()
        await again.wait_closed()
    assert function_name("pos") == svc.broker.library.function


@pytest_twisted.ensureDeferred
async def test_commands_and_scripts_go_to_the_owner_of_their_key(cluster: LocalCluster, run_service: Any) -> None:
    """execute and eval (what presence and once-claims use) run on the master of their first key's slot, for keys
    on every shard: no MOVED reaches the caller."""
    svc = await start_node(run_service, cluster, name="cmd")
    keys = {cluster.owner(f"k{i}"): f"k{i}" for i in range(30)}
    assert len(keys) == 3
    for key in keys.values():
        assert await svc.broker.execute("SET", key, "v", "PX", 5000) in (b"OK", "OK")
        assert await svc.broker.eval("return redis.call('GET', KEYS[1])", [key], []) == b"v"


@pytest_twisted.ensureDeferred
async def test_a_stale_slot_map_is_read_again_on_moved(cluster: LocalCluster, run_service: Any) -> None:
    """A publish routed by a stale slot map (the node thinks another master owns the slot) gets MOVED, reads the
    map again and succeeds; the socket gets the message."""
    svc = await start_node(run_service, cluster, name="moved")
    ws = await connect(svc.ws_port, "/x")
    await deferToThread(wait_shard_channels, cluster, by_owner(cluster, "moved", ["x"]))
    link = svc.broker
    slot = _slots.slot(b"moved/x")
    right = link._slots[slot]
    wrong = next(s for s in link.shards.values() if s is not right)
    link._slots[slot] = wrong
    changes = link.map_changes
    assert await svc.publish("routed again", "x") == 1
    assert (await ws.next_text()) == "routed again"
    assert link.map_changes == changes + 1 and link._slots[slot] is right
    ws.abort()


@pytest_twisted.ensureDeferred
async def test_presence_across_nodes_on_the_cluster(cluster: LocalCluster, run_service: Any) -> None:
    """v1 presence works on a cluster: a client on node A gets the join of a client on node B (events SPUBLISHed
    in the slot of the channel's presence hash), and the Client reads both entries."""
    a = await start_node(run_service, cluster, name="pres")
    b = await start_node(run_service, cluster, name="pres")
    assert _slots.slot(_slots.presence_key("pres", b"room/1")) == _slots.slot(events_channel("pres", b"room/1"))
    alice = await connect(a.ws_port, "/", subprotocols=V1)
    alice.send_json({"op": "subscribe", "channel": "room/1", "presence": True})
    assert (await alice.next_json())["op"] == "subscribed"
    listing = await alice.next_json()
    assert listing["op"] == "presence" and len(listing["clients"]) == 1
    bob = await connect(b.ws_port, "/", subprotocols=V1)
    bob.send_json({"op": "subscribe", "channel": "room/1", "presence": True})
    assert (await bob.next_json())["op"] == "subscribed"
    bobs = await bob.next_json()
    assert len(bobs["clients"]) == 2
    assert (await alice.next_json()) == {"op": "join", "channel": "room/1", "user": None, "client": bobs["self"]}

    def read() -> list[dict[str, Any]]:
        with Client(cluster=cluster.seeds, name="pres") as backend:
            return backend.presence("room/1")

    assert sorted(e["client"] for e in await deferToThread(read)) == sorted([listing["self"], bobs["self"]])
    bob.close()
    assert (await alice.next_json()) == {"op": "leave", "channel": "room/1", "user": None, "client": bobs["self"]}
    alice.close()
    await alice.wait_closed()
    await bob.wait_closed()


@pytest_twisted.ensureDeferred
async def test_resharding_a_slot_moves_its_channel(cluster: LocalCluster, run_service: Any) -> None:
    """A slot moved to another master (CLUSTER SETSLOT ... NODE, as redis-cli --cluster reshard ends): the old
    master drops its channel with a sunsubscribe, the node subscribes on the new owner, and the socket gets
    what is SPUBLISHed there; the slot is moved back afterwards."""
    svc = await start_node(run_service, cluster, name="reshard")
    link = svc.broker
    ws = await connect(svc.ws_port, "/moving")
    await deferToThread(wait_shard_channels, cluster, by_owner(cluster, "reshard", ["moving"]))
    slot = _slots.slot(b"reshard/moving")
    source = cluster.owner("reshard/moving")
    target = next(p for p in cluster.masters() if p != source)

    def node_id(port: int) -> bytes:
        with cluster.client(port) as r:
            answer: bytes = r.execute_command("CLUSTER", "MYID")
            return answer

    def move(slot: int, source: int, target: int) -> None:
        with cluster.client(target) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", node_id(source))
        with cluster.client(source) as r:
            r.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", node_id(target))
        for port in (target, source):  # no keys to migrate: the slot holds only the channel
            with cluster.client(port) as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", node_id(target))
        cluster._until(lambda: cluster.owner("reshard/moving") == target, "the slot never moved")
        cluster.wait_healthy()  # every node agrees on the map

    dropped, changes = link.dropped_by_redis, link.map_changes
    try:
        await deferToThread(move, slot, source, target)
        await wait_for(lambda: b"reshard/moving" in cluster.shard_channels(target) and link.is_connected()
                       and link.unconfirmed() == 0)
        assert link.dropped_by_redis == dropped + 1 and link.map_changes > changes
        assert b"reshard/moving" not in cluster.shard_channels(source)
        assert await deferToThread(cluster.spublish, "reshard/moving", "on the new owner") == 1
        assert (await ws.next_text()) == "on the new owner"
    finally:
        await deferToThread(move, slot, target, source)
    await wait_for(lambda: b"reshard/moving" in cluster.shard_channels(source))
    ws.abort()


@pytest_twisted.ensureDeferred
async def test_user_and_password_of_the_seed_reach_every_node(cluster: LocalCluster, run_service: Any) -> None:
    """With an ACL user on every node, the seed URL's user and password authenticate the node's connections to
    every master (its subscriber and its command connection, as CLIENT LIST shows) and messages flow; a wrong
    password leaves the node not ready, its /health saying degraded."""
    def users(add: bool) -> None:
        for port in cluster.live():
            with cluster.client(port) as r:
                if add:
                    r.execute_command("ACL", "SETUSER", "sd", "on", ">s3cret", "~*", "&*", "+@all")
                else:
                    r.execute_command("ACL", "DELUSER", "sd")

    await deferToThread(users, True)
    try:
        seeds = tuple(f"redis://sd:s3cret@127.0.0.1:{p}" for p in cluster.ports[:2])
        svc = await run_service(redis_cluster=seeds, name="acl", redis_retry_max=0.5)
        await wait_for(svc.broker.is_connected)
        ws = await connect(svc.ws_port, "/private")
        await deferToThread(wait_shard_channels, cluster, by_owner(cluster, "acl", ["private"]))
        assert await svc.publish("authenticated", "private") == 1

        def as_sd(port: int) -> int:
            with cluster.client(port) as r:
                return sum(1 for c in r.client_list() if c.get("user") == "sd")

        assert all(n >= 2 for n in await deferToThread(lambda: [as_sd(p) for p in cluster.masters()]))
        assert (await ws.next_text()) == "authenticated"
        ws.abort()
        wrong = await run_service(redis_cluster=(f"redis://sd:wrong@127.0.0.1:{cluster.ports[0]}",), name="acl",
                                  redis_retry_max=0.5)
        await wait_for(lambda: wrong.broker._control_backoff.failures >= 2)
        assert not wrong.broker.is_connected() and wrong.state()["status"] == "degraded"
    finally:
        await deferToThread(users, False)


ONCE_CALLS: list[tuple[int, str]] = []


class Fulfil(Subscriber):
    @on("orders", once=True)
    def fulfil(self, message: Any, source: Source) -> None:
        ONCE_CALLS.append((id(self), message))


@pytest_twisted.ensureDeferred
async def test_once_handlers_run_once_per_message_on_the_cluster(cluster: LocalCluster, run_service: Any) -> None:
    """Two nodes on the cluster: an @on(once=True) handler runs on exactly one of them per message, plain or with
    history (the SET NX claim goes to the master of its key)."""
    ONCE_CALLS.clear()
    nodes = [await start_node(run_service, cluster, name="once", listeners=(Fulfil,)) for _ in range(2)]
    await deferToThread(cluster._until, lambda: cluster.client(cluster.owner("once/orders")).execute_command(
        "PUBSUB", "SHARDNUMSUB", "once/orders")[1] == 2, "both nodes never subscribed")
    expected = [f"plain {i}" for i in range(10)] + [f"kept {i}" for i in range(10)]

    def publish() -> None:
        with Client(cluster=cluster.seeds, name="once") as plain, \
                Client(cluster=cluster.seeds, name="once", history_size=10) as kept:
            for message in expected[:10]:
                plain.pub(message, channel="orders")
            for message in expected[10:]:
                kept.pub(message, channel="orders")

    await deferToThread(publish)
    registries = [node.listeners for node in nodes]
    await wait_for(lambda: all(r.once_won + r.once_lost == len(expected) for r in registries))
    assert sorted(message for _, message in ONCE_CALLS) == sorted(expected)
    assert sum(r.once_won for r in registries) == len(expected)


async def failover_case(c: LocalCluster, run_service: Any, name: str, fail: Any, control: bool = False) -> Any:
    """
    Sockets on a channel of each shard; ``fail(master)`` takes one master away; then messages on that shard's
    channel reach its sockets again, the other shards' sockets kept their subscriptions and got everything
    published meanwhile, and the node called broker_gap once.  With ``control``, the master taken away is the
    node's only seed, the one it reads the slot map from.
    """
    per_master = c.channel_per_master(name, "f")
    victim = next(iter(per_master))
    seeds = [f"redis://127.0.0.1:{victim}"] if control else c.seeds
    svc = await run_service(redis_cluster=tuple(seeds), name=name, redis_retry_max=0.5)
    await wait_for(svc.broker.is_connected)
    link = svc.broker
    if control:
        assert link._control_endpoint.address == ("127.0.0.1", victim)
    sockets = {port: await connect(svc.ws_port, f"/{channel}") for port, channel in per_master.items()}
    await deferToThread(wait_shard_channels, c, by_owner(c, name, list(per_master.values())))
    others = [p for p in per_master if p != victim]
    untouched = {p: link.shards[("127.0.0.1", p)].following for p in others}
    gaps: list[int] = []
    original_gap = svc.hub.broker_gap

    def counting_gap() -> None:
        gaps.append(1)
        original_gap()

    svc.hub.broker_gap = counting_gap
    replica = c.replica_of(victim)
    started = time.monotonic()
    await deferToThread(fail, victim)
    # the other shards deliver all along
    for i in range(5):
        for port in others:
            await deferToThread(c.spublish, f"{name}/{per_master[port]}", f"during {i}")
    for port in others:
        assert [await sockets[port].next_text() for _ in range(5)] == [f"during {i}" for i in range(5)]
    await wait_for(lambda: link.reconnects == 1 and link.is_connected(), timeout=30)
    print(f"\n{name}: the node was subscribed on the new master {time.monotonic() - started:.2f} s after the "
          f"failover began")
    assert ("127.0.0.1", replica) in link.shards and ("127.0.0.1", victim) not in link.shards
    channel = per_master[victim]
    # the node learned the new owner from one node's map; the node the test asks may hear of it a gossip
    # round later
    await wait_for(lambda: deferToThread(c.owner, f"{name}/{channel}").addCallback(lambda o: o == replica),
                   timeout=10)
    await deferToThread(c.spublish, f"{name}/{channel}", "after the failover")
    assert (await sockets[victim].next_text()) == "after the failover"
    for port in others:
        assert link.shards[("127.0.0.1", port)].following is untouched[port]
        await deferToThread(c.spublish, f"{name}/{per_master[port]}", "still here")
        assert (await sockets[port].next_text()) == "still here"
    assert gaps == [1]
    assert all(ws.pending() == 0 for ws in sockets.values())
    for ws in sockets.values():
        ws.abort()
    return link


@pytest_twisted.ensureDeferred
async def test_manual_failover_moves_the_shards_channels(cluster: LocalCluster, run_service: Any) -> None:
    """CLUSTER FAILOVER on a replica (its old master drops our channels with sunsubscribe): the node follows the
    slots to the new master, its sockets there get messages again, the other shards are untouched."""
    def failover(master: int) -> None:
        with cluster.client(cluster.replica_of(master)) as r:
            r.execute_command("CLUSTER", "FAILOVER")

    link = await failover_case(cluster, run_service, "manual", failover)
    assert link.dropped_by_redis >= 1  # the old master said so, with a sunsubscribe
    await deferToThread(cluster.wait_healthy)


@pytest_twisted.ensureDeferred
async def test_v1_misses_nothing_through_a_failover(cluster: LocalCluster, run_service: Any) -> None:
    """A v1 socket with a subscription on a channel of each shard, while a publisher with history publishes on
    all of them without pause and one shard fails over (CLUSTER FAILOVER): per channel the socket gets every
    message the channel's stream holds (every publish that took place), exactly once and in order, the
    failed-over shard's included."""
    import threading

    from sockdrawer.client import PublishError

    svc = await start_node(run_service, cluster, name="v1f", history_size=5000)
    per_master = cluster.channel_per_master("v1f#", "f")  # history channels on each master
    victim = next(iter(per_master))
    client = await connect(svc.ws_port, "/", subprotocols=V1)
    for channel in per_master.values():
        client.send_json({"op": "subscribe", "channel": channel})
        assert (await client.next_json())["op"] == "subscribed"
    await deferToThread(wait_shard_channels, cluster, by_owner(cluster, "v1f", list(per_master.values())))
    published: dict[str, list[str]] = {channel: [] for channel in per_master.values()}
    stop = threading.Event()

    def publish_all_along() -> None:
        with Client(cluster=cluster.seeds, name="v1f", history_size=5000, timeout=5) as publisher:
            i = 0
            while not stop.is_set():
                for channel in per_master.values():
                    try:
                        publisher.pub(f"m{i}", channel)
                    except PublishError:
                        continue  # the shard is failing over: this one never was published
                    published[channel].append(f"m{i}")
                i += 1
                time.sleep(0.002)  # pacing, not waiting: about 1,000 messages a second in all

    publishing = deferToThread(publish_all_along)
    await wait_for(lambda: all(len(v) >= 20 for v in published.values()))
    link = svc.broker
    with cluster.client(cluster.replica_of(victim)) as r:
        r.execute_command("CLUSTER", "FAILOVER")
    await wait_for(lambda: link.reconnects >= 1 and link.is_connected(), timeout=30)
    victim_channel = per_master[victim]
    count = len(published[victim_channel])
    await wait_for(lambda: len(published[victim_channel]) >= count + 20, timeout=30)  # the new master takes them
    stop.set()
    await publishing

    def streams() -> dict[str, list[str]]:
        from redis.cluster import ClusterNode, RedisCluster

        nodes = [ClusterNode("127.0.0.1", int(seed.rsplit(":", 1)[1])) for seed in cluster.seeds]
        with RedisCluster(startup_nodes=nodes, socket_timeout=5) as r:
            return {channel: [fields[b"d"].decode() for _, fields in
                              r.xrange(_slots.history_keys("v1f", channel.encode())[0])]
                    for channel in per_master.values()}

    held = await deferToThread(streams)
    for channel, done in published.items():
        assert set(done) <= set(held[channel])  # what the publisher saw succeed is in the stream
    got: dict[str, list[str]] = {channel: [] for channel in per_master.values()}
    while any(len(got[c]) < len(held[c]) for c in got):
        message = await client.next_json(timeout=20)
        assert message["op"] == "message", message
        got[message["channel"]].append(message["data"])
    assert got == held
    assert client.pending() == 0
    client.abort()
    await deferToThread(cluster.wait_healthy)


@pytest_twisted.ensureDeferred
async def test_sigkilled_master_is_replaced_by_its_replica(cluster: LocalCluster, run_service: Any) -> None:
    """A master SIGKILLed (the one the node reads the slot map from): once its replica takes over
    (cluster-node-timeout 1 s), the node subscribes there and its sockets on that shard get messages again; the
    other shards are untouched.  The killed node comes back as a replica."""
    killed: list[int] = []

    def kill(master: int) -> None:
        killed.append(master)
        cluster.kill(master)

    try:
        await failover_case(cluster, run_service, "killed", kill, control=True)
    finally:
        for port in killed:
            await deferToThread(cluster.start_node, port)
        await deferToThread(cluster.wait_healthy)


# -- unit tests: slots, the slot map, the shard subscriber on a fake reactor


@given(st.text(alphabet="ab{}/#", max_size=12))
def test_history_and_presence_keys_share_their_channels_slot(channel: str) -> None:
    """Whatever braces a channel name has, its cluster history stream and epoch keys hash to the slot of its
    history channel, and its presence hash to the slot of its presence events channel."""
    key = channel.encode()
    stream, epoch = _slots.history_keys("ns", key)
    assert stream != epoch
    assert _slots.slot(stream) == _slots.slot(epoch) == _slots.slot(b"ns#/" + key)
    assert _slots.slot(_slots.presence_key("ns", key)) == _slots.slot(events_channel("ns", key))


def test_sharded_scripts_spublish() -> None:
    """The cluster's history script is the single-Redis one with SPUBLISH instead of PUBLISH, nothing else."""
    from sockdrawer.core.history import PUBLISH_SCRIPT

    assert "PUBLISH'" not in _slots.SHARDED_PUBLISH_SCRIPT.replace("SPUBLISH'", "")
    assert _slots.SHARDED_PUBLISH_SCRIPT.replace("SPUBLISH", "PUBLISH") == PUBLISH_SCRIPT


SLOTS_REPLY = [
    [0, 5460, [b"127.0.0.1", 7000, b"id0"], [b"127.0.0.1", 7003, b"id3"]],
    [5461, 10922, [b"127.0.0.1", 7001, b"id1"], [b"127.0.0.1", 7004, b"id4"]],
    [10923, 16383, [b"127.0.0.1", 7002, b"id2"]],
]


def test_parse_slots() -> None:
    """CLUSTER SLOTS gives each range's master; a reply of another shape is a ValueError."""
    assert parse_slots(SLOTS_REPLY) == [(0, 5460, "127.0.0.1", 7000), (5461, 10922, "127.0.0.1", 7001),
                                        (10923, 16383, "127.0.0.1", 7002)]
    for bad in (b"nope", [[0, 1]], [[0, 1, b"x"]]):
        with pytest.raises(ValueError):
            parse_slots(bad)


def test_bad_seeds_are_refused() -> None:
    """No seed, a unix:// seed, or a Client(cluster=...) that is not a list of redis:// URLs: ValueError."""
    hub = MemoryChannelHub()
    with pytest.raises(ValueError, match="seed"):
        ClusterLink([], Namespace(), hub, reactor=reactor)
    with pytest.raises(ValueError, match="Unix"):
        ClusterLink([RedisURL.parse("unix:///tmp/r.sock")], Namespace(), hub, reactor=reactor)
    with pytest.raises(ValueError, match="list"):
        Client(cluster="redis://127.0.0.1:7000")
    with pytest.raises(ValueError, match="redis://"):
        Client(cluster=["http://127.0.0.1:7000"])
    with pytest.raises(ValueError, match="one of"):
        Client("redis://127.0.0.1:7000", cluster=["redis://127.0.0.1:7000"])


class CountingTransport(StringTransport):
    writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)




def push(*parts: Any) -> bytes:
    out = b"*%d\r\n" % len(parts)
    for p in parts:
        out += b":%d\r\n" % p if isinstance(p, int) else b"$%d\r\n%s\r\n" % (len(p), p)
    return out


class OffsetSink(RecordingSink):
    def __init__(self) -> None:
        super().__init__()
        self.offsets: list[str | None] = []

    def receive(self, batch: Any) -> None:
        super().receive(batch)
        self.offsets.extend(batch.offsets or [None] * len(batch.messages))


class FakeNode:
    """A cluster link on a fake reactor with the slot map of SLOTS_REPLY, and a way to connect shard subscribers."""

    def __init__(self) -> None:
        self.reactor = MemoryReactorClock()
        self.hub = MemoryChannelHub()
        self.link = ClusterLink([RedisURL.parse("redis://127.0.0.1:7000")], Namespace(), self.hub,
                                reactor=self.reactor, ping_interval=0)
        self.link.startService()
        # the map is given here, not read: no read is under way
        self.link._refresh_call.cancel()
        self.link._refresh_call = None
        self.link._slots_read(SLOTS_REPLY, False)
        self.sinks: dict[bytes, OffsetSink] = {}

    def owner(self, name: bytes) -> int:
        slot = _slots.slot(name)
        return 7000 if slot <= 5460 else 7001 if slot <= 10922 else 7002

    def keys_on(self, port: int, count: int) -> list[bytes]:
        """Channel keys whose raw Redis channel ``port`` owns."""
        keys, n = [], 0
        while len(keys) < count:
            if self.owner(b"sock-drawer/k%d" % n) == port:
                keys.append(b"k%d" % n)
            n += 1
        return keys

    def connect(self, port: int) -> tuple[ShardSubscriberProtocol, CountingTransport]:
        shard = self.link.shards[("127.0.0.1", port)]
        p = _ShardSubscriberFactory(self.link, shard).buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        transport = CountingTransport()
        p.makeConnection(transport)  # no password: ready at once
        return p, transport

    def open(self, *keys: bytes) -> None:
        for key in keys:
            self.hub.subscribe(key, self.sinks.setdefault(key, OffsetSink()))

    def close(self, *keys: bytes) -> None:
        for key in keys:
            self.hub.unsubscribe(key, self.sinks[key])

    def confirm(self, p: ShardSubscriberProtocol, kind: bytes, names: list[bytes]) -> None:
        p.dataReceived(b"".join(push(kind, name, i + 1) for i, name in enumerate(names)))


@pytest.fixture
def fake() -> Iterator[FakeNode]:
    node = FakeNode()
    yield node
    node.link.stopService()


def names_of(key: bytes) -> list[bytes]:
    return [b"sock-drawer/" + key, b"sock-drawer#/" + key]


def test_the_link_provides_its_interfaces(fake: FakeNode) -> None:
    """ClusterLink is an IBroker and an IChannelObserver, with the slot map of SLOTS_REPLY: three masters."""
    verifyObject(IBroker, fake.link)
    verifyObject(IChannelObserver, fake.link)
    assert sorted(port for _, port in fake.link.shards) == [7000, 7001, 7002]
    assert {fake.link._owner(b"k%d" % i).address[1] for i in range(50)} == {7000, 7001, 7002}
    assert all(fake.link._owner(b"k%d" % i).address[1] == fake.owner(b"k%d" % i) for i in range(50))


def test_a_new_connection_subscribes_its_slots_channels_one_command_per_slot(fake: FakeNode) -> None:
    """A master's new subscriber connection SSUBSCRIBEs exactly the hub's Redis channels in its slots, one command
    per slot, in one write; the link is connected only once every master confirmed all of its channels."""
    keys = [b"k%d" % i for i in range(20)]
    fake.open(*keys)
    mine = sorted(n for k in keys for n in names_of(k) if fake.owner(n) == 7000)
    p, transport = fake.connect(7000)
    sent = commands(transport.value())
    assert transport.writes == 1
    assert all(c[0] == b"SSUBSCRIBE" for c in sent)
    assert sorted(n for c in sent for n in c[1:]) == mine
    assert all(len({_slots.slot(n) for n in c[1:]}) == 1 for c in sent)
    assert len(sent) == len({_slots.slot(n) for n in mine})
    others = [fake.connect(port) for port in (7001, 7002)]
    for q, t in others:
        fake.confirm(q, b"ssubscribe", [n for c in commands(t.value()) for n in c[1:]])
    assert not fake.link.is_connected()
    confirmations = [n for c in sent for n in c[1:]]
    fake.confirm(p, b"ssubscribe", confirmations[:-1])
    assert not fake.link.is_connected()
    fake.confirm(p, b"ssubscribe", confirmations[-1:])
    assert fake.link.is_connected()


def test_one_turns_changes_are_one_write_per_master(fake: FakeNode) -> None:
    """Channels opened and closed within one reactor turn reach each master as one write (one command per slot),
    only for the channels of its slots; a channel opened and closed in the same turn sends nothing."""
    conns = {port: fake.connect(port) for port in (7000, 7001, 7002)}
    for p, _ in conns.values():
        assert p.ready
    keys = [b"k%d" % i for i in range(30)]
    fake.open(*keys, b"brief")
    fake.close(b"brief")
    fake.reactor.advance(0)
    for port, (_, transport) in conns.items():
        assert transport.writes == 1
        sent = commands(transport.value())
        assert sorted(n for c in sent for n in c[1:]) == sorted(
            n for k in keys for n in names_of(k) if fake.owner(n) == port)
    fake.close(*keys[:10])
    fake.reactor.advance(0)
    for port, (_, transport) in conns.items():
        last = commands(transport.value())[-len({_slots.slot(n) for k in keys[:10] for n in names_of(k)
                                                 if fake.owner(n) == port}):]
        assert all(c[0] == b"SUNSUBSCRIBE" for c in last)
        assert transport.writes == 2


def test_redis_dropping_a_channel_reads_the_slot_map_again(fake: FakeNode) -> None:
    """A sunsubscribe that answers none of our SUNSUBSCRIBEs (the slot moved) drops the channel and schedules a
    slot map read; the confirmation of our own SUNSUBSCRIBE does not."""
    key = fake.keys_on(7000, 1)[0]
    fake.open(key)
    p, transport = fake.connect(7000)
    raw = b"sock-drawer/" + key
    fake.confirm(p, b"ssubscribe", [n for c in commands(transport.value()) for n in c[1:]])
    assert raw in p.subscribed
    assert fake.link._refresh_call is None
    fake.close(key)
    fake.reactor.advance(0)
    p.dataReceived(push(b"sunsubscribe", raw, 0))
    assert fake.link._refresh_call is None and not fake.link._moved
    fake.open(key)
    fake.reactor.advance(0)
    fake.confirm(p, b"ssubscribe", [raw])
    p.dataReceived(push(b"sunsubscribe", raw, 0))
    assert raw not in p.subscribed
    assert fake.link._moved and fake.link._refresh_call is not None and fake.link._refresh_call.active()


def test_a_refused_ssubscribe_reads_the_slot_map_again(fake: FakeNode) -> None:
    """An error answering an SSUBSCRIBE (MOVED: the map is old) takes its channels out of the subscribed set and
    schedules a slot map read; the connection still counts as ready."""
    key = fake.keys_on(7001, 1)[0]
    fake.open(key)
    p, transport = fake.connect(7001)
    sent = commands(transport.value())
    assert fake.link._refresh_call is None
    p.dataReceived(b"".join(b"-MOVED 1 127.0.0.1:7002\r\n" for _ in sent))
    assert not p.subscribed and p.ready and p.unconfirmed() == 0
    assert fake.link._refresh_call is not None


def test_smessages_reach_the_hub_and_stale_ones_are_dropped(fake: FakeNode) -> None:
    """An smessage on a subscribed raw channel reaches the channel's sinks; on the history channel, with its
    offset; on a channel not subscribed on this connection, it is counted stale and dropped."""
    key = b"news"
    fake.open(key)
    port = fake.owner(b"sock-drawer/news")
    p, transport = fake.connect(port)
    fake.confirm(p, b"ssubscribe", [n for c in commands(transport.value()) for n in c[1:]])
    p.dataReceived(push(b"smessage", b"sock-drawer/news", b"hello"))
    history_port = fake.owner(b"sock-drawer#/news")
    if history_port == port:
        q = p
    else:
        q, t = fake.connect(history_port)
        fake.confirm(q, b"ssubscribe", [n for c in commands(t.value()) for n in c[1:]])
    q.dataReceived(push(b"smessage", b"sock-drawer#/news", b"e1:1-0\nkept"))
    p.dataReceived(push(b"smessage", b"sock-drawer/other", b"not ours"))
    assert fake.sinks[key].messages == [b"hello", b"kept"]
    assert fake.sinks[key].offsets == [None, "e1:1-0"]
    assert (fake.link.messages, fake.link.stale_messages) == (2, 1)


def test_when_subscribed_waits_for_both_channels_confirmation(fake: FakeNode) -> None:
    """when_subscribed (what history reads wait for) fires only once the SSUBSCRIBEs carrying a channel opened this
    turn are confirmed by the masters of both its Redis channels."""
    conns = {port: fake.connect(port) for port in (7000, 7001, 7002)}
    key = next(k for k in (b"w%d" % i for i in range(100))
               if fake.owner(b"sock-drawer/" + k) != fake.owner(b"sock-drawer#/" + k))
    fake.open(key)
    fired: list[None] = []
    fake.link.when_subscribed(key).addCallback(fired.append)
    fake.reactor.advance(0)
    assert not fired
    raw, hist = names_of(key)
    fake.confirm(conns[fake.owner(raw)][0], b"ssubscribe", [raw])
    assert not fired
    fake.confirm(conns[fake.owner(hist)][0], b"ssubscribe", [hist])
    assert fired == [None]


def test_a_node_without_an_address_in_the_map_is_reached_where_the_map_was_read(fake: FakeNode) -> None:
    """A master that CLUSTER SLOTS names with an empty host (Redis knows no address to give) is reached on the host
    the map was read from; a master gone from the map is stopped and forgotten."""
    old = list(fake.link.shards.values())
    fake.link._slots_read([[0, 16383, [b"", 7005, b"id5"]]], False)
    assert list(fake.link.shards) == [("127.0.0.1", 7005)]
    assert all(shard.retired and not shard.running for shard in old)
    assert fake.link.map_changes == 2
    assert all(fake.link._owner(b"k%d" % i) is fake.link.shards[("127.0.0.1", 7005)] for i in range(20))


def test_a_map_change_is_a_gap_only_when_it_moves_the_nodes_channels(fake: FakeNode) -> None:
    """A new slot map that moves none of the node's channels calls no broker_gap; one that moves a channel moves
    its subscription (SUNSUBSCRIBE on the old master, SSUBSCRIBE on the new), calls broker_lost at once (what
    comes live before the new master answers may follow a hole) and, once both are answered, broker_gap once."""
    conns = {port: fake.connect(port) for port in (7000, 7001, 7002)}
    key = next(k for k in fake.keys_on(7000, 20) if fake.owner(b"sock-drawer#/" + k) != 7000)
    fake.open(key)
    fake.reactor.advance(0)
    raw = b"sock-drawer/" + key
    fake.confirm(conns[7000][0], b"ssubscribe", [raw])
    fake.confirm(conns[fake.owner(b"sock-drawer#/" + key)][0], b"ssubscribe", [b"sock-drawer#/" + key])
    assert fake.link.is_connected() and fake.link._up_once
    assert fake.hub.broker_whole  # the first time every master answered was a gap too
    gaps: list[int] = []
    losses: list[int] = []
    fake.hub.broker_gap = lambda: gaps.append(1)  # type: ignore[method-assign]
    fake.hub.broker_lost = lambda: losses.append(1)  # type: ignore[method-assign]
    ours = _slots.slot(raw)
    other = next(s for s in range(5461) if s != ours)

    def moved(slot: int) -> list[Any]:
        reply = [list(entry) for entry in SLOTS_REPLY]
        reply[0] = [0, 5460, reply[0][2]]
        ranges = [[a, b, reply[0][2]] for a, b in ((0, slot - 1), (slot + 1, 5460)) if a <= b]
        return [*ranges, [slot, slot, SLOTS_REPLY[1][2]], *reply[1:]]

    fake.link._slots_read(moved(other), False)
    assert fake.link.map_changes == 2 and not fake.link._gap and gaps == [] and losses == []
    before = [len(commands(t.value())) for _, t in conns.values()]
    fake.link._slots_read(moved(ours), False)
    assert commands(conns[7000][1].value())[before[0]:] == [[b"SUNSUBSCRIBE", raw]]
    assert commands(conns[7001][1].value())[before[1]:] == [[b"SSUBSCRIBE", raw]]
    assert gaps == [] and losses == [1]
    fake.confirm(conns[7000][0], b"sunsubscribe", [raw])
    fake.confirm(conns[7001][0], b"ssubscribe", [raw])
    assert gaps == [1] and fake.link.reconnects == 1


@pytest_twisted.ensureDeferred
async def test_lifecycle_webhooks_on_the_cluster(cluster: LocalCluster, run_service: Any) -> None:
    """--webhook on a cluster: the queue's keys share one hash tag (one slot), so its scripts run there; two
    nodes post one channel_occupied and one channel_vacated for a channel with sockets on both, and each
    socket's connect and disconnect."""
    from test_webhooks import HOOK_SECRET, start_receiver

    receiver, url = await start_receiver()
    a = await start_node(run_service, cluster, name="hooks", webhook=url, webhook_secret=HOOK_SECRET)
    b = await start_node(run_service, cluster, name="hooks", webhook=url, webhook_secret=HOOK_SECRET)
    first = await connect(a.ws_port, "/news")
    await wait_for(lambda: receiver.of("channel_occupied", channel="news"))
    second = await connect(b.ws_port, "/news")
    await wait_for(lambda: len(receiver.of("connect")) == 2)
    first.close()
    await wait_for(lambda: len(receiver.of("disconnect")) == 1)
    second.close()
    await wait_for(lambda: receiver.of("channel_vacated", channel="news") and len(receiver.of("disconnect")) == 2)
    assert len(receiver.of("channel_occupied")) == 1 and len(receiver.of("channel_vacated")) == 1
    assert receiver.bad_signatures == 0
