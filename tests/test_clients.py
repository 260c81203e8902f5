"""
Real clients, with their default settings, against a ``twistd sockdrawer``
child process: headless Chromium (a test page and the example chat page),
Node ``ws``, Python ``websockets`` (library and CLI), aiohttp and Autobahn's
own client.

Each one must connect, receive a message published through the HTTP API and
one published through Redis, get a listener's reply to a frame it sends, and
see close code 1012 when the node is stopped with SIGTERM (see
:func:`exercise`).  Chromium, Node ``ws`` and ``websockets`` offer
permessage-deflate by default (docs/clients.rst); their tests also check what
was negotiated, with and without ``--compression``.

Nothing is skipped: a missing browser, driver or Node fails the run and says
how to install it.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import websockets.sync.client
from childnode import ROOT, ChildNode
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from websockets.exceptions import ConnectionClosed

#: seconds to wait for any one event
WAIT = 10.0
TESTS = os.path.join(ROOT, "tests")
EXAMPLES = os.path.join(ROOT, "examples")
CLIENTS = os.path.join(TESTS, "clients")
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
)
WS_VERSION = "8.23.0"
DEFLATE = "permessage-deflate"
#: a text message that compresses well, on one line (for the websockets CLI)
LARGE = " ".join(f"message {i} of a long series, é ✓" for i in range(300))
SYSTEM_HINT = "install it with 'apt-get install chromium chromium-driver nodejs npm'"
NODE_HINT = "install the Node test clients with 'npm ci --prefix tests/clients'"


# -- the scenario every client goes through


class Client(Protocol):
    """A WebSocket client under test, reporting what happened as event dicts."""

    def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        """The next of ``{"event": "open" | "message" | "close" | "error", ...}``, waiting up to ``timeout``."""
        ...

    def send(self, text: str) -> None:
        """Send one text frame."""
        ...


def next_message(client: Client) -> str:
    event = client.next_event()
    assert event["event"] == "message", event
    data: str = event["data"]
    return data


def exercise(client: Client, node: ChildNode, redis_server: Any) -> dict[str, Any]:
    """
    Walk ``client``, connected to ``/echo`` on ``node`` (started with Redis and
    ``listeners:Echo``), through the four steps; return its ``open`` event.
    """
    opened = client.next_event()
    assert opened["event"] == "open", opened
    node.wait_sockets(1)
    # (2) a message published through the HTTP API, then one through Redis
    assert node.publish("echo", "published through the API")["channel"] == "echo"
    assert next_message(client) == "published through the API"
    assert redis_server.publish("sock-drawer/echo", "published through Redis") >= 1
    assert next_message(client) == "published through Redis"
    # (3) a frame to the Echo listener, whose return value comes back
    client.send("sent by the client, é ✓")
    assert next_message(client) == "sent by the client, é ✓"
    # messages over --compression-threshold (64 bytes), which are deflated
    # when the socket negotiated permessage-deflate, in both directions
    assert node.publish("echo", LARGE)["channel"] == "echo"
    assert next_message(client) == LARGE
    client.send(LARGE[::-1])
    assert next_message(client) == LARGE[::-1]
    # (4) SIGTERM: close code 1012, then a clean shutdown
    node.send_signal(signal.SIGTERM)
    closed = client.next_event()
    assert closed["event"] == "close", closed
    assert closed["code"] == 1012, closed
    assert_shut_down(node)
    return opened


def assert_shut_down(node: ChildNode) -> None:
    """The node, sent SIGTERM, shut down cleanly."""
    # twistd ends a clean shutdown by re-raising the signal that started it
    # (twisted.application.app._exitWithSignal): status -15, 143 to a shell
    assert node.wait() == -signal.SIGTERM, node.log_text()
    assert "Server Shut Down." in node.log_text()
    node.assert_no_traceback()


# -- fixtures: nodes, a web server, Chromium


NodeStarter = Callable[..., ChildNode]


@pytest.fixture
def start_node(tmp_path: Path, redis_server: Any) -> Iterator[NodeStarter]:
    """``start_node(*args, redis=True, env=None)``: a started child node, stopped at teardown."""
    nodes: list[ChildNode] = []

    def start(*args: str, redis: bool = True, env: dict[str, str] | None = None) -> ChildNode:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        argv = [*(("--redis", redis_server.url) if redis else ()), *args]
        node = ChildNode(workdir, argv, env=env)
        nodes.append(node)
        return node.start()

    try:
        yield start
    finally:
        for node in nodes:
            node.stop()


def echo_node_args(compression: bool) -> list[str]:
    return ["--listener", "listeners:Echo", *(["--compression"] if compression else [])]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[str | os.PathLike[str]], str]]:
    """``serve(directory)``: serve ``directory`` over HTTP on 127.0.0.1; returns the base URL."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: str | os.PathLike[str]) -> str:
        handler = functools.partial(_QuietHandler, directory=os.fspath(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{server.server_address[1]}"

    try:
        yield start
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def chromium(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[webdriver.Chrome]:
    """Headless Chromium through the system chromedriver, with a fresh profile; quit at teardown."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} is missing: {SYSTEM_HINT}", pytrace=False)
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never download a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    # the DevTools network events show the handshake request the browser sent
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


# -- the clients


class BrowserClient:
    """A ``new WebSocket(url)`` in the page open in ``driver``; events collect in ``window.events``."""

    _CONNECT = """
        window.events = [];
        var ws = window.ws = new WebSocket(arguments[0]);
        ws.onopen = function () {
            events.push({event: "open", extensions: ws.extensions, protocol: ws.protocol});
        };
        ws.onmessage = function (e) { events.push({event: "message", data: e.data}); };
        ws.onerror = function () { events.push({event: "error"}); };
        ws.onclose = function (e) {
            events.push({event: "close", code: e.code, reason: e.reason, clean: e.wasClean});
        };
    """

    def __init__(self, driver: webdriver.Chrome, url: str) -> None:
        self.driver = driver
        self.seen = 0
        driver.execute_script(self._CONNECT, url)

    def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        index = self.seen
        try:
            event: dict[str, Any] = WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(
                lambda d: d.execute_script("return window.events[arguments[0]] || null;", index)
            )
        except TimeoutException:
            events = self.driver.execute_script("return window.events;")
            raise AssertionError(f"no event {index} in the browser within {timeout} s; events: {events}") from None
        self.seen += 1
        return event

    def send(self, text: str) -> None:
        self.driver.execute_script("window.ws.send(arguments[0]);", text)


def handshake_requests(driver: webdriver.Chrome) -> list[dict[str, str]]:
    """The headers of the WebSocket handshake requests Chromium sent, from its performance log."""
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.webSocketWillSendHandshakeRequest":
            headers = message["params"]["request"]["headers"]
            requests.append({name.lower(): value for name, value in headers.items()})
    return requests


class ProcessClient:
    """
    A client in a child process that reports events as JSON lines on stdout
    and sends each JSON string line of its stdin (tests/clients/).
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, cwd=CLIENTS, env={**os.environ, **(env or {})}, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8")
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.pumps = [threading.Thread(target=self._pump, args=args, daemon=True)
                      for args in ((self.proc.stdout, self.lines.put), (self.proc.stderr, self.stderr.append))]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream: Any, put: Callable[[str | None], None]) -> None:
        for line in stream:
            put(line)
        put(None)

    def next_line(self, timeout: float = WAIT) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.argv} said nothing in {timeout} s; stderr: {''.join(self.stderr)}") from None
        if line is None:
            self.lines.put(None)  # stays at end of file
            self.proc.wait(WAIT)
            raise AssertionError(f"{self.argv} exited with {self.proc.returncode}; stderr: {''.join(self.stderr)}")
        return line.rstrip("\n")

    def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(self.next_line(timeout))
        return event

    def send(self, text: str) -> None:
        self.send_line(json.dumps(text))

    def send_line(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        for pump in self.pumps:
            pump.join(WAIT)  # to the end of the output, before the pipes close under it
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


_TERMINAL = re.compile(r"\x1b(?:\[[0-9;]*[A-Za-z]|[78])|\r")


class WebsocketsCli(ProcessClient):
    """``python -m websockets URL``, the interactive client, read as a user reads it."""

    def __init__(self, url: str) -> None:
        super().__init__([sys.executable, "-m", "websockets", url])

    def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        while True:
            # drop the terminal control sequences and the "> " input prompts
            line = _TERMINAL.sub("", self.next_line(timeout))
            while line.startswith("> "):
                line = line[2:]
            if line.startswith("Connected to "):
                return {"event": "open", "line": line}
            if line.startswith("< "):
                return {"event": "message", "data": line[2:]}
            if line.startswith("Connection closed: "):
                # "Connection closed: 1012 (service restart) service restart."
                found = re.search(r"\b(\d{4}) \(", line)
                return {"event": "close", "code": int(found.group(1)) if found else None, "line": line}
            if line.strip():
                return {"event": "error", "line": line}

    def send(self, text: str) -> None:
        self.send_line(text)


class WebsocketsClient:
    """A connection made by ``websockets.sync.client.connect(url)`` with its defaults."""

    def __init__(self, ws: websockets.sync.client.ClientConnection) -> None:
        self.ws = ws
        assert self.ws.request is not None and self.ws.response is not None
        self.pending: list[dict[str, Any]] = [{
            "event": "open",
            "extensions": ",".join(e.name for e in self.ws.protocol.extensions),
            "header": self.ws.response.headers.get("Sec-WebSocket-Extensions", ""),
            "offered": self.ws.request.headers.get("Sec-WebSocket-Extensions", ""),
        }]

    def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop(0)
        try:
            data = self.ws.recv(timeout=timeout)
        except TimeoutError:
            raise AssertionError(f"websockets received nothing in {timeout} s") from None
        except ConnectionClosed as e:
            return {"event": "close", "code": e.rcvd.code if e.rcvd else None, "reason": e.rcvd and e.rcvd.reason}
        return {"event": "message", "data": data}

    def send(self, text: str) -> None:
        self.ws.send(text)


class AiohttpClient:
    """``aiohttp.ClientSession().ws_connect(url)`` with its defaults, on an event loop in a thread."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.session: aiohttp.ClientSession | None = None
        try:
            self.ws = self._run(self._connect(url))
        except BaseException:
            self._stop_loop()
            raise
        self.pending: list[dict[str, Any]] = [{
            "event": "open", "extensions": DEFLATE if self.ws.compress else "", "protocol": self.ws.protocol,
        }]

    def _run(self, coro: Any, timeout: float = WAIT) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self, url: str) -> aiohttp.ClientWebSocketResponse:
        self.session = aiohttp.ClientSession()
        return await self.session.ws_connect(url)

    def next_event(self, timeout: float = WAIT) -> dict[str, Any]:
        if self.pending:
            return self.pending.pop(0)
        try:
            msg = self._run(self.ws.receive(timeout), timeout + 1)
        except TimeoutError:
            raise AssertionError(f"aiohttp received nothing in {timeout} s") from None
        if msg.type == aiohttp.WSMsgType.TEXT:
            return {"event": "message", "data": msg.data}
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return {"event": "close", "code": msg.data, "reason": msg.extra}
        if msg.type == aiohttp.WSMsgType.CLOSED:
            return {"event": "close", "code": self.ws.close_code}
        return {"event": "error", "type": str(msg.type), "data": repr(msg.data)}

    def send(self, text: str) -> None:
        self._run(self.ws.send_str(text))

    def close(self) -> None:
        async def close() -> None:
            await self.ws.close()
            if self.session is not None:
                await self.session.close()

        try:
            self._run(close())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        if self.session is not None and not self.session.closed:
            self._run(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


def node_ws_client(url: str) -> ProcessClient:
    """tests/clients/ws_client.mjs: ``new WebSocket(url)`` from the npm package ``ws``, with its defaults."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node is not on the PATH: {SYSTEM_HINT}", pytrace=False)
    package = os.path.join(CLIENTS, "node_modules", "ws", "package.json")
    if not os.path.exists(package):
        pytest.fail(f"{package} is missing: {NODE_HINT}", pytrace=False)
    with open(package) as f:
        version = json.load(f)["version"]
    if version != WS_VERSION:
        pytest.fail(f"tests/clients has ws {version}, the lock file pins {WS_VERSION}: {NODE_HINT}", pytrace=False)
    return ProcessClient([node, "ws_client.mjs", url])


# -- the tests


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compression"])
def test_chromium(chromium: webdriver.Chrome, start_node: NodeStarter, redis_server: Any, serve: Any,
                  tmp_path: Path, compression: bool) -> None:
    """Headless Chromium on an http:// page connects, receives API and Redis messages, gets the listener's reply
    and sees 1012 (service restart) at SIGTERM; permessage-deflate is negotiated exactly when the node runs with
    --compression."""
    node = start_node(*echo_node_args(compression))
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "blank.html").write_text("<!DOCTYPE html><title>sockdrawer client test</title>\n")
    base = serve(tmp_path / "www")
    chromium.get(base + "/blank.html")
    opened = exercise(BrowserClient(chromium, node.url("/echo")), node, redis_server)
    (request,) = handshake_requests(chromium)
    assert DEFLATE in request["sec-websocket-extensions"], request  # the browser's default offer
    assert request["origin"] == base, request  # a real Origin, as from any web page
    if compression:
        assert DEFLATE in opened["extensions"], opened
    else:
        assert opened["extensions"] == "", opened


