// The embedded store: one SQLite file (node:sqlite, no native addon) in the controller's data dir.
// WAL mode; a write's promise resolves, and its changes are published to subscribers (from the objects
// it wrote), only once its commit is on disk. The commit's fsync runs off the event loop (see `flush`).
//
// Two connections to the file: writes (and the reads inside a write) go through `db`, whose
// transaction stays open for a batch of writes (group commit, see `tx`); every other read goes
// through `reader`, which in WAL mode sees the last commit and never the open batch. The revision of
// the last committed change is kept in the settings table (key "revision"), in each batch's commit.
import { DatabaseSync, type StatementSync } from 'node:sqlite';
import { chmodSync, closeSync, existsSync, fstatSync, fsync, fsyncSync, mkdirSync, openSync } from 'node:fs';
import { dirname } from 'node:path';
import type { ClusterSettings, Event, WatchEventType } from '../../api/schemas.ts';
import { ConflictError, NotFoundError, StoreFailedError, type Change, type EventAppend, type EventPage, type Kind, type Kinds, type Store, type Transaction } from './store.ts';
import { DEFAULT_LIMITS, type Limits } from '../limits.ts';
import { fileSchemaVersion, migrate, newerError, SCHEMA_VERSION } from './schema.ts';
import { Checkpointer, CHECKPOINT_WAL_BYTES } from './checkpointer.ts';

export type EventLimits = Pick<Limits, 'eventsPerVM' | 'eventBytesPerVM' | 'eventPageBytes'>;

interface Row {
  body: string;
}

/** Releases older than this are forgotten (a worker away for longer keeps such VMs as orphans). */
const RELEASE_RETENTION_MS = 30 * 24 * 3600_000;

interface Batch {
  changes: Change[];
  appends: EventAppend[];
  waiters: { resolve: () => void; reject: (err: Error) => void }[];
}

export class SQLiteStore implements Store {
  /** The writing connection: its transaction, when open, is the batch not yet committed. */
  private readonly db: DatabaseSync;
  /** The reading connection: sees committed data only (WAL), never the open batch. */
  private readonly reader: DatabaseSync;
  private readonly listeners = new Set<(change: Change) => void>();
  private readonly eventListeners = new Set<(append: EventAppend) => void>();
  /** While a mutation runs: its event appends, published with its changes once durable (dropped if it fails). */
  private appends?: EventAppend[];
  /** The revision of the last change made: committed, or in the open batch (then more than `committed`). */
  private revision = 0;
  /** The revision of the last committed change (as stored in settings). */
  private committed = 0;
  private batch?: Batch;
  /** The WAL, open for the fsync that makes commits durable (see `flush`). */
  private readonly walFd: number;
  /** Commits made (COMMIT returned: written to the OS, visible to the reading connection), and made durable (fsynced). */
  private commits = 0;
  private durableCommits = 0;
  /** Committed batches waiting for their fsync, oldest first: their changes are published and their promises resolved after it. */
  private readonly syncing: (Batch & { commit: number })[] = [];
  /** Reads whose answer may show a commit not yet durable: answered once commit `commit` is. */
  private readonly heldReads: { commit: number; resolve: () => void; reject: (err: Error) => void }[] = [];
  private fsyncInFlight = false;
  /** Set when an fsync of the WAL failed: nothing after it can be promised durable, so the store refuses everything. */
  private failed?: Error;
  private closed = false;
  /** Runs the WAL checkpoints in a thread (checkpointer.ts); the writing connection's own are off. */
  private readonly checkpointer: Checkpointer;
  /** `commits` when the last checkpoint started: a checkpoint is started only when there is something new to copy. */
  private checkpointedAt = 0;
  /** True while a mutation runs (inside its savepoint): the store's own write methods are refused then. */
  private mutating = false;
  /** The error of a store write refused during the running mutation. */
  private misuse?: Error;
  /** Statements of the writing connection. */
  private readonly stmt: Record<string, StatementSync>;
  /** Statements of the reading connection. */
  private readonly rstmt: Record<string, StatementSync>;
  private readonly eventLimits: EventLimits;
  /** Count and bytes of each VM's stored events, read from the table the first time a VM gets events. */
  private readonly eventStats = new Map<string, { count: number; bytes: number }>();
  /** While a mutation runs: the event stats it changed, as they were before (undefined: not known), to put back if it fails. */
  private statsBefore?: Map<string, { count: number; bytes: number } | undefined>;
  /**
   * The cluster settings as durably committed: read on every create and scheduler pass, so from
   * memory (this connection is their only writer), and replaced only once a new version is on disk.
   */
  private settings: ClusterSettings;
  /** What opening did to the schema (schema.ts): `from` < `to` when it migrated. */
  readonly migration: { from: number; to: number; unmarked: boolean };

