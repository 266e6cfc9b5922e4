// Relays the bytes of a tunnel between a client (a WebSocket, or an SSH channel of the jump host) and
// a worker's WebSocket, both ways, with flow control on each side and a byte budget per event-loop
// turn shared by every relay: the one path every tunnel's bytes take through the controller.
//
// Without the budget, 40 tunnels pushing large frames as fast as they could kept the controller's one
// thread busy relaying for 50–100 ms a turn, and a fresh request, which needs several turns (accept,
// TLS handshake, request), waited 0.3–2 s behind them. With it, a turn relays about TURN_BUDGET bytes
// and the rest of the tunnels wait, paused, for the next turns in arrival order: bulk transfers share
// the thread and everything else still gets a turn.
import type { Duplex } from 'node:stream';
import type { RawData, WebSocket } from 'ws';

/** Bytes relayed per event-loop turn before the tunnels that want more are paused until a later one. */
const TURN_BUDGET = 1024 * 1024;
/** Bytes a side may have queued for its peer before the side sending them is paused. */
const HIGH_WATER = 512 * 1024;

let spentThisTurn = 0;
let turnScheduled = false;
/** Sides paused for the budget, oldest first, with the size of the message that paused them. */
const waiting: { resume: () => void; bytes: number }[] = [];

function nextTurn() {
  turnScheduled = false;
  spentThisTurn = 0;
  // Resume, oldest first, about a turn's worth; the others keep their place for the turns after.
  let promised = 0;
  while (waiting.length && promised < TURN_BUDGET) {
    const next = waiting.shift()!;
    promised += next.bytes;
    next.resume();
  }
  if (waiting.length) schedule();
}

function schedule() {
  if (turnScheduled) return;
  turnScheduled = true;
  setImmediate(nextTurn);
}

const sizeOf = (data: RawData) => (Array.isArray(data) ? data.reduce((n, b) => n + b.length, 0) : data instanceof ArrayBuffer ? data.byteLength : data.length);
const asBuffer = (data: RawData) => (Array.isArray(data) ? Buffer.concat(data) : data instanceof ArrayBuffer ? Buffer.from(data) : data);

/** One end of a relay: what arrives from it, how to hold it back, and how to send it bytes. */
export interface RelaySide {
  onData(listener: (data: RawData, isBinary: boolean) => void): void;
  offData(listener: (data: RawData, isBinary: boolean) => void): void;
  pause(): void;
  resume(): void;
  readonly open: boolean;
  /** Bytes queued for it before the side sending them is paused (default HIGH_WATER). */
  readonly highWater?: number;
  /** Sends `data`; `sent` runs once it has left (or failed). */
  send(data: RawData, isBinary: boolean, sent: () => void): void;
}

/** A WebSocket as a relay side: message for message. */
export function wsSide(ws: WebSocket): RelaySide {
  return {
    onData: (listener) => ws.on('message', listener),
    offData: (listener) => ws.off('message', listener),
    pause: () => ws.pause(),
    resume: () => ws.resume(),
    get open() {
      return ws.readyState === ws.OPEN;
    },
    send: (data, isBinary, sent) => ws.send(data, { binary: isBinary }, () => sent()),
  };
}

/** A byte stream (an SSH channel) as a relay side: chunk for chunk, sent as binary messages. */
export function streamSide(stream: Duplex): RelaySide {
  return {
    onData: (listener) => stream.on('data', (chunk: Buffer) => listener(chunk, true)),
    offData: () => {},
    pause: () => stream.pause(),
    resume: () => stream.resume(),
    get open() {
      return stream.writable && !stream.destroyed;
    },
    send: (data, _isBinary, sent) => void stream.write(asBuffer(data), () => sent()),
  };
}

/**
 * Forwards what arrives from `from` to `to`, pausing `from` while `to` is backed up or the turn's
 * budget is spent. `accept` (default: everything) picks the messages that are the tunnel's bytes.
 * Returns the stop: nothing more is forwarded and `from` is left running (a connection reused).
 */
export function relay(from: RelaySide, to: RelaySide, accept?: (isBinary: boolean) => boolean): () => void {
  let queued = 0;
  const high = to.highWater ?? HIGH_WATER;
  /** Why `from` is paused: its peer is backed up, and/or it waits for a turn. */
  let backedUp = false;
  let waitingTurn = false;
  let stopped = false;
  const update = () => {
    if (stopped) return;
    if (backedUp || waitingTurn) from.pause();
    else from.resume();
  };
  const onData = (data: RawData, isBinary: boolean) => {
    if (stopped || !to.open || (accept && !accept(isBinary))) return;
    // No paced scavenges here (src/client/scavenge.ts): with many tunnels' buffers in flight they
    // promoted them to the old generation, where only a full collection frees them (BENCHMARKS.md).
    const bytes = sizeOf(data);
    queued += bytes;
    to.send(data, isBinary, () => {
      queued -= bytes;
      if (backedUp && queued <= high / 2) {
        backedUp = false;
        update();
      }
    });
    if (queued > high) backedUp = true;
    spentThisTurn += bytes;
    if (spentThisTurn > TURN_BUDGET && !waitingTurn) {
      waitingTurn = true;
      waiting.push({
        bytes,
        resume: () => {
          waitingTurn = false;
          update();
        },
      });
      schedule();
    }
    update();
  };
  from.onData(onData);
  return () => {
    if (stopped) return;
    stopped = true;
    from.offData(onData);
    from.resume();
  };
}

/** One end of a spliced tunnel: its relay side, how to end it (half-close) or destroy it, and what it tells. */
export interface SpliceEnd {
  side: RelaySide;
  /** No more bytes for it (after those relayed). */
  end(): void;
  /** Registers what to do when it sends no more bytes (its end). */
  onEnd(fn: () => void): void;
  destroy(err?: Error): void;
  /** Registers what to do when it closes: `clean` when it ended both ways. */
  onClose(fn: (clean: boolean, err?: Error) => void): void;
}

/** A tunnel's byte stream (a worker's WebSocket as a stream) as a splice end. */
export function streamEnd(stream: Duplex): SpliceEnd {
  return {
    side: streamSide(stream),
    end: () => stream.end(),
    onEnd: (fn) => stream.on('end', fn),
    destroy: (err) => stream.destroy(err),
    onClose: (fn) => {
      let error: Error | undefined;
      stream.on('error', (err) => (error = err));
      stream.on('close', () => fn(stream.readableEnded && stream.writableFinished, error));
    },
  };
}

/**
 * Splices two tunnel ends (multiplexed tunnels, or one and a worker's WebSocket as a stream), both
 * ways, with the relay's flow control and turn budget. An end (half-close) passes to the other side;
 * one side closed without ending both ways (reset, lost) destroys the other, with its error.
 * `opened`: `b` is still being opened. What `a` sends goes to it at once (its peer holds it until
 * then), and `a`'s end or close passes on; `b`'s bytes, end and close only count once `opened`
 * resolves. If it rejects, nothing more goes to `b` and `a` is left to the caller (to refuse it).
 */
export function spliceTunnelEnds(a: SpliceEnd, b: SpliceEnd, opened?: Promise<unknown>) {
  a.onEnd(() => b.end());
  a.onClose((clean, err) => clean || b.destroy(err));
  const stop = relay(a.side, b.side);
  const back = () => {
    b.onEnd(() => a.end());
    b.onClose((clean, err) => clean || a.destroy(err));
    relay(b.side, a.side);
  };
  if (opened) opened.then(back, stop);
  else back();
}
