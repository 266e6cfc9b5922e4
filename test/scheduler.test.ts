// The scheduler end to end: in-process controllers (real TLS, real WebSockets) with several
// OrchardWorkers on SyntheticDrivers in this process. Placement by slots, resources and labels, the
// scheduler profiles, pause/resume, offline workers (and the grace after a controller restart),
// OnFailure restarts with exponential backoff, no overbooking under concurrent creates, and pushed
// (not polled) changes to workers; and one pass on its own (a store, a view, no controller): VMs that
// differ only in their OS get verdicts of their own.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import type { VM } from '../src/api/schemas.ts';
import type { OrchardClient } from '../src/client/client.ts';
import { newVM } from '../src/controller/domain/vms.ts';
import { Scheduler } from '../src/controller/scheduler.ts';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import { ClusterView } from '../src/controller/view.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { ADMIN_TOKEN, clientOf, inProcessController, tempDir, waitFor } from './helpers.ts';

type Controller = Awaited<ReturnType<typeof inProcessController>>;

const logger = pino({ level: process.env.ORCHARD_TEST_LOG ?? 'silent' });
const GPU = 'example.com/gpu';
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface TestWorker {
  name: string;
  worker: OrchardWorker;
  driver: SyntheticDriver;
  stop(): Promise<void>;
}

/** Follows /v1/vms?watch=true: the current VMs, every change with the time it arrived, and the peak load per worker. */
class VMWatch {
  readonly vms = new Map<string, VM>();
  readonly history: { at: number; type: string; vm: VM }[] = [];
  /** The highest number of assigned, not failed VMs any one worker ever had, per worker. */
  readonly peak = new Map<string, number>();
  error?: Error;
  private readonly abort = new AbortController();
  private readonly done: Promise<void>;

  constructor(client: OrchardClient) {
    this.done = (async () => {
      try {
        for await (const e of client.watch<VM>('/v1/vms?watch=true', this.abort.signal)) {
          this.history.push({ at: Date.now(), type: e.type, vm: e.object });
          if (e.type === 'DELETED') this.vms.delete(e.object.name);
          else this.vms.set(e.object.name, e.object);
          for (const [w, n] of this.load()) this.peak.set(w, Math.max(this.peak.get(w) ?? 0, n));
        }
      } catch (err) {
        if (!this.abort.signal.aborted) this.error = err as Error;
      }
    })();
  }

  /** Assigned, not failed VMs per worker, as of the last change seen. */
  load(): Map<string, number> {
    const load = new Map<string, number>();
    for (const vm of this.vms.values()) if (vm.worker && vm.status !== 'failed') load.set(vm.worker, (load.get(vm.worker) ?? 0) + 1);
    return load;
  }

  /** Returns once the watch is established (a probe VM that can never be placed comes and goes through it). */
  async ready(admin: OrchardClient) {
    await admin.createVM({ name: 'watch-probe', image: 'synthetic', labels: { 'orchard-test/never': 'true' } });
    await waitFor('the watch to see the probe VM', () => this.vms.has('watch-probe'), 10_000, 10);
    await admin.deleteVM('watch-probe');
    await waitFor('the watch to see the probe VM go', () => !this.vms.has('watch-probe'), 10_000, 10);
  }

  /** The first time a change of this VM matched. */
  firstAt(name: string, match: (vm: VM) => boolean, after = 0): number | undefined {
    return this.history.find((h) => h.at >= after && h.vm.name === name && h.type !== 'DELETED' && match(h.vm))?.at;
  }

  /** Like firstAt, waiting for the watch to catch up (a GET can answer before the watch delivers the change). */
  async seen(name: string, what: string, match: (vm: VM) => boolean, after = 0): Promise<number> {
    return waitFor(`the watch to see ${name} ${what}`, () => this.firstAt(name, match, after), 10_000, 10);
  }

  async close() {
    this.abort.abort();
    await this.done;
  }
}

/** Everything one test starts; `close` stops it all (workers, watches, controllers) and removes the temp dirs. */
class Harness {
  private readonly controllers = new Set<Controller>();
  private readonly workers: TestWorker[] = [];
  private readonly watches: VMWatch[] = [];
  private readonly dirs: string[] = [];

  async controller(opts: { dataDir?: string; workerOfflineTimeoutMs?: number; restartBackoffMs?: number } = {}): Promise<Controller> {
    const c = await inProcessController(opts);
    if (!this.dirs.includes(c.dataDir)) this.dirs.push(c.dataDir);
    this.controllers.add(c);
    return c;
  }

