// Types for sockdrawer.js (the sockdrawer.v1 browser client).

export interface MessageMeta {
  channel: string;
  /** The message's offset in the channel's history; null for a message without history. */
  offset: string | null;
}

export type MessageCallback = (data: string | Uint8Array, meta: MessageMeta) => void;

/** One socket on a channel with presence. */
export interface PresenceEntry {
  /** The `sub` of the socket's token; null without a token. */
  user: string | null;
  /** The socket's id (random; one per socket). */
  client: string;
}

export interface PresenceEvent extends PresenceEntry {
  channel: string;
}

export interface SubscribeOptions {
  /** Subscribe with presence (implied by any of the handlers below). */
  presence?: boolean;
  /** The whole list: after subscribing, and again after each reconnect. `self` is this socket's id. */
  onPresence?: (clients: PresenceEntry[], info: { channel: string; self: string }) => void;
  /** A socket subscribed to the channel with presence. */
  onJoin?: (event: PresenceEvent) => void;
  /** A socket left: unsubscribed, closed, or its node stopped refreshing its entries. */
  onLeave?: (event: PresenceEvent) => void;
}

export interface SockDrawerOptions {
  /** A token, or a function returning a fresh one (called again after close code 4001 or a refused handshake). */
  token?: string | (() => string | Promise<string>);
  /** Reconnect delays: full jitter over min(maxDelay, baseDelay * 2^attempt) ms. */
  baseDelay?: number;
  maxDelay?: number;
  /** Milliseconds a connection must stay open before the backoff starts over. */
  stableAfter?: number;
  /**
   * What to connect with, in order of preference: by default ["websocket", "sse"] where the browser has
   * EventSource (Server-Sent Events after two WebSocket attempts failed before opening).
   */
  transports?: Array<"websocket" | "sse">;
  /**
   * With a token function: milliseconds before the token expires that a fresh one replaces it on the open
   * connection (the v1 "refresh" op; 30000; 0: reconnect at expiry instead).
   */
  refreshAhead?: number;
  /** Milliseconds on Server-Sent Events before trying WebSocket again (60000; 0: never). */
  retryWebSocketAfter?: number;
  /** For tests: the WebSocket and EventSource classes, fetch, randomness and timers. */
  WebSocket?: typeof WebSocket;
  EventSource?: typeof EventSource;
  fetch?: typeof fetch;
  now?: () => number;
  random?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
}

export type SockDrawerState = "connecting" | "open" | "reconnecting" | "closed";

export declare class SockDrawer extends EventTarget {
  constructor(url: string, options?: SockDrawerOptions);
  readonly url: string;
  readonly state: SockDrawerState;
  /** The transport in use (a "transport" event says when it changes). */
  readonly transport: "websocket" | "sse";
  /** Subscribe to a channel (with presence, given the options); returns a function that unsubscribes. */
  subscribe(channel: string, callback: MessageCallback | null, options?: SubscribeOptions): () => void;
  /** Who is on a channel subscribed with presence, as last reported. */
  presence(channel: string): PresenceEntry[];
  /** Send data to the channel's listeners; resolves with the first reply. */
  send(channel: string, data: unknown): Promise<unknown>;
  /** Close for good. */
  close(): void;
  /** The reconnect delay before attempt `attempt`, in ms. */
  delayFor(attempt: number): number;
}

export default SockDrawer;
