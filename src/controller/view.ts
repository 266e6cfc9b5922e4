// The controller's in-memory view of the committed VMs and workers: loaded once from the store, then
// kept current from the store's commit feed (never re-read). The scheduler places from it, workers'
// sync pushes carry their VMs from it, and `GET /v1/vms` is answered from it without touching SQLite.
import type { VM, Worker } from '../api/schemas.ts';
import type { Change, Store } from './store/store.ts';

export type ViewChange = { kind: 'vms'; type: Change['type']; object: VM; before?: VM } | { kind: 'workers'; type: Change['type']; object: Worker; before?: Worker };

export class ClusterView {
  /** In the store's order (creation order), as `Map` keeps insertion order and the store lists by row id. */
  readonly vms = new Map<string, VM>();
  readonly workers = new Map<string, Worker>();
  /** The JSON of each VM, made when first needed and dropped when the VM changes. */
  private readonly json = new Map<string, string>();
  private readonly byWorker = new Map<string, Set<string>>();
  private readonly listeners = new Set<(change: ViewChange) => void>();
  private readonly unsubscribe: () => void;
  /** Settles when the initial snapshot is in; nothing should be read before. */
  readonly loaded: Promise<void>;

  constructor(store: Store) {
    let snapshotRevision = -1;
    const early: Change[] = [];
    this.unsubscribe = store.subscribe((change) => {
      if (change.kind === 'serviceAccounts') return;
      if (snapshotRevision < 0) early.push(change);
      else this.apply(change);
    });
    this.loaded = (async () => {
      const [vms, workers] = await Promise.all([store.snapshot('vms'), store.snapshot('workers')]);
      for (const vm of vms.items) this.setVM(vm);
      for (const w of workers.items) this.workers.set(w.name, w);
      snapshotRevision = Math.min(vms.revision, workers.revision);
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

  private setVM(vm: VM) {
    const before = this.vms.get(vm.name);
    if (before?.worker !== vm.worker) {
      if (before?.worker) this.byWorker.get(before.worker)?.delete(vm.name);
      if (vm.worker) {
        let set = this.byWorker.get(vm.worker);
        if (!set) this.byWorker.set(vm.worker, (set = new Set()));
        set.add(vm.name);
      }
    }
    this.vms.set(vm.name, vm);
    this.json.delete(vm.name);
    return before;
  }

  private apply(change: Change) {
    let event: ViewChange;
    if (change.kind === 'vms') {
      const vm = change.object as VM;
      let before: VM | undefined;
      if (change.type === 'DELETED') {
        before = this.vms.get(vm.name);
        if (before?.worker) this.byWorker.get(before.worker)?.delete(vm.name);
        this.vms.delete(vm.name);
        this.json.delete(vm.name);
      } else before = this.setVM(vm);
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

  private jsonOf(name: string): string {
    let s = this.json.get(name);
    if (s === undefined) this.json.set(name, (s = JSON.stringify(this.vms.get(name))));
    return s;
  }

  /** The JSON array of all VMs (in the store's order), or of one worker's (in the order they were placed there). */
  vmsJSON(worker?: string): string {
    const names = worker === undefined ? this.vms.keys() : (this.byWorker.get(worker) ?? []);
    return '[' + Array.from(names, (n) => this.jsonOf(n)).join(',') + ']';
  }
}
