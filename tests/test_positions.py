"""
Every subscription has a position, and every publisher follows one history
policy: a ``sockdrawer.v1`` subscription made before a channel's first
message can resume from its ``subscribed`` offset (embedded broker, Redis,
across a node restart); the nodes write their history policy into Redis as
a function that a plain ``Client(url)`` (or ``FCALL``) follows; a retried
publish with an id is kept once.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted
from conftest import RedisServer, wait_for, wait_subscribed
from test_v1 import subscribe, v1
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher

from sockdrawer import Client
from sockdrawer.core.history import (
    HistoryReset,
    MemoryHistory,
    function_name,
    library_name,
    loaded_policy,
    policy_line,
    redis_keys,
    split_offset,
)


async def resume_from_an_empty_channel(svc: Any, publish: Any, restart: Any = None) -> tuple[Any, str]:
    """Subscribe to a channel that never had a message, leave, publish 3, come back with the position."""
    client = await v1(svc)
    first = await subscribe(client, "quiet")
    assert first["op"] == "subscribed" and isinstance(first["offset"], str)
    client.close()
    await client.wait_closed()
    for i in range(3):
        await publish(f"m{i}")
    if restart is not None:
        svc = await restart()
    again = await v1(svc)
    subscribed = await subscribe(again, "quiet", since=first["offset"])
    assert subscribed["op"] == "subscribed", subscribed
    replayed = [await again.next_json() for _ in range(3)]
    assert [m["data"] for m in replayed] == ["m0", "m1", "m2"]
    assert subscribed["offset"] == replayed[-1]["offset"]
    assert again.pending() == 0
    return svc, first["offset"]


@pytest_twisted.ensureDeferred
async def test_an_empty_channel_has_a_position_on_the_embedded_broker(run_service: Any) -> None:
    """Embedded broker: subscribed on a channel without messages carries <epoch>:0, and a client that comes
    back with it gets exactly the messages published meanwhile."""
    svc = await run_service(history_size=100)
    _, offset = await resume_from_an_empty_channel(svc, lambda m: svc.publish(m, "quiet"))
    assert re.fullmatch(r"[0-9a-f]+:0", offset)


@pytest_twisted.ensureDeferred
async def test_an_empty_channel_has_a_position_on_redis_across_a_node_restart(
        own_redis: RedisServer, run_service: Any) -> None:
    """Redis: subscribed on a channel without messages carries <epoch>:0-0; messages published by a plain
    Client(url) (no history_size: it follows the policy the node wrote) while no node runs at all are replayed
    by the next node to a client that comes back with that position."""
    svc = await run_service(redis=own_redis.url, history_size=100)
    await wait_subscribed(svc, own_redis)
    publisher = Client(own_redis.url)

    async def restart() -> Any:
        node = await run_service(redis=own_redis.url, history_size=100)
        await wait_subscribed(node, own_redis)
        return node

    async def publish(message: str) -> None:
        if svc.running:
            await svc.stopService()  # the messages are published while no node runs
        offset = await deferToThread(publisher.pub, message, "quiet")
        assert isinstance(offset, str)

    _, offset = await resume_from_an_empty_channel(svc, publish, restart)
    assert re.fullmatch(r"[0-9]+:0-0", offset)


@pytest_twisted.ensureDeferred
async def test_a_position_whose_history_was_trimmed_gets_reset(own_redis: RedisServer, run_service: Any) -> None:
    """A client that comes back with the position of an empty channel after more messages than the history
    keeps were published is told reset; within the cap it gets them all."""
    svc = await run_service(redis=own_redis.url, history_size=3)
    await wait_subscribed(svc, own_redis)
    watcher = await v1(svc)
    full = (await subscribe(watcher, "full"))["offset"]
    kept = (await subscribe(watcher, "kept"))["offset"]
    for i in range(5):
        await svc.publish(f"f{i}", "full")
    for i in range(3):
        await svc.publish(f"k{i}", "kept")
    late = await v1(svc)
    assert (await subscribe(late, "full", since=full))["op"] == "reset"
    assert (await late.next_json())["op"] == "subscribed"
    assert (await subscribe(late, "kept", since=kept))["op"] == "subscribed"
    assert [(await late.next_json())["data"] for _ in range(3)] == ["k0", "k1", "k2"]


@pytest_twisted.ensureDeferred
async def test_the_nodes_write_one_history_policy(own_redis: RedisServer, run_service: Any) -> None:
    """The node loads its history policy into Redis as a function library; a node with another policy
    replaces it with a warning; FCALL from any client (here redis-py, as redis-cli would) keeps the message in
    the history with the policy's cap and publishes it with its offset."""
    warnings: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_level") is not None and event["log_level"].name == "warn":
            warnings.append(str(event.get("log_format", "")))

    globalLogPublisher.addObserver(observe)
    try:
        svc = await run_service(redis=own_redis.url, history_size=100)
        await wait_subscribed(svc, own_redis)
        assert not any("history policy" in w for w in warnings)
        other = await run_service(redis=own_redis.url, history_size=2, redis_ping_interval=0)
        await wait_subscribed(other, own_redis)
        await wait_for(lambda: any("replacing the history policy" in w for w in warnings))
    finally:
        globalLogPublisher.removeObserver(observe)
    with own_redis.client() as r:
        (library,) = r.function_list(library="sockdrawer", withcode=True)
        code = dict(zip(library[::2], library[1::2], strict=True))[b"library_code"].decode()
        assert loaded_policy(code) == policy_line("sock-drawer", 2, 300, False)
        client = await v1(svc)
        await subscribe(client, "news")
        offsets = [await deferToThread(r.fcall, function_name("sock-drawer"), 1, "news", f"m{i}") for i in
                   range(3)]
        got = [await client.next_json() for _ in range(3)]
        assert [m["data"] for m in got] == ["m0", "m1", "m2"]
        assert [m["offset"] for m in got] == [o.decode() for o in offsets]
        assert r.xlen(redis_keys("sock-drawer", b"news")[0]) == 2


