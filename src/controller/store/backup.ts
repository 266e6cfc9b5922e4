// `orchard controller backup FILE` and `orchard controller restore FILE`.
//
// A backup is one SQLite file: a consistent copy of orchard.db made with SQLite's online backup
// while the controller serves, plus the data dir's files a restored controller needs to be the same
// controller to its workers and clients (table orchard_backup_files): the TLS certificate and key
// (they are pinned by every worker and context) and the SSH jump host's key (pinned by ssh's
// known_hosts). The cluster's id is in the database itself. The copy is taken in a single step, so
// inside ONE read transaction: with WAL, readers never block the controller's writers (a step-wise
// copy would restart whenever the controller commits, and might never end under load).
//
// Not in a backup: a certificate and key given with --controller-cert/--controller-key (they live
// where the operator keeps them), worker hosts' VM disks and images, CLI contexts (~/.orchard).
import { backup as sqliteBackup, DatabaseSync } from 'node:sqlite';
import { chmodSync, closeSync, copyFileSync, existsSync, fsyncSync, mkdirSync, openSync, readdirSync, readFileSync, readlinkSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { VERSION } from '../../api/version.ts';
import { HOST_KEY_FILE } from '../connect/ssh-jump.ts';
import { checkSchemaVersion, readClusterFile, walDamage, writeClusterFile } from './integrity.ts';
import { fileSchemaVersion, newerError, SCHEMA_VERSION, schemaVersionOf, userVersion } from './schema.ts';

/** The data dir's files a backup carries besides the database. */
export const BACKED_UP_FILES = ['controller.crt', 'controller.key', HOST_KEY_FILE] as const;
/** Files of a data dir that a restore replaces (moved aside, never deleted). */
const DATA_FILES = ['orchard.db', 'orchard.db-wal', 'orchard.db-shm', 'cluster.json', ...BACKED_UP_FILES];

export class BackupError extends Error {}

export interface BackupInfo {
  file: string;
  bytes: number;
  clusterID: string;
  schemaVersion: number;
  /** Data dir files carried besides the database. */
  files: string[];
  /** How long the copy's read transaction lasted (the only time the backup holds the database). */
  copyMs: number;
  totalMs: number;
}

function settingOf(db: DatabaseSync, key: string): string | undefined {
  const row = db.prepare('SELECT body FROM settings WHERE key = ?').get(key) as { body: string } | undefined;
  return row ? (JSON.parse(row.body) as string) : undefined;
}

/** SQLite's full integrity check: "ok", or what is wrong. */
function integrityCheck(db: DatabaseSync): string {
  return (db.prepare('PRAGMA integrity_check').all() as { integrity_check: string }[]).map((r) => r.integrity_check).join('; ');
}

function fsyncPath(path: string) {
  const fd = openSync(path, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

/** Copies DATA_DIR's controller state into FILE (written aside, checked, synced, renamed; mode 0600). */
export async function backupDataDir(dataDir: string, file: string): Promise<BackupInfo> {
  const t0 = performance.now();
  const source = join(dataDir, 'orchard.db');
  if (!existsSync(source) || statSync(source).size === 0) throw new BackupError(`there is no controller database at ${source}: is --data-dir right?`);
  checkSchemaVersion(dataDir);
  const damage = walDamage(`${source}-wal`);
  if (damage) throw new BackupError(`${source}-wal is damaged (${damage}): a backup would silently miss the changes after the damage. Nothing was written.`);
  const target = resolve(file);
  if (existsSync(target) && statSync(target).isDirectory()) throw new BackupError(`${target} is a directory: give the backup's file name`);
  if (!existsSync(dirname(target))) throw new BackupError(`${dirname(target)} does not exist`);
  const tmp = join(dirname(target), `.${basename(target)}.${process.pid}.tmp`);

  // Read-only: it never writes to the live database, and closing it never checkpoints or removes the
  // WAL (after a crash, the WAL is where the latest changes are; see integrity.ts).
  const src = new DatabaseSync(source, { readOnly: true });
  let copyMs = 0;
  try {
    const version = userVersion(src);
    if (version > SCHEMA_VERSION) throw newerError(version);
    writeFileSync(tmp, '', { mode: 0o600 }); // SQLite writes into it, keeping the mode: secrets never sit in a readable file
    const c0 = performance.now();
    await sqliteBackup(src, tmp, { rate: 0x7fffffff }); // every page in one step: one read transaction
    copyMs = performance.now() - c0;
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  } finally {
    src.close();
  }

  const files: string[] = [];
  let clusterID: string | undefined;
  let schemaVersion = 0;
  const copy = new DatabaseSync(tmp);
  try {
    // One self-contained file: no WAL beside it.
    copy.exec('PRAGMA journal_mode = DELETE');
    clusterID = settingOf(copy, 'cluster-id');
    if (!clusterID) throw new BackupError(`${source} holds no cluster id (it was never started by a controller, or was emptied): not backed up`);
    schemaVersion = schemaVersionOf(copy);
    copy.exec(`
      CREATE TABLE orchard_backup (key TEXT PRIMARY KEY, value TEXT NOT NULL);
      CREATE TABLE orchard_backup_files (name TEXT PRIMARY KEY, mode INTEGER NOT NULL, content BLOB NOT NULL);
    `);
    const meta = copy.prepare('INSERT INTO orchard_backup (key, value) VALUES (?, ?)');
    meta.run('created', new Date().toISOString());
    meta.run('release', VERSION);
    meta.run('cluster-id', clusterID);
    meta.run('data-dir', resolve(dataDir));
    const put = copy.prepare('INSERT INTO orchard_backup_files (name, mode, content) VALUES (?, ?, ?)');
    for (const name of BACKED_UP_FILES) {
      const path = join(dataDir, name);
      if (!existsSync(path)) continue;
      put.run(name, statSync(path).mode & 0o777, readFileSync(path));
      files.push(name);
    }
    const check = integrityCheck(copy);
    if (check !== 'ok') throw new BackupError(`the copy failed SQLite's integrity check (${check.slice(0, 300)}); nothing was written to ${target}`);
    copy.close();
    fsyncPath(tmp);
    renameSync(tmp, target);
    fsyncPath(dirname(target));
  } catch (err) {
    if (copy.isOpen) copy.close();
    rmSync(tmp, { force: true });
    throw err;
  }
  return { file: target, bytes: statSync(target).size, clusterID, schemaVersion, files, copyMs, totalMs: performance.now() - t0 };
}

/** Processes (Linux: read from /proc) that have `path` open; empty where that cannot be known. */
function holdersOf(path: string): number[] {
  if (!existsSync('/proc/self/fd')) return [];
  const wanted = new Set([path, `${path}-wal`, `${path}-shm`]);
  const pids: number[] = [];
  for (const pid of readdirSync('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue; // gone, or another user's (a controller of another user would hold the files' owner's rights: the checks below still apply)
    }
    for (const fd of fds) {
      try {
        if (wanted.has(readlinkSync(`/proc/${pid}/fd/${fd}`))) {
          pids.push(Number(pid));
          break;
        }
      } catch {
        // closed meanwhile
      }
    }
  }
  return pids;
}

export interface RestoreInfo {
  dataDir: string;
  clusterID: string;
  schemaVersion: number;
  created: string;
  files: string[];
  /** Where the data dir's previous files went (with --force). */
  movedAside?: string;
}

/**
 * Makes DATA_DIR the controller state of backup FILE. Refuses a data dir that holds a controller's
 * files unless `force` (they are then moved to DATA_DIR/before-restore-TIME/, not deleted), and always
 * one that a running process has open.
 */
export function restoreDataDir(file: string, dataDir: string, opts: { force?: boolean } = {}): RestoreInfo {
  const source = resolve(file);
  if (!existsSync(source)) throw new BackupError(`${source} does not exist`);
  const version = fileSchemaVersion(source);
  if (version === undefined) throw new BackupError(`${source} is empty: not a backup`);
  if (version > SCHEMA_VERSION) throw newerError(version);
  const dir = resolve(dataDir);
  const db = join(dir, 'orchard.db');
  const holders = holdersOf(db);
  if (holders.length) throw new BackupError(`a running process (pid ${holders.join(', ')}) has ${db} open: stop the controller first. Nothing was changed.`);
  const present = existsSync(dir) ? DATA_FILES.filter((f) => existsSync(join(dir, f)) && !(f === 'orchard.db' && statSync(join(dir, f)).size === 0)) : [];
  if (present.length && !opts.force) {
    const crashed = readClusterFileSafe(dir)?.cleanStop === false;
    throw new BackupError(
      `${dir} already holds a controller's data (${present.join(', ')})${crashed ? ', and its controller did not stop cleanly (is it running?)' : ''}. ` +
        'A restore replaces it: stop its controller and run again with --force (the current files are moved to a before-restore-… folder in the data dir, not deleted). Nothing was changed.',
    );
  }

  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const tmp = join(dir, `.orchard.db.restore.${process.pid}.tmp`);
  const restored: { name: string; mode: number; content: Uint8Array }[] = [];
  let clusterID: string | undefined;
  let created = '';
  let schemaVersion = 0;
  try {
    writeFileSync(tmp, '', { mode: 0o600 });
    copyFileSync(source, tmp);
    const copy = new DatabaseSync(tmp);
    try {
      const tables = new Set((copy.prepare(`SELECT name FROM sqlite_master WHERE type = 'table'`).all() as { name: string }[]).map((r) => r.name));
      if (!tables.has('orchard_backup') || !tables.has('orchard_backup_files')) throw new BackupError(`${source} is not an orchard controller backup (made by orchard controller backup)`);
      const check = integrityCheck(copy);
      if (check !== 'ok') throw new BackupError(`${source} fails SQLite's integrity check (${check.slice(0, 300)}): not restored. Nothing was changed.`);
      const meta = Object.fromEntries((copy.prepare('SELECT key, value FROM orchard_backup').all() as { key: string; value: string }[]).map((r) => [r.key, r.value]));
      clusterID = settingOf(copy, 'cluster-id');
      if (!clusterID || clusterID !== meta['cluster-id']) throw new BackupError(`${source} holds no cluster id or a different one than it records: not restored`);
      created = meta.created ?? '';
      schemaVersion = schemaVersionOf(copy);
      for (const r of copy.prepare('SELECT name, mode, content FROM orchard_backup_files').all() as { name: string; mode: number; content: Uint8Array }[]) {
        if (!(BACKED_UP_FILES as readonly string[]).includes(r.name)) throw new BackupError(`${source} carries an unexpected file "${r.name}": not restored`);
        restored.push(r);
      }
      copy.exec('DROP TABLE orchard_backup; DROP TABLE orchard_backup_files; VACUUM;');
      copy.exec('PRAGMA journal_mode = WAL'); // as the controller keeps it
    } finally {
      copy.close();
    }
    fsyncPath(tmp);
  } catch (err) {
    rmSync(tmp, { force: true });
    throw err;
  }

  let movedAside: string | undefined;
  if (present.length) {
    movedAside = join(dir, `before-restore-${new Date().toISOString().replace(/[:.]/g, '-')}`);
    mkdirSync(movedAside, { mode: 0o700 });
    for (const f of present) renameSync(join(dir, f), join(movedAside, f));
  }
  for (const r of restored) {
    const path = join(dir, r.name);
    const part = `${path}.${process.pid}.tmp`;
    writeFileSync(part, r.content, { mode: 0o600 });
    chmodSync(part, r.mode & 0o777);
    fsyncPath(part);
    renameSync(part, path);
  }
  renameSync(tmp, db);
  writeClusterFile(dir, { clusterID, cleanStop: true, schemaVersion, release: VERSION });
  fsyncPath(dir);
  return { dataDir: dir, clusterID, schemaVersion, created, files: restored.map((r) => r.name), movedAside };
}

function readClusterFileSafe(dir: string) {
  try {
    return readClusterFile(dir);
  } catch {
    return undefined;
  }
}
