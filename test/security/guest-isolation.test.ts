// From inside a VM, as a hostile guest would: the host's loopback (the controller, any local service,
// other VMs' forwards) is out of reach, consoles are unix sockets only the worker opens, and the
// worker still reaches the guest's SSH, any other port, and its screen (VNC through dial(…, 5900)).
// Real QEMU guests (debian-dev: busybox nc) under a real controller and worker in this process.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import net from 'node:net';
import { networkInterfaces } from 'node:os';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { promisify } from 'node:util';
import ssh2 from 'ssh2';
import { heavyFile, qemuCluster, waitFor } from '../helpers.ts';

await heavyFile(); // boots VMs

const execFileP = promisify(execFile);

let q: Awaited<ReturnType<typeof qemuCluster>>;
const accepted: string[] = [];
const servers: net.Server[] = [];

/** A TCP server on `host` that records every connection it accepts; its port. */
async function listener(host: string, name: string): Promise<number> {
  const srv = net.createServer((sock) => {
    accepted.push(name);
    sock.end('hello from the host\n');
  });
  servers.push(srv);
  await new Promise<void>((r) => srv.listen(0, host, r));
  return (srv.address() as net.AddressInfo).port;
}

async function localNameOf(vm: string): Promise<string> {
  const found = (await q.driver.list()).find((v) => v.localName.startsWith(`orchard-${vm}-`));
  assert.ok(found, `a local VM for ${vm}`);
  return found.localName;
}

interface VmFile { pid: number; netPid?: number; ports?: { ssh?: number; vnc?: number } }
const vmFile = (localName: string) => JSON.parse(readFileSync(join(q.driver.vmDir(localName), 'vm.json'), 'utf8')) as VmFile;

/** Runs `command` in the guest over SSH through the worker's driver. */
async function guest(localName: string, command: string): Promise<string> {
  const sock = await q.driver.dial(localName, 22);
  const conn = new ssh2.Client();
  return new Promise((resolve, reject) => {
    conn.on('error', reject);
    conn.on('ready', () => conn.exec(command, (err, stream) => {
      if (err) return reject(err);
      let out = '';
      stream.on('data', (d: Buffer) => (out += d.toString()));
      stream.stderr.on('data', (d: Buffer) => (out += d.toString()));
      stream.on('close', () => {
        conn.end();
        resolve(out);
      });
    }));
    conn.connect({ sock, username: 'admin', password: 'admin', readyTimeout: 30_000, hostVerifier: () => true });
  });
}

/** TCP ports that process `pid` listens on in the host's network namespace (this test's). */
function hostListenPorts(pid: number): number[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m) inodes.add(m[1]);
    } catch {
      // closed meanwhile
    }
  }
  const ports: number[] = [];
  for (const table of ['/proc/self/net/tcp', '/proc/self/net/tcp6']) {
    for (const line of readFileSync(table, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      // st 0A = LISTEN; f[9] = inode
      if (f[3] === '0A' && inodes.has(f[9])) ports.push(parseInt(f[1].split(':')[1], 16));
    }
  }
  return ports;
}

function readBytes(sock: Duplex, n: number, ms = 10_000): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let len = 0;
    const timer = setTimeout(() => reject(new Error(`timeout after ${ms} ms`)), ms);
    sock.on('data', (d: Buffer) => {
      chunks.push(d);
      len += d.length;
      if (len >= n) {
        clearTimeout(timer);
        resolve(Buffer.concat(chunks));
      }
    });
    sock.on('error', reject);
  });
}

before(async () => {
  q = await qemuCluster();
  await q.admin.createVM({ name: 'neighbour', image: 'debian-dev', cpu: 1, memory: 256 });
  await q.runningVM('attacker', { memory: 256 });
}, { timeout: 300_000 });

after(async () => {
  for (const s of servers) s.close();
  await q?.close();
});