  async closeController(c: Controller) {
    this.controllers.delete(c);
    await c.close();
  }

  async worker(
    c: Controller,
    name: string,
    opts: { slots: number; labels?: Record<string, string>; resources?: Record<string, number>; heartbeatMs?: number },
  ): Promise<TestWorker> {
    const dataDir = tempDir('orchard-worker-');
    this.dirs.push(dataDir);
    const driver = new SyntheticDriver();
    const worker = new OrchardWorker({ client: clientOf(c.ctl, 'bootstrap-admin', ADMIN_TOKEN), name, driver, dataDir, logger, ...opts });
    let stopped = false;
    const w: TestWorker = {
      name,
      worker,
      driver,
      async stop() {
        if (stopped) return;
        stopped = true;
        await worker.stop();
      },
    };
    this.workers.push(w);
    await worker.start();
    await waitFor(`worker ${name} to register`, async () => (await c.admin.listWorkers()).some((x) => x.name === name), 10_000, 20);
    return w;
  }

  async watch(c: Controller): Promise<VMWatch> {
    const w = new VMWatch(c.admin);
    this.watches.push(w);
    await w.ready(c.admin);
    return w;
  }

  async close() {
    for (const w of this.watches) await w.close();
    for (const w of this.workers) await w.stop();
    for (const c of this.controllers) await c.close();
    for (const d of this.dirs) rmSync(d, { recursive: true, force: true });
  }
}

async function withHarness(fn: (h: Harness) => Promise<void>) {
  const h = new Harness();
  try {
    await fn(h);
  } finally {
    await h.close();
  }
}

const vmSpec = (name: string, extra: Partial<VM> = {}): VM => ({ name, image: 'synthetic', cpu: 1, memory: 512, ...extra });

/** Waits until the VM satisfies `ok`; the error shows the VM as last seen. */
async function waitVM(c: Controller, name: string, what: string, ok: (vm: VM) => boolean, timeoutMs = 10_000): Promise<VM> {
  let last: VM | undefined;
  try {
    await waitFor(`${name}: ${what}`, async () => ok((last = await c.admin.getVM(name))), timeoutMs, 20);
  } catch (err) {
    throw new Error(`${(err as Error).message}\nlast seen: ${JSON.stringify(last)}`);
  }
  return last!;
}

const runningOn = (c: Controller, name: string, worker: string) =>
  waitVM(c, name, `running on ${worker}`, (vm) => vm.worker === worker && vm.status === 'running');

const pendingWith = (c: Controller, name: string, message: string) =>
  waitVM(c, name, `pending with "${message}"`, (vm) => vm.status === 'pending' && !vm.worker && vm.status_message === message);

/** VM names per worker (assigned, not failed), every worker listed. */
async function placement(c: Controller, workers: string[]): Promise<Record<string, string[]>> {
  const out: Record<string, string[]> = Object.fromEntries(workers.map((w) => [w, []]));
  for (const vm of await c.admin.listVMs()) if (vm.worker && vm.status !== 'failed') (out[vm.worker] ??= []).push(vm.name);
  for (const names of Object.values(out)) names.sort();
  return out;
}

/** Names of the VMs the worker's driver has running, by VM name (local names are orchard-NAME-UID...). */
async function runningLocally(w: TestWorker, vms: VM[]): Promise<string[]> {
  const local = await w.driver.list();
  return vms.filter((vm) => local.some((l) => l.uid === vm.uid && l.running)).map((vm) => vm.name).sort();
}

/** Waits until each worker's driver runs exactly the VMs the controller has running on it. */
async function driversConverged(c: Controller, workers: TestWorker[]) {
  let last = '';
  await waitFor(
    'the drivers to run exactly what the controller assigns',
    async () => {
      const vms = await c.admin.listVMs();
      const diffs: string[] = [];
      for (const w of workers) {
        const want = vms.filter((vm) => vm.worker === w.name && vm.status === 'running').map((vm) => vm.name).sort();
        const have = await runningLocally(w, vms);
        const extra = (await w.driver.list()).length - have.length;
        if (JSON.stringify(want) !== JSON.stringify(have) || extra !== 0) diffs.push(`${w.name}: want ${want} have ${have} (+${extra} unknown)`);
      }
      last = diffs.join('; ');
      return diffs.length === 0;
    },
    10_000,
    50,
  ).catch((err: Error) => {
    throw new Error(`${err.message}: ${last}`);
  });
}

