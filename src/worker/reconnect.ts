// How the worker's connections to the controller (its watch, ready tunnel connections, the tunnel
// mux) come back when lost, and notice when they are dead.
import type { WebSocket } from 'ws';

/**
 * Exponential back-off with full jitter, 0.5 s doubling to 15 s: workers whose connections failed
 * together come back spread out, not all at once.
 */
export class Backoff {
  private ceiling = 500;

  /** How long to wait before the next attempt (and the next one's ceiling doubles). */
  next(): number {
    const delay = Math.random() * this.ceiling;
    this.ceiling = Math.min(this.ceiling * 2, 15_000);
    return delay;
  }

  /** An attempt succeeded: the next failure waits little again. */
  reset() {
    this.ceiling = 500;
  }
}

/** A connection that heard no ping from the controller (every 20 s) for this long is taken for dead. */
const SILENCE_MS = 65_000;

/** Terminates `ws` once it is open and has heard no ping for SILENCE_MS; returns the stop of that watch. */
export function dropWhenSilent(ws: WebSocket): () => void {
  let silence: NodeJS.Timeout | undefined;
  const alive = () => {
    clearTimeout(silence);
    silence = setTimeout(() => ws.terminate(), SILENCE_MS);
    silence.unref();
  };
  if (ws.readyState === ws.OPEN) alive();
  else ws.on('open', alive);
  ws.on('ping', alive);
  return () => {
    clearTimeout(silence);
    ws.off('open', alive);
    ws.off('ping', alive);
  };
}
