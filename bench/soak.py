#!/usr/bin/env python3
"""
sockdrawer soak test: minutes of connection churn, publishes with history,
Redis restarts and a node restart, with the node's RSS, open file
descriptors and sockets sampled every second, and every delivery checked.

One node (``twistd -n sockdrawer ... --history-size N``) on a private
``redis-server`` (AOF with ``appendfsync always``, so that a restart keeps
the channels' history), both on loopback.  In this process:

* ``--clients`` sockdrawer.v1 clients (the ``websockets`` library) that do
  what ``js/sockdrawer.js`` does: subscribe to ``--per-client`` channels,
  with ``since`` = the last offset seen on each (a message's, or the
  ``subscribed`` one), stay ``--stay`` seconds, disconnect (a close
  handshake, or a dropped TCP connection), and come back a moment later
  resuming from there; after a connection the node closed or refused, they
  back off like the browser client (full jitter, 0.5 s doubling to 30 s);
* a publisher thread: a ``sockdrawer.Client``, ``--rate`` messages a second
  round robin over ``--channels`` channels, each message numbered per
  channel; a plain ``Client(redis_url)`` that follows the nodes' history
  policy (with a message id, so publishing again is safe) where the build
  has it, else ``Client(redis_url, history_size=N)`` (``--publisher``); a
  publish that fails is tried again (with ``explicit``, after looking for it
  in the channel's stream: it may have been appended before the link broke);
* the schedule: ``--redis-restarts`` Redis restarts on the same port
  (SIGTERM and SIGKILL in turn, ``--redis-down`` seconds down) and
  ``--node-restarts`` node restarts (``--node-signal``, at once on the same
  ports);
* a sampler: every second the node's VmRSS (/proc/PID/status), open file
  descriptors (/proc/PID/fd, and how many are sockets), its
  ``sockdrawer_sockets`` and other figures from ``GET /metrics``, and the
  clients' counts.

When the time is up, publishing stops, every client connects once more and
catches up, and the deliveries are checked: every subscription of every
client must have received every message published on its channel after its
first ``subscribed`` offset, exactly once and in order (a ``reset`` starts
it over from the ``subscribed`` offset that follows; what it skipped is
counted apart).  Prints a summary, writes the samples and the check as JSON
and a plot of RSS, fds, sockets and deliveries over time.  Exits 1 when a
message was lost, duplicated or out of order.

Examples:
  python bench/soak.py --quick                    # about a minute
  python bench/soak.py --rev HEAD --plot docs/_static/soak.png   # the 10-minute run of docs/operations.rst
  python bench/soak.py --minutes 30 --clients 200 --rate 100
  python bench/soak.py --from-json bench/results/soak-<run id>/soak.json --plot /tmp/soak.png
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import run as bench  # bench/run.py: processes, /proc helpers, --rev snapshots

NAMESPACE = "sock-drawer"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
#: a message key: (epoch, stream id ms, stream id sequence); offsets of one channel sort as their keys
Key = tuple[int, int, int]
NOWHERE: Key = (-1, -1, -1)


def parse_offset(offset: Any) -> Key | None:
    """``"<epoch>:<ms>-<seq>"`` (Redis) or ``"<epoch>:<n>"`` (embedded) as a key; None for anything else."""
    if not isinstance(offset, str):
        return None
    epoch, _, position = offset.partition(":")
    ms, _, seq = position.partition("-")
    try:
        return int(epoch), int(ms), int(seq or 0)
    except ValueError:
        return None


# ---------------------------------------------------------------- state shared by the tasks


@dataclass
class Published:
    """The publisher's ledger: per channel, the key, number and time of every message whose publish succeeded."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    by_channel: dict[str, list[tuple[Key, int, float]]] = field(default_factory=dict)
    count: int = 0
    errors: int = 0  # pub() calls that raised
    found: int = 0  # of those, messages found in the stream all the same (appended before the link broke)
    last_error: str = ""

    def add(self, channel: str, key: Key, n: int, t: float) -> None:
        with self.lock:
            self.by_channel.setdefault(channel, []).append((key, n, t))
            self.count += 1

    def last(self, channel: str) -> Key:
        with self.lock:
            entries = self.by_channel.get(channel)
            return entries[-1][0] if entries else NOWHERE


@dataclass
class Totals:
    """What the clients count (read by the sampler)."""

    deliveries: int = 0
    connects: int = 0  # connections opened (handshake done)
    connected: int = 0  # open now
    failed: int = 0  # attempts that did not open (refused, 503, time-out)
    closed_clean: int = 0  # our close handshake
    closed_abort: int = 0  # our dropped TCP connection
    closed_by_server: int = 0  # the node closed it, or the connection broke
    resets: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # {"op":"error"} by status
    stray: int = 0  # frames for no subscription, or not JSON


@dataclass
class Track:
    """One channel of one client: what js/sockdrawer.js keeps (the offset), and every event, for the check."""

    channel: str
    offset: str | None = None
    #: (t, "s", key) subscribed, (t, "m", key, n) message, (t, "r") reset, (t, "e", status) error,
    #: (t, "c", connection) connected (subscribe sent), (t, "x", why) disconnected
    log: list[tuple[Any, ...]] = field(default_factory=list)
    start: Key | None = None  # the segment's start: the first subscribed offset, or the one after a reset
    awaiting_start: bool = True
    last_message: Key | None = None

    def caught_up(self, last_published: Key) -> bool:
        return max(self.last_message or NOWHERE, self.start or NOWHERE) >= last_published


