// Abuse benchmark: what hostile or careless clients make the controller (a child process, measured
// alone) hold, and how fast it still answers a fresh authorised request meanwhile. Phases, in one run:
//
//   idle                                          the controller with one synthetic worker and two VMs
//   1,000 watch streams                           10 accounts × 100 reading NDJSON watches
//   50 non-reading watchers under changes         a VM with a 200 kB startup script changed 20×/s
//   40 port-forwards pushing 15 MiB frames        each reconnects when refused and tries again
//   40 port-forwards pushing 256 KiB frames       the largest allowed, as fast as flow control lets
//   40 multiplexed tunnels on one connection      tunnel-mux: each as fast as its window lets
//
// For each: peak controller RSS during the load, its RSS 5 s after the clients left, and p50/p99 of
// GET /v1/vms on a new TLS connection (bench/probe.ts, a process of its own) during the load.
// Goals: peak ≤ 1.5 × idle + 100 MB, after ≤ 1.1 × idle, p99 ≤ 100 ms.
//
//   node bench/abuse.ts [--seconds 8] [--only TEXT]   (--only: the phases whose name has TEXT)
import { spawn } from 'node:child_process';
import { readFileSync, readdirSync, rmSync } from 'node:fs';
import https from 'node:https';
import type { IncomingMessage } from 'node:http';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { WebSocket } from 'ws';
import { ADMIN_TOKEN } from '../test/helpers.ts';
import { Cluster, pct } from './load-harness.ts';
import { DEFAULT_LIMITS } from '../src/controller/limits.ts';
import { OrchardClient } from '../src/client/client.ts';

const { values } = parseArgs({ options: { seconds: { type: 'string', default: '8' }, only: { type: 'string' } } });
const SECONDS = Number(values.seconds);
const MiB = 1024 * 1024;
const f = (n: number) => n.toFixed(0);

const cluster = new Cluster();
await cluster.startController();
const pid = cluster.ctl.proc.pid!;
const rssMB = () => Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]) / 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const auth = (name: string, token: string) => 'Basic ' + Buffer.from(`${name}:${token}`).toString('base64');

async function account(name: string, roles: string[]) {
  const token = `${name}-token-${Math.random().toString(36).slice(2)}`;
  await cluster.admin.createServiceAccount({ name, token, roles: roles as never });
  return auth(name, token);
}

/** The controller's own view of its memory (V8 heap used/total, memory outside the heap), from /metrics. */
async function heap(): Promise<string> {
  const text = await new Promise<string>((resolve, reject) => {
    https
      .get(new URL('/metrics', cluster.ctl.url), { headers: { authorization: auth('bootstrap-admin', ADMIN_TOKEN) }, ca: cluster.certificate, checkServerIdentity: () => undefined, agent: false }, (res) => {
        let body = '';
        res.setEncoding('utf8').on('data', (c: string) => (body += c)).on('end', () => resolve(body));
      })
      .on('error', reject);
  });
  const metric = (name: string) => Number(new RegExp(`^orchard_controller_${name} (\\S+)`, 'm').exec(text)?.[1] ?? NaN) / MiB;
  const fds = readdirSync(`/proc/${pid}/fd`).length;
  // Where the rest of RSS lives: malloc's main heap ([heap]) and other anonymous mappings.
  let brk = 0;
  let anon = 0;
  let name = '';
  for (const line of readFileSync(`/proc/${pid}/smaps`, 'utf8').split('\n')) {
    const m = /^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (m) name = m[1];
    const rss = /^Rss:\s+(\d+) kB/.exec(line);
    if (rss && name === '[heap]') brk += Number(rss[1]) / 1024;
    else if (rss && name === '') anon += Number(rss[1]) / 1024;
  }
  return `${fds} open files, malloc heap ${f(brk)} MB, other anonymous ${f(anon)} MB, heap ${f(metric('nodejs_heap_size_used_bytes'))}/${f(metric('nodejs_heap_size_total_bytes'))} MB, external ${f(metric('nodejs_external_memory_bytes'))} MB`;
}