  constructor(path: string, eventLimits: EventLimits = DEFAULT_LIMITS) {
    this.eventLimits = eventLimits;
    // A database newer than this release is refused before anything is created, opened or changed.
    const onFile = fileSchemaVersion(path);
    if (onFile !== undefined && onFile > SCHEMA_VERSION) throw newerError(onFile);
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    // The database holds every token and VM password: owner-only, whatever the umask or the data
    // dir's mode. SQLite gives its -wal and -shm files the mode of the database file.
    closeSync(openSync(path, 'a', 0o600));
    for (const f of [path, `${path}-wal`, `${path}-shm`]) if (existsSync(f)) chmodSync(f, 0o600);
    this.db = new DatabaseSync(path);
    // Opening (migrations, the clean-up below) commits with synchronous=FULL; the batches, see `flush`.
    this.db.exec('PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;');
    try {
      this.migration = migrate(this.db);
    } catch (err) {
      this.db.close();
      throw err;
    }
    this.db.prepare('DELETE FROM releases WHERE at < ?').run(Date.now() - RELEASE_RETENTION_MS);
    // The WAL exists from the first read of a WAL database on, and lives (the same file: a TRUNCATE
    // checkpoint truncates it, a restart rewrites it from the start) until the last connection closes,
    // which is `close` here (sqlite.org/wal.html "Persistence of WAL mode", "Avoiding Excessively Large WAL Files").
    this.walFd = openSync(`${path}-wal`, 'r');
    // journal_size_limit: a WAL started over is truncated to this at its first commit, so its size
    // says how much of it is in use (sqlite.org/pragma.html#pragma_journal_size_limit).
    this.db.exec(`PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = ${CHECKPOINT_WAL_BYTES};`);
    this.checkpointer = new Checkpointer(path);
    this.reader = new DatabaseSync(path, { readOnly: true });
    this.reader.exec('PRAGMA busy_timeout = 5000;');
    const r = (sql: string) => this.reader.prepare(sql);
    this.rstmt = {
      get: r('SELECT body FROM objects WHERE kind = ? AND name = ?'),
      list: r('SELECT body FROM objects WHERE kind = ? ORDER BY id'),
      listByWorker: r('SELECT body FROM objects WHERE kind = ? AND worker = ? ORDER BY id'),
      countByStatus: r(`SELECT status, count(*) AS n FROM objects WHERE kind = 'vms' GROUP BY status`),
      cut: r('SELECT dropped, at FROM event_cuts WHERE vm_uid = ?'),
      eventsAsc: r('SELECT id, body FROM events WHERE vm_uid = ? AND id > ? ORDER BY id ASC LIMIT ?'),
      eventsDesc: r('SELECT id, body FROM events WHERE vm_uid = ? AND id < ? ORDER BY id DESC LIMIT ?'),
      released: r('SELECT 1 FROM releases WHERE worker = ? AND uid = ?'),
      getSetting: r('SELECT body FROM settings WHERE key = ?'),
    };
    const p = (sql: string) => this.db.prepare(sql);
    this.stmt = {
      get: p('SELECT body FROM objects WHERE kind = ? AND name = ?'),
      insert: p('INSERT INTO objects (kind, name, worker, status, body) VALUES (?, ?, ?, ?, ?)'),
      update: p('UPDATE objects SET worker = ?, status = ?, body = ? WHERE kind = ? AND name = ?'),
      delete: p('DELETE FROM objects WHERE kind = ? AND name = ?'),
      insertEvent: p('INSERT INTO events (vm_uid, body) VALUES (?, ?)'),
      deleteEvents: p('DELETE FROM events WHERE vm_uid = ?'),
      deleteCut: p('DELETE FROM event_cuts WHERE vm_uid = ?'),
      eventStats: p('SELECT count(*) AS count, coalesce(sum(length(CAST(body AS BLOB))), 0) AS bytes FROM events WHERE vm_uid = ?'),
      oldestEvents: p('SELECT id, length(CAST(body AS BLOB)) AS size FROM events WHERE vm_uid = ? ORDER BY id ASC'),
      dropEvents: p('DELETE FROM events WHERE vm_uid = ? AND id <= ?'),
      addCut: p('INSERT INTO event_cuts (vm_uid, dropped, at) VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET dropped = dropped + excluded.dropped, at = excluded.at'),
      release: p('INSERT INTO releases (worker, uid, at) VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET at = excluded.at'),
      released: p('SELECT 1 FROM releases WHERE worker = ? AND uid = ?'),
      putSetting: p('INSERT INTO settings (key, body) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET body = excluded.body'),
      // Each mutation's savepoint, prepared once (exec compiles its SQL on every call).
      savepoint: p('SAVEPOINT mutation'),
      releaseSavepoint: p('RELEASE mutation'),
      rollbackToSavepoint: p('ROLLBACK TO mutation'),
    };
    this.revision = this.committed = this.storedRevision();
    const settings = this.rstmt.getSetting.get('cluster') as Row | undefined;
    this.settings = settings ? (JSON.parse(settings.body) as ClusterSettings) : {};
  }

