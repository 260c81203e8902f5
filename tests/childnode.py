"""
A real ``twistd sockdrawer`` child process for tests that drive it with
blocking clients (browsers, Node, conformance suites, subprocesses).

The node listens on ``tcp:0`` ports; their numbers are read from the
"listening on ..." log lines, so no port is ever guessed.  Everything here is
synchronous: use it from plain (non-Twisted) pytest tests.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
_WS = re.compile(r"listening on (wss?)://[^:]+:(\d+)/<channel>")
_API = re.compile(r"listening on http://[^:]+:(\d+)")


class ChildNode:
    """
    ``twistd -n sockdrawer <args>`` in ``workdir``, with ``tests/`` on the
    Python path so that ``--listener listeners:Echo`` works.

    :ivar ws_port: the WebSocket port, once started.
    :ivar api_port: the HTTP API port (``None`` with ``--api none``).
    """

    def __init__(self, workdir: str | os.PathLike[str], args: Sequence[str] = (),
                 env: dict[str, str] | None = None, api: bool = True) -> None:
        self.workdir = os.fspath(workdir)
        self.args = list(args)
        self.api = api
        self.env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests"), **(env or {})}
        self.log_path = os.path.join(self.workdir, "sockdrawer.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws_port = 0
        self.api_port: int | None = None

    # -- lifecycle

    def start(self, timeout: float = 30.0) -> ChildNode:
        """Start the process and wait until it listens (and, with Redis, has subscribed)."""
        argv = [*TWISTD, "-n", "--pidfile=", "sockdrawer", "--port", "tcp:0:interface=127.0.0.1"]
        if self.api:
            argv += ["--api", "tcp:0:interface=127.0.0.1"]
        argv += self.args
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir, env=self.env)
        wants_redis = "--redis" in self.args or "-r" in self.args
        deadline = time.monotonic() + timeout
        while True:
            text = self.log_text()
            ws = _WS.search(text)
            api = _API.search(text)
            ready = ws is not None and (api is not None or not self.api)
            if wants_redis and "subscribed to" not in text:
                ready = False
            if ready:
                assert ws is not None
                self.ws_port = int(ws.group(2))
                self.api_port = int(api.group(1)) if api else None
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"sockdrawer exited with {self.proc.returncode}:\n{text}")
            if time.monotonic() > deadline:
                raise AssertionError(f"sockdrawer did not start in {timeout} s:\n{text}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the process to exit; return its exit status."""
        if self.proc is None:
            return 0
        self.send_signal(sig)
        return self.wait(timeout)

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig`` without waiting (to watch clients while the node shuts down); then :meth:`wait`."""
        assert self.proc is not None, "not started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit (killing it after ``timeout`` seconds); return its exit status."""
        assert self.proc is not None, "not started"
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"sockdrawer did not exit within {timeout} s") from None
        finally:
            self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ChildNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers

    def url(self, path: str = "/") -> str:
        """The ``ws://`` URL of ``path`` on this node."""
        return f"ws://127.0.0.1:{self.ws_port}{path}"

    def publish(self, channel: str, message: str | bytes) -> dict[str, Any]:
        """Publish through the node's HTTP API; return its JSON answer."""
        assert self.api_port is not None, "started with api=False"
        body = message.encode("utf-8") if isinstance(message, str) else message
        request = urllib.request.Request(f"http://127.0.0.1:{self.api_port}/publish/{channel}",
                                         data=body, method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    def sockets(self) -> int:
        """Open sockets, as ``GET /health`` reports them."""
        assert self.api_port is not None, "started with api=False"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/health", timeout=10) as r:
                return int(json.loads(r.read())["sockets"])
        except urllib.error.HTTPError as e:  # 503 while the broker is down still has the counts
            return int(json.loads(e.read())["sockets"])

    def wait_sockets(self, count: int, timeout: float = 10.0) -> None:
        """Wait until exactly ``count`` sockets are open (``GET /health``)."""
        deadline = time.monotonic() + timeout
        while self.sockets() != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"expected {count} open sockets, have {self.sockets()}")
            time.sleep(0.02)

    def log_text(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def assert_no_traceback(self) -> None:
        text = self.log_text()
        assert "Traceback" not in text, text
        assert "Unhandled" not in text, text
