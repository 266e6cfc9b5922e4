// What a controller holds with many VMs running: 100 synthetic workers × 10,000 VMs (32 creates in
// flight) and one watch of all VMs open, then the controller's RSS each second for 8 s (it gives
// back the burst's garbage once quiet, src/controller/memory.ts) and a heap snapshot of it
// (--heapsnapshot-signal) in DIR, to open in Chrome's DevTools. The figures in BENCHMARKS.md
// ("The controller's CPU per create and per report").
//
//   node bench/heap.ts DIR [--vms 10000]
import { readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { Cluster, closedLoop, Watcher } from './load-harness.ts';

const { values, positionals } = parseArgs({ allowPositionals: true, options: { vms: { type: 'string', default: '10000' } } });
const dir = resolve(positionals[0] ?? '.');
const nVMs = Number(values.vms);
process.env.LOAD_CONTROLLER_NODE_OPTIONS = `--heapsnapshot-signal=SIGUSR2 --diagnostic-dir=${dir}`;

const cluster = new Cluster();
await cluster.startController();
await cluster.startWorkers(100, Math.ceil(nVMs / 100));
const watcher = new Watcher(cluster.admin);
await closedLoop(nVMs, 32, (i) => cluster.admin.createVM({ name: `vm-${i}`, image: 'synthetic', cpu: 1, memory: 512 }));
await watcher.until(() => watcher.runningAt.size >= nVMs, 600_000, 'all running');
await cluster.admin.listVMs();

const pid = cluster.ctl.proc.pid!;
const rssMB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
const samples: string[] = [];
for (let i = 0; i < 8; i++) {
  samples.push(rssMB().toFixed(0));
  await new Promise((r) => setTimeout(r, 1000));
}
console.log(`controller RSS with ${nVMs} VMs running, each second for 8 s: ${samples.join(' ')} MB`);

const before = new Set(readdirSync(dir));
process.kill(pid, 'SIGUSR2');
let file: string | undefined;
let size = -1;
// The snapshot is written by the controller: done when its file stops growing.
for (;;) {
  await new Promise((r) => setTimeout(r, 1000));
  file ??= readdirSync(dir).find((f) => f.endsWith('.heapsnapshot') && !before.has(f));
  if (!file) continue;
  const now = statSync(join(dir, file)).size;
  if (now === size && now > 0) break;
  size = now;
}
console.log(`heap snapshot: ${join(dir, file)}`);
watcher.stop();
await cluster.stop();
rmSync(cluster.dataDir, { recursive: true, force: true });
