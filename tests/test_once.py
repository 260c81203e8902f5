"""
Handlers declared with ``@on(channel, once=True)`` run on one node of the
cluster per broker message, against a real redis-server and three nodes.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import RedisServer, wait_for, wait_subscribed
from twisted.internet.threads import deferToThread

from sockdrawer import Client, Source, Subscriber, on

# (node id, handler, message) for every call
CALLS: list[tuple[int, str, Any]] = []


class Orders(Subscriber):
    @on("orders", once=True)
    def fulfil(self, message: Any, source: Source) -> None:
        CALLS.append((id(self), "fulfil", message))

    @on("orders")
    def audit(self, message: Any) -> None:
        CALLS.append((id(self), "audit", message))


def test_once_is_collected_from_the_decorator() -> None:
    """Only the methods declared with once=True are once handlers."""
    assert Orders.once_handlers == frozenset({"fulfil"})
    assert set(Orders.handlers["orders"]) == {("fulfil", True), ("audit", False)}


@pytest_twisted.ensureDeferred
async def test_once_handlers_run_on_one_node_per_message(own_redis: RedisServer, run_service: Any) -> None:
    """Three nodes on one Redis: an ordinary handler runs on every node, a once handler on exactly one node per
    message, for messages published with history (named by offset) and without (named by their bytes); a frame
    from a browser runs it on its own node."""
    CALLS.clear()
    nodes = [await run_service(redis=own_redis.url, listeners=(Orders,), api=None) for _ in range(3)]
    for node in nodes:
        await wait_subscribed(node, own_redis)
    await wait_for(lambda: own_redis.pattern_subscribers() >= 3)
    plain, with_history = Client(own_redis.url), Client(own_redis.url, history_size=100)
    expected = [f"plain {i}" for i in range(20)] + [f"kept {i}" for i in range(20)]

    def publish() -> None:
        for message in expected[:20]:
            plain.pub(message, channel="orders")
        for message in expected[20:]:
            with_history.pub(message, channel="orders")

    await deferToThread(publish)
    registries = [node.listeners for node in nodes]
    await wait_for(lambda: all(r.once_won + r.once_lost == len(expected) for r in registries))
    fulfilled = [message for _, handler, message in CALLS if handler == "fulfil"]
    audited = [message for _, handler, message in CALLS if handler == "audit"]
    assert sorted(fulfilled) == sorted(expected)
    assert sorted(audited) == sorted(expected * 3)
    assert sum(r.once_won for r in registries) == len(expected)
    # the claims are Redis keys under the namespace, kept for a bounded time
    with own_redis.client() as r:
        keys = list(r.scan_iter(match="sock-drawer:once:*"))
        assert len(keys) == len(expected)
        assert all(0 < r.pttl(key) <= 60_000 for key in keys)


@pytest_twisted.ensureDeferred
async def test_once_handlers_run_everywhere_on_the_embedded_broker(run_service: Any) -> None:
    """With the embedded broker (one node), a once handler runs for every published message."""
    CALLS.clear()
    svc = await run_service(listeners=(Orders,), api=None)
    for i in range(5):
        await svc.publish(f"m{i}", "orders")
    await wait_for(lambda: len([c for c in CALLS if c[1] == "fulfil"]) == 5)
    assert svc.listeners.once_won == 0 and svc.listeners.once_lost == 0  # no claims made


@pytest_twisted.ensureDeferred
async def test_a_once_handler_does_not_run_when_its_claim_fails(own_redis: RedisServer, run_service: Any) -> None:
    """When the claim cannot be made (Redis refuses the command), the once handler does not run on that node,
    the failure is counted like a handler's, and the ordinary handler still runs."""
    CALLS.clear()
    svc = await run_service(redis=own_redis.url, listeners=(Orders,), api=None)
    await wait_subscribed(svc, own_redis)
    # an ACL without SET: a real refusal from a real server
    with own_redis.client() as r:
        r.execute_command("ACL", "SETUSER", "default", "-set")
        try:
            r.publish("sock-drawer/orders", "refused")
            await wait_for(lambda: svc.listeners.errors >= 1)
        finally:
            r.execute_command("ACL", "SETUSER", "default", "+set")
    assert [c[1] for c in CALLS] == ["audit"]
    assert svc.listeners.once_won == 0
