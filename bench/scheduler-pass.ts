// The scheduler's passes alone, as in a burst at 1,000 workers: real store (SQLite), real view, one
// pass per 36 new VMs (a 20 ms pass interval at ~1,800 creates/s), every worker connected. Prints
// the process's CPU per pass and per VM placed (the store's writes and their fsync included, the
// creates' excluded).
//
//   node bench/scheduler-pass.ts [--workers 1000] [--vms 10000] [--per-pass 36] [--src DIR]
// --src: the src/ directory of another tree (e.g. a worktree of the base commit), for before/after.
import { parseArgs } from 'node:util';
import { join, resolve } from 'node:path';
import { rmSync } from 'node:fs';
import { pino } from 'pino';
import type { VM, Worker } from '../src/api/schemas.ts';
import { tempDir } from '../test/helpers.ts';

const { values } = parseArgs({ options: { workers: { type: 'string', default: '1000' }, vms: { type: 'string', default: '10000' }, 'per-pass': { type: 'string', default: '36' }, src: { type: 'string', default: join(import.meta.dirname, '../src') } } });
const src = resolve(values.src);
const { SQLiteStore } = (await import(join(src, 'controller/store/sqlite.ts'))) as typeof import('../src/controller/store/sqlite.ts');
const { ClusterView } = (await import(join(src, 'controller/view.ts'))) as typeof import('../src/controller/view.ts');
const { Scheduler } = (await import(join(src, 'controller/scheduler.ts'))) as typeof import('../src/controller/scheduler.ts');
const { newVM } = (await import(join(src, 'controller/domain/vms.ts'))) as typeof import('../src/controller/domain/vms.ts');
const { RESOURCE_TART_VMS } = (await import(join(src, 'api/schemas.ts'))) as typeof import('../src/api/schemas.ts');

const nWorkers = Number(values.workers);
const nVMs = Number(values.vms);
const perPass = Number(values['per-pass']);
const dir = tempDir('orchard-sched-');
const store = new SQLiteStore(join(dir, 'orchard.db'));
const view = new ClusterView(store);
await view.loaded;
const scheduler = new Scheduler(store, view, pino({ level: 'silent' }), { offlineTimeoutMs: 180_000, isConnected: () => true });
const now = new Date().toISOString();
await Promise.all(Array.from({ length: nWorkers }, (_, i) => store.create('workers', { name: `load-${i}`, resources: { [RESOURCE_TART_VMS]: Math.ceil(nVMs / nWorkers) + 1 }, labels: {}, last_seen: now } as Worker)));
let cpu = 0;
let passes = 0;
for (let made = 0; made < nVMs; made += perPass) {
  await Promise.all(Array.from({ length: Math.min(perPass, nVMs - made) }, (_, i) => store.create('vms', newVM({ name: `vm-${made + i}`, image: 'synthetic', cpu: 1, memory: 512 } as VM))));
  const c0 = process.cpuUsage();
  await scheduler.pass();
  const c = process.cpuUsage(c0);
  cpu += c.user + c.system;
  passes++;
}
const placed = [...view.vms.values()].filter((v) => v.worker).length;
console.log(`${nWorkers} workers, ${placed} of ${nVMs} VMs placed in ${passes} passes: CPU ${(cpu / 1000 / passes).toFixed(3)} ms per pass, ${(cpu / placed).toFixed(1)} µs per VM, ${(cpu / 1e6).toFixed(2)} s in all`);
await scheduler.stop();
view.close();
store.close();
rmSync(dir, { recursive: true, force: true });
