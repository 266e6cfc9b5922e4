// The worker's link to its controller: what the controller can do (capabilities), registration,
// the heartbeat, and the /v1/rpc/watch WebSocket that carries the controller's instructions,
// reconnected with back-off whenever it drops.
import { X509Certificate } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { WebSocket } from 'ws';
import type { Logger } from 'pino';
import type { Worker } from '../api/schemas.ts';
import { ApiError, CertificateMismatchError, probeCertificate, type OrchardClient } from '../client/client.ts';
import { parseControllerHello, parseInstructionWith, WATCH_MUX, WATCH_MUX_HEADER, WATCH_REPORTS, type WorkerInstruction } from '../api/worker-protocol.ts';
import type { WatchReports } from './reports.ts';
import { Backoff, dropWhenSilent } from './reconnect.ts';

/** How long after the watch opens the controller's hello may take before the worker asks by HTTPS. */
const HELLO_WAIT_MS = 5000;

export interface LinkOptions {
  client: OrchardClient;
  log: Logger;
  workerName: string;
  machineId: string;
  /** Where the controller's cluster id is remembered (`controller.json`). */
  dataDir: string;
  /** The worker's record, as registered. */
  record(): Worker;
  /** The instructions of ours the worker understands (declared in its record); others are ignored. */
  capabilities: readonly string[];
  /** Reports up the watch (used when the controller can take them): handed each connection and its acknowledgements. */
  reports: WatchReports;
  /** A registration (the first or a later one) was accepted. */
  onRegistered?(): void;
  heartbeatMs?: number;
  /** Aborts when the worker stops. */
  stopped: AbortSignal;
  onInstruction(instruction: WorkerInstruction): void;
  /** The watch is (re)connected. */
  onConnected(): void;
  /**
   * The worker's tunnel mux, to carry on the watch when the controller can ("watch-mux"): called with
   * each watch that the controller confirmed carries it, before the watch opens. Absent: no mux asked for.
   */
  carryMux?(ws: WebSocket): void;
}

export class ControllerLink {
  private ws?: WebSocket;
  private heartbeat?: NodeJS.Timeout;
  private readonly backoff = new Backoff();
  /** From the controller's hello: the window over which to spread reconnects after the watch drops. */
  private reconnectWindowMs?: number;
  /** This worker's moment within that window, while it reconnects. */
  private phase?: number;
  /** When the open watch last dropped: the controller knew this worker alive until then. */
  private droppedAt = 0;
  /** The controller does not know this worker (it was deleted): register before watching again. */
  private unregistered = false;
  /** What the controller can do, from its capabilities (an upstream controller has none of ours). */
  readonly can = {
    /** It takes events with a state report ("vm-state-events"). */
    stateWithEvents: false,
    /** A connected watch keeps this worker alive ("watch-liveness"): then no HTTP heartbeat is due meanwhile. */
    watchLiveness: false,
    /** It sorts a worker's unassigned VMs into removable ones and orphans ("orphans"). */
    orphans: false,
    /** It takes the images a worker holds and its pulls' progress, and sends pre-pulls ("worker-images"). */
    workerImages: false,
    /** It pairs port-forwards with ready connections on /v1/rpc/port-forward-pool ("tunnel-pool"). */
    tunnelPool: false,
    /** It opens tunnels on a mux connection on /v1/rpc/port-forward-mux ("tunnel-mux"). */
    tunnelMux: false,
    /** It takes reports up the watch WebSocket ("watch-reports"): then the worker needs no HTTPS connection meanwhile. */
    watchReports: false,
    /** It carries the tunnel mux on the watch WebSocket ("watch-mux"): then the worker holds one connection. */
    watchMux: false,
  };
  /** The controller refused the mux on the watch (403: the account lacks compute:write): the watch goes without it. */
  private muxRefused = false;

  private readonly o: LinkOptions;

  constructor(o: LinkOptions) {
    this.o = o;
  }

  /** Reads the controller's capabilities, registers, starts the heartbeat and the watch. */
  async start() {
    const { client } = this.o;
    const info = await client.info().catch(() => undefined);
    const caps = info?.capabilities ?? [];
    this.can.stateWithEvents = caps.includes('vm-state-events');
    this.can.watchLiveness = caps.includes('watch-liveness');
    this.can.orphans = caps.includes('orphans');
    this.can.workerImages = caps.includes('worker-images');
    this.can.tunnelPool = caps.includes('tunnel-pool');
    this.can.tunnelMux = caps.includes('tunnel-mux');
    this.can.watchReports = caps.includes(WATCH_REPORTS);
    this.can.watchMux = caps.includes(WATCH_MUX);
    this.checkCluster(info?.clusterID);
    try {
      await this.register();
    } catch (err) {
      throw await this.joinError(err as Error);
    }
    this.heartbeat = setInterval(() => void this.beat(), this.heartbeatMs);
    this.connect();
  }