  /** The revision of the last committed change, as stored (0 in a database that has none yet). */
  private storedRevision(): number {
    const row = this.rstmt.getSetting.get('revision') as Row | undefined;
    return row ? (JSON.parse(row.body) as number) : 0;
  }

  /** An object as committed. */
  private read<K extends Kind>(kind: K, name: string): Kinds[K] | undefined {
    const row = this.rstmt.get.get(kind, name) as Row | undefined;
    return row ? (JSON.parse(row.body) as Kinds[K]) : undefined;
  }

  /** An object as the open batch has it (inside a mutation). */
  private readTx<K extends Kind>(kind: K, name: string): Kinds[K] | undefined {
    const row = this.stmt.get.get(kind, name) as Row | undefined;
    return row ? (JSON.parse(row.body) as Kinds[K]) : undefined;
  }

  private rowsSync(kind: Kind, filter?: { worker?: string }): Row[] {
    return (filter?.worker !== undefined ? this.rstmt.listByWorker.all(kind, filter.worker) : this.rstmt.list.all(kind)) as unknown as Row[];
  }

  private listSync<K extends Kind>(kind: K, filter?: { worker?: string }): Kinds[K][] {
    return this.rowsSync(kind, filter).map((r) => JSON.parse(r.body) as Kinds[K]);
  }

