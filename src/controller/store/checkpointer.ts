// WAL checkpoints in a thread of their own: copying the WAL's pages into orchard.db and its two
// fsyncs (of the WAL before, of the database after: sqlite.org/c3ref/wal_checkpoint_v2.html) take the
// event loop 5–8 ms when SQLite runs them in a commit. The thread has its own connection with
// synchronous=FULL, so each checkpoint syncs the WAL before it writes the database, and the database
// before it records the WAL as copied (only after that may a writer start the WAL over); the writing
// connection's automatic checkpoints are off (sqlite.ts). PASSIVE: it never waits for, nor blocks,
// the writer or the readers (sqlite.org/wal.html#concurrency).
import { Worker } from 'node:worker_threads';

/** Start a checkpoint when the WAL is larger than this (SQLite's default is 1,000 pages, ≈ 4 MB). */
export const CHECKPOINT_WAL_BYTES = 4 * 1024 * 1024;

// Evaluated: no file to find (the single executable has none beside it); see worker/oci/hasher.ts.
const THREAD = `
const { parentPort, workerData } = process.getBuiltinModule('node:worker_threads');
const { DatabaseSync } = process.getBuiltinModule('node:sqlite');
const db = new DatabaseSync(workerData.path);
db.exec('PRAGMA synchronous = FULL; PRAGMA busy_timeout = 5000;');
const checkpoint = db.prepare('PRAGMA wal_checkpoint(PASSIVE)');
const closed = new Int32Array(workerData.closed);
parentPort.on('message', (m) => {
  if (m === 'close') {
    db.close();
    Atomics.store(closed, 0, 1);
    Atomics.notify(closed, 0);
    parentPort.close();
    return;
  }
  try {
    const r = checkpoint.get();
    parentPort.postMessage({ ok: true, busy: r.busy, log: r.log, checkpointed: r.checkpointed });
  } catch (err) {
    parentPort.postMessage({ ok: false, message: String((err && err.message) || err) });
  }
});
`;

export interface CheckpointResult {
  /** Frames in the WAL, and how many of them are now in the database. */
  log: number;
  checkpointed: number;
}

export class Checkpointer {
  private readonly worker: Worker;
  private readonly closed = new SharedArrayBuffer(4);
  private running?: { resolve: (r: CheckpointResult) => void; reject: (err: Error) => void };
  private exited?: Error;

  constructor(path: string) {
    this.worker = new Worker(THREAD, { eval: true, workerData: { path, closed: this.closed } });
    this.worker.unref();
    this.worker.on('message', (m: { ok: true; log: number; checkpointed: number } | { ok: false; message: string }) => {
      const running = this.running;
      this.running = undefined;
      if (m.ok) running?.resolve({ log: m.log, checkpointed: m.checkpointed });
      else running?.reject(new Error(`WAL checkpoint failed: ${m.message}`));
    });
    const gone = (err: Error) => {
      this.exited ??= err;
      this.running?.reject(err);
      this.running = undefined;
    };
    this.worker.on('error', gone);
    this.worker.on('exit', () => gone(new Error('the checkpoint thread exited')));
  }

  /** True while a checkpoint runs. */
  get busy(): boolean {
    return this.running !== undefined;
  }

  /** Runs one PASSIVE checkpoint in the thread (one at a time). */
  checkpoint(): Promise<CheckpointResult> {
    if (this.exited) return Promise.reject(this.exited);
    if (this.running) return Promise.reject(new Error('a checkpoint is already running'));
    return new Promise((resolve, reject) => {
      this.running = { resolve, reject };
      this.worker.postMessage('checkpoint');
    });
  }

  /**
   * Closes the thread's connection before returning (after the checkpoint it may be running): the
   * writing connection must be the last to close, so that its closing checkpoint removes the WAL.
   */
  close() {
    if (this.exited) return;
    this.worker.postMessage('close');
    const closed = new Int32Array(this.closed);
    // Bounded: a thread that is gone or stuck must not hang the controller's stop.
    Atomics.wait(closed, 0, 0, 10_000);
    void this.worker.terminate();
  }
}
