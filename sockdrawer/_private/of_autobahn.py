"""The private state of autobahn that sockdrawer relies on (see :mod:`sockdrawer._private`)."""

from __future__ import annotations

import pprint
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import Any

import autobahn.twisted.websocket
import autobahn.websocket.protocol
import autobahn.websocket.utf8validator
from autobahn import util
from autobahn.exception import PayloadExceededError
from autobahn.websocket.types import ConnectionDeny, ConnectionRequest
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from sockdrawer.core.logs import QUIET, lazy_text

#: Attributes Autobahn's server keeps from the opening handshake and never
#: reads once the socket is open.
HANDSHAKE_STATE = (
    "http_headers", "http_request_data", "http_status_line", "http_request_uri", "http_request_path",
    "http_request_params", "http_request_host", "websocket_protocols", "websocket_extensions", "websocket_origin",
    "_wskey", "http_response_data",
    # the server reads it in _onOpen (TLS details) and never after; transport_details reads None then
    "_transport_details",
    "websocket_extensions_in_use",  # only read while negotiating
)

#: Attributes Autobahn sets on every connection (in ``_connectionMade`` and
#: the handshake, before any read) whose values usually stay these defaults:
#: as class attributes they need no room in each idle socket's dict.
COMPACT_DEFAULTS: dict[str, Any] = {
    name: False
    for name in (
        "triggered", "wasMaxFramePayloadSizeExceeded", "wasMaxMessagePayloadSizeExceeded",
        "closedByMe", "failedByMe", "droppedByMe", "wasClean", "wasServerConnectionDropTimeout",
        "wasOpenHandshakeTimeout", "wasCloseHandshakeTimeout", "wasServingFlashSocketPolicyFile",
        "inside_message",
    )
}
COMPACT_DEFAULTS.update(
    (name, None)
    for name in (
        "_perMessageCompress", "trackedTimings", "wasNotCleanReason", "localCloseCode",
        "localCloseReason", "remoteCloseCode", "remoteCloseReason", "openHandshakeTimeoutCall",
        "closeHandshakeTimeoutCall", "autoPingTimeoutCall", "autoPingPending", "autoPingPendingSent",
        "websocket_protocol_in_use", "current_frame", "autoPingPendingCall",
    )
)
COMPACT_DEFAULTS.update(
    send_state=autobahn.websocket.protocol.WebSocketProtocol.SEND_STATE_GROUND,
    autoPingPendingSeq=0,
    data=b"",
    websocket_version=13,
)


class _Lazy:
    """A class attribute that gives each instance its own ``make()`` on first access (a non-data descriptor)."""

    __slots__ = ("_name", "_make")

    def __init__(self, name: str, make: Callable[[], Any]) -> None:
        self._name = name
        self._make = make

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        value = obj.__dict__[self._name] = self._make()
        return value


class _EmptySendQueue:
    """
    What an idle connection's ``send_queue`` reads as: empty, and a real
    ``deque`` on the connection from the first ``append`` (Autobahn only
    calls ``len``, ``append`` and ``popleft`` on it).
    """

    __slots__ = ("_proto",)

    def __init__(self, proto: Any) -> None:
        self._proto = proto

    def __len__(self) -> int:
        return 0

    def append(self, item: Any) -> None:
        self._proto.__dict__["send_queue"] = deque([item])

    def popleft(self) -> Any:
        raise IndexError("pop from an empty deque")


class _SendQueue:
    __slots__ = ()

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        return self if obj is None else _EmptySendQueue(obj)


def _pristine_queue(value: Any) -> bool:
    return type(value) is deque and not value


def _any(value: Any) -> bool:
    return True


def _no_listeners_results(value: Any) -> bool:
    return type(value) is dict and value == {"message": None}


def _no_listeners_events(value: Any) -> bool:
    return type(value) is list and value == ["message"]


def _fired_with_none(value: Any) -> bool:
    return type(value) is Deferred and value.called and value.result is None


