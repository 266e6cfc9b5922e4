// The controller's in-memory view of the committed VMs and workers: loaded once from the store, then
// kept current from the store's commit feed (never re-read). The scheduler places from it, workers'
// sync pushes carry their VMs from it, and `GET /v1/vms` is answered from it without touching SQLite.
import type { VM, Worker } from '../api/schemas.ts';
import { requirements } from '../api/resources.ts';
import type { Change, Kinds, Store } from './store/store.ts';
import { redactVM, type VMSecrets } from './domain/vms.ts';

export { requirements };

const NO_VMS: ReadonlySet<string> = new Set();

function sameCounts(a: Record<string, number> | undefined, b: Record<string, number> | undefined): boolean {
  if (a === b) return true;
  const ka = Object.keys(a ?? {});
  return ka.length === Object.keys(b ?? {}).length && ka.every((k) => a![k] === b?.[k]);
}

export type ViewChange = { kind: 'vms'; type: Change['type']; object: VM; before?: VM } | { kind: 'workers'; type: Change['type']; object: Worker; before?: Worker };

export class ClusterView {
  /** In the store's order (creation order), as `Map` keeps insertion order and the store lists by row id. */
  readonly vms = new Map<string, VM>();
  readonly workers = new Map<string, Worker>();
  /** The JSON of each VM as each kind of reader sees it, made when first needed and dropped when the VM changes. */
  private readonly json: Record<VMSecrets, Map<string, string>> = { all: new Map(), password: new Map(), none: new Map() };
  /**
   * The whole list's bytes (7 MB for 10,000 VMs), for lists that come before the next change; held
   * weakly: the next full collection (memory.ts asks for one once the controller is quiet) frees it,
   * rather than a list served once keeping its bytes for as long as no VM changes.
   */
  private allJSON: Partial<Record<VMSecrets, WeakRef<Buffer>>> = {};
  private readonly byWorker = new Map<string, Set<string>>();
  /** What the VMs placed on each worker take (a failed VM takes nothing), kept as the VMs change. */
  readonly usage = new Map<string, Record<string, number>>();
  /** VMs waiting for a worker (pending, unplaced), in the order they started waiting; and failed VMs. */
  readonly unplaced = new Set<string>();
  readonly failed = new Set<string>();
  private readonly listeners = new Set<(change: ViewChange) => void>();
  private readonly unsubscribe: () => void;
  /** Settles when the initial snapshot is in; nothing should be read before. */
  readonly loaded: Promise<void>;
  /** The revision of the last change the view reflects (-1 until it is loaded). */
  private revision = -1;

  constructor(store: Store) {
    let snapshotRevision = -1;
    const early: Change[] = [];
    this.unsubscribe = store.subscribe((change) => {
      if (change.kind !== 'vms' && change.kind !== 'workers') return;
      if (snapshotRevision < 0) early.push(change);
      else this.apply(change);
    });
    this.loaded = (async () => {
      const [vms, workers] = await Promise.all([store.snapshot('vms'), store.snapshot('workers')]);
      // With the JSON each VM was stored as: every VM's is soon in use (its worker's syncs, lists), and
      // a restarted controller's first list and its workers' first syncs then stringify no VM (11,000: ≈ 25 ms here).
      vms.items.forEach((vm, i) => {
        this.record(vm.name, vm);
        if (vms.json) this.json.all.set(vm.name, vms.json[i]);
      });
      for (const w of workers.items) this.workers.set(w.name, w);
      snapshotRevision = Math.min(vms.revision, workers.revision);
      this.revision = snapshotRevision;
      for (const change of early) if (change.revision > snapshotRevision) this.apply(change);
      early.length = 0;
    })();
  }

  /** Changes as the view applies them, with the object before. */
  subscribe(listener: (change: ViewChange) => void): () => void {
    this.listeners.add(listener);
    return () => void this.listeners.delete(listener);
  }

  close() {
    this.unsubscribe();
    this.listeners.clear();
  }

  /** Keeps the indexes right as a VM goes from `before` to `after` (either may be absent). */
  private reindex(name: string, before: VM | undefined, after: VM | undefined) {
    const waiting = (vm?: VM) => vm?.status === 'pending' && !vm.worker;
    const failed = (vm?: VM) => vm?.status === 'failed';
    // Only a change of membership moves a VM: waiting VMs keep their place in line.
    if (waiting(before) !== waiting(after)) this.unplaced[waiting(after) ? 'add' : 'delete'](name);
    if (failed(before) !== failed(after)) this.failed[failed(after) ? 'add' : 'delete'](name);
    // Most changes (a state report) leave what the VM takes, and where, as it was.
    if (before && after && before.worker === after.worker && failed(before) === failed(after) && sameCounts(before.resources, after.resources)) return;
    for (const [vm, sign] of [[before, -1], [after, 1]] as const) {
      if (!vm?.worker || vm.status === 'failed') continue;
      let u = this.usage.get(vm.worker);
      if (!u) this.usage.set(vm.worker, (u = {}));
      const need = requirements(vm);
      for (const k in need) u[k] = (u[k] ?? 0) + sign * need[k];
    }
  }

