#!/usr/bin/env python3
"""
sockdrawer benchmark runner.

Starts a private redis-server, the server under test (sockdrawer by default,
any command line with --server-cmd) and, in the same run, the plain
Twisted + Autobahn baseline (bench/baseline_autobahn.py); opens WebSocket
connections with the C load client (bench/loadclient.c), publishes with the
C paced publisher (bench/publisher.c), and measures server CPU per delivery,
latency, loss, RSS per socket and handshake cost.

The server runs pinned to one core (--server-cpu, default 0); Redis, the
load clients, the publisher and this script share the other (--load-cpu,
default 1).

Scenarios:
  fanout    1 channel, 1,000 sockets, 100-byte messages, rate stepped up from 100 msg/s
  channels  10,000 sockets, one channel each, 100 B, rate stepped up from 5,000 msg/s
  idle      10,000 idle sockets: RSS per socket, connect rate, handshake CPU
  idle-channels  the same with one channel per socket
  idle-v1   the same with clients speaking sockdrawer.v1, one channel each (a subscribe each);
            sockdrawer builds only
  large     1,000 sockets on 1 channel, 16 KiB messages, rate stepped up from 10 msg/s
  fanout-json  1 channel, 1,000 sockets, 1 KiB JSON messages, rate stepped up from 100 msg/s
  fanout-v1 fanout with clients speaking sockdrawer.v1 (path /, a subscribe, JSON envelopes);
            sockdrawer builds only (the baseline and the floor do not speak it)
  fanout-sse fanout read as Server-Sent Events streams (GET /<channel>, Accept: text/event-stream);
            sockdrawer builds only

--compression measures each sockdrawer build twice, plain and with
permessage-deflate (server --compression, load clients offering and
inflating it), side by side.

Examples:
  python bench/run.py --quick                       # smoke run, < 1 minute
  python bench/run.py --scenario all --rev HEAD --json-out bench/results/results.jsonl \
        --plot docs/_static/bench.png --rst           # the run behind docs/performance.rst
  python bench/run.py --scenario fanout --clients 2 --no-baseline
  python bench/run.py --scenario fanout-json --compression --no-baseline --rates 100,1000   # deflate vs plain
  python bench/run.py --scenario fanout --rev f45089b --rev HEAD --no-baseline --rates 100  # two builds, one run
  python bench/run.py --server-cmd "twistd -n --pidfile= sockdrawer --port tcp:{port}:interface=127.0.0.1 \\
        --api none --redis redis://127.0.0.1:{redis_port}/0" --label mybuild --no-baseline
  python bench/run.py --from-json bench/results/results.jsonl --rst --plot out.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import select
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / "build"
RESULTS = BENCH / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

DEFAULT_SERVER_CMD = (
    "twistd -n --pidfile= sockdrawer --port tcp:{port}:interface=127.0.0.1 --api none "
    "--redis redis://127.0.0.1:{redis_port}/0 --max-connections 20000 --max-connections-per-ip 20000 "
    "--auto-ping-interval 0"
)
#: what --server-probe puts in front of a sockdrawer command (bench/probe.py)
PROBE_PREFIX = "{python} {bench}/probe.py -- "
DEFAULT_BASELINE_CMD = "{python} bench/baseline_autobahn.py --port {port} --redis-port {redis_port}"
FLOOR_CMD = "{python} bench/floor_server.py --port {port} --redis-port {redis_port}"
#: the peers (--peer): other servers a user might pick, fed by one ioredis PSUBSCRIBE, versions locked in
#: bench/peers/package-lock.json (installed with `npm ci --prefix bench/peers` when missing)
PEERS = {
    "bun": "{bench}/peers/node_modules/@oven/bun-linux-x64/bin/bun {bench}/peers/bun_server.js "
           "--port {port} --redis-port {redis_port}",
    "node-ws": "node {bench}/peers/node_ws_server.js --port {port} --redis-port {redis_port}",
}
#: labels of the servers that are not sockdrawer builds (they speak neither sockdrawer.v1 nor event streams)
OTHERS = ("baseline", "floor", *PEERS)

P99_LIMIT_MS = 250.0
DEFLATE_SUFFIX = "+deflate"


@dataclass
class Scenario:
    name: str
    title: str
    sockets: int
    channels: int
    size: int = 100
    start_rate: float = 0.0  # msg/s; 0: no publishing (idle)
    max_rate: float = 0.0
    payload: str = "dots"  # publisher --payload: "dots" (header + '.' padding) or "json"
    v1: bool = False  # clients speak sockdrawer.v1 (path /, subscribe, JSON envelopes)
    sse: bool = False  # clients read Server-Sent Events streams instead of WebSockets

    @property
    def fanout(self) -> float:
        return self.sockets / self.channels


SCENARIOS = {
    "fanout": Scenario("fanout", "1 channel, 1,000 sockets, 100 B", 1000, 1, 100, 100, 10_000),
    "channels": Scenario("channels", "10,000 sockets, 1 channel each, 100 B", 10_000, 10_000, 100, 5000, 200_000),
    "idle": Scenario("idle", "10,000 idle sockets", 10_000, 1),
    "idle-channels": Scenario("idle-channels", "10,000 idle sockets, 1 channel each", 10_000, 10_000),
    "idle-v1": Scenario("idle-v1", "10,000 idle sockdrawer.v1 sockets, 1 channel each", 10_000, 10_000, v1=True),
    "large": Scenario("large", "1 channel, 1,000 sockets, 16 KiB", 1000, 1, 16384, 10, 5000),
    "fanout-json": Scenario("fanout-json", "1 channel, 1,000 sockets, 1 KiB JSON", 1000, 1, 1024, 100, 10_000,
                            "json"),
    "fanout-v1": Scenario("fanout-v1", "1 channel, 1,000 sockdrawer.v1 sockets, 100 B", 1000, 1, 100, 100, 10_000,
                          v1=True),
    "fanout-sse": Scenario("fanout-sse", "1 channel, 1,000 Server-Sent Events streams, 100 B", 1000, 1, 100, 100,
                           10_000, sse=True),
}
QUICK = {
    "fanout": dict(sockets=200, start_rate=100),
    "channels": dict(sockets=1000, channels=1000, start_rate=2000),
    "idle": dict(sockets=1000),
    "idle-channels": dict(sockets=1000, channels=1000),
    "idle-v1": dict(sockets=1000, channels=1000),
    "large": dict(sockets=100, start_rate=20),
    "fanout-json": dict(sockets=200, start_rate=100),
    "fanout-v1": dict(sockets=200, start_rate=100),
    "fanout-sse": dict(sockets=200, start_rate=100),
}
ORDER = ["fanout", "channels", "idle", "idle-channels", "idle-v1", "large", "fanout-json", "fanout-v1", "fanout-sse"]
#: the scenarios that only open sockets and measure them idle (no publishing)
IDLE = ("idle", "idle-channels", "idle-v1")


@dataclass
class Server:
    """A server under test: its label, command template, PYTHONPATH, build, and whether clients offer deflate."""

    label: str
    cmd: str
    pythonpath: str | None = None
    git: dict[str, Any] | None = None
    deflate: bool = False


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- /proc helpers


#: --workers: the supervisor's pid -> it and its workers, whose CPU and RSS proc_cpu and proc_rss add up
WORKER_TREES: dict[int, list[int]] = {}


def proc_cpu(pid: int) -> float:
    """utime + stime + cutime + cstime of a process (with --workers: summed over the workers), in seconds."""
    total = 0
    for one in WORKER_TREES.get(pid, [pid]):
        with open(f"/proc/{one}/stat") as f:
            data = f.read()
        fields = data[data.rindex(")") + 2 :].split()
        # fields[0] is state (field 3); utime is field 14 -> index 11
        total += sum(int(x) for x in fields[11:15])
    return total / CLK_TCK


def proc_rss(pid: int) -> int:
    """Resident set size in bytes (with --workers: summed over the supervisor and its workers)."""
    total = 0
    for one in WORKER_TREES.get(pid, [pid]):
        with open(f"/proc/{one}/statm") as f:
            total += int(f.read().split()[1]) * PAGE
    return total


def worker_tree(listener_pid: int) -> int:
    """--workers: the supervisor of the worker listener_pid, its workers recorded in WORKER_TREES."""
    with open(f"/proc/{listener_pid}/stat") as f:
        parent = int(f.read().rsplit(")", 1)[1].split()[1])
    workers = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                        workers.append(int(d))
            except OSError:
                pass
    WORKER_TREES[parent] = [parent, *workers]
    return parent


def proc_session(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    return int(data[data.rindex(")") + 2 :].split()[3])


def core_times() -> dict[int, tuple[float, float, float]]:
    """Per core: (busy, steal, total) seconds since boot, from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]]
            user, nice, system, idle, iowait, irq, softirq, steal = v
            busy = user + nice + system + irq + softirq
            out[int(name[3:])] = (busy / CLK_TCK, steal / CLK_TCK, sum(v) / CLK_TCK)
    return out