test('fit: slots and explicit resources decide placement; a VM that fits nowhere says why per reason, and is placed when room frees up', async () => {
  await withHarness(async (h) => {
    const c = await h.controller();
    const a = await h.worker(c, 'fit-a', { slots: 1, labels: { rack: 'a' }, resources: { [GPU]: 2 } });
    const b = await h.worker(c, 'fit-b', { slots: 2, labels: { rack: 'b' } });

    // Only fit-a has the GPUs.
    await c.admin.createVM(vmSpec('gpu-1', { resources: { [GPU]: 2 } }));
    await runningOn(c, 'gpu-1', 'fit-a');
    // fit-a's only slot is taken, fit-b has no GPU: both reasons, counted per worker.
    await c.admin.createVM(vmSpec('gpu-2', { resources: { [GPU]: 1 } }));
    await pendingWith(c, 'gpu-2', `no worker fits: 2 workers: 1 has 0 of 1 VM slots free, 1 has 0 of 1 ${GPU} free`);
    // The label matches only fit-a, which is full.
    await c.admin.createVM(vmSpec('rack-a', { labels: { rack: 'a' } }));
    await pendingWith(c, 'rack-a', 'no worker fits: 2 workers: 1 has 0 of 1 VM slots free, 1 lacks label rack=a');
    // Plain VMs fill fit-b's two slots, and a third fits nowhere.
    await c.admin.createVM(vmSpec('plain-1'));
    await c.admin.createVM(vmSpec('plain-2'));
    await runningOn(c, 'plain-1', 'fit-b');
    await runningOn(c, 'plain-2', 'fit-b');
    await c.admin.createVM(vmSpec('plain-3'));
    await pendingWith(c, 'plain-3', 'no worker fits: 2 workers: 2 have 0 of 1 VM slots free');

    // They stay pending (past a periodic scheduler pass), and nothing is overbooked.
    await sleep(1200);
    for (const name of ['gpu-2', 'rack-a', 'plain-3']) {
      const vm = await c.admin.getVM(name);
      assert.equal(vm.status, 'pending', name);
      assert.equal(vm.worker, undefined, name);
    }
    assert.deepEqual(await placement(c, ['fit-a', 'fit-b']), { 'fit-a': ['gpu-1'], 'fit-b': ['plain-1', 'plain-2'] });

    // Room on fit-a: the oldest pending VM that fits there (gpu-2) gets it; rack-a still waits, with its reason.
    await c.admin.deleteVM('gpu-1');
    await runningOn(c, 'gpu-2', 'fit-a');
    await pendingWith(c, 'rack-a', 'no worker fits: 2 workers: 1 has 0 of 1 VM slots free, 1 lacks label rack=a');
    // Room on fit-b: plain-3 goes there; rack-a cannot.
    await c.admin.deleteVM('plain-1');
    await runningOn(c, 'plain-3', 'fit-b');
    assert.equal((await c.admin.getVM('rack-a')).worker, undefined);
    // fit-a frees up again: rack-a lands.
    await c.admin.deleteVM('gpu-2');
    await runningOn(c, 'rack-a', 'fit-a');
    assert.deepEqual(await placement(c, ['fit-a', 'fit-b']), { 'fit-a': ['rack-a'], 'fit-b': ['plain-2', 'plain-3'] });
    await driversConverged(c, [a, b]);
  });
});

