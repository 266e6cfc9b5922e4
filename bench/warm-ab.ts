// Warm starts A/B: create→running through the cluster of a warm-started debian-dev VM (1 vCPU,
// 512 MiB unless --memory says otherwise) on two qemu workers of one controller, one running this tree's QEMU driver and one
// another tree's (a baseline checkout, e.g. `git worktree add --detach /tmp/base main`), alternating
// in one process so both see the same machine load. Each worker makes its own snapshot first.
//
//   node bench/warm-ab.ts --base /tmp/base [--runs 10] [--memory MiB]
import { parseArgs } from 'node:util';
import { readFileSync, rmSync, mkdirSync, symlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pino } from 'pino';
import { QemuDriver } from '../src/worker/drivers/qemu.ts';
import { buildDebianDev } from '../src/worker/images.ts';
import { localNameOf, type VM } from '../src/api/schemas.ts';
import { startWorker } from '../src/worker/run.ts';
import { ADMIN_TOKEN, inProcessController, tempDir, TEST_IMAGES, waitFor } from '../test/helpers.ts';

const { values } = parseArgs({ options: { runs: { type: 'string', default: '10' }, memory: { type: 'string', default: '512' }, base: { type: 'string' } } });
if (!values.base) throw new Error('--base DIR: the baseline tree');
const RUNS = Number(values.runs);
const MEMORY = Number(values.memory);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const spread = (xs: number[]) => `${(Math.min(...xs) / 1000).toFixed(2)}–${(Math.max(...xs) / 1000).toFixed(2)} s`;
const { QemuDriver: BaseDriver } = await import(resolve(values.base, 'src/worker/drivers/qemu.ts')) as { QemuDriver: typeof QemuDriver };

await buildDebianDev(TEST_IMAGES);
const dir = tempDir('orchard-bench-warm-ab-');
const logger = pino({ level: 'error' });
const c = await inProcessController({ dataDir: join(dir, 'controller') });
const sides = ['base', 'new'] as const;
// (no standbys: each VM resumes its snapshot on demand, the path being compared)
const drivers = { base: new BaseDriver({ dataDir: join(dir, 'base'), imagesDir: TEST_IMAGES, standbys: 0 }), new: new QemuDriver({ dataDir: join(dir, 'new'), imagesDir: TEST_IMAGES, standbys: 0 }) };
const workers = [];
for (const side of sides) {
  mkdirSync(join(dir, side));
  symlinkSync(TEST_IMAGES, join(dir, side, 'images'));
  const t0 = performance.now();
  const snap = await drivers[side].snapshot('debian-dev', { cpu: 1, memory: MEMORY });
  const memoryFile = snap.memoryBytes === undefined ? '' : ` + a memory file of ${snap.memoryBytes / 2 ** 20 | 0} MiB`;
  console.log(`${side}: snapshot made in ${((performance.now() - t0) / 1000).toFixed(1)} s (template boot ${snap.bootSeconds?.toFixed(1)} s, save ${snap.saveSeconds?.toFixed(2)} s, state ${(snap.stateBytes ?? 0) / 2 ** 20 | 0} MiB${memoryFile})`);
  workers.push(await startWorker({
    url: c.ctl.url,
    token: { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate },
    name: `ab-${side}`, runtime: 'qemu', labels: { side }, dataDir: join(dir, side), driver: drivers[side], logger,
  }));
}
const times = { base: [] as number[], new: [] as number[] };
/**
 * MiB of the VM's QEMU: resident, and of that its own (anonymous: what it wrote or loaded; the rest is
 * file pages, the snapshot's memory file among them, which the VMs of one snapshot share).
 */
const privateMiB = { base: [] as number[], new: [] as number[] };
function memoryOf(side: (typeof sides)[number], vm: VM): { rss: number; own: number } {
  const { pid } = JSON.parse(readFileSync(join(drivers[side].vmDir(localNameOf(vm)), 'vm.json'), 'utf8')) as { pid: number };
  const kB = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'))?.[1] ?? NaN);
  return { rss: kB('Rss') / 1024, own: kB('Anonymous') / 1024 };
}
try {
  for (let i = 0; i < RUNS; i++) {
    // alternate which side goes first, too
    for (const side of i % 2 ? [...sides].reverse() : sides) {
      const name = `${side}-${i}`;
      const t0 = performance.now();
      await c.admin.createVM({ name, image: 'debian-dev', cpu: 1, memory: MEMORY, labels: { side } });
      await waitFor('running', async () => (await c.admin.getVM(name)).status === 'running', 300_000, 20);
      times[side].push(performance.now() - t0);
      const memory = memoryOf(side, await c.admin.getVM(name));
      privateMiB[side].push(memory.own);
      const events = (await c.admin.listEvents(name, { limit: 100 })).events.map((e) => e.payload ?? '');
      const stage = events.find((e) => e.startsWith('warm start:')) ?? `NOT WARM: ${events.join(' | ')}`;
      console.log(`run ${i + 1} ${side}: ${(times[side].at(-1)! / 1000).toFixed(2)} s, QEMU RSS ${memory.rss | 0} MiB (own ${memory.own | 0})  ${stage.replace(/^warm start: resumed the snapshot of image debian-dev /, '').replace(/: hostname, SSH host keys, machine-id, MAC, clock, user/, '')}`);
      await c.admin.deleteVM(name);
      await waitFor('removed', async () => (await drivers[side].list()).length === 0, 60_000, 100);
    }
  }
  for (const side of sides) console.log(`${side}: create→running, warm (median) ${(median(times[side]) / 1000).toFixed(2)} s (${spread(times[side])}); QEMU's own memory once running (median) ${median(privateMiB[side]) | 0} MiB`);
} finally {
  for (const w of workers) await w.stop();
  await c.close();
  rmSync(dir, { recursive: true, force: true });
}
