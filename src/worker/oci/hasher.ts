// sha256 of a download as it streams, on the main thread or in a worker thread. Hashing is the main
// thread's largest cost in a download (about 0.3 s per 512 MiB here); in a thread of its own it runs
// beside the socket reads and the file writes. Chunks in a SharedArrayBuffer (blob-http.ts's buffers)
// reach the thread without a copy; others are copied.
import { createHash, type Hash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { Worker } from 'node:worker_threads';

export interface Hasher {
  /** Resolves once `data` is hashed (its buffer may then be reused). */
  update(data: Buffer): Promise<void>;
  /** Hashes a whole file (the part of a download already on disk). */
  file(path: string): Promise<void>;
  /** Starts over. */
  reset(): void;
  /** `sha256:HEX` of everything so far. */
  digest(): Promise<string>;
  close(): void;
}

const READ = 1024 * 1024;

export class MainHasher implements Hasher {
  private hash: Hash = createHash('sha256');

  update(data: Buffer): Promise<void> {
    this.hash.update(data);
    return Promise.resolve();
  }

  async file(path: string): Promise<void> {
    for await (const chunk of createReadStream(path, { highWaterMark: READ })) this.hash.update(chunk as Buffer);
  }

  reset(): void {
    this.hash = createHash('sha256');
  }

  digest(): Promise<string> {
    return Promise.resolve(`sha256:${this.hash.digest('hex')}`);
  }

  close(): void {}
}

// Evaluated: no file to find (the single executable has none beside it); as CommonJS or as a module
// (a process started with --input-type=module passes it on), so no require and no import.
const THREAD = `
const { parentPort } = process.getBuiltinModule('node:worker_threads');
const { createHash } = process.getBuiltinModule('node:crypto');
const { openSync, readSync, closeSync } = process.getBuiltinModule('node:fs');
let hash = createHash('sha256');
parentPort.on('message', (m) => {
  try {
    if (m.op === 'update') hash.update(new Uint8Array(m.buffer, m.offset, m.length));
    else if (m.op === 'file') {
      const fd = openSync(m.path, 'r');
      const buf = Buffer.allocUnsafe(${READ});
      try {
        for (let n; (n = readSync(fd, buf, 0, buf.length, null)) > 0;) hash.update(buf.subarray(0, n));
      } finally {
        closeSync(fd);
      }
    } else if (m.op === 'reset') hash = createHash('sha256');
    else if (m.op === 'digest') {
      parentPort.postMessage({ ok: true, digest: 'sha256:' + hash.digest('hex') });
      hash = createHash('sha256');
      return;
    }
    if (m.op !== 'reset') parentPort.postMessage({ ok: true });
  } catch (err) {
    parentPort.postMessage({ ok: false, message: String(err && err.message || err) });
  }
});
`;

type Pending = { resolve: (digest?: string) => void; reject: (err: Error) => void };

export class ThreadHasher implements Hasher {
  private readonly worker = new Worker(THREAD, { eval: true });
  /** answers come in the order of the requests */
  private readonly pending: Pending[] = [];
  private failed: Error | undefined;

  constructor() {
    this.worker.unref();
    this.worker.on('message', (m: { ok: boolean; digest?: string; message?: string }) => {
      const p = this.pending.shift();
      if (m.ok) p?.resolve(m.digest);
      else p?.reject(new Error(`hashing failed: ${m.message}`));
    });
    const fail = (err: Error) => {
      this.failed = err;
      for (const p of this.pending.splice(0)) p.reject(err);
    };
    this.worker.on('error', (err) => fail(new Error(`the hashing thread failed: ${err.message}`)));
    this.worker.on('exit', () => fail(new Error('the hashing thread ended')));
  }

  private ask(message: object, transfer: ArrayBuffer[] = []): Promise<string | undefined> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      this.pending.push({ resolve, reject });
      this.worker.postMessage(message, transfer);
    });
  }

  async update(data: Buffer): Promise<void> {
    if (data.buffer instanceof SharedArrayBuffer) await this.ask({ op: 'update', buffer: data.buffer, offset: data.byteOffset, length: data.length });
    else {
      const copy = new Uint8Array(data);
      await this.ask({ op: 'update', buffer: copy.buffer, offset: 0, length: copy.length }, [copy.buffer]);
    }
  }

  async file(path: string): Promise<void> {
    await this.ask({ op: 'file', path });
  }

  reset(): void {
    this.worker.postMessage({ op: 'reset' });
  }

  async digest(): Promise<string> {
    return (await this.ask({ op: 'digest' }))!;
  }

  close(): void {
    this.worker.removeAllListeners('exit');
    void this.worker.terminate();
  }
}
