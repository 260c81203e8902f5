"""
Server-Sent Events on the WebSocket port: ``EventSource`` in headless Chromium
and aiohttp (their defaults) receive a channel's messages as events; the
request is admitted as a socket is (origin, token, caps) and answered with a
4xx otherwise; a stream counts as an open connection and ends at shutdown.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest_twisted
from childnode import ChildNode
from conftest import wait_for
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.support.ui import WebDriverWait
from test_clients import WAIT, chromium, serve, start_node  # noqa: F401  (fixtures)
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from sockdrawer.core.hub import MemoryChannelHub
from sockdrawer.transports.sse.events import message_event
from sockdrawer.transports.sse.stream import StreamRegistry, event_stream_request

PAGE = """<!doctype html><meta charset="utf-8"><title>sse</title>"""

_LISTEN = """
    window.events = [];
    var source = window.source = new EventSource(arguments[0]);
    source.onopen = function () { events.push({event: "open"}); };
    source.onmessage = function (e) { events.push({event: "message", data: e.data}); };
    source.addEventListener("binary", function (e) { events.push({event: "binary", data: e.data}); });
    source.onerror = function () { events.push({event: "error", state: source.readyState}); };
"""


def browser_events(driver: Any, count: int) -> list[dict[str, Any]]:
    try:
        events: list[dict[str, Any]] = WebDriverWait(driver, WAIT, poll_frequency=0.05).until(
            lambda d: (lambda e: e if len(e) >= count else None)(d.execute_script("return window.events;")))
    except TimeoutException:
        raise AssertionError(f"fewer than {count} events: {driver.execute_script('return window.events;')}") from None
    return events


def test_eventsource_in_chromium_receives_a_raw_stream(chromium: Any, start_node: Any, serve: Any,  # noqa: F811
                                                      tmp_path: Path) -> None:
    """``new EventSource("http://<node>:<ws port>/news")`` from a page of another origin opens (CORS) and gets
    each message on /news as an event: a one-line text, a multi-line one (its lines joined with \\n as the
    browser joins data: lines), non-ASCII UTF-8, and a binary payload as a ``binary`` event in base64; the
    stream outlives the WebSocket opening-handshake timeout."""
    node = start_node("--open-handshake-timeout", "0.5", redis=False)
    (tmp_path / "index.html").write_text(PAGE)
    chromium.get(serve(tmp_path) + "/index.html")
    chromium.execute_script(_LISTEN, f"http://127.0.0.1:{node.ws_port}/news")
    assert browser_events(chromium, 1)[0] == {"event": "open"}
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # past the 0.5 s handshake timeout: the stream is no handshake
        time.sleep(0.1)
    for message in ("one", "two\nlines\r\nthree", "é ✓"):
        node.publish("news", message)
    node.publish("news", b"\xff\x00binary")
    events = browser_events(chromium, 5)
    assert events[1:] == [
        {"event": "message", "data": "one"},
        {"event": "message", "data": "two\nlines\nthree"},
        {"event": "message", "data": "é ✓"},
        {"event": "binary", "data": base64.b64encode(b"\xff\x00binary").decode()},
    ]


def test_aiohttp_reads_a_stream_with_its_defaults(start_node: Any) -> None:  # noqa: F811
    """aiohttp's client (its defaults) gets 200 with text/event-stream, no caching, the retry hint, and the
    events of the channel; a stream counts as an open connection in /health while it lasts."""
    node = start_node(redis=False)

    async def read() -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{node.ws_port}/news",
                                   headers={"Accept": "text/event-stream"}) as response:
                await asyncio.get_running_loop().run_in_executor(None, node.wait_sockets, 1)
                await asyncio.get_running_loop().run_in_executor(None, node.publish, "news", "hello")
                body = b""
                while b"data: hello\n\n" not in body:
                    body += await asyncio.wait_for(response.content.readany(), WAIT)
                return response.status, dict(response.headers), body

    status, headers, body = asyncio.run(read())
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert headers["Cache-Control"] == "no-cache" and headers["X-Accel-Buffering"] == "no"
    assert body == b"retry: 2000\n\ndata: hello\n\n"
    node.wait_sockets(0)


def raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` and read what comes back until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


def stream_request(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest_twisted.ensureDeferred
async def test_stream_requests_are_admitted_as_sockets_are(run_service: Any, tmp_path: Path) -> None:
    """An origin outside the allow-list gets 403, a private channel without a token 401, a bad channel name
    400, each a complete response that closes the connection; an allowed origin gets CORS headers with
    credentials, and a token (query or Authorization) opens a private channel."""
    from sockdrawer import make_token

    key = tmp_path / "key"
    key.write_text("s" * 32)
    svc = await run_service(allowed_origins=("https://app.example.com:443",), auth_secret_file=(str(key),))
    port = svc.ws_port
    for request, status in (
        (stream_request("/news", "Origin: https://evil.example.com"), b"403"),
        (stream_request("/news"), b"401"),
        (stream_request("/a%00b"), b"400"),
    ):
        answer = await deferToThread(raw_request, port, request)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:60]
        assert b"Content-Length: " in answer and b"text/event-stream" not in answer
    token = make_token("s" * 32, channels=["news"])
    for request in (stream_request(f"/news?token={token}", "Origin: https://app.example.com"),
                    stream_request("/news", f"Authorization: Bearer {token}", "Origin: https://app.example.com")):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        try:
            s.sendall(request)
            head = b""
            while b"retry: 2000\n\n" not in head:
                chunk = await deferToThread(s.recv, 4096)
                assert chunk, head
                head += chunk
            assert head.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Access-Control-Allow-Origin: https://app.example.com\r\n" in head
            assert b"Access-Control-Allow-Credentials: true\r\n" in head
        finally:
            s.close()
    await wait_for(lambda: svc.factory.open_sockets == 0)
    assert svc.factory.refusals.get(403) == 1 and svc.factory.refusals.get(401) == 1


@pytest_twisted.ensureDeferred
async def test_streams_count_against_max_connections_and_end_at_shutdown(run_service: Any) -> None:
    """A stream is an open connection: at --max-connections the next stream gets 503; stopping the node ends
    the streams (the connection closes, so the client reconnects after its retry delay)."""
    svc = await run_service(max_connections=1)
    s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
    try:
        s.sendall(stream_request("/news"))
        await wait_for(lambda: svc.factory.open_sockets == 1)
        answer = await deferToThread(raw_request, svc.ws_port, stream_request("/news"))
        assert answer.startswith(b"HTTP/1.1 503")
        svc.publish("in", "news")
        await svc.stopService()

        def rest() -> bytes:
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    return data
                data += chunk

        received = await deferToThread(rest)
    finally:
        s.close()
    assert received.endswith(b"data: in\n\n")


def test_message_event_follows_the_sse_format() -> None:
    """Each line of a payload (CRLF, LF or CR ends one) is a data: line; an id comes first; a payload that is
    not UTF-8 is one data: line of base64 under the event type binary."""
    assert message_event(b"a") == b"data: a\n\n"
    assert message_event(b"a\r\nb\rc\nd") == b"data: a\ndata: b\ndata: c\ndata: d\n\n"
    assert message_event(b"", b"7") == b"id: 7\ndata: \n\n"
    assert message_event(b"\xff") == b"event: binary\ndata: /w==\n\n"


def test_only_a_get_for_an_event_stream_is_a_stream_request() -> None:
    """A GET accepting text/event-stream without Upgrade is a stream request; a WebSocket handshake, a plain
    GET or a POST is not."""
    sse = event_stream_request(b"GET /news?x=1 HTTP/1.1\r\nHost: h\r\nAccept: text/event-stream")
    assert sse is not None and sse.path == "/news" and sse.query("x") == ["1"]
    assert event_stream_request(b"GET /news HTTP/1.1\r\nAccept: text/event-stream\r\nUpgrade: websocket") is None
    assert event_stream_request(b"GET /news HTTP/1.1\r\nAccept: */*") is None
    assert event_stream_request(b"POST /news HTTP/1.1\r\nAccept: text/event-stream") is None


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_one_heartbeat_loop_for_all_streams() -> None:
    """Every open stream gets a comment line each heartbeat interval, from one timer that runs only while a
    stream is open; a channel's batch is framed once for all its streams."""
    from sockdrawer.transports.sse.stream import EventStream

    clock = Clock()
    hub = MemoryChannelHub()
    registry = StreamRegistry(hub, clock, send_buffer=1 << 20, heartbeat=15.0)
    transports = [_Transport(), _Transport()]
    streams = [EventStream(registry, t, b"news", "peer") for t in transports]
    for stream in streams:
        registry.join(stream)
    assert hub.subscribers(b"news") == 1
    clock.advance(15.0)
    assert [t.written for t in transports] == [[b":\n\n"], [b":\n\n"]]
    hub.deliver(b"news", b"x")
    assert [t.written[-1] for t in transports] == [b"data: x\n\n", b"data: x\n\n"]
    for stream in streams:
        stream.lost()
    assert hub.subscribers(b"news") == 0 and not clock.getDelayedCalls()


