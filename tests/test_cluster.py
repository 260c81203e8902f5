"""
Several nodes on one redis-server, as real ``twistd sockdrawer`` children.
"""

from __future__ import annotations

import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from childnode import ChildNode
from websockets.sync.client import connect

from sockdrawer import Client


@pytest.mark.parametrize("subscribe", ["pattern", "channels"])
def test_three_nodes_exactly_once_and_sigkill_loses_only_its_own(tmp_path: Path, redis_server: Any,
                                                                 subscribe: str) -> None:
    """With three nodes on one Redis (subscribed by pattern, or to their channels), every socket on every node
    gets every message exactly once, in order; a node killed with SIGKILL loses only its own sockets; a
    listener's broker events fire once per node."""
    nodes = []
    for i in range(3):
        (tmp_path / f"n{i}").mkdir()
        nodes.append(ChildNode(tmp_path / f"n{i}", ["--redis", redis_server.url, "--listener", "listeners:Witness",
                                                    "--name", f"cluster-{subscribe}", "--subscribe", subscribe]
                               ).start())
    stack = ExitStack()
    try:
        sockets = [[stack.enter_context(connect(node.url("/news"), open_timeout=5)) for _ in range(2)]
                   for node in nodes]
        for node in nodes:
            node.wait_sockets(2)
        name = f"cluster-{subscribe}"
        if subscribe == "channels":  # a socket opens before its node's SUBSCRIBE lands
            wait_numsub(redis_server, f"{name}/news", 3)
        publisher = Client(redis_server.url, name=name)
        assert publisher.pub("warm", "news") == 3  # three nodes subscribed
        for i in range(20):
            publisher.pub(f"m{i}", "news")
        for per_node in sockets:
            for ws in per_node:
                got = [ws.recv(timeout=5) for _ in range(21)]
                assert got == ["warm"] + [f"m{i}" for i in range(20)]
        assert nodes[0].proc is not None
        nodes[0].proc.send_signal(signal.SIGKILL)
        nodes[0].proc.wait(10)
        assert publisher.pub("after", "news") == 2
        for per_node in sockets[1:]:
            for ws in per_node:
                assert ws.recv(timeout=5) == "after"
        # a listener's broker events fire once per node: each surviving node's Witness reports once
        with connect(nodes[1].url("/witness/seen"), open_timeout=5) as watcher:
            nodes[1].wait_sockets(3)
            if subscribe == "channels":
                wait_numsub(redis_server, f"{name}/witness/seen", 1)
            publisher.pub("who sees this?", "witness")
            reports = {watcher.recv(timeout=5) for _ in range(2)}
            assert len(reports) == 2 and all(r.startswith("seen by ") for r in reports)
            publisher.pub("fence", "witness/seen")
            assert watcher.recv(timeout=5) == "fence", "a third report: some node ran its listener twice"
    finally:
        stack.close()
        for node in nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()


def wait_numsub(redis: Any, channel: str, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` connections are subscribed to Redis channel ``channel`` (PUBSUB NUMSUB)."""
    deadline = time.monotonic() + timeout
    with redis.client() as r:
        while r.pubsub_numsub(channel)[0][1] != count:
            assert time.monotonic() < deadline, f"{channel} never had {count} subscribers"
            time.sleep(0.02)