  /**
   * Group commit: every mutation runs at once inside the batch's open transaction (in its own
   * savepoint, so a failing one leaves nothing behind), and the batch commits, with one fsync, once
   * this event-loop turn's I/O is handled. A mutation's promise resolves only after that commit, so
   * an acknowledged change is on disk; its changes are published right after it, in commit order.
   * Revisions are given as the changes are made (and given back when their mutation fails); the
   * batch's last one is written with it. Other reads use the reading connection and do not see the
   * batch until it is committed.
   */
  private tx<T>(fn: (changes: Change[]) => T): Promise<T> {
    if (this.mutating) {
      // Not part of the running mutation: refused, and that mutation fails with this error too.
      this.misuse ??= new Error('a store write was called inside a transaction: use the transaction\'s own methods');
      return Promise.reject(this.misuse);
    }
    if (this.failed) return Promise.reject(this.failed);
    if (!this.batch) {
      this.db.exec('BEGIN IMMEDIATE');
      this.batch = { changes: [], appends: [], waiters: [] };
      setImmediate(() => this.flush());
    }
    const changes: Change[] = [];
    const revision = this.revision;
    let result: T;
    this.stmt.savepoint.run();
    this.mutating = true;
    this.statsBefore = new Map();
    const appends: EventAppend[] = (this.appends = []);
    try {
      result = fn(changes);
      if (result instanceof Promise) result.catch(() => {}); // its outcome is not awaited: the mutation fails instead
      if (this.misuse) throw this.misuse;
      if (result instanceof Promise) throw new TypeError('a transaction runs synchronously: its function must not be async');
      this.stmt.releaseSavepoint.run();
    } catch (err) {
      this.stmt.rollbackToSavepoint.run();
      this.stmt.releaseSavepoint.run();
      this.revision = revision;
      for (const [uid, stats] of this.statsBefore) {
        if (stats) this.eventStats.set(uid, stats);
        else this.eventStats.delete(uid);
      }
      return Promise.reject(err);
    } finally {
      this.mutating = false;
      this.misuse = undefined;
      this.statsBefore = undefined;
      this.appends = undefined;
    }
    const batch = this.batch;
    batch.changes.push(...changes);
    batch.appends.push(...appends);
    return new Promise<T>((resolve, reject) => batch.waiters.push({ resolve: () => resolve(result), reject }));
  }

  /**
   * Commits the open batch. The writing connection runs with synchronous=NORMAL: in WAL mode its
   * COMMIT appends the batch's frames to the WAL with write() and does not fsync
   * (sqlite.org/pragma.html#pragma_synchronous); `sync` then fsyncs the WAL from libuv's thread pool,
   * and only after that are the batch's changes published and its promises resolved. WAL frames are
   * appended in commit order and recovery replays only an unbroken prefix of them (each frame's
   * checksum covers all frames before it: sqlite.org/fileformat.html#wal), so one fsync makes every
   * earlier commit durable too: batches committed while an fsync is in flight share the next one.
   * NORMAL, not OFF: with NORMAL SQLite still fsyncs the WAL header when it starts reusing the WAL
   * after a checkpoint, and both the WAL and the database around each checkpoint (same page); without
   * the header sync a power cut could mix old and new frames (sqlite.org/src/info/ff5be73dee).
   */
  private flush() {
    const batch = this.batch;
    if (!batch) return;
    this.batch = undefined;
    try {
      if (this.revision !== this.committed) this.stmt.putSetting.run('revision', JSON.stringify(this.revision));
      this.db.exec('COMMIT');
    } catch (err) {
      if (this.db.isTransaction) this.db.exec('ROLLBACK');
      this.revision = this.committed;
      this.eventStats.clear(); // they may count events that were rolled back
      for (const w of batch.waiters) w.reject(err as Error);
      return;
    }
    this.committed = this.revision;
    this.syncing.push({ ...batch, commit: ++this.commits });
    this.sync();
  }

  /** Starts an fsync of the WAL for the commits not yet durable, unless one is in flight (it starts the next when done). */
  private sync() {
    if (this.fsyncInFlight || this.failed || this.closed || this.durableCommits === this.commits) return;
    const upTo = this.commits;
    this.fsyncInFlight = true;
    fsync(this.walFd, (fsyncErr) => {
      this.fsyncInFlight = false;
      if (this.closed) {
        closeSync(this.walFd); // left open for this fsync by `close`
        return;
      }
      // Written to a WAL that is no longer the database's (it cannot happen while this connection is
      // open, see the constructor): not durable, and said so.
      const err = fsyncErr ?? (fstatSync(this.walFd).nlink === 0 ? new Error('the WAL file was removed while the store had it open') : undefined);
      if (err) this.fail(err);
      else this.durable(upTo);
      this.sync();
    });
  }

