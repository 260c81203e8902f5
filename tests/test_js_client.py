"""
The browser client (js/sockdrawer.js) in headless Chromium, against a real
``twistd sockdrawer`` child and a real, persistent redis-server: through a
Redis restart and a node restart, the page receives every message exactly
once, in order; presence (list, join, leave).  Also: its unit tests under
``node --test``, and the copy served by the node's API.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from childnode import ROOT, ChildNode
from conftest import INSTALL_HINT, free_port
from selenium import webdriver
from test_clients import chromium, serve  # noqa: F401  (fixtures)

from sockdrawer import Client

PAGE = """<!DOCTYPE html>
<meta charset="utf-8">
<title>resume</title>
<script type="module">
  import { SockDrawer } from "./sockdrawer.js";
  window.received = [];
  window.events = [];
  const sd = new SockDrawer("ws://127.0.0.1:%(port)d/", { baseDelay: 200, maxDelay: 1000 });
  sd.addEventListener("state", (e) => window.events.push(e.detail.state));
  sd.addEventListener("reset", (e) => window.events.push("reset " + e.detail.channel));
  sd.subscribe("news", (data, meta) => window.received.push([data, meta.offset]));
</script>
"""


class PersistentRedis:
    """A redis-server child that writes every command to its append-only file, so a restart keeps the streams."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.binary, self.dir, self.port = binary, directory, free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir), "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:  # answering PING, its append-only file loaded
                with redis.Redis(port=self.port, socket_timeout=1) as r:
                    r.ping()
                return
            except redis.exceptions.RedisError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def wait_received(driver: webdriver.Chrome, count: int, timeout: float = 30.0) -> list[list[Any]]:
    deadline = time.monotonic() + timeout
    while True:
        received: list[list[Any]] = driver.execute_script("return window.received || []")
        if len(received) >= count:
            return received
        assert time.monotonic() < deadline, (received, driver.execute_script("return window.events"))
        time.sleep(0.05)


