// Unit tests of sockdrawer.js with a fake WebSocket and fake timers: `node --test js/test/`.
import assert from "node:assert/strict";
import { test } from "node:test";

import { SockDrawer } from "../sockdrawer.js";

class FakeSocket {
  static instances = [];
  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.sent = [];
    this.readyState = 0;
    FakeSocket.instances.push(this);
  }
  send(text) { this.sent.push(JSON.parse(text)); }
  close(code) { this.closed = code; }
  open() { this.readyState = 1; this.onopen(); }
  receive(message) { this.onmessage({ data: JSON.stringify(message) }); }
  drop(code = 1006) { this.readyState = 3; this.onclose({ code }); }
}

function harness(options = {}) {
  FakeSocket.instances = [];
  const timers = [];
  const sd = new SockDrawer("ws://node/", {
    WebSocket: FakeSocket,
    random: () => 0.5,
    setTimeout: (fn, ms) => { const t = { fn, ms }; timers.push(t); return t; },
    clearTimeout: (t) => { if (t) t.cancelled = true; },
    ...options,
  });
  const runTimer = async () => {
    const t = timers.find((x) => !x.cancelled && !x.ran && x.ms !== (options.stableAfter ?? 5000));
    t.ran = true;
    t.fn();
    await new Promise((r) => setImmediate(r));
    return t.ms;
  };
  const last = () => FakeSocket.instances.at(-1);
  return { sd, timers, runTimer, last };
}

const tick = () => new Promise((r) => setImmediate(r));

test("offers the sockdrawer.v1 subprotocol and subscribes on open", async () => {
  const { sd, last } = harness();
  await tick();
  const seen = [];
  sd.subscribe("news", (data, meta) => seen.push([data, meta.offset]));
  assert.equal(last().protocol, "sockdrawer.v1");
  last().open();
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "news" }]);
  last().receive({ op: "subscribed", channel: "news", offset: "e:1" });
  last().receive({ op: "message", channel: "news", offset: "e:2", data: "hi" });
  last().receive({ op: "message", channel: "news", offset: "e:3", data: "AAE=", encoding: "base64" });
  assert.deepEqual(seen[0], ["hi", "e:2"]);
  assert.deepEqual([...seen[1][0]], [0, 1]);
});

test("reconnects with full-jitter backoff and resubscribes from the last offset", async () => {
  const { sd, runTimer, last } = harness();
  await tick();
  sd.subscribe("news", () => {});
  last().open();
  last().receive({ op: "message", channel: "news", offset: "e:7", data: "x" });
  last().drop();
  assert.equal(sd.state, "reconnecting");
  const delays = [];
  delays.push(await runTimer());
  last().drop(); // refused again
  delays.push(await runTimer());
  last().drop();
  delays.push(await runTimer());
  assert.deepEqual(delays, [250, 500, 1000]); // random() = 0.5 of 500, 1000, 2000
  last().open();
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "news", since: "e:7" }]);
});

test("the backoff is capped and full jitter stays below the cap", () => {
  const { sd } = harness({ random: () => 0.999 });
  assert.ok(sd.delayFor(20) < 30000 && sd.delayFor(20) > 29000);
  const low = harness({ random: () => 0 }).sd;
  assert.equal(low.delayFor(3), 0);
});

test("asks for a fresh token after 4001 and after a refused handshake, not after a plain drop", async () => {
  let n = 0;
  const { runTimer, last } = harness({ token: async () => `t${++n}` });
  await tick();
  assert.equal(last().url, "ws://node/?token=t1");
  last().open();
  last().drop(1006);
  await runTimer();
  assert.equal(last().url, "ws://node/?token=t1"); // dropped after it was open: the token is fine
  last().open();
  last().drop(4001);
  await runTimer();
  assert.equal(last().url, "ws://node/?token=t2");
  last().drop(1006); // refused before open
  await runTimer();
  assert.equal(last().url, "ws://node/?token=t3");
});

