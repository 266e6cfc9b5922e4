// The scheduler: places pending VMs on workers, fails the VMs of workers that went offline, and
// restarts failed VMs whose restart policy says so (with exponential backoff and a cap).
// One loop in the controller does all placement, from one consistent view per pass, so two VMs can
// never overbook a worker, however many creates arrive at once.
import type { Logger } from 'pino';
import { RESOURCE_TART_VMS, type VM, type Worker } from '../api/schemas.ts';
import type { Store } from './store/store.ts';

export const MAX_RESTARTS = 10;
const BACKOFF_BASE_MS = 1000;
const BACKOFF_CAP_MS = 5 * 60_000;

export interface SchedulerOptions {
  offlineTimeoutMs: number;
  /** Is this worker's WebSocket connected right now? (A connected worker is online.) */
  isConnected: (worker: string) => boolean;
  /** Backoff base for OnFailure restarts (tests shorten it). */
  backoffBaseMs?: number;
}

/** What a VM takes from its worker: one VM slot, plus the resources it asks for. */
export function requirements(vm: VM): Record<string, number> {
  return { [RESOURCE_TART_VMS]: 1, ...(vm.resources ?? {}) };
}

const shortName = (resource: string) => resource.replace(/^org\.cirruslabs\./, '');

export class Scheduler {
  private readonly store: Store;
  private readonly logger: Logger;
  private readonly opts: SchedulerOptions;
  private readonly startedAt = Date.now();
  /** When each failed VM (by uid) was first seen failed: the backoff counts from there. */
  private readonly failedSince = new Map<string, number>();
  private running = false;
  private again = false;
  private timer?: NodeJS.Timeout;
  private unsubscribe?: () => void;
  private idle: Promise<void> = Promise.resolve();

  constructor(store: Store, logger: Logger, opts: SchedulerOptions) {
    this.store = store;
    this.logger = logger;
    this.opts = opts;
  }

  start() {
    this.unsubscribe = this.store.subscribe((change) => {
      // Placement can change when a VM is added or changes, a VM goes away (freeing room), or a worker changes.
      if (change.kind !== 'serviceAccounts') this.kick();
    });
    this.timer = setInterval(() => this.kick(), 1000);
    this.timer.unref();
    this.kick();
  }

  async stop() {
    this.unsubscribe?.();
    clearInterval(this.timer);
    this.timer = undefined;
    await this.idle;
  }

