// The worker's tunnel mux (capability "tunnel-mux" of the controller, "portForwardMux" of the worker):
// the controller opens the worker's tunnels on it, each dialled to its target here (a VM's port, or
// this host's). It rides the worker's watch WebSocket when the controller lists "watch-mux" (`carry`:
// one connection per worker, coming back with the watch), else it is a WebSocket of its own on
// /v1/rpc/port-forward-mux, reopened with back-off when lost; meanwhile the controller uses the ready
// connections or the dial-back. Protocol: docs/tunnel-mux-protocol.md.
import { WebSocket } from 'ws';
import { MuxConnection, type MuxTunnel } from '../client/mux.ts';
import { dialTarget, type DialBackContext } from './dial-back.ts';
import { Backoff, dropWhenSilent } from './reconnect.ts';

/** Tunnels at once on the connection (the controller's bound too). */
const MAX_TUNNELS = 1024;

export class WorkerMux {
  private readonly ctx: DialBackContext;
  private mux?: MuxConnection;
  /** The mux on the watch, while the watch carries it. */
  private carried?: MuxConnection;
  private readonly backoff = new Backoff();
  private retry?: NodeJS.Timeout;
  private running = false;

  constructor(ctx: DialBackContext) {
    this.ctx = ctx;
  }

  start() {
    this.running = true;
    this.connect();
  }

  stop() {
    this.running = false;
    clearTimeout(this.retry);
    this.mux?.ws.terminate();
  }

  /** Reconnects now (the watch reconnected: the controller is back), within `spreadMs`; starts the connection if it was not kept. */
  kick(spreadMs = 0) {
    this.running = true;
    if (this.mux?.open) return;
    clearTimeout(this.retry);
    this.backoff.reset();
    this.retry = setTimeout(() => this.connect(), Math.random() * spreadMs);
  }

  /** Whether the mux is open, on the watch or on its own connection (tests). */
  get open(): boolean {
    return (this.carried?.open ?? false) || (this.mux?.open ?? false);
  }

  /**
   * The watch `ws` carries the mux (the controller said so in its upgrade answer): binary frames on it
   * are the mux's, text frames the watch's. No connection of its own meanwhile; when the watch closes,
   * its tunnels are reset and the mux comes back with the watch.
   */
  carry(ws: WebSocket) {
    this.stop();
    const mux: MuxConnection = new MuxConnection(ws, {
      opener: false,
      oneAtATime: true,
      maxTunnels: MAX_TUNNELS,
      sharesText: true,
      onOpen: (request, tunnel) => void this.serve(mux, request, tunnel),
    });
    this.carried = mux;
    ws.once('close', () => {
      if (this.carried === mux) this.carried = undefined;
    });
  }

  private connect() {
    this.retry = undefined;
    if (!this.running || this.mux?.open) return;
    const { client, workerName, log } = this.ctx;
    const url = client.urlOf('/v1/rpc/port-forward-mux', true);
    url.searchParams.set('workerName', workerName);
    const ws = new WebSocket(url, { ...client.wsOptions(url), handshakeTimeout: 15_000, maxPayload: 1024 * 1024 });
    const mux = (this.mux = new MuxConnection(ws, { opener: false, oneAtATime: true, maxTunnels: MAX_TUNNELS, onOpen: (request, tunnel) => void this.serve(mux, request, tunnel) }));
    const stopWatch = dropWhenSilent(ws);
    ws.on('open', () => this.backoff.reset());
    ws.on('error', (err) => log.debug({ err: err.message }, 'tunnel mux connection failed'));
    ws.on('close', () => {
      stopWatch();
      if (!this.running || this.retry) return;
      this.retry = setTimeout(() => this.connect(), this.backoff.next());
    });
  }

  /** The controller's tunnel request: dial the target, answer, splice. */
  private async serve(mux: MuxConnection, request: unknown, tunnel: MuxTunnel) {
    const r = request as { vmUID?: unknown; port?: unknown } | undefined;
    if (typeof r?.port !== 'number' || !Number.isInteger(r.port) || (r.vmUID !== undefined && typeof r.vmUID !== 'string')) {
      return mux.refuse(tunnel, 400, 'expected {"vmUID":…,"port":…}');
    }
    try {
      const target = await dialTarget(this.ctx, { session: '', vmUID: (r.vmUID as string | undefined) ?? '', port: r.port });
      if (tunnel.destroyed) return void target.destroy();
      mux.accept(tunnel);
      target.on('error', (err) => tunnel.destroy(err));
      tunnel.on('error', () => target.destroy());
      // Closed once both ends passed (a tapped tunnel closes then, with the target's last bytes perhaps
      // still queued: its end() flushes them); closed before, the tunnel was cut.
      tunnel.on('close', () => {
        if (!tunnel.endedBothWays) target.destroy();
      });
      target.pipe(tunnel);
      tunnel.pipeInto(target);
    } catch (err) {
      mux.refuse(tunnel, 503, (err as Error).message);
    }
  }
}