  private async register() {
    await this.o.client.registerWorker(this.o.record());
    this.o.onRegistered?.();
  }

  stop() {
    clearInterval(this.heartbeat);
    this.ws?.terminate();
    this.o.reports.close();
  }

  /** Is the instruction channel to the controller open? */
  get connected(): boolean {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  /**
   * Why registering failed, in a worker's terms: the client's own messages speak of CLI contexts, but a
   * worker has none, only its bootstrap token (credentials and the controller's certificate).
   */
  private async joinError(err: Error): Promise<Error> {
    const { client } = this.o;
    const where = `the controller at ${client.url.origin}`;
    const account = client.options.serviceAccountName ?? '?';
    const getNew = `get a new one with "orchard get bootstrap-token ${account}" on the controller's admin context`;
    if (err instanceof CertificateMismatchError) {
      const pinned = client.options.certificate ? new X509Certificate(client.options.certificate).fingerprint256 : 'none';
      const presented = await probeCertificate(client.url.href).then((c) => c.fingerprint, () => 'unknown');
      return new Error(
        `${where} presents a certificate other than the bootstrap token's (token's SHA-256 ${pinned}, presented ${presented}): ` +
          `the token was made by another controller (or the controller's certificate changed); ${getNew}`,
        { cause: err },
      );
    }
    if (err instanceof ApiError && err.status === 401) {
      return new Error(
        `${where} does not know the bootstrap token's service account "${account}" or its token: the token was made by another ` +
          `controller, or the account was deleted or given a new token since; ${getNew}`,
        { cause: err },
      );
    }
    return err;
  }

  private get heartbeatMs() {
    return this.o.heartbeatMs ?? 10_000;
  }

  private async beat() {
    const { client, workerName: name, machineId } = this.o;
    // A connected watch keeps this worker alive, and so did the watch that just dropped: the watch
    // comes back within the controller's reconnect window (its restart, most likely), and a thousand
    // workers' heartbeats on new connections would only slow its return. One interval after the drop
    // with the watch still down, heartbeats resume.
    if (this.can.watchLiveness && (this.connected || Date.now() - this.droppedAt < this.heartbeatMs)) return;
    try {
      if (this.can.watchLiveness) await client.updateWorker({ name, machine_id: machineId });
      else {
        // A controller without our capabilities is taken for upstream's, whose PUT sets last_seen and
        // scheduling_paused from the body (absent: a zero time, and resumed): heartbeat as upstream's
        // worker does, with the whole record read back and last_seen set.
        const record = await client.getWorker(name);
        await client.updateWorker({ ...record, last_seen: new Date().toISOString() });
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        this.o.log.warn('worker record is gone; registering again');
        await this.register().catch(() => {});
      } else this.o.log.warn({ err: (await this.joinError(err as Error)).message }, 'heartbeat failed');
    }
  }

  private connect() {
    if (this.o.stopped.aborted) return;
    const { client, log } = this.o;
    const url = client.urlOf('/v1/rpc/watch', true);
    url.searchParams.set('workerName', this.o.workerName);
    // A controller that takes reports up the watch says hello with its cluster id: no HTTPS request per reconnect.
    const hello = this.can.watchReports;
    if (hello) url.searchParams.set('hello', '1');
    // The tunnel mux on the watch: one connection to the controller, not two.
    const askMux = this.can.watchMux && !!this.o.carryMux && !this.muxRefused;
    if (askMux) url.searchParams.set('mux', '1');
    let helloTimer: NodeJS.Timeout | undefined;
    let stopSilenceWatch = () => {};
    // (Resuming the TLS session of the last connection: after a controller restart, no full handshake.)
    const ws = new WebSocket(url, { ...client.wsOptions(url), handshakeTimeout: 15_000 });
    this.ws = ws;
    /** Whether this watch carries the tunnel mux (its binary frames are the mux's). */
    let carriesMux = false;
    ws.once('upgrade', (res) => {
      if (!askMux) return;
      if (res.headers[WATCH_MUX_HEADER] === '1') {
        // Before the first frame: the binary ones are the mux's from the start.
        carriesMux = true;
        this.o.carryMux!(ws);
        // Tunnels keep the socket busy while the controller's pings may be all there is of the watch: a dead one is noticed.
        stopSilenceWatch = dropWhenSilent(ws);
      } else {
        // Not the controller it was (an older one took its place): its watch has no mux; the worker keeps a connection of its own for it.
        log.info('the controller does not carry the tunnel mux on the watch');
        this.can.watchMux = false;
      }
    });
    ws.on('open', () => {
      this.backoff.reset();
      this.o.reports.attach(ws);
      this.o.onConnected();
      log.info('connected to the controller');
      // No hello soon: not the controller it was (an older one took its place); ask, and learn what this one can do.
      if (hello) helloTimer = setTimeout(() => void this.refresh(), HELLO_WAIT_MS);
      else void this.refresh();
    });
    ws.on('message', (data, isBinary) => {
      // On a watch that carries the mux, binary frames are the mux's (the watch's are text).
      if (isBinary && carriesMux) return;
      const text = data.toString();
      if (this.o.reports.handle(text)) return;
      const hi = parseControllerHello(text);
      if (hi) {
        clearTimeout(helloTimer);
        this.reconnectWindowMs = hi.reconnectWindowMs;
        return this.checkCluster(hi.clusterID);
      }
      const msg = parseInstructionWith(text, this.o.capabilities);
      if (msg) this.o.onInstruction(msg);
    });
    ws.on('unexpected-response', (_req, res) => {
      unanswered = false;
      if (res.statusCode === 404) this.unregistered = true;
      if (res.statusCode === 403 && askMux) {
        // The mux needs compute:write, the watch compute:read only: watch without it (tunnels would be refused anyway).
        log.warn('the controller refused the tunnel mux on the watch (the account lacks compute:write?); watching without it');
        this.muxRefused = true;
      }
      log.warn({ status: res.statusCode }, 'controller refused the watch connection');
      ws.terminate();
    });
    let opened = false;
    // Not answered at all (refused, reset, timed out): the controller is not back, or swamped by the
    // others coming back; an HTTP answer (a refused upgrade) is a reason to back off further.
    let unanswered = true;
    ws.once('open', () => (opened = true));
    ws.once('upgrade', () => (unanswered = false));
    ws.on('error', (err) => log.debug({ err: err.message }, 'watch connection error'));
    ws.on('close', () => {
      clearTimeout(helloTimer);
      stopSilenceWatch();
      this.o.reports.detach(ws);
      if (this.o.stopped.aborted) return;
      if (opened) this.droppedAt = Date.now();
      // The controller keeps the worker's record; only when it was deleted does the worker register again.
      let delay: number;
      const window = this.reconnectWindowMs;
      if (window !== undefined && (opened || (unanswered && this.phase !== undefined))) {
        // The watch dropped (the controller restarts, most likely): back at a moment of this worker's
        // own within the window the controller gave, and while unanswered (nothing listens yet) again
        // one window later, at the same moment of it: when the controller listens again, its
        // workers arrive spread evenly over one window, all of them within it.
        delay = opened ? (this.phase = Math.random() * window) : window;
      } else {
        // Exponential backoff with full jitter: other failures (refused upgrades, timeouts), and
        // controllers that gave no window, spread reconnects wider and wider.
        this.phase = undefined;
        delay = this.backoff.next();
      }
      log.info({ inMs: Math.round(delay) }, 'watch connection lost; reconnecting');
      setTimeout(() => {
        if (!this.unregistered) return this.connect();
        log.warn('the controller does not know this worker (deleted?); registering again');
        this.register().then(
          () => {
            this.unregistered = false;
            this.connect();
          },
          () => this.connect(),
        );
      }, delay);
    });
  }

  /** The controller's cluster id, and whether it (still) takes reports up the watch. */
  private async refresh() {
    const info = await this.o.client.info().catch(() => undefined);
    if (!info) return;
    this.checkCluster(info.clusterID);
    this.can.watchReports = (info.capabilities ?? []).includes(WATCH_REPORTS);
  }

  /**
   * Remembers the controller's cluster id and says so when it changes: a controller that lost or swapped
   * its data. Nothing is destroyed for it: VMs it does not know become orphans (see the reconciler).
   */
  private checkCluster(clusterID: string | undefined) {
    if (!clusterID) return;
    const file = join(this.o.dataDir, 'controller.json');
    const before = existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as { clusterID?: string }).clusterID : undefined;
    if (before === clusterID) return;
    if (before) this.o.log.warn({ before, now: clusterID }, "the controller's cluster changed (it lost or swapped its data): VMs it does not know are kept as orphans");
    writeFileSync(file, JSON.stringify({ clusterID }) + '\n');
  }
}