# -- sockdrawer.v1 over Server-Sent Events

_LISTEN_V1 = """
    window.events = [];
    var source = window.source = new EventSource(arguments[0]);
    source.onmessage = function (e) { events.push({id: e.lastEventId, data: JSON.parse(e.data)}); };
    source.onerror = function () { events.push({id: null, data: {op: "error-event"}}); };
"""


def v1_events(driver: Any, predicate: Any, what: str) -> list[dict[str, Any]]:
    try:
        events: list[dict[str, Any]] = WebDriverWait(driver, 30, poll_frequency=0.05).until(
            lambda d: (lambda e: e if predicate(e) else None)(d.execute_script("return window.events;")))
    except TimeoutException:
        raise AssertionError(f"{what}: {driver.execute_script('return window.events;')}") from None
    return events


def messages(events: list[dict[str, Any]], channel: str) -> list[str]:
    return [e["data"]["data"] for e in events if e["data"].get("op") == "message" and e["data"]["channel"] == channel]


def test_eventsource_v1_stream_resumes_through_a_node_restart(chromium: Any, serve: Any,  # noqa: F811
                                                              redis_server: Any, tmp_path: Path) -> None:
    """``new EventSource("http://<node>/?channel=a&channel=b")`` gets the v1 envelopes of both channels, each
    event's id a cursor of both; when the node restarts, the browser reconnects by itself with that cursor as
    Last-Event-ID and gets every message published meanwhile on each channel, exactly once and in order, then
    live ones."""
    from conftest import free_port

    from sockdrawer import Client

    port = free_port()
    args = ["--port", f"tcp:{port}:interface=127.0.0.1", "--redis", redis_server.url, "--history-size", "100",
            "--drain-window", "0"]
    nodes = []

    def start(name: str) -> ChildNode:
        (tmp_path / name).mkdir()
        node = ChildNode(tmp_path / name, args).start()
        nodes.append(node)
        deadline = time.monotonic() + 10
        with redis_server.client() as r:  # the policy the node writes, for the plain Client to follow
            while not r.function_list(library="sockdrawer*"):
                assert time.monotonic() < deadline, node.log_text()
                time.sleep(0.05)
        return node

    publisher = Client(redis_server.url)
    try:
        node = start("node0")
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "index.html").write_text(PAGE)
        chromium.get(serve(tmp_path / "site") + "/index.html")
        chromium.execute_script(_LISTEN_V1, f"http://127.0.0.1:{port}/?channel=sse-a&channel=sse-b")
        v1_events(chromium, lambda e: sum(x["data"].get("op") == "subscribed" for x in e) == 2, "two subscribed")
        publisher.pub("a0", "sse-a")
        publisher.pub("b0", "sse-b")
        events = v1_events(chromium, lambda e: len(messages(e, "sse-b")) == 1 and messages(e, "sse-a"), "a0, b0")
        last = [e for e in events if e["data"].get("op") == "message"][-1]
        assert len(last["id"].split(",")) == 2 and all(last["id"].split(","))
        node.stop()
        for message, channel in (("a1", "sse-a"), ("b1", "sse-b"), ("a2", "sse-a")):
            publisher.pub(message, channel)
        start("node1")
        v1_events(chromium, lambda e: "a2" in messages(e, "sse-a") and "b1" in messages(e, "sse-b"), "a1, a2, b1")
        publisher.pub("a3", "sse-a")
        events = v1_events(chromium, lambda e: "a3" in messages(e, "sse-a"), "a3")
    finally:
        publisher.close()
        for node in nodes:
            node.stop()
    assert messages(events, "sse-a") == ["a0", "a1", "a2", "a3"]
    assert messages(events, "sse-b") == ["b0", "b1"]
    assert not [e for e in events if e["data"].get("op") == "reset"]


