"""
Property-based fuzz tests (hypothesis) of what a client can send the
WebSocket server: the opening handshake (request line, target, headers),
frame sequences after a good handshake (fragments, control frames, reserved
bits and opcodes, lengths, masks, UTF-8, limits, permessage-deflate), and the
tokens of a service with ``--auth-secret``.

Each property checks three things:

* nothing escapes into the log: no event with a ``log_failure``, no
  traceback, no "Unhandled" line (and no token in any event);
* the connection ends the way the input asks for: the HTTP status of a
  refused handshake (4xx, or 505 for another HTTP version; never a 101 for a
  request that must be refused, never no answer), the close code of a failed
  socket (1002, 1007, 1008, 1009), or an open socket that got exactly the
  replies (echoes, pongs) its frames call for;
* no other socket is affected: a bystander on the same factory still gets a
  published message, and the factory's counters are back to the bystander
  alone once the fuzzed connection is gone.

Most properties drive the real :class:`~sockdrawer.transports.websocket.factory.SockDrawerServerFactory`
in memory (a StringTransport per connection, a ``Clock`` for time); a thin
layer runs against a real service on 127.0.0.1 with a few examples.

The examples expected by each property come from the RFCs (6455, 7692, 9110)
and the documented options, written here independently of the server code:
a reference UTF-8 validator, a reference frame model, request parts labelled
valid or invalid as they are generated.

Example counts are CI-sized by default (profile ``ci``: deterministic, the
whole file in well under a minute).  Other profiles, chosen with the
``HYPOTHESIS_PROFILE`` environment variable (read by this module; pytest's
``--hypothesis-profile`` is overridden by it)::

    HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz.py -p no:timeout       # ~50x, fresh examples
    HYPOTHESIS_PROFILE=soak python -m pytest tests/test_fuzz.py -p no:timeout       # hours
    HYPOTHESIS_PROFILE=generated python -m pytest tests/test_fuzz.py -p no:timeout  # as long, without the
                                                                                    # known-bug @examples

(``-p no:timeout``: the suite's 120 s per-test timeout would cut the long
runs.)  A failure prints the falsifying example and a ``@reproduce_failure``
blob; examples are not stored between runs (no example database; hypothesis
still keeps caches in ``.hypothesis/``, which it marks git-ignored).

Bugs found are kept as explicit ``@example``s on the property that found
them, so they reproduce on every run until they are fixed:

* a data frame that arrives after the server sent its own close frame (token
  expiry 4001, shutdown 1012/1001, slow reader 1008) raises AttributeError
  ``frame_data`` out of ``dataReceived``;
* with ``--close-handshake-timeout 0`` a socket failed with 1002/1007/1008/1009
  stays open for ever when the client does not answer the close frame;
* a signed token whose ``exp`` is an integer too large for a float gets 500
  and a logged traceback instead of 401;
* an unsupported Sec-WebSocket-Version is refused naming versions ``13,8``,
  though version 8 is refused too (RFC 6455 4.2.2);
* two Sec-WebSocket-Extensions headers are refused with 400 (RFC 6455 9.1:
  the same as one header with both values);
* an Origin with port 0 passes for the scheme's default port;
* a compressed message that inflates past ``--max-message-size`` can reach the
  listeners cut to exactly the limit instead of failing with 1009 (when
  zlib has taken all the frame's input but holds more output).
"""

from __future__ import annotations

import base64
import codecs
import gc
import hashlib
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import jwt
import pytest
import pytest_twisted
import txaio
from conftest import wait_for
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from sockdrawer import _private
from sockdrawer.config import Settings
from sockdrawer.core.hub import MemoryChannelHub
from sockdrawer.node.service import websocket_options
from sockdrawer.transports.websocket.factory import SockDrawerServerFactory

# -- hypothesis profiles ---------------------------------------------------------

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=3000, **_COMMON)
settings.register_profile("soak", max_examples=100_000, **_COMMON)
# generated examples only: finds new bugs while the known ones (explicit @examples) are not fixed yet
settings.register_profile("generated", max_examples=3000, phases=[Phase.generate, Phase.target, Phase.shrink],
                          **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def scaled(n: int) -> int:
    """``n`` examples under the ``ci`` profile, proportionally more under the others."""
    return max(1, n * settings().max_examples // 60)


SECRET = "fuzz-secret-" + "0123456789abcdef" * 4
OTHER_SECRET = "another-secret-" + "fedcba9876543210" * 4
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
BYSTANDER_CHANNEL = b"news"
CHECK = b"bystander check"
_log = Logger()

# -- the log ----------------------------------------------------------------------


_collections = [0]


@contextmanager
def captured_log() -> Iterator[list[dict[str, Any]]]:
    """Every twisted.logger event emitted inside the block (unhandled Deferred failures included)."""
    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        yield events
        # a Deferred's unhandled failure is logged when it is collected: the young generations each time
        # (cheap), everything now and then
        _collections[0] += 1
        gc.collect(1 if _collections[0] % 25 else 2)
    finally:
        globalLogPublisher.removeObserver(observer)


def assert_clean_log(events: Sequence[dict[str, Any]], secrets: Sequence[str] = ()) -> None:
    """No event carries a failure, a traceback or an "Unhandled" line, and none holds a secret."""
    for event in events:
        text = formatEvent(event)
        assert "log_failure" not in event, f"an exception was logged: {text}\n{event['log_failure']}"
        assert not any(isinstance(v, Failure) for v in event.values()), f"a Failure was logged: {text}"
        for word in ("Traceback", "Unhandled", "Unexpected exception"):
            assert word not in text, f"logged: {text}"
        everything = text + repr(event)
        for secret in secrets:
            if len(secret) >= 12:
                assert secret not in everything, f"a token was logged: {text}"


# -- an in-memory server ------------------------------------------------------------


class MemoryTransport(StringTransport):
    """A StringTransport that Autobahn can drop (it unregisters a producer it never registered)."""

    aborted = False

    def unregisterProducer(self) -> None:
        self.producer = None
        self.streaming = None

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class Peer:
    """One client connection to an in-memory factory, from 127.0.0.1."""

    def __init__(self, factory: SockDrawerServerFactory, port: int) -> None:
        address = IPv4Address("TCP", "127.0.0.1", port)
        self.proto: Any = factory.buildProtocol(address)
        self.transport = MemoryTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 8020), peerAddress=address)
        self.lost = False
        self.proto.makeConnection(self.transport)
        self._settle()

    def send(self, data: bytes) -> None:
        """Hand bytes to the server as the reactor would: an exception is logged and drops the connection."""
        if self.lost or not data:
            return
        try:
            self.proto.dataReceived(data)
        except Exception:
            _log.failure("Unhandled Error: dataReceived raised (the reactor logs this and drops the connection)")
            self.transport.disconnecting = True
        self._settle()

    def send_chunks(self, data: bytes, cuts: Sequence[int]) -> None:
        """``data`` in pieces, cut at the offsets ``cuts``."""
        last = 0
        for cut in sorted({c for c in cuts if 0 < c < len(data)}):
            self.send(data[last:cut])
            last = cut
        self.send(data[last:])

    def _settle(self) -> None:
        if self.transport.disconnecting and not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionDone()))

    def disconnect(self) -> None:
        """The client goes away (its TCP connection ends)."""
        if not self.lost:
            self.lost = True
            self.proto.connectionLost(Failure(ConnectionLost()))

    @property
    def output(self) -> bytes:
        return self.transport.value()


class ReactorClock(Clock):
    """A Clock whose timed calls fail as under the reactor: logged, not raised out of advance()."""

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def guarded() -> None:
            try:
                f(*args, **kwargs)
            except Exception:
                _log.failure("Unhandled Error in a timed call (the reactor logs this)")

        return super().callLater(delay, guarded)


@dataclass
class Server:
    factory: SockDrawerServerFactory
    hub: MemoryChannelHub
    clock: ReactorClock
    bystander: Peer
    ports: Iterator[int]

    peers: list[Peer] = field(default_factory=list)

    def connect(self) -> Peer:
        peer = Peer(self.factory, next(self.ports))
        self.peers.append(peer)
        return peer

    def advance(self, seconds: float) -> None:
        """Let time pass (timers fire), then end the connections the server dropped."""
        self.clock.advance(seconds)
        for peer in [self.bystander, *self.peers]:
            peer._settle()


def echo(source: Any, message: str | bytes) -> list[Any]:
    """A frame handler that sends every message straight back."""
    return [succeed(message)]


def in_memory_settings(**options: Any) -> Settings:
    # Autobahn's handshake timers run on txaio's loop, the Clock while serving(); pings would only add
    # frames to every output
    options = {"auto_ping_interval": 0, **options}
    if options.get("auth_secret"):
        options.setdefault("public_channel", (BYSTANDER_CHANNEL.decode(),))
    return Settings(**options).validate()


@contextmanager
def serving(**options: Any) -> Iterator[Server]:
    """
    A factory on a MemoryChannelHub whose clock, and txaio's (Autobahn's handshake timeouts), is one Clock
    (so no timer reaches the global reactor and leaves it dirty), with an open bystander socket on /news.
    """
    clock = ReactorClock()
    clock.advance(time.time())  # tokens carry real timestamps
    saved = txaio.config.loop
    txaio.config.loop = clock
    try:
        hub = MemoryChannelHub()
        factory = SockDrawerServerFactory(hub, echo, websocket_options(in_memory_settings(**options)), clock=clock)
        ports = iter(range(20000, 60000))
        bystander = Peer(factory, next(ports))
        bystander.send(upgrade(b"/" + BYSTANDER_CHANNEL))
        assert bystander.output.startswith(b"HTTP/1.1 101 "), bystander.output
        bystander.transport.clear()
        yield Server(factory, hub, clock, bystander, ports)
    finally:
        txaio.config.loop = saved