class Soak:
    def __init__(self, args: argparse.Namespace, logdir: Path) -> None:
        self.args = args
        self.logdir = logdir
        self.rng = random.Random(args.seed)
        self.children = bench.Children()
        self.channels = [f"soak-{i}" for i in range(args.channels)]
        self.published = Published()
        self.totals = Totals()
        self.events: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.phase = "start"
        self.life = 0  # node lives: 1 for the first process, 2 after the restart
        self.node_pid: int | None = None
        self.node_proc: subprocess.Popen[bytes] | None = None
        self.redis_proc: subprocess.Popen[bytes] | None = None
        self.redis_port = bench.free_port()
        self.ws_port = bench.free_port()
        self.api_port = bench.free_port()
        self.pub_stop = threading.Event()
        self.draining = asyncio.Event()
        self.tracks: list[list[Track]] = []
        self.pythonpath: str | None = None
        self.drain_deadline = math.inf
        self.node_exit: int | None = None
        self.publisher_mode: str = args.publisher

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, kind: str, **info: Any) -> dict[str, Any]:
        e = {"t": round(self.now(), 2), "kind": kind, **info}
        self.events.append(e)
        print(f"  [{e['t']:7.1f} s] {kind} " + " ".join(f"{k}={v}" for k, v in info.items()), flush=True)
        return e

    # ------------------------------------------------------------ Redis

    def redis_argv(self) -> list[str]:
        d = self.logdir / "redis"
        d.mkdir(exist_ok=True)
        return ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--dir", str(d),
                "--logfile", str(self.logdir / "redis.log")]

    async def start_redis(self) -> None:
        self.redis_proc = self.children.start(self.redis_argv(), None, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.redis_proc.poll() is not None:
                raise bench.BenchError(f"redis-server exited with {self.redis_proc.returncode}; see redis.log")
            if await redis_ping(self.redis_port):
                return
            await asyncio.sleep(0.05)
        raise bench.BenchError("redis-server did not answer PING within 30 s")

    async def restart_redis(self, sig: signal.Signals) -> None:
        e = self.event("redis-restart", signal=sig.name)
        p = self.redis_proc
        assert p is not None
        p.send_signal(sig)
        await wait_exit(p, 30)
        self.children.stop(p)
        await asyncio.sleep(self.args.redis_down)
        await self.start_redis()
        e["down_s"] = round(self.now() - e["t"], 2)
        self.event("redis-up", after_s=e["down_s"])

    # ------------------------------------------------------------ the node

    def node_argv(self) -> list[str]:
        a = self.args
        return [*TWISTD, "-n", "--pidfile=", "sockdrawer",
                "--port", f"tcp:{self.ws_port}:interface=127.0.0.1",
                "--api", f"tcp:{self.api_port}:interface=127.0.0.1",
                "--redis", f"redis://127.0.0.1:{self.redis_port}/0",
                "--history-size", str(a.history_size), *a.node_args.split()]

    async def start_node(self) -> None:
        env = dict(os.environ)
        if self.pythonpath:
            env["PYTHONPATH"] = self.pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        log = open(self.logdir / "node.log", "ab")
        log.write(f"$ {' '.join(self.node_argv())}\n".encode())
        log.flush()
        # cwd: the run's directory, so that '' on sys.path is not the checkout (whose sockdrawer/ would
        # shadow a --rev snapshot)
        self.node_proc = self.children.start(self.node_argv(), None, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, cwd=self.logdir, env=env)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.node_proc.poll() is not None:
                raise bench.BenchError(f"the node exited with {self.node_proc.returncode}; see node.log")
            health = await http_get(self.api_port, "/health")
            if health is not None:
                try:
                    if json.loads(health).get("broker_connected"):
                        self.life += 1
                        self.node_pid = self.node_proc.pid
                        return
                except ValueError:
                    pass
            await asyncio.sleep(0.05)
        raise bench.BenchError("the node did not report broker_connected within 60 s; see node.log")

    async def restart_node(self, sig: signal.Signals) -> None:
        e = self.event("node-restart", signal=sig.name, pid=self.node_pid)
        p = self.node_proc
        assert p is not None
        self.node_pid = None
        p.send_signal(sig)
        e["exit_code"] = await wait_exit(p, 30)
        self.children.stop(p)
        await self.start_node()
        e["down_s"] = round(self.now() - e["t"], 2)
        self.event("node-up", pid=self.node_pid, after_s=e["down_s"])

    async def stop_node(self) -> int | None:
        """SIGTERM: the node drains and exits; its exit code."""
        p = self.node_proc
        if p is None:
            return None
        self.node_pid = None
        p.send_signal(signal.SIGTERM)
        code = await wait_exit(p, 30)
        self.children.stop(p)
        return code

    # ------------------------------------------------------------ the publisher (a thread: Client is synchronous)

    def publisher(self, rate: float) -> None:
        import redis

        from sockdrawer import PublishError

        redis_keys = history_module().redis_keys

        client = self.make_client()
        lookup = redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=2, socket_connect_timeout=2)
        numbers = dict.fromkeys(self.channels, 0)
        for ch, entries in self.published.by_channel.items():
            numbers[ch] = entries[-1][1] + 1

        def in_stream(channel: str, payload: bytes) -> str | None:
            stream, epoch_key = redis_keys(NAMESPACE, channel.encode())
            for entry_id, fields in lookup.xrevrange(stream, count=50):
                if fields.get(b"d") == payload:
                    epoch = lookup.get(epoch_key)
                    if epoch is not None:
                        return f"{epoch.decode()}:{entry_id.decode()}"
            return None

        def publish(channel: str, payload: bytes) -> str | None:
            while not self.pub_stop.is_set():
                try:
                    if self.publisher_mode == "policy":  # the id makes publishing it again safe
                        return str(client.pub(payload, channel, id=f"{channel}/{payload_number(payload)}"))
                    return str(client.pub(payload, channel))
                except PublishError as e:
                    self.published.errors += 1
                    self.published.last_error = str(e)
                if self.publisher_mode == "policy":
                    time.sleep(0.1)
                    continue
                # the script may have run before the link broke: look for the message before publishing it again
                while not self.pub_stop.is_set():
                    time.sleep(0.1)
                    try:
                        offset = in_stream(channel, payload)
                    except redis.RedisError:
                        continue
                    if offset is not None:
                        self.published.found += 1
                        return offset
                    break
            return None

        interval = 1.0 / rate
        due = time.monotonic()
        i = 0
        try:
            while not self.pub_stop.is_set():
                channel = self.channels[i % len(self.channels)]
                i += 1
                n = numbers[channel]
                payload = json.dumps({"c": channel, "n": n}).encode()
                offset = publish(channel, payload)
                key = parse_offset(offset)
                if offset is None:
                    break
                if key is None:
                    raise bench.BenchError(f"pub() returned {offset!r}, not an offset: does the node keep history?")
                self.published.add(channel, key, n, self.now())
                numbers[channel] = n + 1
                due += interval
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -1.0:
                    due = time.monotonic()  # after an outage: go on at the rate, no burst
        finally:
            client.close()
            lookup.close()

    # ------------------------------------------------------------ the clients

    async def client(self, index: int) -> None:
        import websockets
        from websockets.asyncio.client import connect

        a = self.args
        rng = random.Random(f"{a.seed}-{index}")
        tracks = {t.channel: t for t in self.tracks[index]}
        totals = self.totals
        url = f"ws://127.0.0.1:{self.ws_port}/"
        attempt = 0  # js/sockdrawer.js: full jitter over min(30, 0.5 * 2**attempt); 0 again after 5 s open
        final = False  # the last connection, at the end: catch up, then leave for good
        while True:
            if self.draining.is_set() and not final:
                final = True
            if final and self.now() > self.drain_deadline:
                return
            try:
                ws = await connect(url, subprotocols=["sockdrawer.v1"], open_timeout=10, close_timeout=2,
                                   compression=None, proxy=None, max_queue=None)
            except (OSError, TimeoutError, websockets.exceptions.WebSocketException):
                totals.failed += 1
                await asyncio.sleep(0.2 if final else rng.random() * min(30.0, 0.5 * 2**attempt))
                attempt += 1
                continue
            if ws.subprotocol != "sockdrawer.v1":
                raise bench.BenchError(f"the node did not select sockdrawer.v1 ({ws.subprotocol!r})")
            totals.connects += 1
            totals.connected += 1
            opened = time.monotonic()
            voluntary = False
            connection = totals.connects
            for t in tracks.values():
                t.log.append((round(self.now(), 3), "c", connection))
            try:
                for t in tracks.values():
                    message: dict[str, Any] = {"op": "subscribe", "channel": t.channel}
                    if t.offset is not None:
                        message["since"] = t.offset
                    await ws.send(json.dumps(message))
                stay = rng.uniform(a.stay_min, a.stay_max)
                deadline = time.monotonic() + stay
                while True:
                    if final:
                        if all(t.caught_up(self.published.last(t.channel)) for t in tracks.values()):
                            voluntary = True
                            break
                        if self.now() > self.drain_deadline:
                            voluntary = True
                            break
                        remaining = 0.5
                    else:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0 or self.draining.is_set():
                            voluntary = True
                            break
                    try:
                        async with asyncio.timeout(min(remaining, 0.5)):
                            raw = await ws.recv()
                    except TimeoutError:
                        continue
                    self.handle(tracks, raw)
            except websockets.exceptions.ConnectionClosed:
                pass
            finally:
                totals.connected -= 1
            if time.monotonic() - opened >= 5.0:
                attempt = 0
            why = "server" if not voluntary else "abort" if not final and rng.random() < a.abort_share else "close"
            for t in tracks.values():
                t.log.append((round(self.now(), 3), "x", why))
            if voluntary:
                attempt = 0
                if why == "abort":
                    totals.closed_abort += 1
                    ws.transport.abort()
                else:
                    totals.closed_clean += 1
                    try:
                        await ws.close()
                    except Exception:
                        pass
                if final:
                    return
                await asyncio.sleep(rng.uniform(0.0, a.away_max))
            else:
                totals.closed_by_server += 1
                await asyncio.sleep(0.2 if final else rng.random() * min(30.0, 0.5 * 2**attempt))
                attempt += 1

    def handle(self, tracks: dict[str, Track], raw: str | bytes) -> None:
        """One frame, as js/sockdrawer.js reads it (its offsets), logged for the check."""
        totals = self.totals
        try:
            message = json.loads(raw)
            op = message["op"]
        except (ValueError, TypeError, KeyError):
            totals.stray += 1
            return
        t = tracks.get(message.get("channel"))  # type: ignore[arg-type]
        now = round(self.now(), 3)
        if op == "error":
            status = str(message.get("status"))
            totals.errors[status] = totals.errors.get(status, 0) + 1
            if t is not None:
                t.log.append((now, "e", message.get("status")))
            return
        if t is None:
            totals.stray += 1
            return
        offset = message.get("offset")
        key = parse_offset(offset)
        if op == "message":
            if offset is not None:
                t.offset = offset
            try:
                n = json.loads(message["data"])["n"]
            except (ValueError, TypeError, KeyError):
                n = None
            t.log.append((now, "m", key, n))
            if key is not None and (t.last_message is None or key > t.last_message):
                t.last_message = key
            totals.deliveries += 1
        elif op == "subscribed":
            if offset is not None:
                t.offset = offset
            t.log.append((now, "s", key))
            if t.awaiting_start:
                t.start = key
                t.awaiting_start = False
        elif op == "reset":
            t.offset = None
            t.log.append((now, "r"))
            t.awaiting_start = True
            totals.resets += 1

    # ------------------------------------------------------------ sampling

    async def sampler(self) -> None:
        start = time.monotonic()
        tick = 0
        while True:
            tick += 1
            await asyncio.sleep(max(0.0, start + tick - time.monotonic()))
            await self.sample()

    async def sample(self) -> None:
        pid = self.node_pid
        s: dict[str, Any] = {"t": round(self.now(), 2), "phase": self.phase, "life": self.life, "pid": pid}
        if pid is not None:
            try:
                s.update(proc_figures(pid))
            except OSError:
                pass
            text = await http_get(self.api_port, "/metrics")
            if text is not None:
                m = {k: int(v) for k, v in prometheus_values(text).items() if v == v and abs(v) != math.inf}
                s.update(sockets=m.get("sockdrawer_sockets"), pending=m.get("sockdrawer_pending_handshakes"),
                         node_connections=m.get("sockdrawer_connections_total"),
                         node_deliveries=m.get("sockdrawer_deliveries_total"),
                         redis_connected=m.get("sockdrawer_redis_connected"))
        tot = self.totals
        s.update(clients_connected=tot.connected, connects=tot.connects, failed=tot.failed,
                 deliveries=tot.deliveries, published=self.published.count, pub_errors=self.published.errors,
                 resets=tot.resets)
        self.samples.append(s)
        if len(self.samples) > self.args.report_every and len(self.samples) % self.args.report_every == 0:
            prev = self.samples[-1 - self.args.report_every]
            dt = s["t"] - prev["t"]
            print(f"  [{s['t']:7.1f} s] {self.phase:8} RSS {fmt_mib(s.get('rss_kib'))} MiB, fds {s.get('fds', '-')} "
                  f"(sockets {s.get('socket_fds', '-')}), node sockets {s.get('sockets', '-')}, "
                  f"clients {tot.connected}, {(tot.connects - prev['connects']) / dt:.1f} connects/s, "
                  f"{(tot.deliveries - prev['deliveries']) / dt:,.0f} deliveries/s, "
                  f"published {self.published.count:,} ({self.published.errors} pub errors), "
                  f"resets {tot.resets}", flush=True)

    # ------------------------------------------------------------ the run

    async def run(self) -> dict[str, Any]:
        a = self.args
        duration = a.minutes * 60.0
        sampler = asyncio.create_task(self.sampler())
        try:
            await self.start_redis()
            await self.start_node()
            self.event("started", node_pid=self.node_pid, ws_port=self.ws_port, api_port=self.api_port,
                       redis_port=self.redis_port)
            # one message on every channel first: every subscription then starts at an offset
            await asyncio.to_thread(self.seed)
            await asyncio.sleep(3.0)  # the idle node, before any socket
            self.phase = "soak"
            rng = self.rng
            for _ in range(a.clients):
                self.tracks.append([Track(ch) for ch in rng.sample(self.channels, a.per_client)])
            begin = self.now()
            self.event("clients-start", clients=a.clients)
            publisher = asyncio.create_task(asyncio.to_thread(self.publisher, a.rate))
            clients = []
            for i in range(a.clients):
                clients.append(asyncio.create_task(self.client(i)))
                await asyncio.sleep(a.ramp / a.clients)
            for when, what in schedule(a):
                await asyncio.sleep(max(0.0, begin + when * duration - self.now()))
                if publisher.done():
                    publisher.result()  # raise what stopped it
                if what == "node":
                    await self.restart_node(signal.Signals["SIG" + a.node_signal])
                else:
                    await self.restart_redis(what)
            await asyncio.sleep(max(0.0, begin + duration - self.now()))
            self.pub_stop.set()
            await publisher
            self.event("publishing-stopped", published=self.published.count)
            self.phase = "drain"
            self.drain_deadline = self.now() + a.drain_timeout
            self.draining.set()
            await asyncio.gather(*clients)
            self.event("clients-done", still_connected=self.totals.connected)
            self.phase = "idle"
            await asyncio.sleep(a.idle_tail)
            await self.sample()
            # twistd, stopped by a signal, exits by that signal after its "Server Shut Down": -15 is clean
            code = await self.stop_node()
            self.event("node-stopped", exit_code=code)
            self.node_exit = code
        finally:
            sampler.cancel()
            self.pub_stop.set()
            self.children.stop_all()
        return {"duration_s": duration}

    def make_client(self) -> Any:
        """The publisher's Client: a plain one that follows the nodes' history policy, where the build has that
        (a Redis function the nodes load; its retries are idempotent), else one told the nodes' history size."""
        from sockdrawer import Client

        if self.publisher_mode == "auto":
            self.publisher_mode = "policy" if hasattr(history_module(), "function_name") else "explicit"
        url = f"redis://127.0.0.1:{self.redis_port}/0"
        if self.publisher_mode == "policy":
            return Client(url, timeout=2.0)
        return Client(url, history_size=self.args.history_size, timeout=2.0)

    def seed(self) -> None:
        client = self.make_client()
        try:
            for ch in self.channels:
                payload = json.dumps({"c": ch, "n": 0})
                key = parse_offset(client.pub(payload, ch))
                if key is None:
                    raise bench.BenchError("pub() returned no offset: does the node keep history?")
                self.published.add(ch, key, 0, self.now())
        finally:
            client.close()