_BUFFERS: dict[socket.socket, bytes] = {}


def read_events(s: socket.socket, until: Any, kind: bytes | None = None) -> list[tuple[str, dict[str, Any]]]:
    """
    Read a v1 stream from ``s`` (from its start: what was read is kept) until ``until(events)``: the
    (id, envelope) pairs of its message events, or of its events of type ``kind``.
    """
    import json

    while True:
        events = []
        for block in _BUFFERS.get(s, b"").split(b"\n\n"):
            lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
            if b"data" in lines and lines[b"data"].startswith(b"{") and lines.get(b"event") == kind:
                events.append((lines.get(b"id", b"").decode(), json.loads(lines[b"data"])))
        if until(events):
            return events
        chunk = s.recv(65536)
        assert chunk, _BUFFERS.get(s)
        _BUFFERS[s] = _BUFFERS.get(s, b"") + chunk


@pytest_twisted.ensureDeferred
async def test_a_v1_stream_resumes_from_its_cursor_and_refuses_a_foreign_one(run_service: Any) -> None:
    """A v1 stream's events carry a cursor of all its channels; a new stream with it as Last-Event-ID gets
    what was published since on each channel and nothing before; a cursor that does not fit the channels
    gets 400; a cursor with unknown positions gets reset for those channels, and the stream goes on."""
    svc = await run_service(history_size=100)

    def opened(request: bytes) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
        s.sendall(request)
        return s

    first = await deferToThread(opened, stream_request("/?channel=x&channel=y"))
    try:
        await wait_for(lambda: svc.hub.subscribers(b"x") and svc.hub.subscribers(b"y"))
        await svc.publish("x1", "x")
        await svc.publish("y1", "y")
        events = await deferToThread(read_events, first, lambda ev: len(ev) == 4)
    finally:
        first.close()
    assert [e["op"] for _, e in events] == ["subscribed", "subscribed", "message", "message"]
    cursor = events[-1][0]
    assert cursor.split(",") == [events[2][1]["offset"], events[3][1]["offset"]]
    await svc.publish("x2", "x")
    again = await deferToThread(opened, stream_request("/?channel=x&channel=y", f"Last-Event-ID: {cursor}"))
    try:
        events = await deferToThread(read_events, again, lambda ev: any(e.get("data") == "x2" for _, e in ev))
    finally:
        again.close()
    assert [e.get("data") for _, e in events if e["op"] == "message"] == ["x2"]
    answer = await deferToThread(raw_request, svc.ws_port, stream_request("/?channel=x", f"Last-Event-ID: {cursor}"))
    assert answer.startswith(b"HTTP/1.1 400")
    forged = await deferToThread(opened, stream_request("/?channel=x&channel=y", "Last-Event-ID: nope,9:9"))
    try:
        events = await deferToThread(read_events, forged, lambda ev: sum(e["op"] == "reset" for _, e in ev) == 2)
    finally:
        forged.close()
    await svc.publish("x3", "x")
    assert svc.running


