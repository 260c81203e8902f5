// sockdrawer.js: the browser client of the sockdrawer.v1 protocol.
//
//   import { SockDrawer } from "./sockdrawer.js";
//   const sd = new SockDrawer("ws://localhost:8020/", { token: async () => fetchToken() });
//   const stop = sd.subscribe("news", (data, meta) => console.log(meta.channel, meta.offset, data));
//   const answer = await sd.send("chat", "hello");   // a listener's reply
//   sd.subscribe("room/1", onMessage, {               // who is on the channel
//     presence: true,
//     onPresence: (clients, { self }) => render(clients),
//     onJoin: ({ user, client }) => add(client, user),
//     onLeave: ({ user, client }) => remove(client),
//   });
//
// Where a WebSocket cannot open (a proxy that breaks upgrades), it falls back
// to Server-Sent Events on the same port by itself (`transports`), with the
// same API, and tries WebSocket again later (`retryWebSocketAfter`).
//
// Many channels on one socket; reconnects with exponential backoff and full
// jitter (base 0.5 s, cap 30 s, reset after a stable connection); asks for a
// fresh token on close code 4001 or a refused handshake; resubscribes with
// `since` = the last offset it saw on each channel, so nothing is missed (or
// a "reset" event says plainly that history could not cover the gap).
// No dependencies.

const PROTOCOL = "sockdrawer.v1";
const TOKEN_EXPIRED = 4001;

function decode(message) {
  if (message.encoding !== "base64") return message.data;
  const bytes = atob(message.data);
  const out = new Uint8Array(bytes.length);
  for (let i = 0; i < bytes.length; i++) out[i] = bytes.charCodeAt(i);
  return out;
}

