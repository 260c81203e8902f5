"""
Autobahn's own asyncio WebSocket client with its default options, driven by
tests/test_clients.py (the same protocol as ws_client.mjs)::

    python autobahn_client.py ws://127.0.0.1:PORT/echo

Reports each event as one JSON line on stdout (``open``, ``message``,
``close``, ``error``) and sends each line of stdin, a JSON string, as one
text frame.  Exits once the connection has closed.

It runs in its own process: importing ``autobahn.asyncio`` switches txaio,
process-wide, from Twisted to asyncio, which the Twisted tests in the pytest
process must not see.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from typing import Any

from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol


def report(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class ReportingClient(WebSocketClientProtocol):
    def onConnect(self, response: Any) -> None:
        self.header = response.headers.get("sec-websocket-extensions", "")

    def onOpen(self) -> None:
        extensions = ",".join(e.EXTENSION_NAME for e in self.websocket_extensions_in_use)
        report(event="open", extensions=extensions, header=self.header)
        self.factory.opened.set_result(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            report(event="message", data=payload.hex(), binary=True)
        else:
            report(event="message", data=payload.decode("utf-8"), binary=False)

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        report(event="close", code=code, reason=reason or "", clean=wasClean)
        if not self.factory.opened.done():
            self.factory.opened.set_exception(ConnectionError(f"closed before open: {code} {reason}"))
        if not self.factory.closed.done():
            self.factory.closed.set_result(None)


def read_stdin(loop: asyncio.AbstractEventLoop, client: ReportingClient) -> None:
    for line in sys.stdin:
        if line.strip():
            payload = json.loads(line).encode("utf-8")
            loop.call_soon_threadsafe(client.sendMessage, payload, False)


async def main(url: str) -> None:
    loop = asyncio.get_running_loop()
    factory = WebSocketClientFactory(url)
    factory.protocol = ReportingClient
    factory.opened = loop.create_future()
    factory.closed = loop.create_future()
    try:
        await loop.create_connection(factory, factory.host, factory.port)
        client = await factory.opened
    except Exception as e:
        report(event="error", message=repr(e))
        raise SystemExit(1) from None
    threading.Thread(target=read_stdin, args=(loop, client), daemon=True).start()
    await factory.closed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
