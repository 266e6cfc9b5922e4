// Relays WebSocket messages between a client and a worker (a port-forward tunnel), both ways, with
// flow control on each side and a byte budget per event-loop turn shared by every relay.
//
// Without the budget, 40 tunnels pushing large frames as fast as they could kept the controller's one
// thread busy relaying for 50–100 ms a turn, and a fresh request, which needs several turns (accept,
// TLS handshake, request), waited 0.3–2 s behind them. With it, a turn relays about TURN_BUDGET bytes
// and the rest of the tunnels wait, paused, for the next turns in arrival order: bulk transfers share
// the thread and everything else still gets a turn.
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

/** Forwards `from`'s messages to `to`, pausing `from` while `to` is backed up or the turn's budget is spent. */
export function relay(from: WebSocket, to: WebSocket) {
  let queued = 0;
  /** Why `from` is paused: its peer is backed up, and/or it waits for a turn. */
  let backedUp = false;
  let waitingTurn = false;
  const update = () => {
    if (backedUp || waitingTurn) from.pause();
    else from.resume();
  };
  from.on('message', (data, isBinary) => {
    if (to.readyState !== to.OPEN) return;
    const bytes = sizeOf(data);
    queued += bytes;
    to.send(data, { binary: isBinary }, () => {
      queued -= bytes;
      if (backedUp && queued <= HIGH_WATER / 2) {
        backedUp = false;
        update();
      }
    });
    if (queued > HIGH_WATER) backedUp = true;
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
  });
}
