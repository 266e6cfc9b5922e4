// The load harness's synthetic workers in a process of their own (see Fleet in load-harness.ts), so
// that their work (1,000 workers' TLS connections, reports and syncs) does not delay the bench
// process's event loop, which times the creates: measured in one process, the harness's own loop
// delay (p99 ≈ 15 ms at 1,000 workers) was part of every create's latency.
//
//   node bench/load-fleet.ts URL CERT_FILE DATA_DIR N SLOTS   (forked with an IPC channel)
// Says {ready: true} once all N have started; answers "connected" with one 0/1 per worker.
import { readFileSync } from 'node:fs';
import { pino } from 'pino';
import { OrchardClient } from '../src/client/client.ts';
import type { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import type { OrchardWorker } from '../src/worker/worker.ts';
import { WORKER_HTTP_CONNECTIONS } from '../src/worker/run.ts';
import { ADMIN_TOKEN } from '../test/helpers.ts';
import { startSyntheticWorkers } from './load-harness.ts';

const [url, certFile, dataDir, n, slots] = process.argv.slice(2);
const certificate = readFileSync(certFile, 'utf8');
const fleet = { workers: [] as OrchardWorker[], drivers: [] as SyntheticDriver[] };
await startSyntheticWorkers(fleet, Number(n), Number(slots), {
  client: () => new OrchardClient({ url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, maxSockets: WORKER_HTTP_CONNECTIONS }),
  dataDir,
  logger: pino({ level: 'silent' }),
});
const { workers } = fleet;
process.send!({ ready: true });
process.on('message', (m: string) => {
  if (m === 'connected') process.send!({ connected: workers.map((w) => (w.connected ? 1 : 0)) });
  else if (m === 'stop') void Promise.all(workers.map((w) => w.stop())).then(() => process.exit(0));
});
process.on('disconnect', () => process.exit(0));
