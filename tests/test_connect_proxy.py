"""
--connect-proxy: the node asks the app's backend (a real HTTP server here, on
loopback) about each handshake without a token, forwarding the browser's
cookies; its answer admits the socket or stream as a user with the channels it
allows, refuses it with 401/403, and anything else (slow, down, not JSON, too
large, a 5xx) refuses it with 503 while the other sockets carry on.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest_twisted
from conftest import wait_for
from test_production import scrape
from test_sse import raw_request, read_events, stream_request
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from wsclient import connect, connect_refused

from sockdrawer import make_token

SESSIONS = {
    "alice": (200, {"user": "alice", "channels": ["news", "rooms/*"]}),
    "bob": (200, {"user": "bob"}),
    "banned": (403, {}),
    "broken": (500, {}),
    "junk": (200, "not json"),
    "huge": (200, {"user": "x" * 100_000}),
    "past": (200, {"user": "old", "expires": 1.0}),
}


class App(Resource):
    """The app's connect view: who the session cookie names."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    def render_POST(self, request: Any) -> Any:
        body = json.loads(request.content.read())
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.seen.append((body, headers))
        if request.path == b"/subscribe":
            verdicts = {"rooms/forbidden": 403, "rooms/broken": 500}
            if body["channel"] == "rooms/slow":
                return NOT_DONE_YET
            request.setResponseCode(verdicts.get(body["channel"], 200))
            return b""
        cookie = headers.get("cookie", "")
        values = dict(part.strip().partition("=")[::2] for part in cookie.split(";") if "=" in part)
        session = values.get("session")
        if session == "slow":
            return NOT_DONE_YET  # never answers
        if session not in SESSIONS:
            request.setResponseCode(401)
            return b"{}"
        status, answer = SESSIONS[session]
        request.setResponseCode(status)
        return (answer if isinstance(answer, str) else json.dumps(answer)).encode()


async def start_app() -> tuple[App, str, Any]:
    app = App()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Site(app))
    return app, f"http://127.0.0.1:{port.getHost().port}/connect", port


def cookie(session: str) -> list[tuple[str, str]]:
    return [("Cookie", f"session={session}; theme=dark")]


@pytest_twisted.ensureDeferred
async def test_a_session_cookie_admits_a_socket_as_its_user(run_service: Any) -> None:
    """The proxy gets the handshake as JSON (client id, transport, channel, remote address, origin) with the
    browser's Cookie forwarded; its 200 admits the socket, which gets the channel's messages; a channel the
    answer does not allow gets 403 (a v1 subscribe too, with no keys configured); no cookie 401 and a banned
    user 403, with the proxy's own status; the verdicts are in the metrics."""
    app, url, port = await start_app()
    try:
        svc = await run_service(connect_proxy=url)
        client = await connect(svc.ws_port, "/news", extra_headers=cookie("alice"), origin="http://app.example")
        body, headers = app.seen[-1]
        assert {k: body[k] for k in ("transport", "path", "channel", "subprotocol", "remote", "origin")} == {
            "transport": "websocket", "path": "/news", "channel": "news", "subprotocol": None,
            "remote": "127.0.0.1", "origin": "http://app.example"}
        assert body["client"] and headers["cookie"] == "session=alice; theme=dark"
        await svc.publish("hello", "news")
        assert await client.next_text() == "hello"
        assert (await connect_refused(svc.ws_port, "/private", extra_headers=cookie("alice"))).status == 403
        v1 = await connect(svc.ws_port, "/", subprotocols=["sockdrawer.v1"], extra_headers=cookie("alice"))
        v1.send_json({"op": "subscribe", "channel": "private"})  # no keys configured: the answer still binds
        assert (await v1.next_json())["status"] == 403
        assert (await connect_refused(svc.ws_port, "/news")).status == 401
        assert (await connect_refused(svc.ws_port, "/news", extra_headers=cookie("banned"))).status == 403
        assert svc.connect_proxy.answers == {"admitted": 3, "401": 1, "403": 1}
        samples = await deferToThread(scrape, svc.api_port)
        assert [samples[f"sockdrawer_connect_proxy_answers_total{{outcome={o}}}"]
                for o in ("admitted", "401", "403", "unavailable")] == [3, 1, 1, 0]
        assert samples["sockdrawer_connect_proxy_in_flight"] == 0
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_proxy_that_cannot_answer_refuses_with_503_and_hurts_nobody_else(run_service: Any) -> None:
    """Fail closed: a 5xx, an answer that is not JSON, one over 64 KiB, one already expired, no answer within
    --proxy-timeout, and a proxy that is down each refuse the handshake with 503 (counted, logged); a socket
    admitted before keeps getting its messages."""
    from twisted.logger import globalLogPublisher

    app, url, port = await start_app()
    svc = await run_service(connect_proxy=url, proxy_timeout=0.5)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        admitted = await connect(svc.ws_port, "/news", extra_headers=cookie("bob"))
        for session in ("broken", "junk", "huge", "past", "slow"):
            refusal = await connect_refused(svc.ws_port, "/news", extra_headers=cookie(session))
            assert refusal.status == 503, session
        await port.stopListening()
        assert (await connect_refused(svc.ws_port, "/news", extra_headers=cookie("bob"))).status == 503
        await svc.publish("still here", "news")
        assert await admitted.next_text() == "still here"
    finally:
        globalLogPublisher.removeObserver(events.append)
        if port.connected:
            await port.stopListening()
    assert svc.connect_proxy.answers == {"admitted": 1, "unavailable": 6}
    lines = [e for e in events if e.get("log_namespace") == "sockdrawer.proxy"]
    assert len(lines) == 6 and all(e["log_level"].name == "warn" for e in lines)
    whys = [e["why"] for e in lines]
    assert any("within 0.5 s" in w for w in whys) and any("not JSON" in w for w in whys), whys


