// The database's schema, as an ordered list of migration steps, and its version: SQLite's
// `PRAGMA user_version`, an integer in the file's header. It is used rather than a meta table because
// it is part of the same transaction as the steps that change the schema, it needs no table of its
// own (so it also exists in databases that predate it: there it is 0), and it can be read from the
// file's first 100 bytes without SQLite — an orchard that is too old can refuse a data dir without
// opening it, so it changes nothing at all.
//
// The release whose database had no marker wrote schema version 1: a database without a marker but
// with Orchard's tables is version 1 (it is marked as such by the next start).
import type { DatabaseSync } from 'node:sqlite';
import { closeSync, existsSync, openSync, readSync } from 'node:fs';

export interface Migration {
  /** The schema version this step brings the database to (each step is one more than the one before). */
  to: number;
  what: string;
  up(db: DatabaseSync): void;
}

export const MIGRATIONS: readonly Migration[] = [
  {
    to: 1,
    what: 'objects, events, event cuts, settings, releases',
    // IF NOT EXISTS: the same statements the release without a marker ran on every start, so an
    // unmarked database is brought to exactly version 1 whatever that release's history left in it.
    up: (db) =>
      db.exec(`
        CREATE TABLE IF NOT EXISTS objects (
          id INTEGER PRIMARY KEY,
          kind TEXT NOT NULL,
          name TEXT NOT NULL,
          worker TEXT,
          status TEXT,
          body TEXT NOT NULL,
          UNIQUE (kind, name)
        );
        CREATE INDEX IF NOT EXISTS objects_by_worker ON objects (kind, worker) WHERE worker IS NOT NULL;
        CREATE TABLE IF NOT EXISTS events (
          id INTEGER PRIMARY KEY AUTOINCREMENT,
          vm_uid TEXT NOT NULL,
          body TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS events_by_vm ON events (vm_uid, id);
        -- How many of a VM's oldest events retention dropped, and when last.
        CREATE TABLE IF NOT EXISTS event_cuts (vm_uid TEXT PRIMARY KEY, dropped INTEGER NOT NULL, at INTEGER NOT NULL);
        CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, body TEXT NOT NULL);
        -- VMs that left a worker (deleted, moved elsewhere, or released by an admin): the worker may remove
        -- its copy. A VM a worker runs that is neither known nor released is an orphan, never destroyed.
        CREATE TABLE IF NOT EXISTS releases (worker TEXT NOT NULL, uid TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (worker, uid));
      `),
  },
  {
    to: 2,
    what: 'an index of VMs by status',
    // countVMsByStatus (every /metrics scrape) then reads this index instead of every row's body.
    up: (db) => db.exec('CREATE INDEX objects_by_status ON objects (kind, status)'),
  },
];

/** The schema version this release writes. */
export const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1].to;

export class SchemaError extends Error {}

/** The schema version SQLite reports for the open database (0: no marker). */
export function userVersion(db: DatabaseSync): number {
  return (db.prepare('PRAGMA user_version').get() as { user_version: number }).user_version;
}

/** The version the database's schema is at: its marker, or 1 for a database of Orchard's written before markers. */
export function schemaVersionOf(db: DatabaseSync): number {
  const marked = userVersion(db);
  if (marked > 0) return marked;
  return db.prepare(`SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'objects'`).get() ? 1 : 0;
}

/**
 * The schema version in the header of the database file at `path`, read without SQLite: undefined
 * when there is no such file or it is empty (a new database). The header in the file is the
 * checkpointed one; migrations are checkpointed at once (see migrate), so it is current.
 */
export function fileSchemaVersion(path: string): number | undefined {
  if (!existsSync(path)) return undefined;
  const header = Buffer.alloc(100);
  const fd = openSync(path, 'r');
  let n: number;
  try {
    n = readSync(fd, header, 0, 100, 0);
  } finally {
    closeSync(fd);
  }
  if (n === 0) return undefined;
  if (n < 100 || header.toString('latin1', 0, 16) !== 'SQLite format 3\0') throw new SchemaError(`${path} is not a SQLite database`);
  return header.readUInt32BE(60);
}

/**
 * Brings the open database to the newest schema version in `migrations`, all steps in one
 * transaction: afterwards it is at that version, or — if a step fails — exactly as it was. Refuses
 * a database newer than this release knows and one that is not Orchard's. Returns the versions
 * (`from` 0: a new database; `unmarked`: one written before the marker, counted as version 1).
 */
export function migrate(db: DatabaseSync, migrations: readonly Migration[] = MIGRATIONS): { from: number; to: number; unmarked: boolean } {
  const latest = migrations[migrations.length - 1].to;
  const marked = userVersion(db);
  if (marked > latest) throw newerError(marked, latest);
  const tables = (db.prepare(`SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'`).all() as { name: string }[]).map((r) => r.name);
  const unmarked = marked === 0 && tables.length > 0;
  if (unmarked && !tables.includes('objects')) {
    throw new SchemaError(`the database is not an Orchard controller's database (it has no version marker and the tables ${tables.slice(0, 10).join(', ')})`);
  }
  // An unmarked database runs step 1 again: its statements are the ones its release ran on every start.
  const from = marked;
  const steps = migrations.filter((m) => m.to > from);
  if (steps.length === 0) return { from, to: from, unmarked };
  db.exec('BEGIN IMMEDIATE');
  let step: Migration | undefined;
  try {
    for (step of steps) step.up(db);
    db.exec(`PRAGMA user_version = ${latest}`);
    db.exec('COMMIT');
  } catch (err) {
    if (db.isTransaction) db.exec('ROLLBACK');
    throw new SchemaError(
      `migrating the database from schema version ${unmarked ? '1 (unmarked)' : from} to ${latest} failed at step ${step?.to} (${step?.what}): ${(err as Error).message}. Nothing was changed.`,
      { cause: err },
    );
  }
  // Into the file itself: the version in its header is what an older release reads to refuse it.
  db.exec('PRAGMA wal_checkpoint(TRUNCATE)');
  return { from: unmarked ? 1 : from, to: latest, unmarked };
}

export function newerError(found: number, known = SCHEMA_VERSION, release?: string): SchemaError {
  return new SchemaError(
    `the database has schema version ${found}${release ? `, written by orchard ${release}` : ''}, but this orchard knows schema versions up to ${known}: ` +
      `run orchard ${release ? `${release} or newer` : `from a newer release (one that knows schema version ${found})`}. ` +
      'Nothing was changed. (A newer orchard migrates an older data dir; none migrates back: to go back to an older release, restore a backup taken before the upgrade.)',
  );
}