test('labels: a VM with labels lands only on workers that have all of them', async () => {
  await withHarness(async (h) => {
    const c = await h.controller();
    // Spread the load, so that ignoring labels would put VMs on every worker.
    await c.admin.setClusterSettings({ schedulerProfile: 'distribute-load' });
    const workers = [
      await h.worker(c, 'lab-1', { slots: 4, labels: { os: 'sonoma', rack: 'a' } }),
      await h.worker(c, 'lab-2', { slots: 4, labels: { os: 'sonoma', rack: 'b' } }),
      await h.worker(c, 'lab-3', { slots: 4 }),
    ];
    const rackB = ['rb-1', 'rb-2', 'rb-3'];
    const sonoma = ['so-1', 'so-2', 'so-3'];
    await Promise.all(rackB.map((n) => c.admin.createVM(vmSpec(n, { labels: { rack: 'b' } }))));
    await Promise.all(sonoma.map((n) => c.admin.createVM(vmSpec(n, { labels: { os: 'sonoma' } }))));
    await c.admin.createVM(vmSpec('both', { labels: { os: 'sonoma', rack: 'a' } }));
    await c.admin.createVM(vmSpec('nowhere', { labels: { rack: 'c' } }));
    await c.admin.createVM(vmSpec('wrong-value', { labels: { os: 'ventura' } }));
    for (const n of rackB) await runningOn(c, n, 'lab-2');
    for (const n of sonoma) {
      const vm = await waitVM(c, n, 'running', (v) => v.status === 'running');
      assert.ok(vm.worker === 'lab-1' || vm.worker === 'lab-2', `${n} (os=sonoma) landed on ${vm.worker}`);
    }
    await runningOn(c, 'both', 'lab-1');
    await pendingWith(c, 'nowhere', 'no worker fits: 3 workers: 3 lack label rack=c');
    await pendingWith(c, 'wrong-value', 'no worker fits: 3 workers: 3 lack label os=ventura');
    // A waiting VM is placed by what it asks for now, not by what earlier passes worked out for it
    // (lab-1 is full by now; lab-2 has a slot left).
    await c.admin.createVM(vmSpec('gpu-wait', { labels: { rack: 'b' }, resources: { [GPU]: 1 } }));
    await waitVM(c, 'gpu-wait', 'pending for lack of a GPU', (vm) => vm.status === 'pending' && !vm.worker && (vm.status_message ?? '').includes(GPU));
    await c.admin.updateVM({ ...(await c.admin.getVM('gpu-wait')), resources: {} });
    await runningOn(c, 'gpu-wait', 'lab-2');
    // Unlabelled VMs may go anywhere: with distribute-load they go to the empty lab-3.
    await c.admin.createVM(vmSpec('any-1'));
    await runningOn(c, 'any-1', 'lab-3');
    assert.equal((await placement(c, ['lab-1', 'lab-2', 'lab-3']))['lab-3'].join(), 'any-1');
    await driversConverged(c, workers);
  });
});

test('profiles: optimize-utilization (the default) packs onto the busiest worker, distribute-load spreads to the least busy', async () => {
  await withHarness(async (h) => {
    const c = await h.controller();
    const names = ['p-1', 'p-2', 'p-3'];
    const workers = [];
    for (const n of names) workers.push(await h.worker(c, n, { slots: 4 }));
    assert.ok([undefined, 'optimize-utilization'].includes((await c.admin.getClusterSettings()).schedulerProfile));
    const counts = async () => Object.values(await placement(c, names)).map((v) => v.length);
    const createAll = async (prefix: string, n: number) => {
      const vms = Array.from({ length: n }, (_, i) => `${prefix}-${i}`);
      await Promise.all(vms.map((v) => c.admin.createVM(vmSpec(v))));
      for (const v of vms) await waitVM(c, v, 'running', (vm) => vm.status === 'running');
      return vms;
    };

    const packed = await createAll('pack', 6);
    assert.deepEqual(await counts(), [4, 2, 0], 'optimize-utilization fills one worker before the next');
    await driversConverged(c, workers);
    await Promise.all(packed.map((v) => c.admin.deleteVM(v)));
    await driversConverged(c, workers);

    await c.admin.setClusterSettings({ schedulerProfile: 'distribute-load' });
    await createAll('spread', 6);
    assert.deepEqual(await counts(), [2, 2, 2], 'distribute-load spreads evenly');

    // Switching back takes effect at once: the next VMs pack again (ties go by name).
    await c.admin.setClusterSettings({ schedulerProfile: 'optimize-utilization' });
    await createAll('repack', 2);
    assert.deepEqual(await counts(), [4, 2, 2]);
    await driversConverged(c, workers);
  });
});