@pytest.fixture(autouse=True, scope="module")
def _cheap_gc() -> Iterator[None]:
    """Each example runs gc.collect() (to flush unhandled Deferred failures into the log): freeze what
    exists before so that it scans only what the examples made."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


def assert_bystander_unaffected(server: Server, *others: Peer) -> None:
    """The bystander still gets a published message, and the factory counts it alone (plus ``others``)."""
    server.bystander.transport.clear()
    server.hub.deliver(BYSTANDER_CHANNEL, CHECK)
    assert server_frames(server.bystander.output) == [Frame(True, 0, 1, CHECK)]
    factory = server.factory
    alive = [server.bystander, *others]
    assert set(factory.connections) == {p.proto for p in alive}
    assert factory.pending == 0
    assert factory.open_sockets == len(alive)
    assert factory.per_ip == {"127.0.0.1": len(alive)}
    assert factory.sockets(BYSTANDER_CHANNEL) == sum(p.proto.key == BYSTANDER_CHANNEL for p in alive)


def upgrade(target: bytes, extra: bytes = b"") -> bytes:
    return (b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (target, KEY, extra))


# -- reading what the server sent ------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes

    @property
    def close_code(self) -> int | None:
        return struct.unpack("!H", self.payload[:2])[0] if len(self.payload) >= 2 else None


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    """The status, the headers (lower-case names) and the bytes after an HTTP response."""
    assert b"\r\n\r\n" in data, f"no complete HTTP response: {data[:200]!r}"
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    assert version == "HTTP/1.1", lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status), headers, rest


def server_frames(data: bytes, inflate: bool = False) -> list[Frame]:
    """Parse server frames (unmasked, complete); with ``inflate``, RSV1 frames are decompressed."""
    frames = []
    while data:
        assert len(data) >= 2, f"partial frame header {data!r}"
        b0, b1 = data[0], data[1]
        assert not b1 & 0x80, "a server frame is masked"
        length, start = b1 & 0x7F, 2
        if length == 126:
            length, start = struct.unpack("!H", data[2:4])[0], 4
            assert length >= 126
        elif length == 127:
            length, start = struct.unpack("!Q", data[2:10])[0], 10
            assert length >= 0x10000
        payload = data[start:start + length]
        assert len(payload) == length, "partial server frame"
        rsv = (b0 >> 4) & 7
        if rsv & 4 and inflate:
            payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
            rsv &= 3
        frames.append(Frame(bool(b0 & 0x80), rsv, b0 & 0x0F, payload))
        data = data[start + length:]
    return frames


# -- a reference UTF-8 validator (Unicode 15, table 3-7), failing at the first bad byte ---


class Utf8:
    """Incremental UTF-8 check that fails as early as a byte makes the text invalid."""

    def __init__(self) -> None:
        self.need = 0  # continuation bytes still expected
        self.lo, self.hi = 0x80, 0xBF  # range of the next continuation byte

    def feed(self, data: bytes) -> bool:
        for b in data:
            if self.need:
                if not self.lo <= b <= self.hi:
                    return False
                self.need -= 1
                self.lo, self.hi = 0x80, 0xBF
            elif b < 0x80:
                continue
            elif 0xC2 <= b <= 0xDF:
                self.need = 1
            elif b == 0xE0:
                self.need, self.lo = 2, 0xA0
            elif 0xE1 <= b <= 0xEC or b in (0xEE, 0xEF):
                self.need = 2
            elif b == 0xED:
                self.need, self.hi = 2, 0x9F
            elif b == 0xF0:
                self.need, self.lo = 3, 0x90
            elif 0xF1 <= b <= 0xF3:
                self.need = 3
            elif b == 0xF4:
                self.need, self.hi = 3, 0x8F
            else:
                return False
        return True

    @property
    def complete(self) -> bool:
        return self.need == 0


@given(st.binary(max_size=12))
@example(b"\xed\xa0\x80")  # a surrogate
@example(b"\xf4\x90\x80\x80")  # above U+10FFFF
@example(b"\xc0\xaf")  # overlong
@example(b"\xe0\x80\x80")
@example(b"\xf0\x8f\xbf\xbf")
@example("\U0010ffff\ud7ff\ue000\u00e9".encode("utf-8", "surrogatepass"))
def test_reference_utf8_validator_matches_python_on_whole_texts(data: bytes) -> None:
    """The reference validator accepts a whole byte string exactly when Python's strict UTF-8 decoder does."""
    try:
        data.decode("utf-8")
        valid = True
    except UnicodeDecodeError:
        valid = False
    v = Utf8()
    assert (v.feed(data) and v.complete) == valid


@given(st.binary(max_size=12), st.integers(0, 12))
def test_reference_utf8_validator_fails_no_earlier_than_python(data: bytes, cut: int) -> None:
    """A prefix the reference validator rejects can never be completed to valid UTF-8 (it fails early, not
    wrongly), and a prefix it accepts is one Python's incremental decoder also accepts."""
    prefix = data[:cut]
    v = Utf8()
    ok = v.feed(prefix)
    decoder = codecs.getincrementaldecoder("utf-8")()
    if ok:
        decoder.decode(prefix, False)
    else:
        for tail in (b"\x80", b"\x80\x80", b"\x80\x80\x80", b"\xbf\xbf\xbf", b"\x90\x80\x80", b"\xa0\x80"):
            with pytest.raises(UnicodeDecodeError):
                (prefix + tail).decode("utf-8")


# -- frames a client sends ---------------------------------------------------------------