  /** Commits up to `upTo` are on disk: their changes are published (in commit order), then their writes and the reads that saw them are answered. */
  private durable(upTo: number) {
    if (upTo <= this.durableCommits) return;
    this.durableCommits = upTo;
    while (this.syncing.length && this.syncing[0].commit <= upTo) {
      const batch = this.syncing.shift()!;
      for (const change of batch.changes) {
        for (const listener of this.listeners) {
          try {
            listener(change);
          } catch {
            // a failing watcher must not affect the writer or other watchers
          }
        }
      }
      for (const append of batch.appends) {
        for (const listener of this.eventListeners) {
          try {
            listener(append);
          } catch {
            // as above
          }
        }
      }
      for (const w of batch.waiters) w.resolve();
    }
    while (this.heldReads.length && this.heldReads[0].commit <= upTo) this.heldReads.shift()!.resolve();
    this.checkpoint();
  }

  /**
   * Starts a checkpoint in the thread when the WAL in use has grown past CHECKPOINT_WAL_BYTES and
   * something was committed since the last one. The writer starts the WAL over at its next commit
   * once a checkpoint has copied all of it (sqlite.org/wal.html#ckpt); when commits came in during
   * the checkpoint, the next one copies those. If the thread is gone, SQLite's automatic checkpoints
   * (in the commit, on the event loop) take over.
   */
  private checkpoint() {
    if (this.closed || this.checkpointer.busy || this.commits === this.checkpointedAt) return;
    if (fstatSync(this.walFd).size <= CHECKPOINT_WAL_BYTES) return;
    this.checkpointedAt = this.commits;
    this.checkpointer.checkpoint().then(
      () => this.checkpoint(),
      () => {
        if (!this.closed && this.db.isOpen) this.db.exec('PRAGMA wal_autocheckpoint = 1000');
      },
    );
  }

  /**
   * An fsync failed: what it was to make durable may or may not be on disk, and after a failed fsync
   * the kernel may have dropped the dirty pages, so a later fsync that succeeds proves nothing. Every
   * waiting and later call fails; a restart reads what is really on disk.
   */
  private fail(err: Error) {
    this.failed = new StoreFailedError(`the store cannot make its writes durable (fsync of the WAL failed: ${err.message}); restart the controller`, { cause: err });
    for (const batch of this.syncing.splice(0)) for (const w of batch.waiters) w.reject(this.failed);
    for (const r of this.heldReads.splice(0)) r.reject(this.failed);
  }

  /**
   * The reading connection sees a commit as soon as COMMIT returns, before its fsync. A read that may
   * show such a commit is answered only once it is durable: no client, watcher or worker ever acts on
   * a change that a power cut could still undo (its writer has not been answered either).
   */
  private async settled<T>(value: T): Promise<T> {
    if (this.failed) throw this.failed;
    if (this.durableCommits === this.commits) return value;
    const commit = this.commits;
    await new Promise<void>((resolve, reject) => this.heldReads.push({ commit, resolve, reject }));
    return value;
  }

  private static columns(kind: Kind, object: object): [string | null, string | null] {
    if (kind !== 'vms') return [null, null];
    const vm = object as Kinds['vms'];
    return [vm.worker || null, vm.status ?? null];
  }

  private change<K extends Kind>(changes: Change[], kind: K, type: WatchEventType, object: Kinds[K], json?: string) {
    changes.push({ kind, type, object, revision: ++this.revision, json } as Change);
  }

  async get<K extends Kind>(kind: K, name: string) {
    return this.settled(this.read(kind, name));
  }

  async list<K extends Kind>(kind: K, filter?: { worker?: string }) {
    return this.settled(this.listSync(kind, filter));
  }