export class SockDrawer extends EventTarget {
  /**
   * @param {string} url the node's ws:// or wss:// URL (its root path "/")
   * @param {object} [options]
   * @param {string | (() => string | Promise<string>)} [options.token] a token, or a function returning a fresh one
   * @param {number} [options.baseDelay] first reconnect delay cap, ms (500)
   * @param {number} [options.maxDelay] longest reconnect delay, ms (30000)
   * @param {number} [options.stableAfter] ms open after which the backoff starts over (5000)
   * @param {typeof WebSocket} [options.WebSocket] the WebSocket class (for tests)
   * @param {string[]} [options.transports] what to connect with, in order of preference
   *   (["websocket", "sse"]: Server-Sent Events after WebSocket failed twice before opening)
   * @param {number} [options.retryWebSocketAfter] ms on Server-Sent Events before trying WebSocket again (60000)
   * @param {typeof EventSource} [options.EventSource] the EventSource class (for tests)
   * @param {typeof fetch} [options.fetch] the fetch function (for tests)
   * @param {number} [options.refreshAhead] ms before a token function's token expires that a fresh one
   *   replaces it on the open connection (30000; 0: never, reconnect at expiry instead)
   * @param {() => number} [options.now] the time in ms (for tests)
   * @param {() => number} [options.random] a random number in [0, 1) (for tests)
   * @param {(fn: () => void, ms: number) => any} [options.setTimeout]
   * @param {(handle: any) => void} [options.clearTimeout]
   */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.options = options;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._EventSource = options.EventSource || globalThis.EventSource;
    this._fetch = options.fetch || ((...args) => globalThis.fetch(...args));
    this._transports = options.transports || (this._EventSource ? ["websocket", "sse"] : ["websocket"]);
    this._retryWebSocketAfter = options.retryWebSocketAfter ?? 60000;
    // the transport in use: "websocket" until it failed twice before opening (then "sse")
    this.transport = this._transports[0];
    this._wsFailures = 0;
    this._upgradeTimer = null;
    this._posts = Promise.resolve();
    // a token function's tokens are refreshed this long before they expire (the v1 "refresh" op)
    this._refreshAhead = options.refreshAhead ?? 30000;
    this._now = options.now || (() => Date.now());
    this._refreshTimer = null;
    this._random = options.random || Math.random;
    this._setTimeout = options.setTimeout || ((fn, ms) => globalThis.setTimeout(fn, ms));
    this._clearTimeout = options.clearTimeout || ((h) => globalThis.clearTimeout(h));
    this._base = options.baseDelay ?? 500;
    this._cap = options.maxDelay ?? 30000;
    this._stableAfter = options.stableAfter ?? 5000;
    // channel -> {records: Set of {callback, options}, offset: string | null,
    //             presence: whether it was subscribed with presence, members: Map client -> user, self}
    this._channels = new Map();
    this._pending = new Map(); // send id -> {resolve, reject}
    this._queue = []; // messages waiting for the socket to open
    this._nextId = 1;
    this._attempt = 0;
    this._token = null;
    this._needToken = true;
    this._closed = false;
    this._opened = false;
    this._stableTimer = null;
    this._retryTimer = null;
    this.state = "connecting";
    this._connect();
  }

  /**
   * Subscribe `callback(data, {channel, offset})` to `channel` (`callback` may be null); returns a function
   * that unsubscribes it.  With `options.presence` (implied by any of the handlers), the channel is
   * subscribed with presence: `onPresence(clients, {channel, self})` gets the whole list (again after each
   * reconnect), `onJoin` and `onLeave` each `{channel, user, client}`.
   */
  subscribe(channel, callback, options = {}) {
    const record = {
      callback,
      options,
      presence: options.presence ?? Boolean(options.onPresence || options.onJoin || options.onLeave),
    };
    let entry = this._channels.get(channel);
    if (!entry) {
      entry = { records: new Set(), offset: null, presence: record.presence, members: new Map(), self: null };
      this._channels.set(channel, entry);
      entry.records.add(record);
      this._send(this._subscribeMessage(channel, entry));
    } else {
      entry.records.add(record);
      if (record.presence && !entry.presence) {
        // the channel was subscribed without presence: subscribe it again with it, from the last offset
        entry.presence = true;
        this._send({ op: "unsubscribe", channel });
        this._send(this._subscribeMessage(channel, entry));
      }
    }
    return () => {
      entry.records.delete(record);
      if (entry.records.size === 0 && this._channels.get(channel) === entry) {
        this._channels.delete(channel);
        this._send({ op: "unsubscribe", channel });
      }
    };
  }

  /** Who is on `channel` as last reported (`[{user, client}]`), for a channel subscribed with presence. */
  presence(channel) {
    const entry = this._channels.get(channel);
    if (!entry || !entry.presence) return [];
    return [...entry.members].map(([client, user]) => ({ user, client }));
  }

  _subscribeMessage(channel, entry) {
    const message = { op: "subscribe", channel };
    if (entry.offset !== null) message.since = entry.offset;
    if (entry.presence) message.presence = true;
    return message;
  }

  _presenceEvent(entry, name, ...args) {
    for (const record of [...entry.records]) {
      const handler = record.options[name];
      if (typeof handler !== "function") continue;
      try {
        handler(...args);
      } catch (error) {
        this.dispatchEvent(new CustomEvent("error", { detail: { error, channel: args[0]?.channel } }));
      }
    }
  }

  /** Send `data` to the listeners of `channel`; resolves with the first reply. */
  send(channel, data) {
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject });
      this._send({ op: "send", channel, data, id });
    });
  }

  /** Close for good (no reconnect). */
  close() {
    this._closed = true;
    this._clearTimeout(this._retryTimer);
    this._clearTimeout(this._stableTimer);
    this._clearTimeout(this._upgradeTimer);
    this._clearTimeout(this._refreshTimer);
    if (this._ws) this._ws.close(1000);
    this._setState("closed");
  }

  /** The delay before reconnect attempt `attempt` (0-based): full jitter over min(cap, base * 2^attempt). */
  delayFor(attempt) {
    return this._random() * Math.min(this._cap, this._base * 2 ** attempt);
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.dispatchEvent(new CustomEvent("state", { detail: { state } }));
  }

  async _connect() {
    if (this._closed) return;
    this._setState("connecting");
    let url = this.url;
    const token = this.options.token;
    if (token !== undefined) {
      if (this._needToken || this._token === null) {
        try {
          this._token = typeof token === "function" ? await token() : token;
        } catch (error) {
          this.dispatchEvent(new CustomEvent("error", { detail: { error } }));
          this._retry();
          return;
        }
        this._needToken = false;
      }
      url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(this._token);
    }
    if (this._closed) return;
    if (this.transport === "sse") {
      this._connectStream(url);
      return;
    }
    const ws = new this._WebSocket(url, PROTOCOL);
    this._ws = ws;
    this._opened = false;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (event) => this._onMessage(event);
    ws.onclose = (event) => this._onClose(ws, event);
  }

  _onOpen(ws) {
    if (ws !== this._ws) return;
    this._opened = true;
    this._wsFailures = 0;
    this._setState("open");
    this._stableTimer = this._setTimeout(() => { this._attempt = 0; }, this._stableAfter);
    for (const [channel, entry] of this._channels) {
      ws.send(JSON.stringify(this._subscribeMessage(channel, entry)));
    }
    this._scheduleRefresh();
    const queued = this._queue;
    this._queue = [];
    for (const message of queued) {
      if (message.op === "send") ws.send(JSON.stringify(message));
    }
  }

  _onMessage(event) {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    const entry = message.channel !== undefined ? this._channels.get(message.channel) : undefined;
    switch (message.op) {
      case "message":
        if (!entry) return;
        if (message.offset !== null && message.offset !== undefined) entry.offset = message.offset;
        for (const { callback } of [...entry.records]) {
          if (typeof callback !== "function") continue;
          try {
            callback(decode(message), { channel: message.channel, offset: message.offset });
          } catch (error) {
            this.dispatchEvent(new CustomEvent("error", { detail: { error, channel: message.channel } }));
          }
        }
        break;
      case "subscribed":
        if (entry) entry.failures = 0;
        if (entry && message.offset !== null && message.offset !== undefined) entry.offset = message.offset;
        this.dispatchEvent(new CustomEvent("subscribed", { detail: message }));
        break;
      case "presence":
        if (!entry || !entry.presence) return;
        entry.members = new Map(message.clients.map((c) => [c.client, c.user]));
        entry.self = message.self;
        this._presenceEvent(entry, "onPresence", this.presence(message.channel),
          { channel: message.channel, self: message.self });
        break;
      case "join":
      case "leave": {
        if (!entry || !entry.presence) return;
        const known = entry.members.has(message.client);
        if (message.op === "join" ? known : !known) return; // already reported
        if (message.op === "join") entry.members.set(message.client, message.user);
        else entry.members.delete(message.client);
        this._presenceEvent(entry, message.op === "join" ? "onJoin" : "onLeave",
          { channel: message.channel, user: message.user, client: message.client });
        break;
      }
      case "refreshed":
        this._scheduleRefresh();
        break;
      case "reset":
        if (entry) entry.offset = null;
        this.dispatchEvent(new CustomEvent("reset", { detail: { channel: message.channel } }));
        break;
      case "reply": {
        const waiting = this._pending.get(message.id);
        if (waiting) {
          this._pending.delete(message.id);
          waiting.resolve(message.data);
        }
        break;
      }
      case "error": {
        const waiting = message.id !== undefined ? this._pending.get(message.id) : undefined;
        if (waiting) {
          this._pending.delete(message.id);
          waiting.reject(Object.assign(new Error(message.reason), { status: message.status }));
        } else {
          // 503: the node could not read the channel's history (its broker is down) and dropped the
          // subscription; ask again from the same offset, with the reconnects' backoff
          if (message.status === 503 && message.channel !== undefined) this._subscribeLater(message.channel);
          this.dispatchEvent(new CustomEvent("error", { detail: message }));
        }
        break;
      }
    }
  }

  _onClose(ws, event) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._clearTimeout(this._stableTimer);
    if (this._closed) return;
    // a fresh token after expiry, and after a refused handshake (browsers
    // report it as a close before open)
    if (event.code === TOKEN_EXPIRED || !this._opened) this._needToken = true;
    if (!this._opened && this.transport === "websocket" && this._transports.includes("sse")) {
      // twice refused before opening (a proxy that breaks upgrades?): Server-Sent Events, then
      // WebSocket again later
      this._wsFailures += 1;
      if (this._wsFailures >= 2) {
        this._wsFailures = 0;
        this.transport = "sse";
        this.dispatchEvent(new CustomEvent("transport", { detail: { transport: "sse" } }));
      }
    }
    for (const [id, waiting] of this._pending) {
      this._pending.delete(id);
      waiting.reject(Object.assign(new Error("connection closed"), { status: 0 }));
    }
    this._retry();
  }

  /** With a token function: ask it for a fresh token ahead of the current one's expiry, and send it. */
  _scheduleRefresh() {
    this._clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    if (typeof this.options.token !== "function" || !this._token || this._refreshAhead <= 0) return;
    let exp;
    try {
      exp = JSON.parse(atob(this._token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).exp;
    } catch {
      return; // not a JWT whose expiry we can read: reconnect at expiry instead
    }
    if (typeof exp !== "number") return;
    const delay = Math.max(0, exp * 1000 - this._refreshAhead - this._now());
    const ws = this._ws;
    this._refreshTimer = this._setTimeout(async () => {
      if (this._ws !== ws || this._closed) return;
      try {
        this._token = await this.options.token();
      } catch (error) {
        this.dispatchEvent(new CustomEvent("error", { detail: { error } }));
        return;
      }
      if (this._ws === ws) this._send({ op: "refresh", token: this._token });
    }, delay);
  }

  _subscribeLater(channel) {
    const entry = this._channels.get(channel);
    if (!entry) return;
    const delay = this.delayFor(entry.failures || 0);
    entry.failures = (entry.failures || 0) + 1;
    const ws = this._ws;
    this._setTimeout(() => {
      // still wanted, on the same socket (a new socket subscribes everything anyway)
      if (this._channels.get(channel) === entry && this._ws === ws) this._send(this._subscribeMessage(channel, entry));
    }, delay);
  }

  _retry() {
    if (this._closed) return;
    this._setState("reconnecting");
    const delay = this.delayFor(this._attempt);
    this._attempt += 1;
    this._retryTimer = this._setTimeout(() => this._connect(), delay);
  }

  _send(message) {
    const ws = this._ws;
    if (ws && ws.isStream) {
      if (this._opened) ws.send(message);
      else if (message.op === "send") this._queue.push(message);
      return;
    }
    if (ws && this._opened && ws.readyState === 1) {
      ws.send(JSON.stringify(message));
    } else if (message.op === "send") {
      this._queue.push(message);
    }
    // subscribe/unsubscribe need no queue: the channel map is sent on open
  }
}

