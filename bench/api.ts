// API benchmark: creates N VMs (default 10,000) against a real controller process (TLS, SQLite
// WAL, every 2xx on disk) and prints creates/s with p50/p99 latency and the controller's event-loop
// delay during the creates, next to a baseline of the same number of authenticated no-op requests
// (GET /v1/controller/info) in the same run; then the cold-restart time to the first served request
// with all of it stored, next to an empty controller.
//
//   node bench/api.ts [--vms 10000] [--concurrency 32]
import { parseArgs } from 'node:util';
import { rmSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { OrchardClient } from '../src/client/client.ts';
import { closedLoop, pct } from './load-harness.ts';
import { ADMIN_TOKEN, spawnController, tempDir, type ChildController } from '../test/helpers.ts';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const { values } = parseArgs({ options: { vms: { type: 'string', default: '10000' }, concurrency: { type: 'string', default: '32' } } });
const N = Number(values.vms);
const CONCURRENCY = Number(values.concurrency);

/** The controller's event-loop delay (prom-client's monitorEventLoopDelay, reset at each scrape) since the last call. */
async function loopDelay(client: OrchardClient) {
  const { body } = await client.request<string>('GET', '/metrics', undefined, { raw: true });
  const text = String(body);
  const ms = (name: string) => 1000 * Number(new RegExp(`^orchard_controller_nodejs_eventloop_lag_${name}_seconds (\\S+)$`, 'm').exec(text)?.[1] ?? NaN);
  return { p50: ms('p50'), p99: ms('p99'), max: ms('max') };
}

async function run(label: string, n: number, op: (i: number) => Promise<unknown>) {
  const { latencies, seconds } = await closedLoop(n, CONCURRENCY, op);
  const result = { label, perSecond: n / seconds, p50: pct(latencies, 50), p99: pct(latencies, 99) };
  console.log(`${label.padEnd(34)} ${result.perSecond.toFixed(0).padStart(7)}/s   p50 ${result.p50.toFixed(2)} ms   p99 ${result.p99.toFixed(2)} ms`);
  return result;
}

/** Spawn time until the first authenticated request is served. */
async function restartTime(dataDir: string): Promise<{ ms: number; ctl: ChildController }> {
  const t0 = performance.now();
  const ctl = await spawnController(dataDir);
  const client = new OrchardClient({ url: ctl.url, certificate: readFileSync(join(dataDir, 'controller.crt'), 'utf8'), serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  await client.listVMs();
  const ms = performance.now() - t0;
  client.close();
  return { ms, ctl };
}

const dataDir = tempDir('orchard-bench-');
const emptyDir = tempDir('orchard-bench-empty-');
try {
  console.log(`orchard API benchmark: ${N} VMs, ${CONCURRENCY} concurrent requests, one controller process (TLS, SQLite WAL, every 2xx on disk)\n`);
  // Warm-up restart so the certificate exists and file caches are comparable for both restart runs.
  const first = await restartTime(dataDir);
  const ctl = first.ctl;
  const client = new OrchardClient({ url: ctl.url, certificate: readFileSync(join(dataDir, 'controller.crt'), 'utf8'), serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  const baseline = await run('baseline: GET /v1/controller/info', N, () => client.info());
  await loopDelay(client);
  const creates = await run('POST /v1/vms', N, (i) => client.createVM({ name: `bench-${i}`, image: 'debian-dev', cpu: 1, memory: 512, labels: { pool: `p${i % 10}` } }));
  const delay = await loopDelay(client);
  console.log(`${'  event-loop delay during creates'.padEnd(34)} p50 ${delay.p50.toFixed(2)} ms   p99 ${delay.p99.toFixed(2)} ms   max ${delay.max.toFixed(2)} ms`);
  const t0 = performance.now();
  const all = await client.listVMs();
  const listMs = performance.now() - t0;
  if (all.length !== N) throw new Error(`expected ${N} VMs, listed ${all.length}`);
  console.log(`${'GET /v1/vms (all ' + N + ')'.padEnd(34)} ${listMs.toFixed(1)} ms`);
  client.close();
  await ctl.kill('SIGKILL');

  await restartTime(emptyDir).then(async (r) => r.ctl.kill('SIGKILL')); // creates the empty dir's certificate
  const empty = await restartTime(emptyDir);
  await empty.ctl.kill('SIGKILL');
  const full = await restartTime(dataDir);
  await full.ctl.kill('SIGKILL');
  console.log(`${'cold restart, empty store'.padEnd(34)} ${empty.ms.toFixed(0)} ms to the first served request`);
  console.log(`${`cold restart, ${N} VMs stored`.padEnd(34)} ${full.ms.toFixed(0)} ms to the first served request (GET /v1/vms)`);
  console.log(`\nratio creates/s ÷ baseline requests/s: ${(creates.perSecond / baseline.perSecond).toFixed(2)}`);
  console.log(`ratio restart with ${N} VMs ÷ empty restart: ${(full.ms / empty.ms).toFixed(2)}`);
  console.log(`targets: >= 2000 creates/s (${creates.perSecond >= 2000 ? 'met' : 'MISSED'}), p99 < 20 ms (${creates.p99 < 20 ? 'met' : 'MISSED'}), restart < 1 s (${full.ms < 1000 ? 'met' : 'MISSED'})`);
} finally {
  rmSync(dataDir, { recursive: true, force: true });
  rmSync(emptyDir, { recursive: true, force: true });
}
