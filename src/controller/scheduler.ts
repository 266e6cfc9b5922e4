// The scheduler: places pending VMs on workers, fails the VMs of workers that went offline, and
// restarts failed VMs whose restart policy says so (with exponential backoff and a cap).
// One loop in the controller does all placement, from one consistent view per pass, so two VMs can
// never overbook a worker, however many creates arrive at once.
import type { Logger } from 'pino';
import { localNameOf, RESOURCE_TART_VMS, type VM, type Worker } from '../api/schemas.ts';
import type { Store } from './store/store.ts';
import { VM_DEFAULTS } from '../api/defaults.ts';
import { requirements, type ClusterView } from './view.ts';
import { holds } from './domain/images.ts';
import { freeSlots, WorkerOrder } from './worker-order.ts';

export const MAX_RESTARTS = 10;
const BACKOFF_BASE_MS = 1000;
const BACKOFF_CAP_MS = 5 * 60_000;
const MIN_PASS_INTERVAL_MS = 20;
/** How often a pass looks at every waiting VM even when nothing they depend on changed (a safety net). */
const LOOK_AT_ALL_MS = 1000;
const NOTHING_USED: Readonly<Record<string, number>> = Object.freeze({});

/**
 * What placing a VM depends on: what it needs, and its runtime, OS, labels and needs as one string
 * (VMs with the same string fit or do not fit alike; the OS, as a macOS Tart VM needs a VM slot where
 * others may not). Kept as long as the view holds that version of the VM: a pass may go over every
 * waiting VM, and in a full cluster with 10,000 waiting, working it out again on each pass was a
 * fifth of the pass (bench/scheduler-pass.ts --workers 0).
 */
const placements = new WeakMap<VM, { need: Record<string, number>; signature: string }>();
function placementOf(vm: VM) {
  let p = placements.get(vm);
  if (!p) {
    const need = requirements(vm);
    placements.set(vm, (p = { need, signature: JSON.stringify([vm.runtime, vm.os, vm.labels, need]) }));
  }
  return p;
}

export interface SchedulerOptions {
  offlineTimeoutMs: number;
  /** Is this worker's WebSocket connected right now? (A connected worker is online.) */
  isConnected: (worker: string) => boolean;
  /** Backoff base for OnFailure restarts (tests shorten it). */
  backoffBaseMs?: number;
}

/**
 * Does this change matter to placement? A heartbeat (only last_seen), or a worker's progress report
 * on a placed VM (status_message, conditions), does not: passes stay proportional to real events.
 */
function placementInputsDiffer(kind: 'vms' | 'workers', before: VM | Worker, after: VM | Worker): boolean {
  const keys =
    kind === 'workers'
      ? (['scheduling_paused', 'resources', 'labels', 'runtime'] as const)
      : (['worker', 'resources', 'labels', 'runtime', 'restart_count', 'restart_policy'] as const);
  // Of a VM's status only failing (or recovering) matters: pending → running on its worker does not.
  if (kind === 'vms' && ((before as VM).status === 'failed') !== ((after as VM).status === 'failed')) return true;
  // A change keeps the unchanged fields' values (the same objects): only a new value needs comparing.
  return keys.some((k) => {
    const b = (before as Record<string, unknown>)[k];
    const a = (after as Record<string, unknown>)[k];
    return b !== a && JSON.stringify(b) !== JSON.stringify(a);
  });
}

/** A resource as the pending reason names it: the VM slot resource (upstream's tart-vms, counted by every runtime) as "VM slots". */
const shortName = (resource: string) => (resource === RESOURCE_TART_VMS ? 'VM slots' : resource.replace(/^org\.cirruslabs\./, ''));

/**
 * The first resource `w` has too little of for `vm`, or undefined. Every VM takes a VM slot on workers
 * that count slots (ours, upstream's Tart workers); a worker that counts none (upstream's Linux Vetu
 * workers) runs VMs that are not macOS Tart VMs without one, as upstream charges the slot only to those.
 */
