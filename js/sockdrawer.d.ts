// Types for sockdrawer.js (the sockdrawer.v1 browser client).

export interface MessageMeta {
  channel: string;
  /** The message's offset in the channel's history; null for a message without history. */
  offset: string | null;
}

export type MessageCallback = (data: string | Uint8Array, meta: MessageMeta) => void;

export interface SockDrawerOptions {
  /** A token, or a function returning a fresh one (called again after close code 4001 or a refused handshake). */
  token?: string | (() => string | Promise<string>);
  /** Reconnect delays: full jitter over min(maxDelay, baseDelay * 2^attempt) ms. */
  baseDelay?: number;
  maxDelay?: number;
  /** Milliseconds a connection must stay open before the backoff starts over. */
  stableAfter?: number;
  /** For tests: the WebSocket class, randomness and timers. */
  WebSocket?: typeof WebSocket;
  random?: () => number;
  setTimeout?: (fn: () => void, ms: number) => unknown;
  clearTimeout?: (handle: unknown) => void;
}

export type SockDrawerState = "connecting" | "open" | "reconnecting" | "closed";

export declare class SockDrawer extends EventTarget {
  constructor(url: string, options?: SockDrawerOptions);
  readonly url: string;
  readonly state: SockDrawerState;
  /** Subscribe to a channel; returns a function that unsubscribes. */
  subscribe(channel: string, callback: MessageCallback): () => void;
  /** Send data to the channel's listeners; resolves with the first reply. */
  send(channel: string, data: unknown): Promise<unknown>;
  /** Close for good. */
  close(): void;
  /** The reconnect delay before attempt `attempt`, in ms. */
  delayFor(attempt: number): number;
}

export default SockDrawer;
