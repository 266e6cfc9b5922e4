// The store's write path as a burst of VMs drives it, with the view subscribed and one watch of all
// VMs: per VM a create, its placement (then the worker's sync push takes that worker's VMs' JSON from
// the view) and a state report with one event, 50 mutations per group commit, on a real SQLite file.
// Prints the CPU per VM: the part of the controller's per-VM cost that is the store's, the view's and
// the watch lines'. No HTTP, TLS or WebSocket: those are bench/load.ts's.
//
//   node bench/store-path.ts [--vms 10000] [--workers 1000] [--src DIR]
// --src: the src/ directory of another tree (e.g. a worktree of the base commit), for before/after.
import { parseArgs } from 'node:util';
import { join, resolve } from 'node:path';
import { rmSync } from 'node:fs';
import type { VM } from '../src/api/schemas.ts';
import type { Change } from '../src/controller/store/store.ts';
import { tempDir } from '../test/helpers.ts';

const { values } = parseArgs({ options: { vms: { type: 'string', default: '10000' }, workers: { type: 'string', default: '1000' }, src: { type: 'string', default: join(import.meta.dirname, '../src') } } });
const src = resolve(values.src);
const { SQLiteStore } = (await import(join(src, 'controller/store/sqlite.ts'))) as typeof import('../src/controller/store/sqlite.ts');
const { ClusterView } = (await import(join(src, 'controller/view.ts'))) as typeof import('../src/controller/view.ts');
const { applyStateReport, newVM } = (await import(join(src, 'controller/domain/vms.ts'))) as typeof import('../src/controller/domain/vms.ts');

const nVMs = Number(values.vms);
const nWorkers = Number(values.workers);
const dir = tempDir('orchard-store-path-');
const store = new SQLiteStore(join(dir, 'orchard.db'));
const view = new ClusterView(store);
await view.loaded;
// The watch's line of each change, made as watch.ts makes it for a reader who sees everything (a tree
// whose changes carry no JSON serialises the object).
let watchBytes = 0;
store.subscribe((c: Change) => {
  const line = c.json !== undefined ? `{"type":"${c.type}","object":${c.json}}\n` : JSON.stringify({ type: c.type, object: c.object }) + '\n';
  watchBytes += Buffer.from(line).length;
});
const inGroups = async (f: (i: number) => Promise<unknown>) => {
  for (let i = 0; i < nVMs; i += 50) await Promise.all(Array.from({ length: Math.min(50, nVMs - i) }, (_, j) => f(i + j)));
};
const c0 = process.cpuUsage();
await inGroups((i) => store.create('vms', newVM({ name: `vm-${i}`, image: 'synthetic', cpu: 1, memory: 512 } as VM)));
await inGroups(async (i) => {
  const worker = `worker-${i % nWorkers}`;
  await store.update('vms', `vm-${i}`, (v) => ({ ...v, worker, scheduled_at: new Date().toISOString() }));
  view.vmsJSON(worker);
});
await inGroups((i) =>
  store.transaction((tx) => {
    const vm = tx.update('vms', `vm-${i}`, (v) => applyStateReport(v, { status: 'running', localName: `orchard-vm-${i}` }, new Date().toISOString()));
    if (vm.uid) tx.appendEvents(vm.uid, [{ kind: 'state', timestamp: 1, payload: 'running' }]);
    return vm;
  }),
);
const c = process.cpuUsage(c0);
console.log(`${nVMs} VMs (create, placement and its sync JSON, state report with an event; one watch, ${(watchBytes / 1048576).toFixed(1)} MB of lines): CPU ${((c.user + c.system) / nVMs).toFixed(1)} µs per VM, ${((c.user + c.system) / 1e6).toFixed(2)} s in all`);
view.close();
store.close();
rmSync(dir, { recursive: true, force: true });
