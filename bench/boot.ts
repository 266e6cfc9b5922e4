// Boot benchmark: the debian-dev guest's boot-to-SSH time started by hand (QemuDriver: clone, start,
// wait for the SSH banner) next to create→running through the cluster (a controller and a qemu worker
// in this process; running = the guest answers SSH), cold boots and warm starts (resumed from the
// image's snapshot, with the VM's own identity) and warm starts from a standby (that resume done ahead
// of the VM, standby.ts) alternating, in one run. Prints medians, spread and ratios.
//
//   node bench/boot.ts [--runs 3]
import { parseArgs } from 'node:util';
import { rmSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { QemuDriver } from '../src/worker/drivers/qemu.ts';
import { buildDebianDev } from '../src/worker/images.ts';
import { startWorker } from '../src/worker/run.ts';
import { ADMIN_TOKEN, inProcessController, tempDir, TEST_IMAGES, waitFor } from '../test/helpers.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' } } });
const RUNS = Number(values.runs);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${(Math.min(...xs) / 1000).toFixed(2)}–${(Math.max(...xs) / 1000).toFixed(2)} s`;

await buildDebianDev(TEST_IMAGES);
const dir = tempDir('orchard-bench-boot-');
mkdirSync(join(dir, 'worker'));
symlinkSync(TEST_IMAGES, join(dir, 'worker', 'images'));
const logger = pino({ level: 'error' });
const driver = new QemuDriver({ dataDir: join(dir, 'byhand'), imagesDir: TEST_IMAGES, warmStart: false });
const workerDriver = new QemuDriver({ dataDir: join(dir, 'worker'), imagesDir: TEST_IMAGES, warmStart: false });
const warmDriver = new QemuDriver({ dataDir: join(dir, 'warm'), imagesDir: TEST_IMAGES, standbys: 0 });
mkdirSync(join(dir, 'warm'));
symlinkSync(TEST_IMAGES, join(dir, 'warm', 'images'));
// (the warm worker's snapshot)
const standbyDriver = new QemuDriver({ dataDir: join(dir, 'standby'), imagesDir: TEST_IMAGES, standbys: 1 });
mkdirSync(join(dir, 'standby'));
symlinkSync(TEST_IMAGES, join(dir, 'standby', 'images'));
symlinkSync(join(dir, 'warm', 'snapshots'), join(dir, 'standby', 'snapshots'));
const c = await inProcessController({ dataDir: join(dir, 'controller') });
const qemuWorkerOf = (name: string, labels: Record<string, string>, dataDir: string, driver: QemuDriver) => startWorker({
  url: c.ctl.url,
  token: { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate },
  name, runtime: 'qemu', labels, dataDir, driver, logger,
});
const worker = await qemuWorkerOf('bench', { cold: 'yes' }, join(dir, 'worker'), workerDriver);
const warmWorker = await qemuWorkerOf('bench-warm', { warm: 'yes' }, join(dir, 'warm'), warmDriver);
const standbyWorker = await qemuWorkerOf('bench-standby', { standby: 'yes' }, join(dir, 'standby'), standbyDriver);
// The snapshot is made once per image on a worker, before the runs (as `orchard image build` would).
const snapT0 = performance.now();
const snap = await warmDriver.snapshot('debian-dev', { cpu: 1, memory: 512 });
console.log(`snapshot of debian-dev made in ${((performance.now() - snapT0) / 1000).toFixed(1)} s (template boot ${snap.bootSeconds?.toFixed(1)} s, save ${snap.saveSeconds?.toFixed(2)} s, state ${Math.round((snap.stateBytes ?? 0) / 2 ** 20)} MiB + memory file ${Math.round((snap.memoryBytes ?? 0) / 2 ** 20)} MiB)`);
// A VM of the standby worker resumes the snapshot: the worker then keeps a standby.
const standbyReady = () => waitFor('a standby', () => standbyDriver.standbysReady().length === 1, 120_000, 20);
await c.admin.createVM({ name: 'prime', image: 'debian-dev', cpu: 1, memory: 512, labels: { standby: 'yes' } });
await waitFor('running', async () => (await c.admin.getVM('prime')).status === 'running', 300_000, 20);
await c.admin.deleteVM('prime');
await standbyReady();
console.log(`boot benchmark: debian-dev, 1 vCPU, 512 MiB, accel ${driver.accel}, ${RUNS} runs each, alternating\n`);
const byHand: number[] = [];
const cluster: number[] = [];
const warm: number[] = [];
const stages: string[] = [];
const fromStandby: number[] = [];
const standbyStages: string[] = [];
const warmStart = async (name: string, labels: Record<string, string>, times: number[], said: string[], d: QemuDriver) => {
  const t0 = performance.now();
  await c.admin.createVM({ name, image: 'debian-dev', cpu: 1, memory: 512, labels });
  await waitFor('running', async () => (await c.admin.getVM(name)).status === 'running', 300_000, 20);
  times.push(performance.now() - t0);
  const events = (await c.admin.listEvents(name, { limit: 100 })).events.map((e) => e.payload ?? '');
  said.push(events.find((e) => e.startsWith('warm start:')) ?? `NOT WARM: ${events.join(' | ')}`);
  await c.admin.deleteVM(name);
  await waitFor('removed', async () => (await d.list()).length === 0, 60_000, 100);
};
try {
  for (let i = 0; i < RUNS; i++) {
    const vm = { localName: `orchard-bench-${i}`, uid: `bench-${i}`, image: 'debian-dev', imagePullPolicy: 'IfNotPresent' as const, cpu: 1, memory: 512, username: 'admin', password: 'admin' };
    let t0 = performance.now();
    await driver.prepare(vm);
    await driver.start(vm);
    await driver.waitReady(vm.localName);
    byHand.push(performance.now() - t0);
    await driver.remove(vm.localName);

    t0 = performance.now();
    await c.admin.createVM({ name: `boot-${i}`, image: 'debian-dev', cpu: 1, memory: 512, labels: { cold: 'yes' } });
    await waitFor('running', async () => (await c.admin.getVM(`boot-${i}`)).status === 'running', 300_000, 20);
    cluster.push(performance.now() - t0);
    await c.admin.deleteVM(`boot-${i}`);
    await waitFor('removed', async () => (await workerDriver.list()).length === 0, 60_000, 100);

    await warmStart(`warm-${i}`, { warm: 'yes' }, warm, stages, warmDriver);
    await warmStart(`standby-${i}`, { standby: 'yes' }, fromStandby, standbyStages, standbyDriver);
    await standbyReady(); // (made again before the next run, not during it)
    console.log(`run ${i + 1}: by hand ${(byHand[i] / 1000).toFixed(2)} s, cold through the cluster ${(cluster[i] / 1000).toFixed(2)} s, warm through the cluster ${(warm[i] / 1000).toFixed(2)} s, from a standby ${(fromStandby[i] / 1000).toFixed(2)} s`);
    console.log(`  ${stages[i]}\n  ${standbyStages[i]}`);
  }
  const ratio = median(cluster) / median(byHand);
  console.log(`\nboot-to-SSH by hand (median)                 ${(median(byHand) / 1000).toFixed(2)} s  (${spread(byHand)})`);
  console.log(`create→running via cluster, cold (median)    ${(median(cluster) / 1000).toFixed(2)} s  (${spread(cluster)})`);
  console.log(`create→running via cluster, warm (median)    ${(median(warm) / 1000).toFixed(2)} s  (${spread(warm)})`);
  console.log(`  … from a standby (median)                  ${(median(fromStandby) / 1000).toFixed(2)} s  (${spread(fromStandby)})`);
  console.log(`ratio cluster ÷ by hand: ${ratio.toFixed(2)} (target ≤ 1.2: ${ratio <= 1.2 ? 'met' : 'MISSED'})`);
  const speedup = median(cluster) / median(warm);
  console.log(`warm start: ${speedup.toFixed(1)}× faster than a cold boot through the cluster (target ≥ 4: ${speedup >= 4 ? 'met' : 'MISSED'}; ≤ 1 s: ${median(warm) <= 1000 ? 'met' : 'MISSED'})`);
  const fromStandbySpeedup = median(cluster) / median(fromStandby);
  console.log(`warm start from a standby: ${fromStandbySpeedup.toFixed(1)}× faster than a cold boot (target ≥ 4: ${fromStandbySpeedup >= 4 ? 'met' : 'MISSED'}; ≤ 1 s: ${median(fromStandby) <= 1000 ? 'met' : 'MISSED'})`);
} finally {
  await worker.stop();
  await warmWorker.stop();
  await standbyWorker.stop();
  await c.close();
  rmSync(dir, { recursive: true, force: true });
}