@pytest_twisted.ensureDeferred
async def test_a_page_posts_ops_for_its_stream(run_service: Any) -> None:
    """A v1 stream names itself in a ``stream`` event; a POST of a v1 op to /?stream=<that id> is accepted
    (202) and acts as the stream: a send reaches the listeners and their reply comes on the stream, a
    subscribe adds a channel to it; an unknown id gets 404, a body over --max-message-size 413."""

    import listeners as test_listeners

    svc = await run_service(listeners=(test_listeners.Echo,), max_message_size=1024)

    def stream_id(s: socket.socket) -> str:
        return str(read_events(s, lambda ev: ev, kind=b"stream")[0][1]["id"])

    def post(path: str, body: bytes) -> bytes:
        head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}"
        return raw_request(svc.ws_port, head.encode() + b"\r\n\r\n" + body)

    s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
    try:
        s.sendall(stream_request("/?channel=echo"))
        sid = await deferToThread(stream_id, s)
        answer = await deferToThread(post, f"/?stream={sid}",
                                     b'{"op":"send","channel":"echo","data":"hi","id":7}')
        assert answer.startswith(b"HTTP/1.1 202") and answer.endswith(b'{"accepted": true}')
        answer = await deferToThread(post, f"/?stream={sid}", b'{"op":"subscribe","channel":"more"}')
        assert answer.startswith(b"HTTP/1.1 202")
        events = await deferToThread(read_events, s, lambda ev: len(ev) == 3)
    finally:
        s.close()
    assert [e for _, e in events] == [
        {"op": "subscribed", "channel": "echo", "offset": None},
        {"op": "reply", "id": 7, "data": "hi"},
        {"op": "subscribed", "channel": "more", "offset": None},
    ]
    assert (await deferToThread(post, "/?stream=nope", b"{}")).startswith(b"HTTP/1.1 404")
    assert (await deferToThread(post, f"/?stream={sid}", b"x" * 2000)).startswith(b"HTTP/1.1 413")


