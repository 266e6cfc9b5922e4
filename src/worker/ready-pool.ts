// The worker's ready tunnel connections (capability "tunnel-pool" of the controller, "portForwardPool"
// of the worker): a few authenticated WebSockets on /v1/rpc/port-forward-pool kept open and idle, so a
// port-forward costs one message each way instead of a dial-back's TLS handshake and upgrade. Each
// one used is replaced at once; lost ones are reopened with back-off. Protocol:
// docs/tunnel-pool-protocol.md.
import { WebSocket, type RawData } from 'ws';
import type { PortForwardAction } from '../api/worker-protocol.ts';
import { traceTunnel } from '../tunnel-trace.ts';
import { dialTarget, joinTarget, type DialBackContext } from './dial-back.ts';

/**
 * Ready connections a worker keeps by default (the controller takes at most 8 per worker): one, replaced
 * 10 ms after it is used. Each costs the controller a TLS connection (≈ 80 kB) and, after a restart, a
 * handshake: at 4 a thousand workers held 5,000 connections (≈ 390 MB idle) instead of 2,000.
 */
export const READY_POOL_SIZE = 1;
/** An idle connection that saw no ping from the controller (every 20 s) for this long is taken for dead. */
const SILENCE_MS = 65_000;
/** How long after a connection is taken its replacement is opened. */
const REFILL_DELAY_MS = 10;

export class ReadyPool {
  /** Connections opening or open, not yet used. */
  private readonly idle = new Set<WebSocket>();
  private readonly ctx: DialBackContext;
  private readonly size: number;
  private retryDelay = 500;
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
    this.retryDelay = 500;
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
    const delay = Math.random() * this.retryDelay;
    this.retryDelay = Math.min(this.retryDelay * 2, 15_000);
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
    this.idle.add(ws);
    let silence: NodeJS.Timeout | undefined;
    const alive = () => {
      clearTimeout(silence);
      silence = setTimeout(() => ws.terminate(), SILENCE_MS);
      silence.unref();
    };
    const retire = () => {
      clearTimeout(silence);
      ws.off('ping', alive);
      return this.idle.delete(ws);
    };
    ws.on('open', () => {
      this.retryDelay = 500;
      alive();
    });
    ws.on('ping', alive);
    ws.on('error', (err) => log.debug({ err: err.message }, 'ready tunnel connection failed'));
    ws.once('message', (data, isBinary) => {
      if (!retire()) return;
      // Replaced once this tunnel's first bytes are on their way: the replacement's TLS handshake
      // would otherwise take the thread (≈ 1.5 ms) while this tunnel is set up.
      void this.serve(ws, data, isBinary).finally(() => setTimeout(() => this.fill(), REFILL_DELAY_MS));
    });
    ws.on('close', () => {
      // An idle one lost (the controller restarted, or refused it): replaced after a while.
      if (retire()) this.backOff();
    });
  }

  /** The controller's request on a ready connection: dial the target, answer, splice. */
  private async serve(ws: WebSocket, data: RawData, isBinary: boolean) {
    const action = parseRequest(data, isBinary);
    if (!action) return ws.close(1008, 'expected a port-forward request');
    traceTunnel('wrk-recv', action.session);
    try {
      const target = await dialTarget(this.ctx, action);
      target.on('error', () => ws.terminate());
      if (ws.readyState !== ws.OPEN) return void target.destroy();
      traceTunnel('wrk-dialed', action.session);
      ws.send('{"ready":true}');
      joinTarget(ws, target);
    } catch (err) {
      ws.send(JSON.stringify({ error: (err as Error).message.slice(0, 500) }));
      ws.close(1000);
    }
  }
}

function parseRequest(data: RawData, isBinary: boolean): PortForwardAction | undefined {
  if (isBinary) return undefined;
  try {
    const p = (JSON.parse(data.toString()) as { portForwardAction?: Partial<PortForwardAction> }).portForwardAction;
    if (typeof p?.session !== 'string' || !Number.isInteger(p.port)) return undefined;
    return { session: p.session, vmUID: typeof p.vmUID === 'string' ? p.vmUID : '', port: p.port! };
  } catch {
    return undefined;
  }
}
