"""
One client cannot hurt the others: each attack an honest bystander must not
feel, reproduced at a small scale against a real node with real clients (the
``websockets`` library's protocol): the attacker's frames get their documented
answer, the node logs no traceback for them, and a bystander socket on the
same node keeps getting its messages.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from test_v1 import subscribe, v1
from twisted.logger import globalLogPublisher
from wsclient import connect


class LogWatch:
    """Collects the node's log events while a test runs (tracebacks: events with a failure)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_failure") is not None or e.get("isError")]

    def __enter__(self) -> LogWatch:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


BAD_FRAMES = [
    ("[" * 5_000 + "]" * 5_000, "not JSON"),  # RecursionError inside json.loads
    ('{"op": "subscribe", "channel": "\\ud800"}', "a string is not Unicode (a lone surrogate escape)"),
    ('{"op": "send", "channel": "news", "id": "\\ud800", "data": 1}',
     "a string is not Unicode (a lone surrogate escape)"),
    ('{"op": "send", "channel": "news", "id": NaN, "data": 1}', "not JSON"),
    ('{"op": "send", "channel": "news", "id": Infinity, "data": 1}', "not JSON"),
    ('{"op": "send", "channel": "news", "id": "' + "x" * 129 + '", "data": 1}',
     "id must be a string of at most 128 characters or a number"),
]


@pytest_twisted.ensureDeferred
async def test_frames_that_used_to_raise_get_an_error_and_nothing_else(run_service: Any) -> None:
    """Deeply nested JSON, a lone surrogate in a channel or an id, NaN or Infinity as an id, an overlong id:
    each gets a v1 error 400 on a socket that stays open, the node logs no traceback, and a bystander on the
    same node keeps getting its messages."""
    svc = await run_service()
    bystander = await connect(svc.ws_port, "/news")
    attacker = await v1(svc)
    with LogWatch() as log:
        for frame, reason in BAD_FRAMES:
            attacker.send_text(frame)
            reply = await attacker.next_json()
            assert (reply["op"], reply["status"], reply["reason"]) == ("error", 400, reason), frame[:80]
        assert (await subscribe(attacker, "news"))["op"] == "subscribed"  # still open, still served
        await svc.publish("still here", "news")
        assert await bystander.next_text() == "still here"
        assert (await attacker.next_json())["data"] == "still here"
    assert log.failures == []
    assert svc.factory.frame_failures == 0


@pytest.mark.parametrize("since", ["\u00b2", "9" * 5000, "1:\u00b2", "1:" + "9" * 5000])
@pytest_twisted.ensureDeferred
async def test_a_malformed_since_is_a_reset_not_a_503(run_service: Any, since: str) -> None:
    """A since that is not an offset (a Unicode digit, 5,000 digits) is answered like any forged offset:
    reset, then subscribed with the channel's position; no warning, and the subscription lives."""
    svc = await run_service(history_size=10)
    client = await v1(svc)
    with LogWatch() as log:
        assert (await subscribe(client, "news", since=since))["op"] == "reset"
        subscribed = await client.next_json()
        assert subscribed["op"] == "subscribed" and subscribed["offset"]
        await svc.publish("live", "news")
        assert (await client.next_json())["data"] == "live"
    assert not [e for e in log.events if e.get("log_level") is not None and e["log_level"].name in ("warn", "error")]


def test_a_frame_that_raises_closes_only_its_socket_with_1011() -> None:
    """The safety net: should a v1 frame raise out of the session anyway, its socket is failed with 1011 and
    the traceback is logged once a minute at most (a client cannot flood the log)."""
    from twisted.internet.task import Clock

    from sockdrawer.transports.websocket.protocol import SockDrawerServerProtocol

    failed: list[tuple[int, str]] = []

    class Session:
        def received(self, payload: bytes, binary: bool) -> None:
            raise RuntimeError("boom")

    class Factory:
        clock = Clock()
        last_frame_failure_logged = float("-inf")
        frame_failures = 0

    proto = SockDrawerServerProtocol.__new__(SockDrawerServerProtocol)
    proto.factory = Factory()  # type: ignore[assignment]
    proto._session = Session()  # type: ignore[assignment]
    proto._fail_connection = lambda code, reason: failed.append((code, reason))  # type: ignore[method-assign]
    with LogWatch() as log:
        proto.onMessage(b"{}", False)
        proto.onMessage(b"{}", False)
        Factory.clock.advance(61)
        proto.onMessage(b"{}", False)
    assert failed == [(1011, "internal error")] * 3
    assert len(log.failures) == 2
    assert proto.factory.frame_failures == 3