  /** Records a VM's new version, or its deletion (`vm` undefined); returns the version before. */
  private record(name: string, vm: VM | undefined): VM | undefined {
    const before = this.vms.get(name);
    this.reindex(name, before, vm);
    if (before?.worker !== vm?.worker) {
      if (before?.worker) this.byWorker.get(before.worker)?.delete(name);
      if (vm?.worker) {
        let set = this.byWorker.get(vm.worker);
        if (!set) this.byWorker.set(vm.worker, (set = new Set()));
        set.add(name);
      }
    }
    if (vm) this.vms.set(name, vm);
    else this.vms.delete(name);
    for (const m of Object.values(this.json)) m.delete(name);
    this.allJSON = {};
    return before;
  }

  private apply(change: Change) {
    this.revision = Math.max(this.revision, change.revision);
    let event: ViewChange;
    if (change.kind === 'vms') {
      const vm = change.object as VM;
      // The JSON the store made as it stored the VM is the one with nothing hidden: kept instead of made
      // again, for a VM whose JSON was in use (kept for every VM, it would be one more copy of those never listed).
      const inUse = this.json.all.has(vm.name) || change.type === 'ADDED';
      const before = this.record(vm.name, change.type === 'DELETED' ? undefined : vm);
      if (inUse && change.type !== 'DELETED' && change.json !== undefined) this.json.all.set(vm.name, change.json);
      event = { kind: 'vms', type: change.type, object: vm, before };
    } else {
      const w = change.object as Worker;
      const before = this.workers.get(w.name);
      if (change.type === 'DELETED') this.workers.delete(w.name);
      else this.workers.set(w.name, w);
      event = { kind: 'workers', type: change.type, object: w, before };
    }
    for (const listener of this.listeners) listener(event);
  }

  private jsonOf(name: string, secrets: VMSecrets): string {
    let s = this.json[secrets].get(name);
    if (s === undefined) this.json[secrets].set(name, (s = JSON.stringify(redactVM(this.vms.get(name)!, secrets))));
    return s;
  }

  /**
   * What the store's `snapshot` gives for VMs or workers, from memory (no read of every row), once the
   * view is loaded (else undefined): the view applies each change as the store publishes it, in order.
   */
  snapshot<K extends 'vms' | 'workers'>(kind: K, filter?: { worker?: string }): { items: Kinds[K][]; revision: number } | undefined {
    if (this.revision < 0) return undefined;
    let items: (VM | Worker)[];
    if (kind === 'workers') items = [...this.workers.values()];
    else if (filter?.worker !== undefined) items = Array.from(this.byWorker.get(filter.worker) ?? [], (n) => this.vms.get(n)!);
    else items = [...this.vms.values()];
    return { items: items as Kinds[K][], revision: this.revision };
  }

  /** The names of the VMs placed on each worker (workers that were deleted included). */
  placements(): Iterable<[string, ReadonlySet<string>]> {
    return this.byWorker;
  }

  /** The names of the VMs placed on one worker. */
  placedOn(worker: string): ReadonlySet<string> {
    return this.byWorker.get(worker) ?? NO_VMS;
  }

  /** The JSON array of one worker's VMs, in the order they were placed there. */
  vmsJSON(worker: string, secrets: VMSecrets = 'all'): string {
    return '[' + Array.from(this.byWorker.get(worker) ?? [], (n) => this.jsonOf(n, secrets)).join(',') + ']';
  }

  /** The JSON array of all VMs, in the store's order, as bytes: made at most once per change, not per list. */
  allVMsJSON(secrets: VMSecrets = 'all'): Buffer {
    let bytes = this.allJSON[secrets]?.deref();
    if (!bytes) this.allJSON[secrets] = new WeakRef((bytes = jsonArray(Array.from(this.vms.keys(), (n) => this.jsonOf(n, secrets)))));
    return bytes;
  }
}

/**
 * `[a,b,…]` as bytes, each item written in place: no joined string of the whole list to encode again
 * (11,000 VMs, 7 MB: 25 ms instead of 65 here).
 */
function jsonArray(items: string[]): Buffer {
  let size = 2 + Math.max(0, items.length - 1);
  for (const s of items) size += Buffer.byteLength(s);
  const out = Buffer.allocUnsafe(size);
  let at = 0;
  out[at++] = 0x5b; // [
  for (let i = 0; i < items.length; i++) {
    if (i) out[at++] = 0x2c; // ,
    at += out.write(items[i], at);
  }
  out[at++] = 0x5d; // ]
  return out.subarray(0, at);
}
