// Ready port-forward connections on the client's side (controller capability "port-forward-ready"):
// WebSockets to one target opened ahead of time, so that a new tunnel costs one message each way
// instead of a TCP connect, a TLS handshake and an upgrade. A controller without the capability (upstream's)
// gets the per-tunnel WebSocket, as before. Protocol: docs/tunnel-pool-protocol.md ("Client ↔ controller").
import type { Duplex } from 'node:stream';
import type { RawData, WebSocket } from 'ws';
import { ApiError } from './errors.ts';
import { MuxConnection, TUNNEL_MUX } from './mux.ts';
import { reusableStream } from './tunnel-ends.ts';

/** The controller's capability (GET /v1/controller/info). */
export const PORT_FORWARD_READY = 'port-forward-ready';

export type TunnelConnection = { ws: WebSocket; stream: Duplex };

export interface ReadyTunnelsOptions {
  /** Opens an idle ready connection (the upgrade of `…/port-forward/ready`). */
  connect: () => Promise<WebSocket>;
  /** A tunnel the old way: its own WebSocket, opened now. */
  direct: () => Promise<TunnelConnection>;
  /** The byte stream of an open tunnel. */
  streamOf: (ws: WebSocket) => Duplex;
  /** The controller's capabilities (read once). */
  capabilities: () => Promise<string[]>;
  /** Idle connections kept. */
  size: number;
  /** Tunnels multiplexed on one connection (capability "tunnel-mux"), used instead of ready connections when given. */
  mux?: {
    /** Opens the mux connection (the upgrade of /v1/port-forward-mux). */
    connect: () => Promise<WebSocket>;
    /** The OPEN request naming the target. */
    request: object;
    /** How long the controller may take to answer it. */
    timeoutMs: number;
  };
}

/** Tunnels at once on the client's mux connection (the controller's bound too). */
const MUX_TUNNELS = 1024;

/** Idle connections kept at most, counting those back from a tunnel that ended (beyond: closed), as a multiple of `size`. */
const MAX_IDLE_FACTOR = 2;
/** A replacement for a taken connection is opened this long after (not on the thread during the tunnel's own set-up). */
const REFILL_DELAY_MS = 10;
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 15_000;

export class ReadyTunnels {
  /** Idle connections, each with its close listener (removed when taken: a connection is reused many times). */
  private readonly idle = new Map<WebSocket, () => void>();
  private opening = 0;
  private supported?: Promise<'mux' | 'ready' | 'none'>;
  /** The mux connection, open or opening. */
  private mux?: Promise<MuxConnection>;
  private failures = 0;
  private timer?: NodeJS.Timeout;
  private closed = false;
  private readonly options: ReadyTunnelsOptions;

  constructor(options: ReadyTunnelsOptions) {
    this.options = options;
  }

  /** Idle connections ready now. */
  get ready(): number {
    return this.idle.size;
  }

  /** Reads the controller's capabilities and starts filling the pool (also done by the first open). */
  async start(): Promise<void> {
    // Once: afterwards a taken connection is replaced REFILL_DELAY_MS later, not on the tunnel's own path.
    if (this.supported) return void (await this.supported);
    const { mux, size } = this.options;
    this.supported = this.options.capabilities().then(
      (caps) => (mux && caps.includes(TUNNEL_MUX) ? 'mux' : size > 0 && caps.includes(PORT_FORWARD_READY) ? 'ready' : 'none'),
      () => 'none' as const,
    );
    const mode = await this.supported;
    if (mode === 'ready') this.fill();
    // Opened ahead, as the ready connections are: the first tunnel pays no handshake either (a failure is the first open's to tell).
    if (mode === 'mux') this.muxConnection().catch(() => {});
  }

  /** A tunnel: on the mux connection, or on an idle ready connection when there is one, else on a WebSocket of its own. */
  async open(): Promise<TunnelConnection> {
    await this.start();
    if ((await this.supported) === 'mux') return this.openMux();
    for (;;) {
      const ws = this.take();
      if (!ws) return this.options.direct();
      const tunnel = await this.request(ws);
      if (tunnel) return tunnel;
      // Lost before it answered (the controller restarted, an idle timeout): try the next one.
    }
  }

  /**
   * A tunnel to write to at once, for a client that speaks first (a local connection relayed by
   * `orchard port-forward`): on the mux connection it is given before the controller's answer, and
   * `opened` rejects with its refusal (bench/tunnel.ts: open → first byte through the CLI). Any other
   * way, as open().
   */
  async openEarly(): Promise<TunnelConnection & { opened: Promise<unknown> }> {
    await this.start();
    if ((await this.supported) !== 'mux') return { ...(await this.open()), opened: Promise.resolve() };
    const mux = await this.muxConnection();
    const { tunnel, opened } = mux.startTunnel(this.options.mux!.request, this.options.mux!.timeoutMs);
    return { ws: mux.ws, stream: tunnel, opened };
  }

