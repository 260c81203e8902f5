"""
The Pusher Channels protocol beside sockdrawer.v1, tried with the real
libraries, unchanged: ``pusher-js`` (its Node build) for connections, and the
``pusher`` server library for Python for channel auths and the HTTP API,
against a ``twistd sockdrawer`` node with ``--pusher-*``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pusher
import pytest
from childnode import ChildNode
from conftest import RedisServer
from test_clients import chromium, serve  # noqa: F401  (fixtures)
from test_production import scrape

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = ROOT / "tests" / "clients"
APP_ID, KEY, SECRET = "4242", "sd-key", "sd-secret"


class AuthApp:
    """The app's channel-auth endpoint, signing with the pusher library as a Pusher app's backend does."""

    def __init__(self, server: pusher.Pusher) -> None:
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("content-length", 0))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                client = form.get("client", ["?"])[0]
                if self.path.endswith("/user-auth"):
                    self.answer(server.authenticate_user(form["socket_id"][0], {"id": f"user-{client[0]}"}))
                    return
                channel, socket_id = form["channel_name"][0], form["socket_id"][0]
                app.asked.append((client, channel))
                if channel == "private-forbidden":
                    self.send_response(403)
                    self.send_header("access-control-allow-origin", "*")
                    self.end_headers()
                    return
                # "b" and "b2" are two connections of one user
                custom = ({"user_id": f"user-{client[0]}", "user_info": {"name": client[0]}}
                          if channel.startswith("presence-") else None)
                self.answer(server.authenticate(channel, socket_id, custom))

            def answer(self, value: Any) -> None:
                body = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("access-control-allow-origin", "*")  # a page on another port asks
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.asked: list[tuple[str, str]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/pusher/auth"


class PusherJs:
    """tests/clients/pusher_client.js: pusher-js connections driven by JSON lines."""

    def __init__(self, port: int, auth_url: str) -> None:
        node = shutil.which("node")
        if node is None:
            pytest.fail("node is missing: run `bash .ci/setup` (installs nodejs and the Node test clients)",
                        pytrace=False)
        self.proc = subprocess.Popen([node, str(CLIENTS / "pusher_client.js"), str(port), KEY, auth_url],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=CLIENTS)
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(lambda line: line.get("ready"))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def expect(self, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
        """The first line (seen already, or to come) that ``predicate`` accepts."""
        for line in self.seen:
            if predicate(line):
                self.seen.remove(line)
                return line
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no such line from pusher-js; seen: {self.seen[-20:]}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if predicate(line):
                return line
            self.seen.append(line)

    def none(self, predicate: Any, wait: float = 0.5) -> None:
        """No line that ``predicate`` accepts arrives (checked after a marker event, see the callers)."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                self.seen.append(self.lines.get(timeout=0.05))
            except queue.Empty:
                pass
        assert not [line for line in self.seen if predicate(line)], self.seen

    def connect(self, cid: str, port: int | None = None) -> str:
        self.send(op="connect", id=cid, port=port)
        return str(self.expect(lambda line: line.get("id") == cid and "connected" in line)["connected"])

    def subscribe(self, cid: str, channel: str) -> dict[str, Any]:
        self.send(op="subscribe", id=cid, channel=channel)
        return self.expect(lambda line: line.get("id") == cid and (line.get("subscribed") == channel or (
            line.get("channel") == channel and "subscription_error" in line)))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def pusher_node(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[ChildNode, pusher.Pusher, AuthApp]]:
    secret = tmp_path / "pusher.secret"
    secret.write_text(SECRET + "\n")
    name = f"pusher{os.getpid()}{time.monotonic_ns() % 10**6}"
    node = ChildNode(tmp_path, ["--redis", redis_server.url, "--name", name, "--pusher-app-id", APP_ID,
                                "--pusher-key", KEY, "--pusher-secret-file", str(secret)])
    node.start()
    assert node.api_port is not None
    server = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1", port=node.api_port, ssl=False)
    try:
        yield node, server, AuthApp(server)
    finally:
        node.stop()