function shortOf(vm: VM, need: Record<string, number>, w: Worker, used: Readonly<Record<string, number>>): [string, number] | undefined {
  const macOSTart = (vm.os ?? 'darwin') === 'darwin' && (vm.runtime ?? 'tart') === 'tart';
  for (const [k, v] of Object.entries(need)) {
    if (k === RESOURCE_TART_VMS && w.resources?.[k] === undefined && !macOSTart && vm.resources?.[k] === undefined) continue;
    if ((w.resources?.[k] ?? 0) - (used[k] ?? 0) < v) return [k, v];
  }
  return undefined;
}

/**
 * What a VM runs as on `w`: a VM placed on a worker that is not a Tart worker (qemu, Vetu, synthetic)
 * is a Linux VM of that host's architecture, whatever upstream's defaults (darwin/arm64) said.
 */
function platformOn(vm: VM, w: Worker): Pick<VM, 'os' | 'arch'> | undefined {
  if ((w.runtime ?? 'tart') === 'tart' || vm.runtime === 'tart') return undefined;
  return { os: 'linux', arch: w.arch === 'amd64' || w.arch === 'arm64' ? w.arch : vm.arch };
}

export class Scheduler {
  private readonly store: Store;
  private readonly logger: Logger;
  private readonly opts: SchedulerOptions;
  private readonly startedAt = Date.now();
  /**
   * When each failure (VM uid and restart count: a pass may miss the short pending/running phase
   * between two failures) was first seen: the backoff counts from there.
   */
  private readonly failedSince = new Map<string, number>();
  private running = false;
  private stopped = false;
  private again = false;
  private timer?: NodeJS.Timeout;
  /** Wakes the loop when the next backed-off restart is due (the periodic pass alone would be up to 1 s late). */
  private dueTimer?: NodeJS.Timeout;
  private unsubscribe?: () => void;
  private idle: Promise<void> = Promise.resolve();
  /** The committed VMs and workers (no re-reading per pass). */
  private readonly view: ClusterView;
  /** The workers a pass needs to look at, kept as they change. */
  private readonly order: WorkerOrder;
  /** VMs that started waiting, or changed while waiting, since the last pass. */
  private fresh = new Set<string>();
  /** When a pass last looked at every waiting VM, and the worker index's version then. */
  private lookedAtAll = { at: -Infinity, version: -1 };
  private readonly unwatchWaiting: () => void;

  constructor(store: Store, view: ClusterView, logger: Logger, opts: SchedulerOptions) {
    this.store = store;
    this.view = view;
    this.logger = logger;
    this.opts = opts;
    this.order = new WorkerOrder(view, opts.isConnected);
    this.unwatchWaiting = view.subscribe((change) => {
      if (change.kind === 'vms' && change.type !== 'DELETED' && change.object.status === 'pending' && !change.object.worker) this.fresh.add(change.object.name);
    });
  }

  /** A worker's watch connected or disconnected (a pass follows). */
  workerConnection(worker: string) {
    this.order.connection(worker);
    this.kick();
  }

  start() {
    this.unsubscribe = this.view.subscribe((change) => {
      if (change.type !== 'MODIFIED' || !change.before || placementInputsDiffer(change.kind, change.before, change.object)) this.kick();
    });
    this.timer = setInterval(() => this.kick(), 1000);
    this.timer.unref();
    this.kick();
  }

  async stop() {
    // No pass after this: workers disconnecting during shutdown would otherwise look offline (and the store may be closed).
    this.stopped = true;
    this.unsubscribe?.();
    this.unwatchWaiting();
    this.order.close();
    clearInterval(this.timer);
    this.timer = undefined;
    clearTimeout(this.dueTimer);
    await this.idle;
    clearTimeout(this.dueTimer);
  }

  /** Asks for a pass soon; passes never overlap, and requests during a pass cause one more. */
  kick() {
    if (this.stopped) return;
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    this.idle = new Promise((resolve) => {
      setImmediate(async () => {
        try {
          await this.view.loaded;
          do {
            this.again = false;
            await this.pass();
            // Under a burst of changes, let some accumulate: one pass then handles many at once.
            if (this.again) await new Promise((r) => setTimeout(r, MIN_PASS_INTERVAL_MS));
          } while (this.again && this.timer);
        } catch (err) {
          this.logger.error({ err }, 'scheduler pass failed');
        } finally {
          this.running = false;
          resolve();
        }
      });
    });
  }

