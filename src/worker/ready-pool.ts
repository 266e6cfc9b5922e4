// The worker's ready tunnel connections (capability "tunnel-pool" of the controller, "portForwardPool"
// of the worker): a few authenticated WebSockets on /v1/rpc/port-forward-pool kept open and idle, so a
// port-forward costs one message each way instead of a dial-back's TLS handshake and upgrade. Each
// one used is replaced at once; lost ones are reopened with back-off. Protocol:
// docs/tunnel-pool-protocol.md.
import { WebSocket, type RawData } from 'ws';
import type { PortForwardAction } from '../api/worker-protocol.ts';
import { traceTunnel } from '../tunnel-trace.ts';
import { dialTarget, joinTarget, type DialBackContext } from './dial-back.ts';
import { reusableStream } from '../client/tunnel-ends.ts';
import { Backoff, dropWhenSilent } from './reconnect.ts';

/**
 * Ready connections a worker keeps by default (the controller takes at most 8 per worker): one, replaced
 * 10 ms after it is used. Each costs the controller a TLS connection (≈ 80 kB) and, after a restart, a
 * handshake: at 4 a thousand workers held 5,000 connections (≈ 390 MB idle) instead of 2,000.
 */
export const READY_POOL_SIZE = 1;
/** How long after a connection is taken its replacement is opened. */
const REFILL_DELAY_MS = 10;
/** Idle connections kept at most, counting those back from a tunnel that ended (beyond: closed; the controller takes 8). */
const MAX_IDLE = 4;

export class ReadyPool {
  /** Connections opening or open, not yet used. */
  private readonly idle = new Set<WebSocket>();
  private readonly ctx: DialBackContext;
  private readonly size: number;
  private readonly backoff = new Backoff();
  private retry?: NodeJS.Timeout;
  private running = false;

  constructor(ctx: DialBackContext, size = READY_POOL_SIZE) {
    this.ctx = ctx;
    this.size = size;
  }

  start() {
    this.running = true;
    this.fill();
  }

  stop() {
    this.running = false;
    clearTimeout(this.retry);
    for (const ws of this.idle) ws.terminate();
    this.idle.clear();
  }

  /**
   * Refills without waiting out a back-off (the watch reconnected: the controller is back), at a
   * random moment within `spreadMs`: after a controller restart a thousand workers' ready connections
   * would otherwise be as many TLS handshakes at once, in front of its API requests and the other
   * workers' watches.
   */
  kick(spreadMs = 0) {
    if (!this.running) return;
    clearTimeout(this.retry);
    this.retry = undefined;
    this.backoff.reset();
    if (spreadMs <= 0) return this.fill();
    this.retry = setTimeout(() => {
      this.retry = undefined;
      this.fill();
    }, Math.random() * spreadMs);
  }

  /** Connections open and idle now (the controller holds them as ready by the time they count). */
  get count() {
    let open = 0;
    for (const ws of this.idle) if (ws.readyState === ws.OPEN) open++;
    return open;
  }

  private fill() {
    while (this.running && !this.retry && this.idle.size < this.size) this.open();
  }

  /** Refills later: exponential back-off with full jitter, so workers do not all come back at once. */
  private backOff() {
    if (!this.running || this.retry) return;
    const delay = this.backoff.next();
    this.retry = setTimeout(() => {
      this.retry = undefined;
      this.fill();
    }, delay);
  }

  private open() {
    const { client, workerName, log } = this.ctx;
    const url = client.urlOf('/v1/rpc/port-forward-pool', true);
    url.searchParams.set('workerName', workerName);
    const ws = new WebSocket(url, { ...client.wsOptions(url), handshakeTimeout: 15_000 });
    ws.on('open', () => this.backoff.reset());
    ws.on('error', (err) => log.debug({ err: err.message }, 'ready tunnel connection failed'));
    this.keepIdle(ws);
  }

  /** `ws` (opening, or back from a tunnel that ended with end frames) waits for the controller's next request. */
  private keepIdle(ws: WebSocket) {
    this.idle.add(ws);
    const stopWatch = dropWhenSilent(ws);
    const retire = () => {
      stopWatch();
      ws.off('message', onRequest);
      ws.off('close', onClose);
      return this.idle.delete(ws);
    };
    const onRequest = (data: RawData, isBinary: boolean) => {
      if (!retire()) return;
      // Replaced once this tunnel's first bytes are on their way: the replacement's TLS handshake
      // would otherwise take the thread (≈ 1.5 ms) while this tunnel is set up.
      void this.serve(ws, data, isBinary).finally(() => setTimeout(() => this.fill(), REFILL_DELAY_MS));
    };
    // An idle one lost (the controller restarted, or refused it): replaced after a while.
    const onClose = () => {
      if (retire()) this.backOff();
    };
    ws.once('message', onRequest);
    ws.once('close', onClose);
  }

  /** A connection whose tunnel ended with end frames both ways: idle again, up to MAX_IDLE. */
  private giveBack(ws: WebSocket) {
    if (!this.running || this.idle.size >= MAX_IDLE) return void ws.close(1000);
    this.keepIdle(ws);
  }

  /** The controller's request on a ready connection: dial the target, answer, splice. */
  private async serve(ws: WebSocket, data: RawData, isBinary: boolean) {
    const request = parseRequest(data, isBinary);
    if (!request) return ws.close(1008, 'expected a port-forward request');
    const { action, reuse } = request;
    traceTunnel('wrk-recv', action.session);
    try {
      const target = await dialTarget(this.ctx, action);
      const cut = () => ws.terminate();
      target.on('error', cut);
      if (ws.readyState !== ws.OPEN) return void target.destroy();
      traceTunnel('wrk-dialed', action.session);
      if (!reuse) {
        ws.send('{"ready":true}');
        return joinTarget(ws, target);
      }
      ws.send('{"ready":true,"reuse":true}');
      // Ended by end frames both ways (the target's FIN, the client's): the connection waits for the next request.
      const stream = reusableStream(ws, () => {
        target.off('error', cut);
        target.on('error', () => {});
        target.unpipe(stream);
        target.destroy();
        this.giveBack(ws);
      });
      stream.on('error', () => target.destroy());
      stream.on('close', () => {
        if (!stream.readableEnded || !stream.writableFinished) target.destroy();
      });
      target.pipe(stream);
      stream.pipe(target);
    } catch (err) {
      ws.send(JSON.stringify({ error: (err as Error).message.slice(0, 500) }));
      ws.close(1000);
    }
  }
}

function parseRequest(data: RawData, isBinary: boolean): { action: PortForwardAction; reuse: boolean } | undefined {
  if (isBinary) return undefined;
  try {
    const msg = JSON.parse(data.toString()) as { portForwardAction?: Partial<PortForwardAction>; reuse?: unknown };
    const p = msg.portForwardAction;
    if (typeof p?.session !== 'string' || !Number.isInteger(p.port)) return undefined;
    return { action: { session: p.session, vmUID: typeof p.vmUID === 'string' ? p.vmUID : '', port: p.port! }, reuse: msg.reuse === true };
  } catch {
    return undefined;
  }
}
