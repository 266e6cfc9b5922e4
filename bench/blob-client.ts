// Which HTTP client reads a blob's body most cheaply: one uncompressed SIZE MiB blob from Debian's
// docker-registry on loopback, read by each client and hashed in a worker thread (hasher.ts), not
// written anywhere. Clients alternate, RUNS rounds; per client the median and spread of MiB/s, of
// the process's CPU per GiB (all threads) and of the main thread's CPU per GiB (/proc, 10 ms ticks).
// Bodies not already in shared memory are copied into reused shared 1 MiB buffers first, which is
// what a download would do with them (the hashing thread reads them there without another copy).
// undici is not a dependency: `npm install --no-save undici` first to measure it too.
//
//   node bench/blob-client.ts [--size 512] [--runs 5] [--only 'undici dispatch']
import { readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { BlobResponse, type BodyChunk } from '../src/worker/oci/blob-http.ts';
import { ThreadHasher } from '../src/worker/oci/hasher.ts';
import { tempDir } from '../test/helpers.ts';
import { ociLayout, qcow2WithData, skopeoPush, startRegistry } from '../test/registry.ts';

const { values } = parseArgs({ options: { size: { type: 'string', default: '512' }, runs: { type: 'string', default: '5' }, only: { type: 'string' } } });
const SIZE = Number(values.size);
const RUNS = Number(values.runs);
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const BUF = MiB;
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[], d = 0) => `${Math.min(...xs).toFixed(d)}–${Math.max(...xs).toFixed(d)}`;