def test_pusher_js_public_channel_gets_sockdrawer_messages_and_triggered_events(
        pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp]) -> None:
    """pusher-js connects with its defaults for a self-hosted server (wsHost, wsPort, forceTLS off), gets a
    socket id, subscribes to a public channel; a message published by sockdrawer arrives as the event
    "message", an event triggered by the pusher library arrives with its name and data (and raw sockets on
    the channel get its data alone)."""
    from websockets.sync.client import connect

    node, server, auth = pusher_node
    js = PusherJs(node.ws_port, auth.url)
    try:
        socket_id = js.connect("a")
        assert socket_id.count(".") == 1
        assert js.subscribe("a", "news") == {"id": "a", "subscribed": "news", "members": None, "me": None}
        with connect(f"ws://127.0.0.1:{node.ws_port}/news") as raw:
            node.publish("news", "hello")
            assert js.expect(lambda line: line.get("event") == "message")["data"] == "hello"
            assert raw.recv(timeout=10) == "hello"
            server.trigger("news", "greet", {"text": "hi"})
            line = js.expect(lambda line: line.get("event") == "greet")
            assert line == {"id": "a", "channel": "news", "event": "greet", "data": {"text": "hi"}}
            assert json.loads(raw.recv(timeout=10)) == {"text": "hi"}
    finally:
        js.close()


def test_private_channels_and_client_events(pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp]) -> None:
    """A private channel is joined with the auth the app's endpoint signs with the pusher library; a refused
    auth (403 from the endpoint) is a subscription error; a client event reaches the other client and not
    the sender; a client event on a public channel is refused; the trigger's socket_id is excluded."""
    node, server, auth = pusher_node
    js = PusherJs(node.ws_port, auth.url)
    try:
        a, b = js.connect("a"), js.connect("b")
        assert js.subscribe("a", "private-room")["subscribed"] == "private-room"
        assert js.subscribe("b", "private-room")["subscribed"] == "private-room"
        assert ("a", "private-room") in auth.asked
        refused = js.subscribe("a", "private-forbidden")
        assert refused["subscription_error"]["status"] == 403
        js.send(op="trigger", id="a", channel="private-room", event="client-typing", data={"who": "a"})
        got = js.expect(lambda line: line.get("event") == "client-typing")
        assert got["id"] == "b" and got["data"] == {"who": "a"}
        server.trigger("private-room", "notice", "for b only", socket_id=a)
        assert js.expect(lambda line: line.get("event") == "notice")["id"] == "b"
        server.trigger("private-room", "marker", "end")
        js.expect(lambda line: line.get("event") == "marker" and line["id"] == "a")
        js.expect(lambda line: line.get("event") == "marker" and line["id"] == "b")
        js.none(lambda line: line.get("id") == "a" and line.get("event") in ("client-typing", "notice"))
        assert b != a
    finally:
        js.close()