/**
 * A Server-Sent Events stream standing in for the socket: the same envelopes arrive as its events, and ops
 * go out as POSTs for the stream (in order). It never reconnects by itself: the client does, as for a
 * socket, resubscribing each channel from its last offset.
 */
SockDrawer.prototype._connectStream = function (wsUrl) {
  const base = wsUrl.replace(/^ws/, "http").replace(/\?.*$/, "").replace(/\/?$/, "/");
  const query = wsUrl.includes("?") ? "&" + wsUrl.split("?")[1] : "";
  const source = new this._EventSource(base + "?v1=1" + query);
  const stream = {
    isStream: true,
    readyState: 0,
    id: null,
    send: (message) => {
      if (stream.id === null) return;
      const url = base + "?stream=" + encodeURIComponent(stream.id);
      const body = typeof message === "string" ? message : JSON.stringify(message);
      // text/plain: a simple request, no CORS preflight
      this._posts = this._posts.then(() => this._fetch(url, { method: "POST", body, headers: { "Content-Type": "text/plain" } }))
        .catch((error) => this.dispatchEvent(new CustomEvent("error", { detail: { error } })));
    },
    close: () => {
      source.close();
      if (stream.readyState !== 3) {
        stream.readyState = 3;
        this._onClose(stream, { code: 1000 });
      }
    },
  };
  this._ws = stream;
  this._opened = false;
  source.addEventListener("stream", (event) => {
    if (this._ws !== stream) return;
    stream.id = JSON.parse(event.data).id;
    stream.readyState = 1;
    this._onOpen(stream);
    if (this._transports[0] === "websocket" && this._retryWebSocketAfter > 0) {
      this._clearTimeout(this._upgradeTimer);
      this._upgradeTimer = this._setTimeout(() => {
        if (this._ws !== stream || this._closed) return;
        this.transport = "websocket";
        this.dispatchEvent(new CustomEvent("transport", { detail: { transport: "websocket" } }));
        this._attempt = 0;
        stream.close();
      }, this._retryWebSocketAfter);
    }
  });
  source.onmessage = (event) => {
    if (this._ws === stream) this._onMessage(event);
  };
  source.onerror = () => {
    // the stream broke (or never opened): the client reconnects, not EventSource
    if (this._ws !== stream) {
      source.close();
      return;
    }
    stream.close();
  };
};

export default SockDrawer;
