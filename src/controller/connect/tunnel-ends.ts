// Splicing a tunnel whose client or worker connection (or both) ends it with end frames instead of a
// close, so that the connection, authenticated once, carries the next tunnel. A side that does not
// speak them (upstream's CLI, a dial-back) is closed as before; the other side then gets an end frame.
// Protocol: docs/tunnel-pool-protocol.md ("Reusing a connection").
import type { RawData, WebSocket } from 'ws';
import { END_FRAME, isEndFrame } from '../../client/tunnel-ends.ts';
import { relay, wsSide } from './relay.ts';
import type { Tunnel } from './tunnels.ts';

/** How long a side may take to finish its close handshake before its connection is cut. */
const CLOSE_GRACE_MS = 5_000;

interface Leg {
  ws: WebSocket;
  /** Set when the leg speaks end frames: makes its connection idle again once both ends have passed. */
  recycle?: () => void;
  /** No more bytes from it (its end frame, or its close). */
  gotEnd: boolean;
  /** No more bytes to it (our end frame, or our close). */
  sentEnd: boolean;
  done: boolean;
  /** Stops relaying its bytes to the other leg. */
  stopRelay: () => void;
  /** Removes this splice's listeners from its connection. */
  unlisten: (() => void)[];
}

/** The relay's side sending to `l`: on a leg that speaks end frames, text frames are control, so a peer's bytes go as binary. */
function sideTo(l: Leg) {
  const side = wsSide(l.ws);
  if (!l.recycle) return side;
  return { ...side, get open() { return side.open; }, send: (data: RawData, _isBinary: boolean, sent: () => void) => side.send(data, true, sent) };
}

/**
 * Splices `client` (ends with end frames when `clientRecycle` is given) and `tunnel` (when it has
 * `recycle`), both ways, with relay.ts's flow control. A connection whose tunnel ended with an end
 * frame each way is handed to its recycle, idle again; one that breaks the protocol is closed (1008).
 */
export function spliceEnds(client: WebSocket, clientRecycle: (() => void) | undefined, tunnel: Tunnel) {
  const leg = (ws: WebSocket, recycle?: () => void): Leg => ({ ws, recycle, gotEnd: false, sentEnd: false, done: false, stopRelay: () => {}, unlisten: [] });
  const c = leg(client, clientRecycle);
  const w = leg(tunnel.ws, tunnel.recycle);
  const other = (l: Leg) => (l === c ? w : c);
  const listen = (l: Leg, event: 'message' | 'close' | 'error', fn: Parameters<WebSocket['on']>[1]) => {
    l.ws.on(event, fn);
    l.unlisten.push(() => l.ws.off(event, fn));
  };

  const closeLeg = (l: Leg, code: number, reason: string) => {
    l.sentEnd = true;
    if (l.ws.readyState === l.ws.CLOSED) return;
    if (l.ws.readyState === l.ws.OPEN) l.ws.close(code, reason.slice(0, 120));
    const cut = setTimeout(() => l.ws.terminate(), CLOSE_GRACE_MS);
    cut.unref();
    l.ws.once('close', () => clearTimeout(cut));
  };
  /** Both ends have passed on a leg that speaks end frames: its connection is idle again. */
  const check = (l: Leg) => {
    if (l.done || !l.recycle || !l.gotEnd || !l.sentEnd || l.ws.readyState !== l.ws.OPEN) return;
    l.done = true;
    for (const off of l.unlisten) off();
    l.stopRelay();
    l.recycle();
  };
  /** No more bytes for `l`: an end frame, or a close for a leg that does not speak them. */
  const finish = (l: Leg, reason: string) => {
    if (l.sentEnd) return;
    if (!l.recycle) return closeLeg(l, 1000, reason);
    l.sentEnd = true;
    // After the bytes relayed before it: ws sends in order.
    if (l.ws.readyState === l.ws.OPEN) l.ws.send(END_FRAME);
    check(l);
  };
  const broken = (l: Leg) => {
    closeLeg(l, 1008, l.gotEnd ? 'bytes after the end of the tunnel' : 'a text frame other than the end of the tunnel');
    l.gotEnd = true;
    const peer = other(l);
    if (!peer.done) closeLeg(peer, l === c ? 1000 : 1011, l === c ? 'client closed' : 'the worker broke the tunnel protocol');
  };

  for (const l of [c, w]) {
    const peer = other(l);
    if (l.recycle) {
      // Its binary frames are the tunnel's bytes (the relay's); its one text frame is its end.
      listen(l, 'message', (data: RawData, isBinary: boolean) => {
        if (isBinary && !l.gotEnd) return;
        if (l.gotEnd || !isEndFrame(data, isBinary)) return broken(l);
        l.gotEnd = true;
        l.stopRelay();
        finish(peer, l === c ? 'client closed' : 'the VM closed the connection');
        check(l);
      });
    }
    listen(l, 'close', (code: number, reason: Buffer) => {
      l.gotEnd = l.sentEnd = true;
      l.stopRelay();
      if (peer.done || peer.sentEnd) return;
      // The peer had ended already: the tunnel is over, and our end frame completes it.
      if (peer.gotEnd) return finish(peer, 'client closed');
      if (l === c) {
        // A client that vanished (no close frame) has the worker side cut at once.
        if (code === 1006) return void peer.ws.terminate();
        // A client gone is not an end: the worker's side may still be sending (closed, not reused).
        return closeLeg(peer, 1000, 'client closed');
      }
      if (code === 1000 || code === 1005) return finish(peer, 'the VM closed the connection');
      closeLeg(peer, 1011, `the worker connection was lost (${code}${reason.length ? ` ${reason.toString()}` : ''})`);
    });
    listen(l, 'error', () => {});
  }
  c.stopRelay = relay(wsSide(client), sideTo(w), c.recycle && ((isBinary) => isBinary && !c.gotEnd));
  w.stopRelay = relay(wsSide(tunnel.ws), sideTo(c), w.recycle && ((isBinary) => isBinary && !w.gotEnd));
  tunnel.start();
}
