// Tunnel benchmark: bytes through Orchard's port-forward path (client → controller → worker → TCP
// port on the worker host) next to a direct loopback TCP connection and an OpenSSH `ssh -L` tunnel
// through a local dropbear, all in one run, against the same sink/source server (a child process).
//
//   (a) throughput of one SIZE MiB upload and download (median of RUNS) through the tunnel, both with
//       the client API (OrchardClient.portForwardWorker: the controller↔worker tunnel itself; portForwarder
//       on ready connections; portForwarder multiplexed, capability tunnel-mux) and through
//       `orchard port-forward worker` (a local listener, as a user runs it: ready connections with
//       ORCHARD_TUNNEL_MUX=0, as before the mux, and multiplexed); the goals of issue #17 are printed last
//   (b) the same over direct loopback TCP        (c) the same through `ssh -L` (OpenSSH → dropbear)
//       and through bare Node relays with the CLI path's hops (bench/tunnel-floor.ts): this design's
//       floor on this machine, in the same run, printed beside each throughput goal
//   (d) round-trip latency of small messages, p50/p99, and what the tunnel adds to direct
//   (e) CONNS concurrent tunnels, each downloading SIZE/CONNS: aggregate throughput, time to first byte,
//       CPU per GiB of each process (the median of RUNS bursts)
//   (f) one tunnel over a long link: `orchard port-forward` (mux) and `ssh -L` with RTT ms of delay between
//       the user's side and the controller (the worker next to it), resp. between ssh and dropbear: its
//       throughput, and the set-up of a connection whose client speaks first; that set-up also with
//       the RTT between the controller and the worker instead
//
// The controller (TLS) and the worker (synthetic runtime) are separate processes, like in production;
// CPU seconds per GiB of each process show where the tunnel's cost goes. A measurement ends its
// connection with end(), as a program does (a tunnel that can reuse its connection then does).
//
//   node bench/tunnel.ts [--size 256] [--runs 3] [--pings 2000] [--conns 100] [--rtt 40] [--setups 200]
// (`--serve` is the sink/source server's own mode.)
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Duplex } from 'node:stream';
import { parseArgs } from 'node:util';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { OrchardClient } from '../src/client/client.ts';
import { ADMIN_TOKEN, delayProxy, ORCHARD_BIN, runCLI, spawnController, tempDir, type ChildController } from '../test/helpers.ts';
import { relayChain } from './tunnel-floor.ts';

const { values } = parseArgs({
  options: {
    size: { type: 'string', default: '256' },
    runs: { type: 'string', default: '3' },
    pings: { type: 'string', default: '2000' },
    conns: { type: 'string', default: '100' },
    rtt: { type: 'string', default: '40' },
    setups: { type: 'string', default: '200' },
    serve: { type: 'boolean', default: false },
  },
});

const MiB = 1024 * 1024;
/** width of the first column */
const W = 52;
const CHUNK = Buffer.alloc(256 * 1024, 0x5a);

// ---------------------------------------------------------------- the sink/source server
// Per connection, the first byte says what to do:
//   'U' + u64 N: read N bytes, then answer 'K'    'D' + u64 N: send N bytes    'E': echo everything
function serve() {
  const server = net.createServer({ noDelay: true }, (s) => {
    s.on('error', () => {});
    let header = Buffer.alloc(0);
    let mode: 'U' | 'E' | undefined;
    let remaining = 0;
    const onData = (chunk: Buffer) => {
      if (mode === 'E') return void s.write(chunk);
      if (mode === 'U') {
        remaining -= chunk.length;
        if (remaining <= 0) s.write('K');
        return;
      }
      header = Buffer.concat([header, chunk]);
      const op = String.fromCharCode(header[0]);
      if (op === 'E') {
        mode = 'E';
        if (header.length > 1) s.write(header.subarray(1));
        return;
      }
      if (header.length < 9) return;
      const n = Number(header.readBigUInt64BE(1));
      const rest = header.subarray(9);
      if (op === 'U') {
        mode = 'U';
        remaining = n;
        if (rest.length) onData(rest);
      } else if (op === 'D') {
        s.off('data', onData);
        let left = n;
        const pump = () => {
          while (left > 0 && !s.destroyed) {
            const piece = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left);
            left -= piece.length;
            if (!s.write(piece)) return;
          }
        };
        s.on('drain', pump);
        pump();
      } else s.destroy();
    };
    s.on('data', onData);
  });
  server.listen(0, '127.0.0.1', () => process.stdout.write(`listening ${(server.address() as net.AddressInfo).port}\n`));
}


