"""
The admin page on the API port (``GET /admin``): one HTML page with its
script and style (``sockdrawer/http/admin/``, no build step, no CDN), sent
with a strict Content-Security-Policy, and a live feed for it
(``GET /admin/stream``, behind ``--api-key``): one event a second with this
node's figures, every node's (through Redis), the busiest channels and the
last warnings; the first event also carries the last 15 minutes of samples.

The page asks the rest of the API for what it shows on demand (a channel's
presence, ``POST /publish``, ``POST /disconnect``), with the key the
browser keeps in its session storage.  Every name, id and payload is shown
as text.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import Any

from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.web.server import NOT_DONE_YET, Request

#: the page's files: path -> (file, content type)
ASSETS = {
    b"/admin": ("admin.html", b"text/html; charset=utf-8"),
    b"/admin/admin.js": ("admin.js", b"text/javascript; charset=utf-8"),
    b"/admin/admin.css": ("admin.css", b"text/css; charset=utf-8"),
}
#: nothing but the page's own files and its own API: no inline script, no other origin
CSP = (b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       b"form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
#: seconds of samples kept (the chart's 15 minutes, one a second)
HISTORY = 900
#: warnings kept for the page
WARNINGS = 50
#: log lines below warn that the page lists too (refusals, cut-offs)
_NOTABLE = ("refused a WebSocket handshake", "cutting off a slow reader", "frame rate limit", "refused a Pusher API")


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sockdrawer")
    except PackageNotFoundError:  # a source tree on the path, not installed
        return "unknown"


#: this node's version, as the page shows it
VERSION = _installed_version()


def asset(path: bytes) -> tuple[bytes, bytes] | None:
    """The body and content type of one of the page's files, or ``None``."""
    entry = ASSETS.get(path)
    if entry is None:
        return None
    name, kind = entry
    return (resources.files("sockdrawer.http") / "admin" / name).read_bytes(), kind


def serve_asset(request: Request, path: bytes) -> bytes:
    found = asset(path)
    if found is None:
        request.setResponseCode(404)
        return b"not found"
    body, kind = found
    request.setHeader(b"content-type", kind)
    request.setHeader(b"content-security-policy", CSP)
    request.setHeader(b"x-content-type-options", b"nosniff")
    request.setHeader(b"referrer-policy", b"no-referrer")
    request.setHeader(b"cache-control", b"no-cache")
    return body


class AdminFeed(Service):
    """
    Samples the node every second and streams what the page shows.

    :param figures: this node's figures now: ``sockets``, ``channels``, ``deliveries``
        and ``messages`` (totals), and anything else to show as they are.
    :param nodes: ``() -> Deferred[list of dict]``: every other node's last figures (empty without Redis).
    :param channels: ``() -> Deferred[{channel: connections}]`` across every node.
    :param clock: the reactor.
    :param hub: the hub, whose ``per_channel`` counts this feed turns on while a page watches (``None``:
        no per-channel rates).
    """

    def __init__(self, figures: Callable[[], dict[str, Any]], nodes: Callable[[], Any],
                 channels: Callable[[], Any], clock: Any, hub: Any = None) -> None:
        self.figures = figures
        self.hub = hub
        #: messages per second by channel on this node, over the last second
        self.rates: dict[str, float] = {}
        self.nodes = nodes
        self.channels = channels
        self.clock = clock
        self.samples: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.warnings: deque[dict[str, Any]] = deque(maxlen=WARNINGS)
        self.streams: dict[Request, None] = {}
        self.last: dict[str, Any] = {}
        self._previous: dict[str, Any] | None = None
        self._loop = LoopingCall(self.tick)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.observe)  # type: ignore[arg-type]
        self._loop.start(1.0, now=True)

    def stopService(self) -> Any:
        super().stopService()
        globalLogPublisher.removeObserver(self.observe)  # type: ignore[arg-type]
        if self._loop.running:
            self._loop.stop()
        streams, self.streams = self.streams, {}
        for request in streams:
            request.finish()

    def observe(self, event: dict[str, Any]) -> None:
        """A log event: warnings (and refusals, cut-offs) of sockdrawer's loggers are kept, as their text."""
        namespace = str(event.get("log_namespace", ""))
        if not namespace.startswith("sockdrawer"):
            return
        level = event.get("log_level")
        text_format = str(event.get("log_format", ""))
        notable = any(n in text_format for n in _NOTABLE)
        if level not in (LogLevel.warn, LogLevel.error, LogLevel.critical) and not notable:
            return
        try:
            text = formatEvent(event)
        except Exception:
            text = text_format
        self.warnings.append({"time": event.get("log_time", time.time()), "level": getattr(level, "name", ""),
                              "logger": namespace, "text": text[:500]})

    def tick(self) -> None:
        now = self.clock.seconds()
        figures = {"version": VERSION, **self.figures()}
        previous, self._previous = self._previous, {"at": now, **figures}
        sample = {"time": now, "sockets": figures.get("sockets", 0), "deliveries_per_s": 0.0,
                  "messages_per_s": 0.0}
        if previous is not None and now > previous["at"]:
            span = now - previous["at"]
            sample["deliveries_per_s"] = max(0, figures["deliveries"] - previous["deliveries"]) / span
            sample["messages_per_s"] = max(0, figures["messages"] - previous["messages"]) / span
        self.samples.append(sample)
        self.last = {**figures, **sample}
        counts = getattr(self.hub, "per_channel", None)
        if counts is not None:
            # the counts since the last tick, then emptied: the dict holds only the channels of one second
            span = now - previous["at"] if previous is not None and now > previous["at"] else 1.0
            self.rates = {k.decode("utf-8", "replace"): n / span for k, n in counts.items()}
            counts.clear()
        if self.hub is not None and bool(self.streams) != (counts is not None):
            # the hub counts per channel only while a page watches (a dict lookup per batch otherwise saved)
            self.hub.per_channel = {} if self.streams else None
            self.rates = {}
        if self.streams:
            self._send()

    def _send(self) -> None:
        d = self.nodes()
        state: dict[str, Any] = {"node": self.last, "warnings": list(self.warnings)}

        def with_nodes(nodes: list[dict[str, Any]]) -> Any:
            state["nodes"] = nodes
            return self.channels()

        def with_channels(counts: dict[str, int]) -> None:
            busiest = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:20]
            state["channels"] = [{"channel": c, "sockets": n, "messages_per_s": round(self.rates.get(c, 0.0), 1)}
                                 for c, n in busiest]
            self._write(state)

        d.addCallback(with_nodes).addCallback(with_channels).addErrback(lambda f: self._write(state))

    def _write(self, state: dict[str, Any]) -> None:
        for request in list(self.streams):
            payload = state
            if not getattr(request, "_admin_started", False):
                request._admin_started = True  # type: ignore[attr-defined]
                payload = {**state, "series": list(self.samples)}
            request.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

    def open(self, request: Request) -> Any:
        """``GET /admin/stream``: the feed, one ``data:`` event a second."""
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        self.streams[request] = None
        request.notifyFinish().addBoth(lambda _: self.streams.pop(request, None))
        request.write(b": sockdrawer admin feed\n\n")
        self._send()
        return NOT_DONE_YET
