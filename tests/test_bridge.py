"""
Integration tests: a real redis-server, the real service on 127.0.0.1, real
WebSocket clients.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import listeners as test_listeners
import pytest
import pytest_twisted
from conftest import RedisServer, wait_for, wait_subscribed
from twisted.internet.threads import deferToThread
from websockets.frames import Opcode
from wsclient import connect, connect_refused

from sockdrawer import Client, PublishError


def no_message(client: Any) -> bool:
    return client.pending() == 0


# -- fan-out -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fan_out_to_all_sockets_on_path_only(redis_server: RedisServer, run_service: Any) -> None:
    """A message on sock-drawer/news reaches every socket on /news, in order, and none on /sport."""
    svc = await run_service(redis=redis_server.url)
    await wait_subscribed(svc, redis_server)
    news = [(await connect(svc.ws_port, "/news")) for _ in range(3)]
    sport = await connect(svc.ws_port, "/sport")
    for i in range(20):
        await deferToThread(redis_server.publish, "sock-drawer/news", f"m{i}")
    for client in news:
        got = [await client.next_text() for _ in range(20)]
        assert got == [f"m{i}" for i in range(20)]
    await deferToThread(redis_server.publish, "sock-drawer/sport", "goal")
    assert (await sport.next_text()) == "goal"
    assert all(no_message(c) for c in news)


@pytest_twisted.ensureDeferred
async def test_root_and_multi_segment_paths(redis_server: RedisServer, run_service: Any) -> None:
    """'/' receives sock-drawer/ and '/rooms/42' receives sock-drawer/rooms/42, nothing else."""
    svc = await run_service(redis=redis_server.url)
    await wait_subscribed(svc, redis_server)
    root = await connect(svc.ws_port, "/")
    room = await connect(svc.ws_port, "/rooms/42?token=ignored")
    rooms = await connect(svc.ws_port, "/rooms")
    await deferToThread(redis_server.publish, "sock-drawer/", "to root")
    await deferToThread(redis_server.publish, "sock-drawer/rooms/42", "to room")
    assert (await root.next_text()) == "to root"
    assert (await room.next_text()) == "to room"
    await deferToThread(redis_server.publish, "sock-drawer/rooms", "to rooms")
    assert (await rooms.next_text()) == "to rooms"
    assert no_message(root) and no_message(room)


@pytest_twisted.ensureDeferred
async def test_binary_and_text_frames(redis_server: RedisServer, run_service: Any) -> None:
    """UTF-8 payloads arrive as text frames, others as binary frames, bytes unchanged."""
    svc = await run_service(redis=redis_server.url)
    await wait_subscribed(svc, redis_server)
    client = await connect(svc.ws_port, "/bin")
    payloads = [b"\xff\xfe\x00\x01", "héllo".encode(), b"", bytes(range(256)), b"x" * 70000]
    for p in payloads:
        await deferToThread(redis_server.publish, "sock-drawer/bin", p)
    got = [(await client.next_message()) for _ in payloads]
    assert got == [(Opcode.BINARY, payloads[0]), (Opcode.TEXT, payloads[1]), (Opcode.TEXT, b""),
                   (Opcode.BINARY, payloads[3]), (Opcode.TEXT, payloads[4])]


@pytest_twisted.ensureDeferred
async def test_refused_paths_get_http_400(run_service: Any) -> None:
    """Invalid channel paths are refused at the handshake with HTTP 400 and a reason."""
    svc = await run_service()
    for path, reason in [("/a//b", "empty segment"), ("/news/", "empty segment"),
                         ("/a/../b", "'.' or '..'"), ("/a%00", "control character"),
                         ("/%zz", "bad percent-encoding"), ("/%FF", "not valid UTF-8"),
                         ("/" + "x" * 300, "too long")]:
        refused = await connect_refused(svc.ws_port, path)
        assert refused.status == 400, path
        assert reason in refused.reason, path
    assert svc.hub.channels() == [b"/control"]  # the nodes' control key only
    ok = await connect(svc.ws_port, "/still-fine")
    assert ok.ws.state.name == "OPEN"


@pytest_twisted.ensureDeferred
async def test_close_unsubscribes_and_forgets_path(redis_server: RedisServer, run_service: Any) -> None:
    """A socket that closes leaves the hub; when the last one leaves, the path's entry is gone."""
    svc = await run_service(redis=redis_server.url)
    await wait_subscribed(svc, redis_server)
    a = await connect(svc.ws_port, "/news")
    b = await connect(svc.ws_port, "/news")
    assert svc.factory.sockets(b"news") == 2
    a.close()
    code, _ = await a.wait_closed()
    assert code == 1000
    await wait_for(lambda: svc.factory.sockets(b"news") == 1)
    await deferToThread(redis_server.publish, "sock-drawer/news", "after a left")
    assert (await b.next_text()) == "after a left"
    b.abort()  # no close handshake: the TCP connection just goes away
    await b.wait_closed()
    await wait_for(lambda: b"news" not in svc.hub.channels())
    await wait_for(lambda: not svc.factory.connections)