test('locality: of the workers the profile ranks equal, one holding the VM\'s image gets it, and its placement says so; it never overrides the profile', async () => {
  await withHarness(async (h) => {
    const c = await h.controller();
    const watch = await h.watch(c);
    const workers = [await h.worker(c, 'loc-1', { slots: 4 }), await h.worker(c, 'loc-2', { slots: 4 })];
    // The workers' reports of what they hold (matched as the same string as the VM's image).
    await c.admin.reportImages('loc-1', { images: ['team/base:1', 'sha256:' + 'a'.repeat(64)] });
    await c.admin.reportImages('loc-2', { images: ['team/ubuntu:24.04'] });

    // Both idle (equal): without the image, the name would pick loc-1.
    await c.admin.createVM(vmSpec('near', { image: 'team/ubuntu:24.04' }));
    await runningOn(c, 'near', 'loc-2');
    await watch.seen('near', 'placed saying the image was there', (vm) => vm.status_message === 'scheduled on worker loc-2 (image team/ubuntu:24.04 already there)');

    // loc-2 is now the busier: optimize-utilization packs onto it even though loc-1 holds this image.
    await c.admin.createVM(vmSpec('packed', { image: 'team/base:1' }));
    await runningOn(c, 'packed', 'loc-2');
    await watch.seen('packed', 'placed without a locality note', (vm) => vm.status_message === 'scheduled on worker loc-2');

    // A digest is matched as written, too; with distribute-load loc-1 (now the least busy) gets it anyway.
    await c.admin.setClusterSettings({ schedulerProfile: 'distribute-load' });
    await c.admin.createVM(vmSpec('by-digest', { image: 'sha256:' + 'a'.repeat(64) }));
    await runningOn(c, 'by-digest', 'loc-1');
    await watch.seen('by-digest', 'placed saying the image was there', (vm) => vm.status_message === `scheduled on worker loc-1 (image sha256:${'a'.repeat(64)} already there)`);
    await driversConverged(c, workers);
  });
});

test('pause/resume: a paused worker gets no new VMs but keeps its running ones; resumed, it gets VMs again', async () => {
  await withHarness(async (h) => {
    const c = await h.controller();
    const q1 = await h.worker(c, 'q-1', { slots: 3 });
    const q2 = await h.worker(c, 'q-2', { slots: 3 });
    await c.admin.createVM(vmSpec('a-1'));
    await c.admin.createVM(vmSpec('a-2'));
    await runningOn(c, 'a-1', 'q-1');
    await runningOn(c, 'a-2', 'q-1');

    const paused = await c.admin.updateWorker({ name: 'q-1', scheduling_paused: true });
    assert.equal(paused.scheduling_paused, true);
    // q-1 is the busiest worker, so without the pause optimize-utilization would pick it.
    await c.admin.createVM(vmSpec('b-1'));
    await c.admin.createVM(vmSpec('b-2'));
    await runningOn(c, 'b-1', 'q-2');
    await runningOn(c, 'b-2', 'q-2');
    for (const n of ['a-1', 'a-2']) assert.equal((await c.admin.getVM(n)).status, 'running', `${n} keeps running on the paused worker`);
    assert.deepEqual(await runningLocally(q1, await c.admin.listVMs()), ['a-1', 'a-2']);

    await c.admin.updateWorker({ name: 'q-2', scheduling_paused: true });
    await c.admin.createVM(vmSpec('c-1'));
    await pendingWith(c, 'c-1', 'no worker fits: 2 workers: 2 are paused');
    // The pause survives heartbeats and periodic passes.
    await sleep(1200);
    assert.equal((await c.admin.getVM('c-1')).worker, undefined);
    assert.equal((await c.admin.getWorker('q-1')).scheduling_paused, true);

    await c.admin.updateWorker({ name: 'q-1', scheduling_paused: false });
    await runningOn(c, 'c-1', 'q-1');
    assert.deepEqual(await placement(c, ['q-1', 'q-2']), { 'q-1': ['a-1', 'a-2', 'c-1'], 'q-2': ['b-1', 'b-2'] });
    await driversConverged(c, [q1, q2]);
  });
});

