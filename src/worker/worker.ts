// The worker: registers with the controller, keeps its heartbeat, holds the /v1/rpc/watch WebSocket,
// and converges the VMs on this host to the controller's records for it, through one Driver.
import { randomUUID, X509Certificate } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism, arch as osArch, totalmem } from 'node:os';
import { join } from 'node:path';
import net from 'node:net';
import type { Duplex } from 'node:stream';
import { createWebSocketStream, WebSocket } from 'ws';
import type { Logger } from 'pino';
import { localNameOf, RESOURCE_LOGICAL_CORES, RESOURCE_MEMORY_MIB, RESOURCE_TART_VMS, type Event, type Orphan, type VM, type VMStateUpdate } from '../api/schemas.ts';
import { ApiError, CertificateMismatchError, OrchardClient, probeCertificate, wsMasking } from '../client/client.ts';
import type { Driver, DriverVM, LocalVM } from './drivers/driver.ts';
import { runScript } from './startup-script.ts';
import { sshCredentials, VM_DEFAULTS } from '../api/defaults.ts';
import { parseInstruction, type PortForwardAction, type ResolveIPAction } from '../api/worker-protocol.ts';

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
  logger: Logger;
}

/** Abort reason of a worker that stops: its VMs keep running (a restarted worker adopts them). */
const SHUTDOWN = 'worker shutdown';
/** Abort reason of a run whose VM the controller does not know any more: the VM is kept as it is (an orphan). */
const ORPHANED = 'orphaned';
/** Abort reason of a run whose VM gets a new spec: it is stopped, then booted again with the new one. */
const RESPEC = 'new spec';
/** Back-off of state reports and event batches the controller did not take: 0.5 s doubling to 30 s. */
const REPORT_RETRY_BASE_MS = 500;
const REPORT_RETRY_MAX_MS = 30_000;
/** A VM whose image this host lacks is tried again: at once when the images change, else after 5 s doubling to 5 min. */
const IMAGE_RETRY_BASE_MS = 5_000;
const IMAGE_RETRY_MAX_MS = 300_000;
/** Events per request, and unsent events kept per VM while the controller is unreachable. */
const MAX_EVENTS_PER_REQUEST = 500;
const MAX_QUEUED_EVENTS = 10_000;

/** The spec fields the host acts on; a change to any other (labels, scripts...) needs no restart. */
const hostSpecOf = (vm: VM) =>
  JSON.stringify([vm.image, vm.cpu, vm.memory, vm.diskSize, vm.nested, vm.headless, vm.netSoftnet, vm['net-softnet'], vm.netSoftnetAllow, vm.netSoftnetBlock, vm['net-bridged'], vm.hostDirs, vm.powerState]);

type OutboxItem = { events: Event[] } | { state: VMStateUpdate };

interface Task {
  uid: string;
  name: string;
  localName: string;
  abort: AbortController;
  outbox: OutboxItem[];
  sending?: Promise<void>;
  /** The last state reported: re-sent when the controller missed it (e.g. it restarted meanwhile). */
  reported?: VMStateUpdate;
  /** Has the controller acknowledged `reported` (committed it)? */
  acked?: boolean;
  /** The spec generation this run carries out, and the host-relevant part of that spec. */
  generation?: number;
  hostSpec: string;
  /** Settles when the run is over (a new run of the same VM waits for it). */
  finished: Promise<void>;
}

export class OrchardWorker {
  private readonly o: WorkerOptions;
  private readonly log: Logger;
  private ws?: WebSocket;
  private stopped = false;
  /** Aborts when the worker stops (ends back-off waits). */
  private readonly stopSignal = new AbortController();
  private heartbeat?: NodeJS.Timeout;
  private reconnectDelay = 500;
  private syncing = false;
  private syncAgain = false;
  /** The watch (re)connected: the next sync re-reports every VM whose state the controller does not have. */
  private resync = false;
  /** The VMs of the latest sync push, for the next sync (instead of listing them). */
  private pushed?: VM[];
  /** Does the controller take events with a state report (capability "vm-state-events")? */
  private stateWithEvents = false;
  /** Does a connected watch keep this worker alive on the controller (capability "watch-liveness")? Then no HTTP heartbeat is due meanwhile. */
  private watchLiveness = false;
  /** The controller does not know this worker (it was deleted): register before watching again. */
  private unregistered = false;
  /** Does the controller sort a worker's unassigned VMs into removable ones and orphans (capability "orphans")? */
  private orphansCapable = false;
  /** Did the last report leave orphans (then an empty report clears them on the controller)? */
  private hadOrphans = false;
  private graceTimer?: NodeJS.Timeout;
  private readonly tasks = new Map<string, Task>();
  readonly machineId: string;

