// The scheduler's index of workers, kept as the view changes, so that a pass visits only the workers
// that changed since the last one (not all of them): the workers that could take a VM, in the
// profile's order; the workers whose watch is down (only those can be offline); and the names VMs
// are placed on that have no worker record any more (deleted workers).
import { RESOURCE_TART_VMS, type Worker } from '../api/schemas.ts';
import type { ClusterView } from './view.ts';

/** The VM slots a worker's placed VMs take now. */
const loadOf = (view: ClusterView, worker: string) => view.usage.get(worker)?.[RESOURCE_TART_VMS] ?? 0;

/** Free VM slots (a worker that counts no slots, as upstream's Vetu workers, is never full by count). */
export const freeSlots = (w: Worker, load: number) => (w.resources?.[RESOURCE_TART_VMS] === undefined ? Infinity : w.resources[RESOURCE_TART_VMS] - load);

export class WorkerOrder {
  private readonly view: ClusterView;
  private readonly isConnected: (worker: string) => boolean;
  /** Workers that can take a VM (online, not paused, a free slot), busiest first (optimize-utilization) or least busy first (distribute-load), then by name. */
  private readonly list: Worker[] = [];
  /** Each listed worker's load when it was put in the list (its place in the order). */
  private readonly listedLoad = new Map<string, number>();
  /** The listed workers holding each image (locality: a pass looks among these few, not among all the workers as loaded as its pick). */
  private readonly holders = new Map<string, Set<Worker>>();
  /** Workers to place again in the list at the next refresh. */
  private readonly dirty = new Set<string>();
  /** Registered workers whose watch is not connected: whether they are online depends on the time. */
  private readonly down = new Set<string>();
  /** Those of them found offline: a pass looks at these for VMs to fail, until they reconnect or go. */
  private readonly offline = new Set<string>();
  /**
   * The earliest moment one of the others goes offline (time alone never puts one online): a pass
   * looks at them all only once it has come, not at every pass (after a restart all the workers are
   * down, and each of the passes made while they reconnect would otherwise look at all of them twice).
   */
  private downDue = -Infinity;
  /** Names VMs may be placed on that have no worker record. */
  private readonly gone = new Set<string>();
  /** The profile the list is ordered for; undefined until the first refresh (which visits every worker once). */
  private distribute?: boolean;
  private readonly unsubscribe: () => void;
  /** Counts the refreshes that changed anything a VM's fit depends on (a worker's record, usage, connection or time offline). */
  version = 0;

  constructor(view: ClusterView, isConnected: (worker: string) => boolean) {
    this.view = view;
    this.isConnected = isConnected;
    this.unsubscribe = view.subscribe((change) => {
      if (change.kind === 'workers') {
        const name = change.object.name;
        this.dirty.add(name);
        if (change.type === 'DELETED') {
          this.down.delete(name);
          this.offline.delete(name);
          this.gone.add(name);
        } else {
          this.gone.delete(name);
          if (!isConnected(name)) this.down.add(name);
        }
        return;
      }
      // A VM's placement or status changed its workers' usage.
      const { object: vm, before } = change;
      if (before?.worker) this.dirty.add(before.worker);
      if (vm.worker) {
        this.dirty.add(vm.worker);
        if (!view.workers.has(vm.worker)) this.gone.add(vm.worker);
      }
    });
  }

  close() {
    this.unsubscribe();
  }

  /** A worker's watch connected or disconnected. */
  connection(worker: string) {
    if (!this.view.workers.has(worker)) return;
    this.dirty.add(worker);
    if (this.isConnected(worker)) {
      this.down.delete(worker);
      this.offline.delete(worker);
    } else this.down.add(worker);
  }

  /** Workers found offline (watch down, past their timeout) or deleted that may still hold VMs, for the pass to fail those VMs. */
  *suspects(): Iterable<string> {
    for (const name of this.gone) {
      if (this.view.placedOn(name).size === 0) this.gone.delete(name);
      else yield name;
    }
    yield* this.offline;
  }

  /**
   * Brings the list up to date for the pass at `now`; `offlineAt` is when a worker whose watch is down
   * goes offline (by the scheduler's timeout; it is online until then).
   */
  refresh(distribute: boolean, now: number, offlineAt: (w: Worker) => number) {
    const view = this.view;
    if (distribute !== this.distribute) {
      // First pass, or the profile changed: every worker once.
      this.distribute = distribute;
      this.list.length = 0;
      this.listedLoad.clear();
      this.holders.clear();
      this.down.clear();
      this.offline.clear();
      for (const name of view.workers.keys()) {
        this.dirty.add(name);
        if (!this.isConnected(name)) this.down.add(name);
      }
      for (const [name] of view.placements()) if (!view.workers.has(name)) this.gone.add(name);
    }
    if (now > this.downDue) {
      this.downDue = Infinity;
      for (const name of this.down) this.dirty.add(name);
    }
    if (this.dirty.size) this.version++;
    for (const name of this.dirty) {
      const listed = this.listedLoad.get(name);
      if (listed !== undefined) {
        const [old] = this.list.splice(this.indexOf(listed, name), 1);
        this.listedLoad.delete(name);
        for (const image of old.images ?? []) {
          const set = this.holders.get(image)!;
          set.delete(old);
          if (set.size === 0) this.holders.delete(image);
        }
      }
      const w = view.workers.get(name);
      if (w && this.down.has(name)) {
        const at = offlineAt(w);
        if (now > at) this.offline.add(name);
        else {
          this.offline.delete(name);
          this.downDue = Math.min(this.downDue, at);
        }
      }
      const load = loadOf(view, name);
      if (!w || w.scheduling_paused || freeSlots(w, load) <= 0 || this.offline.has(name)) continue;
      this.list.splice(this.indexOf(load, name), 0, w);
      this.listedLoad.set(name, load);
      for (const image of w.images ?? []) {
        let set = this.holders.get(image);
        if (!set) this.holders.set(image, (set = new Set()));
        set.add(w);
      }
    }
    this.dirty.clear();
  }

  /** The workers that can take a VM, in order (a copy the pass may reorder as it places). */
  candidates(): Worker[] {
    return this.list.slice();
  }

  /** The listed workers that hold `image`. */
  holding(image: string | undefined): Iterable<Worker> {
    return (image !== undefined && this.holders.get(image)) || [];
  }

  /** Where a worker of this load and name is, or goes, in the list (binary search). */
  private indexOf(load: number, name: string): number {
    let lo = 0;
    let hi = this.list.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const m = this.list[mid];
      const ml = this.listedLoad.get(m.name)!;
      const before = ml !== load ? (this.distribute ? ml < load : ml > load) : m.name < name;
      if (before) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