// ---------------------------------------------------------------- measurements

type Dial = () => Promise<Duplex>;

const tcpDial = (port: number): Dial => () =>
  new Promise((resolve, reject) => {
    const s = net.connect({ port, host: '127.0.0.1', noDelay: true }, () => resolve(s));
    s.once('error', reject);
  });

const header = (op: string, n: number) => {
  const b = Buffer.alloc(9);
  b.write(op, 0);
  b.writeBigUInt64BE(BigInt(n), 1);
  return b;
};

async function writeAll(s: Duplex, bytes: number) {
  let left = bytes;
  while (left > 0) {
    const piece = left >= CHUNK.length ? CHUNK : CHUNK.subarray(0, left);
    left -= piece.length;
    if (!s.write(piece)) {
      await new Promise<void>((resolve, reject) => {
        const onDrain = () => {
          s.off('close', onClose);
          resolve();
        };
        const onClose = () => {
          s.off('drain', onDrain);
          reject(new Error('closed while writing'));
        };
        s.once('drain', onDrain);
        s.once('close', onClose);
      });
    }
  }
}

/** Seconds to send `bytes` and get the server's acknowledgement that it read them all. */
async function upload(dial: Dial, bytes: number): Promise<number> {
  const s = await dial();
  const t0 = performance.now();
  const acked = new Promise<void>((resolve, reject) => {
    s.on('data', () => resolve());
    s.once('close', () => reject(new Error('closed before the acknowledgement')));
    s.once('error', reject);
  });
  s.write(header('U', bytes));
  await writeAll(s, bytes);
  await acked;
  const seconds = (performance.now() - t0) / 1000;
  s.end();
  return seconds;
}

/** Seconds to receive `bytes`, and the time to the first byte (ms), from the request. */
async function download(dial: Dial, bytes: number): Promise<{ seconds: number; ttfb: number }> {
  const t0 = performance.now();
  const s = await dial();
  return new Promise((resolve, reject) => {
    let got = 0;
    let first = 0;
    s.on('data', (c: Buffer) => {
      if (!got) first = performance.now() - t0;
      got += c.length;
      if (got >= bytes) {
        resolve({ seconds: (performance.now() - t0) / 1000, ttfb: first });
        s.end();
      }
    });
    s.once('close', () => reject(new Error(`closed after ${got} of ${bytes} bytes`)));
    s.once('error', reject);
    s.write(header('D', bytes));
  });
}

/** Round trips of `size`-byte messages (µs), after a warm-up. */
async function pingpong(dial: Dial, n: number, size = 64): Promise<number[]> {
  const s = await dial();
  const msg = Buffer.alloc(size, 0x61);
  let want = 0;
  let got = 0;
  let wake: (() => void) | undefined;
  s.on('data', (c: Buffer) => {
    got += c.length;
    if (got >= want) wake?.();
  });
  s.write('E');
  const out: number[] = [];
  for (let i = 0; i < n + 100; i++) {
    const t0 = performance.now();
    want += size;
    const done = new Promise<void>((r) => (wake = r));
    s.write(msg);
    if (got < want) await done;
    if (i >= 100) out.push((performance.now() - t0) * 1000);
  }
  s.end();
  return out.sort((a, b) => a - b);
}