  /** When a worker goes offline: a timeout after it was last seen; never while its watch is connected. */
  private readonly offlineAt = (w: Worker): number => {
    if (this.opts.isConnected(w.name)) return Infinity;
    // After a controller restart every worker gets one full timeout to come back.
    return Math.max(w.last_seen ? Date.parse(w.last_seen) : 0, this.startedAt) + this.opts.offlineTimeoutMs;
  };

  /**
   * The waiting VMs a pass looks at: all of them, in the order they started waiting, when anything a
   * VM's fit depends on changed on the workers' side since the last pass that did (or a second ago);
   * else only those that started waiting or changed since the last pass, in that order. The others
   * were found to fit nowhere, with their reason written, and nothing they depend on changed: in a
   * full cluster with 10,000 VMs waiting each pass went over all of them.
   */
  private waitingToLookAt(now: number): Iterable<string> {
    const fresh = this.fresh;
    this.fresh = new Set();
    if (this.order.version !== this.lookedAtAll.version || now - this.lookedAtAll.at >= LOOK_AT_ALL_MS) {
      this.lookedAtAll = { at: now, version: this.order.version };
      return this.view.unplaced;
    }
    return [...fresh].filter((name) => this.view.unplaced.has(name));
  }

  private backoffMs(restartCount: number) {
    return Math.min((this.opts.backoffBaseMs ?? BACKOFF_BASE_MS) * 2 ** restartCount, BACKOFF_CAP_MS);
  }

  private fits(vm: VM, need: Record<string, number>, w: Worker, u: Readonly<Record<string, number>>): boolean {
    if (vm.runtime && vm.runtime !== (w.runtime ?? 'tart')) return false;
    if (vm.labels) for (const k in vm.labels) if (w.labels?.[k] !== vm.labels[k]) return false;
    return shortOf(vm, need, w, u) === undefined;
  }

  /** Why a VM fits on no worker, per reason: "no worker fits: 2 workers: 1 lacks label rack=a, 1 is paused". */
  private whyNoFit(vm: VM, need: Record<string, number>, workers: Worker[], online: (w: Worker) => boolean, usedOf: (worker: string) => Readonly<Record<string, number>>): string {
    if (workers.length === 0) return 'waiting for a worker: none is registered';
    // Each reason in its singular and plural form: "1 is paused", "2 are paused".
    const reasons = new Map<string, { n: number; plural: string }>();
    const why = (one: string, many: string) => {
      const r = reasons.get(one);
      if (r) r.n++;
      else reasons.set(one, { n: 1, plural: many });
    };
    for (const w of workers) {
      const runtime = w.runtime ?? 'tart';
      const missing = Object.entries(vm.labels ?? {}).find(([k, v]) => w.labels?.[k] !== v);
      const u = usedOf(w.name);
      const short = shortOf(vm, need, w, u);
      if (!online(w)) why('is offline', 'are offline');
      else if (w.scheduling_paused) why('is paused', 'are paused');
      else if (vm.runtime && vm.runtime !== runtime) why(`runs ${runtime}, not ${vm.runtime}`, `run ${runtime}, not ${vm.runtime}`);
      else if (missing) why(`lacks label ${missing[0]}=${missing[1]}`, `lack label ${missing[0]}=${missing[1]}`);
      else if (short) {
        const [k, v] = short;
        const free = Math.max(0, (w.resources?.[k] ?? 0) - (u[k] ?? 0));
        why(`has ${free} of ${v} ${shortName(k)} free`, `have ${free} of ${v} ${shortName(k)} free`);
      }
    }
    const list = [...reasons].map(([one, { n, plural }]) => `${n} ${n === 1 ? one : plural}`).join(', ');
    return `no worker fits: ${workers.length} worker${workers.length > 1 ? 's' : ''}: ${list}`;
  }

