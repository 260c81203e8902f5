// The pusher server library for Node (unchanged) against a node's Pusher HTTP API: each call named on the
// command line, its result (or error status) a JSON line on stdout.
// Usage: node pusher_server.js <api port> <app id> <key> <secret> <call> [<args as JSON>]
"use strict";
const Pusher = require("pusher");

const [port, appId, key, secret, call, args] = process.argv.slice(2);
const pusher = new Pusher({ appId, key, secret, host: "127.0.0.1", port, useTLS: false });
const a = args ? JSON.parse(args) : {};

async function run() {
  let response;
  if (call === "trigger") response = await pusher.trigger(a.channels, a.event, a.data, a.params);
  else if (call === "triggerBatch") response = await pusher.triggerBatch(a.batch);
  else if (call === "channels") response = await pusher.get({ path: "/channels", params: a.params || {} });
  else if (call === "channel") response = await pusher.get({ path: `/channels/${a.channel}`, params: a.params || {} });
  else if (call === "users") response = await pusher.get({ path: `/channels/${a.channel}/users` });
  else if (call === "terminate") response = await pusher.terminateUserConnections(a.user);
  const body = await response.text();
  process.stdout.write(JSON.stringify({ status: response.status, body: body ? JSON.parse(body) : null }) + "\n");
}

run().catch((e) => {
  process.stdout.write(JSON.stringify({ status: e.status || null, error: String(e.body || e.message) }) + "\n");
});