# -- publishing --------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_client_over_redis(own_redis: RedisServer, run_service: Any) -> None:
    """Client(url=redis://...).pub() reaches the socket and returns the number of subscribed nodes."""
    redis_server = own_redis
    svc = await run_service(redis=redis_server.url)
    await wait_subscribed(svc, redis_server)
    client = await connect(svc.ws_port, "/model_created")
    pub = Client(redis_server.url)
    count = await deferToThread(pub.pub, "new model!", channel="model_created")
    assert count == 1
    assert (await client.next_text()) == "new model!"
    await deferToThread(pub.pub, b"\x00\xffraw", "model_created")
    assert (await client.next_message()) == (Opcode.BINARY, b"\x00\xffraw")
    root = await connect(svc.ws_port, "/")
    await deferToThread(pub.pub, "to the root")
    assert (await root.next_text()) == "to the root"
    pub.close()


def test_client_with_injected_redis_object() -> None:
    """Any object with publish(channel, message) can stand in for Redis, under the namespace."""

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[bytes, bytes]] = []

        def publish(self, channel: bytes, message: bytes) -> int:
            self.calls.append((channel, message))
            return 7

    recorder = Recorder()
    client = Client(redis=recorder, name="app")
    assert client.pub("hi", channel="rooms/1") == 7
    assert recorder.calls == [(b"app/rooms/1", b"hi")]
    with pytest.raises(ValueError):
        client.pub("x", channel="/rooms")
    with pytest.raises(ValueError):
        client.pub(12, channel="a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="over the limit"):
        Client(redis=recorder, max_message_size=10).pub(b"x" * 11, "a")
    assert len(recorder.calls) == 1


def test_client_reports_redis_down() -> None:
    """Publishing while Redis is unreachable raises PublishError quickly, naming the server."""
    from conftest import free_port

    port = free_port()
    client = Client(f"redis://:secret@127.0.0.1:{port}/0", timeout=1)
    with pytest.raises(PublishError) as e:
        client.pub("lost?", channel="news")
    assert f"127.0.0.1:{port}" in str(e.value)
    assert "secret" not in str(e.value)


@pytest_twisted.ensureDeferred
async def test_client_over_http_api(run_service: Any) -> None:
    """Client(url=http://api) publishes through the embedded broker and returns the subscriber count."""
    svc = await run_service()
    client = await connect(svc.ws_port, "/news")
    pub = Client(f"http://127.0.0.1:{svc.api_port}")
    count = await deferToThread(pub.pub, "via http", channel="news")
    assert count == 1
    assert (await client.next_text()) == "via http"
    count = await deferToThread(pub.pub, "nobody", channel="empty")
    assert count == 0


@pytest_twisted.ensureDeferred
async def test_http_api_over_redis(own_redis: RedisServer, run_service: Any) -> None:
    """POST /publish/<channel> on a Redis-backed node publishes on Redis, reaching another node's sockets."""
    redis_server = own_redis
    a = await run_service(redis=redis_server.url)
    b = await run_service(redis=redis_server.url)
    await wait_for(lambda: redis_server.pattern_subscribers() >= 2)
    client = await connect(b.ws_port, "/rooms/1")
    pub = Client(f"http://127.0.0.1:{a.api_port}")
    count = await deferToThread(pub.pub, "across nodes", channel="rooms/1")
    assert count == 2  # both nodes are subscribed
    assert (await client.next_text()) == "across nodes"


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest_twisted.ensureDeferred
async def test_http_api_key_and_errors(run_service: Any) -> None:
    """With --api-key, requests need the Bearer key (401 otherwise); bad channel 400, big body 413, GET 405."""
    svc = await run_service(api_key="s3cret", max_publish_size=100)
    client = await connect(svc.ws_port, "/news")
    base = f"http://127.0.0.1:{svc.api_port}"
    status, body = await deferToThread(http, "POST", base + "/publish/news", b"x")
    assert status == 401 and "API key" in body["error"]
    status, _ = await deferToThread(http, "POST", base + "/publish/news", b"x",
                                    {"Authorization": "Bearer wrong"})
    assert status == 401
    auth = {"Authorization": "Bearer s3cret"}
    status, body = await deferToThread(http, "POST", base + "/publish/a//b", b"x", auth)
    assert status == 400 and "empty segment" in body["error"]
    status, body = await deferToThread(http, "POST", base + "/publish/news", b"x" * 101, auth)
    assert status == 413
    status, _ = await deferToThread(http, "GET", base + "/publish/news", None, auth)
    assert status == 405
    assert no_message(client)
    status, body = await deferToThread(http, "POST", base + "/publish/news", b"ok", auth)
    assert (status, body) == (200, {"channel": "news", "subscribers": 1})
    assert (await client.next_text()) == "ok"
    with pytest.raises(PublishError, match="401"):
        await deferToThread(Client(base).pub, "no key", "news")
    assert (await deferToThread(Client(base, api_key="s3cret").pub, "key", "news")) == 1
    assert (await client.next_text()) == "key"
    status, body = await deferToThread(http, "GET", base + "/health")  # no key needed
    assert status == 200 and body["broker"] == "embedded" and body["sockets"] == 1


def raw_http(port: int, request: bytes) -> bytes:
    """Send ``request`` as it is on a new connection; return the whole answer (blocking)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def api_call(port: int, method: str, path: str, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of one API request (blocking)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_http_api_methods_errors_and_headers(run_service: Any) -> None:
    """Every answer says Server: sockdrawer; /health takes GET and HEAD only (405 with Allow); without the key,
    401 with a Bearer challenge; /publish/<channel> takes POST only (405 with Allow: POST); any other path is 404;
    each error is JSON with its fixed text."""
    svc = await run_service(api_key="k")
    port, key = svc.api_port, {"Authorization": "Bearer k"}

    async def call(method: str, path: str, headers: dict[str, str] | None = None) -> Any:
        status, head, body = await deferToThread(api_call, port, method, path, headers)
        assert head["server"] == "sockdrawer", head
        return status, head, (json.loads(body) if body else None)

    assert (await call("HEAD", "/health"))[0] == 200
    status, head, body = await call("POST", "/health")
    assert (status, head["allow"], body) == (405, "GET, HEAD", {"error": "use GET"})
    status, head, body = await call("GET", "/publish/news")
    assert (status, head["www-authenticate"], body) == (401, 'Bearer realm="sockdrawer"',
                                                         {"error": "missing or wrong API key"})
    status, head, body = await call("GET", "/publish/news", key)
    assert (status, head["allow"], body) == (405, "POST", {"error": "use POST"})
    assert (await call("GET", "/publish", key))[0] == 405  # /publish itself is the root channel's
    assert (await call("GET", "/publish/news", {"Authorization": "bearer  k"}))[0] == 405  # 1*SP, any case
    for path in ("/publishing", "/nowhere", "/"):
        status, _, body = await call("POST", path, key)
        assert (status, body) == (404, {"error": "not found; use POST /publish/<channel>"}), path


@pytest_twisted.ensureDeferred
async def test_http_api_answers_in_detail(run_service: Any) -> None:
    """413 names the limit; POST /publish (no slash) publishes on the root channel; a channel over
    --max-channel-length is 400 'bad channel'; each publish through the API is counted once, refusals not."""
    svc = await run_service(max_publish_size=100, max_channel_length=8)
    root = await connect(svc.ws_port, "/")
    base = f"http://127.0.0.1:{svc.api_port}"
    status, body = await deferToThread(http, "POST", base + "/publish/news", b"x" * 101)
    assert (status, body) == (413, {"error": "body over the limit of 100 bytes"})
    head = (await deferToThread(raw_http, svc.api_port, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n"
                                b"Connection: close\r\n\r\n")).split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 404 ")
    assert b"\r\ncontent-type: application/json\r\n" in head + b"\r\n"
    assert b"\r\ncache-control: no-store\r\n" in head + b"\r\n"
    status, body = await deferToThread(http, "POST", base + "/publish", b"to the root")
    assert (status, body) == (200, {"channel": "", "subscribers": 1})
    assert (await root.next_text()) == "to the root"
    status, body = await deferToThread(http, "POST", base + "/publish/123456789", b"x")
    assert status == 400 and body["error"].startswith("bad channel: ")
    status, body = await deferToThread(http, "POST", base + "/publish/news", b"x" * 100)  # exactly the limit
    assert (status, body) == (200, {"channel": "news", "subscribers": 0})
    assert svc.published["api"] == 2  # the two publishes, not the refusals
    # a body over the limit in several chunks (chunked encoding), each under it
    chunked = b"".join(b"%x\r\n%s\r\n" % (60, b"y" * 60) for _ in range(2)) + b"0\r\n\r\n"
    answer = await deferToThread(raw_http, svc.api_port, b"POST /publish/news HTTP/1.1\r\nHost: x\r\n"
                                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked)
    assert answer.startswith(b"HTTP/1.1 413 "), answer


@pytest_twisted.ensureDeferred
async def test_http_publish_outlived_by_its_client(run_service: Any, monkeypatch: Any) -> None:
    """A client that hangs up while its publish is still pending is not written to when the publish completes:
    no error is logged, and the API goes on answering."""
    import gc

    from twisted.internet import defer, task
    from twisted.internet import reactor as the_reactor
    from twisted.logger import globalLogPublisher

    svc = await run_service()
    pending: list[defer.Deferred[int]] = []

    def slow_publish(key: bytes, message: bytes) -> defer.Deferred[int]:
        d: defer.Deferred[int] = defer.Deferred()
        pending.append(d)
        return d

    monkeypatch.setattr(svc.broker, "publish", slow_publish)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        import socket

        s = socket.create_connection(("127.0.0.1", svc.api_port), timeout=5)
        s.sendall(b"POST /publish/news HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
        await wait_for(lambda: pending)
        s.close()
        await task.deferLater(the_reactor, 0.2, lambda: None)  # the server sees the hang-up
        pending[0].callback(0)
        await task.deferLater(the_reactor, 0.1, lambda: None)
        del pending[:]
        gc.collect()  # a failure nobody handled is logged when its Deferred is collected
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if e.get("log_failure") is not None or e.get("isError")], events
    monkeypatch.undo()
    status, _ = await deferToThread(http, "GET", f"http://127.0.0.1:{svc.api_port}/health")
    assert status == 200


# -- listeners ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_listener_replies_to_browser_only(redis_server: RedisServer, run_service: Any) -> None:
    """A handler's return value goes back to the sending socket only; several listeners all run."""
    test_listeners.SEEN.clear()
    svc = await run_service(redis=redis_server.url,
                            listeners=("listeners:Echo", test_listeners.Shout))
    await wait_subscribed(svc, redis_server)
    sender = await connect(svc.ws_port, "/echo")
    other = await connect(svc.ws_port, "/echo")
    sender.send_text("hello")
    replies = sorted([(await sender.next_text()), (await sender.next_text())])
    assert replies == ["HELLO", "hello"]
    sender.send_binary(b"\x00\x01")
    assert (await sender.next_message()) == (Opcode.BINARY, b"\x00\x01")
    assert no_message(other)
    kinds = {(name, src.kind, src.path) for name, _, _, src in test_listeners.SEEN if src}
    assert kinds == {("Echo", "socket", "/echo"), ("Shout", "socket", "/echo")}
    assert all(src.peer and src.peer.startswith("tcp4:127.0.0.1:") for *_, src in test_listeners.SEEN)
    lobby = await connect(svc.ws_port, "/rooms/lobby")
    lobby.send_text("hi")
    assert json.loads(await lobby.next_text()) == {"lobby": "hi"}


@pytest_twisted.ensureDeferred
async def test_listener_fires_for_redis_messages(redis_server: RedisServer, run_service: Any) -> None:
    """Handlers run for messages published on Redis too, told the source is the broker."""
    test_listeners.SEEN.clear()
    svc = await run_service(redis=redis_server.url, listeners=(test_listeners.Echo,))
    await wait_subscribed(svc, redis_server)
    watcher = await connect(svc.ws_port, "/echo")
    await deferToThread(redis_server.publish, "sock-drawer/echo", "from ruby")
    assert (await watcher.next_text()) == "from ruby"  # sockets still get it
    await wait_for(lambda: test_listeners.SEEN)
    (name, channel, message, source), = test_listeners.SEEN
    assert (name, channel, message) == ("Echo", "echo", "from ruby")
    assert source.kind == "broker" and not source.from_socket and source.peer is None
    assert no_message(watcher)  # a broker message is not "replied" to anyone


@pytest_twisted.ensureDeferred
async def test_handler_exceptions_are_logged_and_survived(run_service: Any) -> None:
    """A handler that raises or fails is logged with its traceback at error level (an application's error,
    not critical), in the namespace the docs quote; the socket and others live on."""
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        svc = await run_service(listeners=(test_listeners.Broken, test_listeners.Echo))
        client = await connect(svc.ws_port, "/echo")
        client.send_text("still here?")
        assert (await client.next_text()) == "still here?"
        broken = await connect(svc.ws_port, "/broken")
        broken.send_text("x")
        await wait_for(lambda: sum("log_failure" in e for e in events) >= 2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if "log_failure" in e]
    assert {type(e["log_failure"].value) for e in failures} == {RuntimeError, ValueError}
    assert all("Broken." in e["handler"] for e in failures)
    assert {(e["log_level"].name, e["log_namespace"]) for e in failures} == {
        ("error", "sockdrawer.listeners.ListenerRegistry")}
    client.send_text("again")
    assert (await client.next_text()) == "again"
    assert broken.ws.state.name == "OPEN"
    assert svc.running


@pytest_twisted.ensureDeferred
async def test_listener_publishes_through_broker(redis_server: RedisServer, run_service: Any) -> None:
    """A handler's self.publish() goes through Redis to every socket on the channel."""
    svc = await run_service(redis=redis_server.url, listeners=(test_listeners.Relay,))
    await wait_subscribed(svc, redis_server)
    alice = await connect(svc.ws_port, "/chat")
    bob = await connect(svc.ws_port, "/chat")
    alice.send_text("hi all")
    assert (await bob.next_text()) == "True:hi all"
    assert (await alice.next_text()) == "True:hi all"


# -- Redis outage -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_redis_restart_keeps_sockets_and_resubscribes(own_redis: RedisServer, run_service: Any) -> None:
    """When Redis is killed and restarted, sockets stay connected and get the next message published after it."""
    svc = await run_service(redis=own_redis.url, redis_retry_max=0.5)
    await wait_subscribed(svc, own_redis)
    client = await connect(svc.ws_port, "/news")
    await deferToThread(own_redis.publish, "sock-drawer/news", "before")
    assert (await client.next_text()) == "before"
    own_redis.stop()
    await wait_for(lambda: not svc.broker.is_connected())
    own_redis.start(port=own_redis.port)
    await wait_subscribed(svc, own_redis)
    assert client.ws.state.name == "OPEN"
    await deferToThread(own_redis.publish, "sock-drawer/news", "after")
    assert (await client.next_text()) == "after"
    assert svc.factory.sockets(b"news") == 1


@pytest_twisted.ensureDeferred
async def test_publish_while_redis_down_fails_clearly(own_redis: RedisServer, run_service: Any) -> None:
    """With Redis down, POST /publish answers 503 (not a hang) and the service keeps running."""
    svc = await run_service(redis=own_redis.url, redis_timeout=1, redis_retry_max=0.5)
    await wait_subscribed(svc, own_redis)
    own_redis.stop()
    await wait_for(lambda: not svc.broker.is_connected())
    status, body = await deferToThread(http, "POST", f"http://127.0.0.1:{svc.api_port}/publish/news", b"x")
    assert status == 503 and body == {"error": "broker unavailable", "broker": svc.broker.description}
    status, body = await deferToThread(http, "GET", f"http://127.0.0.1:{svc.api_port}/health")
    assert status == 200 and body["broker_connected"] is False  # liveness: the process still runs
    status, body = await deferToThread(http, "GET", f"http://127.0.0.1:{svc.api_port}/ready")
    assert status == 503 and body["reason"] == "broker down"


@pytest_twisted.ensureDeferred
async def test_redis_password(run_service: Any) -> None:
    """With a password in the URL, the link AUTHs and subscribes; a wrong one keeps retrying without crashing."""
    server = RedisServer()
    server.start()
    try:
        with server.client() as r:
            r.config_set("requirepass", "pw")
        svc = await run_service(redis=f"redis://:pw@127.0.0.1:{server.port}/0")
        await wait_for(lambda: svc.broker.is_connected())
        client = await connect(svc.ws_port, "/secure")
        pub = Client(f"redis://:pw@127.0.0.1:{server.port}/0")
        await deferToThread(pub.pub, "authed", "secure")
        assert (await client.next_text()) == "authed"
        from twisted.logger import globalLogPublisher

        auth_errors: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "AUTH refused" in str(event.get("reason", "")):
                auth_errors.append(event)

        globalLogPublisher.addObserver(observe)
        try:
            bad = await run_service(redis=f"redis://:nope@127.0.0.1:{server.port}/0", redis_retry_max=0.2)
            await wait_for(lambda: len(auth_errors) >= 3)  # it keeps retrying
        finally:
            globalLogPublisher.removeObserver(observe)
        assert not bad.broker.is_connected() and bad.running
        assert "nope" not in str(auth_errors[0])
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_listener_publish_keeps_order(run_service: Any) -> None:
    """On the embedded broker, a message a listener publishes while handling one reaches sockets after it."""
    from sockdrawer import Subscriber, on

    class Follow(Subscriber):
        @on("news")
        def follow(self, message: Any, source: Any) -> None:
            if not source.from_socket and message == "first":
                self.publish("second", "news")

    svc = await run_service(listeners=(Follow,))
    client = await connect(svc.ws_port, "/news")
    await svc.publish("first", "news")
    assert [await client.next_text(), await client.next_text()] == ["first", "second"]