/** p50/p99 of fresh authorised requests over the load (one every 50 ms). */
async function latency(n: number): Promise<{ p50: number; p99: number; failed: number }> {
  const proc = spawn(process.execPath, [join(import.meta.dirname, 'probe.ts'), 'fresh', String(n), cluster.ctl.url, join(cluster.dataDir, 'controller.crt'), 'bootstrap-admin', ADMIN_TOKEN], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines: string[] = [];
  const exited = new Promise<void>((resolve) => proc.on('close', () => resolve()));
  await new Promise<void>((resolve) => createInterface({ input: proc.stdout }).on('line', (l) => (l === 'ready' ? resolve() : lines.push(l))));
  proc.stdin.write('go\n');
  await exited;
  const ms = lines.filter((l) => l !== 'failed').map(Number).sort((a, b) => a - b);
  return { p50: pct(ms, 50), p99: pct(ms, 99), failed: lines.length - ms.length };
}

const results: { name: string; peak: number; after: number; p50: number; p99: number; failed: number }[] = [];

/** Runs `load` (which returns its stop function) and measures; the clients leave before "after". */
async function phase(name: string, load: () => Promise<() => Promise<void> | void>) {
  if (values.only && !name.includes(values.only)) return;
  const stop = await load();
  let peak = rssMB();
  const sampler = setInterval(() => (peak = Math.max(peak, rssMB())), 100);
  const lat = await latency(Math.round((SECONDS * 1000) / 60));
  clearInterval(sampler);
  peak = Math.max(peak, rssMB());
  await stop();
  await sleep(5000);
  const after = rssMB();
  console.error(`${name}: peak ${f(peak)} MB, after ${f(after)} MB (${await heap()})`);
  results.push({ name, peak, after, ...lat });
}

function watch(authorization: string, read: boolean): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => {
    const req = https.request(new URL('/v1/vms?watch=true', cluster.ctl.url), { headers: { authorization }, ca: cluster.certificate, checkServerIdentity: () => undefined, agent: false }, (res) => {
      if (read) res.resume();
      else res.pause();
      res.on('error', () => {});
      resolve(res);
    });
    req.on('error', reject);
    req.end();
  });
}

// ------------------------------------------------------------------ set-up
await cluster.startWorkers(1, 10);
const bigScript = { script_content: 'x'.repeat(200 * 1024) };
await cluster.admin.createVM({ name: 'echo', image: 'synthetic' });
while ((await cluster.admin.getVM('echo')).status !== 'running') await sleep(50);
const watchers = await Promise.all(Array.from({ length: 10 }, (_, i) => account(`watcher-${i}`, ['compute:read'])));
const slow = await account('slow', ['compute:read']);
await sleep(3000);
const idle = rssMB();
console.error(`idle: ${f(idle)} MB (${await heap()})`);
const idleLatency = await latency(Math.round((SECONDS * 1000) / 60));

await phase('1,000 watch streams', async () => {
    const open: IncomingMessage[] = [];
    for (let i = 0; i < 1000; i += 50) open.push(...(await Promise.all(Array.from({ length: 50 }, (_, j) => watch(watchers[Math.floor((i + j) / 100)], true)))));
    const refused = open.filter((r) => r.statusCode !== 200).length;
    if (refused) console.error(`${refused} watch streams refused`);
    return () => open.forEach((r) => r.destroy());
  });

await phase('50 non-reading watchers, 20 changes/s of 200 kB', async () => {
    await cluster.admin.createVM({ name: 'churn', image: 'synthetic', startup_script: bigScript });
    const open = await Promise.all(Array.from({ length: 50 }, () => watch(slow, false)));
    let cpu = 1;
    let stopped = false;
    const churn = (async () => {
      while (!stopped) {
        cpu = 3 - cpu;
        await cluster.admin.updateVM({ name: 'churn', image: 'synthetic', cpu, startup_script: bigScript });
        await sleep(50);
      }
    })();
    return async () => {
      stopped = true;
      await churn;
      open.forEach((r) => r.destroy());
      await cluster.admin.deleteVM('churn');
    };
  });

/** 40 port-forwards to the echo VM, each sending frames of `bytes` (and reading what comes back); a refused one reconnects. */
/**
 * `zeroMask`: send the frames unmasked in effect (an all-zero mask), so that masking 15 MiB frames
 * does not take this harness a core on a 2-core machine; the controller refuses those frames from
 * their header without reading them. Frames it does relay keep random masks, as real clients send.
 */