  /** A tunnel on the mux connection. */
  private async openMux(): Promise<TunnelConnection> {
    const mux = await this.muxConnection();
    const stream = await mux.openTunnel(this.options.mux!.request, this.options.mux!.timeoutMs);
    return { ws: mux.ws, stream };
  }

  /** The mux connection: opened on demand, and again after it was lost (once for all the tunnels waiting). */
  private async muxConnection(): Promise<MuxConnection> {
    const current = this.mux;
    const mux = current && (await current.catch(() => undefined));
    if (mux?.open) return mux;
    if (this.closed) throw new ApiError(503, 'the port forwarder is closed');
    if (this.mux === current) {
      this.mux = this.options.mux!.connect().then((ws) => new MuxConnection(ws, { opener: true, oneAtATime: true, maxTunnels: MUX_TUNNELS, refused: (status, message) => new ApiError(status, message) }));
    }
    return this.mux!;
  }

  close() {
    this.closed = true;
    void this.mux?.then((m) => m.close(1000), () => {});
    clearTimeout(this.timer);
    for (const ws of this.idle.keys()) ws.close(1000);
    this.idle.clear();
  }

  private take(): WebSocket | undefined {
    for (const [ws, onClose] of this.idle) {
      this.idle.delete(ws);
      ws.off('close', onClose);
      this.schedule(REFILL_DELAY_MS);
      if (ws.readyState === ws.OPEN) return ws;
    }
    return undefined;
  }

  /** Asks for the tunnel on `ws`: the tunnel, an ApiError with the controller's answer, or undefined if `ws` closed first. */
  private request(ws: WebSocket): Promise<TunnelConnection | undefined> {
    return new Promise((resolve, reject) => {
      const onClose = () => {
        ws.off('message', onMessage);
        resolve(undefined);
      };
      const onMessage = (data: RawData, isBinary: boolean) => {
        ws.off('message', onMessage);
        ws.off('close', onClose);
        const answer = parseAnswer(data, isBinary);
        if (answer && 'ready' in answer) {
          this.failures = 0;
          // Made in this handler: what the controller sent after the answer is emitted right after it.
          // A controller that agreed to reuse ends the tunnel with end frames, and the connection comes back.
          const stream = answer.reuse ? reusableStream(ws, () => this.giveBack(ws)) : this.options.streamOf(ws);
          return resolve({ ws, stream });
        }
        ws.close(answer ? 1000 : 1008);
        reject(new ApiError(answer?.status ?? 502, answer?.error ?? 'the controller broke the ready-connection protocol'));
      };
      ws.on('message', onMessage);
      ws.once('close', onClose);
      ws.send('{"open":true,"reuse":true}');
    });
  }

  /** A connection whose tunnel ended with end frames both ways: idle again (the next tunnel pays no handshake). */
  private giveBack(ws: WebSocket) {
    if (this.closed || this.idle.size + this.opening >= this.options.size * MAX_IDLE_FACTOR) return void ws.close(1000);
    this.keepIdle(ws);
  }

  private keepIdle(ws: WebSocket) {
    // An idle connection the controller closes (restart, revoked account) is replaced.
    const onClose = () => {
      if (!this.idle.delete(ws)) return;
      this.failures++;
      this.schedule(this.backoff());
    };
    this.idle.set(ws, onClose);
    ws.once('close', onClose);
  }

  private schedule(delayMs: number) {
    if (this.closed || this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.fill();
    }, delayMs);
    this.timer.unref();
  }

  private fill() {
    while (!this.closed && this.idle.size + this.opening < this.options.size) {
      this.opening++;
      this.options.connect().then(
        (ws) => {
          this.opening--;
          if (this.closed) return void ws.close(1000);
          this.keepIdle(ws);
        },
        () => {
          this.opening--;
          this.failures++;
          this.schedule(this.backoff());
        },
      );
    }
  }

  /** Full jitter, exponential in the failures in a row. */
  private backoff(): number {
    if (this.failures === 0) return REFILL_DELAY_MS;
    return Math.random() * Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.failures - 1));
  }
}

type Answer = { ready: true; reuse: boolean } | { error: string; status: number };

function parseAnswer(data: RawData, isBinary: boolean): Answer | undefined {
  if (isBinary || !Buffer.isBuffer(data)) return undefined;
  try {
    const msg = JSON.parse(data.toString()) as { ready?: unknown; reuse?: unknown; error?: unknown; status?: unknown } | null;
    if (msg?.ready === true) return { ready: true, reuse: msg.reuse === true };
    if (typeof msg?.error === 'string') return { error: msg.error.slice(0, 500), status: typeof msg.status === 'number' ? msg.status : 503 };
  } catch {
    // not JSON
  }
  return undefined;
}
