// The Node peer (bench/run.py --peer node-ws): the ws library's server, a Set of sockets per channel, fed by
// one ioredis PSUBSCRIBE.  Path /<channel> is Redis channel sock-drawer/<channel>; no compression, no pings.
"use strict";
const { WebSocketServer } = require("ws");
const Redis = require("ioredis");

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const PREFIX = "sock-drawer/";
const groups = new Map();
const wss = new WebSocketServer({ port: Number(arg("--port", "8020")), host: "127.0.0.1", perMessageDeflate: false,
                                  backlog: 1024 });
wss.on("connection", (ws, req) => {
  const channel = decodeURIComponent(req.url.split("?")[0].slice(1));
  let group = groups.get(channel);
  if (!group) groups.set(channel, (group = new Set()));
  group.add(ws);
  ws.on("error", () => {});
  ws.on("close", () => {
    group.delete(ws);
    if (!group.size) groups.delete(channel);
  });
});
const sub = new Redis({ host: "127.0.0.1", port: Number(arg("--redis-port", "6379")) });
sub.on("pmessageBuffer", (pattern, channel, message) => {
  const group = groups.get(channel.toString().slice(PREFIX.length));
  if (!group) return;
  const text = message.toString();
  for (const ws of group) ws.send(text);
});
sub.psubscribe(PREFIX + "*");
console.log(`node ${process.version} ws listening on ${wss.options.port}`);
