// The worker: one link to the controller (registration, heartbeat, the watch WebSocket), a
// reconciler that converges this host's VMs to the controller's records through one Driver, and
// the dial-backs that answer the controller's connection requests.
import { randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism, arch as osArch, totalmem } from 'node:os';
import { join } from 'node:path';
import type { Logger } from 'pino';
import { RESOURCE_LOGICAL_CORES, RESOURCE_MEMORY_MIB, RESOURCE_TART_VMS, type Worker } from '../api/schemas.ts';
import type { OrchardClient } from '../client/client.ts';
import { VM_DEFAULTS } from '../api/defaults.ts';
import type { WorkerInstruction } from '../api/worker-protocol.ts';
import type { Driver } from './drivers/driver.ts';
import { portForward, resolveIP, type DialBackContext } from './dial-back.ts';
import { ControllerLink } from './link.ts';
import { ControllerReports, WatchReports } from './reports.ts';
import { Reconciler } from './reconciler.ts';
import { WorkerImages } from './images-report.ts';
import { READY_POOL_SIZE, ReadyPool } from './ready-pool.ts';
import { PORT_FORWARD_MUX, PORT_FORWARD_POOL } from '../api/worker-protocol.ts';
import { WorkerMux } from './mux.ts';

export interface WorkerOptions {
  client: OrchardClient;
  name: string;
  driver: Driver;
  dataDir: string;
  labels?: Record<string, string>;
  /** VM slots offered (org.cirruslabs.tart-vms). */
  slots: number;
  /** Extra resources to advertise. */
  resources?: Record<string, number>;
  heartbeatMs?: number;
  /**
   * A VM this worker runs that its controller does not know (nor knows to have gone elsewhere or been
   * deleted) is an orphan: kept, reported, and removed only after this long (default 24 h), unless an
   * admin adopts or deletes it first.
   */
  orphanGraceMs?: number;
  /** CPUs and MiB of memory of a VM that asks for none (upstream's --default-cpu, --default-memory: 4 and 8192). */
  defaultCPU?: number;
  defaultMemory?: number;
  /**
   * Ready tunnel connections kept open to a controller that takes them (default 4, or
   * ORCHARD_WORKER_READY_TUNNELS; 0: none, every port-forward dials back as upstream's worker does).
   */
  readyTunnels?: number;
  /** Keep a tunnel mux connection when the controller takes one (default: unless ORCHARD_WORKER_TUNNEL_MUX=0). */
  tunnelMux?: boolean;
  logger: Logger;
}

/** After the watch reconnects, the ready tunnel connections are opened again within this long (spread). */
const READY_REFILL_SPREAD_MS = 3000;

export class OrchardWorker {
  private readonly o: WorkerOptions;
  private readonly log: Logger;
  /** Aborts when the worker stops (ends back-off waits, reconnects and reports). */
  private readonly stopSignal = new AbortController();
  private readonly link: ControllerLink;
  private readonly reconciler: Reconciler;
  private readonly dialBack: DialBackContext;
  private readonly readyPool?: ReadyPool;
  private readonly mux?: WorkerMux;
  /** For a driver that pulls images from registries: credentials, pre-pulls, the images held. */
  private readonly images?: WorkerImages;
  private readonly watchReports = new WatchReports();
  readonly machineId: string;

  constructor(opts: WorkerOptions) {
    this.o = opts;
    const log = (this.log = opts.logger.child({ worker: opts.name }));
    mkdirSync(opts.dataDir, { recursive: true });
    const idFile = join(opts.dataDir, 'machine-id');
    if (!existsSync(idFile)) writeFileSync(idFile, randomUUID() + '\n');
    this.machineId = readFileSync(idFile, 'utf8').trim();
    const { client, driver, name: workerName } = opts;
    const stopped = this.stopSignal.signal;
    const watchReports = this.watchReports;
    // ORCHARD_WORKER_TUNNEL_MUX=0: no mux (every tunnel on a ready connection or a dial-back).
    const muxWanted = opts.tunnelMux ?? process.env.ORCHARD_WORKER_TUNNEL_MUX !== '0';
    const reports = new ControllerReports(client, workerName, watchReports, () => this.link.can.watchReports);
    if (driver.images) {
      this.images = new WorkerImages({
        reports, log, images: driver.images, watchImages: driver.watchImages?.bind(driver),
        controllerTakesReports: () => this.link.can.workerImages,
      });
    }
    this.link = new ControllerLink({
      client, log, workerName, machineId: this.machineId, dataDir: opts.dataDir, heartbeatMs: opts.heartbeatMs, stopped,
      capabilities: this.images ? WorkerImages.capabilities : [],
      reports: watchReports,
      record: () => this.workerRecord(),
      onRegistered: () => this.images?.registered(),
      onInstruction: (msg) => this.instruction(msg),
      onConnected: () => {
        this.reconciler.reconnected();
        if (this.poolInUse) this.readyPool?.kick(READY_REFILL_SPREAD_MS);
        if (this.muxConnectionInUse) this.mux?.kick(READY_REFILL_SPREAD_MS);
      },
      carryMux: muxWanted ? (ws) => this.mux?.carry(ws) : undefined,
    });
    this.reconciler = new Reconciler({
      client,
      orphanGraceMs: opts.orphanGraceMs,
      orphansCapable: () => this.link.can.orphans,
      run: {
        driver, workerName, log, defaultCPU: opts.defaultCPU, defaultMemory: opts.defaultMemory,
        onPrepared: () => this.images?.changed(),
        holds: (image) => this.images?.held.includes(image) ?? false,
        outbox: { reports, log, stopped, stateWithEvents: () => this.link.can.stateWithEvents },
      },
    });
    this.dialBack = { client, driver, workerName, log, localNameOfUID: (uid) => this.reconciler.localNameOfUID(uid) };
    const envReady = process.env.ORCHARD_WORKER_READY_TUNNELS;
    const ready = opts.readyTunnels ?? (envReady !== undefined && /^\d+$/.test(envReady) ? Number(envReady) : READY_POOL_SIZE);
    if (ready > 0) this.readyPool = new ReadyPool(this.dialBack, ready);
    if (muxWanted) this.mux = new WorkerMux(this.dialBack);
  }

