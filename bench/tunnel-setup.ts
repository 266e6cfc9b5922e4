// Where a tunnel's set-up time goes: one controller and one worker (child processes, as in
// bench/tunnel.ts) run with ORCHARD_TUNNEL_TRACE=1 and stamp each stage (src/tunnel-trace.ts); this
// script opens N tunnels one after another through the client API to a TCP server on the worker
// host, stamps its own stages (TCP connect, TLS, WebSocket open, first byte) and prints, per stage,
// the median and p90 of the time since the previous stage.
//
//   node bench/tunnel-setup.ts [--n 200] [--ready] [--back-to-back]
// --ready: tunnels of client.portForwarder, ended as a program ends a connection (its end, then the
// other side's), so a connection that can be reused is; --back-to-back: the next tunnel at once, not
// after the pool is full again and 5 ms.
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { WebSocket, type ClientOptions } from 'ws';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { OrchardClient, wsMasking } from '../src/client/client.ts';
import { ADMIN_TOKEN, ORCHARD_BIN, spawnController, tempDir } from '../test/helpers.ts';

const { values } = parseArgs({ options: { n: { type: 'string', default: '200' }, resume: { type: 'boolean', default: false }, ready: { type: 'boolean', default: false }, 'back-to-back': { type: 'boolean', default: false } } });
/** --resume: each tunnel resumes the TLS session of the one before (a ticket from the controller). */
let session: Buffer | undefined;
const N = Number(values.n);
const now = () => performance.timeOrigin + performance.now();

const dir = tempDir('orchard-bench-setup-');
const server = net.createServer({ noDelay: true }, (s) => {
  s.on('error', () => {});
  s.once('data', () => s.write('x'));
});
await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
const target = (server.address() as net.AddressInfo).port;

mkdirSync(join(dir, 'ctl'));
const env = { ORCHARD_TUNNEL_TRACE: '1' };
const ctl = await spawnController(join(dir, 'ctl'), [], env);
const certificate = readFileSync(join(dir, 'ctl', 'controller.crt'), 'utf8');
const client = new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate });
const worker = spawn(ORCHARD_BIN, ['worker', 'run', ctl.url, '--bootstrap-token', token, '--name', 'bench', '--runtime', 'synthetic', '--data-dir', join(dir, 'worker')], {
  env: { ...process.env, ...env, ORCHARD_LOG_LEVEL: 'warn' },
  stdio: ['ignore', 'ignore', 'pipe'],
});
let workerErr = '';
worker.stderr.on('data', (c: Buffer) => (workerErr += c.toString()));
process.once('exit', () => {
  worker.kill('SIGKILL');
  ctl.proc.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
});

/** One tunnel, as client.portForwardWorker opens it, with the client's stages stamped. */
function tunnel(): Promise<Record<string, number>> {
  const t: Record<string, number> = { 'cli-start': now() };
  const url = client.urlOf(`/v1/workers/bench/port-forward?port=${target}`, true);
  const options = {
    headers: { authorization: client.authorization ?? '' },
    ...client.tlsOptions(),
    ...wsMasking(url),
    createConnection: ((opts: tls.ConnectionOptions) => {
      const s = tls.connect(values.resume ? { ...opts, session } : opts);
      if (values.resume) s.once('session', (b: Buffer) => (session = b));
      s.once('connect', () => (t['cli-tcp'] = now()));
      s.once('secureConnect', () => (t['cli-tls'] = now()));
      return s;
    }) as unknown as typeof net.createConnection,
  };
  const ws = new WebSocket(url, options as ClientOptions);
  return new Promise((resolve, reject) => {
    ws.once('error', reject);
    ws.once('open', () => {
      t['cli-open'] = now();
      ws.send(Buffer.from('D'));
    });
    ws.once('message', () => {
      t['cli-first'] = now();
      ws.close();
      resolve(t);
    });
  });
}