test('offline: the VMs of a worker that stops fail naming it; OnFailure ones are placed elsewhere, Never ones stay failed', async () => {
  await withHarness(async (h) => {
    const timeout = 1500;
    const c = await h.controller({ workerOfflineTimeoutMs: timeout, restartBackoffMs: 100 });
    // Heartbeats (10 s) are rarer than the timeout: a connected WebSocket is what keeps a worker online.
    const o1 = await h.worker(c, 'o-1', { slots: 2 });
    const o2 = await h.worker(c, 'o-2', { slots: 2 });
    await c.admin.createVM(vmSpec('v-never', { restart_policy: 'Never' }));
    await c.admin.createVM(vmSpec('v-onfail', { restart_policy: 'OnFailure' }));
    await runningOn(c, 'v-never', 'o-1');
    await runningOn(c, 'v-onfail', 'o-1');
    const watch = await h.watch(c);

    const lastSeen = Date.parse((await c.admin.getWorker('o-1')).last_seen!);
    await o1.stop();
    const never = await waitVM(c, 'v-never', 'failed', (vm) => vm.status === 'failed');
    assert.match(never.status_message ?? '', /^worker o-1 is offline \(not seen since .+\)$/);
    const failedAt = await watch.seen('v-never', 'failed', (vm) => vm.status === 'failed');
    assert.ok(failedAt >= lastSeen + timeout, `failed ${failedAt - lastSeen} ms after o-1 was last seen; the timeout is ${timeout} ms`);

    const moved = await runningOn(c, 'v-onfail', 'o-2');
    assert.equal(moved.restart_count, 1);
    assert.ok(moved.restarted_at, 'restarted_at is set');
    // It failed first, naming o-1 as offline.
    await watch.seen('v-onfail', 'fail on o-1', (vm) => vm.status === 'failed' && /^worker o-1 is offline/.test(vm.status_message ?? '') && vm.worker === 'o-1');

    // Later: v-never stays failed (and on o-1); v-onfail stays running on o-2, which only has its WebSocket.
    await sleep(timeout + 500);
    const never2 = await c.admin.getVM('v-never');
    assert.deepEqual([never2.status, never2.worker, never2.restart_count], ['failed', 'o-1', 0]);
    const moved2 = await c.admin.getVM('v-onfail');
    assert.deepEqual([moved2.status, moved2.worker, moved2.restart_count], ['running', 'o-2', 1]);
    assert.deepEqual(await runningLocally(o2, await c.admin.listVMs()), ['v-onfail']);
    assert.equal(watch.error, undefined);
  });
});

test('offline after a controller restart: workers get one full timeout from the controller start before their VMs fail', async (t) => {
  await withHarness(async (h) => {
    const timeout = 1500;
    const dataDir = tempDir();
    const c1 = await h.controller({ dataDir, workerOfflineTimeoutMs: timeout });
    const g1 = await h.worker(c1, 'g-1', { slots: 2 });
    await c1.admin.createVM(vmSpec('g-vm'));
    await runningOn(c1, 'g-vm', 'g-1');
    // Online through its WebSocket only: by now its last heartbeat is older than the timeout.
    await sleep(timeout + 200);
    assert.equal((await c1.admin.getVM('g-vm')).status, 'running');
    await h.closeController(c1);
    await g1.stop();
    await sleep(timeout + 200);

    const t0 = Date.now();
    const c2 = await h.controller({ dataDir, workerOfflineTimeoutMs: timeout });
    const before = await c2.admin.getVM('g-vm');
    assert.deepEqual([before.status, before.worker], ['running', 'g-1'], 'the controller shutdown did not fail the VM');
    const watch = await h.watch(c2);
    // Well inside the grace period the VM is still running.
    await sleep(Math.max(0, t0 + timeout - 400 - Date.now()));
    assert.equal((await c2.admin.getVM('g-vm')).status, 'running', `not failed ${Date.now() - t0} ms after the controller start`);

    const failed = await waitVM(c2, 'g-vm', 'failed', (vm) => vm.status === 'failed', timeout + 5000);
    assert.match(failed.status_message ?? '', /^worker g-1 is offline/);
    const failedAt = await watch.seen('g-vm', 'failed', (vm) => vm.status === 'failed');
    assert.ok(failedAt - t0 >= timeout, `failed ${failedAt - t0} ms after the controller start; the grace is ${timeout} ms`);
    assert.ok(failedAt - t0 < timeout + 2500, `failed ${failedAt - t0} ms after the controller start: too late`);
    t.diagnostic(`failed ${failedAt - t0} ms after the controller start (grace ${timeout} ms)`);
  });
});