def _pending(value: Any) -> bool:
    return type(value) is Deferred and not value.called


def _opened() -> Deferred[None]:
    return succeed(None)


#: Per-connection objects Autobahn makes in ``_connectionMade`` that an
#: idle socket never uses, each with when it may be dropped from an open
#: connection: a class attribute then makes a fresh one on first use.
#: ``send_queue`` (a 760-byte ``deque``) is used only for chopped or ``sync``
#: sends; ``trafficStats`` only counts (nothing reads it); ``utf8validator``
#: is reset at the start of each incoming text message; ``_valid_events``
#: and ``_results`` are the same ``["message"]`` and ``{"message": None}``
#: on every connection until someone calls ``.on()``; ``is_open`` has fired
#: (with ``None``) once the connection is open, and ``is_closed`` fires only
#: at the close: nobody waits on either on a server connection (Autobahn's
#: server side adds no callbacks, only its client's ``connectWS`` does, and
#: sockdrawer adds none), so a fresh one on first use (a fired one, a
#: pending one) is the same to whoever reads it.
LAZY_STATE: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    "is_open": (_Lazy("is_open", _opened), _fired_with_none),
    "is_closed": (_Lazy("is_closed", Deferred), _pending),
    "send_queue": (_SendQueue(), _pristine_queue),
    "trafficStats": (_Lazy("trafficStats", autobahn.websocket.protocol.TrafficStats), _any),
    "utf8validator": (_Lazy("utf8validator", autobahn.websocket.utf8validator.Utf8Validator), _any),
    "_results": (_Lazy("_results", lambda: {"message": None}), _no_listeners_results),
    "_valid_events": (("message",), _no_listeners_events),
}


_HANDSHAKE_NAMES = frozenset(HANDSHAKE_STATE)
#: what a Sec-WebSocket-Key may hold before its "==" (Autobahn's own list)
_KEY_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/")
#: every default is a hashable constant (False, None, 0, b""), of a type no
#: other type's value compares equal to except bool and int (never mixed here)
_COMPACT_ITEMS = frozenset(COMPACT_DEFAULTS.items())


def install_compact_defaults(cls: type) -> None:
    """Make :data:`COMPACT_DEFAULTS` and :data:`LAZY_STATE` class attributes of the protocol class ``cls``."""
    for name, default in COMPACT_DEFAULTS.items():
        setattr(cls, name, default)
    for name, (default, _) in LAZY_STATE.items():
        setattr(cls, name, default)
    for name in FRAME_STATE:
        setattr(cls, name, None)
    cls._transport_details = None  # type: ignore[attr-defined]  # dropped with the handshake state


def compact(proto: Any) -> None:
    """
    Shrink an open connection's instance dict: drop the opening handshake
    (:data:`HANDSHAKE_STATE`, never read again once open), every attribute
    that holds its class default (:data:`COMPACT_DEFAULTS`, and the factory
    when the class holds it), and the per-connection objects of
    :data:`LAZY_STATE` an idle socket does not use; then rebuild the dict
    (deleting keys never shrinks one).  Called once the handshake is over
    (after Autobahn has fired ``is_open``), so nothing Autobahn sets while
    opening comes back.

    Assumption: Autobahn reads none of :data:`HANDSHAKE_STATE` after the
    opening handshake, falls back to class attributes for the others, and
    uses :data:`LAZY_STATE` as described there.
    """
    state = proto.__dict__
    # what goes, as sets made in C: (name, value) pairs equal to a default take one lookup per default
    drop = {name for name, _ in state.items() & _COMPACT_ITEMS}
    drop |= _HANDSHAKE_NAMES
    if state.get("factory", drop) is getattr(type(proto), "factory", None):
        drop.add("factory")  # the class holds it (options_as_class)
    if state.get("_listeners") is None:
        drop.update(name for name in LAZY_STATE.keys() & state.keys() if LAZY_STATE[name][1](state[name]))
    # a new dict of what stays (deleting keys never shrinks one)
    proto.__dict__ = {name: state[name] for name in state.keys() - drop}