def test_the_http_api_with_the_pusher_library(pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp]) -> None:
    """channels_info, channel_info and trigger_batch from the pusher library; a request signed with another
    secret gets 401; /metrics counts Pusher connections and API requests by outcome."""
    node, server, auth = pusher_node
    js = PusherJs(node.ws_port, auth.url)
    try:
        js.connect("a")
        js.subscribe("a", "private-room")
        js.subscribe("a", "news")
        deadline = time.monotonic() + 10
        while "private-room" not in server.channels_info()["channels"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert set(server.channels_info(prefix_filter="private-")["channels"]) == {"private-room"}
        info = server.channel_info("news", ["subscription_count"])
        assert info == {"occupied": True, "subscription_count": 1}
        assert server.channel_info("empty") == {"occupied": False}
        server.trigger_batch([{"channel": "news", "name": "one", "data": "1"},
                              {"channel": "private-room", "name": "two", "data": "2"}])
        js.expect(lambda line: line.get("event") == "one")
        js.expect(lambda line: line.get("event") == "two")
        forged = pusher.Pusher(app_id=APP_ID, key=KEY, secret="wrong", host="127.0.0.1", port=node.api_port,
                               ssl=False)
        with pytest.raises(pusher.errors.PusherBadAuth):
            forged.trigger("news", "x", "y")
        metrics = scrape(node.api_port)
        assert metrics["sockdrawer_pusher_connections"] == 1
        assert metrics["sockdrawer_pusher_api_requests_total{outcome=401}"] == 1
        assert metrics["sockdrawer_pusher_api_requests_total{outcome=ok}"] >= 4
    finally:
        js.close()


def test_presence_channels_across_two_nodes(pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp],
                                            tmp_path: Path, redis_server: RedisServer) -> None:
    """Presence on two nodes: each subscriber gets the members (itself with them, its user as "me"), the
    others member_added once per user (a second connection of a user adds no member and its leaving removes
    none), member_removed when a user's last connection goes; the pusher library's users_info and
    channel_info(user_count) count users."""
    node, server, auth = pusher_node
    other = ChildNode(tmp_path / "second", node.args)
    (tmp_path / "second").mkdir()
    other.start()
    js = PusherJs(node.ws_port, auth.url)
    try:
        js.connect("a")
        js.connect("b", port=other.ws_port)
        js.connect("b2", port=other.ws_port)
        first = js.subscribe("a", "presence-room")
        assert first["members"] == ["user-a"] and first["me"] == "user-a"
        second = js.subscribe("b", "presence-room")
        assert second["members"] == ["user-a", "user-b"] and second["me"] == "user-b"
        added = js.expect(lambda line: line.get("id") == "a" and "member_added" in line)
        assert added == {"id": "a", "channel": "presence-room", "member_added": "user-b", "info": {"name": "b"}}
        assert js.subscribe("b2", "presence-room")["members"] == ["user-a", "user-b"]
        users = server.users_info("presence-room")["users"]
        assert sorted(u["id"] for u in users) == ["user-a", "user-b"]
        assert server.channel_info("presence-room", ["user_count"])["user_count"] == 2
        js.send(op="disconnect", id="b2")
        server.trigger("presence-room", "marker", "1")
        js.expect(lambda line: line.get("id") == "a" and line.get("event") == "marker")
        js.none(lambda line: line.get("id") == "a" and ("member_removed" in line or "member_added" in line))
        js.send(op="disconnect", id="b")
        removed = js.expect(lambda line: line.get("id") == "a" and "member_removed" in line)
        assert removed["member_removed"] == "user-b"
    finally:
        js.close()
        other.stop()


def test_terminate_connections_of_a_signed_in_user(pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp]) -> None:
    """pusher-js signs in (the app's user-auth endpoint signs with the pusher library); the library's
    send_to_user reaches it; terminate_user_connections closes that user's connections (and only theirs)."""
    node, server, auth = pusher_node
    js = PusherJs(node.ws_port, auth.url)
    try:
        js.connect("a")
        js.connect("b")
        js.send(op="signin", id="a")
        assert js.expect(lambda line: "signed_in" in line) == {"id": "a", "signed_in": "user-a"}
        deadline = time.monotonic() + 10
        while True:  # pusher-js subscribes to the user's own channel after the sign-in
            server.send_to_user("user-a", "note", {"n": 1})
            try:
                line = js.expect(lambda line: line.get("event") == "note", timeout=0.5)
                break
            except AssertionError:
                assert time.monotonic() < deadline
        assert line["id"] == "a" and line["data"] == {"n": 1}
        server.terminate_user_connections("user-a")
        js.expect(lambda line: line.get("id") == "a" and line.get("state") in ("disconnected", "failed",
                                                                                 "unavailable"))
        js.subscribe("b", "news")
        node.publish("news", "still here")
        assert js.expect(lambda line: line.get("event") == "message")["id"] == "b"
    finally:
        js.close()