# -- the JavaScript client behind a proxy that breaks WebSocket upgrades

class UpgradeBreakingProxy:
    """A TCP proxy on 127.0.0.1 that passes plain HTTP through to ``port`` and closes any connection whose
    request asks for a WebSocket upgrade, as some corporate proxies and antivirus web shields do."""

    def __init__(self, port: int) -> None:
        import threading

        self.upstream = port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.refused = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        import threading

        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    client.close()
                    return
                head += chunk
            if b"upgrade: websocket" in head.lower():
                self.refused += 1
                client.close()
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        upstream.sendall(head)

        def pipe(a: socket.socket, b: socket.socket) -> None:
            try:
                while data := a.recv(65536):
                    b.sendall(data)
            except OSError:
                pass
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        threading.Thread(target=pipe, args=(upstream, client), daemon=True).start()
        pipe(client, upstream)

    def close(self) -> None:
        self.server.close()


JS_PAGE = """<!DOCTYPE html>
<meta charset="utf-8">
<title>fallback</title>
<script type="module">
  import { SockDrawer } from "./sockdrawer.js";
  window.received = [];
  window.events = [];
  const sd = window.sd = new SockDrawer("ws://127.0.0.1:%(port)d/", { baseDelay: 200, maxDelay: 1000 });
  sd.addEventListener("state", (e) => window.events.push(e.detail.state));
  sd.addEventListener("transport", (e) => window.events.push("transport " + e.detail.transport));
  sd.addEventListener("reset", (e) => window.events.push("reset " + e.detail.channel));
  sd.addEventListener("subscribed", (e) => window.events.push("subscribed " + e.detail.channel));
  sd.subscribe("fallback", (data, meta) => window.received.push([data, meta.offset]));
</script>
"""


