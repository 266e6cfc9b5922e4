// Registry credentials to workers: the whole list in one registriesAction, to each connected worker
// that declared it understands one, when its watch connects and whenever the credentials change.
// Kept in memory from the store's commit feed (never re-read). Upstream's workers declare nothing,
// so they never get the instruction.
import type { Logger } from 'pino';
import type { StoredRegistry } from '../api/schemas.ts';
import { REGISTRIES_ACTION } from '../api/worker-protocol.ts';
import type { Store } from './store/store.ts';
import type { ClusterView } from './view.ts';
import type { WorkerChannels } from './rpc.ts';
import { credentialsOf } from './domain/registries.ts';

export class RegistryDelivery {
  private readonly registries = new Map<string, StoredRegistry>();
  private readonly view: ClusterView;
  private readonly channels: WorkerChannels;
  private readonly logger: Logger;
  private readonly unsubscribe: () => void;
  private frameCache?: string;
  private pending = false;
  /** Settles when the stored credentials are in; no frame before. */
  readonly loaded: Promise<void>;

  constructor(store: Store, view: ClusterView, channels: WorkerChannels, logger: Logger) {
    this.view = view;
    this.channels = channels;
    this.logger = logger;
    let snapshotRevision = -1;
    const early: { revision: number; type: string; object: StoredRegistry }[] = [];
    this.unsubscribe = store.subscribe((change) => {
      if (change.kind !== 'registries') return;
      const c = { revision: change.revision, type: change.type, object: change.object as StoredRegistry };
      if (snapshotRevision < 0) early.push(c);
      else this.apply(c.type, c.object);
    });
    this.loaded = (async () => {
      const snapshot = await store.snapshot('registries');
      for (const r of snapshot.items) this.registries.set(r.name, r);
      snapshotRevision = snapshot.revision;
      for (const c of early) if (c.revision > snapshotRevision) this.apply(c.type, c.object);
      early.length = 0;
    })();
  }

  /** Does the worker's record say it understands registriesAction? */
  understands(worker: string): boolean {
    return this.view.workers.get(worker)?.capabilities?.includes(REGISTRIES_ACTION) ?? false;
  }

  /** The frames a worker gets first when its watch connects (none for a worker that does not understand them). */
  greeting(worker: string): string[] {
    return this.understands(worker) ? [this.frame()] : [];
  }

  /** The registriesAction frame with every registry's credentials. */
  private frame(): string {
    return (this.frameCache ??= JSON.stringify({ registriesAction: { registries: [...this.registries.values()].map(credentialsOf) } }));
  }

  private apply(type: string, r: StoredRegistry) {
    if (type === 'DELETED') this.registries.delete(r.name);
    else this.registries.set(r.name, r);
    this.frameCache = undefined;
    // The changes of one turn (one commit may hold several) go out as one frame per worker.
    if (this.pending) return;
    this.pending = true;
    queueMicrotask(() => {
      this.pending = false;
      this.broadcast();
    });
  }

  /** Sends the list to every connected worker that understands it. */
  broadcast() {
    let sent = 0;
    for (const worker of [...this.channels.connected()]) if (this.understands(worker) && this.channels.send(worker, this.frame())) sent++;
    // Hosts and counts only: the credentials themselves are never logged.
    this.logger.info({ registries: [...this.registries.keys()], workers: sent }, 'registry credentials sent to the workers that take them');
  }

  /** A worker's record changed: one that now declares registriesAction while connected gets the list. */
  workerChanged(worker: string, before: readonly string[] | undefined, after: readonly string[] | undefined) {
    const had = before?.includes(REGISTRIES_ACTION) ?? false;
    const has = after?.includes(REGISTRIES_ACTION) ?? false;
    if (!had && has && this.channels.isConnected(worker)) this.channels.send(worker, this.frame());
  }

  close() {
    this.unsubscribe();
  }
}