# ---------------------------------------------------------------- helpers


def schedule(args: argparse.Namespace) -> list[tuple[float, Any]]:
    """
    (fraction of the run, what): the Redis restarts (SIGTERM and SIGKILL in turn) and the node restarts, spread
    evenly over 12% to 82% of the run, so that its end is undisturbed; the node restarts second, then evenly
    among the others.
    """
    n = args.redis_restarts + args.node_restarts
    if n == 0:
        return []
    whens = [0.12 + 0.70 * i / (n - 1) for i in range(n)] if n > 1 else [0.3]
    nodes = {min(1, n - 1) + round(j * (n - 2) / args.node_restarts) for j in range(args.node_restarts)} \
        if args.node_restarts else set()
    while len(nodes) < args.node_restarts:  # rounding put two on one slot
        nodes.add(next(i for i in range(n) if i not in nodes))
    what: list[Any] = []
    redis_signals = [signal.SIGTERM, signal.SIGKILL]
    for i in range(n):
        what.append("node" if i in nodes else redis_signals[sum(1 for w in what if w != "node") % 2])
    return list(zip(whens, what, strict=True))


async def wait_exit(p: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return p.poll()


async def redis_ping(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"*1\r\n$4\r\nPING\r\n")
        line = await asyncio.wait_for(reader.readline(), 1.0)
        return line.startswith(b"+PONG")  # -LOADING while it reads the AOF
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


async def http_get(port: int, path: str, timeout: float = 2.0) -> str | None:
    """The body of a 200 answer to GET path on 127.0.0.1:port; None for anything else."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.") or head.split(b" ", 2)[1:2] != [b"200"]:
        return None
    return body.decode("utf-8", "replace")


def prometheus_values(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus exposition."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def proc_figures(pid: int) -> dict[str, Any]:
    """VmRSS (KiB), open fds and how many are sockets, CPU seconds so far."""
    rss = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
                break
    fds = sockets = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        fds += 1
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                sockets += 1
        except OSError:
            pass
    return {"rss_kib": rss, "fds": fds, "socket_fds": sockets, "cpu_s": round(bench.proc_cpu(pid), 2)}


def history_module() -> Any:
    """sockdrawer's history module: sockdrawer.core.history, or sockdrawer.history in builds before the move."""
    import importlib

    try:
        return importlib.import_module("sockdrawer.core.history")
    except ImportError:
        return importlib.import_module("sockdrawer.history")


def payload_number(payload: bytes) -> int:
    return int(json.loads(payload)["n"])


def fmt_count(x: Any) -> str:
    return f"{x:.0f}" if isinstance(x, (int, float)) else "-"


def fmt_mib(kib: Any) -> str:
    return f"{kib / 1024:.1f}" if isinstance(kib, (int, float)) else "-"


# ---------------------------------------------------------------- the check


def check(soak: Soak) -> dict[str, Any]:
    """Every subscription's messages against the ledger: lost, duplicated, out of order, unexpected."""
    ledger: dict[str, tuple[list[Key], dict[Key, tuple[int, float]]]] = {}
    for ch, entries in soak.published.by_channel.items():
        keys = [k for k, _, _ in entries]
        if any(b <= a for a, b in pairwise(keys)):
            raise bench.BenchError(f"the offsets pub() returned on {ch} do not increase")
        ledger[ch] = (keys, {k: (n, t) for k, n, t in entries})
    # a message that is in history twice: pub() ran the script, lost the answer (Redis went away) and
    # published it again; the clients rightly get both copies, so the copy the ledger lacks is expected too
    twice: dict[str, dict[Key, int]] = {}
    for tracks in soak.tracks:
        for track in tracks:
            keys, info = ledger[track.channel]
            numbers = {n for n, _ in info.values()}
            for ev in track.log:
                if ev[1] == "m" and ev[2] is not None and ev[2] not in info and ev[3] in numbers:
                    twice.setdefault(track.channel, {})[ev[2]] = ev[3]
    for ch, extra in twice.items():
        keys, info = ledger[ch]
        for key, n in extra.items():
            info[key] = (n, math.nan)
        ledger[ch] = (sorted([*keys, *extra]), info)
    out: dict[str, Any] = {"subscriptions": 0, "expected": 0, "received": 0, "lost": 0, "duplicates": 0,
                           "out_of_order": 0, "unexpected": 0, "wrong_payload": 0, "no_offset": 0,
                           "resets": 0, "skipped_by_reset": 0, "null_starts": 0, "never_subscribed": 0,
                           "published_twice": sum(len(extra) for extra in twice.values()),
                           "published_twice_keys": {ch: sorted(extra) for ch, extra in twice.items()},
                           "examples": [], "traces": []}
    short = {"s": "subscribed", "m": "message", "r": "reset", "e": "error", "c": "connected", "x": "left"}

    def example(kind: str, client: int, track: Track, key: Key | None, **more: Any) -> None:
        ch = track.channel
        n, t = ledger[ch][1].get(key, (None, None)) if key else (None, None)
        if len(out["examples"]) < 50:
            out["examples"].append({"kind": kind, "client": client, "channel": ch, "key": key, "n": n,
                                    "published_t": t, **more})
        if len(out["traces"]) < 10:
            # what this subscription saw around the message, and what else happened then
            at = t if isinstance(t, float) and t == t else next(
                (ev[0] for ev in track.log if ev[1] == "m" and ev[2] == key), None)
            if at is None:
                return
            lo, hi = at - 5.0, at + 15.0
            seen = [[ev[0], short[ev[1]], *[f"{x[1]}-{x[2]}" if isinstance(x, tuple) else x for x in ev[2:]]]
                    for ev in track.log if lo <= ev[0] <= hi]
            published = [[round(pt, 3), "published", f"{k[1]}-{k[2]}", pn] for k, (pn, pt) in ledger[ch][1].items()
                         if isinstance(pt, float) and lo <= pt <= hi]
            happened = [[e["t"], e["kind"]] for e in soak.events if lo <= e["t"] <= hi]
            out["traces"].append({"kind": kind, "client": client, "channel": ch, "key": key, "n": n,
                                  "events": sorted(seen + published + happened, key=lambda e: e[0])})

    for index, tracks in enumerate(soak.tracks):
        for track in tracks:
            ch = track.channel
            keys, info = ledger[ch]
            out["subscriptions"] += 1
            segments: list[dict[str, Any]] = []
            current: dict[str, Any] | None = None
            awaiting = True
            for ev in track.log:
                kind = ev[1]
                if kind == "s" and awaiting:
                    current = {"start": ev[2], "received": [], "reset": False}
                    segments.append(current)
                    awaiting = False
                elif kind == "r":
                    out["resets"] += 1
                    if current is not None:
                        current["reset"] = True
                    awaiting = True
                elif kind == "m":
                    _, _, key, n = ev
                    if key is None:
                        out["no_offset"] += 1
                        continue
                    if current is None:
                        out["unexpected"] += 1
                        example("before-subscribed", index, track, key)
                        continue
                    current["received"].append(key)
                    if key in info and info[key][0] != n:
                        out["wrong_payload"] += 1
                        example("wrong-payload", index, track, key, got_n=n)
            if not segments:
                out["never_subscribed"] += 1
                continue
            for i, seg in enumerate(segments):
                received: list[Key] = seg["received"]
                start = seg["start"]
                if start is None:  # no position (a channel without history): from the first message on
                    out["null_starts"] += 1
                    if not received:
                        continue
                    start = (received[0][0], received[0][1], received[0][2] - 1)
                lo = bisect.bisect_right(keys, start)
                if seg["reset"]:
                    upper = max(received) if received else start
                    hi = bisect.bisect_right(keys, upper)
                    following = segments[i + 1]["start"] if i + 1 < len(segments) else None
                    if following is not None:
                        out["skipped_by_reset"] += max(0, bisect.bisect_right(keys, following) - hi)
                else:
                    hi = len(keys)
                expected = keys[lo:hi]
                got = set(received)
                out["expected"] += len(expected)
                out["received"] += len(received)
                dups = len(received) - len(got)
                out["duplicates"] += dups
                if dups:
                    dup = next(k for k in received if received.count(k) > 1)
                    example("duplicate", index, track, dup, count=dups)
                for a, b in pairwise(received):
                    if b <= a:
                        out["out_of_order"] += 1
                        example("out-of-order", index, track, b, after=a)
                want = set(expected)
                for key in sorted(want - got):
                    out["lost"] += 1
                    example("lost", index, track, key, segment_start=seg["start"])
                for key in sorted(got - want):
                    out["unexpected"] += 1
                    example("unexpected", index, track, key, segment_start=seg["start"])
    out["ok"] = not any(out[k] for k in ("lost", "duplicates", "out_of_order", "unexpected", "wrong_payload",
                                          "no_offset", "never_subscribed"))
    return out


# ---------------------------------------------------------------- figures


def life_figures(samples: list[dict[str, Any]], life: int) -> dict[str, Any]:
    """RSS and fds of one node process: idle at start, first and last sample under load, peak, and the trend."""
    mine = [s for s in samples if s.get("life") == life and s.get("rss_kib") is not None]
    loaded = [s for s in mine if s["phase"] == "soak" and (s.get("sockets") or 0) > 0]
    if not mine:
        return {}
    out: dict[str, Any] = {
        "pid": mine[0]["pid"],
        "from_t": mine[0]["t"],
        "to_t": mine[-1]["t"],
        "rss_first_kib": mine[0]["rss_kib"],
        "fds_first": mine[0]["fds"],
        "rss_peak_kib": max(s["rss_kib"] for s in mine),
        "fds_peak": max(s["fds"] for s in mine),
        "rss_last_kib": mine[-1]["rss_kib"],
        "fds_last": mine[-1]["fds"],
        "sockets_peak": max((s.get("sockets") or 0) for s in mine),
    }
    if loaded:
        # start: 10 s into the load (the clients have come in); end: the last sample before the drain
        warm = next((s for s in loaded if s["t"] >= loaded[0]["t"] + 10.0), loaded[0])
        out.update(start_t=warm["t"], rss_start_kib=warm["rss_kib"], fds_start=warm["fds"],
                   sockets_start=warm.get("sockets"), end_t=loaded[-1]["t"], rss_end_kib=loaded[-1]["rss_kib"],
                   fds_end=loaded[-1]["fds"], sockets_end=loaded[-1].get("sockets"))
        # fds beyond the WebSocket sockets the node counts: listening sockets, Redis links, logs, epoll;
        # constant unless descriptors leak
        extra = [s["fds"] - s["sockets"] for s in loaded if s.get("sockets") is not None]
        if extra:
            out.update(extra_fds_start=extra[0], extra_fds_end=extra[-1], extra_fds_min=min(extra),
                       extra_fds_max=max(extra))
        # the trend over the second half of the loaded samples (after the warm-up)
        half = loaded[len(loaded) // 2:]
        if len(half) >= 10:
            out["rss_slope_kib_per_min"] = round(slope([s["t"] for s in half], [s["rss_kib"] for s in half]) * 60, 1)
            out["fds_slope_per_min"] = round(slope([s["t"] for s in half], [s["fds"] for s in half]) * 60, 2)
            out["rss_second_half_from_kib"] = half[0]["rss_kib"]
            first_quarter = loaded[len(loaded) // 4] if len(loaded) >= 4 else loaded[0]
            out["rss_quarter_kib"] = first_quarter["rss_kib"]
    idle = [s for s in mine if s["phase"] in ("start", "idle")]
    if idle:
        out["idle"] = [{"t": s["t"], "phase": s["phase"], "rss_kib": s["rss_kib"], "fds": s["fds"],
                        "sockets": s.get("sockets")} for s in (idle[0], idle[-1])]
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0


def summarize(soak: Soak, result: dict[str, Any]) -> dict[str, Any]:
    samples = soak.samples
    soak_samples = [s for s in samples if s["phase"] == "soak"]
    span = (soak_samples[-1]["t"] - soak_samples[0]["t"]) if len(soak_samples) > 1 else 0.0
    tot = soak.totals
    node_deliveries = 0.0
    for life in range(1, soak.life + 1):
        values = [s["node_deliveries"] for s in samples if s.get("life") == life and s.get("node_deliveries")]
        node_deliveries += max(values, default=0.0)
    first, last = soak_samples[0] if soak_samples else {}, soak_samples[-1] if soak_samples else {}
    return {
        **result,
        "lives": [life_figures(samples, life) for life in range(1, soak.life + 1)],
        "connects": tot.connects,
        "connects_per_s": round((last.get("connects", 0) - first.get("connects", 0)) / span, 2) if span else None,
        "failed_connects": tot.failed,
        "closed_clean": tot.closed_clean,
        "closed_abort": tot.closed_abort,
        "closed_by_server": tot.closed_by_server,
        "deliveries": tot.deliveries,
        "node_deliveries": int(node_deliveries),
        "published": soak.published.count,
        "pub_errors": soak.published.errors,
        "pub_found_after_error": soak.published.found,
        "resets": tot.resets,
        "errors": tot.errors,
        "stray": tot.stray,
        "clients_peak": max((s["clients_connected"] for s in samples), default=0),
        "node_exit": soak.node_exit,
        "publisher": soak.publisher_mode,
    }


def print_summary(summary: dict[str, Any], verdict: dict[str, Any]) -> None:
    s, c = summary, verdict
    print("\n== soak summary")
    print(f"  churn: {s['connects']:,} connections opened ({s['connects_per_s']} /s while soaking), "
          f"{s['closed_clean']:,} closed cleanly, {s['closed_abort']:,} dropped by the client, "
          f"{s['closed_by_server']:,} closed by the node or broken, {s['failed_connects']:,} attempts failed")
    print(f"  published {s['published']:,} messages with {s.get('publisher', 'explicit')} history "
          f"({s['pub_errors']} pub() errors, "
          f"{s['pub_found_after_error']} of them found appended); delivered {s['deliveries']:,} "
          f"(the node counted {s['node_deliveries']:,} live fan-out deliveries; replays are not counted there)")
    print(f"  check: {c['subscriptions']} subscriptions, {c['expected']:,} expected, {c['received']:,} received; "
          f"lost {c['lost']}, duplicates {c['duplicates']}, out of order {c['out_of_order']}, "
          f"unexpected {c['unexpected']}, wrong payload {c['wrong_payload']}, resets {c['resets']} "
          f"(skipping {c['skipped_by_reset']}), null starts {c['null_starts']}; errors {s['errors'] or 'none'}")
    if c.get("published_twice"):
        print(f"  WARNING: {c['published_twice']} message(s) in history twice: pub() published again a message "
              f"Redis had kept (at {c['published_twice_keys']}); their copies are counted as expected")
    for i, life in enumerate(s["lives"], 1):
        if not life:
            continue
        print(f"  node process {i} (pid {life['pid']}, {life['from_t']:.0f}-{life['to_t']:.0f} s): "
              f"RSS MiB first {fmt_mib(life['rss_first_kib'])}, start {fmt_mib(life.get('rss_start_kib'))}, "
              f"end {fmt_mib(life.get('rss_end_kib'))}, peak {fmt_mib(life['rss_peak_kib'])}, "
              f"last {fmt_mib(life['rss_last_kib'])}; fds first {life['fds_first']}, "
              f"start {life.get('fds_start')} ({fmt_count(life.get('sockets_start'))} sockets), "
              f"end {life.get('fds_end')} ({fmt_count(life.get('sockets_end'))} sockets), peak {life['fds_peak']}, "
              f"last {life['fds_last']}; fds beyond sockets {life.get('extra_fds_start')} -> "
              f"{life.get('extra_fds_end')} (range {life.get('extra_fds_min')}-{life.get('extra_fds_max')}); "
              f"second-half trend: RSS {life.get('rss_slope_kib_per_min')} KiB/min, "
              f"fds {life.get('fds_slope_per_min')}/min")
    print(f"  the node stopped (SIGTERM) with exit status {s['node_exit']} (-15: twistd exits by the signal after "
          "'Server Shut Down')")
    print(f"  {'OK' if c['ok'] else 'FAILED'}: " + ("nothing lost, duplicated or out of order" if c["ok"]
                                                   else "see 'examples' in the JSON"))


def plot(path: str, record: dict[str, Any]) -> None:
    """The four panels over time, the restarts marked, each node process's RSS and fds written in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for s in samples:
            xs.append(s["t"] / 60)
            v = s.get(key)
            ys.append(math.nan if v is None else float(v))
        return xs, ys

    samples, events = record["samples"], record["events"]
    p = record["params"]
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    t, rss = series("rss_kib")
    axes[0].plot(t, [v / 1024 for v in rss], color="tab:purple", lw=1)
    axes[0].set_ylabel("node RSS (MiB)")
    t, fds = series("fds")
    _, sfds = series("socket_fds")
    axes[1].plot(t, fds, color="tab:brown", lw=1, label="open fds")
    axes[1].plot(t, sfds, color="tab:olive", lw=0.8, label="of which sockets")
    axes[1].set_ylabel("node fds")
    axes[1].legend(loc="lower left", fontsize=8)
    t, sockets = series("sockets")
    _, clients = series("clients_connected")
    axes[2].plot(t, clients, color="tab:gray", lw=1.5, ls=":", label="clients: connected")
    axes[2].plot(t, sockets, color="tab:green", lw=1, label="node: sockdrawer_sockets")
    axes[2].set_ylabel("WebSockets")
    axes[2].legend(loc="lower left", fontsize=8)
    t, delivered = series("deliveries")
    rate = [math.nan] + [(b - a) / ((t2 - t1) * 60) if t2 > t1 else math.nan
                         for a, b, t1, t2 in zip(delivered, delivered[1:], t, t[1:], strict=False)]
    axes[3].plot(t, rate, color="tab:blue", lw=0.8)
    axes[3].set_ylabel("delivered /s\n(counted by clients)")
    axes[3].set_xlabel("minutes")
    marks = {"redis-restart": ("tab:red", "--", "Redis restart"), "node-restart": ("black", "-", "node restart"),
             "publishing-stopped": ("tab:gray", ":", "publishing stops")}
    seen = set()
    for e in events:
        if e["kind"] not in marks:
            continue
        color, style, label = marks[e["kind"]]
        for ax in axes:
            ax.axvline(e["t"] / 60, color=color, ls=style, lw=1,
                       label=label if (ax is axes[0] and label not in seen) else None)
        seen.add(label)
    axes[0].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        top = ax.get_ylim()[1]
        ax.set_ylim(0, top * 1.1)  # from 0: a drift shows at its true size
    for life in record["summary"].get("lives", []):
        if not life or life.get("rss_start_kib") is None:
            continue
        x = life["from_t"] / 60
        axes[0].text(x, axes[0].get_ylim()[1] * 0.5,
                     f" process {life['pid']}: {fmt_mib(life['rss_start_kib'])} -> {fmt_mib(life['rss_end_kib'])}"
                     f" MiB\n (peak {fmt_mib(life['rss_peak_kib'])})", fontsize=8, va="center")
        idle = {i["phase"]: i["fds"] for i in life.get("idle", [])}
        axes[1].text(x, axes[1].get_ylim()[1] * 0.4,
                     f" fds beyond sockets: {life.get('extra_fds_start')} -> {life.get('extra_fds_end')}"
                     + (f"\n idle before the clients: {idle['start']}" if "start" in idle else "")
                     + (f"\n idle after the last one left: {idle['idle']}" if "idle" in idle else ""),
                     fontsize=8, va="center")
    fig.suptitle(f"sockdrawer soak {record['run_id']}, build {record['git']['commit']}: {p['clients']} v1 clients "
                 f"churning, {p['rate']:g} msg/s on {p['channels']} channels, --history-size {p['history_size']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=None, help="minutes of churn and publishing (default 10)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute: 1 minute, 30 clients, 10 channels, 20 msg/s (the restarts as usual)")
    p.add_argument("--clients", type=int, default=None, help="v1 clients, each one socket at a time (default 100)")
    p.add_argument("--channels", type=int, default=None, help="channels published on (default 20)")
    p.add_argument("--per-client", type=int, default=3, help="channels each client subscribes to (default 3)")
    p.add_argument("--rate", type=float, default=None, help="messages published a second, in all (default 40)")
    p.add_argument("--stay", default="1,10",
                   help="MIN,MAX seconds a client stays connected, uniformly at random (default 1,10)")
    p.add_argument("--away", type=float, default=1.0, dest="away_max",
                   help="most seconds a client stays away after leaving (default 1; uniformly from 0)")
    p.add_argument("--abort-share", type=float, default=0.3,
                   help="share of the clients' disconnects that drop the TCP connection instead of closing "
                        "(default 0.3)")
    p.add_argument("--ramp", type=float, default=5.0, help="seconds over which the clients start (default 5)")
    p.add_argument("--history-size", type=int, default=1000, help="the node's --history-size (default 1000)")
    p.add_argument("--redis-restarts", type=int, default=3,
                   help="Redis restarts (default 3; SIGTERM and SIGKILL in turn)")
    p.add_argument("--redis-down", type=float, default=2.0, help="seconds Redis stays down (default 2)")
    p.add_argument("--node-restarts", type=int, default=1, help="node restarts (default 1)")
    p.add_argument("--node-signal", choices=["KILL", "TERM"], default="KILL",
                   help="how the node is stopped for its restarts (default KILL)")
    p.add_argument("--publisher", choices=["auto", "policy", "explicit"], default="auto",
                   help="policy: Client(url), which follows the history policy the nodes write into Redis; "
                        "explicit: Client(url, history_size=N); auto (default): policy where the build has it")
    p.add_argument("--node-args", default="", help="more options for the node, e.g. '--subscribe channels'")
    p.add_argument("--rev", default=None,
                   help="run sockdrawer as committed at this git revision (as bench/run.py --rev): the node and "
                        "the publisher import it from bench/build/rev-<hash>, so work in progress is not run")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="seconds the clients have at the end to catch up (default 60)")
    p.add_argument("--idle-tail", type=float, default=5.0,
                   help="seconds sampled after the last client left (default 5)")
    p.add_argument("--report-every", type=int, default=30, help="print a progress line every N samples")
    p.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    p.add_argument("--json-out", default=None, help="the JSON (default bench/results/soak-<run id>/soak.json)")
    p.add_argument("--plot", default=None, help="the PNG (default bench/results/soak-<run id>/soak.png)")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="print the summary of a previous run's JSON and plot it again (to --plot, or next to it)")
    args = p.parse_args(argv)
    quick = args.quick
    args.minutes = args.minutes if args.minutes is not None else (1.0 if quick else 10.0)
    args.clients = args.clients if args.clients is not None else (30 if quick else 100)
    args.channels = args.channels if args.channels is not None else (10 if quick else 20)
    args.rate = args.rate if args.rate is not None else (20.0 if quick else 40.0)
    try:
        args.stay_min, args.stay_max = (float(x) for x in args.stay.split(","))
    except ValueError:
        p.error("--stay: MIN,MAX")
    if args.per_client > args.channels:
        p.error("--per-client is more than --channels")
    if args.redis_restarts < 0 or args.node_restarts < 0 or args.minutes <= 0 or args.rate <= 0 or args.clients < 1:
        p.error("--redis-restarts, --minutes, --rate and --clients must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        record = json.loads(Path(args.from_json).read_text())
        print(f"{args.from_json}: soak {record['run_id']}, build {record['git']['commit']}, {record['date']}")
        if record["error"]:
            print(f"ERROR: {record['error']}")
        else:
            print_summary(record["summary"], record["check"])
        png = args.plot or str(Path(args.from_json).with_suffix(".png"))
        plot(png, record)
        print(f"plot: {png}")
        return 0 if (not record["error"] and record["check"].get("ok")) else 1
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = bench.RESULTS / f"soak-{run_id}"
    logdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, logdir)
    git = bench.git_info()
    if args.rev:
        commit, dest = bench.snapshot(args.rev)
        soak.pythonpath = str(dest)
        sys.path.insert(0, str(dest))  # the publisher's Client too
        git = {"commit": commit, "dirty": False, "snapshot": str(dest)}
    machine = bench.machine_info()
    load = os.getloadavg()
    print(f"sockdrawer soak {run_id}: build {git['commit']}{' (sockdrawer/ modified)' if git.get('dirty') else ''}, "
          f"{args.minutes:g} min, {args.clients} clients x {args.per_client} of {args.channels} channels, "
          f"{args.rate:g} msg/s, {args.redis_restarts} Redis restarts, {args.node_restarts} node restart(s) "
          f"(SIG{args.node_signal}); "
          f"load average {load[0]:.2f}; logs in {logdir}", flush=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    error = None
    result: dict[str, Any] = {}
    try:
        result = asyncio.run(soak.run())
    except bench.BenchError as e:
        error = str(e)
        print(f"ERROR: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        error = "interrupted"
        print("\ninterrupted; stopping child processes", file=sys.stderr)
    finally:
        soak.children.stop_all()
    verdict = check(soak) if soak.tracks and not error else {"ok": False}
    summary = summarize(soak, result)
    if not error:
        print_summary(summary, verdict)
    record = {
        "kind": "sockdrawer-soak",
        "format": 1,
        "run_id": run_id,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git,
        "machine": machine,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "params": {k: v for k, v in vars(args).items() if k not in ("json_out", "plot")},
        "node_cmd": soak.node_argv(),
        "publisher": soak.publisher_mode,
        "error": error,
        "summary": summary,
        "check": verdict,
        "events": soak.events,
        "samples": soak.samples,
    }
    json_path = Path(args.json_out) if args.json_out else logdir / "soak.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    png = args.plot or str(logdir / "soak.png")
    if soak.samples:
        plot(png, record)
    print(f"\nJSON: {json_path}\nplot: {png}")
    return 0 if (not error and verdict.get("ok")) else 1


if __name__ == "__main__":
    sys.exit(main())
