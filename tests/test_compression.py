"""
permessage-deflate (RFC 7692) and handshakes that must never hang: frame
bytes, negotiation, shared compressed fan-out, bounded inflation, and errors
while answering a handshake.  Real sockets on 127.0.0.1 and the embedded
broker; the client side is the ``websockets`` library's own
permessage-deflate.
"""

from __future__ import annotations

import json
import socket
import time
import zlib
from typing import Any

import pytest
import pytest_twisted
from conftest import wait_for
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from websockets.frames import Opcode
from wsclient import connect

from sockdrawer.transports.websocket.frames import BINARY, TEXT, Deflater, encode_frame

UPGRADE = (
    "GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
)


def handshake(port: int, extensions: str | None, path: str = "news") -> tuple[bytes, float]:
    """Send an opening handshake; return the response head and how long it took (blocking)."""
    extra = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions is not None else ""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(UPGRADE.format(path=path, extra=extra).encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n", 1)[0], time.monotonic() - started


def inflate(payload: bytes, window_bits: int = 15) -> bytes:
    return zlib.decompressobj(-window_bits).decompress(payload + b"\x00\x00\xff\xff")


JSON_1K = json.dumps([{"id": i, "user": f"user{i}", "online": i % 2 == 0, "score": i * 7} for i in range(18)])


# -- frames --------------------------------------------------------------------


def test_deflated_frames_inflate_on_their_own() -> None:
    """Each compressed frame has RSV1 set and inflates, by itself, to its message (no context takeover)."""
    deflater = Deflater(threshold=10)
    messages = [JSON_1K.encode(), b"\xff\xfe" * 300, JSON_1K.encode()[::-1]]
    for message in messages:
        frame = deflater.encode_frame(message)
        assert frame[0] & 0x40, "RSV1 (compressed) must be set"
        assert frame[0] & 0x0F == (1 if message[0] != 0xFF else 2)
        length = frame[1] & 0x7F
        payload = frame[2:] if length < 126 else frame[4:]
        assert inflate(payload) == message


def test_small_messages_stay_uncompressed() -> None:
    """Messages under the threshold are plain frames (RSV1 clear), byte for byte what uncompressed sockets get."""
    deflater = Deflater(threshold=64)
    assert deflater.encode_frame(b"x" * 63) == encode_frame(b"x" * 63)
    assert deflater.encode_frame(b"x" * 64)[0] == 0xC1
    assert deflater.encode_frame(b"hi", TEXT) == b"\x81\x02hi"


def test_window_bits_are_respected() -> None:
    """A deflater for a 512-byte window produces data a 512-byte-window inflater accepts."""
    deflater = Deflater(window_bits=9, threshold=0)
    message = (JSON_1K * 4).encode()
    assert inflate(deflater.deflate(message), window_bits=9) == message
    with pytest.raises(ValueError):
        Deflater(window_bits=8)


def test_deflater_batches_opcodes_and_settings() -> None:
    """A batch of several messages is their frames in order, joined for one write (compressed ones and one under
    the threshold); an opcode given for a message under the threshold is kept; the deflater keeps its window and
    says which windows are allowed."""
    deflater = Deflater(window_bits=10, threshold=64)
    long = JSON_1K.encode()
    one = deflater.encode_frame(long)
    assert deflater.encode_batch([long]) == one
    assert deflater.encode_batch([long, b"hi"]) == one + b"\x81\x02hi"
    assert deflater.encode_batch([long, b"hi", long]) == one + b"\x81\x02hi" + one
    assert deflater.encode_frame(b"hi", BINARY) == b"\x82\x02hi"
    assert (deflater.window_bits, deflater.threshold) == (10, 64)
    with pytest.raises(ValueError, match="^window_bits must be from 9 to 15$"):
        Deflater(window_bits=16)


def test_encoders_share_one_deflater_per_window() -> None:
    """Encoders builds one Deflater per window, with its threshold, and hands the same one out after."""
    from sockdrawer.transports.websocket.fanout import PLAIN, Encoders

    encoders = Encoders(threshold=10)
    deflater = encoders.get(12).__self__  # type: ignore[attr-defined]
    assert encoders.get(12).__self__ is deflater  # type: ignore[attr-defined]
    assert (deflater.window_bits, deflater.threshold) == (12, 10)
    assert encoders.frame(12, b"x" * 20)[0] == 0xC1  # over this threshold (not the default 64): compressed
    assert encoders.frame(PLAIN, b"x" * 20) == encode_frame(b"x" * 20)


# -- negotiation ---------------------------------------------------------------

OFFERS = [
    "permessage-deflate; client_max_window_bits",  # Chromium, Node ws, websockets
    "permessage-deflate",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    "permessage-deflate; server_max_window_bits=10, permessage-deflate",
    "permessage-deflate; foo=1, permessage-deflate; client_max_window_bits",  # a bad offer, then a good one
    "permessage-deflate; server_max_window_bits=99",
    "x-webkit-deflate-frame",
    "permessage-bzip2, x-unknown; a=b",
    "permessage-deflate; client_max_window_bits=abc",
]


@pytest_twisted.ensureDeferred
async def test_offers_declined_at_once_without_compression(run_service: Any) -> None:
    """Without --compression every offer, well-formed or not, is answered at once with a 101 and no extension."""
    svc = await run_service()
    for offer in OFFERS:
        head, took = await deferToThread(handshake, svc.ws_port, offer)
        assert head.startswith(b"HTTP/1.1 101 "), (offer, head)
        assert b"sec-websocket-extensions" not in head.lower(), (offer, head)
        assert took < 1.0, (offer, took)


@pytest_twisted.ensureDeferred
async def test_offers_answered_at_once_with_compression(run_service: Any) -> None:
    """With compression on, the first valid permessage-deflate offer is accepted with server_no_context_takeover
    (and the window a client asked for); bad offers are declined, never a reason to refuse the handshake."""
    svc = await run_service(compression=True)
    expected = {
        0: b"permessage-deflate; server_no_context_takeover",
        1: b"permessage-deflate; server_no_context_takeover",
        2: b"permessage-deflate; server_no_context_takeover",
        3: b"permessage-deflate; server_no_context_takeover; server_max_window_bits=10",
        4: b"permessage-deflate; server_no_context_takeover",
    }
    for i, offer in enumerate(OFFERS):
        head, took = await deferToThread(handshake, svc.ws_port, offer)
        assert head.startswith(b"HTTP/1.1 101 "), (offer, head)
        assert took < 1.0, (offer, took)
        answers = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-extensions:")]
        assert answers == ([expected[i]] if i in expected else []), (offer, head)


# -- delivery ------------------------------------------------------------------


def frames_of(raw: bytes) -> list[tuple[int, bytes]]:
    """(first byte, payload) of every server frame after the 101 response in ``raw``."""
    data = raw[raw.index(b"\r\n\r\n") + 4:]
    frames = []
    while data:
        first, length = data[0], data[1] & 0x7F
        start = 2
        if length == 126:
            length, start = int.from_bytes(data[2:4], "big"), 4
        elif length == 127:
            length, start = int.from_bytes(data[2:10], "big"), 10
        frames.append((first, data[start:start + length]))
        data = data[start + length:]
    return frames


@pytest_twisted.ensureDeferred
async def test_one_compression_per_batch_for_every_socket(run_service: Any, monkeypatch: Any) -> None:
    """Sockets that negotiated compression on a channel get the same compressed bytes, deflated once per batch;
    a socket without compression on the same channel gets plain frames; all receive every message in order."""
    calls = []
    original = Deflater.encode_batch

    def counting(self: Deflater, messages: Any) -> bytes:
        calls.append(len(messages))
        return original(self, messages)

    monkeypatch.setattr(Deflater, "encode_batch", counting)
    svc = await run_service(compression=True)
    deflating = [await connect(svc.ws_port, "/json", deflate=True, record=True) for _ in range(3)]
    plain = await connect(svc.ws_port, "/json", record=True)
    await wait_for(lambda: svc.factory.sockets(b"json") == 4)
    messages = [JSON_1K + str(i) for i in range(5)] + ["tiny"]
    for m in messages:
        await svc.publish(m, "json")
    for client in [*deflating, plain]:
        assert [await client.next_text() for _ in messages] == messages
    assert len(calls) == len(messages), "each batch must be deflated once, not once per socket"
    wire = [frames_of(bytes(c.raw)) for c in deflating]
    assert wire[0] == wire[1] == wire[2]
    assert [first for first, _ in wire[0]] == [0xC1] * 5 + [0x81]  # "tiny" is under the threshold
    assert [first for first, _ in frames_of(bytes(plain.raw))] == [0x81] * 6
    assert sum(len(p) for _, p in wire[0]) < sum(len(m) for m in messages) / 3


@pytest_twisted.ensureDeferred
async def test_compressed_frames_from_clients_and_compressed_replies(run_service: Any) -> None:
    """A client's compressed frames reach the listener inflated, and the reply comes back compressed."""
    from listeners import Echo

    svc = await run_service(compression=True, listeners=(Echo,))
    client = await connect(svc.ws_port, "/echo", deflate=True, record=True)
    await wait_for(lambda: svc.factory.sockets(b"echo") == 1)
    client.send_text(JSON_1K)
    assert await client.next_text() == JSON_1K
    client.send_binary(b"\x00" * 5000)
    assert await client.next_message() == (Opcode.BINARY, b"\x00" * 5000)
    assert [first for first, _ in frames_of(bytes(client.raw))] == [0xC1, 0xC2]


@pytest_twisted.ensureDeferred
async def test_inflation_is_bounded(run_service: Any) -> None:
    """A small compressed frame that would inflate past --max-message-size closes that socket with 1009 while
    inflating, and another socket on the node carries on."""
    svc = await run_service(compression=True, max_message_size=64 * 1024)
    bystander = await connect(svc.ws_port, "/news", deflate=True)
    client = await connect(svc.ws_port, "/news", deflate=True)
    await wait_for(lambda: svc.factory.sockets(b"news") == 2)
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = bomb.compress(b"\x00" * (50 * 1024 * 1024)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    payload = payload[:-4]
    assert len(payload) < 64 * 1024  # it passes the frame size limit; only inflation can catch it
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    header = bytes((0xC2, 0x80 | 126)) + len(payload).to_bytes(2, "big") + mask
    client.send_raw(header + masked)
    code, _ = await client.wait_closed()
    assert code == 1009
    await svc.publish("still here", "news")
    assert await bystander.next_text() == "still here"


# -- handshakes never hang -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_error_while_answering_a_handshake_is_500_at_once(run_service: Any) -> None:
    """An exception while the server answers a handshake (here: a broken compression policy) is logged with its
    traceback, and the client gets HTTP 500 at once instead of waiting for the handshake timeout."""
    svc = await run_service(compression=True)

    def broken(offers: Any) -> Any:
        raise TypeError("broken accept policy")

    svc.factory.setProtocolOptions(perMessageCompressionAccept=broken)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        head, took = await deferToThread(handshake, svc.ws_port, "permessage-deflate")
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert head.startswith(b"HTTP/1.1 500 Internal Server Error"), head
    assert took < 1.0
    failures = [e for e in events if e.get("log_failure") is not None]
    assert any("broken accept policy" in str(e["log_failure"].value) for e in failures)
    for e in failures:
        e["log_failure"].cleanFailure()
    head, _ = await deferToThread(handshake, svc.ws_port, None)
    assert head.startswith(b"HTTP/1.1 101 "), "the node must go on serving"


@pytest_twisted.ensureDeferred
async def test_error_after_the_101_closes_with_1011(run_service: Any, monkeypatch: Any) -> None:
    """An exception once the 101 has been sent (while joining the channel) is logged and closes that socket
    with 1011 at once."""
    svc = await run_service()
    events: list[dict[str, Any]] = []

    def broken_join(key: bytes, proto: Any) -> None:
        raise RuntimeError("join failed")

    monkeypatch.setattr(svc.factory, "join", broken_join)
    globalLogPublisher.addObserver(events.append)
    try:
        client = await connect(svc.ws_port, "/news")
        code, reason = await client.wait_closed(timeout=2)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (code, reason) == (1011, "internal error")
    assert any("join failed" in str(e["log_failure"].value) for e in events if e.get("log_failure"))
