// A client in a process of its own, so its figures are not slowed by the load benchmark's many
// in-process workers. Prints "ready", then waits for one line on stdin and runs the probe:
//
//   node bench/probe.ts first-served URL CERT_FILE ACCOUNT TOKEN
//       ms from "go" until the controller first answers GET /v1/vms with 200 (retrying every 10 ms)
//   node bench/probe.ts list N URL CERT_FILE ACCOUNT TOKEN
//       N timings of GET /v1/vms, as "response_ms parse_ms count" lines
//   node bench/probe.ts fresh N URL CERT_FILE ACCOUNT TOKEN
//       N timings (ms, one a line) of GET /v1/vms, each on a new TLS connection, one every 50 ms
//   node bench/probe.ts creates N:CONCURRENCY:PREFIX URL CERT_FILE ACCOUNT TOKEN
//       N creates of VMs PREFIX0… (image "synthetic"), CONCURRENCY in flight, with the client API:
//       "seconds S cpu C" (the closed loop's wall time, this process's CPU seconds), then one
//       "NAME SENT ACKNOWLEDGED" line per create (wall-clock ms, comparable between processes)
import { readFileSync } from 'node:fs';
import https from 'node:https';
import { performance } from 'node:perf_hooks';
import { OrchardClient } from '../src/client/client.ts';
import { closedLoop } from './load-harness.ts';

const mode = process.argv[2];
const counted = mode === 'list' || mode === 'fresh' || mode === 'creates';
const times = counted ? Number(process.argv[3].split(':')[0]) : 1;
const [url, certFile, account, token] = process.argv.slice(counted ? 4 : 3);
const ca = readFileSync(certFile, 'utf8');
const authorization = 'Basic ' + Buffer.from(`${account}:${token}`).toString('base64');
const agent = new https.Agent({ keepAlive: true, ca });

/** The body of GET /v1/vms, or undefined when the controller does not answer 200. */
const list = (fresh: boolean) =>
  new Promise<string | undefined>((resolve) => {
    const req = https.get(new URL('/v1/vms', url), { ca, headers: { authorization }, agent: fresh ? false : agent, timeout: 30_000 }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve(res.statusCode === 200 ? Buffer.concat(chunks).toString('utf8') : undefined));
    });
    req.on('error', () => resolve(undefined));
    req.on('timeout', () => req.destroy());
  });

console.log('ready');
process.stdin.once('data', async () => {
  if (mode === 'first-served') {
    const t0 = performance.now();
    while ((await list(true)) === undefined) await new Promise((r) => setTimeout(r, 10));
    console.log((performance.now() - t0).toFixed(0));
  } else if (mode === 'creates') {
    const [, concurrency, prefix] = process.argv[3].split(':');
    const client = new OrchardClient({ url, certificate: ca, serviceAccountName: account, serviceAccountToken: token });
    const sent: number[] = [];
    const acknowledged: number[] = [];
    const now = () => performance.timeOrigin + performance.now();
    const cpu0 = process.cpuUsage();
    const loop = await closedLoop(times, Number(concurrency), async (i) => {
      sent[i] = now();
      await client.createVM({ name: `${prefix}${i}`, image: 'synthetic', cpu: 1, memory: 512 });
      acknowledged[i] = now();
    });
    const cpu = process.cpuUsage(cpu0);
    const lines = [`seconds ${loop.seconds} cpu ${(cpu.user + cpu.system) / 1e6}`];
    for (let i = 0; i < times; i++) lines.push(`${prefix}${i} ${sent[i].toFixed(3)} ${acknowledged[i].toFixed(3)}`);
    process.stdout.write(lines.join('\n') + '\n', () => process.exit(0));
    return;
  } else if (mode === 'fresh') {
    for (let i = 0; i < times; i++) {
      const t0 = performance.now();
      const ok = (await list(true)) !== undefined;
      console.log(ok ? (performance.now() - t0).toFixed(1) : 'failed');
      await new Promise((r) => setTimeout(r, 50));
    }
  } else {
    await list(false); // the connection, set up once as a client with keep-alive does
    for (let i = 0; i < times; i++) {
      const t0 = performance.now();
      const body = await list(false);
      const t1 = performance.now();
      const n = (JSON.parse(body ?? 'null') as unknown[] | null)?.length ?? -1;
      console.log(`${(t1 - t0).toFixed(1)} ${(performance.now() - t1).toFixed(1)} ${n}`);
    }
  }
  process.exit(0);
});