// Warm up (and wait for the worker to connect).
/** --ready: tunnels of client.portForwarder, on ready connections (cli-open: the controller's answer). */
const forwarder = values.ready ? client.portForwarder({ worker: 'bench', port: target }) : undefined;
async function readyTunnel(): Promise<Record<string, number>> {
  const t: Record<string, number> = { 'cli-start': now() };
  const { stream } = await forwarder!.open();
  t['cli-open'] = now();
  const first = new Promise<void>((resolve) => stream.once('data', () => resolve()));
  stream.write('D');
  await first;
  t['cli-first'] = now();
  // Ended as a program ends a connection: its end, then the server's (a reused connection comes back).
  const closed = new Promise((resolve) => stream.once('close', resolve));
  stream.resume();
  stream.end();
  await closed;
  return t;
}
const open = values.ready ? readyTunnel : tunnel;

for (let i = 0; ; i++) {
  try {
    await open();
    break;
  } catch {
    if (i > 100) throw new Error(`the worker does not take tunnels:\n${workerErr}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}
for (let i = 0; i < 20; i++) await open();
await new Promise((r) => setTimeout(r, 300));
const ctlMark = ctl.stderr().length;
const wrkMark = workerErr.length;
/** CPU seconds (user + system) a child has used so far, from /proc. */
const cpuOf = (pid: number) => {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
};
const cpuBefore = { client: process.cpuUsage(), controller: cpuOf(ctl.proc.pid!), worker: cpuOf(worker.pid!) };
const runs: Record<string, number>[] = [];
for (let i = 0; i < N; i++) {
  // With ready connections: all 4 ready again (a used one is replaced 10 ms later), so no replacement's TLS handshake overlaps the tunnel measured.
  if (!values['back-to-back'] && forwarder) while (forwarder.ready < 4) await new Promise((r) => setTimeout(r, 1));
  runs.push(await open());
  if (!values['back-to-back']) await new Promise((r) => setTimeout(r, 5));
}
const clientCPU = process.cpuUsage(cpuBefore.client);
const cpuPerTunnel = {
  client: (clientCPU.user + clientCPU.system) / 1000 / N,
  controller: ((cpuOf(ctl.proc.pid!) - cpuBefore.controller) * 1000) / N,
  worker: ((cpuOf(worker.pid!) - cpuBefore.worker) * 1000) / N,
};
await new Promise((r) => setTimeout(r, 300));

// Server-side stamps, matched to the client's by time: each lies within its tunnel's [start, first byte].
const stamps = [...ctl.stderr().slice(ctlMark).split('\n'), ...workerErr.slice(wrkMark).split('\n')]
  .map((l) => /^tunnel-trace (\S+) \S+ ([\d.]+)$/.exec(l))
  .filter((m) => m !== null)
  .map((m) => ({ stage: m[1], at: Number(m[2]) }));
for (const r of runs) for (const s of stamps) if (s.at >= r['cli-start'] && s.at <= r['cli-first'] && !(s.stage in r)) r[s.stage] = s.at;

const order = Object.entries(runs[0]).sort((a, b) => a[1] - b[1]).map(([k]) => k);
const pct = (xs: number[], p: number) => xs.sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];
console.log(`${N} tunnels (client API), one at a time; ms since the previous stage, median / p90`);
for (let i = 1; i < order.length; i++) {
  const xs = runs.filter((r) => order[i] in r && order[i - 1] in r).map((r) => r[order[i]] - r[order[i - 1]]);
  console.log(`${`${order[i - 1]} → ${order[i]}`.padEnd(44)} ${pct(xs, 50).toFixed(2).padStart(6)} / ${pct(xs, 90).toFixed(2)}`);
}
const total = runs.map((r) => r['cli-first'] - r['cli-start']);
console.log(`${'total: start → first byte'.padEnd(44)} ${pct(total, 50).toFixed(2).padStart(6)} / ${pct(total, 90).toFixed(2)} (p99 ${pct(total, 99).toFixed(2)})`);
console.log(`CPU per tunnel (ms; with --ready the replacement of the used connection included): ${Object.entries(cpuPerTunnel).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')}`);
forwarder?.close();
client.close();
process.exit(0);