CONT, TEXT_OP, BINARY_OP, CLOSE_OP, PING_OP, PONG_OP = 0, 1, 2, 8, 9, 10
#: close codes an endpoint may send (RFC 6455 7.4.1 and the private range)
VALID_CLOSE_CODES = (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4001, 4999)
#: codes no endpoint may send (reserved, unassigned, or out of range)
INVALID_CLOSE_CODES = (0, 1, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535)
BAD_UTF8 = (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x28\xa1", b"\xf8\x88\x80\x80")
TAIL = b"\x00\x00\xff\xff"


def masked(data: bytes, mask: bytes) -> bytes:
    """``data`` XORed with the 4-byte ``mask`` (RFC 6455 5.3)."""
    n = len(data)
    if not n:
        return data
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


#: characters for generated texts: ASCII (controls too) and every width of UTF-8, without building
#: hypothesis' Unicode tables (which takes seconds)
chars = st.one_of(
    st.integers(0, 0x7F).map(chr),
    st.integers(0x80, 0x10FFFF).filter(lambda c: not 0xD800 <= c <= 0xDFFF).map(chr),
    st.sampled_from("\u00e9\u20ac\u4e2d\U0001d11e\ufffd\uffff\U0010ffff\u0085\u00a0\u2028"),
)


@dataclass(frozen=True)
class ClientFrame:
    """One client frame, possibly broken: any bits, opcode, mask, length form, or a lying length."""

    opcode: int
    payload: bytes = b""
    fin: bool = True
    rsv: int = 0
    mask: bytes | None = b"\x00\x00\x00\x00"
    #: 0: the minimal length encoding; 16 or 64: that form whatever the length
    form: int = 0
    #: the length in the header, when it is not the payload's (a lying length)
    declared: int | None = None

    def __repr__(self) -> str:
        payload = repr(self.payload)
        if len(self.payload) > 64:
            payload = f"{self.payload[:16]!r}... ({len(self.payload)} bytes)"
        extra = "".join(f", {k}={v!r}" for k, v in (("fin", self.fin), ("rsv", self.rsv), ("mask", self.mask),
                                                      ("form", self.form), ("declared", self.declared))
                        if v != ClientFrame.__dataclass_fields__[k].default)
        return f"ClientFrame({self.opcode}, {payload}{extra})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(repr(self))

    @property
    def length(self) -> int:
        return len(self.payload) if self.declared is None else self.declared

    @property
    def minimal(self) -> bool:
        n = self.length
        return self.form == 0 or (self.form == 16 and 126 <= n < 0x10000) or (self.form == 64 and n >= 0x10000)

    def header(self) -> bytes:
        b0 = (0x80 if self.fin else 0) | (self.rsv << 4) | self.opcode
        m = 0x80 if self.mask is not None else 0
        n = self.length
        form = self.form or (7 if n < 126 else 16 if n < 0x10000 else 64)
        if form == 7:
            head = bytes([b0, m | n])
        elif form == 16:
            head = bytes([b0, m | 126]) + struct.pack("!H", n)
        else:
            head = bytes([b0, m | 127]) + struct.pack("!Q", n)
        return head + (self.mask or b"")

    def encode(self) -> bytes:
        return self.header() + (masked(self.payload, self.mask) if self.mask is not None else self.payload)


@dataclass(frozen=True)
class Limits:
    max_message_size: int
    max_fragments: int
    frame_burst: int
    rate: float = 10.0
    compression_threshold: int = 64

    def settings(self) -> dict[str, Any]:
        return {"max_message_size": self.max_message_size, "max_fragments": self.max_fragments,
                "frame_burst": self.frame_burst, "max_frames_per_second": self.rate,
                "compression_threshold": self.compression_threshold}

    @property
    def refill(self) -> float:
        """Seconds after which the frame bucket is full again."""
        return self.frame_burst / self.rate + 1


@dataclass
class Script:
    """Bursts of frames (the bucket refills between bursts), the cut points of each burst's bytes, and
    where the last frame is cut off (``None``: sent whole)."""

    limits: Limits
    bursts: list[list[ClientFrame]]
    cuts: list[list[int]]
    truncate: int | None = None
    deflate: bool = False

    def wire(self) -> list[bytes]:
        data = [b"".join(f.encode() for f in burst) for burst in self.bursts]
        if self.truncate is not None and data:
            last = self.bursts[-1][-1].encode()
            data[-1] = data[-1][: len(data[-1]) - len(last) + self.truncate]
        return data


@dataclass
class Outcome:
    """What the server must do with a script: the replies it sends in order (echoes, pongs), then the close
    code of its close frame (``None``: it stays open), and whether it ends the TCP connection itself."""

    replies: list[tuple[int, bytes]] = field(default_factory=list)
    close: int | None = None
    #: the client closed cleanly: the server answers (with 1000 or the client's code) and drops TCP
    client_closed: bool = False
    client_code: int | None = None
    #: how many of the script's frames the server reads before it is done (fails, closes)
    frames_used: int = 0


def _deflate(data: bytes, level: int = 6) -> bytes:
    """``data`` as one permessage-deflate message (its own stream, sync flush, tail stripped)."""
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(TAIL)
    return out[:-4]


def model(script: Script) -> Outcome:
    """
    The reference: what RFC 6455, RFC 7692 and the documented options ask of the server, frame by frame.

    Header errors fail with 1002 before anything else about a frame; then a data frame or a ping takes one
    frame from the bucket (empty: 1008); a data frame counts against --max-fragments (1009) and
    --max-message-size (frame and message, uncompressed, 1009); payloads of text messages must be UTF-8
    (1007), compressed payloads must inflate (1007).  A client close is answered and the TCP connection
    dropped.
    """
    limits, out = script.limits, Outcome()
    in_msg = text = compressed = False
    frags = size = 0
    utf8 = Utf8()
    parts: list[bytes] = []
    inflater: Any = None
    frames_total = sum(len(b) for b in script.bursts)
    seen = 0

    def fail(code: int) -> Outcome:
        out.close = code
        out.frames_used = seen
        return out

    for burst in script.bursts:
        used = 0
        for fr in burst:
            seen += 1
            last = seen == frames_total
            received = len(fr.encode())
            if last and script.truncate is not None:
                received = script.truncate
            available = received - len(fr.header())
            complete = available >= fr.length
            control = fr.opcode >= 8
            if received < 2:
                return out
            # -- the first two bytes: bits, opcode, mask bit, 7-bit length (RFC 6455 5.2, 5.4, 5.5; RFC 7692 6)
            first_of_message = fr.opcode in (TEXT_OP, BINARY_OP) and not in_msg
            if fr.rsv and not (script.deflate and fr.rsv == 4 and first_of_message):
                return fail(1002)
            if fr.mask is None:
                return fail(1002)
            if control:
                if not fr.fin or fr.length > 125 or not fr.minimal or fr.opcode not in (CLOSE_OP, PING_OP, PONG_OP):
                    return fail(1002)
                if fr.opcode == CLOSE_OP and fr.length == 1:
                    return fail(1002)
            elif fr.opcode not in (CONT, TEXT_OP, BINARY_OP) or (fr.opcode == CONT) != in_msg:
                return fail(1002)
            if available < 0:
                return out  # the rest of the header has not arrived
            # -- the extended length: minimal encoding, at most 2**63 - 1
            if not fr.minimal or fr.length >= 2**63:
                return fail(1002)
            if not control:
                # -- a data frame begins
                used += 1
                if used > limits.frame_burst:
                    return fail(1008)
                if fr.opcode != CONT:
                    in_msg, text, compressed = True, fr.opcode == TEXT_OP, fr.rsv == 4
                    frags = size = 0
                    utf8, parts = Utf8(), []
                frags += 1
                if frags > limits.max_fragments:
                    return fail(1009)
                if fr.length > limits.max_message_size:
                    return fail(1009)
                chunk = fr.payload[:available]
                if compressed:
                    if inflater is None:
                        inflater = zlib.decompressobj(-15)
                    room = limits.max_message_size - size
                    try:
                        chunk = inflater.decompress(chunk, room + 1)
                    except zlib.error:
                        return fail(1007)
                    if len(chunk) > room:
                        return fail(1009)
                size += len(chunk) if compressed else fr.length
                if size > limits.max_message_size:
                    return fail(1009)
                if text and not utf8.feed(chunk):
                    return fail(1007)
                parts.append(chunk)
                if not complete:
                    return out
                if fr.fin:
                    if compressed:
                        try:
                            inflater.decompress(TAIL)
                        except zlib.error:
                            return fail(1007)
                    if text and not utf8.complete:
                        return fail(1007)
                    out.replies.append((TEXT_OP if text else BINARY_OP, b"".join(parts)))
                    in_msg = False
            else:
                if not complete:
                    return out
                if fr.opcode == PING_OP:
                    used += 1
                    if used > limits.frame_burst:
                        return fail(1008)
                    out.replies.append((PONG_OP, fr.payload))
                elif fr.opcode == CLOSE_OP:
                    if fr.length >= 2:
                        code = out.client_code = struct.unpack("!H", fr.payload[:2])[0]
                        if code not in VALID_CLOSE_CODES and not 3000 <= code <= 4999:
                            return fail(1002)
                        reason = Utf8()
                        if not (reason.feed(fr.payload[2:]) and reason.complete):
                            return fail(1007)
                    out.client_closed = True
                    out.frames_used = seen
                    return out
    out.frames_used = seen
    return out


# -- strategies for frames

masks = st.one_of(st.just(b"\x00\x00\x00\x00"), st.binary(min_size=4, max_size=4))


@st.composite
def limits_strategy(draw: Any, big: bool = True) -> Limits:
    if big and draw(st.integers(0, 9)) == 0:
        size = draw(st.integers(0x10000 - 2, 0x10000 + 40))  # 64-bit lengths at the edge of the limit
    else:
        size = draw(st.one_of(st.sampled_from([1, 2, 125, 126, 127, 200]), st.integers(1, 300)))
    return Limits(size, draw(st.integers(1, 6)), draw(st.integers(1, 40)),
                  compression_threshold=draw(st.sampled_from([0, 1, 64, 1000])))


@st.composite
def message_payload(draw: Any, limits: Limits, text: bool) -> bytes:
    top = limits.max_message_size + 3
    if limits.max_message_size > 1000:
        n = draw(st.integers(top - 50, top))
        return b"y" * n  # a big message: text or binary, either way valid
    if text:
        data = draw(st.text(chars, max_size=min(top, 60))).encode("utf-8")
        if draw(st.integers(0, 5)) == 0:  # invalid UTF-8 somewhere, maybe split across fragments
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.sampled_from(BAD_UTF8)) + data[at:]
        elif data and draw(st.integers(0, 5)) == 0:  # a text ending inside a character
            data = data + "€".encode()[: draw(st.integers(1, 2))]
        return data
    return draw(st.binary(max_size=min(top, 80)))


@st.composite
def control_frame(draw: Any, closing: bool = False) -> ClientFrame:
    """A valid ping or pong; with ``closing``, maybe a valid close frame."""
    kind = draw(st.sampled_from(["ping", "pong", "ping", "close"] if closing else ["ping", "pong"]))
    payload = draw(st.binary(max_size=125))
    mask = draw(masks)
    if kind == "close":
        if draw(st.booleans()):
            payload = b""
        else:
            code = draw(st.sampled_from(VALID_CLOSE_CODES))
            reason = draw(st.text(chars, max_size=20)).encode("utf-8")[:123]
            payload = struct.pack("!H", code) + reason
        return ClientFrame(CLOSE_OP, payload, mask=mask)
    return ClientFrame(PING_OP if kind == "ping" else PONG_OP, payload, mask=mask)


@st.composite
def message_frames(draw: Any, limits: Limits, deflate: bool) -> list[ClientFrame]:
    text = draw(st.booleans())
    payload = draw(message_payload(limits, text))
    compressed = deflate and draw(st.booleans())
    data = _deflate(payload, draw(st.sampled_from([0, 1, 6, 9]))) if compressed else payload
    if compressed and draw(st.integers(0, 7)) == 0:
        data = draw(st.binary(min_size=1, max_size=40))  # not deflate data (or by chance it is)
    if compressed and draw(st.integers(0, 7)) == 0:
        data = _deflate(b"\x00" * (limits.max_message_size + draw(st.integers(0, 5000))))  # a deflate bomb
    n = draw(st.integers(1, limits.max_fragments + 1))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), min_size=n - 1, max_size=n - 1)))
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    frames = []
    for i, piece in enumerate(pieces):
        frames.append(ClientFrame(CONT if i else (TEXT_OP if text else BINARY_OP), piece, fin=i == len(pieces) - 1,
                                  rsv=4 if compressed and i == 0 else 0, mask=draw(masks)))
        if i < len(pieces) - 1 and draw(st.integers(0, 3)) == 0:
            frames.append(draw(control_frame()))  # control frames may come between fragments
    return frames