def test_chat_page_in_two_tabs(chromium: webdriver.Chrome, start_node: NodeStarter, serve: Any) -> None:
    """In examples/index.html open in two Chromium tabs, a line typed in either tab appears in both, and both
    show close code 1012 when the node stops."""
    node = start_node("--listener", "chat_listener:Chat", redis=False,
                      env={"PYTHONPATH": os.pathsep.join([TESTS, EXAMPLES])})
    page = serve(EXAMPLES) + f"/index.html?port={node.ws_port}"
    chromium.get(page)
    tabs = [chromium.current_window_handle]
    chromium.switch_to.new_window("tab")
    chromium.get(page)
    tabs.append(chromium.current_window_handle)

    def log_of(tab: str) -> list[tuple[str, str]]:
        chromium.switch_to.window(tab)
        items = chromium.execute_script(
            "return Array.from(document.querySelectorAll('#log li'), li => [li.className, li.textContent]);")
        return [tuple(item) for item in items]

    def wait_for_line(tab: str, expected: tuple[str, str]) -> None:
        try:
            WebDriverWait(chromium, WAIT, poll_frequency=0.02).until(lambda d: expected in log_of(tab))
        except TimeoutException:
            raise AssertionError(f"{expected} not in the log of tab {tabs.index(tab)}: {log_of(tab)}") from None

    connected = ("status", f"connected to {node.url('/chat')}")
    for tab in tabs:
        wait_for_line(tab, connected)
    node.wait_sockets(2)
    for i, tab in enumerate(tabs):
        line = f"hello from tab {i}"
        chromium.switch_to.window(tab)
        chromium.find_element(By.ID, "message").send_keys(line, Keys.ENTER)
        # the page sent the line and emptied the box
        WebDriverWait(chromium, WAIT, poll_frequency=0.02).until(
            lambda d: d.find_element(By.ID, "message").get_attribute("value") == "")
        for other in tabs:
            wait_for_line(other, ("", line))
    node.send_signal(signal.SIGTERM)
    for tab in tabs:
        wait_for_line(tab, ("status", "disconnected (close code 1012)"))
    assert_shut_down(node)


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compression"])
def test_node_ws(start_node: NodeStarter, redis_server: Any, compression: bool) -> None:
    """Node's ws 8.23.0 with its defaults goes through every step; it offers permessage-deflate, which is
    negotiated exactly when the node runs with --compression."""
    node = start_node(*echo_node_args(compression))
    client = node_ws_client(node.url("/echo"))
    try:
        opened = exercise(client, node, redis_server)
    finally:
        client.close()
    assert DEFLATE in opened["offered"], opened
    assert opened["extensions"] == (DEFLATE if compression else ""), opened


