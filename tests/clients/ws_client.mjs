// A Node `ws` client with its default options, driven by tests/test_clients.py.
//
//   node ws_client.mjs ws://127.0.0.1:PORT/echo
//
// Reports each event as one JSON line on stdout:
//   {"event": "open", "extensions": "...", "header": "...", "offered": "..."}
//   {"event": "message", "data": "...", "binary": false}
//   {"event": "close", "code": 1012, "reason": "..."}
//   {"event": "error", "message": "..."}
// and sends each line of stdin, a JSON string, as one text frame.
// Exits once the connection has closed.

import { createInterface } from "node:readline";
import WebSocket from "ws";

function report(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

const ws = new WebSocket(process.argv[2]);
// What the client offered: ws keeps the request in a private field until the
// 101 arrives (ws is pinned to one version in package.json, so this holds).
const offered = ws._req ? ws._req.getHeader("sec-websocket-extensions") || "" : null;
let header = null;

ws.on("upgrade", (response) => {
  header = response.headers["sec-websocket-extensions"] || "";
});
ws.on("open", () => {
  report({ event: "open", extensions: ws.extensions, header, offered });
});
ws.on("message", (data, isBinary) => {
  report(isBinary
    ? { event: "message", data: data.toString("hex"), binary: true }
    : { event: "message", data: data.toString("utf8"), binary: false });
});
ws.on("error", (error) => {
  report({ event: "error", message: String(error && error.message) });
});
ws.on("close", (code, reason) => {
  report({ event: "close", code, reason: reason.toString("utf8") });
  process.exit(0);
});

createInterface({ input: process.stdin }).on("line", (line) => {
  if (line.trim()) ws.send(JSON.parse(line));
});