const pct = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))];
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** CPU seconds (user+system) a process has used, from /proc. */
function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return 0;
  if (pid === process.pid) {
    const u = process.cpuUsage();
    return (u.user + u.system) / 1e6;
  }
  // The process and its descendants (dropbear serves each connection in a child).
  let total = 0;
  try {
    const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ');
    total += (Number(fields[11]) + Number(fields[12])) / 100;
    for (const task of readdirSync(`/proc/${pid}/task`)) {
      for (const child of readFileSync(`/proc/${pid}/task/${task}/children`, 'utf8').split(' ').filter(Boolean)) total += cpuSeconds(Number(child));
    }
  } catch {
    // gone
  }
  return total;
}

/** Starts counting the CPU of `pids`; the function returned gives each one's CPU seconds since, per GiB moved. */
function cpuMeter(pids: Record<string, number | undefined>): (gib: number) => Record<string, number> {
  const before = Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, cpuSeconds(pid)]));
  return (gib) => Object.fromEntries(Object.entries(pids).map(([k, pid]) => [k, (cpuSeconds(pid) - before[k]) / gib]));
}

/** "client 1.23, controller 2.34, …" */
const cpuText = (cpu: Record<string, number>) => Object.entries(cpu).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ');

function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

async function until<T>(what: string, fn: () => Promise<T | undefined>, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let lastErr: unknown;
  while (Date.now() < deadline) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      lastErr = err;
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`timed out waiting for ${what}${lastErr ? `: ${(lastErr as Error).message}` : ''}`);
}