@st.composite
def bad_frame(draw: Any, limits: Limits, deflate: bool) -> list[ClientFrame]:
    """One frame (or two) that breaks a rule of RFC 6455, or a limit."""
    mask = draw(masks)
    small = draw(st.binary(max_size=10))
    kind = draw(st.sampled_from([
        "opcode", "rsv", "rsv-control", "unmasked", "continuation", "fragmented-control", "long-control",
        "close-1", "close-code", "close-reason", "non-minimal", "msb", "oversize", "interrupted", "rsv-cont"]))
    if kind == "opcode":
        return [ClientFrame(draw(st.sampled_from([3, 4, 5, 6, 7, 11, 12, 13, 14, 15])), small,
                            fin=draw(st.booleans()), mask=mask)]
    if kind == "rsv":
        rsv = draw(st.sampled_from([1, 2, 3, 5, 6, 7] if deflate else [1, 2, 3, 4, 5, 6, 7]))
        return [ClientFrame(draw(st.sampled_from([TEXT_OP, BINARY_OP])), b"ok", rsv=rsv, mask=mask)]
    if kind == "rsv-control":
        return [ClientFrame(PING_OP, small, rsv=draw(st.integers(1, 7)), mask=mask)]
    if kind == "rsv-cont":  # RSV1 on a continuation frame (RFC 7692 6.1)
        return [ClientFrame(BINARY_OP, b"a", fin=False, rsv=4 if deflate else 0, mask=mask),
                ClientFrame(CONT, b"b", rsv=4, mask=mask)]
    if kind == "unmasked":
        frame = draw(st.one_of(control_frame(), st.just(ClientFrame(TEXT_OP, small.hex().encode()))))
        return [replace(frame, mask=None)]
    if kind == "continuation":
        return [ClientFrame(CONT, small, fin=draw(st.booleans()), mask=mask)]
    if kind == "fragmented-control":
        return [ClientFrame(draw(st.sampled_from([PING_OP, PONG_OP, CLOSE_OP])), b"", fin=False, mask=mask)]
    if kind == "long-control":
        return [ClientFrame(draw(st.sampled_from([PING_OP, PONG_OP, CLOSE_OP])),
                            b"\x03\xe8" + b"p" * draw(st.integers(124, 200)), mask=mask)]
    if kind == "close-1":
        return [ClientFrame(CLOSE_OP, b"\x03", mask=mask)]
    if kind == "close-code":
        return [ClientFrame(CLOSE_OP, struct.pack("!H", draw(st.sampled_from(INVALID_CLOSE_CODES))), mask=mask)]
    if kind == "close-reason":
        return [ClientFrame(CLOSE_OP, b"\x03\xe8ok" + draw(st.sampled_from(BAD_UTF8)), mask=mask)]
    if kind == "non-minimal":
        n = draw(st.integers(0, 125))
        form = draw(st.sampled_from([16, 64]))
        return [ClientFrame(draw(st.sampled_from([TEXT_OP, BINARY_OP, PING_OP])), b"m" * n, form=form, mask=mask)]
    if kind == "msb":
        return [ClientFrame(BINARY_OP, small, form=64, declared=2**63 + draw(st.integers(0, 2**32)), mask=mask)]
    if kind == "oversize":
        declared = limits.max_message_size + draw(st.one_of(st.integers(1, 3), st.integers(1, 2**40)))
        return [ClientFrame(draw(st.sampled_from([TEXT_OP, BINARY_OP])), small[:3], declared=declared, mask=mask)]
    # "interrupted": a new data message starts inside a fragmented one
    return [ClientFrame(TEXT_OP, b"a", fin=False, mask=mask),
            ClientFrame(draw(st.sampled_from([TEXT_OP, BINARY_OP])), b"b", mask=mask)]


@st.composite
def scripts(draw: Any, deflate: bool | None = None, limits: Limits | None = None, truncate: bool = True) -> Script:
    if deflate is None:
        deflate = draw(st.booleans())
    if limits is None:
        limits = draw(limits_strategy())
    bursts = []
    for _ in range(draw(st.integers(1, 3))):
        burst: list[ClientFrame] = []
        for _ in range(draw(st.integers(1, 5))):
            kind = draw(st.integers(0, 9))
            if kind < 6:
                burst += draw(message_frames(limits, deflate))
            elif kind < 8:
                burst.append(draw(control_frame(closing=True)))
            else:
                burst += draw(bad_frame(limits, deflate))
        bursts.append(burst)
    cuts = [draw(st.lists(st.integers(0, 200), max_size=4)) for _ in bursts]
    cut = None
    if truncate and draw(st.integers(0, 4)) == 0:
        last = bursts[-1][-1].encode()
        if len(last) > 1:
            cut = draw(st.integers(1, len(last) - 1))
    return Script(limits, bursts, cuts, cut, deflate)


DEFLATE_OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
CLIENT_CLOSE = ClientFrame(CLOSE_OP, struct.pack("!H", 1000), mask=b"\x01\x02\x03\x04").encode()


def open_peer(server: Server, target: bytes = b"/" + BYSTANDER_CHANNEL, extra: bytes = b"") -> tuple[Peer, int]:
    """A peer after a good handshake, and the offset of its first frame in the server's output."""
    peer = server.connect()
    peer.send(upgrade(target, extra))
    status, _, rest = split_response(peer.output)
    assert status == 101, peer.output
    return peer, len(peer.output) - len(rest)


def check_outcome(server: Server, peer: Peer, start: int, expected: Outcome, inflate: bool) -> None:
    """The server's frames after ``start`` are the expected replies and close; then the connection ends
    the expected way, and an open one still gets published messages."""
    frames = server_frames(peer.output[start:], inflate=inflate)
    closes = [i for i, f in enumerate(frames) if f.opcode == CLOSE_OP]
    data = frames[: closes[0]] if closes else frames
    assert all(f.fin and f.rsv == 0 for f in data), data
    assert [(f.opcode, f.payload) for f in data] == expected.replies
    if expected.close is not None or expected.client_closed:
        assert closes == [len(frames) - 1], f"expected one close frame, last: {frames}"
        code = frames[-1].close_code
        if expected.client_closed:
            assert code in (1000, expected.client_code), f"the close reply has code {code}"
            assert peer.lost, "the server did not end the connection after the close handshake"
        else:
            assert code == expected.close, f"close code {code}, expected {expected.close}: {frames[-1]}"
            peer.send(CLIENT_CLOSE)
            # never a hang: answered at once, or at the latest when --close-handshake-timeout runs out
            server.advance(server.factory.options.close_handshake_timeout + 0.1)
            assert peer.lost, "the server kept a failed connection past --close-handshake-timeout"
    else:
        assert not closes, f"unexpected close: {frames[closes[0]]}"
        assert not peer.lost and peer.proto.state == peer.proto.STATE_OPEN
        before = len(peer.output)
        server.hub.deliver(BYSTANDER_CHANNEL, CHECK)
        assert server_frames(peer.output[before:], inflate=inflate) == [Frame(True, 0, TEXT_OP, CHECK)]
    peer.disconnect()


def run_script(script: Script) -> None:
    expected = model(script)
    note(f"expected: {expected}")
    with serving(compression=script.deflate, **script.limits.settings()) as server, captured_log() as events:
        peer, start = open_peer(server, extra=DEFLATE_OFFER if script.deflate else b"")
        for i, (data, cuts) in enumerate(zip(script.wire(), script.cuts, strict=True)):
            if i:
                server.advance(script.limits.refill)
            peer.send_chunks(data, cuts)
        check_outcome(server, peer, start, expected, script.deflate)
        assert_bystander_unaffected(server)
    assert_clean_log(events)


@settings(max_examples=scaled(150))
@given(scripts(deflate=False))
def test_frame_sequences(script: Script) -> None:
    """Any sequence of client frames (fragments, control frames between them, bad bits, opcodes, lengths and
    masks, invalid UTF-8, limits) gets exactly the replies and the close code RFC 6455 and the options call
    for, in whatever pieces the bytes arrive, and leaves the other sockets alone."""
    run_script(script)


#: 16 bytes of deflate data that inflate to 776 (all input consumed before the output is complete)
SMALL_BOMB = bytes.fromhex("ecc18100000000c3a0f9535fe1005501")


@settings(max_examples=scaled(100))
@given(scripts(deflate=True))
@example(  # a message inflating past --max-message-size reaches the listener cut to 125 bytes, no 1009
    Script(Limits(125, 1, 10, compression_threshold=0), [[ClientFrame(BINARY_OP, SMALL_BOMB, rsv=4)]], [[]],
           deflate=True))
def test_compressed_frame_sequences(script: Script) -> None:
    """With permessage-deflate negotiated, compressed messages (RSV1 on the first frame only), uncompressed
    ones, corrupt deflate data and deflate bombs get the replies and close codes RFC 7692 and
    --max-message-size call for."""
    run_script(script)


# -- the opening handshake ----------------------------------------------------------------

#: characters a request target may carry as they are (RFC 3986 pchar, without '%')
PCHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@"
OK = 101


def _control(c: str) -> bool:
    return ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F


@st.composite
def percent_encoded(draw: Any, c: str) -> str:
    upper = draw(st.booleans())
    return "".join(("%%%02X" if upper else "%%%02x") % b for b in c.encode("utf-8"))


@dataclass
class Target:
    """A request target, the channel key it names (when valid), and the statuses a server may answer."""

    raw: bytes
    key: bytes | None
    statuses: set[int]


