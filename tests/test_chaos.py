"""
Chaos: sockdrawer.v1's promise (a client that resumes with ``since`` misses
nothing) under the treatment a user's network and operations give it.

A ``twistd sockdrawer`` child with ``--history-size 1000``; 20 v1 clients on
the ``websockets`` library with its default settings, each on 3 of 10
channels, and ``js/sockdrawer.js`` in headless Chromium on 4 of them, all
through :class:`chaosproxy.ChaosProxy`, which resets every connection after
a random 0.3-2 s.  The Python clients do what ``js/sockdrawer.js`` does: on
every (re)connect, after a backoff with full jitter, they subscribe each
channel with ``since`` = the last offset seen on it (a message's, or the
``subscribed`` one when no message came yet; none after a ``reset``).
Every subscription is made before the channel's first message.  Then a plain
``Client(url)`` publishes 10 channels x 100 messages in 100 rounds, each
round after 4 more connections through the proxy (so publishing interleaves
with the churn at any machine speed), retrying a failed publish; meanwhile:

- on Redis: the node's pub/sub link is killed (``CLIENT KILL TYPE pubsub``)
  after rounds 25 and 75, and the node is SIGKILLed after round 50 and
  restarted on the same port while publishing goes on.  Every subscription
  gets every message exactly once, in order, and never ``reset``;
- on the embedded broker (publishing through the node's HTTP API, retried
  while the node is down): the node is SIGKILLed after round 50 and
  restarted, which starts a new epoch.  Every subscription gets, exactly
  once and in order, the messages from the first up to some point before the
  restart, then one ``reset``, then exactly the messages after the offset of
  the ``subscribed`` that follows it.

Neither node logs a traceback.  The seed of the proxy's cut times, the
clients' channels' order and their backoff is printed and named in every
failure; ``CHAOS_SEED=<seed>`` runs with it again.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from chaosproxy import ChaosProxy
from childnode import ROOT, ChildNode
from conftest import RedisServer, free_port
from selenium import webdriver
from test_clients import chromium, serve  # noqa: F401  (fixtures)
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException
from websockets.typing import Subprotocol

from sockdrawer import Client, PublishError

V1 = Subprotocol("sockdrawer.v1")
CHANNELS = [f"c{i}" for i in range(10)]
#: messages per channel, published in rounds (one message per channel each)
ROUNDS = 100
LAST = ROUNDS - 1
CLIENTS = 20
#: the channels the page in Chromium subscribes to
PAGE_CHANNELS = ["c0", "c3", "c6", "c9"]
#: connections through the proxy after every subscription is made and before the first round: the
#: churn is under way (clients between connections) when the channels' first messages go out
WARM_UP_CONNECTIONS = 2 * (CLIENTS + 1)
#: new connections through the proxy before each round
ROUND_CONNECTIONS = 4
#: after which rounds (counted from 1) the chaos comes
KILL_PUBSUB_AFTER = (25, 75)
RESTART_AFTER = 50
#: the clients' reconnect backoff, as js/sockdrawer.js's options (baseDelay, maxDelay, stableAfter), in seconds
BASE_DELAY, MAX_DELAY, STABLE_AFTER = 0.2, 1.0, 5.0
#: the longest wait for any one stage
STAGE_TIMEOUT = 30.0

PAGE = """<!DOCTYPE html>
<meta charset="utf-8">
<title>chaos</title>
<script type="module">
  import { SockDrawer } from "./sockdrawer.js";
  const channels = %(channels)s;
  let seed = %(seed)d;
  function random() {  // mulberry32: the backoff's jitter, seeded
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  window.log = Object.fromEntries(channels.map((c) => [c, []]));
  window.opens = 0;
  window.errors = [];
  const waiting = [];
  const done = {
    subscribed: () => channels.every((c) => log[c].some((e) => e[0] === "subscribed")),
    finished: () => channels.every((c) => log[c].some((e) => e[0] === "message" && e[1] === "%(last)d")),
  };
  function changed() {
    for (const w of waiting.splice(0)) {
      if (done[w.what]()) w.resolve(true); else waiting.push(w);
    }
  }
  window.until = (what, ms) => new Promise((resolve) => {
    if (done[what]()) return resolve(true);
    waiting.push({ what, resolve });
    setTimeout(() => resolve(done[what]()), ms);
  });
  const sd = new SockDrawer("ws://127.0.0.1:%(port)d/",
                            { baseDelay: %(base)d, maxDelay: %(cap)d, stableAfter: %(stable)d, random });
  sd.addEventListener("state", (e) => { if (e.detail.state === "open") window.opens += 1; });
  sd.addEventListener("subscribed", (e) => {
    const l = log[e.detail.channel];
    if (l) { l.push(["subscribed", null, e.detail.offset]); changed(); }
  });
  sd.addEventListener("reset", (e) => { const l = log[e.detail.channel]; if (l) l.push(["reset", null, null]); });
  sd.addEventListener("error", (e) => window.errors.push(JSON.stringify(e.detail)));
  for (const c of channels) {
    sd.subscribe(c, (data, meta) => { log[c].push(["message", data, meta.offset]); changed(); });
  }
</script>
"""


class Event(NamedTuple):
    """One thing a subscription received: ``subscribed`` / ``message`` / ``reset`` / ``error``."""

    kind: str
    number: int | None  # a message's number on its channel (an error's status)
    offset: str | None


def _position(offset: str) -> tuple[str, tuple[int, ...]]:
    epoch, _, position = offset.partition(":")
    return epoch, tuple(int(part) for part in position.split("-"))


class V1Client:
    """
    A sockdrawer.v1 client on ``websockets`` with its default settings, doing what js/sockdrawer.js does:
    reconnect with backoff and full jitter, and on every open subscribe each channel with ``since`` = the last
    offset seen on it (a message's or ``subscribed``'s; forgotten at ``reset``).
    """

    def __init__(self, url: str, channels: list[str], rng: random.Random) -> None:
        self.url = url
        self.channels = channels
        self.rng = rng
        self.log: dict[str, list[Event]] = {c: [] for c in channels}
        self.offsets: dict[str, str | None] = dict.fromkeys(channels)
        self.subscribed: set[str] = set()
        self.finished: set[str] = set()
        self.all_subscribed = asyncio.Event()
        self.all_finished = asyncio.Event()
        self.opens = 0
        self.resumed = 0  # subscribes with since
        self.fresh = 0  # subscribes without since
        self.failures: Counter[str] = Counter()
        self.strays: list[Any] = []

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            opened = None
            try:
                async with connect(self.url, subprotocols=[V1]) as ws:
                    opened = loop.time()
                    self.opens += 1
                    for channel in self.channels:
                        await ws.send(json.dumps(self._subscribe(channel)))
                    async for frame in ws:
                        self._receive(frame)
            except (OSError, TimeoutError, WebSocketException) as e:
                self.failures[type(e).__name__] += 1
            if opened is not None and loop.time() - opened >= STABLE_AFTER:
                attempt = 0
            # js/sockdrawer.js's reconnect delay: full jitter over min(cap, base * 2^attempt)
            await asyncio.sleep(self.rng.random() * min(MAX_DELAY, BASE_DELAY * 2**attempt))
            attempt += 1

    def _subscribe(self, channel: str) -> dict[str, Any]:
        message: dict[str, Any] = {"op": "subscribe", "channel": channel}
        since = self.offsets[channel]
        if since is not None:
            message["since"] = since
            self.resumed += 1
        else:
            self.fresh += 1
        return message

    def _receive(self, frame: str | bytes) -> None:
        message = json.loads(frame)
        channel = message.get("channel")
        if channel not in self.log:
            self.strays.append(message)
            return
        op, offset, log = message["op"], message.get("offset"), self.log[channel]
        if op == "message":
            index = int(message["data"])
            log.append(Event("message", index, offset))
            if offset is not None:
                self.offsets[channel] = offset
            if index == LAST:
                self.finished.add(channel)
                if len(self.finished) == len(self.channels):
                    self.all_finished.set()
        elif op == "subscribed":
            log.append(Event("subscribed", None, offset))
            if offset is not None:
                self.offsets[channel] = offset
            self.subscribed.add(channel)
            if len(self.subscribed) == len(self.channels):
                self.all_subscribed.set()
        elif op == "reset":
            log.append(Event("reset", None, None))
            self.offsets[channel] = None
        elif op == "error":
            log.append(Event("error", message.get("status"), None))
        else:
            self.strays.append(message)


@dataclass
class Run:
    """One scenario's moving parts and figures."""

    broker: str
    seed: int
    tmp: Path
    redis: RedisServer | None
    ws_port: int = field(default_factory=free_port)
    api_port: int = field(default_factory=free_port)
    nodes: list[ChildNode] = field(default_factory=list)
    node_up: threading.Event = field(default_factory=threading.Event)
    #: channel -> the offset pub() returned for each message (None: it returned no offset)
    published: dict[str, list[str | None]] = field(default_factory=lambda: {c: [] for c in CHANNELS})
    publish_retries: int = 0
    pubsub_killed: list[int] = field(default_factory=list)
    killed_at: float = 0.0
    #: from the SIGKILL until the new node listens (and, on Redis, has subscribed)
    restart_seconds: float = 0.0

    def args(self) -> list[str]:
        args = ["--port", f"tcp:{self.ws_port}:interface=127.0.0.1",
                "--api", f"tcp:{self.api_port}:interface=127.0.0.1", "--history-size", "1000"]
        if self.redis is not None:
            args += ["--redis", self.redis.url, "--redis-retry-max", "0.5"]
        return args

    def start_node(self) -> ChildNode:
        directory = self.tmp / f"node{len(self.nodes) + 1}"
        directory.mkdir()
        # the sockdrawer next to these tests, also when they run from another checkout
        env = {"PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), ROOT])}
        node = ChildNode(directory, self.args(), env=env)
        self.nodes.append(node)
        node.start()
        self.node_up.set()
        return node

    def kill_node(self) -> None:
        """SIGKILL the node (between two publishes: none is in flight, so a retry cannot duplicate one)."""
        self.node_up.clear()
        self.killed_at = time.monotonic()
        self.nodes[-1].stop(signal.SIGKILL)

    def restart_node(self) -> None:
        """Start another node on the same ports."""
        self.start_node()
        self.restart_seconds = time.monotonic() - self.killed_at

    def kill_pubsub(self) -> None:
        assert self.redis is not None
        with self.redis.client() as r:
            self.pubsub_killed.append(int(r.client_kill_filter(_type="pubsub")))

    def publisher(self) -> Client:
        if self.redis is not None:
            return Client(self.redis.url)
        return Client(f"http://127.0.0.1:{self.api_port}")

    def publish_round(self, client: Client, index: int) -> None:
        for channel in CHANNELS:
            self.published[channel].append(self._publish(client, channel, index))

    def _publish(self, client: Client, channel: str, index: int) -> str | None:
        deadline = time.monotonic() + STAGE_TIMEOUT
        while True:
            try:
                result = client.pub(str(index), channel)
                return result if isinstance(result, str) else None
            except PublishError:
                self.publish_retries += 1
                if time.monotonic() > deadline:
                    raise
                if self.node_up.is_set():
                    time.sleep(0.05)  # a failure while the node is up: back off a little
                # the node is down (the embedded broker's API): retry once it is back
                elif not self.node_up.wait(STAGE_TIMEOUT):
                    raise


def client_channels(i: int, rng: random.Random) -> list[str]:
    """Client ``i``'s 3 channels (6 clients on each channel), in a seeded order."""
    channels = [CHANNELS[(i + step) % len(CHANNELS)] for step in (0, 3, 6)]
    rng.shuffle(channels)
    return channels


async def wait_page(driver: webdriver.Chrome, what: str, timeout: float) -> bool:
    script = "window.until(arguments[0], arguments[1]).then(arguments[arguments.length - 1])"
    done: bool = await asyncio.to_thread(driver.execute_async_script, script, what, int(timeout * 1000))
    return done


async def scenario(run: Run, driver: webdriver.Chrome, serve_site: Callable[[str | os.PathLike[str]], str],
                   ) -> tuple[dict[str, dict[str, list[Event]]], dict[str, Any]]:
    """Run the whole scenario; return every subscription's events (by subscriber, by channel) and figures."""
    rng = random.Random(run.seed)
    await asyncio.to_thread(run.start_node)
    proxy = ChaosProxy(("127.0.0.1", run.ws_port), seed=run.seed, cut_after=(0.3, 2.0))
    await proxy.start()
    site = run.tmp / "site"
    site.mkdir()
    shutil.copy(Path(ROOT) / "js" / "sockdrawer.js", site / "sockdrawer.js")
    (site / "index.html").write_text(PAGE % {
        "channels": json.dumps(PAGE_CHANNELS), "seed": run.seed % 2**31, "last": LAST, "port": proxy.port,
        "base": BASE_DELAY * 1000, "cap": MAX_DELAY * 1000, "stable": STABLE_AFTER * 1000})
    driver.set_script_timeout(STAGE_TIMEOUT + 10)
    url = f"ws://127.0.0.1:{proxy.port}/"
    clients = [V1Client(url, client_channels(i, rng), random.Random(rng.random())) for i in range(CLIENTS)]
    tasks = [asyncio.create_task(c.run()) for c in clients]
    publisher = run.publisher()
    started = time.monotonic()
    restart: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(driver.get, serve_site(site) + "/index.html")
        # every subscription is made before its channel's first message
        try:
            await asyncio.wait_for(asyncio.gather(*(c.all_subscribed.wait() for c in clients)), STAGE_TIMEOUT)
        except TimeoutError:
            waiting = {i: sorted(set(c.channels) - c.subscribed) for i, c in enumerate(clients)}
            raise AssertionError(f"not subscribed in {STAGE_TIMEOUT} s: {waiting}") from None
        assert await wait_page(driver, "subscribed", STAGE_TIMEOUT), "the page did not subscribe"
        await proxy.wait_accepted(proxy.accepted + WARM_UP_CONNECTIONS, STAGE_TIMEOUT)
        started = time.monotonic()
        for index in range(ROUNDS):
            await proxy.wait_accepted(proxy.accepted + ROUND_CONNECTIONS, STAGE_TIMEOUT)
            await asyncio.to_thread(run.publish_round, publisher, index)
            done = index + 1
            if run.redis is not None and done in KILL_PUBSUB_AFTER:
                if restart is not None:
                    await restart  # the restarted node has subscribed
                await asyncio.to_thread(run.kill_pubsub)
            if done == RESTART_AFTER:
                await asyncio.to_thread(run.kill_node)
                restart = asyncio.create_task(asyncio.to_thread(run.restart_node))
        if restart is not None:
            await restart
        publishing = time.monotonic() - started
        # every subscription gets its channel's last message (or the check below says what it missed)
        finished = asyncio.gather(*(c.all_finished.wait() for c in clients))
        try:
            await asyncio.wait_for(finished, STAGE_TIMEOUT)
        except TimeoutError:
            pass
        await wait_page(driver, "finished", 5.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.stop()
        publisher.close()
    page: dict[str, list[list[Any]]] = await asyncio.to_thread(driver.execute_script, "return window.log")
    page_opens: int = await asyncio.to_thread(driver.execute_script, "return window.opens")
    page_errors: list[str] = await asyncio.to_thread(driver.execute_script, "return window.errors")
    events = {f"client{i}": c.log for i, c in enumerate(clients)}
    events["chromium"] = {channel: [Event(kind, None if data is None else int(data), offset)
                                    for kind, data, offset in log] for channel, log in page.items()}
    figures: dict[str, Any] = {
        "seed": run.seed,
        "published": sum(len(v) for v in run.published.values()),
        "publish_retries": run.publish_retries,
        "publishing_seconds": round(publishing, 1),
        "proxy": proxy.figures(),
        "client_connections": sum(c.opens for c in clients),
        "page_connections": page_opens,
        "subscribes_with_since": sum(c.resumed for c in clients),
        "subscribes_without_since": sum(c.fresh for c in clients),
        "client_failures": dict(sum((c.failures for c in clients), Counter())),
        "strays": [m for c in clients for m in c.strays][:5],
        "page_errors": page_errors[:5],
        "pubsub_killed": run.pubsub_killed,
        "restart_seconds": round(run.restart_seconds, 1),
    }
    return events, figures


def check(broker: str, events: list[Event], offsets: list[str | None]) -> tuple[list[str], list[int]]:
    """
    What is wrong with one subscription's events (descriptions), and which messages it missed.

    ``offsets`` are the offsets pub() returned for the channel's messages, in order.
    """
    problems: list[str] = []
    if not events or events[0].kind != "subscribed":
        problems.append(f"first event {events[:1]}, not subscribed")
    errors = [e.number for e in events if e.kind == "error"]
    if errors:
        problems.append(f"errors {errors}")
    resets = [i for i, e in enumerate(events) if e.kind == "reset"]
    received = [e.number for e in events if e.kind == "message"]
    if broker == "redis":
        if resets:
            problems.append(f"{len(resets)} reset(s)")
        expected = list(range(ROUNDS))
        return _compare(received, expected, problems, "")
    # embedded: one reset, after the restart
    if len(resets) != 1:
        problems.append(f"{len(resets)} resets, not 1")
        return _compare(received, list(range(ROUNDS)), problems, "")
    before = [e.number for e in events[:resets[0]] if e.kind == "message" and e.number is not None]
    after_events = events[resets[0] + 1:]
    after = [e.number for e in after_events if e.kind == "message"]
    # before: the first messages, up to some point before the restart
    head = [i for i in range(RESTART_AFTER) if i <= max(before, default=-1)]
    problems, missed = _compare(before, head, problems, "before the reset: ")
    if any(i is None or i >= RESTART_AFTER for i in before):
        problems.append(f"messages of after the restart before the reset: {before}")
    # after: exactly what came after the offset of the subscribed that follows the reset
    if not after_events or after_events[0].kind != "subscribed":
        problems.append(f"after the reset comes {after_events[:1]}, not subscribed")
        return problems, missed
    since = after_events[0].offset
    expected = []
    for i in range(RESTART_AFTER, ROUNDS):
        offset = offsets[i]
        assert offset is not None, "the HTTP API answers each message's offset"
        if since is None or _position(offset)[0] != _position(since)[0] or _position(offset) > _position(since):
            expected.append(i)
    if since is not None and _position(since)[0] != _position(offsets[RESTART_AFTER] or "")[0]:
        problems.append(f"subscribed after the reset at {since}, not in the new epoch")
    problems, missed_after = _compare(after, expected, problems, "after the reset: ")
    return problems, missed + missed_after


def _compare(received: Sequence[int | None], expected: list[int], problems: list[str],
             where: str) -> tuple[list[str], list[int]]:
    if received == expected:
        return problems, []
    counts = Counter(received)
    missed = [i for i in expected if i not in counts]
    duplicates = sorted(i for i, n in counts.items() if n > 1 and i is not None)
    extra = sorted({i for i in received if i not in expected and i is not None})
    if missed:
        problems.append(f"{where}missed {len(missed)}: {missed[:20]}")
    if duplicates:
        problems.append(f"{where}duplicates: {duplicates[:20]}")
    if extra:
        problems.append(f"{where}unexpected: {extra[:20]}")
    unique = [i for i in received if i is not None]
    if not duplicates and unique != sorted(unique):
        problems.append(f"{where}out of order: {received}")
    return problems, missed


def verdict(broker: str, events: dict[str, dict[str, list[Event]]],
            published: dict[str, list[str | None]]) -> tuple[list[str], dict[str, Any]]:
    """Every subscription's problems, and the delivery figures."""
    problems: list[str] = []
    missed: dict[str, list[int]] = {}
    delivered = resets = subscriptions = 0
    for name, channels in events.items():
        for channel, log in channels.items():
            subscriptions += 1
            delivered += sum(1 for e in log if e.kind == "message")
            resets += sum(1 for e in log if e.kind == "reset")
            wrong, lost = check(broker, log, published[channel])
            if wrong:
                problems.append(f"{name} {channel}: " + "; ".join(wrong))
            if lost:
                missed[f"{name} {channel}"] = lost
    lost_all = [i for lost in missed.values() for i in lost]
    figures: dict[str, Any] = {"subscriptions": subscriptions, "delivered": delivered, "resets": resets,
               "missed": len(lost_all), "subscriptions_that_missed": len(missed)}
    if lost_all:
        figures["missed_indexes_max"] = max(lost_all)
        figures["missed_among_first"] = sorted(Counter(lost_all).items())[:10]
    return problems, figures


@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_chaos(broker: str, request: pytest.FixtureRequest, chromium: webdriver.Chrome,  # noqa: F811
               serve: Any, tmp_path: Path) -> None:  # noqa: F811
    """The scenario of this module's docstring, on Redis and on the embedded broker."""
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"chaos seed {seed} ({broker}); repeat with CHAOS_SEED={seed}")
    server = request.getfixturevalue("own_redis") if broker == "redis" else None
    run = Run(broker, seed, tmp_path, server)
    started = time.monotonic()
    try:
        events, figures = asyncio.run(scenario(run, chromium, serve))
    finally:
        for node in run.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.stop()
    problems, delivery = verdict(broker, events, run.published)
    figures.update(delivery, seconds=round(time.monotonic() - started, 1))
    print("chaos figures:", json.dumps(figures))
    for node in run.nodes:
        node.assert_no_traceback()
    assert figures["published"] == len(CHANNELS) * ROUNDS
    if broker == "redis":
        assert len(run.pubsub_killed) == 2 and all(n >= 1 for n in run.pubsub_killed), run.pubsub_killed
    assert len(run.nodes) == 2
    summary = f"seed {seed} ({broker}): {len(problems)} of {figures['subscriptions']} subscriptions went wrong"
    if figures["missed"]:
        summary += (f"; missed {figures['missed']} messages in {figures['subscriptions_that_missed']} "
                    f"subscriptions, all among the first {figures['missed_indexes_max'] + 1} of their channel"
                    if figures["missed_indexes_max"] < 10 else f"; missed {figures['missed']} messages")
    assert not problems, f"{summary}\nfigures {figures}\n" + "\n".join(problems)