  /** The objects and the revision in one read transaction: the revision of the last commit the objects reflect. */
  async snapshot<K extends Kind>(kind: K, filter?: { worker?: string }) {
    this.reader.exec('BEGIN');
    let snapshot: { items: Kinds[K][]; json: string[]; revision: number };
    try {
      const json = this.rowsSync(kind, filter).map((r) => r.body);
      snapshot = { items: json.map((j) => JSON.parse(j) as Kinds[K]), json, revision: this.storedRevision() };
    } finally {
      this.reader.exec('COMMIT');
    }
    return this.settled(snapshot);
  }

  async countVMsByStatus() {
    const out: Record<string, number> = {};
    for (const r of this.rstmt.countByStatus.all() as { status: string | null; n: number }[]) out[r.status ?? 'unknown'] = r.n;
    return this.settled(out);
  }

  async create<K extends Kind>(kind: K, object: Kinds[K]) {
    return this.tx((changes) => this.createIn(changes, kind, object));
  }

  async update<K extends Kind>(kind: K, name: string, mutate: (current: Kinds[K]) => Kinds[K]) {
    return this.tx((changes) => this.updateIn(changes, kind, name, mutate));
  }

  async put<K extends Kind>(kind: K, object: Kinds[K]) {
    return this.tx((changes) => this.putIn(changes, kind, object));
  }

  async delete<K extends Kind>(kind: K, name: string) {
    return this.tx((changes) => this.deleteIn(changes, kind, name));
  }

  async transaction<T>(fn: (tx: Transaction) => T): Promise<T> {
    return this.tx((changes) => {
      let open = true;
      const live = <A extends unknown[], R>(f: (...args: A) => R) => (...args: A): R => {
        if (!open) throw new Error('a transaction was used after its function returned');
        return f(...args);
      };
      const tx: Transaction = {
        get: live((kind, name) => this.readTx(kind, name)),
        create: live((kind, object) => this.createIn(changes, kind, object)),
        update: live((kind, name, mutate) => this.updateIn(changes, kind, name, mutate)),
        put: live((kind, object) => this.putIn(changes, kind, object)),
        delete: live((kind, name) => this.deleteIn(changes, kind, name)),
        release: live((worker, uid) => void this.stmt.release.run(worker, uid, Date.now())),
        releasedFrom: live((worker, uids) => new Set(uids.filter((uid) => this.stmt.released.get(worker, uid) !== undefined))),
        appendEvents: live((vmUID, events) => this.appendEventsIn(vmUID, events)),
      };
      try {
        return fn(tx);
      } finally {
        open = false;
      }
    });
  }

  // The mutations, run inside a savepoint of the open batch (see `tx`).

  private createIn<K extends Kind>(changes: Change[], kind: K, object: Kinds[K]): Kinds[K] {
    if (this.stmt.get.get(kind, object.name)) throw new ConflictError(`${singular(kind)} "${object.name}" already exists`);
    const json = JSON.stringify(object);
    this.stmt.insert.run(kind, object.name, ...SQLiteStore.columns(kind, object), json);
    this.change(changes, kind, 'ADDED', object, json);
    return object;
  }

  private updateIn<K extends Kind>(changes: Change[], kind: K, name: string, mutate: (current: Kinds[K]) => Kinds[K]): Kinds[K] {
    const current = this.readTx(kind, name);
    if (!current) throw new NotFoundError(`${singular(kind)} "${name}" not found`);
    const next = mutate(current);
    if (next === current) return current;
    this.released(kind, current, next);
    const json = JSON.stringify(next);
    this.stmt.update.run(...SQLiteStore.columns(kind, next), json, kind, name);
    this.change(changes, kind, 'MODIFIED', next, json);
    return next;
  }