@st.composite
def targets(draw: Any, max_channel_length: int) -> Target:
    """Request targets built from labelled parts: valid pieces (plain, percent-encoded, in any case), and at
    most one or two faults (bad percent-encoding, empty or dot segments, control characters raw or encoded,
    bytes that are not UTF-8, raw non-ASCII, spaces, fragments, not a path at all)."""
    segments: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(0, 4))):
        raw, text = "", ""
        for _ in range(draw(st.integers(1, 3))):
            kind = draw(st.integers(0, 9))
            if kind < 6:
                piece = draw(st.text(st.sampled_from(PCHARS), min_size=1, max_size=6))
                raw, text = raw + piece, text + piece
            elif kind < 9:
                c = draw(chars.filter(lambda c: c != "/" and not _control(c)))
                raw, text = raw + draw(percent_encoded(c)), text + c
            else:
                n = draw(st.integers(max_channel_length - 3, max_channel_length + 3))
                raw, text = raw + "x" * n, text + "x" * n
        segments.append((raw, text))
    statuses: set[int] = set()
    if any(text in (".", "..") for _, text in segments):
        statuses.add(400)
    raw_path = "/" + "/".join(raw for raw, _ in segments)
    channel = "/".join(text for _, text in segments)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        fault = draw(st.sampled_from([
            "percent", "empty", "dot", "control", "control-raw", "utf8", "non-ascii", "space", "fragment",
            "not-a-path"]))
        at = draw(st.integers(0, len(segments)))
        parts = [raw for raw, _ in segments]
        if fault == "percent":
            parts.insert(at, draw(st.sampled_from(["%G0", "%g", "%-1", "a%zz", "%%41"])))
        elif fault == "empty":
            parts.insert(at, "")
            if not segments:
                parts.append("")  # "//"
        elif fault == "dot":
            parts.insert(at, draw(st.sampled_from([".", "..", "%2e", "%2E%2e", ".%2E"])))
        elif fault == "control":
            c = draw(st.sampled_from(["%00", "%01", "%09", "%0A", "%0d", "%1F", "%7F", "%C2%80", "%c2%9f"]))
            parts.insert(at, "a" + c)
        elif fault == "control-raw":
            parts.insert(at, "a" + chr(draw(st.sampled_from([0, 1, 8, 9, 11, 12, 13, 10, 27, 31, 127]))))
        elif fault == "utf8":
            parts.insert(at, draw(st.sampled_from(["%FF", "%C0%AF", "%ED%A0%80", "%C3", "%F4%90%80%80", "%80"])))
        elif fault == "non-ascii":
            parts.insert(at, "a" + chr(draw(st.integers(0x80, 0xFF))))
        elif fault == "space":
            parts.insert(at, "a b")
        elif fault == "fragment":
            parts.append("a#" + draw(st.text(st.sampled_from(PCHARS), min_size=1, max_size=5)))
        segments = [(p, "") for p in parts]
        raw_path = "/" + "/".join(parts)
        if fault == "not-a-path":
            raw_path = draw(st.sampled_from(["*", "news", "http://127.0.0.1/news", "ws://127.0.0.1:8020/news"]))
        statuses.add(400)
    if not statuses and len(channel.encode("utf-8")) > max_channel_length:
        statuses.add(400)
    query = ""
    if draw(st.booleans()):
        query = "?" + draw(st.text(st.sampled_from(PCHARS + "/?%"), max_size=12))
    key = None if statuses else channel.encode("utf-8")
    return Target((raw_path + query).encode("latin-1"), key, statuses)


@dataclass
class Request:
    """An opening handshake request as labelled parts; ``statuses`` empty means it must succeed (101)."""

    method: bytes
    target: Target
    version: bytes
    headers: list[tuple[bytes, bytes]]
    key: bytes
    statuses: set[int] = field(default_factory=set)
    #: header lines added as they are (maybe malformed)
    raw_lines: list[bytes] = field(default_factory=list)
    #: response headers that must have exactly these values (lower-case names)
    must_answer: dict[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        lines = [self.method + b" " + self.target.raw + b" " + self.version]
        lines += [name + b":" + value for name, value in self.headers]
        lines += self.raw_lines
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def expected(self, max_handshake_size: int) -> set[int]:
        if len(self.encode()) > max_handshake_size:
            return {431}
        return self.statuses | self.target.statuses or {OK}


def _find(headers: list[tuple[bytes, bytes]], name: bytes) -> list[int]:
    return [i for i, (n, _) in enumerate(headers) if n.strip().lower() == name.lower()]


@st.composite
def header_value_noise(draw: Any, value: bytes) -> bytes:
    """``value`` with optional whitespace (OWS) around it, which never changes its meaning."""
    return draw(st.sampled_from([b"", b" ", b"\t", b"  "])) + value + draw(st.sampled_from([b"", b" ", b"\t"]))


@st.composite
def requests(draw: Any, max_channel_length: int = 256) -> Request:
    """Opening handshakes: a good one, then noise that must not matter (header order, name case,
    whitespace, extra headers, odd but valid values) and faults that must be refused, each labelled with the
    statuses it allows."""
    key = base64.b64encode(draw(st.binary(min_size=16, max_size=16)))
    method = b"GET"
    version = b"HTTP/1.1"
    statuses: set[int] = set()
    must_answer: dict[str, str] = {}
    if draw(st.integers(0, 5)) == 0:
        method = draw(st.one_of(st.sampled_from([b"POST", b"PUT", b"HEAD", b"get", b"Get", b"OPTIONS", b"CONNECT",
                                                b"GETX", b"\xc7ET"]),
                                st.text(st.sampled_from(PCHARS), min_size=1, max_size=8).map(str.encode)))
        if method != b"GET":
            statuses.add(405)
    if draw(st.integers(0, 6)) == 0:
        version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/2", b"HTTP/2.0", b"http/1.1", b"HTTP/1.1.1", b"HTTPS/1.1",
                                        b"HTTP", b"HTTP/", b"FOO"]))
        statuses |= {400, 505}
    upgrade = draw(st.sampled_from([b"websocket", b"WebSocket", b"WEBSOCKET", b"h2c, websocket", b"websocket, foo"]))
    connection = draw(st.sampled_from([b"Upgrade", b"upgrade", b"keep-alive, Upgrade", b"Upgrade, close"]))
    headers = [(b"Host", draw(st.sampled_from([b"127.0.0.1", b"127.0.0.1:8020", b"example.com", b"[::1]:80"]))),
               (b"Upgrade", upgrade), (b"Connection", connection), (b"Sec-WebSocket-Key", key),
               (b"Sec-WebSocket-Version", b"13")]
    for _ in range(draw(st.integers(0, 3))):  # extra headers that must be ignored
        name = draw(st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzXY0123456789-!#$%&'*+.^_`|~"),
                            min_size=1, max_size=10)).encode()
        if name.lower().startswith((b"sec-websocket", b"host", b"upgrade", b"connection", b"origin",
                                    b"x-forwarded", b"authorization")):
            continue
        value = draw(st.binary(max_size=20).map(
            lambda b: bytes(c for c in b if c == 9 or 0x20 <= c <= 0x7E or c >= 0x80).strip(b" \t")))
        headers.append((name, value))
    if draw(st.booleans()):
        headers = draw(st.permutations(headers))
    headers = [(draw(st.sampled_from([n, n.lower(), n.upper()])), draw(header_value_noise(v))) for n, v in headers]
    raw_lines: list[bytes] = []
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        fault = draw(st.sampled_from([
            "no-host", "two-hosts", "host-port", "no-upgrade", "upgrade-value", "no-connection", "connection-value",
            "no-version", "two-versions", "version", "version-garbage", "no-key", "two-keys", "key",
            "header-name", "header-value", "obs-fold", "bare-lf", "no-colon"]))
        if fault == "no-host":
            headers = [h for i, h in enumerate(headers) if i not in _find(headers, b"host")]
            statuses.add(400)
        elif fault == "two-hosts":
            headers += [(b"Host", b"other.example")] * 2  # two more: duplicated whatever came before
            statuses.add(400)
        elif fault == "host-port":
            for i in _find(headers, b"host"):
                headers[i] = (headers[i][0], draw(st.sampled_from([b"127.0.0.1:x", b"127.0.0.1:", b"h:8o"])))
            statuses.add(400)
        elif fault == "no-upgrade":
            headers = [h for i, h in enumerate(headers) if i not in _find(headers, b"upgrade")]
            statuses |= {400, 426}
        elif fault == "upgrade-value":
            for i in _find(headers, b"upgrade"):
                headers[i] = (headers[i][0], draw(st.sampled_from([b"h2c", b"web socket", b"", b"websockets"])))
            statuses |= {400, 426}
        elif fault == "no-connection":
            headers = [h for i, h in enumerate(headers) if i not in _find(headers, b"connection")]
            statuses.add(400)
        elif fault == "connection-value":
            for i in _find(headers, b"connection"):
                headers[i] = (headers[i][0], draw(st.sampled_from([b"keep-alive", b"close", b"", b"upgrades"])))
            statuses.add(400)
        elif fault == "no-version":
            headers = [h for i, h in enumerate(headers) if i not in _find(headers, b"sec-websocket-version")]
            statuses |= {400, 426}
        elif fault == "two-versions":
            headers += [(b"Sec-WebSocket-Version", draw(st.sampled_from([b"13", b"8"])))] * 2
            statuses |= {400, 426}
        elif fault in ("version", "version-garbage"):
            if fault == "version":
                value = str(draw(st.integers(0, 300).filter(lambda v: v != 13))).encode()
            else:
                value = draw(st.sampled_from([b"", b"13.0", b"13,8", b"thirteen", b"0x0d", b"1 3", b"-13",
                                              b"\xd9\xa1\xd9\xa3"]))
            for i in _find(headers, b"sec-websocket-version"):
                headers[i] = (headers[i][0], value)
            statuses |= {400, 426}
            # RFC 6455 4.2.2 and 4.4: name the versions the server is willing to use, and only those
            must_answer["sec-websocket-version"] = "13"
        elif fault == "no-key":
            headers = [h for i, h in enumerate(headers) if i not in _find(headers, b"sec-websocket-key")]
            statuses.add(400)
        elif fault == "two-keys":
            headers += [(b"Sec-WebSocket-Key", key)] * 2
            statuses.add(400)
        elif fault == "key":
            bad = draw(st.sampled_from([key[:-1], key + b"A", key[:-2] + b"AA", b"!" + key[1:], key[:10], b""]))
            for i in _find(headers, b"sec-websocket-key"):
                headers[i] = (headers[i][0], bad)
            statuses.add(400)
        elif fault == "header-name":
            raw_lines.append(draw(st.sampled_from([b"X Pad: 1", b"X-Pad : 1", b"(x): 1", b": 1", b"X\x00: 1",
                                                   b"X\xe9: 1", b"X/Y: 1"])))
            statuses.add(400)
        elif fault == "header-value":
            raw_lines.append(b"X-Pad: a" + bytes([draw(st.sampled_from([0, 1, 8, 11, 12, 27, 31, 127]))]) + b"b")
            statuses.add(400)
        elif fault == "obs-fold":
            raw_lines += [b"X-Pad: a", draw(st.sampled_from([b" b", b"\tb"]))]
            statuses.add(400)
        elif fault == "bare-lf":
            raw_lines.append(draw(st.sampled_from([b"X-Pad: a\nX-Other: b", b"X-Pad: a\rb"])))
            statuses.add(400)
        elif fault == "no-colon":
            raw_lines.append(b"X-Pad")
            statuses.add(400)
    if draw(st.integers(0, 9)) == 0:  # too large a request (the tests use a small --max-handshake-size)
        raw_lines.append(b"X-Pad: " + b"p" * draw(st.integers(1000, 5000)))
    target = draw(targets(max_channel_length))
    return Request(method, target, version, headers, key, statuses, raw_lines, must_answer)


