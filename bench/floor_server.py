"""
The floor: the least a Python process can do to move Redis messages to
WebSocket clients, for comparison with sockdrawer in the same benchmark run.

No Twisted, no Autobahn, no error handling worth the name: an epoll loop that
answers WebSocket handshakes, PSUBSCRIBEs ``sock-drawer/*`` with hiredis, and
for each read from Redis sends each socket of a channel its frames, joined,
with one ``send()``.  The frames are built by sockdrawer's own
``sockdrawer.transports.websocket.frames.encode_batch`` (standard library only, no Twisted), so
both servers send the same bytes.  It never buffers (a socket that cannot take
its bytes loses them), so it is only a measuring stick: sockdrawer's figures
minus these are what sockdrawer itself costs.

    python bench/floor_server.py --port 8020 --redis-port 6379
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import selectors
import socket

import hiredis

from sockdrawer.transports.websocket.frames import encode_batch

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PREFIX = b"sock-drawer/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis-port", type=int, required=True)
    args = parser.parse_args()

    sel = selectors.EpollSelector()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(1024)
    listener.setblocking(False)
    sel.register(listener, selectors.EVENT_READ, "listen")

    redis = socket.create_connection(("127.0.0.1", args.redis_port))
    redis.sendall(b"*2\r\n$10\r\nPSUBSCRIBE\r\n$13\r\nsock-drawer/*\r\n")
    redis.setblocking(False)
    reader = hiredis.Reader()
    sel.register(redis, selectors.EVENT_READ, "redis")

    channels: dict[bytes, list[socket.socket]] = {}
    pending: dict[socket.socket, bytes] = {}
    where: dict[socket.socket, bytes] = {}

    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if key.data == "listen":
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pending[conn] = b""
                    sel.register(conn, selectors.EVENT_READ, "client")
            elif key.data == "redis":
                data = redis.recv(65536)
                if not data:
                    return
                reader.feed(data)
                batch: dict[bytes, list[bytes]] = {}
                reply = reader.gets()
                while reply is not False:
                    if type(reply) is list and reply[0] == b"pmessage" and reply[2].startswith(PREFIX):
                        batch.setdefault(reply[2][len(PREFIX):], []).append(reply[3])
                    reply = reader.gets()
                for channel, messages in batch.items():
                    members = channels.get(channel)
                    if members:
                        wire = encode_batch(messages)
                        for member in members:
                            try:
                                member.send(wire)
                            except OSError:
                                pass
            else:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    pending.pop(sock, None)
                    path = where.pop(sock, None)
                    if path is not None:
                        channels[path].remove(sock)
                    sock.close()
                    continue
                if sock in pending:
                    request = pending[sock] + data
                    if b"\r\n\r\n" not in request:
                        pending[sock] = request
                        continue
                    del pending[sock]
                    lines = request.split(b"\r\n")
                    path = lines[0].split(b" ")[1].split(b"?")[0][1:]
                    ws_key = next(line.split(b":", 1)[1].strip() for line in lines
                                  if line.lower().startswith(b"sec-websocket-key:"))
                    accept = base64.b64encode(hashlib.sha1(ws_key + GUID).digest())
                    sock.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                              b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
                    channels.setdefault(path, []).append(sock)
                    where[sock] = path
                # frames from clients (pongs, close) are ignored


if __name__ == "__main__":
    main()