def test_js_client_falls_back_to_event_streams_and_misses_nothing(chromium: Any, serve: Any,  # noqa: F811
                                                                  redis_server: Any, tmp_path: Path) -> None:
    """js/sockdrawer.js in Chromium, behind a proxy that breaks WebSocket upgrades, falls back to Server-Sent
    Events by itself and gets every message exactly once, in order: before, during and after a node restart
    (its ops, and a send's reply, go by POST)."""
    import shutil

    from childnode import ROOT
    from conftest import free_port

    from sockdrawer import Client

    port = free_port()
    args = ["--port", f"tcp:{port}:interface=127.0.0.1", "--redis", redis_server.url, "--history-size", "100",
            "--drain-window", "0", "--listener", "listeners:Echo"]
    proxy = UpgradeBreakingProxy(port)
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(Path(ROOT) / "js" / "sockdrawer.js", site / "sockdrawer.js")
    (site / "index.html").write_text(JS_PAGE % {"port": proxy.port})
    publisher = Client(redis_server.url)
    nodes: list[ChildNode] = []

    def start(name: str) -> ChildNode:
        (tmp_path / name).mkdir()
        node = ChildNode(tmp_path / name, args).start()
        nodes.append(node)
        with redis_server.client() as r:
            deadline = time.monotonic() + 10
            while not r.function_list(library="sockdrawer*"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        return node

    def received(count: int) -> list[list[Any]]:
        deadline = time.monotonic() + 30
        while True:
            got: list[list[Any]] = chromium.execute_script("return window.received || []")
            if len(got) >= count:
                return got
            assert time.monotonic() < deadline, (got, chromium.execute_script("return window.events"))
            time.sleep(0.05)

    try:
        node = start("node0")
        chromium.get(serve(site) + "/index.html")
        node.wait_sockets(1, timeout=30)  # the event stream
        deadline = time.monotonic() + 10
        while "subscribed fallback" not in chromium.execute_script("return window.events"):
            assert time.monotonic() < deadline, chromium.execute_script("return window.events")
            time.sleep(0.05)
        for i in range(5):
            publisher.pub(f"m{i}", "fallback")
        received(5)
        reply = chromium.execute_async_script("window.sd.send('echo', 'hi').then(arguments[0]);")
        assert reply == "hi"
        node.stop()
        for i in range(5, 10):
            publisher.pub(f"m{i}", "fallback")
        start("node1").wait_sockets(1, timeout=30)
        for i in range(10, 15):
            publisher.pub(f"m{i}", "fallback")
        got = received(15)
    finally:
        publisher.close()
        for node in nodes:
            node.stop()
        proxy.close()
    assert [data for data, _ in got] == [f"m{i}" for i in range(15)], got
    events = chromium.execute_script("return window.events")
    assert "transport sse" in events and not any(e.startswith("reset") for e in events), events
    assert proxy.refused >= 2


@pytest_twisted.ensureDeferred
async def test_presence_on_a_v1_stream(run_service: Any) -> None:
    """A v1 stream with presence=1 gets the channel's presence list after subscribed, then a join when a v1
    WebSocket subscribes with presence, and the WebSocket sees the stream's entry in its list."""
    from test_presence import subscribe_with_presence, v1

    svc = await run_service()
    s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
    try:
        s.sendall(stream_request("/?channel=room/1&presence=1"))
        events = await deferToThread(read_events, s, lambda ev: len(ev) == 2)
        assert [e["op"] for _, e in events] == ["subscribed", "presence"]
        me = events[1][1]["self"]
        client = await v1(svc)
        listing = await subscribe_with_presence(client, "room/1")
        assert me in [c["client"] for c in listing["clients"]]
        events = await deferToThread(read_events, s, lambda ev: len(ev) == 3)
        assert events[2][1]["op"] == "join" and events[2][1]["client"] == listing["self"]
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_a_stream_that_does_not_read_is_cut_off(run_service: Any) -> None:
    """A stream whose reader stops reading is closed once --send-buffer bytes wait for it, counted in the
    metrics; the node and other streams carry on."""
    svc = await run_service(send_buffer=256 * 1024)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", svc.ws_port))
    try:
        s.sendall(stream_request("/firehose"))
        await wait_for(lambda: svc.hub.subscribers(b"firehose") == 1)
        payload = "x" * 16384
        for _ in range(200):  # up to 3 MiB, far more than the kernel buffers and --send-buffer
            if svc.factory.streams.cut_offs:
                break
            await svc.publish(payload, "firehose")
        await wait_for(lambda: svc.factory.streams.cut_offs == 1 and svc.factory.open_sockets == 0)
    finally:
        s.close()
    assert svc.hub.subscribers(b"firehose") == 0 and svc.running


@pytest_twisted.ensureDeferred
async def test_a_stream_ends_when_its_token_expires(run_service: Any, tmp_path: Path) -> None:
    """A stream opened with a token ends when the token expires (as a socket is closed with 4001), so the
    browser comes back with a fresh one; its connection closes and it leaves the open count."""
    from sockdrawer import make_token

    svc = await run_service(auth_secret="s" * 32, auth_leeway=0)
    token = make_token("s" * 32, channels=["news"], ttl=2)
    s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
    try:
        s.sendall(stream_request(f"/news?token={token}"))

        def until_closed() -> bytes:
            data = b""
            while chunk := s.recv(4096):
                data += chunk
            return data

        received = await deferToThread(until_closed)
    finally:
        s.close()
    assert received.startswith(b"HTTP/1.1 200 OK") and received.endswith(b"retry: 2000\n\n")
    await wait_for(lambda: svc.factory.open_sockets == 0)


@pytest_twisted.ensureDeferred
async def test_streams_count_per_forwarded_address(run_service: Any) -> None:
    """Behind a trusted proxy, a stream counts against --max-connections-per-ip for the last address of
    X-Forwarded-For (as a socket does): a second stream from that address gets 429, another address gets in."""
    svc = await run_service(trust_x_forwarded_for=1, max_connections_per_ip=1)
    s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
    try:
        s.sendall(stream_request("/news", "X-Forwarded-For: 10.0.0.9, 10.0.0.1"))
        await wait_for(lambda: svc.factory.per_ip.get("10.0.0.1") == 1 and svc.factory.open_sockets == 1)
        answer = await deferToThread(raw_request, svc.ws_port, stream_request("/news", "X-Forwarded-For: 10.0.0.1"))
        assert answer.startswith(b"HTTP/1.1 429")
        other = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
        try:
            other.sendall(stream_request("/news", "X-Forwarded-For: 10.0.0.2"))
            await wait_for(lambda: svc.factory.open_sockets == 2)
        finally:
            other.close()
    finally:
        s.close()
    await wait_for(lambda: not svc.factory.per_ip)
