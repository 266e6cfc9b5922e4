// A client's ready connections (capability "port-forward-ready"): the client opens the WebSocket ahead
// of time, naming the target in the URL, and it stays idle until the client asks for the tunnel with
// one text frame; the controller answers with one text frame and from then on relays it as any
// tunnel. The client's TLS handshake and upgrade are then off the critical path of a new tunnel.
// Protocol: docs/tunnel-pool-protocol.md ("Client ↔ controller").
import type { RawData, WebSocket } from 'ws';
import { HttpError, CLIENT_GONE } from '../errors.ts';
import { MuxTunnel } from '../../client/mux.ts';
import { spliceReady } from './mux.ts';
import { splice, type Tunnel } from './tunnels.ts';

/** The client's request for its tunnel (a text frame); `reuse`: it ends the tunnel with end frames and keeps the connection. */
export const OPEN_REQUEST = { open: true } as const;

const parseOpenRequest = (data: RawData, isBinary: boolean): { reuse: boolean } | undefined => {
  if (isBinary || !Buffer.isBuffer(data) || data.length > 64) return undefined;
  try {
    const msg = JSON.parse(data.toString()) as { open?: unknown; reuse?: unknown } | null;
    return msg?.open === true ? { reuse: msg.reuse === true } : undefined;
  } catch {
    return undefined;
  }
};

/** Bytes a client may send after its open request that arrive (already read) before the tunnel is open. */
const EARLY_BYTES = 1024 * 1024;

/**
 * Holds an authenticated client WebSocket until it asks for its tunnel, then opens it with `open` (on
 * the worker's mux connection, or a worker's WebSocket; aborted if the client leaves meanwhile) and
 * answers `{"ready":true}` (then relays) or `{"error":…,"status":…}` (then closes). Anything but the
 * request first breaks the protocol (1008).
 * What the client sends after the request waits, unread, in its socket until the tunnel is open.
 */
export function awaitOpenRequest(ws: WebSocket, open: (signal: AbortSignal) => Promise<Tunnel | MuxTunnel>) {
  const gone = new AbortController();
  const leave = () => gone.abort(CLIENT_GONE);
  ws.once('close', leave);
  let requested = false;
  // Frames read with the request (the same socket read) before the pause took effect.
  const early: [RawData, boolean][] = [];
  let earlyBytes = 0;
  const onMessage = (data: RawData, isBinary: boolean) => {
    if (requested) {
      early.push([data, isBinary]);
      earlyBytes += Buffer.isBuffer(data) ? data.length : EARLY_BYTES;
      if (earlyBytes > EARLY_BYTES) ws.close(1008, 'too much sent before the answer to the open request');
      return;
    }
    requested = true;
    const request = parseOpenRequest(data, isBinary);
    if (!request) return ws.close(1008, 'expected {"open":true}');
    ws.pause();
    open(gone.signal).then(
      (tunnel) => {
        ws.off('close', leave);
        ws.off('message', onMessage);
        if (ws.readyState !== ws.OPEN) return void (tunnel instanceof MuxTunnel ? tunnel.destroy() : tunnel.ws.close(1000, 'the client went away'));
        // Reused: once the tunnel has ended with end frames both ways, the connection waits for the next request.
        ws.send(request.reuse ? '{"ready":true,"reuse":true}' : '{"ready":true}');
        const recycle = request.reuse ? () => awaitOpenRequest(ws, open) : undefined;
        if (tunnel instanceof MuxTunnel) spliceReady(ws, tunnel, recycle);
        else splice(ws, tunnel, recycle);
        for (const [data, isBinary] of early) ws.emit('message', data, isBinary);
        ws.resume();
      },
      (err: unknown) => {
        ws.off('close', leave);
        ws.off('message', onMessage);
        if (ws.readyState !== ws.OPEN) return;
        const status = err instanceof HttpError ? err.statusCode : 500;
        ws.send(JSON.stringify({ error: err instanceof HttpError ? err.message : 'internal error', status }));
        ws.close(1000);
      },
    );
  };
  ws.on('message', onMessage);
}
