// Boot benchmark: the debian-dev guest's boot-to-SSH time started by hand (QemuDriver: clone, start,
// wait for the SSH banner) next to create→running through the cluster (a controller and a qemu worker
// in this process; running = the guest answers SSH), alternating, in one run. Prints medians and the ratio.
//
//   node bench/boot.ts [--runs 3]
import { parseArgs } from 'node:util';
import { rmSync, mkdirSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { pino } from 'pino';
import { QemuDriver } from '../src/worker/drivers/qemu.ts';
import { buildDebianDev } from '../src/worker/images.ts';
import { startWorker } from '../src/worker/run.ts';
import { inProcessController, tempDir, waitFor, ADMIN_TOKEN } from '../test/helpers.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '3' } } });
const RUNS = Number(values.runs);
const IMAGES = process.env.ORCHARD_TEST_IMAGES ?? join(tmpdir(), 'orchard-test-images');
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

await buildDebianDev(IMAGES);
const dir = tempDir('orchard-bench-boot-');
mkdirSync(join(dir, 'worker'));
symlinkSync(IMAGES, join(dir, 'worker', 'images'));
const logger = pino({ level: 'error' });
const driver = new QemuDriver({ dataDir: join(dir, 'byhand'), imagesDir: IMAGES });
const workerDriver = new QemuDriver({ dataDir: join(dir, 'worker'), imagesDir: IMAGES });
const c = await inProcessController({ dataDir: join(dir, 'controller') });
const worker = await startWorker({
  url: c.ctl.url,
  token: { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate },
  name: 'bench',
  runtime: 'qemu',
  labels: {},
  dataDir: join(dir, 'worker'),
  driver: workerDriver,
  logger,
});
console.log(`boot benchmark: debian-dev, 1 vCPU, 512 MiB, accel ${driver.accel}, ${RUNS} runs each, alternating\n`);
const byHand: number[] = [];
const cluster: number[] = [];
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
    await c.admin.createVM({ name: `boot-${i}`, image: 'debian-dev', cpu: 1, memory: 512 });
    await waitFor('running', async () => (await c.admin.getVM(`boot-${i}`)).status === 'running', 300_000, 20);
    cluster.push(performance.now() - t0);
    await c.admin.deleteVM(`boot-${i}`);
    await waitFor('removed', async () => (await workerDriver.list()).length === 0, 60_000, 100);
    console.log(`run ${i + 1}: by hand ${(byHand[i] / 1000).toFixed(2)} s, through the cluster ${(cluster[i] / 1000).toFixed(2)} s`);
  }
  const ratio = median(cluster) / median(byHand);
  console.log(`\nboot-to-SSH by hand (median)          ${(median(byHand) / 1000).toFixed(2)} s`);
  console.log(`create→running via cluster (median)   ${(median(cluster) / 1000).toFixed(2)} s`);
  console.log(`ratio cluster ÷ by hand: ${ratio.toFixed(2)} (target ≤ 1.2: ${ratio <= 1.2 ? 'met' : 'MISSED'})`);
} finally {
  await worker.stop();
  await c.close();
  rmSync(dir, { recursive: true, force: true });
}
