// Load harness: a real controller (a child process: real TLS, real HTTP, real SQLite) and N workers
// with the synthetic driver, each a real OrchardWorker with its own HTTPS client and WebSocket, all
// in this process. Creates M VMs and measures what an operator cares about. Used by bench/load.ts
// (figures) and by test/load.test.ts (correctness at a smaller scale).
import { fork, type ChildProcess } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { pino, type Logger } from 'pino';
import type { VM, WatchEvent } from '../src/api/schemas.ts';
import { OrchardClient } from '../src/client/client.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { WORKER_HTTP_CONNECTIONS } from '../src/worker/run.ts';
import { ADMIN_TOKEN, spawnController, tempDir, type ChildController } from '../test/helpers.ts';

export const pct = (sorted: number[], p: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] : NaN);

export interface ControllerUsage {
  rssMB: number;
  /** CPU used by the controller process over the sampling window, in % of one core. */
  cpuPercent: number;
}

/** CPU time a process has used so far, in seconds (utime + stime from /proc, 100 ticks/s). */
export function cpuSeconds(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** RSS and CPU of a process, from /proc, over `ms`. */
export async function usageOf(pid: number, ms: number): Promise<ControllerUsage> {
  const t0 = cpuSeconds(pid);
  await new Promise((r) => setTimeout(r, ms));
  const cpuPercent = ((cpuSeconds(pid) - t0) / (ms / 1000)) * 100;
  const rss = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return { rssMB: rss ? Number(rss[1]) / 1024 : NaN, cpuPercent };
}

export class Cluster {
  ctl!: ChildController;
  admin!: OrchardClient;
  certificate!: string;
  readonly dataDir = tempDir('orchard-load-');
  workers: OrchardWorker[] = [];
  fleet?: Fleet;
  drivers: SyntheticDriver[] = [];
  private readonly logger = pino({ level: 'silent' });

  /** `bin`: the controller's program, bin/orchard unless another (the single executable). */
  private readonly bin?: string;
  constructor(bin?: string) {
    this.bin = bin;
  }

  async startController(port = 0) {
    // LOAD_CONTROLLER_NODE_OPTIONS: e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof" (a profile is written when the controller exits on SIGTERM, not on the bench's kill -9).
    const nodeOptions = process.env.LOAD_CONTROLLER_NODE_OPTIONS;
    this.ctl = await spawnController(this.dataDir, port ? ['--listen', `127.0.0.1:${port}`] : [], nodeOptions ? { NODE_OPTIONS: nodeOptions } : {}, this.bin);
    this.certificate = readFileSync(join(this.dataDir, 'controller.crt'), 'utf8');
    this.admin?.close();
    this.admin = this.client();
  }

  client(maxSockets?: number) {
    return new OrchardClient({ url: this.ctl.url, certificate: this.certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, maxSockets });
  }

  /** Starts `n` synthetic workers with `slots` VM slots each, `concurrency` at a time. */
  async startWorkers(n: number, slots: number, concurrency = 50, heartbeatMs = 10_000) {
    await startSyntheticWorkers(this, n, slots, { client: () => this.client(WORKER_HTTP_CONNECTIONS), dataDir: join(this.dataDir, 'workers'), logger: this.logger, concurrency, heartbeatMs });
  }

  /**
   * Starts `n` synthetic workers as `startWorkers` does, but in a child process of their own
   * (bench/load-fleet.ts): the bench's timing client keeps its event loop to itself.
   */
  async startFleet(n: number, slots: number): Promise<Fleet> {
    const proc = fork(join(import.meta.dirname, 'load-fleet.ts'), [this.ctl.url, join(this.dataDir, 'controller.crt'), join(this.dataDir, 'workers'), String(n), String(slots)], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    this.fleet = new Fleet(proc);
    await this.fleet.ask((m) => m.ready === true);
    return this.fleet;
  }

  async stop() {
    await this.fleet?.stop();
    await Promise.all(this.workers.map((w) => w.stop()));
    this.admin?.close();
    await this.ctl?.kill('SIGTERM');
  }
}

/**
 * Starts `n` synthetic workers (load-0, load-1, …: real OrchardWorkers, each with its own HTTPS
 * client from `client`), `concurrency` at a time, into `into` by index: the harness's and the fleet's.
 */
export async function startSyntheticWorkers(
  into: { workers: OrchardWorker[]; drivers: SyntheticDriver[] },
  n: number,
  slots: number,
  o: { client: () => OrchardClient; dataDir: string; logger: Logger; concurrency?: number; heartbeatMs?: number },
) {
  let next = 0;
  await Promise.all(
    Array.from({ length: o.concurrency ?? 50 }, async () => {
      while (next < n) {
        const i = next++;
        const driver = new SyntheticDriver();
        const worker = new OrchardWorker({ client: o.client(), name: `load-${i}`, driver, dataDir: join(o.dataDir, String(i)), slots, heartbeatMs: o.heartbeatMs ?? 10_000, logger: o.logger });
        into.drivers[i] = driver;
        into.workers[i] = worker;
        await worker.start();
      }
    }),
  );
}

/** Synthetic workers in a child process (Cluster.startFleet). */
export class Fleet {
  readonly proc: ChildProcess;
  private readonly exited: Promise<void>;

  constructor(proc: ChildProcess) {
    this.proc = proc;
    this.exited = new Promise((resolve) => proc.once('exit', () => resolve()));
  }

  /** The next message from the fleet that `accept` takes (after sending `request`, if any). */
  ask(accept: (m: Record<string, unknown>) => boolean, request?: string): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const onMessage = (m: Record<string, unknown>) => {
        if (!accept(m)) return;
        this.proc.off('message', onMessage);
        this.proc.off('exit', onExit);
        resolve(m);
      };
      const onExit = (code: number | null) => reject(new Error(`the fleet process exited (${code})`));
      this.proc.on('message', onMessage);
      this.proc.once('exit', onExit);
      if (request) this.proc.send(request);
    });
  }

  /** Which workers are connected now (their watch open), by index. */
  async connected(): Promise<boolean[]> {
    const m = await this.ask((r) => Array.isArray(r.connected), 'connected');
    return (m.connected as number[]).map((c) => c === 1);
  }

  async stop() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.send('stop');
    await this.exited;
  }
}