def listening_inode(port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        return inode
        except OSError:
            pass
    return None


def find_listener_pid(root_pid: int, port: int) -> int | None:
    """The process in root_pid's session that holds the listening socket on port."""
    inode = listening_inode(port)
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    candidates = [root_pid]
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != root_pid:
            try:
                if proc_session(int(d)) == root_pid:
                    candidates.append(int(d))
            except OSError:
                pass
    for pid in candidates:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    pass
        except OSError:
            pass
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def hist_low(idx: int) -> int:
    if idx < 16:
        return idx
    msb, sub = idx // 16 + 3, idx % 16
    return (16 + sub) << (msb - 4)


def hist_quantile(hist: dict[int, int], q: float) -> float:
    """Bucket midpoint at quantile q, in ns."""
    total = sum(hist.values())
    if not total:
        return 0.0
    want = min(int(q * total), total - 1)
    acc = 0
    for idx in sorted(hist):
        acc += hist[idx]
        if acc > want:
            return (hist_low(idx) + hist_low(idx + 1)) / 2
    return 0.0


# ---------------------------------------------------------------- processes


try:
    import ctypes

    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


class Children:
    """Every child process, each in its own session, killed by process group."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], cpus: set[int] | None, **kw: Any) -> subprocess.Popen[bytes]:
        """Start argv in a new session, pinned to cpus."""
        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)
            if _prctl is not None:
                _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: die with the runner, even if it is killed

        p = subprocess.Popen(argv, start_new_session=True, preexec_fn=pin, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
        else:
            # the leader exited; its group may live on
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for stream in (p.stdin, p.stdout, p.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            try:
                self.stop(p)
            except Exception as e:  # keep killing the others
                print(f"warning: stopping pid {p.pid}: {e}", file=sys.stderr)


class LoadClient:
    def __init__(self, children: Children, idx: int, port: int, conns: int, offset: int, channels: int,
                 concurrency: int, cpus: set[int] | None, log: Path, poll_us: int = 0, deflate: bool = False,
                 inflate_cache: bool = True, v1: bool = False, sse: bool = False) -> None:
        argv = [str(BUILD / "loadclient"), "--port", str(port), "--conns", str(conns), "--offset", str(offset),
                "--channels", str(channels), "--concurrency", str(concurrency), "--id", str(idx),
                "--max-seconds", "3600", "--poll-us", str(poll_us), "--inflate-cache", "1" if inflate_cache else "0"]
        if deflate:
            argv.append("--deflate")
        if v1:
            argv.append("--v1")
        if sse:
            argv.append("--sse")
        self.idx = idx
        self.conns = conns
        self.logf = open(log, "wb")
        self.p = children.start(argv, cpus, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.logf)
        self.buf = b""
        self.pid = self.p.pid
        self.last_cpu = 0.0
        self.last_sys = 0.0

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd.encode() + b"\n")
        self.p.stdin.flush()

    def read_event(self, want: str, timeout: float) -> dict[str, Any]:
        assert self.p.stdout is not None
        fd = self.p.stdout.fileno()
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                ev = json.loads(line)
                if ev.get("event") == want:
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"load client {self.idx}: no '{want}' within {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise BenchError(f"load client {self.idx} exited (see {self.logf.name})")
                self.buf += chunk


def ask_all(clients: list[LoadClient], cmd: str, event: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    for c in clients:
        c.send(cmd)
    return [c.read_event(event, timeout) for c in clients]


# ---------------------------------------------------------------- measurement


@dataclass
class Env:
    args: argparse.Namespace
    children: Children
    server_cpus: set[int] | None
    load_cpus: set[int] | None
    logdir: Path


@dataclass
class Setup:
    """One scenario on one server: Redis, the server, the clients."""

    redis_port: int
    redis_proc: subprocess.Popen[bytes]
    redis_log: Path
    server_proc: subprocess.Popen[bytes]
    server_pid: int
    port: int
    clients: list[LoadClient] = field(default_factory=list)
    step_id: int = 0
    failed: int = 0
    sub_ids: set[str] = field(default_factory=set)
    server_log: Path | None = None

    def redis(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.redis_port, socket_timeout=5, socket_connect_timeout=5)


def build() -> None:
    BUILD.mkdir(exist_ok=True)
    for name, libs in (("loadclient", ["-lz"]), ("publisher", [])):
        src, out = BENCH / f"{name}.c", BUILD / name
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            cmd = ["gcc", "-O2", "-Wall", "-o", str(out), str(src), *libs]
            print("$", " ".join(cmd), file=sys.stderr)
            subprocess.run(cmd, check=True)


def start_redis(env: Env, tag: str) -> tuple[int, subprocess.Popen[bytes], Path]:
    import redis

    for _attempt in range(5):
        port = free_port()
        log = env.logdir / f"{tag}-redis.log"
        d = env.logdir / f"{tag}-redis"
        d.mkdir(exist_ok=True)
        p = env.children.start(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(d), "--logfile", str(log)],
            env.load_cpus, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and p.poll() is None:
            try:
                redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1).ping()
                return port, p, log
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        env.children.stop(p)
    raise BenchError("could not start redis-server")


def install_peers() -> None:
    """The peers' packages, exactly as locked, unless installed already."""
    if not (BENCH / "peers" / "node_modules" / "@oven" / "bun-linux-x64" / "bin" / "bun").exists():
        subprocess.run(["npm", "ci", "--prefix", str(BENCH / "peers"), "--no-audit", "--no-fund",
                        "--loglevel=error"], check=True)


def start_server(env: Env, cmd: str, redis_port: int, tag: str, pythonpath: str | None = None
                 ) -> tuple[subprocess.Popen[bytes], int, int]:
    import redis

    child_env = dict(os.environ)
    if pythonpath:
        child_env["PYTHONPATH"] = pythonpath + (os.pathsep + child_env["PYTHONPATH"]
                                                if child_env.get("PYTHONPATH") else "")
    for _attempt in range(3):
        port = free_port()
        text = cmd.format(port=port, redis_port=redis_port, python=sys.executable, bench=BENCH, root=ROOT)
        log = env.logdir / f"{tag}-server.log"
        logf = open(log, "ab")
        logf.write(f"$ {'PYTHONPATH=' + pythonpath + ' ' if pythonpath else ''}{text}\n".encode())
        logf.flush()
        p = env.children.start(shlex.split(text), env.server_cpus, stdout=logf, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=ROOT, env=child_env)
        logf.close()
        r = redis.Redis(port=redis_port, socket_timeout=5)
        deadline = time.monotonic() + 60
        pid = None
        while time.monotonic() < deadline:
            if p.poll() is not None:
                break
            if pid is None:
                pid = find_listener_pid(p.pid, port)
            workers = env.args.workers if "--workers" in text else 1  # every worker subscribed
            if pid is not None and int(r.execute_command("PUBSUB", "NUMPAT")) >= 1 and (
                    workers == 1 or len(pubsub_clients(r)) >= workers):
                return p, (worker_tree(pid) if workers > 1 else pid), port
            time.sleep(0.1)
        env.children.stop(p)
        tail = log.read_text(errors="replace").splitlines()[-15:]
        if "Address already in use" in "\n".join(tail):
            continue
        raise BenchError("server did not start (listening + PSUBSCRIBE) within 60 s; log tail:\n  "
                         + "\n  ".join(tail))
    raise BenchError("server did not start: port conflicts")


def wait_idle(setup: Setup, limit: float = 30.0, quiet: float = 0.05) -> bool:
    """
    After a failed step: wait until Redis holds nothing for the subscriber
    and the server uses < quiet of a core over 0.5 s, so that the next step
    starts from an empty pipeline.
    """
    deadline = time.monotonic() + limit
    r = setup.redis()
    try:
        while time.monotonic() < deadline:
            c0 = proc_cpu(setup.server_pid)
            time.sleep(0.5)
            try:
                omem = sum(int(c.get("omem", 0)) for c in pubsub_clients(r))
            except Exception:
                omem = 0
            if omem == 0 and proc_cpu(setup.server_pid) - c0 < quiet * 0.5:
                return True
        print(f"  warning: the server is still busy {limit:.0f} s after the failed step", flush=True)
        return False
    finally:
        r.close()


def wait_subscribed(setup: Setup, limit: float = 30.0) -> bool:
    """After Redis dropped the subscriber: wait until the server has subscribed again."""
    r = setup.redis()
    try:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if int(r.execute_command("PUBSUB", "NUMPAT")) >= 1:
                time.sleep(0.5)
                return True
            time.sleep(0.2)
    finally:
        r.close()
    print(f"  the server did not subscribe again within {limit:.0f} s", flush=True)
    return False


def machine_busy(seconds: float = 1.0) -> float:
    """Cores' busy time over the next `seconds`, in cores."""
    c0, t0 = core_times(), time.monotonic()
    time.sleep(seconds)
    c1 = core_times()
    return sum(c1[c][0] - c0[c][0] for c in c1 if c in c0) / (time.monotonic() - t0)


def wait_quiet(limit: float = 60.0, threshold: float = 0.15) -> bool:
    """Between steps (our processes idle): wait until the machine is idle."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if machine_busy() < threshold:
            return True
    print(f"  warning: the machine stayed busy for {limit:.0f} s", flush=True)
    return False


def pubsub_clients(r: Any) -> list[dict[str, str]]:
    out = []
    for line in r.execute_command("CLIENT", "LIST", "TYPE", "pubsub").decode().splitlines():
        out.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
    return out


def run_publisher(env: Env, setup: Setup, sc: Scenario, rate: float, duration: float
                  ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Publish; meanwhile watch Redis' subscriber output buffer.  Returns (publisher, redis) results."""
    setup.step_id += 1
    argv = [str(BUILD / "publisher"), "--port", str(setup.redis_port), "--rate", f"{rate:g}",
            "--duration", f"{duration:g}", "--channels", str(sc.channels), "--size", str(sc.size),
            "--step", str(setup.step_id), "--payload", sc.payload]
    p = env.children.start(argv, env.load_cpus, stdout=subprocess.PIPE,
                           stderr=open(env.logdir / "publisher.err", "ab"))
    r = setup.redis()
    max_omem = 0
    ids: set[str] = set()
    while True:
        try:
            for c in pubsub_clients(r):
                max_omem = max(max_omem, int(c.get("omem", 0)))
                ids.add(c.get("id", "?"))
        except Exception:
            pass
        if setup.server_proc.poll() is not None:
            env.children.stop(p)
            raise BenchError("the server exited during the run")
        try:
            p.wait(0.2)
            break
        except subprocess.TimeoutExpired:
            pass
    assert p.stdout is not None
    out = p.stdout.read().decode()
    env.children.stop(p)
    try:
        res = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise BenchError(f"publisher failed: {out!r}") from None
    r.close()
    return res, {"max_omem": max_omem, "sub_ids": ids}


def expected_deliveries(sc: Scenario, sent: int) -> int:
    """Messages go round-robin over channels; sockets are spread the same way."""
    total = 0
    per_chan_socks = [sc.sockets // sc.channels + (1 if c < sc.sockets % sc.channels else 0)
                      for c in range(min(sc.channels, sc.sockets))]
    for c, socks in enumerate(per_chan_socks):
        msgs = sent // sc.channels + (1 if c < sent % sc.channels else 0)
        total += msgs * socks
    return total


def redis_output_limit_drops(setup: Setup) -> int:
    try:
        text = setup.redis_log.read_text(errors="replace")
    except OSError:
        return 0
    return text.count("overcoming of output buffer limits")


def measure_step(env: Env, setup: Setup, sc: Scenario, rate: float, duration: float, phase: str
                 ) -> dict[str, Any]:
    args = env.args
    clients = setup.clients
    # reset the clients' step counters, and their CPU time: not what they used while waiting between steps
    for cl, e in zip(clients, ask_all(clients, "r", "report"), strict=True):
        cl.last_cpu, cl.last_sys = e["cpu_s"], e["sys_s"]
    r0 = setup.redis()
    try:  # the subscriber(s) as of now: a reconnection after an earlier step is not this step's
        setup.sub_ids |= {c.get("id", "?") for c in pubsub_clients(r0)}
    finally:
        r0.close()
    drops0 = redis_output_limit_drops(setup)
    cores0 = core_times()
    self0 = sum(os.times()[:2])
    srv0 = proc_cpu(setup.server_pid)
    redis0 = proc_cpu(setup.redis_proc.pid)
    t0 = time.monotonic()
    wall0 = time.time()
    total0 = sum(e["total_frames"] for e in ask_all(clients, "p", "peek"))
    pub, red = run_publisher(env, setup, sc, rate, duration)
    t_pub = time.monotonic()
    expected = expected_deliveries(sc, pub["sent"])
    # drain: until every expected frame arrived, or no progress for a while
    drain_limit = 2.0 if args.quick else 5.0
    last, last_change, drained, stalled = -1, time.monotonic(), False, False
    cpu_at_change = proc_cpu(setup.server_pid)
    while True:
        got = sum(e["total_frames"] for e in ask_all(clients, "p", "peek")) - total0
        now = time.monotonic()
        if got >= expected:
            drained = True
            break
        if got != last:
            last, last_change, cpu_at_change = got, now, proc_cpu(setup.server_pid)
        elif now - last_change > 1.5:
            # nothing arrives: lost, unless the server is busy (a server that
            # fans a long burst out into its own buffers sends nothing for a while)
            if proc_cpu(setup.server_pid) - cpu_at_change < 0.1 * (now - last_change):
                stalled = True
                break
        if now - t_pub > drain_limit:
            break
        time.sleep(0.05)
    t1 = time.monotonic()
    srv1 = proc_cpu(setup.server_pid)
    redis1 = proc_cpu(setup.redis_proc.pid)
    cores1 = core_times()
    self1 = sum(os.times()[:2])
    reps = ask_all(clients, "r", "report")
    drops = redis_output_limit_drops(setup) - drops0
    probed = probe_figures(setup, wall0, time.time())

    hist: dict[int, int] = {}
    for e in reps:
        for idx, n in e["hist"]:
            hist[idx] = hist.get(idx, 0) + n
    delivered = sum(e["frames"] for e in reps)
    wall = t1 - t0
    server_cpu = srv1 - srv0
    client_cpu = sum(e["cpu_s"] for e in reps) - sum(c.last_cpu for c in clients)
    client_sys = sum(e["sys_s"] for e in reps) - sum(c.last_sys for c in clients)
    for cl, e in zip(clients, reps, strict=True):
        cl.last_cpu, cl.last_sys = e["cpu_s"], e["sys_s"]
    reads = sum(e["reads"] for e in reps)
    payload_bytes = sum(e["bytes"] for e in reps)
    wire_bytes = sum(e["wire_bytes"] for e in reps)
    all_busy = sum(cores1[c][0] - cores0[c][0] for c in cores1 if c in cores0)
    ours = server_cpu + (redis1 - redis0) + client_cpu + pub["cpu_s"] + (self1 - self0)
    other_cpu = max(0.0, all_busy - ours)
    sid = min(env.server_cpus) if env.server_cpus else None
    lid = min(env.load_cpus) if env.load_cpus else None

    def core_delta(cid: int | None) -> tuple[float, float]:
        if cid is None or cid not in cores0:
            return 0.0, 0.0
        return cores1[cid][0] - cores0[cid][0], cores1[cid][1] - cores0[cid][1]

    core_srv, steal_srv = core_delta(sid)
    core_load, steal_load = core_delta(lid)
    new_sub = bool(setup.sub_ids) and not red["sub_ids"] <= setup.sub_ids
    setup.sub_ids |= red["sub_ids"]
    gaps = sum(e["lost"] for e in reps)
    missing = max(0, expected - delivered)
    # frames that stopped coming are lost; frames still coming when the drain
    # limit passed are a backlog (the server is behind), not a loss
    lost = missing if (stalled or drained) else min(gaps, missing)
    backlog = missing - lost
    closes = sum(e["closes"] for e in reps)
    open_now = sum(e["open"] for e in reps)
    p99 = hist_quantile(hist, 0.99) / 1e6
    publisher_ok = (pub["sent"] == pub["target"] and not pub["io_error"]
                    and pub["achieved_rate"] >= 0.95 * rate - 1)
    problems = []
    if lost:
        problems.append(f"lost {lost}")
    if backlog:
        problems.append(f"{backlog} still queued {drain_limit:.0f} s after publishing")
    for key, what in (("dup", "duplicates"), ("late", "out of order"), ("wrong_chan", "on the wrong channel"),
                      ("bad_payload", "bad payloads"), ("inflate_errors", "did not inflate")):
        n = sum(e[key] for e in reps)
        if n:
            problems.append(f"{n} {what}")
    if drops or new_sub:
        problems.append("Redis dropped the subscriber")
    if closes or open_now < sc.sockets - setup.failed:
        problems.append(f"{sc.sockets - setup.failed - open_now} sockets closed")
    if p99 > P99_LIMIT_MS:
        problems.append(f"p99 {p99:.0f} ms > {P99_LIMIT_MS:.0f}")
    if not publisher_ok:
        problems.append(f"publisher reached {pub['achieved_rate']:.0f} msg/s")
    pub_s = max(pub["send_s"], 1e-9)
    res = {
        "phase": phase,
        "rate": rate,
        "offered_dps": rate * sc.fanout,
        "window_s": duration,
        "wall_s": round(wall, 4),
        "sent": pub["sent"],
        "expected": expected,
        "delivered": delivered,
        "lost": lost,
        "backlog": backlog,
        "gaps": gaps,
        "stale": sum(e["stale"] for e in reps),
        "dup": sum(e["dup"] for e in reps),
        "late": sum(e["late"] for e in reps),
        "wrong_chan": sum(e["wrong_chan"] for e in reps),
        "bad_payload": sum(e["bad_payload"] for e in reps),
        "closes": closes,
        "delivered_dps": delivered / max(t1 - t0, 1e-9),
        "p50_ms": hist_quantile(hist, 0.5) / 1e6,
        "p99_ms": p99,
        "p999_ms": hist_quantile(hist, 0.999) / 1e6,
        "max_ms": max([e["lat_max_ns"] for e in reps] + [0]) / 1e6,
        "server_cpu_s": round(server_cpu, 4),
        "server_util": server_cpu / wall,
        "us_per_delivery": server_cpu / delivered * 1e6 if delivered else None,
        "server_core_busy_s": round(core_srv, 4),
        "server_core_us_per_delivery": core_srv / delivered * 1e6 if delivered else None,
        "server_core_steal_s": round(steal_srv, 4),
        "client_cpu_s": round(client_cpu, 4),
        "client_util": client_cpu / wall,
        "client_ns_per_frame": client_cpu / delivered * 1e9 if delivered else None,
        "client_sys_s": round(client_sys, 4),
        "client_reads": reads,
        "frames_per_read": delivered / reads if reads else None,
        "payload_bytes": payload_bytes,
        "wire_bytes": wire_bytes,
        "payload_bytes_per_delivery": payload_bytes / delivered if delivered else None,
        "wire_bytes_per_delivery": wire_bytes / delivered if delivered else None,
        "deflated": sum(e["deflated"] for e in reps),
        "inflates": sum(e["inflates"] for e in reps),
        "inflate_errors": sum(e["inflate_errors"] for e in reps),
        "publisher_cpu_s": pub["cpu_s"],
        "publisher_rate": pub["achieved_rate"],
        "publisher_max_lag_ms": pub["max_lag_ms"],
        "publish_s": round(pub_s, 4),
        "redis_cpu_s": round(redis1 - redis0, 4),
        "redis_max_omem": red["max_omem"],
        "load_core_busy_s": round(core_load, 4),
        "load_core_util": core_load / wall,
        "load_core_steal_s": round(steal_load, 4),
        "all_cores_busy_s": round(all_busy, 4),
        "other_cpu_s": round(other_cpu, 4),
        "drained": drained,
        "load_limited": core_load / wall > 0.9,
        "ok": not problems,
        "problems": problems,
        **probed,
    }
    return res


def probe_figures(setup: Setup, since: float, until: float, whole: bool = False) -> dict[str, Any]:
    """
    What bench/probe.py logged (one line a second) between ``since`` and
    ``until`` (wall clock, seconds, widened by a second at the end): garbage
    collections per generation, the longest gen-2 pass, the reactor's longest
    lateness and its stalls.  Empty without ``--server-probe``.  With
    ``whole``, only the seconds that began after ``since`` (the connect
    phase: not the server's start-up before it).
    """
    log = setup.server_log
    if log is None or not log.exists():
        return {}
    gc_n, gc_ms, gc_max = [0, 0, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    stalls, late_max, lines = 0, 0.0, 0
    with open(log, errors="replace") as f:
        for line in f:
            at = line.find("probe {")
            if at < 0:
                continue
            try:
                e = json.loads(line[at + 6:])
            except ValueError:
                continue
            if not since < e["t"] <= until + 1.0 or (whole and e["t"] - 1.05 < since):
                continue
            lines += 1
            for g in range(3):
                gc_n[g] += e["gc"][g]
                gc_ms[g] += e["gc_ms"][g]
                gc_max[g] = max(gc_max[g], e["gc_max_ms"][g])
            stalls += e["stalls"]
            late_max = max(late_max, e["late_max_ms"])
    if not lines:
        return {}
    return {"gc0": gc_n[0], "gc1": gc_n[1], "gc2": gc_n[2], "gc_ms": round(sum(gc_ms), 1),
            "gc2_max_ms": round(gc_max[2], 1), "gc_max_ms": round(max(gc_max), 1),
            "stall_max_ms": round(late_max, 1), "stalls": stalls}


def fmt_step(s: dict[str, Any]) -> str:
    us = s["us_per_delivery"]
    deflated = ""
    if s.get("deflated") and s["delivered"]:
        deflated = f" ({100 * s['deflated'] / s['delivered']:.0f}% deflated)"
    return (f"  {s['phase']:<8} {s['rate']:>9,.0f} msg/s {s['offered_dps']:>12,.0f} dl/s  "
            f"got {s['delivered']:>10,}  p50 {s['p50_ms']:8.2f} p99 {s['p99_ms']:8.2f} ms  "
            f"srv {s['server_util'] * 100:4.0f}% {us if us is not None else float('nan'):6.2f} us/dl  "
            f"cli {s['client_util'] * 100:3.0f}%  load-core {s['load_core_util'] * 100:3.0f}%"
            f"{'!' if s.get('load_limited') else ' '} "
            f"wire {s['wire_bytes_per_delivery'] or 0:,.0f} B/dl"
            f"{deflated} "
            + (f"gc2 {s['gc2']} (max {s['gc_max_ms']:.0f} ms) stall {s['stall_max_ms']:.0f} ms "
               if "stall_max_ms" in s else "")
            + f"{'ok' if s['ok'] else 'FAIL: ' + ', '.join(s['problems'])}"
            + (f"  [other processes: {s['other_cpu_s'] / s['wall_s'] * 100:.0f}% of a core]"
               if s.get("other_cpu_s", 0) > 0.15 * s["wall_s"] else ""))


def ramp(env: Env, setup: Setup, sc: Scenario) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Step the rate up until a failure, refine, then confirm the best for --duration."""
    args = env.args
    max_rate = args.max_rate or sc.max_rate
    probe = args.probe
    steps: list[dict[str, Any]] = []
    refine_steps = 0 if args.quick else 2
    max_probes = 2 if args.quick else 14

    def step(rate: float, window: float, phase: str) -> dict[str, Any]:
        for attempt in range(args.noisy_retries + 1):
            s = measure_step(env, setup, sc, rate, window, phase)
            s["noisy"] = s["other_cpu_s"] > 0.25 * s["wall_s"]
            print(fmt_step(s), flush=True)
            if not s["ok"]:
                wait_idle(setup)
            if not s["noisy"] or attempt == args.noisy_retries:
                break
            print("  other processes used the CPU during that step: waiting for a quiet machine, then "
                  "measuring it again", flush=True)
            wait_quiet()
        steps.append(s)
        return s

    def clean(s: dict[str, Any]) -> bool:
        # with fewer sockets, or no subscriber, the next steps would not be comparable
        if any("closed" in p for p in s["problems"]):
            return False
        if any("Redis dropped" in p for p in s["problems"]):
            return wait_subscribed(setup)
        return True

    rate = sc.start_rate
    best = fail = None
    stop_reason = None
    if args.rates:
        for r in args.rates:
            step(r, probe, "fixed")
        return steps, {"rates": args.rates}
    for _ in range(max_probes):
        s = step(rate, probe, "probe")
        if s["ok"]:
            best = rate
        elif any(p.startswith("publisher") for p in s["problems"]) and len(s["problems"]) == 1:
            stop_reason = "the publisher could not keep up"
            break
        else:
            fail = rate if fail is None else min(fail, rate)
        if not clean(s):
            stop_reason = "; ".join(s["problems"])
            break
        if best is None:  # even the first rate fails: step down
            rate = rate / 2
            if rate < sc.start_rate / 16:
                stop_reason = "no rate held"
                break
        elif fail is None:
            if rate >= max_rate:
                stop_reason = f"--max-rate {max_rate:g} reached"
                break
            rate = min(rate * 2, max_rate)
        else:
            break
    else:
        stop_reason = stop_reason or "probe limit"
    if best is not None and fail is not None and clean(steps[-1]):
        for _ in range(refine_steps):
            mid = math.sqrt(best * fail)
            if mid / best < 1.08:
                break
            mid = float(f"{mid:.2g}") if mid < 100 else float(round(mid, -int(math.log10(mid)) + 2))
            if not best < mid < fail:
                break
            s = step(mid, probe, "refine")
            if s["ok"]:
                best = mid
            else:
                fail = mid
                if not clean(s):
                    break
    held = None
    if best is not None and clean(steps[-1]):
        r = best
        for _ in range(4):
            s = step(r, args.duration, "confirm")
            if s["ok"]:
                held = s
                break
            if not clean(s):
                break
            r = float(f"{r / 1.25:.2g}")
    summary = {"best_probe_rate": best, "first_fail_rate": fail, "stop_reason": stop_reason}
    if held:
        summary.update(held_rate=held["rate"], held_dps=held["offered_dps"], held=held)
    return steps, summary


def snapshot(rev: str) -> tuple[str, Path]:
    """Export sockdrawer/ and twisted/plugins/ of a git revision to bench/build/rev-<hash>."""
    commit = sh(["git", "rev-parse", "--short", rev + "^{commit}"])
    if not commit:
        raise SystemExit(f"--rev {rev}: not a git revision")
    dest = BUILD / f"rev-{commit}"
    if not (dest / "sockdrawer" / "__init__.py").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", "--format=tar", commit, "sockdrawer", "twisted"],
                                 cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit, dest


def start_setup(env: Env, server: Server, sc: Scenario) -> tuple[Setup, dict[str, Any]]:
    """Redis, the server, the load clients with every socket open: the setup and the connect-phase figures."""
    args = env.args
    label, cmd, pythonpath = server.label, server.cmd, server.pythonpath
    tag = re.sub(r"[^A-Za-z0-9@._-]+", "_", f"{sc.name}-{label}")
    print(f"\n== {sc.name} ({sc.title}) on {label}", flush=True)
    children = env.children
    redis_port, redis_proc, redis_log = start_redis(env, tag)
    try:
        server_proc, server_pid, port = start_server(env, cmd, redis_port, tag, pythonpath)
    except BaseException:
        children.stop(redis_proc)  # start_server stopped its own process
        raise
    setup = Setup(redis_port, redis_proc, redis_log, server_proc, server_pid, port,
                  server_log=env.logdir / f"{tag}-server.log")
    try:
        print(f"  server pid {server_pid} on port {port}, redis pid {redis_proc.pid} on port {redis_port}", flush=True)
        time.sleep(0.2 if args.quick else 0.5)
        rss0 = proc_rss(server_pid)
        cpu0 = proc_cpu(server_pid)
        # connect
        k = max(1, min(args.clients, sc.sockets))
        t0, wall0 = time.monotonic(), time.time()
        per = [sc.sockets // k + (1 if i < sc.sockets % k else 0) for i in range(k)]
        off = 0
        for i, n in enumerate(per):
            c = LoadClient(children, i, port, n, off, sc.channels, max(1, args.concurrency // k), env.load_cpus,
                           env.logdir / f"{tag}-client{i}.log", args.client_poll_us, server.deflate,
                           not args.no_inflate_cache, sc.v1, sc.sse)
            setup.clients.append(c)
            off += n
        conn = [c.read_event("connected", 300) for c in setup.clients]
        t_conn = time.monotonic() - t0
        cpu1 = proc_cpu(server_pid)
        opened = sum(e["open"] for e in conn)
        failed = sum(e["failed"] for e in conn)
        setup.failed = failed
        for cl, e in zip(setup.clients, conn, strict=True):
            cl.last_cpu, cl.last_sys = e["cpu_s"], e["sys_s"]
        hs: dict[int, int] = {}
        for e in conn:
            for idx, n in e["hs_hist"]:
                hs[idx] = hs.get(idx, 0) + n
        wall1 = time.time()
        time.sleep(0.3 if args.quick else 1.0)
        rss1 = proc_rss(server_pid)
        connect = {
            "sockets": sc.sockets,
            "open": opened,
            "failed": failed,
            "failures": {k2: sum(e[k2] for e in conn) for k2 in
                         ("failed_refused", "failed_timeout", "failed_http", "failed_other", "failed_ext")},
            "deflate": sum(e["deflate"] for e in conn),
            "http_status": [e["last_http_status"] for e in conn if e["last_http_status"]],
            "connect_s": round(t_conn, 4),
            "conn_per_s": opened / t_conn if t_conn else None,
            "handshake_p50_ms": hist_quantile(hs, 0.5) / 1e6,
            "handshake_p99_ms": hist_quantile(hs, 0.99) / 1e6,
            "handshake_cpu_us": (cpu1 - cpu0) / opened * 1e6 if opened else None,
            "server_cpu_s": round(cpu1 - cpu0, 4),
            "client_cpu_s": round(sum(e["cpu_s"] for e in conn), 4),
            "rss_before": rss0,
            "rss_after": rss1,
            "rss_per_socket": (rss1 - rss0) / opened if opened else None,
            # --server-probe: GC passes and reactor stalls while connecting
            **{"probe_" + k2: v for k2, v in probe_figures(setup, wall0, wall1, whole=True).items()},
        }
        print(f"  connect: {opened:,}/{sc.sockets:,} open in {t_conn:.2f} s ({connect['conn_per_s'] or 0:,.0f}/s), "
              f"handshake CPU {connect['handshake_cpu_us'] or 0:.0f} us/conn, "
              f"p99 {connect['handshake_p99_ms']:.1f} ms, "
              f"RSS {connect['rss_per_socket'] or 0:,.0f} B/socket ({rss0 / 2**20:.1f} -> {rss1 / 2**20:.1f} MiB)"
              + (f", permessage-deflate on {connect['deflate']:,}" if server.deflate else "")
              + (f", {failed} FAILED {connect['failures']} {connect['http_status'][:1]}" if failed else "")
              + (f", gc2 {connect['probe_gc2']} (max {connect['probe_gc_max_ms']:.0f} ms), "
                 f"stall {connect['probe_stall_max_ms']:.0f} ms" if "probe_gc2" in connect else ""),
              flush=True)
        if opened == 0:
            raise BenchError("no connection opened")
    except BaseException:
        stop_setup(env, setup)
        raise
    return setup, connect


def stop_setup(env: Env, setup: Setup) -> None:
    """Stop the load clients, the server and Redis of a setup."""
    for c in setup.clients:
        try:
            c.send("q")
        except OSError:
            pass
    for c in setup.clients:
        env.children.stop(c.p, timeout=5)
        c.logf.close()
    env.children.stop(setup.server_proc, timeout=10)
    env.children.stop(setup.redis_proc)


def warm_up(env: Env, setup: Setup, sc: Scenario) -> None:
    """Check delivery end to end before measuring."""
    w = measure_step(env, setup, sc, min(sc.start_rate, 100), 0.5, "warmup")
    if not w["delivered"]:
        raise BenchError(f"warm-up: nothing delivered ({w['problems']}); see {env.logdir}")


def run_one(env: Env, server: Server, sc: Scenario) -> dict[str, Any]:
    args = env.args
    setup, connect = start_setup(env, server, sc)
    try:
        steps: list[dict[str, Any]] = []
        summary: dict[str, Any] = {}
        if sc.start_rate:
            warm_up(env, setup, sc)
            steps, summary = ramp(env, setup, sc)
        else:
            c0 = proc_cpu(setup.server_pid)
            time.sleep(args.probe)
            summary["idle_cpu_util"] = (proc_cpu(setup.server_pid) - c0) / args.probe
            rep = ask_all(setup.clients, "r", "report")
            summary["idle_frames"] = sum(e["frames"] for e in rep)
            summary["idle_open"] = sum(e["open"] for e in rep)
        return {
            "connect": connect,
            "steps": steps,
            "summary": summary,
            "server_pid_is_child": setup.server_pid == setup.server_proc.pid,
        }
    finally:
        stop_setup(env, setup)


def run_interleaved(env: Env, servers: list[Server], sc: Scenario
                    ) -> list[tuple[dict[str, Any] | None, str | None]]:
    """
    --interleave: every server of the scenario set up at once (each with its
    own Redis and load clients; the idle ones cost nothing), then each
    --rates step measured on one server after the other, --repeat rounds,
    every other round in reverse order, so that a machine whose load drifts
    affects all of them alike.  Returns (result, error) per server.
    """
    args = env.args
    live: list[tuple[int, Setup, dict[str, Any]]] = []
    out: list[tuple[dict[str, Any] | None, str | None]] = [(None, None)] * len(servers)
    steps: dict[int, list[dict[str, Any]]] = {}
    try:
        for i, server in enumerate(servers):
            try:
                setup, connect = start_setup(env, server, sc)
            except BenchError as e:
                print(f"  ERROR: {e}", file=sys.stderr)
                out[i] = (None, str(e))
                continue
            live.append((i, setup, connect))
            steps[i] = []
        for item in list(live):
            try:
                warm_up(env, item[1], sc)
            except BenchError as e:
                print(f"  ERROR: {servers[item[0]].label}: {e}", file=sys.stderr)
                out[item[0]] = (None, str(e))
                live.remove(item)
                stop_setup(env, item[1])
        print(f"\n== {sc.name}: {args.repeat} round(s) of {', '.join(num(r) for r in args.rates)} msg/s, "
              f"{args.probe:g} s each, on {', '.join(servers[i].label for i, _, _ in live)}", flush=True)
        width = max([len(servers[i].label) for i, _, _ in live] + [1])
        for rnd in range(args.repeat):
            order = list(live) if rnd % 2 == 0 else live[::-1]
            for rate in args.rates:
                for item in order:
                    i, setup, _ = item
                    if item not in live:
                        continue
                    try:
                        s = measure_step(env, setup, sc, rate, args.probe, "fixed")
                    except BenchError as e:  # this server is out; the others go on
                        print(f"  ERROR: {servers[i].label}: {e}", file=sys.stderr)
                        out[i] = ({"connect": item[2], "steps": steps[i], "summary": {"rates": args.rates},
                                   "server_pid_is_child": setup.server_pid == setup.server_proc.pid}, str(e))
                        live.remove(item)
                        stop_setup(env, setup)
                        continue
                    s["round"] = rnd
                    s["noisy"] = s["other_cpu_s"] > 0.25 * s["wall_s"]
                    print(f"  {servers[i].label:<{width}} r{rnd}" + fmt_step(s), flush=True)
                    steps[i].append(s)
                    if not s["ok"]:
                        wait_idle(setup)
        for i, setup, connect in live:
            out[i] = ({"connect": connect, "steps": steps[i], "summary": {"rates": args.rates, "rounds": args.repeat},
                       "server_pid_is_child": setup.server_pid == setup.server_proc.pid}, None)
    finally:
        for _, setup, _ in live:
            stop_setup(env, setup)
    return out


# ---------------------------------------------------------------- reporting


def sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_info() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for mod in ("twisted", "autobahn", "txredisapi", "hiredis", "txaio"):
        try:
            from importlib.metadata import version

            versions[mod] = version(mod)
        except Exception:
            versions[mod] = None
    redis_version = sh(["redis-server", "--version"])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version.split(" v=")[-1].split()[0] if redis_version else None,
        "versions": versions,
        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
    }


def git_info() -> dict[str, Any]:
    return {
        "commit": sh(["git", "rev-parse", "--short", "HEAD"]),
        "dirty": bool(sh(["git", "status", "--porcelain", "--untracked-files=no", "sockdrawer"])),
    }


def num(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"


def first(r: dict[str, Any]) -> dict[str, Any]:
    """The first measured step of a run."""
    return next(x for x in r["steps"] if x["phase"] in ("probe", "fixed"))


def held(r: dict[str, Any]) -> dict[str, Any]:
    """The confirming step that held."""
    step: dict[str, Any] = r["summary"]["held"]
    return step


def conn_figs(r: dict[str, Any]) -> dict[str, Any]:
    """The connect-phase figures of a run."""
    figures: dict[str, Any] = r["connect"]
    return figures


def held_text(r: dict[str, Any]) -> str:
    sm = r["summary"]
    if sm.get("held"):
        return (f"{num(sm['held_dps'])} ({num(sm['held_rate'])} msg/s)"
                + (" [load core saturated: a lower bound]" if sm["held"].get("load_limited") else ""))
    if sm.get("best_probe_rate"):
        fan = r["params"]["sockets"] / r["params"]["channels"]
        return (f"none for {r['params']['confirm_s']:g} s; {num(sm['best_probe_rate'] * fan)} "
                f"({num(sm['best_probe_rate'])} msg/s) for {r['params']['probe_s']:g} s")
    return "none"


def fail_text(r: dict[str, Any]) -> str:
    fail = r["summary"].get("first_fail_rate")
    if not fail:
        return "none; stopped: " + (r["summary"].get("stop_reason") or "-")
    why = next((x["problems"] for x in r["steps"] if x["rate"] == fail and not x["ok"]), [])
    return f"{num(fail)} ({', '.join(why)})"


def bytes_text(x: dict[str, Any]) -> str:
    """Wire / payload bytes per delivery of a step (frame headers + payload as sent; payload inflated)."""
    return f"{num(x['wire_bytes_per_delivery'])} / {num(x['payload_bytes_per_delivery'])}"


def summary_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Rows: (scenario, figure, value per label)."""
    labels: list[str] = []
    for r in runs:
        if r["label"] not in labels:
            labels.append(r["label"])
    by = {(r["scenario"], r["label"]): r for r in runs}
    rows: list[list[str]] = []
    scen = [s for s in ORDER if any(r["scenario"] == s for r in runs)]

    def row(scenario: str, name: str, fn: Any) -> None:
        vals = []
        for lab in labels:
            r = by.get((scenario, lab))
            try:
                vals.append(fn(r) if r else "-")
            except (KeyError, TypeError, ZeroDivisionError):
                vals.append("-")
        if any(v != "-" for v in vals):
            rows.append([scenario, name] + vals)

    for s in scen:
        if s not in IDLE:
            row(s, f"highest rate held for the confirming window (no loss, p99 <= {P99_LIMIT_MS:.0f} ms), "
                   "deliveries/s",
                held_text)
            row(s, "  server CPU us/delivery at that rate",
                lambda r: num(held(r)["us_per_delivery"], 2))
            row(s, "  server CPU use at that rate", lambda r: f"{held(r)['server_util'] * 100:.0f}%")
            row(s, "  latency p50 / p99 / max, ms",
                lambda r: f"{held(r)['p50_ms']:.1f} / {held(r)['p99_ms']:.1f} / {held(r)['max_ms']:.0f}")
            row(s, "  bytes per delivery on the wire / payload", lambda r: bytes_text(held(r)))
            row(s, "  load clients CPU, ns/frame (core-1 busy)",
                lambda r: f"{held(r)['client_ns_per_frame']:.0f} ({held(r)['load_core_util'] * 100:.0f}%)")
            start = next((x["rate"] for r in runs if r["scenario"] == s for x in r["steps"]
                          if x["phase"] in ("probe", "fixed")), None)
            row(s, f"server CPU us/delivery at {num(start)} msg/s (first step)",
                lambda r: num(first(r)["us_per_delivery"], 2)
                + ("" if first(r)["ok"] else " (" + ", ".join(first(r)["problems"]) + ")"))
            row(s, "  latency p50 / p99 there, ms",
                lambda r: f"{first(r)['p50_ms']:.1f} / {first(r)['p99_ms']:.1f}")
            row(s, "  bytes per delivery on the wire / payload there", lambda r: bytes_text(first(r)))
            row(s, "lowest failing rate tried, msg/s (why)", fail_text)
            row(s, "steps disturbed by other processes",
                lambda r: str(sum(1 for x in r["steps"] if x.get("noisy"))))
        if s in IDLE:
            row(s, "RSS per idle socket, bytes", lambda r: num(conn_figs(r)["rss_per_socket"]))
            row(s, "time to open all sockets, s", lambda r: f"{conn_figs(r)['connect_s']:.2f}")
            row(s, "connections/s", lambda r: num(conn_figs(r)["conn_per_s"]))
            row(s, "server CPU per handshake, us", lambda r: num(conn_figs(r)["handshake_cpu_us"]))
            row(s, "handshake latency p50 / p99, ms",
                lambda r: f"{conn_figs(r)['handshake_p50_ms']:.1f} / {conn_figs(r)['handshake_p99_ms']:.1f}")
            row(s, "server CPU while idle", lambda r: f"{r['summary']['idle_cpu_util'] * 100:.1f}%")
    return labels, rows



def print_table(runs: list[dict[str, Any]]) -> None:
    labels, rows = summary_rows(runs)
    head = ["scenario", "figure"] + labels
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    print()
    print(line)
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print(line)
    prev = None
    for r in rows:
        cells = [r[0] if r[0] != prev else ""] + r[1:]
        prev = r[0]
        print("  ".join(str(cell).ljust(w) for cell, w in zip(cells, widths, strict=True)))
    print(line)


def ratio_text(x: dict[str, Any], ref: dict[str, Any] | None, key: str) -> str:
    """" (1.23x)": x[key] / ref[key]; empty without a reference."""
    if ref is None or not ref.get(key) or x.get(key) is None:
        return ""
    v = x[key] / ref[key]
    return f" ({v:.2f}x)" if v >= 0.1 else f" ({v:.2g}x)"


def pooled(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Steps at one rate taken together: CPU and bytes summed over deliveries, median latencies."""
    delivered = sum(x["delivered"] for x in steps)
    if not delivered:
        return {"delivered": 0}
    wire = [x.get("wire_bytes") for x in steps]
    reads = sum(x.get("client_reads") or 0 for x in steps)
    return {
        "delivered": delivered,
        "us_per_delivery": sum(x["server_cpu_s"] for x in steps) / delivered * 1e6,
        "us_per_read": sum(x["server_cpu_s"] for x in steps) / reads * 1e6 if reads else None,
        "p50_ms": statistics.median(x["p50_ms"] for x in steps),
        "p99_ms": statistics.median(x["p99_ms"] for x in steps),
        "wire_bytes_per_delivery": None if None in wire else sum(w for w in wire if w is not None) / delivered,
        "failed": sum(1 for x in steps if not x["ok"]),
        "n": len(steps),
        "rounds": {x.get("round", k): x for k, x in enumerate(steps)},
    }


def paired_text(x: dict[str, Any], base: dict[str, Any], per: str) -> str:
    """
    " [lo-hi, median m]": the ratios of server CPU per ``per`` (``delivered``
    or ``client_reads``) of the rounds measured back to back (--interleave).
    """
    paired = sorted(a["server_cpu_s"] / a[per] / (b["server_cpu_s"] / b[per])
                    for k, a in x["rounds"].items() if (b := base["rounds"].get(k))
                    and a.get(per) and b.get(per) and b["server_cpu_s"])
    if len(paired) < 2:
        return ""
    return f" [{paired[0]:.2f}-{paired[-1]:.2f}, median {statistics.median(paired):.2f}]"


def compare_rows(runs: list[dict[str, Any]], scenario: str) -> tuple[list[str], list[list[str]]]:
    """
    Per rate, each run of ``scenario`` side by side: server CPU us/delivery
    and its ratio to the first run's at that rate, server CPU per load-client
    read (about one per socket write: the cost per send, which does not
    depend on how many messages a busy server batches into each), latency
    p50 / p99, wire bytes per delivery and the ratio.  The probe/refine/fixed steps at each
    rate, pooled (see :func:`pooled`); with --interleave --repeat, the range
    and the median of the ratios of the rounds (each pair measured back to
    back) in brackets.
    """
    runs = runs_of(runs, scenario)
    cols: list[dict[float, dict[str, Any]]] = []
    for r in runs:
        by: dict[float, list[dict[str, Any]]] = {}
        for x in r["steps"]:
            if x["phase"] in ("probe", "refine", "fixed"):
                by.setdefault(x["rate"], []).append(x)
        cols.append({rate: pooled(xs) for rate, xs in by.items()})
    head = ["msg/s", "deliveries/s"]
    for r in runs:
        head += [f"{r['label']}: us/dl", "us/read", "p50 / p99 ms", "wire B/dl"]
    fan = runs[0]["params"]["sockets"] / runs[0]["params"]["channels"] if runs else 1
    rows = []
    for rate in sorted({rate for c in cols for rate in c}):
        ref = cols[0].get(rate)
        row = [num(rate), num(rate * fan)]
        for i, c in enumerate(cols):
            x = c.get(rate)
            if x is None or not x["delivered"]:
                row += ["-", "-", "-", "-"]
                continue
            base = ref if i and ref and ref["delivered"] else None
            us = num(x["us_per_delivery"], 2) + ratio_text(x, base, "us_per_delivery")
            per_read = num(x["us_per_read"], 2) + ratio_text(x, base, "us_per_read")
            if base is not None and x["n"] > 1:
                us += paired_text(x, base, "delivered")
                per_read += paired_text(x, base, "client_reads")
            if x["n"] > 1:
                us += f" n={x['n']}"
            if x["failed"]:
                us += " (failed)" if x["n"] == 1 else f" ({x['failed']} failed)"
            wire = x.get("wire_bytes_per_delivery")
            row += [us, per_read, f"{x['p50_ms']:.1f} / {x['p99_ms']:.1f}",
                    "-" if wire is None else num(wire) + ratio_text(x, base, "wire_bytes_per_delivery")]
        rows.append(row)
    return head, rows


def compare_text(runs: list[dict[str, Any]], scenario: str) -> str:
    head, rows = compare_rows(runs, scenario)
    widths = [max(len(x[i]) for x in rows + [head]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    out = [f"{scenario}, per rate (ratios: to {runs_of(runs, scenario)[0]['label']} at the same rate)", line,
           "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    out.append(line)
    return "\n".join(out)


def compare_rst(runs: list[dict[str, Any]], scenario: str) -> str:
    head, rows = compare_rows(runs, scenario)
    out = [".. list-table::", "   :header-rows: 1", ""]
    for r in [head] + rows:
        r = [re.sub(r"\bus\b", "µs", c.replace("us/dl", "µs/delivery")) for c in r]
        out.append(f"   * - {r[0]}")
        out += [f"     - {c}" for c in r[1:]]
    return "\n".join(out)


def runs_of(runs: list[dict[str, Any]], scenario: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["scenario"] == scenario and r["steps"]]


def print_compare(runs: list[dict[str, Any]], rst: bool) -> None:
    for s in ORDER:
        if s not in IDLE and len(runs_of(runs, s)) > 1:
            print()
            print(compare_text(runs, s))
            if rst:
                print()
                print(compare_rst(runs, s))


def rst_table(runs: list[dict[str, Any]]) -> str:
    labels, rows = summary_rows(runs)
    rows = [[re.sub(r"\bus\b", "µs", c) for c in r] for r in rows]
    out = [".. list-table::", "   :header-rows: 1", "   :widths: 12 40 " + " ".join(["24"] * len(labels)), ""]
    out.append("   * - Scenario")
    out.append("     - Figure")
    for lab in labels:
        out.append(f"     - {lab}")
    prev = None
    for r in rows:
        out.append(f"   * - {r[0] if r[0] != prev else ''}".rstrip())
        prev = r[0]
        out.append(f"     - {r[1].strip()}")
        for v in r[2:]:
            out.append(f"     - {v}")
    return "\n".join(out)


def steps_rst(runs: list[dict[str, Any]], scenario: str) -> str:
    """Per rate: server CPU us/delivery and p99 of each run (the probe/refine/fixed steps)."""
    runs = [r for r in runs if r["scenario"] == scenario]
    cols: list[dict[float, dict[str, Any]]] = []
    for r in runs:
        by: dict[float, dict[str, Any]] = {}
        for x in r["steps"]:
            if x["phase"] in ("probe", "refine", "fixed") and x["rate"] not in by:
                by[x["rate"]] = x
        cols.append(by)
    rates = sorted({rate for c in cols for rate in c})
    out = [".. list-table::", "   :header-rows: 1", "", "   * - msg/s", "     - deliveries/s"]
    out += [f"     - {r['label']}" for r in runs]
    fan = runs[0]["params"]["sockets"] / runs[0]["params"]["channels"] if runs else 1
    for rate in rates:
        out.append(f"   * - {num(rate)}")
        out.append(f"     - {num(rate * fan)}")
        for c in cols:
            x = c.get(rate)
            if x is None:
                out.append("     - -")
            else:
                mark = "" if x["ok"] else " (failed)"
                out.append(f"     - {num(x['us_per_delivery'], 2)} µs, p99 {x['p99_ms']:.0f} ms{mark}")
    return "\n".join(out)


def plot(runs: list[dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scen = [s for s in ORDER if s not in IDLE and any(r["scenario"] == s and r["steps"] for r in runs)]
    if not scen:
        print("nothing to plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(len(scen), 2, figsize=(11, 4.3 * len(scen)), squeeze=False)
    colors = {}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    for i, s in enumerate(scen):
        ax_l, ax_c = axes[i]
        for r in runs:
            if r["scenario"] != s:
                continue
            col = colors.setdefault(r["label"], palette[len(colors) % len(palette)])
            steps = [x for x in r["steps"] if x["phase"] != "warmup" and x["delivered"]]
            line = sorted((x for x in steps if x["phase"] != "confirm"), key=lambda x: x["offered_dps"])
            conf = [x for x in steps if x["phase"] == "confirm"]
            xs = [p["offered_dps"] for p in line]
            ax_l.plot(xs, [max(p["p50_ms"], 1e-3) for p in line], "o--", color=col, label=f"{r['label']} p50")
            ax_l.plot(xs, [max(p["p99_ms"], 1e-3) for p in line], "s-", color=col, label=f"{r['label']} p99")
            ax_c.plot(xs, [p["us_per_delivery"] for p in line], "o-", color=col, label=r["label"])
            if conf:
                ax_l.plot([p["offered_dps"] for p in conf], [max(p["p99_ms"], 1e-3) for p in conf], "*",
                          color=col, markersize=13, label=f"{r['label']} p99, {conf[0]['window_s']:g} s window")
                ax_c.plot([p["offered_dps"] for p in conf], [p["us_per_delivery"] for p in conf], "*",
                          color=col, markersize=13)
            bad = [p for p in steps if not p["ok"]]
            ax_c.plot([p["offered_dps"] for p in bad], [p["us_per_delivery"] for p in bad], "x", color="black",
                      markersize=9)
            ax_l.plot([p["offered_dps"] for p in bad], [max(p["p99_ms"], 1e-3) for p in bad], "x",
                      color="black", markersize=9)
            sat = [p for p in steps if p.get("load_limited")]
            ax_c.plot([p["offered_dps"] for p in sat], [p["us_per_delivery"] for p in sat], "o", mfc="none",
                      mec="grey", markersize=14)
        ax_l.axhline(P99_LIMIT_MS, color="grey", lw=0.8, ls=":")
        for ax in (ax_l, ax_c):
            ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_xlabel("offered deliveries/s (msg/s x sockets per channel)")
        ax_l.set_yscale("log")
        ax_l.set_ylabel("latency, ms")
        ax_l.set_title(f"{s}: {SCENARIOS[s].title}\npublish-to-read latency (dotted: {P99_LIMIT_MS:.0f} ms limit)",
                       fontsize=10)
        ax_c.set_yscale("log")
        ax_c.set_ylabel("server CPU, us per delivery")
        ax_c.set_title(f"{s}: server CPU per delivery\n(x: step failed; grey ring: load core saturated)",
                       fontsize=10)
        ax_l.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
        ax_c.legend(fontsize=7, loc="upper right", framealpha=0.7)
    meta = runs[0]
    fig.suptitle(f"sockdrawer benchmark, build {meta['git']['commit']}{'+dirty' if meta['git']['dirty'] else ''}, "
                 f"{meta['date'][:10]}, {meta['machine']['cpu_model']} x{meta['machine']['nproc']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", action="append", choices=ORDER + ["all"],
                   help="scenario to run (repeatable, or 'all'); default: all")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small socket counts, 1 s windows, at most 3 rate steps")
    p.add_argument("--clients", type=int, default=1, help="load-client processes (default 1)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of the confirming window at the best rate (default 10; --quick 1)")
    p.add_argument("--probe", type=float, default=None,
                   help="seconds of each probing window while stepping the rate (default 4; --quick 1)")
    p.add_argument("--max-rate", type=float, default=None,
                   help="highest msg/s to try (default per scenario: fanout 10,000, channels 200,000, large 5,000)")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=None,
                   help="comma-separated msg/s to measure instead of the ramp")
    p.add_argument("--sockets", type=int, default=None, help="override the scenario's socket count")
    p.add_argument("--interleave", action="store_true",
                   help="with --rates: set up every server of a scenario at once, then measure each rate on "
                        "one server after the other (--repeat rounds, every other round in reverse order), so "
                        "that load from other work on the machine affects all servers alike")
    p.add_argument("--repeat", type=int, default=1,
                   help="with --interleave: rounds of the --rates steps (default 1)")
    p.add_argument("--server-cmd", default=DEFAULT_SERVER_CMD,
                   help="command template of the server under test; {port}, {redis_port}, {python}, {bench}, "
                        "{root} are filled in (default: %(default)s)")
    p.add_argument("--label", default="sockdrawer", help="name of the server under test (default: sockdrawer)")
    p.add_argument("--workers", type=int, default=1,
                   help="run sockdrawer with --workers N (N processes on the port); server CPU and RSS are summed "
                        "over the supervisor and its workers (default 1; use --no-pin to let them use every core)")
    p.add_argument("--server-probe", action="store_true",
                   help="run each sockdrawer build under bench/probe.py: per step, the garbage collector's "
                        "passes (gen2 count, longest pass) and reactor stalls (longest lateness of a 5 ms timer) "
                        "go into the step's figures ('gc2', 'gc_max_ms', 'stall_max_ms', 'stalls')")
    p.add_argument("--rev", action="append", default=None,
                   help="measure sockdrawer as committed at this git revision (e.g. HEAD, HEAD~3, a tag): "
                        "sockdrawer/ is exported to bench/build/rev-<hash> and put first on the server's "
                        "PYTHONPATH, so work in progress in the tree is not measured.  Repeatable: each "
                        "revision is measured in turn, in the same run; 'tree' is the working tree")
    p.add_argument("--compression", action="store_true",
                   help="measure each sockdrawer build (not the baseline or the floor) twice: as it is, then "
                        "with --compression-args added to its command and the load clients offering "
                        "permessage-deflate (labelled '<label>" + DEFLATE_SUFFIX + "')")
    p.add_argument("--compression-args", default="--compression",
                   help="what the deflate variant adds to the server command (default: %(default)s; "
                        "e.g. '--compression --compression-threshold 0')")
    p.add_argument("--no-inflate-cache", action="store_true",
                   help="load clients inflate every compressed frame, instead of each distinct compressed "
                        "payload once (same checks; costs the load core about 2 us per frame)")
    p.add_argument("--baseline-cmd", default=DEFAULT_BASELINE_CMD, help="baseline command template")
    p.add_argument("--no-baseline", action="store_true",
                   help="do not measure the baseline (with --from-json: leave its runs out)")
    p.add_argument("--peer", action="append", choices=sorted(PEERS), default=[],
                   help="also measure a peer server (repeatable): bun (Bun's WebSocket server and topics) or "
                        "node-ws (Node's ws); both fed by ioredis, versions locked in bench/peers")
    p.add_argument("--floor", action="store_true",
                   help="also measure bench/floor_server.py, the least a Python process can do (raw sockets, "
                        "no WebSocket library): what sockdrawer costs above that is its own")
    p.add_argument("--concurrency", type=int, default=32,
                   help="handshakes in flight, over all load clients (default 32: below the listen backlog "
                        "of 50 that Twisted's tcp: endpoints use, so no SYN is dropped)")
    p.add_argument("--client-poll-us", type=int, default=1000,
                   help="load clients sleep N microseconds between non-blocking polls of their sockets "
                        "(default 1000), so that, as with remote clients, the server never pays for waking "
                        "a local reader; 0: block in epoll_wait (each write to an idle client wakes it)")
    p.add_argument("--server-cpu", type=int, default=0, help="core the server is pinned to (default 0)")
    p.add_argument("--load-cpu", type=int, default=1, help="core for Redis, clients, publisher (default 1)")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--noisy-retries", type=int, default=2,
                   help="measure a step during which other processes used more than a quarter of a core again, "
                        "once the machine is quiet, at most N times (default 2; 0: never)")
    p.add_argument("--json-out", default=None, help="append one JSON line per run to this file")
    p.add_argument("--plot", default=None, help="write a PNG plot (needs matplotlib)")
    p.add_argument("--rst", action="store_true", help="also print the summary as an RST list-table")
    p.add_argument("--from-json", action="append", default=None,
                   help="do not measure: read runs from this JSON-lines file (the last invocation in it, "
                        "or --run-id) and print/plot them; repeatable, to put runs side by side")
    p.add_argument("--run-id", default=None, help="with --from-json: which invocation to show")
    p.add_argument("--steps-table", default=None, choices=[s for s in ORDER if s not in IDLE],
                   help="with --from-json: also print an RST table of this scenario's steps, one column "
                        "per run: server CPU us/delivery and p99 latency at each rate")
    p.add_argument("--no-compare", action="store_true",
                   help="do not print the per-rate comparison of the runs of each scenario (printed when "
                        "a scenario has more than one run: CPU per delivery and its ratio to the first run, "
                        "latency, bytes on the wire per delivery)")
    a = p.parse_args(argv)
    scen = a.scenario or ["all"]
    a.scenarios = ORDER[:] if "all" in scen else [s for s in ORDER if s in scen]
    if a.duration is None:
        a.duration = 1.0 if a.quick else 10.0
    if a.probe is None:
        a.probe = 1.0 if a.quick else 4.0
    if a.clients < 1:
        p.error("--clients must be >= 1")
    if a.interleave and not a.rates:
        p.error("--interleave needs --rates")
    if a.repeat < 1:
        p.error("--repeat must be >= 1")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        runs = []
        for path in args.from_json:
            these = [json.loads(line) for line in open(path) if line.strip()]
            if not these:
                raise SystemExit("no runs in " + path)
            rid = args.run_id or these[-1]["run_id"]
            these = [r for r in these if r["run_id"] == rid and not (args.no_baseline and r["label"] == "baseline")]
            print(f"{path}: run {rid}, {len(these)} runs, build {these[0]['git']}, {these[0]['date']}")
            runs += these
        print_table(runs)
        if args.rst:
            print()
            print(rst_table(runs))
        if not args.no_compare:
            print_compare(runs, args.rst)
        if args.steps_table:
            print()
            print(steps_rst(runs, args.steps_table))
        if args.plot:
            plot(runs, args.plot)
        return 0

    build()
    ncpu = os.cpu_count() or 1
    pin = not args.no_pin and ncpu >= 2
    server_cpus = {args.server_cpu} if pin else None
    load_cpus = {args.load_cpu} if pin else None
    if pin:
        os.sched_setaffinity(0, load_cpus)
    run_id = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    logdir = RESULTS / run_id
    logdir.mkdir(parents=True, exist_ok=True)
    children = Children()
    env = Env(args, children, server_cpus, load_cpus, logdir)
    machine, tree_git = machine_info(), git_info()
    servers: list[Server] = []
    for rev in args.rev or [None]:
        if rev is None or rev == "tree":
            pythonpath, git = None, tree_git
            label = args.label if rev is None else f"{args.label}@tree"
        else:
            commit, dest = snapshot(rev)
            pythonpath = str(dest)
            git = {"commit": commit, "dirty": False, "snapshot": str(dest)}
            label = f"{args.label}@{commit}" if args.label == "sockdrawer" or len(args.rev) > 1 else args.label
        cmd = (PROBE_PREFIX if args.server_probe else "") + args.server_cmd
        if args.workers > 1:
            cmd += f" --workers {args.workers}"
        servers.append(Server(label, cmd, pythonpath, git))
        if args.compression:
            servers.append(Server(label + DEFLATE_SUFFIX, f"{cmd} {args.compression_args}", pythonpath,
                                  git, deflate=True))
    if not args.no_baseline:
        servers.append(Server("baseline", args.baseline_cmd, None, tree_git))
    if args.floor:
        servers.append(Server("floor", FLOOR_CMD, None, tree_git))
    if args.peer:
        install_peers()
    for peer in args.peer:
        servers.append(Server(peer, PEERS[peer], None, tree_git))
    git = servers[0].git or tree_git
    builds = ", ".join(dict.fromkeys(
        f"{sv.git['commit']}{' (sockdrawer/ modified)' if sv.git.get('dirty') else ''}"
        for sv in servers if sv.git and sv.label not in OTHERS))
    print(f"sockdrawer benchmark {run_id}: build {builds or git['commit']}, "
          f"{machine['cpu_model']} x{machine['nproc']}, kernel {machine['kernel']}; logs in {logdir}")
    busy = machine_busy()
    if busy > 0.15:
        print(f"warning: {busy * 100:.0f}% of a core busy before starting: is something else running? "
              "Results would be meaningless.", file=sys.stderr)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    runs: list[dict[str, Any]] = []
    status = 0

    def record(name: str, sc: Scenario, server: Server, res: dict[str, Any] | None, error: str | None,
               elapsed: float) -> None:
        """One run (a scenario on a server): kept, printed, appended to the JSON files."""
        if res is None:
            res = {"connect": None, "steps": [], "summary": {}}
        run = {
            "kind": "sockdrawer-bench",
            "format": 1,
            "run_id": run_id,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "label": server.label,
            "server_cmd": server.cmd,
            "pythonpath": server.pythonpath,
            "scenario": name,
            "params": {"sockets": sc.sockets, "channels": sc.channels, "size": sc.size,
                       "payload": sc.payload, "v1": sc.v1, "deflate": server.deflate,
                       "start_rate": sc.start_rate, "clients": args.clients, "quick": args.quick,
                       "interleave": bool(args.interleave and sc.start_rate), "repeat": args.repeat,
                       "probe_s": args.probe, "confirm_s": args.duration,
                       "client_poll_us": args.client_poll_us, "concurrency": args.concurrency,
                       "pinned": {"server": sorted(server_cpus or []), "load": sorted(load_cpus or [])}},
            "git": server.git or tree_git,
            "machine": machine,
            "elapsed_s": round(elapsed, 1),
            "error": error,
            **res,
        }
        runs.append(run)
        line = json.dumps(run, separators=(",", ":"))
        brief = {k: v for k, v in run.items() if k not in ("steps", "machine")}
        if brief["summary"].get("held"):
            brief["summary"] = {k: v for k, v in brief["summary"].items() if k != "held"}
        print(json.dumps(brief, separators=(",", ":")), flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(line + "\n")
        with open(logdir / "results.jsonl", "a") as f:
            f.write(line + "\n")

    try:
        for name in args.scenarios:
            base = SCENARIOS[name]
            sc = Scenario(**{**base.__dict__, **(QUICK[name] if args.quick else {})})
            if args.sockets:
                sc.sockets = args.sockets
                if name == "channels":
                    sc.channels = args.sockets
            these = [sv for sv in servers if not ((sc.v1 or sc.sse) and sv.label in OTHERS)]
            if args.interleave and sc.start_rate:
                t0 = time.monotonic()
                for server, (res, error) in zip(these, run_interleaved(env, these, sc), strict=True):
                    status = status or (1 if error else 0)
                    record(name, sc, server, res, error, time.monotonic() - t0)
            else:
                for server in these:
                    t0 = time.monotonic()
                    try:
                        res, error = run_one(env, server, sc), None
                    except BenchError as e:
                        print(f"  ERROR: {e}", file=sys.stderr)
                        res, error, status = None, str(e), 1
                    record(name, sc, server, res, error, time.monotonic() - t0)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping child processes", file=sys.stderr)
        status = 130
    finally:
        children.stop_all()
    ok_runs = [r for r in runs if not r["error"]]
    if ok_runs:
        print_table(ok_runs)
        if args.rst:
            print()
            print(rst_table(ok_runs))
        if not args.no_compare:
            print_compare(ok_runs, args.rst)
        if args.plot:
            plot(ok_runs, args.plot)
    print(f"\nresults: {logdir / 'results.jsonl'}" + (f" and {args.json_out}" if args.json_out else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