  constructor(opts: WorkerOptions) {
    this.o = opts;
    this.log = opts.logger.child({ worker: opts.name });
    mkdirSync(opts.dataDir, { recursive: true });
    const idFile = join(opts.dataDir, 'machine-id');
    if (!existsSync(idFile)) writeFileSync(idFile, randomUUID() + '\n');
    this.machineId = readFileSync(idFile, 'utf8').trim();
  }

  private workerRecord() {
    return {
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
    // Our controller takes a state report and its events in one request; an upstream one does not.
    const info = await this.o.client.info().catch(() => undefined);
    this.stateWithEvents = info?.capabilities?.includes('vm-state-events') ?? false;
    this.watchLiveness = info?.capabilities?.includes('watch-liveness') ?? false;
    this.orphansCapable = info?.capabilities?.includes('orphans') ?? false;
    this.checkCluster(info?.clusterID);
    try {
      await this.o.client.registerWorker(this.workerRecord());
    } catch (err) {
      throw await this.joinError(err as Error);
    }
    this.log.info({ runtime: this.o.driver.runtime, slots: this.o.slots }, 'worker registered');
    this.heartbeat = setInterval(() => void this.beat(), this.o.heartbeatMs ?? 10_000);
    this.connect();
    this.requestSync();
  }

  /**
   * Why registering failed, in a worker's terms: the client's own messages speak of CLI contexts, but a
   * worker has none, only its bootstrap token (credentials and the controller's certificate).
   */
  private async joinError(err: Error): Promise<Error> {
    const where = `the controller at ${this.o.client.url.origin}`;
    const account = this.o.client.options.serviceAccountName ?? '?';
    const getNew = `get a new one with "orchard get bootstrap-token ${account}" on the controller's admin context`;
    if (err instanceof CertificateMismatchError) {
      const pinned = this.o.client.options.certificate ? new X509Certificate(this.o.client.options.certificate).fingerprint256 : 'none';
      const presented = await probeCertificate(this.o.client.url.href).then((c) => c.fingerprint, () => 'unknown');
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

  /** Stops talking to the controller. VMs keep running: a restarted worker adopts them. */
  async stop() {
    this.stopped = true;
    this.stopSignal.abort();
    clearInterval(this.heartbeat);
    clearTimeout(this.graceTimer);
    this.ws?.terminate();
    for (const t of this.tasks.values()) t.abort.abort(SHUTDOWN);
    this.o.client.close();
  }

  private async beat() {
    if (this.watchLiveness && this.connected) return;
    try {
      if (this.watchLiveness) await this.o.client.updateWorker({ name: this.o.name, machine_id: this.machineId });
      else {
        // A controller without our capabilities is taken for upstream's, whose PUT sets last_seen and
        // scheduling_paused from the body (absent: a zero time, and resumed): heartbeat as upstream's
        // worker does, with the whole record read back and last_seen set.
        const record = await this.o.client.getWorker(this.o.name);
        await this.o.client.updateWorker({ ...record, last_seen: new Date().toISOString() });
      }
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        this.log.warn('worker record is gone; registering again');
        await this.o.client.registerWorker(this.workerRecord()).catch(() => {});
      } else this.log.warn({ err: (await this.joinError(err as Error)).message }, 'heartbeat failed');
    }
  }

  private connect() {
    if (this.stopped) return;
    const url = this.rpcURL('/v1/rpc/watch', { workerName: this.o.name }, true);
    const ws = new WebSocket(url, { headers: { authorization: this.o.client.authorization ?? '' }, ...this.o.client.tlsOptions(), handshakeTimeout: 15_000 });
    this.ws = ws;
    ws.on('open', () => {
      this.reconnectDelay = 500;
      this.resync = true;
      this.log.info('connected to the controller');
      void this.o.client.info().then((i) => this.checkCluster(i.clusterID), () => {});
    });
    ws.on('message', (data) => {
      const msg = parseInstruction(data.toString());
      if (!msg) return;
      if ('syncVMsAction' in msg) {
        // Our controller sends the worker's VMs along; an upstream one does not, and the sync lists them.
        this.pushed = msg.syncVMsAction.vms;
        this.requestSync();
      } else if ('portForwardAction' in msg) void this.portForward(msg.portForwardAction);
      else void this.resolveIP(msg.resolveIPAction);
    });
    ws.on('unexpected-response', (_req, res) => {
      if (res.statusCode === 404) this.unregistered = true;
      this.log.warn({ status: res.statusCode }, 'controller refused the watch connection');
      ws.terminate();
    });
    ws.on('error', (err) => this.log.debug({ err: err.message }, 'watch connection error'));
    ws.on('close', () => {
      if (this.stopped) return;
      // Exponential backoff with full jitter: after a controller restart, hundreds of workers spread
      // their reconnects over the window instead of arriving together. The controller keeps the
      // worker's record; only when it was deleted does the worker register again.
      const delay = Math.random() * this.reconnectDelay;
      this.reconnectDelay = Math.min(this.reconnectDelay * 2, 15_000);
      this.log.info({ inMs: Math.round(delay) }, 'watch connection lost; reconnecting');
      setTimeout(() => {
        if (!this.unregistered) return this.connect();
        this.log.warn('the controller does not know this worker (deleted?); registering again');
        this.o.client.registerWorker(this.workerRecord()).then(
          () => {
            this.unregistered = false;
            this.connect();
          },
          () => this.connect(),
        );
      }, delay);
    });
  }

  /**
   * Remembers the controller's cluster id and says so when it changes: a controller that lost or swapped
   * its data. Nothing is destroyed for it: VMs it does not know become orphans (see sync).
   */
  private checkCluster(clusterID: string | undefined) {
    if (!clusterID) return;
    const file = join(this.o.dataDir, 'controller.json');
    const before = existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as { clusterID?: string }).clusterID : undefined;
    if (before === clusterID) return;
    if (before) this.log.warn({ before, now: clusterID }, "the controller's cluster changed (it lost or swapped its data): VMs it does not know are kept as orphans");
    writeFileSync(file, JSON.stringify({ clusterID }) + '\n');
  }

  /** Is the instruction channel to the controller open? */
  get connected(): boolean {
    return this.ws?.readyState === WebSocket.OPEN;
  }

  private localNameOfUID(uid: string): string {
    for (const t of this.tasks.values()) if (t.uid === uid && !t.abort.signal.aborted) return t.localName;
    throw new Error(`no VM with uid ${uid} runs on worker ${this.o.name}`);
  }

  private rpcURL(path: string, query: Record<string, string>, ws: boolean): URL {
    const url = this.o.client.urlOf(path, ws);
    for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v);
    return url;
  }