/** Runs `op` n times with `concurrency` in flight; returns per-call latencies (ms) and the wall time. */
export async function closedLoop(n: number, concurrency: number, op: (i: number) => Promise<unknown>) {
  const latencies: number[] = new Array(n);
  let next = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < n) {
        const i = next++;
        const s = performance.now();
        await op(i);
        latencies[i] = performance.now() - s;
      }
    }),
  );
  return { latencies: latencies.sort((a, b) => a - b), seconds: (performance.now() - t0) / 1000 };
}

/** Follows /v1/vms?watch=true and records, per VM, when it was first seen placed and running. */
export class Watcher {
  readonly placedAt = new Map<string, number>();
  readonly runningAt = new Map<string, number>();
  /** When each VM's ADDED event arrived. */
  readonly addedAt = new Map<string, number>();
  /** Every worker each VM was ever seen on (a VM placed exactly once has one). */
  readonly workersSeen = new Map<string, Set<string>>();
  /** Highest number of non-failed VMs seen assigned to one worker at any time, per worker. */
  readonly peak = new Map<string, number>();
  private readonly assigned = new Map<string, string>();
  private readonly perWorker = new Map<string, number>();
  private readonly abort = new AbortController();
  private waiters: (() => void)[] = [];
  done: Promise<void>;

  /** Why the watch ended early, if it did (waits in `until` then time out and say so). */
  error?: Error;

  constructor(client: OrchardClient) {
    this.done = this.run(client.watch<VM>('/v1/vms?watch=true', this.abort.signal)).catch((err: Error) => {
      this.error = err;
    });
  }

  private async run(events: AsyncGenerator<WatchEvent<VM>>) {
    for await (const e of events) {
      const now = performance.now();
      const vm = e.object;
      if (e.type === 'ADDED') this.addedAt.set(vm.name, now);
      const holder = e.type !== 'DELETED' && vm.worker && vm.status !== 'failed' ? vm.worker : undefined;
      const before = this.assigned.get(vm.name);
      if (before !== holder) {
        if (before) this.perWorker.set(before, (this.perWorker.get(before) ?? 1) - 1);
        if (holder) {
          const n = (this.perWorker.get(holder) ?? 0) + 1;
          this.perWorker.set(holder, n);
          this.peak.set(holder, Math.max(this.peak.get(holder) ?? 0, n));
          this.assigned.set(vm.name, holder);
        } else this.assigned.delete(vm.name);
      }
      if (vm.worker && !this.placedAt.has(vm.name)) this.placedAt.set(vm.name, now);
      if (vm.worker) {
        let seen = this.workersSeen.get(vm.name);
        if (!seen) this.workersSeen.set(vm.name, (seen = new Set()));
        seen.add(vm.worker);
      }
      if (vm.status === 'running' && !this.runningAt.has(vm.name)) this.runningAt.set(vm.name, now);
      for (const w of this.waiters.splice(0)) w();
    }
  }

  /** Resolves when `check` holds (re-checked after every event), or rejects after `timeoutMs`. */
  until(check: () => boolean, timeoutMs: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}${this.error ? ` (the watch failed: ${this.error.message})` : ''}`)), timeoutMs);
      const test = () => {
        if (check()) {
          clearTimeout(timer);
          resolve();
        } else this.waiters.push(test);
      };
      test();
    });
  }

  stop() {
    this.abort.abort();
  }
}