def test_memory_history_reads_in_pages() -> None:
    """The embedded history answers a resume one page at a time: at most PAGE_MESSAGES messages, ending once
    PAGE_BYTES of payload are reached, with more set while messages follow."""
    from sockdrawer.core.history import PAGE_BYTES, MemoryHistory

    history = MemoryHistory(1000, 300)
    start = history.replay(b"c", None).latest
    assert start is not None
    offsets = [history.append(b"c", b"%d" % i) for i in range(250)]
    pages, since = [], start
    while True:
        page = history.replay(b"c", since)
        pages.append(page)
        if not page.more:
            break
        since = page.messages[-1][0]
    assert [len(p.messages) for p in pages] == [100, 100, 50]
    assert [o for p in pages for o, _ in p.messages] == offsets
    big = MemoryHistory(10, 300)
    start = big.replay(b"b", None).latest
    for _ in range(3):
        big.append(b"b", b"x" * (PAGE_BYTES // 2))
    first = big.replay(b"b", start)
    assert len(first.messages) == 2 and first.more


@pytest_twisted.ensureDeferred
async def test_a_replay_flood_is_read_in_pages_one_at_a_time_per_socket(own_redis: Any, run_service: Any) -> None:
    """Ten sockets that subscribe from the oldest offset of a 1,000 x 4 KiB history and unsubscribe at once,
    over and over, cannot take Redis away from the others: Redis reads pages (its peak memory stays far below
    one whole history per socket), the node's link is never aborted, every one of a bystander's API publishes
    succeeds and its socket gets them all; a socket that waits for its replay gets all 999, in order."""
    import urllib.request

    from conftest import wait_subscribed
    from twisted.internet.threads import deferToThread

    svc = await run_service(redis=own_redis.url, history_size=1000, max_frames_per_second=1000, frame_burst=1000)
    await wait_subscribed(svc, own_redis)
    watcher = await v1(svc)
    await subscribe(watcher, "big")
    body = b"x" * 4096
    for _ in range(1000):
        await svc.publish(body, "big")
    start = (await watcher.next_json())["offset"]  # the oldest message: what follows is 999 x 4 KiB
    for _ in range(999):
        await watcher.next_json()
    with own_redis.client() as r:
        r.config_resetstat()
        baseline = int(r.info("memory")["used_memory"])
    attackers = [await v1(svc) for _ in range(10)]
    bystander = await connect(svc.ws_port, "/news")

    def publish_bystander() -> list[int]:
        statuses = []
        for i in range(50):
            request = urllib.request.Request(f"http://127.0.0.1:{svc.api_port}/publish/news", data=b"b%d" % i,
                                             method="POST")
            with urllib.request.urlopen(request, timeout=10) as response:
                statuses.append(response.status)
        return statuses

    publishing = deferToThread(publish_bystander)
    for _ in range(20):
        for a in attackers:
            a.send_json({"op": "subscribe", "channel": "big", "since": start})
            a.send_json({"op": "unsubscribe", "channel": "big"})
        await wait_for_turn()
    assert await publishing == [200] * 50
    assert [await bystander.next_text() for _ in range(50)] == [f"b{i}" for i in range(50)]
    patient = await v1(svc)
    assert (await subscribe(patient, "big", since=start))["op"] == "subscribed"
    replayed = [await patient.next_json() for _ in range(999)]
    assert [m["op"] for m in replayed] == ["message"] * 999 and patient.pending() == 0
    with own_redis.client() as r:
        peak = int(r.info("memory")["used_memory_peak"])
        evals = sum(int(v["calls"]) for k, v in r.info("commandstats").items() if k in ("cmdstat_eval",
                                                                                         "cmdstat_evalsha"))
    assert peak - baseline < 32 * 1024 * 1024, (peak, baseline)
    assert evals >= 10  # the patient replay alone is ten pages
    assert svc.broker.reconnects == 0


async def wait_for_turn() -> None:
    """Let the reactor run once (the attack's frames go out between bursts)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_one_address_cannot_hold_the_handshake_pool(run_service: Any) -> None:
    """One address that opens silent TCP connections (never a handshake) fills only its own share of the
    pending-handshake pool: the connections over its share are dropped at once, and a client from another
    address (Python websockets, its defaults) still connects and gets a message."""
    import socket

    from conftest import wait_for
    from twisted.internet.threads import deferToThread
    from websockets.sync.client import connect as ws_connect

    svc = await run_service(max_pending_handshakes=20, max_pending_handshakes_per_ip=5)
    silent = []
    for _ in range(30):
        s = socket.create_connection(("127.0.0.1", svc.ws_port))
        silent.append(s)
    try:
        # a refused connection leaves the pool when it is closed, a reactor turn or more after its 503
        await wait_for(lambda: svc.factory.refusals.get(503, 0) >= 25 and svc.factory.pending <= 5)
        assert svc.factory.refusals.get(503, 0) == 25
        assert svc.factory.pending == 5
        assert svc.factory.pending_per_ip == {"127.0.0.1": 5}

        def bystander() -> str:
            with ws_connect(f"ws://127.0.0.1:{svc.ws_port}/news", source_address=("127.0.0.2", 0)) as ws:
                svc_publish()
                return str(ws.recv(timeout=10))

        def svc_publish() -> None:
            from twisted.internet import reactor

            reactor.callFromThread(lambda: wait_for(lambda: svc.hub.subscribers(b"news") >= 1).addCallback(
                lambda _: svc.publish("in", "news")))

        assert await deferToThread(bystander) == "in"
    finally:
        for s in silent:
            s.close()
    await wait_for(lambda: svc.factory.pending == 0 and not svc.factory.pending_per_ip)


@pytest.mark.parametrize("line", [
    b"GET /news?token=%(token)s&name=John Doe HTTP/1.1",
    b"GET /news?name=John Doe&token=%(token)s HTTP/1.1",
    b"GET /news?token=%(token)s  HTTP/1.1",
])
@pytest_twisted.ensureDeferred
async def test_a_token_in_a_malformed_request_line_is_never_logged(run_service: Any, tmp_path: Any,
                                                                   line: bytes) -> None:
    """A request line that does not split into method, target and version (an unencoded space) is refused,
    and its token (signature included) appears in no log event, as docs/security.rst promises."""
    from twisted.internet import protocol, reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

    from sockdrawer import make_token

    secret = tmp_path / "secret"
    secret.write_text("s3cret-s3cret-s3cret-s3cret-s3cret!")
    svc = await run_service(auth_secret_file=(str(secret),))
    token = make_token("s3cret-s3cret-s3cret-s3cret-s3cret!", channels=["news"], ttl=60)
    closed: Deferred[bytes] = Deferred()

    class Raw(protocol.Protocol):
        received = b""

        def connectionMade(self) -> None:
            self.transport.write(line % {b"token": token.encode()} + b"\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                                 b"Sec-WebSocket-Version: 13\r\n\r\n")

        def dataReceived(self, data: bytes) -> None:
            self.received += data

        def connectionLost(self, reason: Any = None) -> None:
            closed.callback(self.received)

    with LogWatch() as log:
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", svc.ws_port), Raw())
        answer = await closed
    assert answer.startswith(b"HTTP/1.1 4"), answer
    signature = token.rsplit(".", 1)[1]
    from twisted.logger import formatEvent

    for event in log.events:
        assert signature not in formatEvent(event) and signature not in repr(event), event


@pytest_twisted.ensureDeferred
async def test_presence_churn_costs_the_room_little(run_service: Any) -> None:
    """A socket that subscribes and unsubscribes with presence as fast as its frame budget lets it, in a room
    of 30 members: its joins beyond the presence budget get error 429, each member gets at most one event of
    it per presence period (its joins and leaves coalesce), and a bystander's messages still arrive."""
    import time

    from conftest import wait_for
    from test_presence import subscribe_with_presence

    from sockdrawer.core.v1 import PRESENCE_PERIOD

    svc = await run_service()
    members = [await v1(svc) for _ in range(30)]
    for m in members:
        await subscribe_with_presence(m, "room")
    for m in members:  # the joins of the others, coming in
        while m.pending():
            await m.next_json()
    churner = await v1(svc)
    started = time.monotonic()
    for _ in range(40):
        churner.send_json({"op": "subscribe", "channel": "room", "presence": True})
        churner.send_json({"op": "unsubscribe", "channel": "room"})
    answers = []
    while len([a for a in answers if a["op"] in ("subscribed", "error")]) < 40:
        answers.append(await churner.next_json())
    refused = [a for a in answers if a["op"] == "error"]
    assert refused and all(a["status"] == 429 for a in refused)
    assert len([a for a in answers if a["op"] == "subscribed"]) == 20  # the burst
    await wait_for(lambda: svc.presence.groups[b"room"]._flush_call is None)  # the last period went out
    await svc.publish("marker", "room")
    elapsed = time.monotonic() - started
    got = []
    while True:
        message = await members[0].next_json()
        if message["op"] == "message":
            break
        got.append(message)
    churner_id = next(a["self"] for a in answers if a["op"] == "presence")
    got = [e for e in got if e.get("client") == churner_id]
    assert all(e["op"] in ("join", "leave") for e in got)
    assert len(got) <= elapsed / PRESENCE_PERIOD + 2, (len(got), elapsed)
    assert len(got) < 40  # without coalescing: a join and a leave per accepted subscription


@pytest_twisted.ensureDeferred
async def test_the_api_answers_health_and_publishes_under_slowloris(run_service: Any) -> None:
    """More slow connections than the API's connection limit, each sending the start of a request and then
    nothing: /health, /ready and a keyed publish still get their answers (the slow ones give way), long before
    --api-timeout would have freed a connection."""
    import socket
    import urllib.request

    from twisted.internet.threads import deferToThread

    svc = await run_service(api_max_connections=20, api_timeout=60, api_key="k3y")
    slow = []
    for _ in range(40):
        s = socket.create_connection(("127.0.0.1", svc.api_port))
        s.sendall(b"POST /publish/news HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n")
        slow.append(s)
    bystander = await connect(svc.ws_port, "/news")

    def honest() -> list[int]:
        statuses = []
        for path in ("/health", "/ready"):
            with urllib.request.urlopen(f"http://127.0.0.1:{svc.api_port}{path}", timeout=5) as r:
                statuses.append(r.status)
        request = urllib.request.Request(f"http://127.0.0.1:{svc.api_port}/publish/news", data=b"through",
                                         headers={"Authorization": "Bearer k3y"}, method="POST")
        with urllib.request.urlopen(request, timeout=5) as r:
            statuses.append(r.status)
        return statuses

    try:
        assert await deferToThread(honest) == [200, 200, 200]
        assert await bystander.next_text() == "through"
    finally:
        for s in slow:
            s.close()


@pytest_twisted.ensureDeferred
async def test_one_address_has_a_budget_of_subscriptions(run_service: Any) -> None:
    """The v1 subscriptions of all the sockets of one address are bounded (--max-subscriptions-per-ip): past
    it, error 429 on any of its sockets; an unsubscribe or a closed socket gives the budget back."""
    from conftest import wait_for

    svc = await run_service(max_subscriptions_per_ip=5)
    first, second = await v1(svc), await v1(svc)
    for i in range(3):
        assert (await subscribe(first, f"a{i}"))["op"] == "subscribed"
    for i in range(2):
        assert (await subscribe(second, f"b{i}"))["op"] == "subscribed"
    refused = await subscribe(second, "b2")
    assert (refused["op"], refused["status"]) == ("error", 429)
    second.send_json({"op": "unsubscribe", "channel": "b0"})
    assert (await subscribe(second, "b2"))["op"] == "subscribed"
    first.close()
    await first.wait_closed()
    await wait_for(lambda: svc.factory.subscriptions_per_ip == {"127.0.0.1": 2})
    for i in range(3):
        assert (await subscribe(second, f"c{i}"))["op"] == "subscribed"
    assert svc.factory.subscriptions_per_ip == {"127.0.0.1": 5}