  /** portForwardAction: dial the VM's port (or this host's, without a VM), then dial back and splice. */
  private async portForward(action: PortForwardAction) {
    const query: Record<string, string> = { session: action.session, workerName: this.o.name };
    let target: Duplex | undefined;
    try {
      target = action.vmUID
        ? await this.o.driver.dial(this.localNameOfUID(action.vmUID), action.port)
        : await new Promise<Duplex>((resolve, reject) => {
            const sock = net.connect({ host: '127.0.0.1', port: action.port, noDelay: true }, () => resolve(sock));
            sock.once('error', reject);
          });
    } catch (err) {
      // `errorMessage`, as upstream's worker sends it (our controller reads it too).
      query.errorMessage = (err as Error).message.slice(0, 500);
    }
    const url = this.rpcURL('/v1/rpc/port-forward', query, true);
    const ws = new WebSocket(url, {
      headers: { authorization: this.o.client.authorization ?? '' },
      ...this.o.client.tlsOptions(),
      ...wsMasking(url),
      handshakeTimeout: 15_000,
    });
    ws.on('error', (err) => {
      this.log.debug({ err: err.message }, 'port-forward dial-back failed');
      target?.destroy();
    });
    if (!target) return;
    const t = target;
    t.on('error', () => ws.terminate());
    ws.on('open', () => {
      const stream = createWebSocketStream(ws);
      stream.on('error', () => t.destroy());
      t.pipe(stream);
      stream.pipe(t);
      // The VM side closing ends the tunnel cleanly (code 1000).
      t.on('close', () => ws.close(1000));
      ws.on('close', () => t.destroy());
    });
  }

  /** resolveIPAction: find the VM's IP and POST it back, in the query (`ip` or `errorMessage`) as upstream's worker does. */
  private async resolveIP(action: ResolveIPAction) {
    const query = new URLSearchParams({ session: action.session });
    try {
      query.set('ip', await this.o.driver.ip(this.localNameOfUID(action.vmUID)));
    } catch (err) {
      query.set('errorMessage', (err as Error).message.slice(0, 1000));
    }
    await this.o.client.call('POST', `/v1/rpc/resolve-ip?${query}`).catch((err: Error) => {
      this.log.debug({ err: err.message }, 'resolve-ip answer failed');
    });
  }