def check_handshake(server: Server, request: Request, cuts: Sequence[int]) -> Peer:
    """Send ``request`` in pieces and check the answer: a 101 that opens the socket on the right channel, or
    a refusal with one of the allowed statuses that ends the connection and echoes nothing of the request."""
    data = request.encode()
    expected = request.expected(server.factory.options.max_handshake_size)
    note(f"request: {data[:300]!r}, expected: {expected}")
    peer = server.connect()
    peer.send_chunks(data, cuts)
    if not peer.output and not peer.lost:
        server.advance(server.factory.options.open_handshake_timeout + 1)  # no answer: it must time out
    assert peer.output, f"no answer at all (lost={peer.lost})"
    status, headers, rest = split_response(peer.output)
    assert status in expected, f"status {status}, expected one of {expected}: {peer.output[:200]!r}"
    if status == OK:
        accept = base64.b64encode(hashlib.sha1(request.key + GUID).digest()).decode()
        assert headers["sec-websocket-accept"] == accept
        assert "server" not in headers
        assert not peer.lost and peer.proto.state == peer.proto.STATE_OPEN
        assert peer.proto.key == request.target.key
        assert server.factory.sockets(request.target.key) == 1 + (request.target.key == BYSTANDER_CHANNEL)
    else:
        assert 400 <= status < 600 and status != 500, status
        assert peer.lost, "a refused handshake left the connection open"
        assert not rest, f"a body after a refusal: {rest[:100]!r}"
        head = peer.output.split(b"\r\n\r\n", 1)[0]
        base = (b"host", b"upgrade", b"connection", b"sec-websocket-key", b"sec-websocket-version")
        extra = [v for n, v in request.headers if n.strip().lower() not in base]
        for value in [request.target.raw, *extra, *request.raw_lines]:
            value = value.strip(b" \t")
            if len(value) >= 8:
                assert value not in head, f"the refusal echoes the request: {head!r}"
        if status == 426:
            assert headers.get("sec-websocket-version") == "13"
    for name, value in request.must_answer.items():
        if status != OK and name in headers:
            assert headers[name] == value, f"{name}: {headers[name]!r}, expected {value!r}"
    return peer


@settings(max_examples=scaled(150))
@given(requests(), st.lists(st.integers(0, 6000), max_size=5), st.sampled_from([1024, 2048, 4096]))
@example(  # Sec-WebSocket-Version 7 is refused naming versions "13,8", though version 8 is refused too
    Request(b"GET", Target(b"/news", b"news", set()), b"HTTP/1.1",
            [(b"Host", b"127.0.0.1"), (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
             (b"Sec-WebSocket-Key", KEY), (b"Sec-WebSocket-Version", b"7")], KEY, {400, 426},
            must_answer={"sec-websocket-version": "13"}),
    [], 2048)
def test_handshake_requests(request: Request, cuts: list[int], max_handshake_size: int) -> None:
    """Request lines, targets and headers, valid or broken, in any pieces: a good request opens a socket on
    the channel its path names, anything else gets the right 4xx (or 505) and is closed, nothing of the
    request is echoed, nothing is logged as an error, and the bystander is unaffected."""
    with serving(max_handshake_size=max_handshake_size) as server, captured_log() as events:
        peer = check_handshake(server, request, cuts)
        peer.disconnect()
        assert_bystander_unaffected(server)
    assert_clean_log(events)


#: an offer browsers send (Chromium, Firefox, Safari, Node's ws, Python's websockets)
BROWSER_OFFERS = ("permessage-deflate; client_max_window_bits", "permessage-deflate")


@st.composite
def extension_offer(draw: Any) -> str:
    name = draw(st.sampled_from(["permessage-deflate", "permessage-deflate", "x-webkit-deflate-frame", "foo",
                                 "PerMessage-Deflate", "", "permessage-deflate;"]))
    params = draw(st.lists(st.sampled_from([
        "client_max_window_bits", "client_max_window_bits=10", "client_max_window_bits=15",
        "client_max_window_bits=8", "client_max_window_bits=16", "client_max_window_bits=0",
        "server_max_window_bits=9", "server_max_window_bits=15", "server_max_window_bits=8",
        "server_max_window_bits=7", "server_max_window_bits", "server_no_context_takeover",
        "client_no_context_takeover", 'client_max_window_bits="12"', "mem_level=3", "x=1", '"', "=", " ",
        "server_max_window_bits=1x", "client_max_window_bits=10=11"]), max_size=4))
    return "; ".join([name, *params])


@dataclass
class OriginCase:
    """An Origin header value and whether the policy ``patterns`` lets it in (``None``: malformed)."""

    value: str
    allowed: bool | None


ORIGIN_POLICIES = (("*",), ("https://app.example:443",), ("https://*.example:443", "http://localhost:8080"))


def origin_allowed(patterns: Sequence[str], scheme: str, host: str, port: int | None) -> bool:
    """The documented rule: ``scheme://host:port`` (port filled in for http and https) matches a pattern,
    ``*`` matching anything."""
    import re

    if "*" in patterns:
        return True
    port = port if port is not None else {"https": 443, "http": 80}.get(scheme.lower())
    if port is None:
        return False
    origin = f"{scheme.lower()}://{host.lower()}:{port}"
    return any(re.fullmatch(".*".join(re.escape(p) for p in pattern.split("*")), origin) for pattern in patterns)


@st.composite
def origins(draw: Any, patterns: Sequence[str]) -> OriginCase:
    if draw(st.integers(0, 4)) == 0:
        value, allowed = draw(st.sampled_from([
            ("null", True), ("file://", True), ("", None), ("https://", None), ("https://app.example:99999", None),
            ("https://[::1", None), ("app.example", None), ("https://app.example:x", None)]))
        if allowed is True:  # file pages and sandboxes: only when any origin is allowed
            allowed = "*" in patterns
        return OriginCase(value, allowed if allowed is not None or "*" not in patterns else None)
    scheme = draw(st.sampled_from(["https", "http", "HTTPS", "ws", "wss"]))
    host = draw(st.sampled_from(["app.example", "APP.Example", "evil.example", "app.example.evil", "sub.app.example",
                                 "localhost", "app-example", "example"]))
    port = draw(st.sampled_from([None, 443, 80, 8080, 8443, 1, 0]))
    value = f"{scheme}://{host}" + (f":{port}" if port is not None else "") + draw(st.sampled_from(["", "/", "/x"]))
    return OriginCase(value, origin_allowed(patterns, scheme, host, port))


@dataclass
class BrowserCase:
    policy: tuple[str, ...]
    offers: list[str]
    #: the offers in two Sec-WebSocket-Extensions headers
    split: bool
    origin: OriginCase | None


@st.composite
def browser_cases(draw: Any) -> BrowserCase:
    policy = draw(st.sampled_from(ORIGIN_POLICIES))
    offers = draw(st.lists(extension_offer(), max_size=3))
    split = draw(st.booleans()) if len(offers) > 1 else False
    return BrowserCase(policy, offers, split, draw(st.one_of(st.none(), origins(policy))))


@settings(max_examples=scaled(120))
@given(st.booleans(), browser_cases())
@example(  # RFC 6455 9.1: two Sec-WebSocket-Extensions headers mean the same as one with both values
    True, BrowserCase(("*",), ["permessage-deflate; client_max_window_bits", "foo"], split=True, origin=None))
@example(  # port 0 is taken for "no port": https://app.example:0 passes for https://app.example:443
    False, BrowserCase(("https://app.example:443",), [], split=False,
                       origin=OriginCase("https://app.example:0", allowed=False)))
def test_extension_offers_and_origins(compression: bool, case: BrowserCase) -> None:
    """Any Sec-WebSocket-Extensions offers (odd, broken, duplicated headers) never refuse a handshake:
    a usable permessage-deflate offer is answered when compression is on, nothing otherwise; and an Origin
    gets in exactly when --allowed-origin matches it (403 otherwise, 400 when it is malformed)."""
    offers, split, origin, policy = case.offers, case.split, case.origin, case.policy
    extra = b""
    if offers:
        groups = [offers[:1], offers[1:]] if split else [offers]
        extra += b"".join(b"Sec-WebSocket-Extensions: %s\r\n" % ", ".join(g).encode() for g in groups)
    if origin is not None:
        extra += b"Origin: %s\r\n" % origin.value.encode()
    with serving(compression=compression, allowed_origins=policy) as server, captured_log() as events:
        peer = server.connect()
        peer.send(upgrade(b"/room", extra))
        status, headers, _ = split_response(peer.output)
        if origin is not None and origin.allowed is None:
            assert status in (400, 403)
        elif origin is not None and not origin.allowed:
            assert status == 403
        else:
            assert status == OK, f"{status}: {peer.output[:100]!r}"
            answer = headers.get("sec-websocket-extensions")
            deflate = _private.negotiated_deflate(peer.proto)
            assert (answer is not None) == (deflate is not None)
            if not compression:
                assert answer is None
            else:
                deflate_offers = [o for o in ", ".join(offers).split(",")
                                  if o.split(";")[0].strip().lower() == "permessage-deflate"]
                if deflate_offers and deflate_offers[0].strip() in BROWSER_OFFERS:
                    assert answer is not None, f"a browser's offer was declined: {offers}"
                if answer is not None:
                    assert answer.startswith("permessage-deflate; server_no_context_takeover")
            assert peer.proto.key == b"room"
        if status != OK:
            assert peer.lost
        peer.disconnect()
        assert_bystander_unaffected(server)
    assert_clean_log(events)


# -- tokens ---------------------------------------------------------------------------------

LEEWAY = 30


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: Any, claims: Any, signature: bytes = b"") -> str:
    """A JWT built by hand (any header, any claims, any signature), for what PyJWT will not mint."""
    def part(value: Any) -> str:
        return _b64(value if isinstance(value, bytes) else json.dumps(value).encode())
    return f"{part(header)}.{part(claims)}.{_b64(signature)}"


