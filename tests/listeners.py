"""Listener classes that the tests load, by object or as 'listeners:Name'."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, task

from sockdrawer import Source, Subscriber, on

# What every listener saw, for the tests to inspect: (listener, channel, message, source)
SEEN: list[tuple[str, str, Any, Source]] = []


class Echo(Subscriber):
    """Replies to every browser frame on /echo with the frame."""

    @on("echo")
    def echo(self, message: Any, source: Source) -> Any:
        SEEN.append(("Echo", source.channel, message, source))
        return message if source.from_socket else None


class Shout(Subscriber):
    """A second listener on /echo, replying asynchronously in upper case."""

    @on("echo")
    def shout(self, message: Any, source: Source) -> Any:
        SEEN.append(("Shout", source.channel, message, source))
        if isinstance(message, str):
            from twisted.internet import reactor

            return task.deferLater(reactor, 0.01, lambda: message.upper())
        return None

    @on("rooms/lobby")
    async def lobby(self, message: Any) -> Any:
        SEEN.append(("Shout.lobby", "rooms/lobby", message, None))
        await defer.succeed(None)
        return {"lobby": message}


class Broken(Subscriber):
    """Raises on /echo and fails asynchronously on /broken."""

    @on("echo")
    def explode(self, message: Any, source: Source) -> Any:
        raise RuntimeError("handler exploded")

    @on("broken")
    def fail_later(self, message: Any, source: Source) -> Any:
        return defer.fail(ValueError("deferred handler failed"))


class Relay(Subscriber):
    """Re-publishes each browser frame on /chat through the broker."""

    @on("chat")
    def chat(self, message: Any, source: Source) -> Any:
        if source.from_socket:
            return self.publish(f"{source.peer is not None}:{message}", "chat").addCallback(lambda n: None)
        return None


class RootEcho(Subscriber):
    """Echoes every browser frame on the root channel '/' (what conformance suites expect)."""

    @on("")
    def echo(self, message: Any, source: Source) -> Any:
        return message if source.from_socket else None


class Guard(Subscriber):
    """On /guarded: refuses the user 'mallory' at the handshake, and tells every other user who they are."""

    def authorize(self, source: Source) -> bool:
        return source.user != "mallory"

    @on("guarded")
    def whoami(self, message: Any, source: Source) -> Any:
        return f"you are {source.user}" if source.from_socket else None


class Witness(Subscriber):
    """For each broker message on /witness, publishes 'seen by <pid>' on witness/seen: one per node."""

    @on("witness")
    def seen(self, message: Any, source: Source) -> Any:
        if not source.from_socket:
            import os

            self.publish(f"seen by {os.getpid()}", "witness/seen")
        return None


class NotAListener:
    pass