#: What Autobahn keeps of the last frame and message it received: each is
#: set again before it is read, when the next frame or message begins.
FRAME_STATE = (
    "current_frame_masker", "frame_length", "frame_data", "control_frame_data", "message_is_binary",
    "message_data", "message_data_total_length", "_isMessageCompressed", "utf8validateIncomingCurrentMessage",
    "utf8validateLast",
)


def settle(proto: Any, own: tuple[str, ...] = ()) -> None:
    """
    After a read: if the open connection is between frames (no frame or
    message begun, nothing buffered) and holds what the last frame left
    (:data:`FRAME_STATE`), drop it and compact again (:func:`compact`), so a
    socket that sent a few messages (a subscribe, a pong) idles as small as
    one that sent none.  ``own`` names the caller's per-message attributes
    to drop with them.

    Assumption: Autobahn sets each name of :data:`FRAME_STATE` at the start
    of a frame (``current_frame_masker``, ``frame_length``, ``frame_data``,
    ``control_frame_data``) or of a message (the others) before it reads it,
    and ``current_frame`` is ``None``, ``inside_message`` false and ``data``
    empty between frames.
    """
    state = proto.__dict__
    if "current_frame_masker" not in state or state.get("current_frame") is not None or state.get("data") \
            or state.get("inside_message"):
        return
    for name in FRAME_STATE + own:
        state.pop(name, None)
    compact(proto)


def options_as_class(base: type, factory: Any) -> type:
    """
    A subclass of the protocol class ``base`` that holds the factory's
    current protocol options, and the factory, as class attributes, with
    nothing to copy per connection.

    Assumption: Autobahn's ``_connectionMade`` copies each name in the
    protocol's ``CONFIG_ATTRS`` from the factory onto the connection; an
    empty ``CONFIG_ATTRS`` copies nothing.  Options that are functions
    (``perMessageCompressionAccept``) are wrapped in ``staticmethod``: stored
    on a class, a plain function would become a method.
    """
    options: dict[str, Any] = {}
    for name in base.CONFIG_ATTRS:  # type: ignore[attr-defined]
        value = getattr(factory, name)
        options[name] = staticmethod(value) if callable(value) else value
    options["CONFIG_ATTRS"] = ()
    options["factory"] = factory  # each connection's too (buildProtocol): compact() drops the copy
    return type(base.__name__, (base,), options)


def feed(proto: Any, data: bytes) -> None:
    """
    Hand received bytes to Autobahn's protocol machine, without the debug
    line its public ``dataReceived`` formats for each read.

    Assumption: ``dataReceived`` is a log line around ``_dataReceived``.
    """
    proto._dataReceived(data)


def raw_request_target(proto: Any) -> str:
    """
    The request target exactly as the client sent it (``/a;b//c?x=1``).

    Assumption: Autobahn keeps it in ``http_request_uri`` before it calls
    ``onConnect`` (its ``request.path`` went through ``urlparse``, which
    drops ``;params`` and reads ``//a/b`` as a host).
    """
    target: str = proto.http_request_uri
    return target


def set_extension_offers(proto: Any, offers: list[tuple[str, Any]]) -> None:
    """
    Replace the extension offers Autobahn will negotiate for a handshake in
    progress (called from ``onConnect``).

    Assumption: ``processHandshake`` stores the parsed
    ``Sec-WebSocket-Extensions`` offers in ``websocket_extensions`` before
    ``onConnect``, and ``succeedHandshake`` negotiates from that list; an
    offer it cannot parse makes it refuse the whole handshake, where RFC
    7692 5.1 says to decline just the offer.
    """
    proto.websocket_extensions = offers


def set_connection_timer(factory: Any, timer: Any) -> None:
    """
    Make the factory's connections schedule their opening and closing
    handshake timeouts and auto-pings with ``timer`` (an object with
    ``call_later(delay, func, *args, **kwargs)`` returning something with
    ``cancel()``).

    Assumption: Autobahn schedules those through the factory's
    ``_batched_timer`` and only ever calls ``cancel()`` on what it returns.
    """
    factory._batched_timer = timer