@dataclass
class TokenCase:
    """A token (or none), where it is sent, the channel asked for, and what the server must answer."""

    kind: str
    token: str | None
    channel: str
    status: int
    #: how the token travels: "query", "query-encoded", "bearer" (scheme in any case), "both", "basic"
    place: str = "query"
    user: str | None = None

    def request(self) -> bytes:
        target = b"/" + self.channel.encode()
        extra = b""
        token = self.token or ""
        if self.place in ("query", "both"):
            target += b"?x=1&token=" + token.encode()
        elif self.place == "query-encoded":
            from urllib.parse import quote

            target += b"?token=" + quote(token, safe="").encode()
        if self.place in ("bearer", "both"):
            scheme = b"Bearer" if self.place == "both" else b"bEaReR"
            extra = b"Authorization: %s %s\r\n" % (scheme, token.encode())
        if self.place == "basic":
            extra = b"Authorization: Basic %s\r\n" % base64.b64encode(b"u:" + token.encode())
        return upgrade(target, extra)


@st.composite
def token_cases(draw: Any, now: float) -> TokenCase:
    """Valid tokens minted with PyJWT (any HMAC algorithm, patterns that cover the channel or not) and
    near-valid ones: tampered, another key, 'none' and other algorithms, missing, expired, not yet valid,
    claims of the wrong type, another audience; and garbage."""
    channel = draw(st.sampled_from(["room/1", "rooms/a/b", "user/42", "a"]))
    covering = {"room/1": ["room/1", "room/*", "*"], "rooms/a/b": ["rooms/*", "rooms/a/*", "rooms/a/b", "*"],
                "user/42": ["user/42", "user/*", "*"], "a": ["a", "*"]}[channel]
    patterns = draw(st.lists(st.sampled_from(["other", "room/2", "rooms", "rooms/a", "user/4", "user/42/x", "b/*"]),
                             max_size=2))
    covered = draw(st.booleans())
    if covered:
        patterns.append(draw(st.sampled_from(covering)))
    claims: dict[str, Any] = {"exp": int(now + draw(st.integers(60, 10**6))), "channels": patterns}
    user = draw(st.one_of(st.none(), st.text(st.sampled_from(PCHARS), min_size=1, max_size=8)))
    if user is not None:
        claims["sub"] = user
    if draw(st.booleans()):
        claims["iat"] = int(now - draw(st.integers(0, 1000)))
    alg = draw(st.sampled_from(["HS256", "HS384", "HS512"]))
    kind = draw(st.sampled_from([
        "valid", "valid", "valid", "tampered", "bad-signature", "other-key", "alg-none", "alg-other", "no-alg",
        "no-exp", "expired",
        "within-leeway", "not-yet", "iat-future", "exp-string", "exp-huge", "exp-float", "exp-null", "exp-bool",
        "channels-string", "channels-dict", "channels-mixed", "no-channels", "sub-int", "audience", "issuer",
        "garbage", "missing", "header-list", "kid-int"]))
    status = 101 if covered else 403
    secret = SECRET
    token: str | None = None
    if kind == "tampered":
        claims["channels"] = ["*"]
        good = jwt.encode({**claims, "channels": []}, SECRET, algorithm=alg)
        head, _, sig = good.split(".")
        token = f"{head}.{_b64(json.dumps(claims).encode())}.{sig}"
        status = 401
    elif kind == "bad-signature":
        head, body, sig = jwt.encode(claims, SECRET, algorithm=alg).split(".")
        forged = _b64(draw(st.binary(min_size=1, max_size=64)))
        token = f"{head}.{body}.{forged if forged != sig else forged[::-1] + 'A'}"
        status = 401
    elif kind == "other-key":
        secret, status = OTHER_SECRET, 401
    elif kind == "alg-none":
        name = draw(st.sampled_from(["none", "None", "NONE", "nOnE"]))
        token = unsigned_token({"alg": name, "typ": "JWT"}, claims, draw(st.sampled_from([b"", b"x"])))
        status = 401
    elif kind == "alg-other":
        name = draw(st.sampled_from(["RS256", "ES256", "EdDSA", "PS512", "HS1", "hs256", "", "HS256 "]))
        token = unsigned_token({"alg": name}, claims, draw(st.binary(max_size=64)))
        status = 401
    elif kind == "no-alg":
        token = unsigned_token(draw(st.sampled_from([{}, {"typ": "JWT"}, {"alg": 256}, {"alg": None}])), claims)
        status = 401
    elif kind == "header-list":
        token = unsigned_token([1, 2], claims, b"sig")
        status = 401
    elif kind == "kid-int":
        token = unsigned_token({"alg": alg, "kid": 7}, claims, b"sig")
        status = 401
    elif kind == "no-exp":
        del claims["exp"]
        status = 401
    elif kind == "expired":
        claims["exp"] = int(now - LEEWAY - draw(st.integers(2, 10**6)))
        status = 401
    elif kind == "within-leeway":
        claims["exp"] = int(now - LEEWAY + draw(st.integers(2, LEEWAY - 2)))
    elif kind == "not-yet":
        claims["nbf"] = int(now + LEEWAY + draw(st.integers(2, 10**6)))
        status = 401
    elif kind == "iat-future":
        claims["iat"] = int(now + LEEWAY + draw(st.integers(2, 10**6)))
        status = 401
    elif kind == "exp-string":
        claims["exp"] = draw(st.sampled_from([str(claims["exp"]), "soon", ""]))
        status = 401
    elif kind == "exp-huge":  # an integer no float holds: still a number of seconds, far away
        claims["exp"] = 10 ** draw(st.integers(309, 400))
        status = 401
    elif kind == "exp-float":
        claims["exp"] = claims["exp"] + 0.5
    elif kind == "exp-null":
        claims["exp"] = None
        status = 401
    elif kind == "exp-bool":
        claims["exp"] = True
        status = 401
    elif kind == "channels-string":
        claims["channels"] = channel
        status = 401
    elif kind == "channels-dict":
        claims["channels"] = {channel: True}
        status = 401
    elif kind == "channels-mixed":
        claims["channels"] = [channel, 7]
        status = 401
    elif kind == "no-channels":
        del claims["channels"]
        status = 403
    elif kind == "sub-int":  # RFC 7519 4.1.2: a StringOrURI
        claims["sub"] = 42
        status = 401
    elif kind == "audience":
        claims["aud"] = "another-service"
        status = 401
    elif kind == "issuer":
        claims["iss"] = "whoever"  # no --auth-issuer: not checked
    elif kind == "garbage":
        token = draw(st.one_of(st.text(st.sampled_from(PCHARS + "."), min_size=1, max_size=60),
                               st.just("a.b.c"), st.just(".."), st.just("eyJ.eyJ.")))
        status = 401
    elif kind == "missing":
        status = 401
    if token is None and kind != "missing":
        token = jwt.encode(claims, secret, algorithm=alg)
    place = draw(st.sampled_from(["query", "query-encoded", "bearer", "both", "basic"]))
    if place == "basic":
        status = 401  # not a bearer token: no token at all
    return TokenCase(kind, token, channel, status, place, user if status == 101 else None)


@settings(max_examples=scaled(150))
@given(st.data())
@example(  # a signed token whose exp is an integer too large for a float: 500 and a logged traceback
    data=TokenCase("exp-huge", jwt.encode({"exp": 10**400, "channels": ["room/1"]}, SECRET, algorithm="HS256"),
                   "room/1", 401))