/** A child process whose stdout/stderr line matching `re` says it is ready. */
function startChild(cmd: string, args: string[], re: RegExp, env: Record<string, string> = {}): Promise<{ proc: ChildProcess; match: RegExpExecArray }> {
  const proc = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(proc);
  let out = '';
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`${cmd} ${args.join(' ')} did not start:\n${out}`)), 20_000);
    const onData = (c: Buffer) => {
      out += c.toString();
      const m = re.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve({ proc, match: m });
      }
    };
    proc.stdout!.on('data', onData);
    proc.stderr!.on('data', onData);
    proc.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${cmd} exited with ${code}:\n${out}`));
    });
  });
}

const children: ChildProcess[] = [];

interface Path {
  name: string;
  dial: Dial;
  /** processes whose CPU time is the path's cost */
  pids: Record<string, number | undefined>;
}

interface Throughput {
  up: number;
  down: number;
  cpu: Record<string, number>;
}

async function throughput(path: Path, bytes: number, runs: number): Promise<Throughput> {
  const cpuPerGiB = cpuMeter(path.pids);
  const ups: number[] = [];
  const downs: number[] = [];
  for (let i = 0; i < runs; i++) {
    ups.push(bytes / MiB / (await upload(path.dial, bytes)));
    downs.push(bytes / MiB / (await download(path.dial, bytes)).seconds);
  }
  const gib = (2 * runs * bytes) / (1024 * MiB);
  return { up: median(ups), down: median(downs), cpu: cpuPerGiB(gib) };
}

/**
 * Sets up `n` connections through `path` one after another and prints open → first byte p50 / p99,
 * and each process's CPU per connection (ms); returns the p50 (ms).
 */
async function setupRow(path: Path, n: number): Promise<number> {
  const xs: number[] = [];
  const cpu = cpuMeter(path.pids);
  for (let i = 0; i < n; i++) xs.push((await download(path.dial, 16)).seconds * 1000);
  xs.sort((a, b) => a - b);
  // cpuMeter divides by GiB: n connections as n/1000 "GiB" give ms per connection.
  const perConn = Object.entries(cpu(n / 1000)).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(', ');
  console.log(`${path.name.padEnd(W)} ${`${pct(xs, 50).toFixed(1)} / ${pct(xs, 99).toFixed(1)} ms`.padEnd(18)}${perConn && `   CPU ms per connection: ${perConn}`}`);
  return pct(xs, 50);
}

async function concurrent(path: Path, conns: number, bytesEach: number): Promise<{ mibps: number; ttfb50: number; ttfb99: number; failed: number; cpu: Record<string, number> }> {
  const cpuPerGiB = cpuMeter(path.pids);
  const t0 = performance.now();
  const results = await Promise.allSettled(Array.from({ length: conns }, () => download(path.dial, bytesEach)));
  const seconds = (performance.now() - t0) / 1000;
  const ok = results.filter((r) => r.status === 'fulfilled').map((r) => r.value);
  const ttfb = ok.map((r) => r.ttfb).sort((a, b) => a - b);
  const cpu = cpuPerGiB((ok.length * bytesEach) / (1024 * MiB));
  return { mibps: (ok.length * bytesEach) / MiB / seconds, ttfb50: pct(ttfb, 50), ttfb99: pct(ttfb, 99), failed: conns - ok.length, cpu };
}

/** dropbear on a free port with a fresh host key, root login by key only, in a private mount namespace
 * where /root is a temporary directory holding our authorized_keys (nothing on the host changes). */
async function startDropbear(dir: string): Promise<{ port: number; key: string; proc: ChildProcess } | { skipped: string }> {
  if (process.getuid?.() !== 0) return { skipped: 'dropbear needs root to log in as root' };
  for (const tool of ['dropbear', 'dropbearkey', 'ssh', 'ssh-keygen', 'unshare']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) return { skipped: `${tool} is not installed` };
  }
  const home = join(dir, 'root-home');
  mkdirSync(join(home, '.ssh'), { recursive: true });
  chmodSync(home, 0o700);
  chmodSync(join(home, '.ssh'), 0o700);
  const key = join(dir, 'id_ed25519');
  spawnSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', key]);
  writeFileSync(join(home, '.ssh', 'authorized_keys'), readFileSync(key + '.pub'), { mode: 0o600 });
  spawnSync('dropbearkey', ['-t', 'ed25519', '-f', join(dir, 'hostkey')], { stdio: 'ignore' });
  const port = await freePort();
  // -W: a 2 MiB receive window (OpenSSH's sshd uses 2 MiB; dropbear's 24 KiB default would cap uploads).
  const script = `mount --bind '${home}' /root && exec dropbear -F -E -s -p 127.0.0.1:${port} -r '${join(dir, 'hostkey')}' -P '${join(dir, 'dropbear.pid')}' -W 2097152`;
  const proc = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(proc);
  let log = '';
  proc.stderr!.on('data', (c: Buffer) => (log += c.toString()));
  await until('dropbear to listen', async () => {
    if (proc.exitCode !== null) throw new Error(`dropbear exited with ${proc.exitCode}: ${log}`);
    const s = await tcpDial(port)();
    s.destroy();
    return true;
  });
  return { port, key, proc };
}

async function sshForward(dropbear: { port: number; key: string }, target: number, cipher: string): Promise<{ port: number; proc: ChildProcess }> {
  const local = await freePort();
  const proc = spawn(
    'ssh',
    [
      '-N', '-o', 'ExitOnForwardFailure=yes', '-o', 'StrictHostKeyChecking=no', '-o', 'UserKnownHostsFile=/dev/null', '-o', 'BatchMode=yes', '-o', 'LogLevel=ERROR',
      '-c', cipher, '-i', dropbear.key, '-p', String(dropbear.port), '-L', `127.0.0.1:${local}:127.0.0.1:${target}`, 'root@127.0.0.1',
    ],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  children.push(proc);
  // Ready when a download of a few bytes works through it.
  await until('the ssh -L forward', async () => ((await download(tcpDial(local), 16)) ? true : undefined));
  return { port: local, proc };
}

// ---------------------------------------------------------------- main

async function main() {
  const SIZE = Number(values.size) * MiB;
  const RUNS = Number(values.runs);
  const PINGS = Number(values.pings);
  const CONNS = Number(values.conns);
  const SETUPS = Number(values.setups);
  const dir = tempDir('orchard-bench-tunnel-');
  let ctl: ChildController | undefined;
  let client: OrchardClient | undefined;
  let closeForwarder = () => {};
  const closers: (() => void)[] = [];
  const cleanup = async () => {
    closeForwarder();
    for (const close of closers) close();
    client?.close();
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    await ctl?.kill();
    rmSync(dir, { recursive: true, force: true });
  };
  process.once('SIGINT', () => void cleanup().then(() => process.exit(130)));
  // Dying any other way (an exception, stdout closed under `| head`): no child may outlive us.
  process.once('exit', () => {
    for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    ctl?.proc.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  });
  try {
    console.log(
      `orchard tunnel benchmark: ${SIZE / MiB} MiB transfers (median of ${RUNS}), ${PINGS} round trips of 64 B, ${CONNS} concurrent tunnels; ` +
        `load average ${loadavg()[0].toFixed(2)} at start\n`,
    );
    // The sink/source server, a child process.
    const server = await startChild(process.execPath, [import.meta.filename, '--serve'], /listening (\d+)/);
    const target = Number(server.match[1]);

    // Controller and worker processes; the worker's host port `target` is what we forward to.
    mkdirSync(join(dir, 'ctl'));
    ctl = await spawnController(join(dir, 'ctl'));
    const certificate = readFileSync(join(dir, 'ctl', 'controller.crt'), 'utf8');
    client = new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
    const token = encodeBootstrapToken({ serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate });
    /** A synthetic worker process named `name`, connected to the controller at `url`. */
    const startWorker = (name: string, url: string) => {
      const proc = spawn(ORCHARD_BIN, ['worker', 'run', url, '--bootstrap-token', token, '--name', name, '--runtime', 'synthetic', '--data-dir', join(dir, name)], {
        env: { ...process.env, ORCHARD_LOG_LEVEL: 'warn' },
        stdio: ['ignore', 'ignore', 'inherit'],
      });
      children.push(proc);
      return proc;
    };
    const worker = startWorker('bench', ctl.url);
    const c = client;
    const apiDial: Dial = async () => (await c.portForwardWorker('bench', target)).stream;
    // The same with ready connections (capability port-forward-ready), as `orchard port-forward` used them before the mux,
    // and multiplexed on one connection (capability tunnel-mux), as it uses them now.
    const forwarder = c.portForwarder({ worker: 'bench', port: target }, 4, { mux: false });
    const muxForwarder = c.portForwarder({ worker: 'bench', port: target });
    closeForwarder = () => (forwarder.close(), muxForwarder.close());
    const readyDial: Dial = async () => (await forwarder.open()).stream;
    const muxDial: Dial = async () => (await muxForwarder.open()).stream;
    await until('the worker to take port-forwards', async () => ((await download(apiDial, 16)) ? true : undefined));

    // `orchard port-forward worker` as a user runs it.
    const env = { ORCHARD_HOME: join(dir, 'home') };
    const ctx = await runCLI(['context', 'create', ctl.url, '--name', 'bench', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], env);
    if (ctx.code !== 0) throw new Error(`context create: ${ctx.stderr}`);
    const pf = await startChild(ORCHARD_BIN, ['port-forward', 'worker', 'bench', `0:${target}`], /forwarding 127\.0\.0\.1:(\d+)/, { ...env, ORCHARD_TUNNEL_MUX: '0' });
    const cliPort = Number(pf.match[1]);
    const pfMux = await startChild(ORCHARD_BIN, ['port-forward', 'worker', 'bench', `0:${target}`], /forwarding 127\.0\.0\.1:(\d+)/, env);
    const cliMuxPort = Number(pfMux.match[1]);

    // The floor of the CLI's path on this machine, in this run: the same hops as Node relays that only
    // pipe bytes (bench/tunnel-floor.ts), with bin/orchard's Node flags. It is not a goal; what the CLI
    // row costs above it is what Orchard's framing and flow control cost.
    const chain = await relayChain(target);
    closers.push(chain.stop);
    const floor: Path = { name: 'bare Node relays, the CLI path\'s hops', dial: tcpDial(chain.port), pids: { client: process.pid, ...chain.pids, server: server.proc.pid } };

    const tunnelPids = { controller: ctl.proc.pid, worker: worker.pid, server: server.proc.pid };
    const paths: Path[] = [
      { name: 'direct loopback TCP', dial: tcpDial(target), pids: { client: process.pid, server: server.proc.pid } },
      { name: 'orchard tunnel (client API)', dial: apiDial, pids: { client: process.pid, ...tunnelPids } },
      { name: 'orchard tunnel (client API, ready conns)', dial: readyDial, pids: { client: process.pid, ...tunnelPids } },
      { name: 'orchard tunnel (client API, mux)', dial: muxDial, pids: { client: process.pid, ...tunnelPids } },
      { name: 'orchard port-forward (CLI, ready conns)', dial: tcpDial(cliPort), pids: { client: process.pid, cli: pf.proc.pid, ...tunnelPids } },
      { name: 'orchard port-forward (CLI, mux)', dial: tcpDial(cliMuxPort), pids: { client: process.pid, cli: pfMux.proc.pid, ...tunnelPids } },
    ];
    const sshPaths: Path[] = [];
    const dropbear = await startDropbear(dir).catch((err: Error) => ({ skipped: err.message }));
    if ('skipped' in dropbear) console.log(`ssh -L: skipped (${dropbear.skipped})\n`);
    else {
      for (const [label, cipher] of [
        ['chacha20-poly1305, the default', 'chacha20-poly1305@openssh.com'],
        ['aes128-ctr', 'aes128-ctr'],
      ]) {
        const f = await sshForward(dropbear, target, cipher);
        sshPaths.push({ name: `ssh -L via dropbear (${label})`, dial: tcpDial(f.port), pids: { client: process.pid, ssh: f.proc.pid, sshd: dropbear.proc.pid, server: server.proc.pid } });
      }
    }

    // (a)-(c) throughput
    console.log(`${'one connection'.padEnd(W)} upload MiB/s  download MiB/s   CPU s per GiB moved, by process`);
    const tp = new Map<string, Throughput>();
    for (const p of [...paths, floor, ...sshPaths]) {
      const r = await throughput(p, SIZE, RUNS);
      tp.set(p.name, r);
      console.log(`${p.name.padEnd(W)} ${r.up.toFixed(0).padStart(12)} ${r.down.toFixed(0).padStart(14)}   ${cpuText(r.cpu)}`);
    }

    // (d) latency
    console.log(`\n${'round trip of 64 B'.padEnd(W)}      p50 µs      p99 µs   added to direct p50 / p99`);
    let direct: number[] = [];
    const lat = new Map<string, number[]>();
    for (const p of [...paths, floor, ...sshPaths]) {
      const xs = await pingpong(p.dial, PINGS);
      if (!direct.length) direct = xs;
      lat.set(p.name, xs);
      const added = p === paths[0] ? '' : `${(pct(xs, 50) - pct(direct, 50)).toFixed(0)} / ${(pct(xs, 99) - pct(direct, 99)).toFixed(0)} µs`;
      console.log(`${p.name.padEnd(W)} ${pct(xs, 50).toFixed(0).padStart(11)} ${pct(xs, 99).toFixed(0).padStart(11)}   ${added}`);
    }

    // (e) concurrent tunnels
    const each = Math.floor(SIZE / CONNS);
    console.log(`\n${`${CONNS} concurrent downloads of ${(each / MiB).toFixed(2)} MiB (median of ${RUNS})`.padEnd(W)} aggregate MiB/s   first byte p50 / p99     CPU s per GiB moved, by process`);
    const conc = new Map<string, number>();
    for (const p of [...paths, floor, ...sshPaths]) {
      // The median of RUNS (one burst is 1-3 s here, and the first through a path warms it up).
      const rs = [];
      for (let i = 0; i < RUNS; i++) rs.push(await concurrent(p, CONNS, each));
      const r = rs.sort((a, b) => a.mibps - b.mibps)[Math.floor(RUNS / 2)];
      conc.set(p.name, r.mibps);
      const ttfb = `${r.ttfb50.toFixed(1)} / ${r.ttfb99.toFixed(1)} ms`;
      console.log(`${p.name.padEnd(W)} ${r.mibps.toFixed(0).padStart(15)}   ${ttfb.padEnd(22)}  ${cpuText(r.cpu)}${r.failed ? `   ${r.failed} FAILED` : ''}`);
    }

    // Setting up one tunnel: open → first byte, one at a time.
    console.log(`\n${`setting up one connection (${SETUPS} in a row)`.padEnd(W)} open → first byte p50 / p99`);
    const setup = new Map<string, number>();
    for (const p of [...paths, floor, ...sshPaths]) setup.set(p.name, await setupRow(p, SETUPS));

    // (f) One tunnel over a long link: RTT ms between the user's side and the controller (the worker
    // next to it), and for ssh -L between ssh and dropbear; the transfers are latency-bound, so one each way.
    const RTT = Number(values.rtt);
    if (RTT > 0) {
      const bytes = Math.min(SIZE, 64 * MiB);
      console.log(`\n${`one connection, ${RTT} ms round trip (${bytes / MiB} MiB)`.padEnd(W)} upload MiB/s  download MiB/s`);
      const far = await delayProxy(Number(new URL(ctl.url).port), RTT / 2);
      closers.push(far.close);
      const farEnv = { ORCHARD_HOME: join(dir, 'home-far') };
      const farCtx = await runCLI(['context', 'create', `https://127.0.0.1:${far.port}`, '--name', 'far', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], farEnv);
      if (farCtx.code !== 0) throw new Error(`context create: ${farCtx.stderr}`);
      const pfFar = await startChild(ORCHARD_BIN, ['port-forward', 'worker', 'bench', `0:${target}`], /forwarding 127\.0\.0\.1:(\d+)/, farEnv);
      const farPaths: Path[] = [{ name: 'orchard port-forward (CLI, mux)', dial: tcpDial(Number(pfFar.match[1])), pids: {} }];
      if (!('skipped' in dropbear)) {
        const sshFar = await delayProxy(dropbear.port, RTT / 2);
        closers.push(sshFar.close);
        const f = await sshForward({ port: sshFar.port, key: dropbear.key }, target, 'chacha20-poly1305@openssh.com');
        farPaths.push({ name: 'ssh -L via dropbear (chacha20-poly1305)', dial: tcpDial(f.port), pids: {} });
      }
      const farTp = new Map<string, number>();
      for (const p of farPaths) {
        const r = await throughput(p, bytes, 1);
        farTp.set(p.name, Math.min(r.up, r.down));
        console.log(`${p.name.padEnd(W)} ${r.up.toFixed(0).padStart(12)} ${r.down.toFixed(0).padStart(14)}`);
      }
      if (farTp.size === 2) {
        const [cliFar, sshFarTp] = [...farTp.values()];
        console.log(`${'the CLI ÷ ssh -L, slower direction'.padEnd(W)} ${(cliFar / sshFarTp).toFixed(2)}×`);
      }
      // A new connection whose client speaks first: the CLI sends its bytes with the tunnel's OPEN, ssh -L
      // waits for its channel's confirmation.
      console.log(`\n${`setting up one connection, ${RTT} ms round trip (20 in a row)`.padEnd(W)} open → first byte p50 / p99`);
      for (const p of farPaths) await setupRow(p, 20);

      // The worker far from the controller (the user next to it): the controller relays the client's
      // first bytes to the worker with its own OPEN, so the answer waits one round trip between them.
      startWorker('bench-far', `https://127.0.0.1:${far.port}`);
      await until('the far worker to register', () => c.getWorker('bench-far').catch(() => undefined));
      const toFar = await startChild(ORCHARD_BIN, ['port-forward', 'worker', 'bench-far', `0:${target}`], /forwarding 127\.0\.0\.1:(\d+)/, env);
      const farWorker: Path = { name: 'orchard port-forward (CLI, mux)', dial: tcpDial(Number(toFar.match[1])), pids: {} };
      await until('the far worker to take port-forwards', async () => ((await download(farWorker.dial, 16).catch(() => undefined)) ? true : undefined));
      console.log(`\n${`the same, the worker ${RTT} ms from the controller`.padEnd(W)} open → first byte p50 / p99`);
      await setupRow(farWorker, 20);
    }

    // Ratios and targets. The tunnel is judged by the user's path (the CLI) and by the API path.
    const d = tp.get(paths[0].name)!;
    const bestSSH = sshPaths.length ? Math.max(...sshPaths.map((p) => Math.min(tp.get(p.name)!.up, tp.get(p.name)!.down))) : undefined;
    console.log('');
    for (const p of paths.slice(1)) {
      const t = tp.get(p.name)!;
      const worst = Math.min(t.up / d.up, t.down / d.down);
      const vsSSH = bestSSH ? Math.min(t.up, t.down) / bestSSH : undefined;
      console.log(
        `${p.name}: ${(t.up / d.up).toFixed(2)}× direct up, ${(t.down / d.down).toFixed(2)}× direct down (target ≥ 0.5: ${worst >= 0.5 ? 'met' : 'MISSED'})` +
          (vsSSH !== undefined ? `; slower direction ${vsSSH.toFixed(2)}× the best ssh -L (target ≥ 1: ${vsSSH >= 1 ? 'met' : 'MISSED'})` : ''),
      );
    }

    // Issue #17's goals for the multiplexed paths (the ones `orchard port-forward` and portForwarder use).
    const bestSSHConc = sshPaths.length ? Math.max(...sshPaths.map((p) => conc.get(p.name)!)) : undefined;
    const goal = (what: string, value: string, met: boolean) => console.log(`goal: ${what}: ${value} (${met ? 'met' : 'MISSED'})`);
    console.log(`load average ${loadavg().map((x) => x.toFixed(2)).join(' ')} at the end`);
    // Each throughput goal with what the bare relays of the CLI's path did in this run, beside it.
    const bare = (x: string) => ` (bare relays: ${x})`;
    for (const name of ['orchard tunnel (client API, mux)', 'orchard port-forward (CLI, mux)']) {
      if (bestSSHConc) goal(`${name}, ${CONNS} concurrent ≥ 1.2× ssh -L`, `${(conc.get(name)! / bestSSHConc).toFixed(2)}×${bare(`${(conc.get(floor.name)! / bestSSHConc).toFixed(2)}×`)}`, conc.get(name)! >= 1.2 * bestSSHConc);
      const added = pct(lat.get(name)!, 50) - pct(direct, 50);
      const cap = name.includes('CLI') ? 300 : 150;
      goal(`${name}, round trip added to direct p50 ≤ ${cap} µs`, `${added.toFixed(0)} µs`, added <= cap);
      goal(`${name}, set-up ≤ 2 ms`, `${setup.get(name)!.toFixed(1)} ms`, setup.get(name)! <= 2);
    }
    const cli = tp.get('orchard port-forward (CLI, mux)')!;
    const bareTp = tp.get(floor.name)!;
    const slower = (t: Throughput) => Math.min(t.up, t.down);
    if (bestSSH) goal('one tunnel through the CLI (mux) ≥ 1.3× the best ssh -L', `${(slower(cli) / bestSSH).toFixed(2)}×${bare(`${(slower(bareTp) / bestSSH).toFixed(2)}×`)}`, slower(cli) >= 1.3 * bestSSH);
    const sum = (t: Throughput) => Object.values(t.cpu).reduce((a, b) => a + b, 0);
    goal('one tunnel through the CLI (mux) ≤ 7 CPU s per GiB, all processes', `${sum(cli).toFixed(2)}${bare(sum(bareTp).toFixed(2))}`, sum(cli) <= 7);
  } finally {
    await cleanup();
  }
}

// Last: everything above is initialised by now.
if (values.serve) serve();
else await main();