def fail_connection(proto: Any, code: int, reason: str) -> None:
    """
    Fail an open connection the way Autobahn fails it for a protocol error:
    send a close frame with ``code``, ignore whatever the client sends after
    it, drop TCP after the close handshake timeout.

    Assumption: Autobahn's ``_fail_connection(code, reason)`` does that (it
    sets ``failedByMe``, which stops message delivery).
    """
    proto._fail_connection(code, reason)


def negotiated_deflate(proto: Any) -> Any:
    """
    The permessage-deflate state Autobahn negotiated for an open connection
    (with ``server_max_window_bits``), or ``None``.

    Assumption: Autobahn keeps it in ``_perMessageCompress``.
    """
    return proto._perMessageCompress


class _BoundedInflation:
    """Mixin for Autobahn's PerMessageDeflate: see :func:`bound_inflation`."""

    _decompressor: Any

    def decompress_message_data(self, data: bytes, max_output_len: int | None = None) -> bytes:
        out: bytes = super().decompress_message_data(data, max_output_len)  # type: ignore[misc]
        inflater = self._decompressor
        if max_output_len is not None and len(out) >= max_output_len and not inflater.unconsumed_tail:
            # zlib took all the input but may still hold output: probe it
            if inflater.decompress(b"", 1):
                raise PayloadExceededError("WebSocket message exceeds the decompression limit")
        return out


_bounded_classes: dict[type, type] = {}


def bound_inflation(deflate: Any) -> None:
    """
    Make a connection's permessage-deflate state refuse (1009) a message that
    inflates past the limit even when zlib has consumed all of its input.

    Assumption: Autobahn's ``PerMessageDeflate.decompress_message_data``
    bounds its output with ``decompress(data, max_length)`` on
    ``_decompressor`` and flags an overflow only by a leftover
    ``unconsumed_tail``, so output zlib still holds when the input is all
    consumed is silently cut (the message reaches listeners truncated).
    """
    cls = type(deflate)
    bounded = _bounded_classes.get(cls)
    if bounded is None:
        bounded = _bounded_classes[cls] = type("Bounded" + cls.__name__, (_BoundedInflation, cls), {})
    deflate.__class__ = bounded


def break_close_cycle(proto: Any) -> None:
    """
    Drop the reference cycle a closed connection keeps through Autobahn's
    ``is_closed`` Deferred (resolved with the protocol itself), so that it is
    freed by reference counting instead of waiting for a full GC pass, which
    over thousands of connections pauses the reactor for tens of ms.

    Assumption: ``is_closed`` is a Deferred attribute nobody waits on once
    it has fired.
    """
    if proto.is_closed.called:
        proto.is_closed = succeed(None)


#: the Autobahn modules whose debug-log arguments are made lazy
LAZY_LOG_MODULES = (autobahn.websocket.protocol, autobahn.twisted.websocket)


def make_log_arguments_lazy() -> None:
    """
    Autobahn computes the arguments of its debug log lines eagerly, even with
    debug logging off: ``hltype(...)``/``hlval(...)`` type names and values
    for a terminal (with click, when installed) on every connection and
    every ``sendData``; about 90 µs per handshake.  Swap the two helpers, in
    the modules that call them, for versions that format only when a line is
    written.  Log output is unchanged.  Idempotent.

    Also, ``_connectionMade`` pretty-prints the options it copied for a
    debug line on every connection; with the options on the class
    (:func:`options_as_class`) that is always an empty list, and
    ``pformat([])`` still costs a few µs: ``pformat`` in
    ``autobahn.websocket.protocol`` answers an empty list at once (the
    same ``"[]"``) and hands anything else to :func:`pprint.pformat`.

    Assumption: those modules import ``hltype`` and ``hlval`` from
    ``autobahn.util``, and ``autobahn.websocket.protocol`` imports
    ``pformat`` from ``pprint``, as module globals.
    """
    for module in LAZY_LOG_MODULES:
        for name in ("hltype", "hlval"):
            current = getattr(module, name, None)
            if current is not None and not getattr(current, "__sockdrawer_lazy__", False):
                setattr(module, name, lazy_text(getattr(util, name)))
    protocol = autobahn.websocket.protocol
    if getattr(protocol, "pformat", None) is pprint.pformat:
        protocol.pformat = _pformat  # type: ignore[attr-defined,assignment]


