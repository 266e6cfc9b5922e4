// The load harness's synthetic workers in a process of their own (see Fleet in load-harness.ts), so
// that their work (1,000 workers' TLS connections, reports and syncs) does not delay the bench
// process's event loop, which times the creates: measured in one process, the harness's own loop
// delay (p99 ≈ 15 ms at 1,000 workers) was part of every create's latency.
//
//   node bench/load-fleet.ts URL CERT_FILE DATA_DIR N SLOTS   (forked with an IPC channel)
// Says {ready: true} once all N have started; answers "connected" with one 0/1 per worker.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { OrchardClient } from '../src/client/client.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { WORKER_HTTP_CONNECTIONS } from '../src/worker/run.ts';
import { ADMIN_TOKEN } from '../test/helpers.ts';

const [url, certFile, dataDir, n, slots] = process.argv.slice(2);
const certificate = readFileSync(certFile, 'utf8');
const logger = pino({ level: 'silent' });
const workers: OrchardWorker[] = [];
const CONCURRENCY = 50;

let next = 0;
await Promise.all(
  Array.from({ length: CONCURRENCY }, async () => {
    while (next < Number(n)) {
      const i = next++;
      const client = new OrchardClient({ url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, maxSockets: WORKER_HTTP_CONNECTIONS });
      const worker = new OrchardWorker({ client, name: `load-${i}`, driver: new SyntheticDriver(), dataDir: join(dataDir, String(i)), slots: Number(slots), heartbeatMs: 10_000, logger });
      workers[i] = worker;
      await worker.start();
    }
  }),
);
process.send!({ ready: true });
process.on('message', (m: string) => {
  if (m === 'connected') process.send!({ connected: workers.map((w) => (w.connected ? 1 : 0)) });
  else if (m === 'stop') void Promise.all(workers.map((w) => w.stop())).then(() => process.exit(0));
});
process.on('disconnect', () => process.exit(0));