test('a guest reaches no port of its host\'s loopback, nor the host through its own address', { timeout: 120_000 }, async () => {
  const attacker = await localNameOf('attacker');
  const loopbackPort = await listener('127.0.0.1', 'loopback');
  const anyPort = await listener('0.0.0.0', 'any address');
  const controllerPort = Number(new URL(q.ctl.url).port);
  await waitFor('the neighbour to run', async () => (await q.admin.getVM('neighbour')).status === 'running', 180_000, 200);
  const neighbour = await localNameOf('neighbour');
  const targets = [
    `10.0.2.2 ${loopbackPort}`, // slirp's gateway: the host's loopback, before
    `10.0.2.2 ${controllerPort}`,
    `10.0.2.100 ${loopbackPort}`,
    `10.0.2.2 ${anyPort}`,
  ];
  // The neighbour's SSH forward, unless it happens to have the attacker's own forward's number
  // (each VM's forwards live in its own namespace: that one would lead back to the attacker).
  const neighbourSsh = vmFile(neighbour).ports?.ssh;
  if (neighbourSsh && neighbourSsh !== vmFile(attacker).ports?.ssh) targets.push(`10.0.2.2 ${neighbourSsh}`);
  const hostAddress = Object.values(networkInterfaces()).flat().find((a) => a && a.family === 'IPv4' && !a.internal)?.address;
  if (hostAddress) targets.push(`${hostAddress} ${anyPort}`);

  const out = await guest(attacker, targets.map((t) => `if nc -w 3 ${t} </dev/null >/dev/null 2>&1; then echo "open ${t}"; else echo "closed ${t}"; fi`).join('; '));
  console.log(`# from the guest:\n${out.trimEnd().replace(/^/gm, '#   ')}`);
  assert.deepEqual(out.trim().split('\n'), targets.map((t) => `closed ${t}`));
  assert.deepEqual(accepted, [], 'no connection from the guest reached a host listener');
});

test('consoles are unix sockets: no QEMU or pasta listens on a TCP port of the host; the worker gets the screen', { timeout: 60_000 }, async () => {
  for (const vm of ['attacker', 'neighbour']) {
    const localName = await localNameOf(vm);
    const file = vmFile(localName);
    assert.equal(file.ports?.vnc, undefined);
    assert.ok(file.netPid, 'pasta gives the VM its outbound network');
    assert.deepEqual(hostListenPorts(file.pid), [], `${vm}: QEMU listens on no TCP port of the host`);
    assert.deepEqual(hostListenPorts(file.netPid), [], `${vm}: pasta listens on no TCP port of the host`);
    assert.match(readFileSync(`/proc/${file.pid}/cmdline`, 'utf8'), /\0-vnc\0unix:vnc\.sock\0/);
    // The VM's namespace has the host's uplink (pasta's interface and a default route), offline too.
    const { stdout } = await execFileP('nsenter', ['--target', String(file.pid), '--user', '--net', '--preserve-credentials', '--', 'ip', '-4', 'route']);
    assert.match(stdout, /^default via /m, `${vm}: the namespace routes to the outside`);

    const vnc = await q.driver.dial(localName, 5900);
    assert.match((await readBytes(vnc, 12)).toString(), /^RFB \d{3}\.\d{3}\n/);
    vnc.destroy();
  }
});

test('the worker still reaches any guest port on demand', { timeout: 60_000 }, async () => {
  const attacker = await localNameOf('attacker');
  const started = await guest(attacker, 'setsid nc -ll -p 8080 -e /bin/cat </dev/null >/dev/null 2>&1 & ' +
    'for i in $(seq 100); do netstat -ltn | grep -q ":8080 " && exit 0; sleep 0.1; done; echo not listening');
  assert.equal(started, '');
  const s = await q.driver.dial(attacker, 8080);
  s.write('ping 8080\n');
  assert.equal((await readBytes(s, 10)).toString(), 'ping 8080\n');
  s.destroy();
});
