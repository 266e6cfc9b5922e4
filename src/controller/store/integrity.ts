// The controller refuses to start on a damaged or foreign database, instead of starting empty (its
// workers would then see every VM as unknown). Three checks, before and after SQLite opens the file:
// - the WAL: SQLite silently ignores every frame after a damaged one, so a damaged WAL loses the
//   newest changes without a word; its frames are validated here first (format: sqlite.org/fileformat.html#wal);
// - an unclean stop (kill -9, power loss) leaves the WAL holding the latest changes: a missing WAL then
//   means they are lost (`DATA_DIR/cluster.json` records whether the last stop was clean);
// - the cluster's identity: a random id kept in the database (checkpointed at once, so it is in
//   orchard.db itself) and in `cluster.json`. A database without it, or with another one, is empty or
//   was swapped. Workers read the id too (GET /v1/controller/info) and notice a controller that changed.
import { randomUUID } from 'node:crypto';
import { closeSync, existsSync, fsyncSync, openSync, readFileSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { endianness } from 'node:os';
import { join } from 'node:path';
import { fileSchemaVersion, newerError, SCHEMA_VERSION, SchemaError } from './schema.ts';

const WAL_HEADER = 32;
const FRAME_HEADER = 24;

/** Why the WAL file at `path` is damaged (committed frames SQLite would skip), or undefined when it is sound. */
export function walDamage(path: string): string | undefined {
  if (!existsSync(path)) return undefined;
  const wal = readFileSync(path);
  if (wal.length === 0) return undefined;
  if (wal.length < WAL_HEADER) return `the WAL is ${wal.length} bytes, shorter than its header`;
  const magic = wal.readUInt32BE(0);
  if (magic !== 0x377f0682 && magic !== 0x377f0683) return 'the WAL header is not a SQLite WAL header';
  // SQLite's checksum: over pairs of 32-bit words, in the byte order the magic names, s0 += x0 + s1;
  // s1 += x1 + s0 (mod 2^32). Summed over a Uint32Array in this host's order (a copy, swapped, when the
  // WAL's differs), not a Buffer read word by word: a 5 MB WAL in 35-39 ms instead of 52-56 at a start.
  const swap = ((magic & 1) === 1) !== (endianness() === 'BE');
  const whole = wal.length - (wal.length % 4);
  const words = swap || wal.byteOffset % 4 ? Buffer.from(wal.subarray(0, whole)) : wal;
  if (swap) words.swap32();
  const word = new Uint32Array(words.buffer, words.byteOffset, whole / 4);
  const checksum = (start: number, end: number, s: [number, number]): [number, number] => {
    let [s0, s1] = s;
    for (let i = start / 4; i < end / 4; i += 2) {
      s0 = (s0 + word[i] + s1) >>> 0;
      s1 = (s1 + word[i + 1] + s0) >>> 0;
    }
    return [s0, s1];
  };
  let sum = checksum(0, 24, [0, 0]);
  if (sum[0] !== wal.readUInt32BE(24) || sum[1] !== wal.readUInt32BE(28)) return 'the WAL header checksum does not match (SQLite would ignore the whole WAL)';
  const pageSize = wal.readUInt32BE(8);
  const salt1 = wal.readUInt32BE(16);
  const salt2 = wal.readUInt32BE(20);
  const frameSize = FRAME_HEADER + pageSize;
  const frames = Math.floor((wal.length - WAL_HEADER) / frameSize);
  const ours = (at: number) => wal.readUInt32BE(at + 8) === salt1 && wal.readUInt32BE(at + 12) === salt2;
  for (let i = 0; i < frames; i++) {
    const at = WAL_HEADER + i * frameSize;
    if (!ours(at)) return undefined; // an older generation's frames follow: the log ends here
    const next = checksum(at + FRAME_HEADER, at + frameSize, checksum(at, at + 8, sum));
    if (next[0] === wal.readUInt32BE(at + 16) && next[1] === wal.readUInt32BE(at + 20)) {
      sum = next;
      continue;
    }
    // A bad frame is harmless at the very end (a write torn by a crash); with frames of this log after it, committed changes are lost.
    let later = 0;
    for (let j = i + 1; j < frames; j++) if (ours(WAL_HEADER + j * frameSize)) later++;
    return later ? `frame ${i + 1} of ${frames} is damaged and ${later} later frame${later === 1 ? '' : 's'} would be ignored` : undefined;
  }
  return undefined;
}

export interface ClusterFile {
  clusterID: string;
  /** False while a controller has the database open: after a crash the WAL holds the latest changes. */
  cleanStop: boolean;
  /** The schema version of orchard.db and the orchard release that last ran on it (absent before they were recorded). */
  schemaVersion?: number;
  release?: string;
}

export function readClusterFile(dataDir: string): ClusterFile | undefined {
  const path = join(dataDir, 'cluster.json');
  if (!existsSync(path)) return undefined;
  return JSON.parse(readFileSync(path, 'utf8')) as ClusterFile;
}

/** Written aside, synced and renamed: never half a file. */
export function writeClusterFile(dataDir: string, file: ClusterFile) {
  const path = join(dataDir, 'cluster.json');
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(file) + '\n', { mode: 0o600 });
  const fd = openSync(tmp, 'r');
  fsyncSync(fd);
  closeSync(fd);
  renameSync(tmp, path);
}