const pushers = (bytes: number, zeroMask = false) => async () => {
  // An account of each phase's own: one that sent frames over the limit is held off for a while.
  const tunneler = await account(`tunneler-${bytes}`, ['compute:read', 'compute:connect']);
  const frame = Buffer.alloc(bytes, 0x5a);
  let stopped = false;
  const sockets = new Set<WebSocket>();
  const closes = { count: 0, codes: new Map<number, number>() };
  const one = async () => {
    while (!stopped) {
      const ws = new WebSocket(new URL('/v1/vms/echo/port-forward?port=22', cluster.ctl.url.replace(/^http/, 'ws')), {
        headers: { authorization: tunneler },
        ca: cluster.certificate,
        checkServerIdentity: (() => undefined) as unknown as () => boolean,
        maxPayload: 64 * MiB,
        ...(zeroMask ? { generateMask: (mask: Buffer) => void mask.fill(0) } : {}),
      });
      sockets.add(ws);
      ws.on('error', () => {});
      await new Promise<void>((resolve) => {
        const pump = () => {
          while (!stopped && ws.readyState === ws.OPEN && ws.bufferedAmount < bytes) ws.send(frame);
        };
        ws.on('open', pump);
        ws.on('message', pump);
        const timer = setInterval(pump, 20);
        ws.on('close', (code) => {
          clearInterval(timer);
          closes.count++;
          closes.codes.set(code, (closes.codes.get(code) ?? 0) + 1);
          resolve();
        });
      });
      sockets.delete(ws);
      if (!stopped) await sleep(100);
    }
  };
  const all = Promise.all(Array.from({ length: 40 }, one));
  return async () => {
    stopped = true;
    for (const ws of sockets) ws.terminate();
    await all;
    console.error(`${bytes / 1024} KiB frames: ${closes.count} tunnels closed, codes ${JSON.stringify(Object.fromEntries(closes.codes))}`);
  };
};
await phase('40 port-forwards pushing 15 MiB frames', pushers(15 * MiB, true));
await phase(`40 port-forwards pushing ${DEFAULT_LIMITS.tunnelFrameBytes / 1024} KiB frames (the largest allowed)`, pushers(DEFAULT_LIMITS.tunnelFrameBytes));

/** 40 tunnels multiplexed on one connection (capability tunnel-mux), each writing as fast as its window lets and reading the echo. */
await phase('40 multiplexed tunnels on one connection, as fast as their windows let', async () => {
  await cluster.admin.createServiceAccount({ name: 'muxer', token: 'muxer-token-0123456789', roles: ['compute:connect'] });
  const client = new OrchardClient({ url: cluster.ctl.url, certificate: cluster.certificate, serviceAccountName: 'muxer', serviceAccountToken: 'muxer-token-0123456789' });
  const forwarder = client.portForwarder({ vm: 'echo', port: 22 });
  const chunk = Buffer.alloc(256 * 1024, 0x5a);
  let stopped = false;
  let moved = 0;
  const one = async () => {
    const { stream } = await forwarder.open();
    stream.on('data', (c: Buffer) => (moved += c.length));
    stream.on('error', () => {});
    const pump = () => {
      while (!stopped && !stream.destroyed && stream.write(chunk));
    };
    stream.on('drain', pump);
    pump();
    return stream;
  };
  const streams = await Promise.all(Array.from({ length: 40 }, one));
  const t0 = Date.now();
  return () => {
    stopped = true;
    for (const s of streams) s.destroy();
    forwarder.close();
    client.close();
    console.error(`40 multiplexed tunnels: ${(moved / MiB / ((Date.now() - t0) / 1000)).toFixed(0)} MiB/s echoed in all`);
  };
});

await cluster.stop();
rmSync(cluster.dataDir, { recursive: true, force: true });

console.log(`controller RSS idle: ${f(idle)} MB; fresh authorised request idle: p50 ${idleLatency.p50.toFixed(1)} ms, p99 ${idleLatency.p99.toFixed(1)} ms`);
console.log(`goal: peak ≤ ${f(1.5 * idle + 100)} MB (1.5 × idle + 100), after ≤ ${f(1.1 * idle)} MB (idle + 10 %), p99 ≤ 100 ms`);
console.log('| load | peak RSS | RSS 5 s after | p50 | p99 | failed requests |');
console.log('|---|---|---|---|---|---|');
for (const r of results) {
  const mark = (ok: boolean) => (ok ? '' : ' ✗');
  console.log(
    `| ${r.name} | ${f(r.peak)} MB${mark(r.peak <= 1.5 * idle + 100)} | ${f(r.after)} MB${mark(r.after <= 1.1 * idle)} | ${r.p50.toFixed(1)} ms | ${r.p99.toFixed(1)} ms${mark(r.p99 <= 100)} | ${r.failed} |`,
  );
}
process.exit(0);