def test_function_names_per_namespace() -> None:
    """The default namespace's function is sockdrawer_publish; others get their name with every byte outside
    [A-Za-z0-9] escaped, so two namespaces never share a function."""
    assert function_name("sock-drawer") == "sockdrawer_publish"
    assert library_name("sock-drawer") == "sockdrawer"
    assert function_name("my-app") == "sockdrawer_publish_my_2dapp"
    assert function_name("my_app") == "sockdrawer_publish_my_5fapp"
    assert function_name("é") == "sockdrawer_publish__c3_a9"


def test_a_retried_publish_with_an_id_is_kept_once(own_redis: RedisServer) -> None:
    """Client.pub with an id: a second call with the same id (a retry after a timeout) returns the first
    message's offset and keeps nothing new; another id is a new message."""
    from sockdrawer.core.history import library_code

    with own_redis.client() as r:
        r.function_load(library_code("sock-drawer", 100, 300), replace=True)
        client = Client(own_redis.url)
        first = client.pub("once", "orders", id="order-17")
        assert client.pub("once", "orders", id="order-17") == first
        assert client.pub("twice", "orders", id="order-18") != first
        stream = redis_keys("sock-drawer", b"orders")[0]
        assert [e[1][b"d"] for e in r.xrange(stream)] == [b"once", b"twice"]
        with pytest.raises(ValueError):
            client.pub("x", "orders", id="")


def test_without_a_policy_the_client_publishes_plainly(own_redis: RedisServer) -> None:
    """With no node's function in Redis, Client.pub publishes a plain PUBLISH (the number of nodes), keeps
    nothing, and picks the function up once a node loads it."""
    from sockdrawer.core.history import library_code

    with own_redis.client() as r:
        r.function_flush()
        client = Client(own_redis.url)
        assert client.pub("plain", "news") == 0
        assert r.keys("sock-drawer#*") == []
        r.function_load(library_code("sock-drawer", 10, 300), replace=True)
        client._no_function_until = 0.0  # the client looks again after a second; not wait for it here
        assert isinstance(client.pub("kept", "news"), str)


def test_pub_retries_until_redis_is_back(own_redis: RedisServer) -> None:
    """While Redis is down, pub retries (within retry_for) and succeeds once it is back; with retry_for=0 it
    raises PublishError at once."""
    import threading

    from sockdrawer import PublishError

    port = own_redis.port
    own_redis.stop()
    with pytest.raises(PublishError):
        Client(own_redis.url, retry_for=0, timeout=0.5).pub("lost", "news")
    restarter = threading.Timer(0.5, own_redis.start, kwargs={"port": port})
    restarter.start()
    try:
        assert Client(own_redis.url, retry_for=10, timeout=0.5).pub("later", "news") == 0
    finally:
        restarter.join()


