// Boot benchmark: the debian-dev guest's boot-to-SSH time started by hand (QemuDriver: clone, start,
// wait for the SSH banner) next to create→running through the cluster (a controller and a qemu worker
// in this process; running = the guest answers SSH), cold boots and warm starts (resumed from the
// image's snapshot, with the VM's own identity) alternating, in one run. Prints medians, spread and ratios.
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
const warmDriver = new QemuDriver({ dataDir: join(dir, 'warm'), imagesDir: TEST_IMAGES });
mkdirSync(join(dir, 'warm'));
symlinkSync(TEST_IMAGES, join(dir, 'warm', 'images'));
const c = await inProcessController({ dataDir: join(dir, 'controller') });
const qemuWorkerOf = (name: string, labels: Record<string, string>, dataDir: string, driver: QemuDriver) => startWorker({
  url: c.ctl.url,
  token: { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate },
  name, runtime: 'qemu', labels, dataDir, driver, logger,
});
const worker = await qemuWorkerOf('bench', { cold: 'yes' }, join(dir, 'worker'), workerDriver);
const warmWorker = await qemuWorkerOf('bench-warm', { warm: 'yes' }, join(dir, 'warm'), warmDriver);
// The snapshot is made once per image on a worker, before the runs (as `orchard image build` would).
const snapT0 = performance.now();
const snap = await warmDriver.snapshot('debian-dev', { cpu: 1, memory: 512 });
console.log(`snapshot of debian-dev made in ${((performance.now() - snapT0) / 1000).toFixed(1)} s (template boot ${snap.bootSeconds?.toFixed(1)} s, save ${snap.saveSeconds?.toFixed(2)} s, state ${Math.round((snap.stateBytes ?? 0) / 2 ** 20)} MiB + memory file ${Math.round((snap.memoryBytes ?? 0) / 2 ** 20)} MiB)`);
console.log(`boot benchmark: debian-dev, 1 vCPU, 512 MiB, accel ${driver.accel}, ${RUNS} runs each, alternating\n`);
const byHand: number[] = [];
const cluster: number[] = [];
const warm: number[] = [];
const stages: string[] = [];
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

    t0 = performance.now();
    await c.admin.createVM({ name: `warm-${i}`, image: 'debian-dev', cpu: 1, memory: 512, labels: { warm: 'yes' } });
    await waitFor('running', async () => (await c.admin.getVM(`warm-${i}`)).status === 'running', 300_000, 20);
    warm.push(performance.now() - t0);
    const events = (await c.admin.listEvents(`warm-${i}`, { limit: 100 })).events.map((e) => e.payload ?? '');
    stages.push(events.find((e) => e.startsWith('warm start:')) ?? `NOT WARM: ${events.join(' | ')}`);
    await c.admin.deleteVM(`warm-${i}`);
    await waitFor('removed', async () => (await warmDriver.list()).length === 0, 60_000, 100);
    console.log(`run ${i + 1}: by hand ${(byHand[i] / 1000).toFixed(2)} s, cold through the cluster ${(cluster[i] / 1000).toFixed(2)} s, warm through the cluster ${(warm[i] / 1000).toFixed(2)} s`);
    console.log(`  ${stages[i]}`);
  }
  const ratio = median(cluster) / median(byHand);
  console.log(`\nboot-to-SSH by hand (median)                 ${(median(byHand) / 1000).toFixed(2)} s  (${spread(byHand)})`);
  console.log(`create→running via cluster, cold (median)    ${(median(cluster) / 1000).toFixed(2)} s  (${spread(cluster)})`);
  console.log(`create→running via cluster, warm (median)    ${(median(warm) / 1000).toFixed(2)} s  (${spread(warm)})`);
  console.log(`ratio cluster ÷ by hand: ${ratio.toFixed(2)} (target ≤ 1.2: ${ratio <= 1.2 ? 'met' : 'MISSED'})`);
  const speedup = median(cluster) / median(warm);
  console.log(`warm start: ${speedup.toFixed(1)}× faster than a cold boot through the cluster (target ≥ 4: ${speedup >= 4 ? 'met' : 'MISSED'}; ≤ 1 s: ${median(warm) <= 1000 ? 'met' : 'MISSED'})`);
} finally {
  await worker.stop();
  await warmWorker.stop();
  await c.close();
  rmSync(dir, { recursive: true, force: true });
}