test("send resolves with the reply and is queued until open", async () => {
  const { sd, last } = harness();
  await tick();
  const answer = sd.send("chat", "hello");
  last().open();
  assert.deepEqual(last().sent, [{ op: "send", channel: "chat", data: "hello", id: 1 }]);
  last().receive({ op: "reply", id: 1, data: { ok: true } });
  assert.deepEqual(await answer, { ok: true });
});

test("reset clears the channel's offset and is reported", async () => {
  const { sd, last, runTimer } = harness();
  await tick();
  const resets = [];
  sd.addEventListener("reset", (e) => resets.push(e.detail.channel));
  sd.subscribe("news", () => {});
  last().open();
  last().receive({ op: "message", channel: "news", offset: "e:1", data: "x" });
  last().receive({ op: "reset", channel: "news" });
  assert.deepEqual(resets, ["news"]);
  last().drop();
  await runTimer();
  last().open();
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "news" }]);
});

test("unsubscribing the last callback unsubscribes the channel; close stops reconnecting", async () => {
  const { sd, last, timers } = harness();
  await tick();
  last().open();
  const stop = sd.subscribe("news", () => {});
  stop();
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "news" }, { op: "unsubscribe", channel: "news" }]);
  sd.close();
  assert.equal(sd.state, "closed");
  last().drop();
  assert.equal(timers.filter((t) => t.ms !== 5000 && !t.cancelled).length, 0);
});

test("presence: the list, joins and leaves once each, and the list again after a reconnect", async () => {
  const { sd, last, runTimer } = harness();
  await tick();
  const seen = [];
  sd.subscribe("room/1", null, {
    onPresence: (clients, info) => seen.push(["list", clients.map((c) => c.user), info.self]),
    onJoin: (e) => seen.push(["join", e.user, e.client]),
    onLeave: (e) => seen.push(["leave", e.user, e.client]),
  });
  last().open();
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "room/1", presence: true }]);
  last().receive({ op: "subscribed", channel: "room/1", offset: null });
  last().receive({ op: "presence", channel: "room/1", self: "a", clients: [{ user: "ann", client: "a" }] });
  last().receive({ op: "join", channel: "room/1", user: "bob", client: "b" });
  last().receive({ op: "join", channel: "room/1", user: "bob", client: "b" }); // known: not reported twice
  assert.deepEqual(sd.presence("room/1"), [{ user: "ann", client: "a" }, { user: "bob", client: "b" }]);
  last().receive({ op: "leave", channel: "room/1", user: "bob", client: "b" });
  last().receive({ op: "leave", channel: "room/1", user: "bob", client: "b" });
  assert.deepEqual(seen, [["list", ["ann"], "a"], ["join", "bob", "b"], ["leave", "bob", "b"]]);
  last().drop();
  await runTimer();
  last().open();
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "room/1", presence: true }]);
  last().receive({ op: "presence", channel: "room/1", self: "c", clients: [{ user: "ann", client: "c" }] });
  assert.deepEqual(seen.at(-1), ["list", ["ann"], "c"]);
});

test("presence asked on a channel already subscribed without it subscribes again from the last offset", async () => {
  const { sd, last } = harness();
  await tick();
  last().open();
  const messages = [];
  sd.subscribe("room/1", (data) => messages.push(data));
  last().receive({ op: "message", channel: "room/1", offset: "e:4", data: "x" });
  sd.subscribe("room/1", null, { presence: true });
  assert.deepEqual(last().sent, [
    { op: "subscribe", channel: "room/1" },
    { op: "unsubscribe", channel: "room/1" },
    { op: "subscribe", channel: "room/1", since: "e:4", presence: true },
  ]);
  last().receive({ op: "message", channel: "room/1", offset: "e:5", data: "y" });
  assert.deepEqual(messages, ["x", "y"]); // the null callback is skipped
  assert.deepEqual(sd.presence("news"), []);
});