  private putIn<K extends Kind>(changes: Change[], kind: K, object: Kinds[K]): Kinds[K] {
    const row = this.stmt.get.get(kind, object.name) as Row | undefined;
    const exists = row !== undefined;
    if (row) this.released(kind, JSON.parse(row.body) as Kinds[K], object);
    const [worker, status] = SQLiteStore.columns(kind, object);
    const json = JSON.stringify(object);
    if (exists) this.stmt.update.run(worker, status, json, kind, object.name);
    else this.stmt.insert.run(kind, object.name, worker, status, json);
    this.change(changes, kind, exists ? 'MODIFIED' : 'ADDED', object, json);
    return object;
  }

  private deleteIn<K extends Kind>(changes: Change[], kind: K, name: string): Kinds[K] {
    const current = this.readTx(kind, name);
    if (!current) throw new NotFoundError(`${singular(kind)} "${name}" not found`);
    this.stmt.delete.run(kind, name);
    this.released(kind, current, undefined);
    const uid = (current as { uid?: string }).uid;
    if (kind === 'vms' && uid) {
      this.stmt.deleteEvents.run(uid);
      this.stmt.deleteCut.run(uid);
      this.keepStats(uid);
      this.eventStats.delete(uid);
    }
    this.change(changes, kind, 'DELETED', current);
    return current;
  }

  /** In the same transaction as the change: a VM that leaves its worker is released from it. */
  private released<K extends Kind>(kind: K, before: Kinds[K], after: Kinds[K] | undefined) {
    if (kind !== 'vms') return;
    const b = before as Kinds['vms'];
    const a = after as Kinds['vms'] | undefined;
    if (b.worker && b.uid && (!a || a.worker !== b.worker)) this.stmt.release.run(b.worker, b.uid, Date.now());
  }

  async release(worker: string, uid: string) {
    await this.tx(() => this.stmt.release.run(worker, uid, Date.now()));
  }

  async releasedFrom(worker: string, uids: string[]) {
    return this.settled(new Set(uids.filter((uid) => this.rstmt.released.get(worker, uid) !== undefined)));
  }

  async appendEvents(vmUID: string, events: Event[]) {
    await this.tx(() => this.appendEventsIn(vmUID, events));
  }

  /** Notes a VM's event stats as they are before the running mutation changes them. */
  private keepStats(vmUID: string) {
    if (this.statsBefore && !this.statsBefore.has(vmUID)) {
      const stats = this.eventStats.get(vmUID);
      this.statsBefore.set(vmUID, stats && { ...stats });
    }
  }

  private appendEventsIn(vmUID: string, events: Event[]) {
    this.keepStats(vmUID);
    let stats = this.eventStats.get(vmUID);
    if (!stats) stats = { ...(this.stmt.eventStats.get(vmUID) as { count: number; bytes: number }) };
    const appended: EventAppend['events'] = [];
    for (const e of events) {
      const body = JSON.stringify(e);
      appended.push({ id: Number(this.stmt.insertEvent.run(vmUID, body).lastInsertRowid), event: e });
      stats.count++;
      stats.bytes += Buffer.byteLength(body);
    }
    this.retain(vmUID, stats);
    this.eventStats.set(vmUID, stats);
    if (appended.length) this.appends?.push({ vmUID, events: appended });
  }

  /** Drops a VM's oldest events beyond the retention limits (its newest event always stays), and records the cut. */
  private retain(vmUID: string, stats: { count: number; bytes: number }) {
    const { eventsPerVM, eventBytesPerVM } = this.eventLimits;
    if (stats.count <= eventsPerVM && stats.bytes <= eventBytesPerVM) return;
    let lastID = -1;
    let dropped = 0;
    for (const row of this.stmt.oldestEvents.iterate(vmUID) as Iterable<{ id: number; size: number }>) {
      if (stats.count <= 1 || (stats.count <= eventsPerVM && stats.bytes <= eventBytesPerVM)) break;
      lastID = row.id;
      dropped++;
      stats.count--;
      stats.bytes -= row.size;
    }
    if (dropped === 0) return;
    this.stmt.dropEvents.run(vmUID, lastID);
    this.stmt.addCut.run(vmUID, dropped, Date.now());
  }