def _pformat(value: Any, *args: Any, **kwargs: Any) -> str:
    if type(value) is list and not value:
        return "[]"
    return pprint.pformat(value, *args, **kwargs)


_STATE_OPEN = autobahn.websocket.protocol.WebSocketProtocol.STATE_OPEN


class GuardedServerProtocol(autobahn.twisted.websocket.WebSocketServerProtocol):
    """
    Autobahn's server protocol with four of its internal steps overridden,
    each handing over to a hook a subclass defines (no-ops here):

    - ``processHandshake`` and ``succeedHandshake`` (Autobahn runs the second,
      and ``onOpen``, in a Deferred callback, where an exception would die
      unseen): either one that raises calls :meth:`handshake_error`; a
      ``succeedHandshake`` that opened calls :meth:`handshake_done`.
    - ``failHandshake(reason, code, responseHeaders)``: :meth:`refusing` may
      change all three before Autobahn writes the response (its status lines
      carry request details and exception texts) and logs the refusal, so
      one refused request is one line, not Autobahn's two.
    - ``sendCloseFrame(code, reasonUtf8, isReply)``: :meth:`closing` runs
      before it (no data frame may follow a close frame), :meth:`closed_frame`
      after it.

    Assumptions: Autobahn calls these four with these signatures, and its
    ``failHandshake`` logs only through the connection's ``log`` attribute
    (its ``dropConnection`` too), which it reads at each call (pinned in
    ``tests/test_private.py``).
    """

    def processHandshake(self) -> None:
        try:
            super().processHandshake()
        except Exception:
            self.handshake_error()

    def fast_handshake(self, data: bytes) -> bool:
        """
        Answer a plain opening handshake (``data`` starts with a whole request
        head) without Autobahn's ``processHandshake`` (its parser, ``urlparse``,
        the Deferred around ``onConnect``): only a request that passes each of
        its checks is taken, its state set the same way, then ``onConnect`` and
        Autobahn's ``succeedHandshake`` (or ``failHandshake``) run.  Anything
        else (another method or version, a header repeated or folded, non-ASCII
        bytes, a port or origin to check, a forwarded address, an extension
        header it cannot parse) returns False, untouched, for the full path.

        Assumptions (Autobahn's ``processHandshake``, pinned in
        ``tests/test_private.py``): the checks and state listed here are all it
        does before ``onConnect`` for such a request; ``_url_to_origin`` is
        its origin parser; ``_parseExtensionsHeader`` its extension parser;
        with ``allowedOrigins == ["*"]`` every parsable origin is allowed.
        """
        options: Any = self  # Autobahn's options, class attributes of the protocol (options_as_class)
        end = data.find(b"\r\n\r\n")
        try:
            lines = data[:end].decode("ascii").split("\r\n")
        except UnicodeDecodeError:
            return False
        request = lines[0].split(" ")
        if end < 0 or len(request) != 3 or request[0] != "GET" or request[2] != "HTTP/1.1":
            return False
        target = request[1]
        if not target.startswith("/") or "#" in target or ";" in target or target.startswith("//"):
            return False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            key = name.lower()
            if not colon or not name or name != name.strip() or key in headers:
                return False
            headers[key] = value.strip()
        host = headers.get("host")
        if not host or (options.trustXForwardedFor and "x-forwarded-for" in headers):
            return False
        if ":" in host and not host.endswith("]"):
            host, _, port = host.rpartition(":")
            if self.factory.externalPort or not port.strip().isdigit():
                return False
        if "websocket" not in [u.strip().lower() for u in headers.get("upgrade", "").split(",")]:
            return False
        if "upgrade" not in [c.strip().lower() for c in headers.get("connection", "").split(",")]:
            return False
        if headers.get("sec-websocket-version") != "13" or 13 not in options.versions:
            return False
        key = headers.get("sec-websocket-key", "")
        if len(key) != 24 or key[-2:] != "==" or not _KEY_CHARS.issuperset(key[:-2]):
            return False
        protocols: list[str] = []
        if "sec-websocket-protocol" in headers:
            protocols = [p.strip() for p in headers["sec-websocket-protocol"].split(",")]
            if len(set(protocols)) != len(protocols):
                return False
        origin = headers.get("origin", "")
        if origin:
            if list(options.allowedOrigins) != ["*"]:
                return False
            try:
                autobahn.websocket.protocol._url_to_origin(origin)
            except ValueError:
                return False
        extensions: list[Any] = []
        if "sec-websocket-extensions" in headers:
            try:
                extensions = self._parseExtensionsHeader(headers["sec-websocket-extensions"])
            except Exception:
                return False
        if options.maxConnections > 0:
            return False
        path, _, query = target.partition("?")
        params = urllib.parse.parse_qs(query) if query else {}
        self.http_request_data = data[: end + 4]
        self.http_status_line = lines[0]
        self.http_headers = headers
        self.http_request_uri = target
        self.http_request_path = path
        self.http_request_params = params
        self.http_request_host = host
        self.websocket_version = 13
        self.websocket_protocols = protocols
        self.websocket_origin = origin
        self.websocket_extensions = extensions
        self.data = data[end + 4:]
        self._wskey = key
        connection = ConnectionRequest(self.peer, headers, host, path, params, 13, origin, protocols, extensions)
        try:
            result = self.onConnect(connection)
        except Exception:
            self._connect_failed(Failure())
            return True
        if isinstance(result, Deferred):
            result.addCallbacks(self.succeedHandshake, self._connect_failed)
        else:
            self.succeedHandshake(result)
        return True

    def _connect_failed(self, failure: Failure) -> None:
        """``onConnect`` refused or raised: as Autobahn's ``forward_error`` answers it."""
        if isinstance(failure.value, ConnectionDeny):
            self.failHandshake(str(failure.value.reason), failure.value.code)
        else:
            self.log.warn("Unexpected exception in onConnect ['{err.value}']", err=failure)
            self.failHandshake(f"Internal server error: {failure.value}", ConnectionDeny.INTERNAL_SERVER_ERROR)

    def succeedHandshake(self, res: Any) -> None:
        try:
            super().succeedHandshake(res)
        except Exception:
            self.handshake_error()
            return
        if self.state == _STATE_OPEN:
            self.handshake_done()

    def failHandshake(self, reason: str, code: int = 400, responseHeaders: Any = None) -> None:
        reason, code, responseHeaders = self.refusing(reason, code, responseHeaders)
        log, self.log = self.log, QUIET
        try:
            super().failHandshake(reason, code, responseHeaders)
        finally:
            self.log = log

    def sendCloseFrame(self, code: int | None = None, reasonUtf8: bytes | None = None,
                       isReply: bool = False) -> None:
        self.closing()
        super().sendCloseFrame(code, reasonUtf8, isReply)
        self.closed_frame(isReply)

    def handshake_error(self) -> None:
        """Answering the opening handshake raised (the exception is being handled)."""

    def handshake_done(self) -> None:
        """The opening handshake is over and the connection open: ``onOpen`` ran, ``is_open`` fired."""

    def refusing(self, reason: str, code: int, headers: Any) -> tuple[str, int, Any]:
        """The handshake is refused: return the reason, status and headers to send."""
        return reason, code, headers

    def closing(self) -> None:
        """A close frame is about to be sent."""

    def closed_frame(self, is_reply: bool) -> None:
        """A close frame was sent (``is_reply``: answering the client's)."""
