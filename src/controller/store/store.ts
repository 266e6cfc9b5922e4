// The controller's storage, behind one small interface: the API layer only sees this, so another
// backend (PostgreSQL, say) can be added without touching it. test/store-contract.test.ts is the
// contract any implementation must pass.
//
// What a store guarantees:
// - Durability: a write's promise resolves only once its commit is durable (a rejected one changed
//   nothing). Several writes may share one commit (group commit); each is still all or nothing.
// - Reads see committed data only: never a write whose commit is still to come (nor one that may yet
//   fail), and a read is answered only once what it returns is durable and published.
// - Multi-object writes go through `transaction`: its writes commit together or not at all.
// - The change feed: every committed change of an object (ADDED, MODIFIED, DELETED) is published
//   once to every subscriber, in commit order, before the promise of the write that made it
//   resolves. A write that changes nothing (an update that returns the same object) publishes nothing.
// - Revisions: each change has a revision, one more than the change committed before it, of any
//   kind, across restarts: the revision is stored with the data, in the same commit. A snapshot gives
//   the revision of the last change it reflects, so subscribing first, then taking a snapshot, then
//   adding the published changes with a greater revision gives every change once (no gap, no
//   duplicate). Events (appendEvents), releases and cluster settings are not in the feed.
// - The event feed: every committed append of a VM's events is published once to every event
//   subscriber, with each event's id (its cursor: ascending per VM), in commit order, under the same
//   durability rule. Subscribing, then listing events, then adding the published ones with a greater
//   id gives every event once.
import type { ClusterSettings, Event, ServiceAccount, StoredRegistry, VM, Worker, WatchEventType } from '../../api/schemas.ts';

export interface Kinds {
  vms: VM;
  workers: Worker;
  serviceAccounts: ServiceAccount;
  /** Registry credentials, named by host (passwords in clear: never answered by the API). */
  registries: StoredRegistry;
}
export type Kind = keyof Kinds;

export interface Change<K extends Kind = Kind> {
  kind: K;
  type: WatchEventType;
  object: Kinds[K];
  /** The change's place in the feed: one more than the change committed before it (see above). */
  revision: number;
  /** `JSON.stringify(object)`, when the store made it (as it stored the object): readers that show the whole object reuse it. */
  json?: string;
}

export class NotFoundError extends Error {}
export class ConflictError extends Error {}
/** The store can no longer promise that a write is on disk (an fsync failed): every call fails with it until a restart. */
export class StoreFailedError extends Error {}

/** Events appended to one VM in one write, with their ids (`listEvents` cursors), oldest first. */
export interface EventAppend {
  vmUID: string;
  events: { id: number; event: Event }[];
}

export interface EventPage {
  events: Event[];
  /** Each event's id, as `events` (a cursor: asking in ascending order from it gives the events after that one). */
  ids: number[];
  nextCursor?: string;
  /** The cursor just past the newest event of this page (to ask, in ascending order, for what comes after). */
  newestCursor?: string;
  /** How many of the VM's oldest events retention dropped so far, and when it last did (ms since the epoch). */
  dropped: number;
  droppedAt?: number;
}

export interface Store {
  get<K extends Kind>(kind: K, name: string): Promise<Kinds[K] | undefined>;
  list<K extends Kind>(kind: K, filter?: { worker?: string }): Promise<Kinds[K][]>;
  /**
   * `list` plus the revision it reflects, so a watch can add exactly the changes after it; `json`, where
   * the store has it at hand: each item's JSON as stored (what JSON.stringify makes of it).
   */
  snapshot<K extends Kind>(kind: K, filter?: { worker?: string }): Promise<{ items: Kinds[K][]; json?: string[]; revision: number }>;
  /** Number of VMs per status (for metrics). */
  countVMsByStatus(): Promise<Record<string, number>>;
  /** Throws ConflictError when the name is taken. */
  create<K extends Kind>(kind: K, object: Kinds[K]): Promise<Kinds[K]>;
  /**
   * Read-modify-write in one transaction: `mutate` gets the current object and returns the new one
   * (or the same reference for no change, which writes nothing). `mutate` may throw to abort.
   * Throws NotFoundError.
   */
  update<K extends Kind>(kind: K, name: string, mutate: (current: Kinds[K]) => Kinds[K]): Promise<Kinds[K]>;
  /** Create or replace. */
  put<K extends Kind>(kind: K, object: Kinds[K]): Promise<Kinds[K]>;
  /** Returns the deleted object; throws NotFoundError. Deleting a VM deletes its events. */
  delete<K extends Kind>(kind: K, name: string): Promise<Kinds[K]>;

  /** Records that `worker` may remove its copy of VM `uid` (it is no longer the VM's worker). */
  release(worker: string, uid: string): Promise<void>;
  /**
   * Of `uids`, those that left `worker`: deleted or moved while assigned to it (the store records this
   * in the same commit), or released by an admin. Kept for 30 days.
   */
  releasedFrom(worker: string, uids: string[]): Promise<Set<string>>;

  /** Appends; the VM's oldest events beyond its retention (count and bytes) are dropped in the same commit. */
  appendEvents(vmUID: string, events: Event[]): Promise<void>;
  listEvents(vmUID: string, opts: { limit: number; order: 'asc' | 'desc'; cursor?: string }): Promise<EventPage>;

  getClusterSettings(): Promise<ClusterSettings>;
  putClusterSettings(settings: ClusterSettings): Promise<ClusterSettings>;

  /**
   * Several writes that commit together or not at all (a state report and its events; a
   * read-then-write registration). `fn` runs synchronously, at once, against the store as this
   * transaction sees it (its own writes included, nobody else's in between): it must not await
   * (it gets no promises). When it throws, nothing it wrote is kept or published and the promise
   * rejects with its error; otherwise the promise resolves with its result once all is committed.
   * The store's own write methods may not be called from inside `fn` (they would not be part of it:
   * they are refused, and the transaction fails); its own reads there give the committed state, not
   * the transaction's (use `tx.get`).
   */
  transaction<T>(fn: (tx: Transaction) => T): Promise<T>;

  /** Subscribe to committed changes (see above); returns the unsubscribe function. */
  subscribe(listener: (change: Change) => void): () => void;
  /** Subscribe to committed event appends (see above); returns the unsubscribe function. */
  subscribeEvents(listener: (append: EventAppend) => void): () => void;
  close(): void;
}

/** The writes (and reads) of one transaction: as the Store's, but synchronous and all in one commit. */
export interface Transaction {
  get<K extends Kind>(kind: K, name: string): Kinds[K] | undefined;
  /** Throws ConflictError when the name is taken. */
  create<K extends Kind>(kind: K, object: Kinds[K]): Kinds[K];
  /** As Store.update; throws NotFoundError. */
  update<K extends Kind>(kind: K, name: string, mutate: (current: Kinds[K]) => Kinds[K]): Kinds[K];
  put<K extends Kind>(kind: K, object: Kinds[K]): Kinds[K];
  /** Throws NotFoundError. */
  delete<K extends Kind>(kind: K, name: string): Kinds[K];
  release(worker: string, uid: string): void;
  /** As Store.releasedFrom, releases made in this transaction included. */
  releasedFrom(worker: string, uids: string[]): Set<string>;
  appendEvents(vmUID: string, events: Event[]): void;
}