  /**
   * One pass: fails the VMs of offline or deleted workers, restarts failed OnFailure VMs, places the
   * waiting ones. Its cost follows what changed and the VMs that need something (failed, waiting),
   * not all VMs nor all workers: usage per worker and the waiting and failed VMs are indexes the
   * view keeps; the workers that can take a VM, in order, and those that may be offline or gone,
   * are `WorkerOrder`'s.
   */
  async pass() {
    const now = Date.now();
    const settings = await this.store.getClusterSettings();
    const view = this.view;
    const online = (w: Worker) => now <= this.offlineAt(w);
    const distribute = (settings.schedulerProfile ?? 'optimize-utilization') === 'distribute-load';
    this.order.refresh(distribute, now, this.offlineAt);
    // The pass's own decisions, by VM name (the committed objects are never changed).
    const decided = new Map<string, VM>();
    const current = (name: string) => decided.get(name) ?? view.vms.get(name);
    const writes: Promise<unknown>[] = [];
    const update = (vm: VM, guard: (cur: VM) => boolean, change: (cur: VM) => Partial<VM>) =>
      writes.push(
        this.store
          .update('vms', vm.name, (cur) => (cur.uid === vm.uid && guard(cur) ? { ...cur, ...change(cur) } : cur))
          .catch((err: Error) => {
            this.logger.debug({ err, vm: vm.name }, 'scheduler update skipped');
            this.fresh.add(vm.name); // looked at again next pass (a placement not written changed nothing)
          }),
      );

    // 1. VMs whose worker is gone or offline fail (and may be restarted elsewhere below).
    const failed = [...view.failed];
    for (const name of this.order.suspects()) {
      const w = view.workers.get(name);
      const placed = view.placedOn(name);
      if (placed.size === 0 || (w && online(w))) continue;
      const reason = w ? `worker ${w.name} is offline (not seen since ${w.last_seen ?? 'ever'})` : `worker ${name} was deleted`;
      for (const vmName of placed) {
        const vm = view.vms.get(vmName)!;
        if (vm.status === 'failed') continue;
        decided.set(vmName, { ...vm, status: 'failed', status_message: reason });
        failed.push(vmName);
        update(vm, (cur) => cur.worker === vm.worker && cur.status !== 'failed', () => ({ status: 'failed', status_message: reason }));
      }
    }

    // 2. Restart policy: failed OnFailure VMs go back to pending after an exponential backoff.
    const live = new Set<string>();
    const restarted: string[] = [];
    let nextDue = Infinity;
    for (const name of failed) {
      const vm = current(name)!;
      if (!vm.uid) continue;
      const failure = `${vm.uid}/${vm.restart_count ?? 0}`;
      live.add(failure);
      if (!this.failedSince.has(failure)) this.failedSince.set(failure, now);
      if (vm.restart_policy !== 'OnFailure') continue;
      const count = vm.restart_count ?? 0;
      const reason = (vm.status_message ?? '').replace(/ \(restart .*\)$/, '');
      if (count >= MAX_RESTARTS) {
        const message = `${reason} (restart limit of ${MAX_RESTARTS} reached; not restarting)`;
        if (vm.status_message !== message) update(vm, (cur) => cur.status === 'failed', () => ({ status_message: message }));
        continue;
      }
      const due = this.failedSince.get(failure)! + this.backoffMs(count);
      if (now < due) {
        nextDue = Math.min(nextDue, due);
        const message = `${reason} (restart ${count + 1} of ${MAX_RESTARTS} in ${Math.ceil((due - now) / 1000)}s)`;
        if (vm.status_message !== message) update(vm, (cur) => cur.status === 'failed', () => ({ status_message: message }));
        continue;
      }
      decided.set(name, { ...vm, status: 'pending', worker: undefined });
      restarted.push(name);
      update(vm, (cur) => cur.status === 'failed', (cur) => ({
        status: 'pending',
        worker: undefined,
        // The next run's name on its worker, as upstream's.
        localName: localNameOf({ ...cur, restart_count: (cur.restart_count ?? 0) + 1 }),
        tartName: localNameOf({ ...cur, restart_count: (cur.restart_count ?? 0) + 1 }),
        restart_count: (cur.restart_count ?? 0) + 1,
        restarted_at: new Date(now).toISOString(),
        status_message: `restarting after failure: ${reason}`,
        conditions: [],
      }));
    }
    for (const failure of this.failedSince.keys()) if (!live.has(failure)) this.failedSince.delete(failure);
    clearTimeout(this.dueTimer);
    if (nextDue < Infinity && this.timer) {
      this.dueTimer = setTimeout(() => this.kick(), Math.max(0, nextDue - Date.now()));
      this.dueTimer.unref();
    }

    // 3. Placement, from an ordered list of the workers with room (no full scan per VM); VMs that ask
    // for the same things share one verdict once they stop fitting (usage only grows in a pass).
    // A worker's usage is copied only when this pass places something on it (not 1,000 copies a pass).
    const used = new Map<string, Record<string, number>>();
    const usageOf = (worker: string): Readonly<Record<string, number>> => used.get(worker) ?? view.usage.get(worker) ?? NOTHING_USED;
    const usedOf = (worker: string) => {
      let u = used.get(worker);
      if (!u) used.set(worker, (u = { ...view.usage.get(worker) }));
      return u;
    };
    const load = (w: Worker) => usageOf(w.name)[RESOURCE_TART_VMS] ?? 0;
    const free = (w: Worker) => freeSlots(w, load(w));
    // Workers that could take a VM, in the profile's order (busiest or least busy first, then by
    // name): the first that fits is the one to use. Full workers leave the list.
    const before = (a: Worker, b: Worker) => (load(a) !== load(b) ? (distribute ? load(a) < load(b) : load(a) > load(b)) : a.name < b.name);
    const waiting = [...this.waitingToLookAt(now), ...restarted];
    const candidates = waiting.length ? this.order.candidates() : [];
    const noFit = new Map<string, string>();
    for (const name of waiting) {
      const vm = current(name)!;
      if (vm.status !== 'pending' || vm.worker) continue;
      const { need, signature } = placementOf(vm);
      let message = noFit.get(signature);
      let best: Worker | undefined;
      let at = -1;
      if (message === undefined) {
        at = candidates.findIndex((w) => this.fits(vm, need, w, usageOf(w.name)));
        best = candidates[at];
        // Locality breaks ties: of the workers the profile ranks equal (the same load; they follow
        // one another in the list, by name, those before `best` not fitting), the first that holds
        // the VM's image. It never overrides the profile. Looked for among the image's holders that
        // are still candidates (listed, not full), not among all the equally loaded workers.
        if (best && !holds(best, vm.image)) {
          let local: Worker | undefined;
          for (const h of this.order.holding(vm.image)) {
            if (load(h) === load(best) && free(h) > 0 && h.name > best.name && (!local || h.name < local.name) && this.fits(vm, need, h, usageOf(h.name))) local = h;
          }
          if (local) {
            at = candidates.indexOf(local);
            best = local;
          }
        }
      }
      if (!best) {
        message ??= this.whyNoFit(vm, need, [...view.workers.values()], online, usageOf);
        noFit.set(signature, message);
        if (vm.status_message !== message) {
          const m = message;
          update(vm, (cur) => cur.status === 'pending' && !cur.worker, () => ({ status_message: m }));
        }
        continue;
      }
      const w = best;
      const u = usedOf(w.name);
      for (const k in need) u[k] = (u[k] ?? 0) + need[k];
      // Keep the order: the worker's load grew by one.
      candidates.splice(at, 1);
      if (free(w) > 0) {
        let i = distribute ? at : 0;
        while (i < candidates.length && before(candidates[i], w)) i++;
        candidates.splice(i, 0, w);
      }
      update(vm, (cur) => cur.status === 'pending' && !cur.worker, () => ({
        worker: w.name,
        scheduled_at: new Date(now).toISOString(),
        status_message: holds(w, vm.image) ? `scheduled on worker ${w.name} (image ${vm.image} already there)` : `scheduled on worker ${w.name}`,
        // A VM that asks for no cpu or memory gets the worker's defaults (upstream's --default-cpu/--default-memory).
        assignedCPU: vm.cpu || w.defaultCPU || VM_DEFAULTS.cpu,
        assignedMemory: vm.memory || w.defaultMemory || VM_DEFAULTS.memory,
        ...platformOn(vm, w),
        conditions: [{ type: 'scheduled', state: 'true' }],
      }));
    }
    await Promise.all(writes);
  }
}