  /** Asks for a pass soon; passes never overlap, and requests during a pass cause one more. */
  kick() {
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    this.idle = new Promise((resolve) => {
      setImmediate(async () => {
        try {
          do {
            this.again = false;
            await this.pass();
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

  private online(w: Worker, now: number): boolean {
    if (this.opts.isConnected(w.name)) return true;
    // After a controller restart every worker gets one full timeout to come back.
    const seen = Math.max(w.last_seen ? Date.parse(w.last_seen) : 0, this.startedAt);
    return now - seen <= this.opts.offlineTimeoutMs;
  }

  private backoffMs(restartCount: number) {
    return Math.min((this.opts.backoffBaseMs ?? BACKOFF_BASE_MS) * 2 ** restartCount, BACKOFF_CAP_MS);
  }

  /** One pass over the whole cluster state. */
  async pass() {
    const now = Date.now();
    const [settings, workers, vms] = await Promise.all([this.store.getClusterSettings(), this.store.list('workers'), this.store.list('vms')]);
    const byName = new Map(workers.map((w) => [w.name, w]));
    const online = new Map(workers.map((w) => [w.name, this.online(w, now)]));
    const writes: Promise<unknown>[] = [];
    const update = (vm: VM, guard: (cur: VM) => boolean, change: (cur: VM) => Partial<VM>) =>
      writes.push(
        this.store
          .update('vms', vm.name, (cur) => (cur.uid === vm.uid && guard(cur) ? { ...cur, ...change(cur) } : cur))
          .catch((err: Error) => this.logger.debug({ err, vm: vm.name }, 'scheduler update skipped')),
      );

    // 1. VMs whose worker is gone or offline fail (and may be restarted elsewhere below).
    for (const vm of vms) {
      if (!vm.worker || vm.status === 'failed') continue;
      const w = byName.get(vm.worker);
      if (w && online.get(w.name)) continue;
      const reason = w ? `worker ${w.name} is offline (not seen since ${w.last_seen ?? 'ever'})` : `worker ${vm.worker} was deleted`;
      vm.status = 'failed';
      vm.status_message = reason;
      update(vm, (cur) => cur.worker === vm.worker && cur.status !== 'failed', () => ({ status: 'failed', status_message: reason }));
    }

    // 2. Restart policy: failed OnFailure VMs go back to pending after an exponential backoff.
    const live = new Set<string>();
    for (const vm of vms) {
      if (!vm.uid) continue;
      live.add(vm.uid);
      if (vm.status !== 'failed') {
        this.failedSince.delete(vm.uid);
        continue;
      }
      if (!this.failedSince.has(vm.uid)) this.failedSince.set(vm.uid, now);
      if (vm.restart_policy !== 'OnFailure') continue;
      const count = vm.restart_count ?? 0;
      const reason = (vm.status_message ?? '').replace(/ \(restart .*\)$/, '');
      if (count >= MAX_RESTARTS) {
        const message = `${reason} (restart limit of ${MAX_RESTARTS} reached; not restarting)`;
        if (vm.status_message !== message) update(vm, (cur) => cur.status === 'failed', () => ({ status_message: message }));
        continue;
      }
      const due = this.failedSince.get(vm.uid)! + this.backoffMs(count);
      if (now < due) {
        const message = `${reason} (restart ${count + 1} of ${MAX_RESTARTS} in ${Math.ceil((due - now) / 1000)}s)`;
        if (vm.status_message !== message) update(vm, (cur) => cur.status === 'failed', () => ({ status_message: message }));
        continue;
      }
      vm.status = 'pending';
      vm.worker = undefined;
      update(vm, (cur) => cur.status === 'failed', (cur) => ({
        status: 'pending',
        worker: undefined,
        localName: undefined,
        restart_count: (cur.restart_count ?? 0) + 1,
        restarted_at: new Date(now).toISOString(),
        status_message: `restarting after failure: ${reason}`,
        conditions: [],
      }));
    }
    for (const uid of this.failedSince.keys()) if (!live.has(uid)) this.failedSince.delete(uid);

    // 3. Placement.
    const used = new Map<string, Record<string, number>>(workers.map((w) => [w.name, {}]));
    for (const vm of vms) {
      if (!vm.worker || vm.status === 'failed') continue;
      const u = used.get(vm.worker);
      if (!u) continue;
      for (const [k, v] of Object.entries(requirements(vm))) u[k] = (u[k] ?? 0) + v;
    }
    const profile = settings.schedulerProfile ?? 'optimize-utilization';
    const load = (w: Worker) => used.get(w.name)![RESOURCE_TART_VMS] ?? 0;
    for (const vm of vms) {
      if (vm.status !== 'pending' || vm.worker) continue;
      const need = requirements(vm);
      const reasons = new Map<string, number>();
      const why = (r: string) => reasons.set(r, (reasons.get(r) ?? 0) + 1);
      const fits: Worker[] = [];
      for (const w of workers) {
        if (!online.get(w.name)) why('is offline');
        else if (w.scheduling_paused) why('is paused');
        else if (vm.runtime && vm.runtime !== (w.runtime ?? 'tart')) why(`runs ${w.runtime ?? 'tart'}, not ${vm.runtime}`);
        else {
          const missing = Object.entries(vm.labels ?? {}).find(([k, v]) => w.labels?.[k] !== v);
          if (missing) {
            why(`lacks label ${missing[0]}=${missing[1]}`);
            continue;
          }
          const u = used.get(w.name)!;
          const short = Object.entries(need).find(([k, v]) => (w.resources?.[k] ?? 0) - (u[k] ?? 0) < v);
          if (short) {
            const [k, v] = short;
            why(`has ${Math.max(0, (w.resources?.[k] ?? 0) - (u[k] ?? 0))} of ${v} ${shortName(k)} free`);
            continue;
          }
          fits.push(w);
        }
      }
      if (fits.length === 0) {
        const message =
          workers.length === 0
            ? 'waiting for a worker: none is registered'
            : `no worker fits: ${workers.length} worker${workers.length > 1 ? 's' : ''}: ${[...reasons].map(([r, n]) => `${n} ${r}`).join(', ')}`;
        if (vm.status_message !== message) update(vm, (cur) => cur.status === 'pending' && !cur.worker, () => ({ status_message: message }));
        continue;
      }
      fits.sort((a, b) => (profile === 'distribute-load' ? load(a) - load(b) : load(b) - load(a)) || a.name.localeCompare(b.name));
      const w = fits[0];
      const u = used.get(w.name)!;
      for (const [k, v] of Object.entries(need)) u[k] = (u[k] ?? 0) + v;
      update(vm, (cur) => cur.status === 'pending' && !cur.worker, () => ({
        worker: w.name,
        scheduled_at: new Date(now).toISOString(),
        status_message: `scheduled on worker ${w.name}`,
        assignedCPU: vm.cpu,
        assignedMemory: vm.memory,
        conditions: [{ type: 'scheduled', state: 'true' }],
      }));
    }
    await Promise.all(writes);
  }
}