@pytest_twisted.ensureDeferred
async def test_a_v1_socket_is_its_user_and_reads_only_its_channels(run_service: Any) -> None:
    """A sockdrawer.v1 socket admitted by the proxy subscribes to the channels its answer allows (a pattern
    included) and gets 403 for others; a token still works beside the proxy, and the proxy is not asked."""
    app, url, port = await start_app()
    try:
        svc = await run_service(connect_proxy=url, auth_secret="s" * 32)
        client = await connect(svc.ws_port, "/", subprotocols=["sockdrawer.v1"], extra_headers=cookie("alice"))
        assert app.seen[-1][0]["subprotocol"] == "sockdrawer.v1" and app.seen[-1][0]["channel"] is None
        for channel, op in (("rooms/1", "subscribed"), ("secret", "error")):
            client.send_json({"op": "subscribe", "channel": channel})
            assert (await client.next_json())["op"] == op
        asked = len(app.seen)
        token = make_token("s" * 32, channels=["secret"])
        with_token = await connect(svc.ws_port, f"/?token={token}", subprotocols=["sockdrawer.v1"])
        with_token.send_json({"op": "subscribe", "channel": "secret"})
        assert (await with_token.next_json())["op"] == "subscribed"
        assert len(app.seen) == asked
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_event_streams_ask_the_proxy_too(run_service: Any) -> None:
    """An event stream request is asked about as a socket is (transport "sse", the cookie forwarded): the
    admitted one streams, a banned one gets 403 and a slow answer 503."""
    app, url, port = await start_app()
    try:
        svc = await run_service(connect_proxy=url, proxy_timeout=0.5)
        s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
        try:
            s.sendall(stream_request("/?channel=news", "Cookie: session=alice"))
            events = await deferToThread(read_events, s, lambda ev: len(ev) == 1)
            assert events[0][1] == {"op": "subscribed", "channel": "news", "offset": None}
        finally:
            s.close()
        assert app.seen[-1][0]["transport"] == "sse" and app.seen[-1][1]["cookie"] == "session=alice"
        banned = await deferToThread(raw_request, svc.ws_port, stream_request("/news", "Cookie: session=banned"))
        assert banned.startswith(b"HTTP/1.1 403")
        slow = await deferToThread(raw_request, svc.ws_port, stream_request("/news", "Cookie: session=slow"))
        assert slow.startswith(b"HTTP/1.1 503")
        await wait_for(lambda: svc.factory.open_sockets == 0)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_each_v1_subscribe_asks_the_subscribe_proxy(run_service: Any) -> None:
    """--subscribe-proxy: each sockdrawer.v1 subscribe, on a socket or a stream, is asked about (user,
    client, channel, remote); 200 allows it, 403 answers the v1 error 403, a 5xx or no answer the error 503;
    the socket and its other subscriptions carry on."""
    app, url, port = await start_app()
    try:
        svc = await run_service(connect_proxy=url, subscribe_proxy=url.replace("/connect", "/subscribe"),
                                proxy_timeout=0.5)
        client = await connect(svc.ws_port, "/", subprotocols=["sockdrawer.v1"], extra_headers=cookie("alice"))
        for channel, answer in (("rooms/1", ("subscribed", None)), ("rooms/forbidden", ("error", 403)),
                                ("rooms/broken", ("error", 503)), ("rooms/slow", ("error", 503))):
            client.send_json({"op": "subscribe", "channel": channel})
            reply = await client.next_json()
            assert (reply["op"], reply.get("status")) == answer, (channel, reply)
        asked = [body for body, _ in app.seen if "transport" not in body]
        assert {k: asked[0][k] for k in ("user", "channel", "remote")} == {
            "user": "alice", "channel": "rooms/1", "remote": "127.0.0.1"}
        assert asked[0]["client"]
        await svc.publish("still", "rooms/1")
        assert (await client.next_json())["data"] == "still"
        s = socket.create_connection(("127.0.0.1", svc.ws_port), timeout=5)
        try:
            s.sendall(stream_request("/?channel=rooms/forbidden", "Cookie: session=alice"))
            events = await deferToThread(read_events, s, lambda ev: len(ev) == 1)
        finally:
            s.close()
        assert events[0][1]["op"] == "error" and events[0][1]["status"] == 403
        assert svc.subscribe_proxy.answers == {"admitted": 1, "403": 2, "unavailable": 2}
    finally:
        await port.stopListening()