test("a subscription the node dropped with 503 (history unavailable) is asked again from its offset", async () => {
  const { sd, runTimer, last } = harness();
  await tick();
  const errors = [];
  sd.addEventListener("error", (e) => errors.push(e.detail.status));
  sd.subscribe("news", () => {});
  last().open();
  last().receive({ op: "message", channel: "news", offset: "e:4", data: "x" });
  last().sent.length = 0;
  last().receive({ op: "error", status: 503, reason: "history unavailable", channel: "news" });
  assert.deepEqual(errors, [503]);
  assert.equal(await runTimer(), 250); // the reconnects' backoff: random() = 0.5 of 500
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "news", since: "e:4" }]);
  last().receive({ op: "error", status: 503, reason: "history unavailable", channel: "news" });
  assert.equal(await runTimer(), 500);
  last().receive({ op: "error", status: 403, reason: "token does not cover this channel", channel: "news" });
  assert.equal(last().sent.length, 2); // only 503 is asked again
});

class FakeEventSource {
  static instances = [];
  constructor(url) {
    this.url = url;
    this.listeners = {};
    FakeEventSource.instances.push(this);
  }
  addEventListener(type, fn) { this.listeners[type] = fn; }
  close() { this.closed = true; }
  open(id) { this.listeners.stream({ data: JSON.stringify({ id }) }); }
  receive(message) { this.onmessage({ data: JSON.stringify(message) }); }
}

test("falls back to Server-Sent Events after two refused sockets, posts its ops, and tries WebSocket later", async () => {
  FakeEventSource.instances = [];
  const posts = [];
  const fetch = async (url, init) => { posts.push([url, JSON.parse(init.body), init.headers["Content-Type"]]); };
  const { sd, runTimer, last } = harness({ EventSource: FakeEventSource, fetch, retryWebSocketAfter: 60000 });
  await tick();
  const seen = [];
  sd.subscribe("news", (data, meta) => seen.push([data, meta.offset]));
  last().drop();  // refused before opening, twice
  await runTimer();
  last().drop();
  assert.equal(sd.transport, "sse");
  await runTimer();
  const source = FakeEventSource.instances.at(-1);
  assert.equal(source.url, "http://node/?v1=1");
  source.open("s1");
  assert.equal(sd.state, "open");
  source.receive({ op: "subscribed", channel: "news", offset: "e:1" });
  source.receive({ op: "message", channel: "news", offset: "e:2", data: "hi" });
  const answer = sd.send("news", "ping");
  await tick();
  await tick();
  assert.deepEqual(posts.map(([url, body, type]) => [url, body.op, type]), [
    ["http://node/?stream=s1", "subscribe", "text/plain"], ["http://node/?stream=s1", "send", "text/plain"]]);
  source.receive({ op: "reply", id: posts[1][1].id, data: "pong" });
  assert.equal(await answer, "pong");
  assert.deepEqual(seen, [["hi", "e:2"]]);
  // later: WebSocket again, resubscribing from the last offset
  await runTimer();
  assert.equal(source.closed, true);
  assert.equal(sd.transport, "websocket");
  await runTimer();
  last().open();
  assert.deepEqual(last().sent, [{ op: "subscribe", channel: "news", since: "e:2" }]);
});

test("refreshes a token function's token ahead of its expiry on the open socket", async () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const jwt = (exp) => `${b64({ alg: "HS256" })}.${b64({ exp })}.sig`;
  let issued = 0;
  const token = async () => jwt(1000 + 100 * issued++);
  const { sd, timers, last } = harness({ token, now: () => 900_000, refreshAhead: 30000 });
  await tick();
  last().open();
  const refresh = timers.find((t) => t.ms === 1000 * 1000 - 30000 - 900_000);
  assert.ok(refresh, JSON.stringify(timers.map((t) => t.ms)));
  refresh.fn();
  await tick();
  await tick();
  assert.deepEqual(last().sent.at(-1), { op: "refresh", token: jwt(1100) });
  last().receive({ op: "refreshed", expires: 1100 });
  assert.ok(timers.some((t) => t.ms === 1100 * 1000 - 30000 - 900_000 && !t.cancelled));
  sd.close();
});