test('OnFailure restarts back off exponentially, say so in status_message, and stop at the limit; the backoff is capped', async (t) => {
  await withHarness(async (h) => {
    const base = 100;
    const c = await h.controller({ restartBackoffMs: base });
    // One worker: every restart lands on the same worker, with the same VM uid.
    const w = await h.worker(c, 'r-1', { slots: 2 });
    const watch = await h.watch(c);
    await c.admin.createVM(vmSpec('crashy', { restart_policy: 'OnFailure' }));
    const delays: number[] = [];
    for (let i = 0; i < 4; i++) {
      const vm = await waitVM(c, 'crashy', `running after ${i} restarts`, (v) => v.status === 'running' && v.restart_count === i);
      assert.equal(vm.worker, 'r-1');
      const local = (await w.driver.list()).find((l) => l.uid === vm.uid && l.running);
      assert.ok(local, `the driver runs crashy (restart ${i})`);
      const t = Date.now();
      await w.driver.stop(local.localName);
      const pendingMessage = await waitVM(c, 'crashy', 'to show the pending restart', (v) =>
        new RegExp(`^the VM stopped: stopped \\(restart ${i + 1} of 10 in \\d+s\\)$`).test(v.status_message ?? ''),
      );
      assert.equal(pendingMessage.status, 'failed');
      await waitVM(c, 'crashy', `restart ${i + 1}`, (v) => (v.restart_count ?? 0) >= i + 1);
      const failedAt = await watch.seen('crashy', `fail (run ${i})`, (v) => v.status === 'failed' && v.restart_count === i, t);
      const restartedAt = await watch.seen('crashy', `restart ${i + 1}`, (v) => v.restart_count === i + 1, t);
      delays.push(restartedAt - failedAt);
    }
    await waitVM(c, 'crashy', 'running after 4 restarts', (v) => v.status === 'running' && v.restart_count === 4);
    t.diagnostic(`failure → restart delays: ${delays.join(', ')} ms (backoff base ${base} ms)`);
    for (const [i, d] of delays.entries()) {
      const backoff = base * 2 ** i;
      assert.ok(d >= backoff - 30, `restart ${i + 1} came ${d} ms after the failure; the backoff is ${backoff} ms (delays ${delays})`);
      assert.ok(d < backoff + 600, `restart ${i + 1} came ${d} ms after the failure; the backoff is ${backoff} ms (delays ${delays})`);
      if (i > 0) assert.ok(d > delays[i - 1], `the delays grow: ${delays}`);
    }
    // A restarted VM is a fresh run: the old run's failure does not stick to it.
    const final = await c.admin.getVM('crashy');
    assert.equal(final.status, 'running');
    assert.equal((await w.driver.list()).length, 1, 'the failed runs were removed from the worker');

    // The default base (1 s) doubles per restart up to the 5 min cap, and there are at most 10 restarts.
    // restart_count is server-owned, so these VMs go straight into the store.
    const d = await h.controller();
    const failedVM = (name: string, restartCount: number): VM => ({
      ...newVM({ name, image: 'synthetic' }),
      restart_policy: 'OnFailure',
      status: 'failed',
      status_message: 'the VM stopped: stopped',
      restart_count: restartCount,
    });
    await d.ctl.store.create('vms', failedVM('after-3', 3));
    await d.ctl.store.create('vms', failedVM('after-9', 9));
    await d.ctl.store.create('vms', failedVM('after-10', 10));
    await waitVM(d, 'after-3', '8 s backoff', (v) => /^the VM stopped: stopped \(restart 4 of 10 in [78]s\)$/.test(v.status_message ?? ''));
    await waitVM(d, 'after-9', 'capped backoff', (v) => /^the VM stopped: stopped \(restart 10 of 10 in (300|299)s\)$/.test(v.status_message ?? ''));
    await waitVM(d, 'after-10', 'limit', (v) => v.status_message === 'the VM stopped: stopped (restart limit of 10 reached; not restarting)');
    await sleep(1100);
    for (const [name, count] of [['after-3', 3], ['after-9', 9], ['after-10', 10]] as const) {
      const vm = await d.admin.getVM(name);
      assert.deepEqual([vm.status, vm.restart_count, vm.worker], ['failed', count, undefined], name);
    }
  });
});

