"""The installed package: plugin discovery, import weight, the twistd child process, the docs example."""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
from typing import Any

import pytest_twisted
from conftest import ROOT, RedisServer, free_port, wait_for
from twisted.internet.threads import deferToThread
from wsclient import connect

from sockdrawer import Client

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def test_plugin_found_through_getplugins(tmp_path: Any) -> None:
    """The installed twistd plugin is found by getPlugins(IServiceMaker), from outside the checkout, and points
    at sockdrawer.node.tap."""
    code = (
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "import sockdrawer.node.tap\n"
        "makers = {p.tapname: p for p in getPlugins(IServiceMaker)}\n"
        "maker = makers['sockdrawer']\n"
        "assert maker.module == 'sockdrawer.node.tap', maker.module\n"
        "assert maker.options is sockdrawer.node.tap.Options\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_client_import_does_not_import_twisted() -> None:
    """Importing sockdrawer and sockdrawer.client loads neither Twisted nor Autobahn."""
    code = (
        "import sys, sockdrawer, sockdrawer.client\n"
        "from sockdrawer import Client, Subscriber, on\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('twisted', 'autobahn', 'txredisapi', 'txaio')]\n"
        "print(heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_plugin_help_does_not_import_autobahn() -> None:
    """`twistd --help` lists sockdrawer without importing sockdrawer.node.tap's heavy parts."""
    code = (
        "import sys\n"
        "from twisted.application.service import IServiceMaker\n"
        "from twisted.plugin import getPlugins\n"
        "names = [p.tapname for p in getPlugins(IServiceMaker)]\n"
        "assert 'sockdrawer' in names, names\n"
        "sys.exit(1 if 'autobahn' in sys.modules else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_twistd_child_process_end_to_end(redis_server: RedisServer, tmp_path: Any) -> None:
    """`twistd -n sockdrawer --redis ...` as a child process delivers Client messages, then stops on SIGTERM."""
    ws_port, api_port = free_port(), free_port()
    log = open(tmp_path / "twistd.log", "w+")
    proc = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "sockdrawer", "--port", f"tcp:{ws_port}:interface=127.0.0.1",
         "--api", f"tcp:{api_port}:interface=127.0.0.1", "--redis", redis_server.url,
         "--listener", "listeners:Echo"],
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.path.join(ROOT, "tests")},
    )
    try:
        def logged(text: str) -> bool:
            log.seek(0)
            content = log.read()
            assert proc.poll() is None, content
            return text in content

        await wait_for(lambda: logged("subscribed to sock-drawer/*"), timeout=30)
        client = await connect(ws_port, "/echo")
        assert await deferToThread(Client(redis_server.url).pub, "from redis", "echo") >= 1
        assert await client.next_text() == "from redis"
        client.send_text("ping")
        assert await client.next_text() == "ping"
        assert await deferToThread(Client(f"http://127.0.0.1:{api_port}").pub, "from api", "echo") >= 1
        assert await client.next_text() == "from api"
        proc.send_signal(signal.SIGTERM)
        code, reason = await client.wait_closed()
        assert code == 1012
        assert await deferToThread(proc.wait, 30) is not None
        log.seek(0)
        content = log.read()
        assert "from redis" not in content and "from api" not in content  # no bodies in logs
        assert "Traceback" not in content
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest_twisted.ensureDeferred
async def test_embedding_example_runs(services: list[Any]) -> None:
    """docs/examples/embedded.py builds a host service whose in-process publishes reach sockets on /clock."""
    module = runpy.run_path(os.path.join(ROOT, "docs", "examples", "embedded.py"), run_name="example")
    top = module["make_service"](port="tcp:0:interface=127.0.0.1")
    top.startService()
    try:
        svc = top.sockdrawer
        ports = await svc.when_listening()
        client = await connect(ports["websocket"].getHost().port, "/clock")
        tick = await client.next_text(timeout=5)
        time.strptime(tick, "%H:%M:%S")
    finally:
        await top.stopService()
