// Ready tunnels: WebSocket connections a worker of ours opened ahead of time on
// /v1/rpc/port-forward-pool (capability "tunnel-pool"), idle until the controller hands one a
// port-forward. A new tunnel then costs one message each way on a connection that is already
// authenticated, instead of the worker's dial-back (a TLS handshake and an upgrade: ≈ 4 ms of the
// ≈ 12 ms a tunnel took to set up, BENCHMARKS.md). Protocol: docs/tunnel-pool-protocol.md.
import type { WebSocket } from 'ws';
import type { PortForwardAction } from '../../api/worker-protocol.ts';
import { HttpError } from '../errors.ts';

/** Idle ready connections a worker may hold at once: more are refused (429), so no worker holds more than its share. */
export const READY_PER_WORKER = 8;

export class ReadyTunnels {
  /** Idle connections by worker, each with what takes it out of the idle set. */
  private readonly idle = new Map<string, Map<WebSocket, () => void>>();

  /** Before the upgrade: 429 when the worker holds its share already. */
  check(worker: string) {
    if (this.count(worker) >= READY_PER_WORKER) throw new HttpError(429, `worker ${worker} holds ${READY_PER_WORKER} ready tunnel connections already`);
  }

  /** An authenticated connection of `worker` (its account checked by the caller), idle until taken. */
  add(worker: string, ws: WebSocket) {
    let set = this.idle.get(worker);
    if (!set) this.idle.set(worker, (set = new Map()));
    // Checked again: several may have passed the check before any was added.
    if (set.size >= READY_PER_WORKER) return ws.close(1008, 'too many ready tunnel connections');
    // An idle connection carries nothing: a message on it breaks the protocol.
    const onMessage = () => {
      untake();
      ws.close(1008, 'a message on an idle ready-tunnel connection');
    };
    const untake = () => {
      ws.off('message', onMessage);
      ws.off('close', untake);
      const s = this.idle.get(worker);
      if (!s?.delete(ws)) return;
      if (s.size === 0) this.idle.delete(worker);
    };
    set.set(ws, untake);
    ws.on('close', untake);
    ws.on('message', onMessage);
  }

  /** One of `worker`'s idle connections, no longer idle, or undefined when it has none. */
  take(worker: string): WebSocket | undefined {
    for (const [ws, untake] of this.idle.get(worker) ?? []) {
      untake();
      if (ws.readyState === ws.OPEN) return ws;
    }
    return undefined;
  }

  /** Closes a worker's idle connections (its record was deleted). */
  disconnect(worker: string) {
    for (const ws of [...(this.idle.get(worker)?.keys() ?? [])]) ws.close(1000, 'worker deleted');
  }

  /** Idle connections of `worker`. */
  count(worker: string): number {
    return this.idle.get(worker)?.size ?? 0;
  }
}

/** The controller's message that turns an idle connection into a tunnel (a text frame). */
/** `reuse`: the tunnel may end with end frames, leaving the connection idle (docs/tunnel-pool-protocol.md). */
export const readyRequest = (action: PortForwardAction, reuse: boolean) => JSON.stringify(reuse ? { portForwardAction: action, reuse } : { portForwardAction: action });

/** The worker's answer (a text frame): the target is connected, or why not. */
export type ReadyAnswer = { ready: true; reuse: boolean } | { error: string };

export function parseReadyAnswer(data: Buffer, isBinary: boolean): ReadyAnswer | undefined {
  if (isBinary) return undefined;
  try {
    const msg = JSON.parse(data.toString()) as unknown;
    if (typeof msg !== 'object' || msg === null) return undefined;
    if ((msg as { ready?: unknown }).ready === true) return { ready: true, reuse: (msg as { reuse?: unknown }).reuse === true };
    const error = (msg as { error?: unknown }).error;
    if (typeof error === 'string') return { error: error.slice(0, 500) };
  } catch {
    // not JSON
  }
  return undefined;
}