def test_bad_input_gets_pushers_error_codes(pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp]) -> None:
    """With the websockets client: an unknown app key gets pusher:error 4001 and a close with 4001, a
    missing protocol 4008; a frame that is not JSON gets a pusher:error and the socket stays (ping still
    pongs); channel_data over 2 KiB, an auth signed for another socket id, and a client event on a public
    channel are refused; an API request signed 700 s ago gets 401; another socket is unaffected."""
    import hashlib
    import hmac
    import urllib.error
    import urllib.request

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    node, server, auth = pusher_node
    base = f"ws://127.0.0.1:{node.ws_port}/app/"

    def closed_with(url: str) -> tuple[dict[str, Any], int | None]:
        with connect(url) as ws:
            error = json.loads(ws.recv(timeout=10))
            with pytest.raises(ConnectionClosed) as e:
                ws.recv(timeout=10)
            return error, e.value.rcvd.code if e.value.rcvd else None

    error, code = closed_with(base + "nope?protocol=7")
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4001 and code == 4001
    error, code = closed_with(base + KEY)
    assert error["data"]["code"] == 4008 and code == 4008

    def sign(text: str) -> str:
        return KEY + ":" + hmac.new(SECRET.encode(), text.encode(), hashlib.sha256).hexdigest()

    with connect(base + KEY + "?protocol=7&client=py") as ws, connect(base + KEY + "?protocol=7") as bystander:
        established = json.loads(ws.recv(timeout=10))
        socket_id = json.loads(established["data"])["socket_id"]
        json.loads(bystander.recv(timeout=10))
        bystander.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "news"}}))
        assert json.loads(bystander.recv(timeout=10))["event"] == "pusher_internal:subscription_succeeded"
        ws.send("{not json")
        assert json.loads(ws.recv(timeout=10))["event"] == "pusher:error"
        ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
        assert json.loads(ws.recv(timeout=10)) == {"event": "pusher:pong", "data": {}}
        big = json.dumps({"user_id": "u", "user_info": {"x": "y" * 3000}})
        ws.send(json.dumps({"event": "pusher:subscribe", "data": {
            "channel": "presence-big", "channel_data": big, "auth": sign(f"{socket_id}:presence-big:{big}")}}))
        answer = json.loads(ws.recv(timeout=10))
        assert answer["event"] == "pusher:subscription_error" and answer["data"]["status"] == 413
        ws.send(json.dumps({"event": "pusher:subscribe", "data": {
            "channel": "private-x", "auth": sign("1234.5678:private-x")}}))  # signed for another socket
        answer = json.loads(ws.recv(timeout=10))
        assert answer["event"] == "pusher:subscription_error" and answer["data"]["status"] == 401
        ws.send(json.dumps({"event": "client-hi", "channel": "news", "data": {}}))
        assert json.loads(ws.recv(timeout=10))["event"] == "pusher:error"
        node.publish("news", "fine")
        assert json.loads(bystander.recv(timeout=10))["data"] == "fine"

    body = json.dumps({"name": "x", "data": "y", "channels": ["news"]}).encode()
    params = {"auth_key": KEY, "auth_timestamp": str(int(time.time()) - 700), "auth_version": "1.0",
              "body_md5": hashlib.md5(body).hexdigest()}
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    path = f"/apps/{APP_ID}/events"
    signature = hmac.new(SECRET.encode(), f"POST\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(f"http://127.0.0.1:{node.api_port}{path}?{query}&auth_signature={signature}",
                                     data=body, method="POST", headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 401 and b"auth_timestamp" in refused.value.read()


def node_library(node: ChildNode, call: str, secret: str = SECRET, **args: Any) -> dict[str, Any]:
    """One call of the pusher server library for Node (tests/clients/pusher_server.js)."""
    out = subprocess.run(["node", str(CLIENTS / "pusher_server.js"), str(node.api_port), APP_ID, KEY, secret, call,
                          json.dumps(args)], capture_output=True, text=True, timeout=30, cwd=CLIENTS, check=True)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_node_server_library(pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp]) -> None:
    """The pusher library for Node: trigger (with socket_id excluded), triggerBatch, GET channels, a channel's
    info and a presence channel's users, terminateUserConnections; a wrong secret gets 401."""
    node, server, auth = pusher_node
    js = PusherJs(node.ws_port, auth.url)
    try:
        a = js.connect("a")
        js.connect("b")
        js.subscribe("a", "news")
        js.subscribe("b", "news")
        assert js.subscribe("a", "presence-lobby")["members"] == ["user-a"]
        assert node_library(node, "trigger", channels=["news"], event="hello", data={"x": 1},
                            params={"socket_id": a}) == {"status": 200, "body": {}}
        assert js.expect(lambda line: line.get("event") == "hello") == {
            "id": "b", "channel": "news", "event": "hello", "data": {"x": 1}}
        batch = node_library(node, "triggerBatch", batch=[{"channel": "news", "name": "b1", "data": "1"}])
        assert batch["status"] == 200
        js.expect(lambda line: line.get("event") == "b1" and line["id"] == "a")
        channels = node_library(node, "channels", params={"filter_by_prefix": "presence-", "info": "user_count"})
        assert channels["body"] == {"channels": {"presence-lobby": {"user_count": 1}}}
        info = node_library(node, "channel", channel="news", params={"info": "subscription_count"})
        assert info["body"] == {"occupied": True, "subscription_count": 2}
        assert node_library(node, "users", channel="presence-lobby")["body"] == {"users": [{"id": "user-a"}]}
        js.send(op="signin", id="b")
        js.expect(lambda line: line.get("signed_in") == "user-b")
        assert node_library(node, "terminate", user="user-b")["status"] == 200
        js.expect(lambda line: line.get("id") == "b" and line.get("state") in ("disconnected", "failed",
                                                                                 "unavailable"))
        assert node_library(node, "trigger", secret="wrong", channels=["news"], event="x", data="y")["status"] == 401
    finally:
        js.close()


