"""
A TCP proxy for chaos tests, on asyncio: it forwards every connection it
accepts to a target address and *resets* it (RST to both sides, no close
handshake) after a random time.

The times come from a seeded :class:`random.Random`, so a failing run can be
repeated with its seed (the order in which connections arrive is up to the
scheduler, so a repeat is close, not identical).  Counters and waits let a
test pace itself by the churn the proxy makes instead of by the clock::

    proxy = ChaosProxy(("127.0.0.1", node_port), seed=1234, cut_after=(0.3, 2.0))
    await proxy.start()
    ...  # clients connect to ("127.0.0.1", proxy.port)
    await proxy.wait_accepted(proxy.accepted + 4)
    await proxy.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct

#: how much one read takes from a socket
_CHUNK = 65536


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close ``writer``'s socket with an RST: SO_LINGER on, with a timeout of 0, then close at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class ChaosProxy:
    """
    Forwards connections to ``target`` and resets each one after a random
    ``cut_after`` seconds (uniform in the range) from its accept.

    :ivar accepted: connections accepted.
    :ivar forwarded: of those, connections the target accepted.
    :ivar refused: connections the target refused (reset at once).
    :ivar cuts: connections reset by the proxy's timer (the deliberate cuts).
    :ivar ended: connections that one side closed before their cut.
    """

    def __init__(self, target: tuple[str, int], seed: int, cut_after: tuple[float, float] = (0.3, 2.0),
                 host: str = "127.0.0.1") -> None:
        self.target = target
        self.seed = seed
        self.cut_after = cut_after
        self.host = host
        self.port = 0
        self._random = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()
        self.accepted = 0
        self.forwarded = 0
        self.refused = 0
        self.cuts = 0
        self.ended = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop accepting and reset every connection still open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for pipe in list(self._pipes):
            pipe.cancel()  # its connection is reset, and its handler ends
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_accepted(self, count: int, timeout: float = 30.0) -> None:
        """Wait until the proxy has accepted ``count`` connections in all."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.accepted >= count), timeout)

    def figures(self) -> dict[str, int]:
        return {"accepted": self.accepted, "forwarded": self.forwarded, "refused": self.refused,
                "cuts": self.cuts, "ended": self.ended}

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the cut time is drawn at accept, in accept order
        lifetime = self._random.uniform(*self.cut_after)
        self.accepted += 1
        await self._notify()
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self.refused += 1
            _reset(writer)
            return
        self.forwarded += 1
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)),
                 asyncio.create_task(self._pipe(up_reader, writer))]
        self._pipes.update(pipes)
        try:
            _, running = await asyncio.wait(pipes, timeout=lifetime)
            if running:
                self.cuts += 1
            else:
                self.ended += 1  # both sides closed first (the node died, or the client left): passed on
        finally:
            for pipe in pipes:
                pipe.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            self._pipes.difference_update(pipes)
            for w in (writer, up_writer):
                _reset(w)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy ``reader`` to ``writer``; pass an EOF on as an EOF, and a reset as a reset."""
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except OSError:
            _reset(writer)
