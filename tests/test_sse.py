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