  /** What this worker declares in its record's `capabilities`: only what the controller takes. */
  private capabilities(): string[] {
    return [...(this.images && this.link.can.workerImages ? WorkerImages.capabilities : []), ...(this.poolInUse ? [PORT_FORWARD_POOL] : []), ...(this.muxInUse ? [PORT_FORWARD_MUX] : [])];
  }

  /** Tunnels on a mux (on the watch or a connection of its own): the controller takes one and this worker keeps one. */
  private get muxInUse(): boolean {
    return !!this.mux && (this.link.can.tunnelMux || this.link.can.watchMux);
  }

  /** The mux on a connection of its own: a controller that does not carry it on the watch ("watch-mux"). */
  private get muxConnectionInUse(): boolean {
    return this.muxInUse && !this.link.can.watchMux;
  }

  /**
   * Ready connections only where there is no mux (on the watch or of its own): the controller puts every tunnel it can
   * on the mux, and each idle connection is one more TLS connection the controller holds (≈ 30 kB)
   * and takes back after a restart (BENCHMARKS.md, the load harness).
   */
  private get poolInUse(): boolean {
    return !!this.readyPool && this.link.can.tunnelPool && !this.muxInUse;
  }

  /** Reports sent up the watch and not acknowledged yet (tests). */
  get unacknowledgedReports(): number {
    return this.watchReports.unacknowledged;
  }

  /** Whether the tunnel mux is open, on the watch or on a connection of its own (tests). */
  get tunnelMuxOpen(): boolean {
    return this.mux?.open ?? false;
  }

  /** Ready tunnel connections open and idle (tests). */
  get readyTunnels(): number {
    return this.readyPool?.count ?? 0;
  }

  private workerRecord(): Worker {
    // Our additions only for a controller that takes them (an upstream one knows none).
    const capabilities = this.capabilities();
    const images = this.images && this.link.can.workerImages ? { images: this.images.held } : {};
    return {
      ...(capabilities.length ? { capabilities } : {}),
      ...images,
      name: this.o.name,
      machine_id: this.machineId,
      labels: this.o.labels ?? {},
      runtime: this.o.driver.runtime,
      arch: osArch() === 'x64' ? 'amd64' : osArch(),
      defaultCPU: this.o.defaultCPU ?? VM_DEFAULTS.cpu,
      defaultMemory: this.o.defaultMemory ?? VM_DEFAULTS.memory,
      resources: {
        [RESOURCE_TART_VMS]: this.o.slots,
        [RESOURCE_LOGICAL_CORES]: availableParallelism(),
        [RESOURCE_MEMORY_MIB]: Math.floor(totalmem() / 1024 / 1024),
        ...(this.o.resources ?? {}),
      },
    };
  }

  async start() {
    void this.o.driver.tidyImages?.();
    await this.images?.start();
    await this.link.start();
    if (this.poolInUse) this.readyPool?.start();
    if (this.muxConnectionInUse) this.mux?.start();
    this.log.info({ runtime: this.o.driver.runtime, slots: this.o.slots }, 'worker registered');
    this.reconciler.requestSync();
  }

  /** Stops talking to the controller. VMs keep running: a restarted worker adopts them. */
  async stop() {
    this.stopSignal.abort();
    this.link.stop();
    this.readyPool?.stop();
    this.mux?.stop();
    this.images?.stop();
    this.reconciler.stop();
    this.o.client.close();
    await this.o.driver.close?.();
  }

  /** Is the instruction channel to the controller open? */
  get connected(): boolean {
    return this.link.connected;
  }

  private instruction(msg: WorkerInstruction) {
    if ('syncVMsAction' in msg) this.reconciler.syncPushed(msg.syncVMsAction.vms);
    else if ('portForwardAction' in msg) void portForward(this.dialBack, msg.portForwardAction);
    else if ('resolveIPAction' in msg) void resolveIP(this.dialBack, msg.resolveIPAction);
    else if ('registriesAction' in msg) this.images?.setRegistries(msg.registriesAction.registries);
    else void this.images?.pull(msg.pullImageAction.image);
  }
}
