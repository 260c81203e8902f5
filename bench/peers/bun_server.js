// The Bun peer (bench/run.py --peer bun): Bun's built-in WebSocket server (uWebSockets) and its native topic
// pub/sub, fed by one ioredis PSUBSCRIBE, as a performance-minded user would write it.  Path /<channel> is
// Redis channel sock-drawer/<channel>; no compression, no server pings (the harness's peers have none).
import Redis from "ioredis";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const PREFIX = "sock-drawer/";
const server = Bun.serve({
  port: Number(arg("--port", "8020")),
  hostname: "127.0.0.1",
  fetch(req, srv) {
    const channel = decodeURIComponent(new URL(req.url).pathname.slice(1));
    if (srv.upgrade(req, { data: { channel } })) return undefined;
    return new Response("WebSocket only", { status: 426 });
  },
  websocket: {
    open(ws) { ws.subscribe(ws.data.channel); },
    message() {},
    perMessageDeflate: false,
    sendPings: false,
    idleTimeout: 0,
  },
});
const sub = new Redis({ host: "127.0.0.1", port: Number(arg("--redis-port", "6379")) });
sub.on("pmessageBuffer", (pattern, channel, message) => {
  server.publish(channel.toString().slice(PREFIX.length), message.toString());
});
sub.psubscribe(PREFIX + "*");
console.log(`bun ${Bun.version} listening on ${server.port}`);
