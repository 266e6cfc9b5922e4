// What a chain of Node relays shaped like `orchard port-forward`'s path costs with no framing at all:
// client → cli (TCP in, TLS out) → controller (TLS in, TLS out) → worker (TLS in, TCP out) → target,
// each relay a process of its own that only pipes bytes (stream.pipe), run with bin/orchard's Node
// flags. It is the floor for bench/tunnel.ts's "orchard port-forward (CLI, mux)" row on the same
// machine, and bench/tunnel.ts measures it in the same run (`relayChain`): what the mux, WebSocket
// framing and flow control cost per GiB is that row's CPU minus this one's. The TLS settings are
// Node's defaults, as the controller's (TLS 1.3, a self-signed certificate made as the controller makes its own).
//
//   node bench/tunnel-floor.ts [--size 1024] [--runs 3]      (MiB uploaded per run, into a sink)
import { fork, type ChildProcess } from 'node:child_process';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import tls from 'node:tls';
import { parseArgs } from 'node:util';
import { createSelfSigned } from '../src/controller/tls.ts';
import { tempDir } from '../test/helpers.ts';
import { orchardNodeFlags } from '../scripts/node-flags.ts';
import { cpuSeconds } from './load-harness.ts';

/** Each child says its port once it listens, and ends when the parent says `exit` (or goes). */
function serve(server: net.Server) {
  process.on('message', (m: { exit?: boolean }) => {
    if (m.exit) process.exit(0);
  });
  process.on('disconnect', () => process.exit(0));
  server.listen(0, '127.0.0.1', () => process.send!({ port: (server.address() as net.AddressInfo).port }));
}

/** A relay or the sink, as a child: `role` and what it forwards to (the sink: the bytes it expects). */
function child(role: string, next: string, certDir: string) {
  if (role === 'sink') {
    return serve(
      net.createServer({ noDelay: true }, (s) => {
        let got = 0;
        s.on('data', (d: Buffer) => {
          got += d.length;
          if (got === Number(next)) process.send!({ done: true });
        });
        s.on('error', () => {});
      }),
    );
  }
  const tlsOptions = { key: readFileSync(join(certDir, 'key.pem')), cert: readFileSync(join(certDir, 'cert.pem')), noDelay: true };
  const relay = (inc: net.Socket) => {
    const port = Number(next);
    const out = role === 'worker' ? net.connect({ port, host: '127.0.0.1' }) : tls.connect({ port, host: '127.0.0.1', rejectUnauthorized: false });
    out.setNoDelay(true);
    inc.pipe(out).on('error', () => inc.destroy());
    out.pipe(inc).on('error', () => out.destroy());
    inc.on('error', () => out.destroy());
    out.on('error', () => inc.destroy());
  };
  serve(role === 'cli' ? net.createServer({ noDelay: true }, relay) : tls.createServer(tlsOptions, relay));
}

export interface RelayChain {
  /** The cli relay's port: connect here to reach the target through the chain. */
  port: number;
  /** The relays' processes (their CPU is the chain's cost). */
  pids: { cli: number; controller: number; worker: number };
  stop: () => void;
}

/** Starts the chain of relays in front of `target` (a port on 127.0.0.1); `sinkBytes`: also a sink child, the target. */
export async function relayChain(target: number | { sinkBytes: number }): Promise<RelayChain & { sink?: ChildProcess }> {
  const certs = tempDir('tunnel-floor-');
  const { cert, key } = await createSelfSigned();
  writeFileSync(join(certs, 'cert.pem'), cert);
  writeFileSync(join(certs, 'key.pem'), key, { mode: 0o600 });
  const flags = orchardNodeFlags();
  const procs: ChildProcess[] = [];
  const start = (name: string, to: number) =>
    new Promise<[ChildProcess, number]>((resolve, reject) => {
      const p = fork(import.meta.filename, ['--child', name, String(to), certs], { execArgv: flags });
      procs.push(p);
      p.once('message', (m: { port: number }) => resolve([p, m.port]));
      p.once('exit', (code) => reject(new Error(`the chain's ${name} exited with ${code}`)));
    });
  const stop = () => {
    for (const p of procs) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
    rmSync(certs, { recursive: true, force: true });
  };
  try {
    const sink = typeof target === 'number' ? undefined : await start('sink', target.sinkBytes);
    const [worker, workerPort] = await start('worker', sink ? sink[1] : (target as number));
    const [controller, controllerPort] = await start('controller', workerPort);
    const [cli, port] = await start('cli', controllerPort);
    return { port, pids: { cli: cli.pid!, controller: controller.pid!, worker: worker.pid! }, stop, sink: sink?.[0] };
  } catch (err) {
    stop();
    throw err;
  }
}

/** CPU seconds this process (the client) has used; the relays' come from /proc. */
const cpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

async function main() {
  const { values } = parseArgs({ options: { size: { type: 'string', default: '1024' }, runs: { type: 'string', default: '3' } } });
  const bytes = Number(values.size) * 2 ** 20;
  const chain = await relayChain({ sinkBytes: bytes });
  const sink = chain.sink!;
  const pids = { ...chain.pids, sink: sink.pid! };
  console.log(`a relay chain with no framing: ${values.size} MiB uploaded per run, load average ${loadavg().map((l) => l.toFixed(2)).join(' ')}`);
  console.log('MiB/s   CPU s per GiB moved, by process');
  const chunk = Buffer.alloc(1 << 20, 7);
  try {
    for (let run = 0; run < Number(values.runs); run++) {
      const before = Object.values(pids).map((pid) => cpuSeconds(pid));
      const done = new Promise((resolve) => sink.once('message', resolve));
      const c0 = cpu();
      const t0 = performance.now();
      const s = net.connect({ port: chain.port, host: '127.0.0.1', noDelay: true });
      for (let sent = 0; sent < bytes; sent += chunk.length) if (!s.write(chunk)) await new Promise((r) => s.once('drain', r));
      await done;
      const seconds = (performance.now() - t0) / 1000;
      const gib = bytes / 2 ** 30;
      const per: Record<string, number> = { client: (cpu() - c0) / gib };
      Object.entries(pids).forEach(([name, pid], i) => (per[name] = (cpuSeconds(pid) - before[i]) / gib));
      s.destroy();
      const sum = Object.values(per).reduce((a, b) => a + b, 0);
      console.log(`${(bytes / 2 ** 20 / seconds).toFixed(0).padStart(5)}   ${Object.entries(per).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ')} (sum ${sum.toFixed(2)})`);
    }
  } finally {
    chain.stop();
  }
}

if (process.argv[2] === '--child') child(process.argv[3], process.argv[4], process.argv[5]);
else if (import.meta.main) await main();