/** The main thread's CPU seconds so far (its task's utime + stime). */
function mainThreadCpu(): number {
  const stat = readFileSync(`/proc/self/task/${process.pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

let fallbacks = 0;

/** Copies chunks into reused shared buffers; hands each full one to the hasher, at most two waiting. */
class Gather {
  private readonly free: Buffer[];
  private cur: Buffer;
  private fill = 0;
  private readonly waiting: Promise<void>[] = [];
  private onFree: (() => void) | undefined;
  private readonly hasher: ThreadHasher;
  constructor(hasher: ThreadHasher) {
    this.hasher = hasher;
    const memory = new SharedArrayBuffer(4 * BUF);
    this.free = Array.from({ length: 4 }, (_, i) => Buffer.from(memory, i * BUF, BUF));
    this.cur = this.free.pop()!;
  }
  /** false: no buffer is free, wait for `whenFree` before the next chunk */
  add(chunk: Buffer): boolean {
    for (let off = 0; off < chunk.length;) {
      const n = chunk.copy(this.cur, this.fill, off);
      off += n;
      this.fill += n;
      if (this.fill === BUF) this.flush();
    }
    return this.free.length > 0;
  }
  flush(): void {
    if (this.fill === 0) return;
    const buf = this.cur;
    const p = this.hasher.update(buf.subarray(0, this.fill)).then(() => {
      this.free.push(buf);
      const f = this.onFree;
      this.onFree = undefined;
      f?.();
    });
    this.waiting.push(p);
    this.fill = 0;
    // `add` is only called with a buffer free, and a chunk (≤ 64 KiB) spans at most two: no fallback expected.
    this.cur = this.free.pop() ?? (fallbacks++, Buffer.from(new SharedArrayBuffer(BUF)));
  }
  whenFree(): Promise<void> {
    return this.free.length > 0 ? Promise.resolve() : new Promise((r) => (this.onFree = r));
  }
  async done(): Promise<void> {
    this.flush();
    await Promise.all(this.waiting);
  }
}

type Client = (url: URL, hasher: ThreadHasher) => Promise<number>;

const nodeHttp: Client = (url, hasher) => new Promise((resolve, reject) => {
  http.get(url, async (res) => {
    try {
      const g = new Gather(hasher);
      let n = 0;
      for await (const chunk of res as AsyncIterable<Buffer>) {
        n += chunk.length;
        if (!g.add(chunk)) await g.whenFree();
      }
      await g.done();
      resolve(n);
    } catch (err) {
      reject(err as Error);
    }
  }).on('error', reject);
});

const blobHttp: Client = async (url, hasher) => {
  const res = await BlobResponse.get({ url, headers: {}, idleTimeoutMs: 60_000 });
  let n = 0;
  const waiting: Promise<void>[] = [];
  for await (const c of res.chunks() as AsyncIterable<BodyChunk>) {
    n += c.data.length;
    waiting.push(hasher.update(c.data).then(c.release));
    if (waiting.length > 2) await waiting.shift();
  }
  await Promise.all(waiting);
  return n;
};

/** The part of undici measured here (typed here: it is not a dependency, tsc must pass without it). */
interface Undici {
  request(url: URL, o: { reset: boolean }): Promise<{ body: AsyncIterable<Buffer> }>;
  getGlobalDispatcher(): { dispatch(o: object, handler: {
    onRequestStart(): void;
    onResponseStart(): void;
    onResponseData(c: { pause(): void; resume(): void }, chunk: Buffer): void;
    onResponseEnd(): void;
    onResponseError(c: unknown, err: Error): void;
  }): boolean };
}
const specifier = 'undici';
const undici = (await import(specifier).catch(() => undefined)) as Undici | undefined;
const undiciRequest: Client = async (url, hasher) => {
  if (!undici) throw new Error('no undici');
  const { body } = await undici.request(url, { reset: true });
  const g = new Gather(hasher);
  let n = 0;
  for await (const chunk of body) {
    n += chunk.length;
    if (!g.add(chunk)) await g.whenFree();
  }
  await g.done();
  return n;
};

const undiciDispatch: Client = (url, hasher) => new Promise((resolve, reject) => {
  if (!undici) throw new Error('no undici');
  const g = new Gather(hasher);
  let n = 0;
  undici.getGlobalDispatcher().dispatch({ origin: url.origin, path: url.pathname, method: 'GET', reset: true }, {
    onRequestStart() {},
    onResponseStart() {},
    onResponseData(controller, chunk) {
      n += chunk.length;
      if (!g.add(chunk)) {
        controller.pause();
        void g.whenFree().then(() => controller.resume());
      }
    },
    onResponseEnd() {
      g.done().then(() => resolve(n), reject);
    },
    onResponseError(_c, err) {
      reject(err);
    },
  });
});

const clients: Record<string, Client> = { 'node:http': nodeHttp, 'blob-http.ts': blobHttp, ...(undici ? { 'undici request()': undiciRequest, 'undici dispatch': undiciDispatch } : {}) };
if (!undici) console.log('undici is not installed (npm install --no-save undici): not measured');

const registry = await startRegistry();
const dir = tempDir('orchard-bench-blob-client-');
try {
  const disk = qcow2WithData(dir, 'disk', SIZE);
  const { layerDigests } = ociLayout(join(dir, 'layout'), [{ files: { 'disk/disk.qcow2': { copy: disk } }, gzip: false }], 'v1');
  skopeoPush(join(dir, 'layout'), 'v1', registry, 'bench/big');
  rmSync(dir, { recursive: true, force: true });
  const url = new URL(`http://${registry.host}/v2/bench/big/blobs/${layerDigests[0]}`);
  const results = new Map<string, { mibs: number[]; cpu: number[]; main: number[] }>();
  for (const name of Object.keys(clients)) results.set(name, { mibs: [], cpu: [], main: [] });
  const names = values.only ? [values.only] : Object.keys(clients);
  for (let run = 0; run < RUNS; run++) {
    // Rotate the order each round, so no client always follows the same one.
    for (const name of [...names.slice(run % names.length), ...names.slice(0, run % names.length)]) {
      const hasher = new ThreadHasher();
      await hasher.update(Buffer.alloc(1)); // the thread is up before the clock starts
      hasher.reset();
      const c0 = process.cpuUsage();
      const m0 = mainThreadCpu();
      const t0 = performance.now();
      const n = await clients[name](url, hasher);
      const digest = await hasher.digest();
      const s = (performance.now() - t0) / 1000;
      const c = process.cpuUsage(c0);
      const m = mainThreadCpu() - m0;
      hasher.close();
      if (digest !== layerDigests[0]) throw new Error(`${name}: digest ${digest}`);
      const r = results.get(name)!;
      r.mibs.push(n / MiB / s);
      r.cpu.push((c.user + c.system) / 1e6 / (n / GiB));
      r.main.push(m / (n / GiB));
    }
  }
  console.log(`blob of ${SIZE} MiB from loopback, hashed in a thread, ${RUNS} runs each, median (spread):`);
  console.log('client             MiB/s           CPU s/GiB (all threads)   main thread CPU s/GiB');
  for (const [name, r] of results) {
    if (!r.mibs.length) continue;
    console.log(`${name.padEnd(18)} ${median(r.mibs).toFixed(0).padStart(5)} (${spread(r.mibs)})`.padEnd(35) +
      `${median(r.cpu).toFixed(2)} (${spread(r.cpu, 2)})`.padEnd(26) + `${median(r.main).toFixed(2)} (${spread(r.main, 2)})`);
  }
  if (fallbacks) console.log(`buffers allocated beyond the pool: ${fallbacks}`);
  console.log(`load average: ${readFileSync('/proc/loadavg', 'utf8').trim()}`);
} finally {
  await registry.stop();
  rmSync(dir, { recursive: true, force: true });
}
