"""The admin page's feed, on a task.Clock: rates per second, the per-channel counts it empties, the warnings it
keeps (and the log lines it leaves out)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from sockdrawer.http.admin import WARNINGS, AdminFeed


class Hub:
    per_channel: dict[bytes, int] | None = None


def feed(figures: dict[str, Any], hub: Any = None) -> tuple[AdminFeed, Clock]:
    clock = Clock()
    admin = AdminFeed(lambda: dict(figures), lambda: succeed([]), lambda: succeed({}), clock, hub=hub)
    admin._write = lambda state: None  # type: ignore[method-assign]  # no page to write to
    return admin, clock


def test_a_tick_turns_totals_into_rates_and_empties_the_channel_counts() -> None:
    """Two ticks 2 s apart: deliveries and messages per second from the totals' growth; while a page watches,
    the hub counts per channel and each tick turns the counts into rates and empties them (the dict never
    grows past one period's channels); with no page, the hub stops counting."""
    figures = {"sockets": 3, "deliveries": 100, "messages": 10}
    hub = Hub()
    admin, clock = feed(figures, hub)
    admin.tick()
    assert hub.per_channel is None  # nobody watches
    admin.streams[object()] = None  # type: ignore[index]
    admin.tick()
    assert hub.per_channel == {}
    figures.update(deliveries=300, messages=14)
    hub.per_channel[b"news"] = 4
    clock.advance(2)
    admin.tick()
    assert admin.last["deliveries_per_s"] == 100.0 and admin.last["messages_per_s"] == 2.0
    assert admin.rates == {"news": 2.0} and hub.per_channel == {}
    assert [s["sockets"] for s in admin.samples] == [3, 3, 3] and admin.last["version"]
    admin.streams.clear()
    admin.tick()
    assert hub.per_channel is None and admin.rates == {}


def test_warnings_are_kept_as_text_and_only_sockdrawers() -> None:
    """A warning of a sockdrawer logger is kept as its rendered text, and so is a refused handshake (info);
    other info lines and other libraries' warnings are not; at most WARNINGS are kept."""
    admin, _ = feed({"sockets": 0, "deliveries": 0, "messages": 0})

    def event(namespace: str, level: LogLevel, text: str, **fields: Any) -> dict[str, Any]:
        return {"log_namespace": namespace, "log_level": level, "log_format": text, "log_time": 1.0, **fields}

    admin.observe(event("sockdrawer", LogLevel.warn, "cannot use Redis at {url}", url="redis://x"))
    admin.observe(event("sockdrawer.websocket.SockDrawerServerProtocol", LogLevel.info,
                        "refused a WebSocket handshake from {peer}: {code} {reason}", peer="p", code=400, reason="r"))
    admin.observe(event("sockdrawer", LogLevel.info, "listening on {url}", url="ws://x"))
    admin.observe(event("twisted", LogLevel.warn, "something else"))
    assert [w["text"] for w in admin.warnings] == ["cannot use Redis at redis://x",
                                                   "refused a WebSocket handshake from p: 400 r"]
    for i in range(WARNINGS + 5):
        admin.observe(event("sockdrawer", LogLevel.error, f"e{i}"))
    assert len(admin.warnings) == WARNINGS and admin.warnings[-1]["text"] == f"e{WARNINGS + 4}"