  /** Syncs never overlap; requests during a sync cause one more. */
  requestSync() {
    if (this.syncing) {
      this.syncAgain = true;
      return;
    }
    this.syncing = true;
    void (async () => {
      try {
        do {
          this.syncAgain = false;
          await this.sync();
        } while (this.syncAgain && !this.stopped);
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'sync failed; retrying');
        setTimeout(() => this.requestSync(), 2000);
      } finally {
        this.syncing = false;
      }
    })();
  }

  /** Converge: start what is assigned and missing, adopt what already runs, remove what is not ours any more. */
  private async sync() {
    if (this.stopped) return;
    const pushed = this.pushed;
    this.pushed = undefined;
    const resync = this.resync;
    this.resync = false;
    const desired = pushed ?? (await this.o.client.listVMs(this.o.name));
    const local = await this.o.driver.list();
    const localByName = new Map(local.map((l) => [l.localName, l]));
    const wanted = new Set<string>();
    for (const vm of desired) {
      if (!vm.uid) continue;
      const localName = localNameOf(vm);
      wanted.add(localName);
      const task = this.tasks.get(localName);
      if (task && task.generation !== vm.generation && vm.status !== 'failed') {
        if (task.hostSpec !== hostSpecOf(vm)) {
          // A new spec the host must carry out (cpu, memory, disk, powerState...): stop, boot again.
          task.abort.abort(RESPEC);
          this.tasks.delete(localName);
          this.run(vm, localName, false, task.finished);
        } else {
          task.generation = vm.generation; // nothing to do here: acknowledge the generation
          if (task.reported) this.report(vm, task, task.reported);
        }
        continue;
      }
      if (task) {
        // A report lost while the controller was away: the controller still thinks the VM is
        // pending, but it has moved on here. (A failed VM is the controller's call, not re-asserted.)
        // (A push made before the report was committed also shows it pending: only an unacknowledged report is sent again.)
        if (vm.status === 'pending' && task.reported && task.reported.status !== 'pending' && !task.acked && !task.sending) this.report(vm, task, task.reported);
        // After a reconnect, the whole state: whatever the controller shows that differs from what was
        // reported (it lost it: restored, restarted) is reported again.
        else if (resync && vm.status !== 'failed' && task.reported && !task.sending && !task.abort.signal.aborted && (vm.status !== task.reported.status || vm.status_message !== task.reported.status_message)) {
          this.report(vm, task, task.reported);
        }
        continue;
      }
      if (vm.status === 'failed') continue;
      const existing = localByName.get(localName);
      this.run(vm, localName, existing?.running ?? false);
    }
    const desiredUIDs = new Set(desired.map((vm) => vm.uid));
    await this.settleUnassigned(
      local.filter((l) => !wanted.has(l.localName)),
      [...this.tasks.values()].filter((t) => !wanted.has(t.localName)),
      desiredUIDs,
    );
  }

  /**
   * What runs here but is not assigned here. An earlier run of a VM assigned here (same uid) is
   * removed at once. Of the rest, our controller says which it knows to have gone (deleted, moved):
   * those are stopped and removed (no leaks). The others it does not know at all (it lost or swapped
   * its data): they are kept as orphans, never destroyed for that, until an admin adopts or deletes
   * them or the orphan grace period ends. (An upstream controller cannot tell the two apart: then
   * everything unassigned is removed, as upstream workers do.)
   */
  private async settleUnassigned(local: LocalVM[], tasks: Task[], assignedUIDs: Set<string | undefined>) {
    const entries = new Map<string, Orphan>();
    for (const t of tasks) entries.set(t.localName, { localName: t.localName, uid: t.uid, name: t.name });
    for (const l of local) entries.set(l.localName, { localName: l.localName, uid: l.uid, running: l.running, image: l.image, cpu: l.cpu, memory: l.memory });
    if (entries.size === 0 && !this.hadOrphans) return;
    let remove: Set<string>;
    let orphans: Orphan[] = [];
    if (this.orphansCapable) {
      const earlierRuns = [...entries.values()].filter((e) => e.uid && assignedUIDs.has(e.uid)).map((e) => e.localName);
      const ask = [...entries.values()].filter((e) => !earlierRuns.includes(e.localName));
      const answer = ask.length || this.hadOrphans ? await this.o.client.reportUnassigned(this.o.name, ask) : { remove: [], orphans: [] };
      remove = new Set([...earlierRuns, ...answer.remove]);
      orphans = answer.orphans;
      this.hadOrphans = orphans.length > 0;
      const grace = this.o.orphanGraceMs ?? 24 * 3600_000;
      let next = Infinity;
      for (const o of orphans) {
        const left = Date.parse(o.since ?? '') + grace - Date.now();
        if (left <= 0) {
          this.log.warn({ vm: o.localName, since: o.since }, 'removing an orphan: its grace period is over');
          remove.add(o.localName);
        } else next = Math.min(next, left);
      }
      // Look again when the next orphan's grace period ends.
      clearTimeout(this.graceTimer);
      if (next < Infinity) this.graceTimer = setTimeout(() => this.requestSync(), Math.min(next + 100, 2 ** 31 - 1));
    } else remove = new Set(entries.keys());
    for (const t of tasks) {
      this.tasks.delete(t.localName);
      t.abort.abort(remove.has(t.localName) ? undefined : ORPHANED);
    }
    for (const l of local) {
      // (A live run removes its VM itself when aborted; a finished one does not: remove is idempotent.)
      if (remove.has(l.localName)) {
        this.log.info({ vm: l.localName }, 'removing a VM the controller no longer assigns here');
        await this.o.driver.remove(l.localName).catch((err: Error) => this.log.warn({ vm: l.localName, err: err.message }, 'remove failed'));
      }
    }
    for (const o of orphans) if (!remove.has(o.localName)) this.log.warn({ vm: o.localName, since: o.since }, 'keeping a VM the controller does not know (an orphan: orchard list orphans)');
  }

  /**
   * Events and state reports leave through the task's outbox, one request at a time, without holding
   * up the VM's lifecycle (no round trip on the boot path). Queued (unsent) items merge: events into
   * one batch, and of the states only the newest is sent, ahead of queued events, and with them when
   * the controller takes both in one request. Sending starts on the next turn of the event loop, so
   * the steps of a quick transition (scheduled, cloned, booted, running) leave together.
   * What fails is sent again with back-off until the controller takes it (see deliver).
   */
  private send(task: Task, item: OutboxItem) {
    if ('events' in item) {
      const queued = task.outbox.find((i): i is { events: Event[] } => 'events' in i);
      if (queued) queued.events.push(...item.events);
      else task.outbox.push(item);
      this.trimEvents(task);
    } else {
      // The state goes first: readiness should not wait behind log lines.
      task.outbox = [item, ...task.outbox.filter((i) => !('state' in i))];
    }
    if (task.sending) return;
    task.sending = (async () => {
      await new Promise((r) => setImmediate(r));
      let attempt = 0;
      while (!this.stopped) {
        const next = task.outbox.shift();
        if (!next) break;
        let state: VMStateUpdate | undefined;
        let events: Event[] | undefined;
        if ('state' in next) {
          // A run that is over reports nothing more (its VM went elsewhere or was removed).
          if (task.abort.signal.aborted) continue;
          state = next.state;
          const queued = task.outbox[0];
          if (this.stateWithEvents && queued && 'events' in queued) {
            events = queued.events.splice(0, MAX_EVENTS_PER_REQUEST);
            if (!queued.events.length) task.outbox.shift();
          }
        } else {
          events = next.events.splice(0, MAX_EVENTS_PER_REQUEST);
          if (next.events.length) task.outbox.unshift(next); // the rest of the batch goes next
        }
        const outcome = await this.deliver(task, state, events, attempt);
        if (outcome === 'retry') {
          // Back in front; a state only if no newer one has come meanwhile (that one replaces it).
          if (events?.length) this.prependEvents(task, events);
          if (state && !task.outbox.some((i) => 'state' in i)) task.outbox.unshift({ state });
          await this.backoff(++attempt);
          continue;
        }
        attempt = 0;
        if (state && outcome === 'sent') task.acked = !task.outbox.some((i) => 'state' in i); // no newer state queued: the latest is in
      }
      task.sending = undefined;
    })();
  }

  /**
   * One request: a state report (with events when the controller takes both) or an event batch.
   * 401, 403, 408, 429, 5xx and network errors are worth another try (a revoked role may come back, a
   * full disk may be cleared, a controller restarts); any other 4xx will never succeed (a deleted VM,
   * a report about an earlier run): it is dropped, with a log line.
   */
  private async deliver(task: Task, state: VMStateUpdate | undefined, events: Event[] | undefined, attempt: number): Promise<'sent' | 'dropped' | 'retry'> {
    const what = state ? 'state report' : 'event batch';
    try {
      if (state) await this.o.client.updateVMState(task.name, events?.length ? { ...state, events } : state);
      else if (events?.length) await this.o.client.appendEvents(task.name, events);
      if (attempt > 0) this.log.info({ vm: task.name, attempts: attempt + 1 }, `${what} delivered after retrying`);
      return 'sent';
    } catch (err) {
      const status = err instanceof ApiError ? err.status : 0;
      const message = (err as Error).message;
      if (status >= 400 && status < 500 && ![401, 403, 408, 429].includes(status)) {
        this.log.warn({ vm: task.name, status, err: message, state: state?.status, events: events?.length ?? 0 }, `${what} refused; dropped`);
        return 'dropped';
      }
      // The first failure is worth a warning; the retries that follow, a debug line each.
      this.log[attempt === 0 ? 'warn' : 'debug']({ vm: task.name, status: status || undefined, err: message, attempt: attempt + 1 }, `${what} failed; retrying with back-off`);
      return 'retry';
    }
  }

  /** Exponential back-off with jitter (0.5 s doubling to 30 s); cut short when the worker stops. */
  private backoff(attempt: number): Promise<void> {
    const ms = Math.min(REPORT_RETRY_BASE_MS * 2 ** (attempt - 1), REPORT_RETRY_MAX_MS) * (0.5 + Math.random() / 2);
    return new Promise((resolve) => {
      const signal = this.stopSignal.signal;
      const stop = () => (clearTimeout(timer), resolve());
      const timer = setTimeout(() => (signal.removeEventListener('abort', stop), resolve()), ms);
      signal.addEventListener('abort', stop, { once: true });
    });
  }

  private prependEvents(task: Task, events: Event[]) {
    const queued = task.outbox.find((i): i is { events: Event[] } => 'events' in i);
    if (queued) queued.events.unshift(...events);
    else task.outbox.push({ events });
    this.trimEvents(task);
  }

  /** While the controller is away, a VM's unsent events are bounded: the oldest go, and an event says how many. */
  private trimEvents(task: Task) {
    const queued = task.outbox.find((i): i is { events: Event[] } => 'events' in i);
    if (!queued || queued.events.length <= MAX_QUEUED_EVENTS) return;
    const dropped = queued.events.length - MAX_QUEUED_EVENTS + 1;
    const first = queued.events[dropped];
    queued.events.splice(0, dropped, { kind: 'lifecycle', timestamp: first.timestamp, payload: `${dropped} earlier events were dropped while the controller was unreachable` });
    this.log.warn({ vm: task.name, dropped }, 'the controller is unreachable: dropped the oldest unsent events');
  }

  private event(task: Task, kind: string, payload: string) {
    this.send(task, { events: [{ kind, timestamp: Math.floor(Date.now() / 1000), payload }] });
  }

  private report(vm: VM, task: Task, state: VMStateUpdate) {
    task.reported = state;
    task.acked = false;
    this.send(task, { state: { localName: task.localName, observedGeneration: vm.generation, ...state } });
  }

  private toDriverVM(vm: VM, localName: string): DriverVM {
    return {
      localName,
      name: vm.name,
      uid: vm.uid!,
      image: vm.image!,
      imagePullPolicy: vm.imagePullPolicy ?? 'IfNotPresent',
      // What the VM asks for, else what the controller assigned when it placed the VM (from this
      // worker's defaults), else this worker's defaults (a controller that assigns nothing).
      cpu: vm.cpu || vm.assignedCPU || (this.o.defaultCPU ?? VM_DEFAULTS.cpu),
      memory: vm.memory || vm.assignedMemory || (this.o.defaultMemory ?? VM_DEFAULTS.memory),
      diskSize: vm.diskSize,
      ...sshCredentials(vm),
      nested: vm.nested,
      headless: vm.headless,
      netSoftnet: vm.netSoftnet || vm['net-softnet'],
      netSoftnetAllow: vm.netSoftnetAllow,
      netSoftnetBlock: vm.netSoftnetBlock,
      netBridged: vm['net-bridged'],
      hostDirs: vm.hostDirs,
    };
  }

  /** Brings one VM up (or adopts it) and watches it until it exits or is no longer ours. */
  private run(vm: VM, localName: string, alreadyRunning: boolean, after?: Promise<void>) {
    let finish!: () => void;
    const finished = new Promise<void>((resolve) => (finish = resolve));
    const task: Task = { uid: vm.uid!, name: vm.name, localName, abort: new AbortController(), outbox: [], generation: vm.generation, hostSpec: hostSpecOf(vm), finished };
    this.tasks.set(localName, task);
    const driver = this.o.driver;
    const signal = task.abort.signal;
    void (async () => {
      const t0 = Date.now();
      try {
        await after;
        if (vm.powerState === 'stopped' || vm.powerState === 'suspended') {
          // Powered off on request: the disk stays; a powerState of running boots it again.
          // (Suspending to memory is not in the driver interface: suspended stops the VM too.)
          await driver.stop(localName);
          this.event(task, 'lifecycle', `stopped (powerState ${vm.powerState})`);
          this.report(vm, task, { status: 'pending', status_message: `stopped (powerState ${vm.powerState})`, conditions: [{ type: 'scheduled', state: 'true' }] });
          await new Promise<void>((_, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }));
        }
        if (alreadyRunning) {
          this.log.info({ vm: vm.name }, 'adopting a running VM');
          this.event(task, 'lifecycle', `adopted by worker ${this.o.name} after a restart`);
        } else {
          this.event(task, 'lifecycle', `scheduled on worker ${this.o.name}; cloning image ${vm.image}`);
          this.report(vm, task, { status: 'pending', status_message: `cloning image ${vm.image}`, conditions: [{ type: 'scheduled', state: 'true' }, { type: 'cloning', state: 'true' }] });
          await this.prepare(vm, task);
          signal.throwIfAborted();
          this.event(task, 'lifecycle', 'booting');
          this.report(vm, task, { status: 'pending', status_message: 'booting', conditions: [{ type: 'scheduled', state: 'true' }] });
          await driver.start(this.toDriverVM(vm, localName));
        }
        await driver.waitReady(localName, signal);
        signal.throwIfAborted();
        this.report(vm, task, { status: 'running', status_message: 'running', conditions: [{ type: 'scheduled', state: 'true' }, { type: 'running', state: 'true' }] });
        if (!alreadyRunning) {
          this.event(task, 'lifecycle', `running: the guest answers SSH ${((Date.now() - t0) / 1000).toFixed(1)}s after the clone started`);
          if (vm.startup_script?.script_content) await this.startupScript(vm, task);
        }
        const exit = await Promise.race([driver.waitExit(localName), new Promise<never>((_, reject) => signal.addEventListener('abort', () => reject(signal.reason), { once: true }))]);
        this.event(task, 'lifecycle', `failed: the VM stopped (${exit.reason})`);
        this.report(vm, task, { status: 'failed', status_message: `the VM stopped: ${exit.reason}`, conditions: [] });
      } catch (err) {
        if (signal.aborted) {
          if (signal.reason === SHUTDOWN) return; // the worker stops; the VM keeps running for the next one
          if (signal.reason === ORPHANED) return; // the controller does not know it: kept as it is
          if (signal.reason === RESPEC) {
            this.event(task, 'lifecycle', 'stopping to apply a new spec');
            await driver.stop(localName).catch((e: Error) => this.log.warn({ vm: vm.name, err: e.message }, 'stop failed'));
            return;
          }
          this.log.info({ vm: vm.name }, 'VM no longer assigned here; stopping it');
          await driver.remove(localName).catch((e: Error) => this.log.warn({ vm: vm.name, err: e.message }, 'remove failed'));
          return;
        }
        const message = (err as Error).message;
        this.log.warn({ vm: vm.name, err: message }, 'VM failed');
        this.event(task, 'lifecycle', `failed: ${message}`);
        this.report(vm, task, { status: 'failed', status_message: message, conditions: [] });
        await driver.stop(localName, 5000).catch(() => {});
      } finally {
        finish();
      }
      // The finished task stays in `tasks`, so a sync does not restart a failed VM in place: the
      // controller decides (restart policy) and unassigns it, which removes it here.
    })();
  }

  /**
   * The driver's prepare; a VM whose image this host lacks does not fail: like a Kubernetes pod in
   * ImagePullBackOff it stays pending here, its reason saying which image is missing and how to add
   * it, and is tried again as soon as the host's images change (driver.watchImages) and else with
   * back-off (5 s doubling to 5 min), until the image is there or the VM is deleted or changed.
   */
  private async prepare(vm: VM, task: Task) {
    const signal = task.abort.signal;
    // At most one progress event a second; the newest held back is sent when the second is over (none is lost at the end).
    let lastProgress = 0;
    let held: string | undefined;
    let timer: NodeJS.Timeout | undefined;
    const progress = (msg: string) => {
      const wait = lastProgress + 1000 - Date.now();
      if (wait > 0) {
        held = msg;
        timer ??= setTimeout(() => {
          timer = undefined;
          if (held !== undefined && !signal.aborted) progress(held);
          held = undefined;
        }, wait);
        return;
      }
      held = undefined;
      lastProgress = Date.now();
      this.event(task, 'progress', msg);
    };
    const flush = () => {
      clearTimeout(timer);
      timer = undefined;
      if (held !== undefined && !signal.aborted) this.event(task, 'progress', held);
      held = undefined;
    };
    let lastReason = '';
    for (let attempt = 0; ; attempt++) {
      try {
        await this.o.driver.prepare(this.toDriverVM(vm, task.localName), progress).finally(flush);
        if (attempt > 0) this.event(task, 'lifecycle', `image ${vm.image} is here now (after ${attempt + 1} attempts); cloning it`);
        return;
      } catch (err) {
        if ((err as { code?: string }).code !== 'IMAGE_NOT_FOUND' || signal.aborted) throw err;
        const delay = Math.min(IMAGE_RETRY_BASE_MS * 2 ** attempt, IMAGE_RETRY_MAX_MS);
        const reason = `image ${vm.image} not found on worker ${this.o.name}: ${(err as Error).message}`;
        if (reason !== lastReason) {
          lastReason = reason;
          this.log.warn({ vm: vm.name, image: vm.image, err: (err as Error).message }, 'VM waits for its image; retrying when the images change, else with back-off');
          this.event(task, 'lifecycle', `${reason} (retrying when the worker's images change, else with back-off up to ${IMAGE_RETRY_MAX_MS / 60_000} min)`);
          this.report(vm, task, { status: 'pending', status_message: reason, conditions: [{ type: 'scheduled', state: 'true' }] });
        }
        await this.imagesChangedOr(delay, signal);
      }
    }
  }

  /** Resolves after `ms`, or soon after the driver sees the host's images change; rejects on abort. */
  private imagesChangedOr(ms: number, signal: AbortSignal): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let settle: NodeJS.Timeout | undefined;
      const done = (err?: unknown) => {
        clearTimeout(timer);
        clearTimeout(settle);
        unwatch?.();
        signal.removeEventListener('abort', onAbort);
        if (err === undefined) resolve();
        else reject(err as Error);
      };
      const onAbort = () => done(signal.reason);
      const timer = setTimeout(() => done(), ms);
      // A change comes in bursts (a build writes many files, an import renames a directory into place): try after they settle.
      const unwatch = this.o.driver.watchImages?.(() => {
        clearTimeout(settle);
        settle = setTimeout(() => done(), 500);
      });
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    });
  }

  private async startupScript(vm: VM, task: Task) {
    const { localName } = task;
    const signal = task.abort.signal;
    this.event(task, 'startup-script', 'running the startup script');
    // The script's output as upstream's workers give it: one `log_line` event per line (what upstream's
    // `orchard logs vm` shows), sent in batches every 0.5 s; a line still open goes out at the end.
    let buffered = '';
    const flush = (all = false) => {
      const end = all ? buffered.length : buffered.lastIndexOf('\n') + 1;
      if (end === 0) return;
      const text = buffered.slice(0, end);
      buffered = buffered.slice(end);
      const now = Math.floor(Date.now() / 1000);
      const lines = text.replace(/\r?\n$/, '').split(/\r?\n/);
      this.send(task, { events: lines.map((payload) => ({ kind: 'log_line', timestamp: now, payload })) });
    };
    const timer = setInterval(flush, 500);
    try {
      const result = await runScript({
        sock: await this.o.driver.dial(localName, 22),
        ...sshCredentials(vm),
        script: vm.startup_script!.script_content,
        env: vm.startup_script!.env,
        onOutput: (_stream, data) => (buffered += data.toString('utf8')),
        signal,
      });
      clearInterval(timer);
      flush(true);
      this.event(task, 'startup-script', result.signal ? `startup script killed by signal ${result.signal}` : `startup script exited with code ${result.exitCode}`);
    } catch (err) {
      clearInterval(timer);
      flush(true);
      this.event(task, 'startup-script', `startup script could not run: ${(err as Error).message}`);
    }
  }
}