def test_memory_history_positions_and_sweep() -> None:
    """The in-memory history: a read of a new channel gives <epoch>:0 and resumes from there; a bad offset
    (not ASCII digits, or too long) is a reset; rings of channels quiet for the TTL are swept, not kept."""
    clock = Clock()
    history = MemoryHistory(10, 5.0, clock.seconds)
    start = history.replay(b"a", None).latest
    assert start is not None and start.endswith(":0")
    offset = history.append(b"a", b"one")
    assert history.replay(b"a", start).messages == ((offset, b"one"),)
    epoch, _ = split_offset(start)
    for bad in (f"{epoch}:\u00b2", f"{epoch}:" + "9" * 5000):
        with pytest.raises(HistoryReset):
            history.replay(b"a", bad)
    for i in range(100):
        history.append(b"quiet/%d" % i, b"x")
    assert len(history) == 101
    clock.advance(6)
    history.append(b"b", b"y")
    assert len(history) == 1


@pytest_twisted.ensureDeferred
async def test_the_node_example_publishes_with_the_policy(own_redis: RedisServer, run_service: Any) -> None:
    """docs/examples/publish_fcall.cjs (Node.js, ioredis) publishes through the nodes' function: a v1 socket gets
    the message with the offset the script prints."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    svc = await run_service(redis=own_redis.url, history_size=10)
    await wait_subscribed(svc, own_redis)
    client = await v1(svc)
    await subscribe(client, "news")
    env = dict(os.environ, SOCKDRAWER_URL=own_redis.url, NODE_PATH=str(root / "tests" / "clients" / "node_modules"))
    done = await deferToThread(subprocess.run, ["node", str(root / "docs" / "examples" / "publish_fcall.cjs"),
                                                "news", "from node"], env=env, capture_output=True, text=True,
                               timeout=60)
    assert done.returncode == 0, done.stderr
    got = await client.next_json()
    assert (got["data"], got["offset"]) == ("from node", done.stdout.strip())


@pytest_twisted.ensureDeferred
async def test_the_redis_cli_example_publishes_with_the_policy(own_redis: RedisServer, run_service: Any) -> None:
    """docs/publishing.rst's ``redis-cli FCALL sockdrawer_publish 1 model_created 'new model!'`` prints the
    message's offset, and a v1 socket gets the message with it."""
    import shutil
    import subprocess

    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is missing: apt-get install redis-tools", pytrace=False)
    svc = await run_service(redis=own_redis.url, history_size=10)
    await wait_subscribed(svc, own_redis)
    client = await v1(svc)
    await subscribe(client, "model_created")
    done = await deferToThread(
        subprocess.run, ["redis-cli", "-p", str(own_redis.port), "FCALL", "sockdrawer_publish", "1", "model_created",
                         "new model!"], capture_output=True, text=True, timeout=30)
    assert re.fullmatch(r"[0-9]+:[0-9]+-[0-9]+", done.stdout.strip()), done.stdout + done.stderr
    got = await client.next_json()
    assert (got["data"], got["offset"]) == ("new model!", done.stdout.strip())


def test_the_explicit_history_script_is_not_retried_after_an_ambiguous_failure(own_redis: RedisServer) -> None:
    """Client(url, history_size=...) publishes with a script that carries no id: after a failure where the
    script may have run (a timeout), pub raises at once instead of retrying (which could keep it twice); a
    refused connection, where it certainly did not run, is retried."""
    import redis as redis_py

    from sockdrawer import PublishError
    from sockdrawer.client import _not_run

    assert not _not_run(redis_py.exceptions.TimeoutError("Timeout reading from socket"))
    assert not _not_run(redis_py.exceptions.ConnectionError("Connection closed by server."))
    assert _not_run(redis_py.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."))
    with own_redis.client() as r:
        r.execute_command("CLIENT", "PAUSE", "3000", "ALL")  # every command waits: a timeout
    client = Client(own_redis.url, history_size=10, timeout=0.3, retry_for=10)
    import time

    started = time.monotonic()
    with pytest.raises(PublishError):
        client.pub("once", "news")
    assert time.monotonic() - started < 5  # not retried for retry_for (10 s)


def test_redis_py_does_not_resend_a_publish_by_itself(own_redis: RedisServer) -> None:
    """The Client's Redis connections have no redis-py retry: a timed-out FCALL is never sent again unchanged
    (without the check that finds the kept message); Client.pub's own retry, with the check, is the only one."""
    client = Client(own_redis.url)
    retry = client._redis.connection_pool.connection_kwargs["retry"]  # type: ignore[union-attr]
    assert retry._retries == 0
