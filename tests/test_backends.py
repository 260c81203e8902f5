"""
The docs' Flask and Django examples (docs/examples/flask_app.py, django_app.py) run as they are, each in
its own process, behind a real node with --connect-proxy: a user who logged in to the app gets in with the
app's session cookie and nothing else, a stranger does not, and the app's logout closes the user's socket
through the control API.
"""

from __future__ import annotations

import http.cookiejar
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from childnode import ROOT, ChildNode
from conftest import free_port
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

EXAMPLES = Path(ROOT) / "docs" / "examples"


def app_command(kind: str, port: int) -> list[str]:
    if kind == "flask":
        return [sys.executable, "-m", "flask", "--app", "flask_app", "run", "--port", str(port)]
    return [sys.executable, "django_app.py", str(port)]


@pytest.fixture(params=["flask", "django"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ChildNode, int]]:
    """A node asking the example app (Flask or Django) about each handshake, and the app's port."""
    port = free_port()
    node = ChildNode(tmp_path, ["--connect-proxy", f"http://127.0.0.1:{port}/sockdrawer/connect"]).start()
    env = {**os.environ, "SOCKDRAWER_URL": f"http://127.0.0.1:{node.api_port}"}
    app = subprocess.Popen(app_command(request.param, port), cwd=EXAMPLES, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert app.poll() is None, app.stderr.read().decode() if app.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the example app did not start"
                time.sleep(0.05)
        yield node, port
    finally:
        app.terminate()
        app.wait(10)
        node.stop()


def test_the_apps_session_lets_its_user_in_and_its_logout_closes_the_socket(
        backend: tuple[ChildNode, int]) -> None:
    """Log in to the app (its session cookie), open a socket on the user's channel with that cookie: it
    gets the channel's messages; without the cookie the node answers 401 (the app said so); the app's
    logout closes the socket with 4000 "logged out"."""
    node, port = backend
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"http://127.0.0.1:{port}/login", data=urllib.parse.urlencode({"user": "alice"}).encode(),
                timeout=10).read()
    cookie = "; ".join(f"{c.name}={c.value}" for c in jar)
    assert cookie
    with pytest.raises(InvalidStatus) as refused:
        connect(node.url("/user/alice"), open_timeout=10).close()
    assert refused.value.response.status_code == 401
    with connect(node.url("/user/alice"), additional_headers={"Cookie": cookie}, open_timeout=10) as ws:
        node.publish("user/alice", "for alice")
        assert ws.recv(timeout=10) == "for alice"
        opener.open(f"http://127.0.0.1:{port}/logout", data=b"", timeout=10).read()
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None and (closed.value.rcvd.code, closed.value.rcvd.reason) == (4000,
                                                                                                "logged out")