def test_no_gap_through_redis_and_node_restarts(chromium: webdriver.Chrome, serve: Any,  # noqa: F811
                                                persistent_redis: PersistentRedis, tmp_path: Path) -> None:
    """The JS client in Chromium receives m0..m19 exactly once and in order: the first messages of its channel
    are published while the node is down, right after the page subscribed to the channel that had none (it
    resumes from the subscribed position); then Redis restarts (messages published before the node
    resubscribed are caught up from the streams) and the node restarts again (messages published while it was
    down are replayed when the page resubscribes with since). The publisher is a plain Client(url): it follows
    the history policy the node wrote into Redis."""
    port = free_port()
    args = ["--port", f"tcp:{port}:interface=127.0.0.1", "--redis", persistent_redis.url, "--history-size", "1000",
            "--redis-retry-max", "0.5", "--drain-window", "0"]
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(Path(ROOT) / "js" / "sockdrawer.js", site / "sockdrawer.js")
    (site / "index.html").write_text(PAGE % {"port": port})
    publisher = Client(persistent_redis.url)
    node = ChildNode(tmp_path / "node1", args)
    (tmp_path / "node1").mkdir()
    node.start()
    try:
        deadline = time.monotonic() + 10
        while "loaded the history function" not in node.log_text():  # the policy, for the plain Client
            assert time.monotonic() < deadline, node.log_text()
            time.sleep(0.05)
        chromium.get(serve(site) + "/index.html")
        node.wait_sockets(1)
        deadline = time.monotonic() + 10
        while not chromium.execute_script("return (window.events || []).includes('open')"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the channel's first messages come while the node is down: the page resumes from its position
        node.stop()
        for i in range(5):
            assert isinstance(publisher.pub(f"m{i}", "news"), str)  # kept in history: an offset
        (tmp_path / "node0").mkdir()
        node = ChildNode(tmp_path / "node0", args)
        node.start()
        wait_received(chromium, 5)
        # Redis restarts; the node resubscribes and catches up what it missed
        persistent_redis.stop()
        persistent_redis.start()
        for i in range(5, 10):
            publisher.pub(f"m{i}", "news")
        wait_received(chromium, 10)
        # the node restarts; the page reconnects and resumes from its last offset
        node.stop()
        for i in range(10, 15):
            publisher.pub(f"m{i}", "news")
        (tmp_path / "node2").mkdir()
        node = ChildNode(tmp_path / "node2", args)
        node.start()
        node.wait_sockets(1, timeout=30)
        for i in range(15, 20):
            publisher.pub(f"m{i}", "news")
        received = wait_received(chromium, 20)
        assert [data for data, _ in received] == [f"m{i}" for i in range(20)], received
        offsets = [offset for _, offset in received]
        assert len(set(offsets)) == 20 and all(offsets)
        events = chromium.execute_script("return window.events")
        assert not any(e.startswith("reset") for e in events), events
    finally:
        node.stop()


def test_js_unit_tests_pass_under_node() -> None:
    """`node --test js/test/` passes (reconnect backoff, token refresh, resubscribe with since, send/reply,
    presence)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is missing: install it with 'apt-get install nodejs'", pytrace=False)
    result = subprocess.run([node, "--test", "js/test/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout


def test_node_serves_the_client(tmp_path: Path) -> None:
    """GET /sockdrawer.js on the API port is the browser client, as a JavaScript module."""
    with ChildNode(tmp_path, []) as node:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/sockdrawer.js", timeout=10) as r:
            body = r.read()
            assert r.headers["Content-Type"].startswith("text/javascript")
    assert body == (Path(ROOT) / "js" / "sockdrawer.js").read_bytes()
    assert json.loads((Path(ROOT) / "js" / "package.json").read_text())["types"] == "sockdrawer.d.ts"


PRESENCE_PAGE = """<!DOCTYPE html>
<meta charset="utf-8">
<title>presence</title>
<script type="module">
  import { SockDrawer } from "./sockdrawer.js";
  window.seen = [];
  const sd = new SockDrawer("ws://127.0.0.1:%(port)d/");
  sd.subscribe("room/1", null, {
    onPresence: (clients, { self }) => window.seen.push(["list", clients.length, self]),
    onJoin: (e) => window.seen.push(["join", e.user, e.client]),
    onLeave: (e) => window.seen.push(["leave", e.user, e.client]),
  });
</script>
"""


def test_presence_in_chromium(chromium: webdriver.Chrome, serve: Any, tmp_path: Path) -> None:  # noqa: F811
    """The JS client in Chromium gets the presence list (itself in it), then a join and a leave as another
    socket subscribes with presence and closes."""
    from websockets.sync.client import connect

    port = free_port()
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(Path(ROOT) / "js" / "sockdrawer.js", site / "sockdrawer.js")
    (site / "index.html").write_text(PRESENCE_PAGE % {"port": port})
    (tmp_path / "node").mkdir()
    node = ChildNode(tmp_path / "node", ["--port", f"tcp:{port}:interface=127.0.0.1"])
    node.start()

    def seen(count: int) -> list[list[Any]]:
        deadline = time.monotonic() + 10
        while True:
            got: list[list[Any]] = chromium.execute_script("return window.seen || []")
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, got
            time.sleep(0.05)

    try:
        chromium.get(serve(site) + "/index.html")
        [(kind, size, me)] = seen(1)
        assert (kind, size) == ("list", 1) and me
        with connect(f"ws://127.0.0.1:{port}/", subprotocols=["sockdrawer.v1"], open_timeout=5) as other:
            other.send(json.dumps({"op": "subscribe", "channel": "room/1", "presence": True}))
            assert json.loads(other.recv(timeout=5))["op"] == "subscribed"
            theirs = json.loads(other.recv(timeout=5))["self"]
            assert seen(2)[1] == ["join", None, theirs]
        assert seen(3)[2] == ["leave", None, theirs]
    finally:
        node.stop()