test('concurrency: 60 concurrent creates on 5 workers × 4 slots place exactly 20, never more than 4 per worker', async () => {
  await withHarness(async (h) => {
    const c = await h.controller();
    const names = ['cc-1', 'cc-2', 'cc-3', 'cc-4', 'cc-5'];
    const workers = [];
    for (const n of names) workers.push(await h.worker(c, n, { slots: 4 }));
    const watch = await h.watch(c);
    const vms = Array.from({ length: 60 }, (_, i) => `load-${String(i).padStart(2, '0')}`);
    await Promise.all(vms.map((v) => c.admin.createVM(vmSpec(v))));

    const full = 'no worker fits: 5 workers: 5 have 0 of 1 VM slots free';
    const settled = async (placed: number, pending: number) => {
      let last = '';
      await waitFor(
        `${placed} running and ${pending} pending`,
        async () => {
          const all = await c.admin.listVMs();
          const running = all.filter((v) => v.worker && v.status === 'running').length;
          const waiting = all.filter((v) => !v.worker && v.status === 'pending' && v.status_message === full).length;
          last = `${running} running, ${waiting} pending with the reason, of ${all.length}`;
          return running === placed && waiting === pending && all.length === placed + pending;
        },
        15_000,
        50,
      ).catch((err: Error) => {
        throw new Error(`${err.message}: ${last}`);
      });
    };
    await settled(20, 40);
    assert.deepEqual(Object.values(await placement(c, names)).map((v) => v.length), [4, 4, 4, 4, 4]);

    // Free 10 slots (2 per worker): 10 more are placed, still no overbooking.
    const byWorker = await placement(c, names);
    const victims = names.flatMap((n) => byWorker[n].slice(0, 2));
    await Promise.all(victims.map((v) => c.admin.deleteVM(v)));
    await settled(20, 30);
    assert.deepEqual(Object.values(await placement(c, names)).map((v) => v.length), [4, 4, 4, 4, 4]);
    await driversConverged(c, workers);

    assert.equal(watch.error, undefined);
    await waitFor('the watch to catch up', () => names.every((n) => watch.load().get(n) === 4) && watch.vms.size === 50, 10_000, 10);
    for (const n of names) assert.equal(watch.peak.get(n), 4, `peak load of ${n} (never above 4 slots)`);
    // Every VM was placed at most once (no VM moved between workers).
    for (const v of vms) {
      const workersSeen = new Set(watch.history.filter((e) => e.vm.name === v && e.vm.worker).map((e) => e.vm.worker));
      assert.ok(workersSeen.size <= 1, `${v} was on ${[...workersSeen]}`);
    }
  });
});

test('push, not poll: with rare heartbeats a created VM runs within a second, and a deleted one is gone from the worker as fast', async (t) => {
  await withHarness(async (h) => {
    const c = await h.controller();
    const w = await h.worker(c, 'push-1', { slots: 2, heartbeatMs: 60_000 });
    const timings: { create: number; delete: number }[] = [];
    for (let i = 0; i < 3; i++) {
      const name = `push-vm-${i}`;
      const t0 = Date.now();
      const created = await c.admin.createVM(vmSpec(name));
      await waitFor(`${name} running`, async () => (await c.admin.getVM(name)).status === 'running', 5000, 10);
      const create = Date.now() - t0;
      assert.equal((await runningLocally(w, [created])).join(), name);

      const t1 = Date.now();
      await c.admin.deleteVM(name);
      await waitFor(`${name} gone from the driver`, async () => !(await w.driver.list()).some((l) => l.uid === created.uid), 5000, 10);
      timings.push({ create, delete: Date.now() - t1 });
    }
    t.diagnostic(`create → running / delete → gone: ${timings.map((x) => `${x.create}/${x.delete}`).join(', ')} ms`);
    for (const x of timings) {
      assert.ok(x.create < 2000, `create → running took ${x.create} ms (${JSON.stringify(timings)})`);
      assert.ok(x.delete < 2000, `delete → gone from the worker took ${x.delete} ms (${JSON.stringify(timings)})`);
    }
  });
});

test('a Linux VM that fits a worker counting no VM slots is placed, though a macOS VM asking the same waits ahead of it: the two never share a verdict', async (t) => {
  const store = new SQLiteStore(join(tempDir(), 'orchard.db'));
  const view = new ClusterView(store);
  const scheduler = new Scheduler(store, view, logger, { offlineTimeoutMs: 60_000, isConnected: () => true });
  t.after(async () => {
    await scheduler.stop();
    view.close();
    store.close();
  });
  await view.loaded;
  // As upstream's Vetu workers: no tart-vms resource, so only macOS Tart VMs need a slot there.
  await store.create('workers', { name: 'vetu-1', runtime: 'vetu', resources: {}, labels: {}, last_seen: new Date().toISOString() });
  await store.create('vms', newVM({ name: 'mac', image: 'img' } as VM));
  await store.create('vms', newVM({ name: 'lin', image: 'img', os: 'linux' } as VM));
  await scheduler.pass();
  assert.equal(view.vms.get('lin')?.worker, 'vetu-1', 'the Linux VM is placed');
  assert.equal(view.vms.get('mac')?.worker, undefined);
  assert.match(view.vms.get('mac')!.status_message!, /no worker fits: 1 worker: 1 has 0 of 1 VM slots free/);
});