  async listEvents(vmUID: string, opts: { limit: number; order: 'asc' | 'desc'; cursor?: string }): Promise<EventPage> {
    const after = opts.cursor !== undefined ? Number(opts.cursor) : opts.order === 'asc' ? 0 : Number.MAX_SAFE_INTEGER;
    const stmt = opts.order === 'asc' ? this.rstmt.eventsAsc : this.rstmt.eventsDesc;
    // Rows are read one at a time, and the page ends at its byte budget (at least one event), so a
    // page never holds more than about eventPageBytes however many events were asked for.
    const events: Event[] = [];
    const ids: number[] = [];
    let bytes = 0;
    let lastID = 0;
    let newestID = 0;
    let more = false;
    for (const row of stmt.iterate(vmUID, after, opts.limit + 1) as Iterable<{ id: number; body: string }>) {
      if (events.length === opts.limit || (events.length > 0 && bytes + row.body.length > this.eventLimits.eventPageBytes)) {
        more = true;
        break;
      }
      events.push(JSON.parse(row.body) as Event);
      ids.push(row.id);
      bytes += row.body.length;
      lastID = row.id;
      newestID = Math.max(newestID, row.id);
    }
    const cut = this.rstmt.cut.get(vmUID) as { dropped: number; at: number } | undefined;
    return this.settled({ events, ids, nextCursor: more ? String(lastID) : undefined, newestCursor: newestID ? String(newestID) : undefined, dropped: cut?.dropped ?? 0, droppedAt: cut?.at });
  }

  async getClusterSettings(): Promise<ClusterSettings> {
    if (this.failed) throw this.failed;
    return this.settings;
  }

  async putClusterSettings(settings: ClusterSettings) {
    const body = JSON.stringify(settings);
    await this.tx(() => this.stmt.putSetting.run('cluster', body));
    this.settings = JSON.parse(body) as ClusterSettings;
    return settings;
  }

  /** The cluster's identity, if this database has one. */
  clusterID(): string | undefined {
    const row = this.rstmt.getSetting.get('cluster-id') as Row | undefined;
    return row ? (JSON.parse(row.body) as string) : undefined;
  }

  /** Gives the database its identity, checkpointed at once: it is in orchard.db itself, not only in the WAL. */
  initClusterID(id: string) {
    this.flush();
    this.stmt.putSetting.run('cluster-id', JSON.stringify(id));
    this.db.exec('PRAGMA wal_checkpoint(TRUNCATE)');
  }

  /** SQLite's quick_check: "ok", or what is wrong. */
  quickCheck(): string {
    return (this.db.prepare('PRAGMA quick_check').all() as { quick_check: string }[]).map((r) => r.quick_check).join('; ');
  }

  subscribe(listener: (change: Change) => void) {
    this.listeners.add(listener);
    return () => void this.listeners.delete(listener);
  }

  subscribeEvents(listener: (append: EventAppend) => void) {
    this.eventListeners.add(listener);
    return () => void this.eventListeners.delete(listener);
  }

  close() {
    if (this.closed) return;
    this.closed = true; // no more fsyncs nor checkpoints started
    this.flush();
    // What is committed is made durable here, on this thread, and answered.
    if (!this.failed && this.durableCommits < this.commits) {
      try {
        fsyncSync(this.walFd);
        this.durable(this.commits);
      } catch (err) {
        this.fail(err as Error);
      }
    }
    if (!this.fsyncInFlight) closeSync(this.walFd); // else its callback closes it
    this.checkpointer.close();
    this.listeners.clear();
    if (this.reader.isOpen) this.reader.close();
    // Everything into orchard.db, the WAL emptied: a clean stop leaves one self-contained file.
    if (this.db.isOpen) this.db.exec('PRAGMA wal_checkpoint(TRUNCATE)');
    if (this.db.isOpen) this.db.close();
  }
}

function singular(kind: Kind): string {
  return { vms: 'VM', workers: 'worker', serviceAccounts: 'service account', registries: 'registry' }[kind];
}
