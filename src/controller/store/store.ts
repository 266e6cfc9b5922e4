// The controller's storage, behind one small interface: the API layer only sees this, so another
// backend (PostgreSQL, say) can be added without touching it. Every mutation is durable when its
// promise resolves, and every committed change is published to watchers from that same commit.
import type { ClusterSettings, Event, ServiceAccount, VM, Worker, WatchEventType } from '../../api/schemas.ts';

export interface Kinds {
  vms: VM;
  workers: Worker;
  serviceAccounts: ServiceAccount;
}
export type Kind = keyof Kinds;

export interface Change<K extends Kind = Kind> {
  kind: K;
  type: WatchEventType;
  object: Kinds[K];
  /** Monotonic commit number: changes are delivered in this order. */
  revision: number;
}

export class NotFoundError extends Error {}
export class ConflictError extends Error {}

export interface EventPage {
  events: Event[];
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
  /** `list` plus the revision it reflects, so a watch can add exactly the changes after it. */
  snapshot<K extends Kind>(kind: K, filter?: { worker?: string }): Promise<{ items: Kinds[K][]; revision: number }>;
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

  /** Subscribe to committed changes; returns the unsubscribe function. */
  subscribe(listener: (change: Change) => void): () => void;
  close(): void;
}
