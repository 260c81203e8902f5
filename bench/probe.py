"""
Run a server command (``twistd ...``) in this process with two probes, for
finding where latency spikes come from:

* the garbage collector: every pass, its generation and how long it took
  (``gc.callbacks``);
* the reactor: a ``LoopingCall`` every 5 ms measuring how late it runs; a
  turn later than ``--stall-ms`` is a stall.

Once a second (when anything happened) one JSON line goes to stderr (the
server log of ``bench/run.py``), e.g.::

    python bench/run.py --scenario channels --no-baseline --rates 5000,10000 --label probed \
        --server-cmd "{python} {bench}/probe.py -- twistd -n --pidfile= sockdrawer \
            --port tcp:{port}:interface=127.0.0.1 --api none \
            --redis redis://127.0.0.1:{redis_port}/0 --max-connections 20000 --auto-ping-interval 0"

``--cprofile FILE`` also writes a cProfile of the whole run at exit.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stall-ms", type=float, default=20.0, help="a reactor turn later than this is a stall")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="how often the lateness probe runs")
    parser.add_argument("--cprofile", help="write a cProfile of the run to this file")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, help="-- twistd ...")
    args = parser.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd or cmd[0] != "twistd":
        parser.error("the command must be twistd ...")

    stats: dict[str, Any] = {"gc": [0, 0, 0], "gc_ms": [0.0, 0.0, 0.0], "gc_max_ms": [0.0, 0.0, 0.0],
                             "stalls": 0, "late_max_ms": 0.0, "turns": 0}
    started: list[float] = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        gen = info["generation"]
        ms = (time.perf_counter() - started[0]) * 1e3
        stats["gc"][gen] += 1
        stats["gc_ms"][gen] += ms
        stats["gc_max_ms"][gen] = max(stats["gc_max_ms"][gen], ms)
        if gen == 2:
            stats.setdefault("gen2", []).append([round(ms, 1), info.get("collected", 0)])

    gc.callbacks.append(on_gc)

    from twisted.internet import reactor, task

    interval = args.interval_ms / 1e3
    last = [0.0]  # 0: the first tick, which only starts the clock (startup is not a stall)
    report_at = [time.monotonic() + 1.0]

    def tick() -> None:
        now = time.monotonic()
        late = (now - last[0] - interval) * 1e3 if last[0] else 0.0
        last[0] = now
        stats["turns"] += 1
        if late > stats["late_max_ms"]:
            stats["late_max_ms"] = late
        if late > args.stall_ms:
            stats["stalls"] += 1
            stats.setdefault("stall_ms", []).append(round(late, 1))
        if now >= report_at[0]:
            report_at[0] = now + 1.0
            line = dict(stats, t=round(time.time(), 2), counts=gc.get_count())  # (get_freeze_count walks a list)
            print("probe " + json.dumps(line), file=sys.stderr, flush=True)
            for k in ("gc", "gc_ms", "gc_max_ms"):
                stats[k] = [0 if k == "gc" else 0.0] * 3
            stats["stalls"], stats["late_max_ms"], stats["turns"] = 0, 0.0, 0
            stats.pop("gen2", None)
            stats.pop("stall_ms", None)

    reactor.callWhenRunning(lambda: task.LoopingCall(tick).start(interval, now=False))

    sys.argv = cmd
    from twisted.scripts.twistd import run

    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()

        def dump() -> None:
            prof.disable()
            prof.dump_stats(args.cprofile)

        reactor.addSystemEventTrigger("before", "shutdown", dump)
        prof.enable()
        run()
    else:
        run()


if __name__ == "__main__":
    main()