BROWSER_PAGE = """<!doctype html>
<script src="pusher.min.js"></script>
<script src="echo.iife.js"></script>
<script>
window.seen = [];
// a self-hosted server's settings, as the migration page gives them
var settings = {cluster: "mt1", wsHost: "127.0.0.1", wsPort: %(port)d, forceTLS: false,
                enabledTransports: ["ws"], disableStats: true};
var pusher = new Pusher("%(key)s", Object.assign({channelAuthorization: {endpoint: "%(auth)s"}}, settings));
pusher.connection.bind("connected", function () { seen.push(["connected", pusher.connection.socket_id]); });
pusher.subscribe("news").bind("message", function (data) { seen.push(["pusher-js", data]); });
window.Pusher = Pusher;
var echo = new Echo.default(Object.assign({broadcaster: "pusher", key: "%(key)s", authEndpoint: "%(auth)s"},
                                          settings));
echo.channel("orders").listen(".shipped", function (e) { seen.push(["echo", e]); });
echo.private("room").listen(".said", function (e) { seen.push(["echo-private", e]); })
  .subscribed(function () { seen.push(["echo-subscribed", "private-room"]); });
</script>
"""


def test_pusher_js_and_laravel_echo_in_chromium(pusher_node: tuple[ChildNode, pusher.Pusher, AuthApp],
                                                tmp_path: Path, chromium: Any, serve: Any) -> None:  # noqa: F811
    """pusher-js's browser build and Laravel Echo's Pusher connector (both unchanged) in headless Chromium:
    pusher-js gets a sockdrawer message as "message"; Echo listens to an event the pusher library triggers
    on a public channel and on a private one it authorised through the app's endpoint."""
    node, server, auth = pusher_node
    site = tmp_path / "site"
    site.mkdir()
    shutil.copy(CLIENTS / "node_modules" / "pusher-js" / "dist" / "web" / "pusher.min.js", site)
    shutil.copy(CLIENTS / "node_modules" / "laravel-echo" / "dist" / "echo.iife.js", site)
    (site / "index.html").write_text(BROWSER_PAGE % {"port": node.ws_port, "key": KEY, "auth": auth.url})

    def seen(kind: str) -> list[Any]:
        deadline = time.monotonic() + 15
        while True:
            got = [entry for entry in chromium.execute_script("return window.seen || []") if entry[0] == kind]
            if got:
                return got
            assert time.monotonic() < deadline, chromium.execute_script("return window.seen")
            time.sleep(0.05)

    chromium.get(serve(site) + "/index.html")
    seen("connected")
    seen("echo-subscribed")
    deadline = time.monotonic() + 10
    while "orders" not in server.channels_info()["channels"]:  # Echo's public subscription reached the node
        assert time.monotonic() < deadline
        time.sleep(0.05)
    node.publish("news", "from sockdrawer")
    assert seen("pusher-js") == [["pusher-js", "from sockdrawer"]]
    server.trigger("orders", "shipped", {"order": 7})
    assert seen("echo") == [["echo", {"order": 7}]]
    server.trigger("private-room", "said", {"text": "hi"})
    assert seen("echo-private") == [["echo-private", {"text": "hi"}]]