def test_tokens(data: Any) -> None:
    """Tokens in ?token= or Authorization, valid, near-valid or garbage: a valid token that covers the
    channel opens it (for its sub), others get 401 or 403 (never 500, never a 101), the token never reaches
    the log, and the bystander is unaffected."""
    with serving(auth_secret=SECRET, auth_leeway=LEEWAY) as server, captured_log() as events:
        case = data if isinstance(data, TokenCase) else data.draw(token_cases(server.clock.seconds()))
        note(f"{case}")
        peer = server.connect()
        peer.send(case.request())
        status, _, _ = split_response(peer.output)
        assert status == case.status, f"{case.kind}: {status}, expected {case.status}: {peer.output[:80]!r}"
        if status == 101:
            assert peer.proto.key == case.channel.encode() and peer.proto.user == case.user
        else:
            assert peer.lost
        peer.disconnect()
        assert_bystander_unaffected(server)
    assert_clean_log(events, secrets=[case.token or ""])


# -- a thin layer on real sockets -------------------------------------------------------------


def _read_response(sock: socket.socket) -> tuple[bytes, bool]:
    """Read until the end of an HTTP response head, or EOF; return the bytes and whether EOF came."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data, True
        data += chunk
    return data, False


def _read_until_eof(sock: socket.socket, data: bytes = b"") -> bytes:
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def _frames_so_far(data: bytes) -> list[Frame]:
    """The complete server frames at the start of ``data``."""
    frames, rest = [], data
    while len(rest) >= 2:
        n, start = rest[1] & 0x7F, 2
        if n == 126:
            if len(rest) < 4:
                break
            n, start = struct.unpack("!H", rest[2:4])[0], 4
        elif n == 127:
            if len(rest) < 10:
                break
            n, start = struct.unpack("!Q", rest[2:10])[0], 10
        if len(rest) < start + n:
            break
        frames += server_frames(rest[: start + n])
        rest = rest[start + n:]
    return frames


def real_exchange(port: int, request: bytes, bursts: Sequence[bytes] = (), replies: int = 0) -> tuple[bytes, bytes]:
    """
    Blocking, in a thread: send a handshake; after a 101 send ``bursts`` and read until ``replies`` data or
    pong frames or a close frame have come, then answer a close with a close (or start one) and read until
    the server ends the connection.  Every read times out after 5 s: a hang fails.

    :return: the response head and everything after it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        data, eof = _read_response(sock)
        head, _, rest = data.partition(b"\r\n\r\n")
        if eof or not head.startswith(b"HTTP/1.1 101 "):
            return head, _read_until_eof(sock, rest)
        for burst in bursts:
            sock.sendall(burst)
        while True:
            frames = _frames_so_far(rest)
            if any(f.opcode == CLOSE_OP for f in frames) or len(frames) >= replies:
                break
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                # a failed connection can end in a reset, which may take its close frame along
                return head, rest + RESET
            if not chunk:
                return head, rest
            rest += chunk
        try:
            sock.sendall(CLIENT_CLOSE)
        except OSError:  # the server has already ended the connection
            pass
        return head, _read_until_eof(sock, rest)


REAL_LIMITS = Limits(max_message_size=300, max_fragments=4, frame_burst=10**9, rate=1e9)
#: what :func:`real_exchange` appends when the server's reset ended the reading
RESET = b"<reset>"


def _fuzz_real_sockets(port: int) -> None:
    """The real-socket properties, run in a thread (blocking sockets; hypothesis drives them)."""

    @settings(max_examples=scaled(12))
    @given(requests())
    def handshakes(request: Request) -> None:
        expected = request.expected(2048)
        head, rest = real_exchange(port, request.encode())
        assert head, "no answer"
        status = int(head.split(b" ")[1])
        assert status in expected, f"{status}, expected {expected}: {head[:100]!r}"

    @settings(max_examples=scaled(12))
    @given(scripts(deflate=False, limits=REAL_LIMITS, truncate=False))
    def frames(script: Script) -> None:
        expected = model(script)
        closes = expected.close is not None or expected.client_closed
        # the frames up to the one that ends the socket (more would only meet a reset connection)
        sent = b"".join(f.encode() for f in [f for burst in script.bursts for f in burst][:expected.frames_used])
        head, rest = real_exchange(port, upgrade(b"/echo"), [sent], len(expected.replies) + closes)
        assert head.startswith(b"HTTP/1.1 101 ")
        if rest.endswith(RESET):
            # the server failed the connection (a protocol error) and its reset may have discarded the
            # close frame: the replies before it must still be the expected ones
            assert expected.close is not None, "a reset where the model expects no failure"
            got = [f for f in _frames_so_far(rest[: -len(RESET)]) if f.opcode != CLOSE_OP]
            assert [(f.opcode, f.payload) for f in got] == expected.replies[: len(got)]
            return
        got = server_frames(rest)
        closes = [i for i, f in enumerate(got) if f.opcode == CLOSE_OP]
        assert closes == [len(got) - 1], f"the server did not end with one close frame: {got}"
        assert [(f.opcode, f.payload) for f in got[:-1]] == expected.replies
        if expected.close is not None:
            assert got[-1].close_code == expected.close

    handshakes()
    frames()


@pytest_twisted.ensureDeferred
async def test_real_sockets(run_service: Any) -> None:
    """Against a real service on 127.0.0.1 (a few examples): handshakes get the statuses and frame scripts
    the replies and close codes the in-memory properties expect, every connection ends by itself, and a
    bystander socket still gets a published message afterwards."""
    from wsclient import connect

    svc = await run_service(
        max_handshake_size=2048, listeners=("listeners:Echo",), max_message_size=REAL_LIMITS.max_message_size,
        max_fragments=REAL_LIMITS.max_fragments, frame_burst=REAL_LIMITS.frame_burst,
        max_frames_per_second=REAL_LIMITS.rate)
    bystander = await connect(svc.ws_port, "/news")
    with captured_log() as events:
        await deferToThread(_fuzz_real_sockets, svc.ws_port)
        await svc.publish("still here", "news")
        assert await bystander.next_text() == "still here"
        await wait_for(lambda: len(svc.factory.connections) == 1)
    assert_clean_log(events)


# -- after the server starts a close; with --close-handshake-timeout 0 -----------------------------------


@settings(max_examples=scaled(60))
@given(st.sampled_from(["shutdown", "token expired"]), scripts(deflate=False, truncate=False))
@example(  # a data frame in flight when the server closes: AttributeError 'frame_data' out of dataReceived
    "token expired", Script(Limits(100, 2, 10), [[ClientFrame(TEXT_OP, b"hi")]], [[]]))
@example("shutdown", Script(Limits(100, 2, 10), [[ClientFrame(BINARY_OP, b"", fin=False), ClientFrame(CONT, b"x")]],
                            [[]]))
def test_frames_after_the_server_closes(why: str, script: Script) -> None:
    """Whatever a client still sends after the server started a close (1012 or 1001 at shutdown, 4001 when its
    token expires) is ignored: no reply, no second close, nothing logged, and the connection ends at the client's
    close reply or when --close-handshake-timeout runs out."""
    limits = script.limits
    with serving(auth_secret=SECRET, auth_leeway=1, **limits.settings()) as server, captured_log() as events:
        now = server.clock.seconds()
        token = jwt.encode({"exp": int(now) + 5, "channels": ["room/*"]}, SECRET, algorithm="HS256")
        peer, start = open_peer(server, b"/room/1?token=" + token.encode())
        if why == "shutdown":  # close_for_shutdown (1012 or 1001); close_going_away (1001) before it
            shutdown = getattr(peer.proto, "close_for_shutdown", None) or peer.proto.close_going_away
            shutdown()
        else:
            server.advance(7)
        frames = server_frames(peer.output[start:])
        assert [f.opcode for f in frames] == [CLOSE_OP]
        assert frames[0].close_code in ((1001, 1012) if why == "shutdown" else (4001,))
        for data, cuts in zip(script.wire(), script.cuts, strict=True):
            peer.send_chunks(data, cuts)
        assert server_frames(peer.output[start:]) == frames, "the server sent something after its close frame"
        peer.send(CLIENT_CLOSE)
        server.advance(server.factory.options.close_handshake_timeout + 0.1)
        assert peer.lost
        assert_bystander_unaffected(server)
    assert_clean_log(events, secrets=[token])


@settings(max_examples=scaled(40))
@given(scripts(deflate=False).filter(lambda s: model(s).close is not None))
@example(Script(Limits(100, 2, 10), [[ClientFrame(TEXT_OP, b"hi", mask=None)]], [[]]))  # unmasked: 1002
def test_failed_socket_dropped_without_close_handshake_timeout(script: Script) -> None:
    """With --close-handshake-timeout 0 (do not wait for the client's close frame, as for slow readers), a
    socket failed for a protocol error or a limit is dropped after its close frame even if the client never
    answers: it must not stay open, and counted against --max-connections, for ever."""
    with serving(close_handshake_timeout=0, **script.limits.settings()) as server, captured_log() as events:
        peer, start = open_peer(server)
        for i, (data, cuts) in enumerate(zip(script.wire(), script.cuts, strict=True)):
            if i:
                server.advance(script.limits.refill)
            peer.send_chunks(data, cuts)
        assert server_frames(peer.output[start:])[-1].close_code == model(script).close
        server.advance(3600)
        assert peer.lost, "a failed socket stays open for ever when the client does not answer its close frame"
        assert_bystander_unaffected(server)
    assert_clean_log(events)