@pytest.mark.parametrize("compression", [False, True], ids=["plain", "compression"])
def test_websockets_client(start_node: NodeStarter, redis_server: Any, compression: bool) -> None:
    """Python websockets' client with its defaults goes through every step; it offers permessage-deflate, which
    is negotiated exactly when the node runs with --compression."""
    node = start_node(*echo_node_args(compression))
    with websockets.sync.client.connect(node.url("/echo")) as ws:  # open_timeout: 10 s by default
        opened = exercise(WebsocketsClient(ws), node, redis_server)
    assert DEFLATE in opened["offered"], opened
    assert opened["extensions"] == (DEFLATE if compression else ""), opened


def test_websockets_cli(start_node: NodeStarter, redis_server: Any) -> None:
    """``python -m websockets ws://.../echo``, as the docs run it, shows published messages as "< ..." lines,
    echoes a typed line and reports close code 1012 at SIGTERM."""
    node = start_node(*echo_node_args(False))
    client = WebsocketsCli(node.url("/echo"))
    try:
        opened = exercise(client, node, redis_server)
        assert opened["line"] == f"Connected to {node.url('/echo')}.", opened
    finally:
        client.close()


def test_aiohttp(start_node: NodeStarter, redis_server: Any) -> None:
    """aiohttp's ClientSession.ws_connect with its defaults (no compression offer) goes through every step."""
    node = start_node(*echo_node_args(False))
    client = AiohttpClient(node.url("/echo"))
    try:
        opened = exercise(client, node, redis_server)
    finally:
        client.close()
    assert opened["extensions"] == "", opened


def test_autobahn_client(start_node: NodeStarter, redis_server: Any) -> None:
    """Autobahn's own asyncio client with its defaults (no compression offer) goes through every step."""
    node = start_node(*echo_node_args(False))
    client = ProcessClient([sys.executable, "autobahn_client.py", node.url("/echo")])
    try:
        opened = exercise(client, node, redis_server)
    finally:
        client.close()
    assert opened["extensions"] == "" and opened["header"] == "", opened