def test_pushers_webhooks(tmp_path: Path, redis_server: RedisServer) -> None:
    """--pusher-webhook: the receiver validates each request with the pusher library's validate_webhook
    (X-Pusher-Key, X-Pusher-Signature) and gets channel_occupied, member_added, client_event (with the
    sender's socket_id and user_id), member_removed once per user, and channel_vacated."""
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    invalid: list[bytes] = []
    checker = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET)

    class Hooks(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            body = self.rfile.read(int(self.headers["content-length"]))
            valid = checker.validate_webhook(self.headers.get("x-pusher-key"),
                                             self.headers.get("x-pusher-signature"), body.decode())
            if valid is None:
                invalid.append(body)
            else:
                for event in valid["events"]:
                    events.put(event)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    secret = tmp_path / "pusher.secret"
    secret.write_text(SECRET)
    node = ChildNode(tmp_path, ["--redis", redis_server.url, "--name", f"hooks{os.getpid()}",
                                "--pusher-app-id", APP_ID, "--pusher-key", KEY, "--pusher-secret-file", str(secret),
                                "--pusher-webhook", f"http://127.0.0.1:{receiver.server_address[1]}/pusher"])
    node.start()
    server = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1", port=node.api_port, ssl=False)
    auth = AuthApp(server)
    js = PusherJs(node.ws_port, auth.url)
    got: list[dict[str, Any]] = []

    def wait(name: str, **fields: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 15
        while True:
            for event in got:
                if event["name"] == name and all(event.get(k) == v for k, v in fields.items()):
                    return event
            try:
                got.append(events.get(timeout=max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"no {name} webhook; got {got}") from None

    try:
        a = js.connect("a")
        js.connect("b")
        js.subscribe("a", "presence-room")
        wait("channel_occupied", channel="presence-room")
        wait("member_added", channel="presence-room", user_id="user-a")
        js.subscribe("b", "presence-room")
        wait("member_added", channel="presence-room", user_id="user-b")
        js.send(op="trigger", id="a", channel="presence-room", event="client-wave", data={"hi": 1})
        event = wait("client_event", channel="presence-room")
        assert event["event"] == "client-wave" and event["socket_id"] == a and event["user_id"] == "user-a"
        assert json.loads(event["data"]) == {"hi": 1}
        js.send(op="disconnect", id="a")
        wait("member_removed", channel="presence-room", user_id="user-a")
        js.send(op="disconnect", id="b")
        wait("channel_vacated", channel="presence-room")
        assert not invalid
        assert [e["name"] for e in got].count("channel_occupied") == 1
    finally:
        js.close()
        node.stop()
        receiver.shutdown()
