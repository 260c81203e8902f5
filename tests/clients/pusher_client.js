// pusher-js (its Node build, unchanged) driven by JSON lines on stdin; every
// connection state, subscription and event it sees is a JSON line on stdout.
// Usage: node pusher_client.js <port> <app key> <auth endpoint URL>
"use strict";
const Pusher = require("pusher-js");
const readline = require("readline");

const [port, key, authEndpoint] = process.argv.slice(2);
const clients = {};
const out = (line) => process.stdout.write(JSON.stringify(line) + "\n");

const userEndpoint = authEndpoint.replace(/auth$/, "user-auth");

function connect(id, onPort) {
  // what a user of a self-hosted Pusher-compatible server configures: host, port, no TLS, ws only
  const pusher = new Pusher(key, {
    cluster: "mt1", wsHost: "127.0.0.1", wsPort: Number(onPort || port), forceTLS: false,
    enabledTransports: ["ws"], disableStats: true,
    channelAuthorization: { endpoint: authEndpoint, transport: "ajax", params: { client: id } },
    userAuthentication: { endpoint: userEndpoint, transport: "ajax", params: { client: id } },
  });
  pusher.bind_global((event, data) => {
    if (event === "pusher:signin_success") out({ id, signed_in: JSON.parse(data.user_data).id });
  });
  pusher.user.bind_global((event, data) => out({ id, channel: "#user", event, data }));
  pusher.connection.bind("state_change", (s) => out({ id, state: s.current }));
  pusher.connection.bind("connected", () => out({ id, connected: pusher.connection.socket_id }));
  pusher.connection.bind("error", (e) => out({ id, error: (e && e.data) || String(e && e.type) }));
  clients[id] = pusher;
}

function subscribe(id, name) {
  const channel = clients[id].subscribe(name);
  channel.bind("pusher:subscription_succeeded", (members) => out({
    id, subscribed: name,
    members: members && members.each ? (() => { const m = []; members.each((x) => m.push(x.id)); return m.sort(); })() : null,
    me: members && members.me ? members.me.id : null,
  }));
  channel.bind("pusher:subscription_error", (e) => out({ id, channel: name, subscription_error: e }));
  channel.bind("pusher:member_added", (m) => out({ id, channel: name, member_added: m.id, info: m.info }));
  channel.bind("pusher:member_removed", (m) => out({ id, channel: name, member_removed: m.id }));
  channel.bind_global((event, data) => {
    if (!event.startsWith("pusher:")) out({ id, channel: name, event, data });
  });
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  const cmd = JSON.parse(line);
  if (cmd.op === "connect") connect(cmd.id, cmd.port);
  else if (cmd.op === "subscribe") subscribe(cmd.id, cmd.channel);
  else if (cmd.op === "unsubscribe") clients[cmd.id].unsubscribe(cmd.channel);
  else if (cmd.op === "trigger") out({ id: cmd.id, triggered: clients[cmd.id].channel(cmd.channel).trigger(cmd.event, cmd.data) });
  else if (cmd.op === "disconnect") clients[cmd.id].disconnect();
  else if (cmd.op === "signin") clients[cmd.id].signin();
  else if (cmd.op === "exit") process.exit(0);
});
out({ ready: true });
