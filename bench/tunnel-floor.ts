// What a chain of Node relays shaped like `orchard port-forward`'s path costs with no framing at all:
// client → cli (TCP in, TLS out) → controller (TLS in, TLS out) → worker (TLS in, TCP out) → sink, each
// relay a process of its own that only pipes bytes (stream.pipe). It is the floor for bench/tunnel.ts's
// "orchard port-forward (CLI, mux)" row on the same machine: what the mux, WebSocket framing and flow
// control cost per GiB is that row's CPU minus this one's. The TLS settings are Node's defaults, as the
// controller's (TLS 1.3, a P-256 certificate made for the run).
//
//   node bench/tunnel-floor.ts [--size 1024] [--runs 3]      (MiB uploaded per run)
import { fork, spawnSync, type ChildProcess } from 'node:child_process';
import { readFileSync, rmSync } from 'node:fs';
import net from 'node:net';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { tempDir } from '../test/helpers.ts';
import { cpuSeconds } from './load-harness.ts';

const { values, positionals } = parseArgs({ options: { size: { type: 'string', default: '1024' }, runs: { type: 'string', default: '3' } }, allowPositionals: true });
const [role, next, certDir] = positionals;

/** CPU seconds this process (the client) has used; the relays' come from /proc. */
const cpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

/** Each child says its port once it listens, and ends when the parent says `exit`. */
function serve(server: net.Server) {
  process.on('message', (m: { exit?: boolean }) => {
    if (m.exit) process.exit(0);
  });
  server.listen(0, '127.0.0.1', () => process.send!({ port: (server.address() as net.AddressInfo).port }));
}

if (role === 'sink') {
  serve(
    net.createServer({ noDelay: true }, (s) => {
      let got = 0;
      s.on('data', (d: Buffer) => {
        got += d.length;
        if (got === Number(next)) process.send!({ done: true });
      });
      s.on('error', () => {});
    }),
  );
} else if (role) {
  const tlsOptions = { key: readFileSync(join(certDir, 'key.pem')), cert: readFileSync(join(certDir, 'cert.pem')), noDelay: true };
  const relay = (inc: net.Socket) => {
    const port = Number(next);
    const out = role === 'worker' ? net.connect({ port, host: '127.0.0.1' }) : tls.connect({ port, host: '127.0.0.1', rejectUnauthorized: false });
    out.setNoDelay(true);
    inc.pipe(out).on('error', () => inc.destroy());
    out.pipe(inc).on('error', () => out.destroy());
  };
  serve(role === 'cli' ? net.createServer({ noDelay: true }, relay) : tls.createServer(tlsOptions, relay));
} else {
  const bytes = Number(values.size) * 2 ** 20;
  const certs = tempDir('tunnel-floor-');
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:P-256', '-nodes', '-keyout', join(certs, 'key.pem'), '-out', join(certs, 'cert.pem'), '-days', '1', '-subj', '/CN=localhost']);
  if (made.status !== 0) throw new Error(`openssl: ${made.stderr.toString()}`);
  const start = (name: string, to: number) =>
    new Promise<[ChildProcess, number]>((resolve) => {
      const p = fork(import.meta.filename, [name, String(to), certs]);
      p.once('message', (m: { port: number }) => resolve([p, m.port]));
    });
  const [sink, sinkPort] = await start('sink', bytes);
  const [worker, workerPort] = await start('worker', sinkPort);
  const [controller, controllerPort] = await start('controller', workerPort);
  const [cli, cliPort] = await start('cli', controllerPort);
  const chain = { cli, controller, worker, sink };
  console.log(`a relay chain with no framing: ${values.size} MiB uploaded per run, load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log('MiB/s   CPU s per GiB moved, by process');
  const chunk = Buffer.alloc(1 << 20, 7);
  for (let run = 0; run < Number(values.runs); run++) {
    const before = Object.values(chain).map((p) => cpuSeconds(p.pid!));
    const done = new Promise((resolve) => sink.once('message', resolve));
    const c0 = cpu();
    const t0 = performance.now();
    const s = net.connect({ port: cliPort, host: '127.0.0.1', noDelay: true });
    for (let sent = 0; sent < bytes; sent += chunk.length) if (!s.write(chunk)) await new Promise((r) => s.once('drain', r));
    await done;
    const seconds = (performance.now() - t0) / 1000;
    const gib = bytes / 2 ** 30;
    const per: Record<string, number> = { client: (cpu() - c0) / gib };
    Object.entries(chain).forEach(([name, p], i) => (per[name] = (cpuSeconds(p.pid!) - before[i]) / gib));
    s.destroy();
    const sum = Object.values(per).reduce((a, b) => a + b, 0);
    console.log(`${(bytes / 2 ** 20 / seconds).toFixed(0).padStart(5)}   ${Object.entries(per).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')} (sum ${sum.toFixed(2)})`);
  }
  for (const p of Object.values(chain)) p.send({ exit: true });
  rmSync(certs, { recursive: true, force: true });
}