export class DamagedDatabaseError extends Error {}

const WHAT_TO_DO =
  'Stop, and restore orchard.db together with orchard.db-wal from a backup (or from where they were moved). ' +
  'To start with the database as it is instead — VMs it does not know stay on their workers as orphans, for an admin to adopt or delete — ' +
  'run again with --accept-damaged-database.';

/**
 * Refuses a data dir whose database is newer than this release, before anything in it is created,
 * opened or changed (the version is read from the file's header; see store/schema.ts).
 */
export function checkSchemaVersion(dataDir: string): void {
  const version = fileSchemaVersion(join(dataDir, 'orchard.db'));
  if (version === undefined || version <= SCHEMA_VERSION) return;
  let release: string | undefined;
  try {
    release = readClusterFile(dataDir)?.release;
  } catch {
    // the version alone says enough
  }
  const err = newerError(version, SCHEMA_VERSION, release);
  throw new SchemaError(`${join(dataDir, 'orchard.db')}: ${err.message}`);
}

/** Checks made before SQLite opens the database (it would repair or ignore what they look for). */
export function checkBeforeOpen(dataDir: string): void {
  const db = join(dataDir, 'orchard.db');
  const wal = `${db}-wal`;
  const damage = walDamage(wal);
  if (damage) throw new DamagedDatabaseError(`${wal} is damaged: ${damage}. ${WHAT_TO_DO}`);
  const file = readClusterFile(dataDir);
  if (file && !file.cleanStop && existsSync(db) && statSync(db).size > 0 && !existsSync(wal)) {
    throw new DamagedDatabaseError(`${wal} is missing, but the controller did not stop cleanly: the changes since the last checkpoint were in it. ${WHAT_TO_DO}`);
  }
}

/**
 * Checks made with the database open: SQLite's own quick check, and the cluster's identity. Returns the
 * cluster id (a new cluster gets one). `stored` reads and `init` writes (and checkpoints) the id in the database.
 */
export function checkIdentity(dataDir: string, stored: string | undefined, quickCheck: string, init: (id: string) => void): string {
  if (quickCheck !== 'ok') throw new DamagedDatabaseError(`orchard.db is damaged (SQLite's check: ${quickCheck.slice(0, 300)}). ${WHAT_TO_DO}`);
  const file = readClusterFile(dataDir);
  if (file && !stored) {
    throw new DamagedDatabaseError(`orchard.db holds no cluster (it is empty or was replaced), but this data dir belongs to cluster ${file.clusterID}. ${WHAT_TO_DO}`);
  }
  if (file && stored && file.clusterID !== stored) {
    throw new DamagedDatabaseError(`orchard.db belongs to cluster ${stored}, but this data dir to cluster ${file.clusterID}: the database was swapped. ${WHAT_TO_DO}`);
  }
  if (stored) return stored;
  const id = randomUUID();
  init(id);
  return id;
}
