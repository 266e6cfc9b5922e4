// Tart driver against a stand-in for the `tart` CLI (test/fixtures/fake-tart, see fake-tart.ts):
// checks the exact tart commands the driver issues (the fake logs every argv to calls.log), and
// the driver's behaviour on what tart answers. Runs anywhere Node runs; no macOS, no real VMs.
// The fake's "guest" serves an SSH banner on 127.0.0.1:FAKE_TART_SSH_PORT, and `tart ip` prints
// 127.0.0.1, so the driver is given the same port as its `sshPort`.
import { after, afterEach, before, beforeEach, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { Duplex } from 'node:stream';
import { printingLogger, waitFor } from './helpers.ts';
import { promisify } from 'node:util';
import { TartDriver } from '../src/worker/drivers/tart.ts';
import type { DriverVM } from '../src/worker/drivers/driver.ts';

const execFileP = promisify(execFile);
const FAKE_TART = resolve(import.meta.dirname, 'fixtures', 'fake-tart');
const UBUNTU = 'ghcr.io/cirruslabs/ubuntu'; // no tag: tart lists it as ...:latest
const MACOS = 'ghcr.io/cirruslabs/macos-sequoia-base:latest';

// Each test has its own fake Tart (its VMs, pulled images and call log), its own state dir and its
// own driver: no test depends on what another left behind.
let work: string;
let tartHome: string;
let stateDir: string;
let sshPort: number;
let driver: TartDriver;
let drivers: TartDriver[] = [];

function newDriver(): TartDriver {
  const d = new TartDriver({
    stateDir, tartBinary: FAKE_TART, sshPort, ipWaitSeconds: 2, pollIntervalMs: 200, readyTimeoutMs: 15_000,
    log: printingLogger('driver'),
  });
  drivers.push(d);
  return d;
}

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((res) => srv.listen(0, '127.0.0.1', () => res()));
  const port = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((res) => srv.close(() => res()));
  return port;
}

/** Every tart invocation so far, as argv arrays. */
function calls(): string[][] {
  try {
    return readFileSync(join(tartHome, 'calls.log'), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as string[]);
  } catch {
    return [];
  }
}

/** The invocations made while `fn` ran. */
async function callsDuring(fn: () => Promise<unknown>): Promise<string[][]> {
  const before = calls().length;
  await fn();
  return calls().slice(before);
}

const notList = (c: string[]) => c[0] !== 'list';

/** The fake's own record of a VM (cpu/memory/disk as `tart set` left them). */
function fakeVm(name: string): { cpu: number; memory: number; disk: number; from?: string; pid?: number } | undefined {
  const db = JSON.parse(readFileSync(join(tartHome, 'vms.json'), 'utf8')) as Record<string, { cpu: number; memory: number; disk: number; from?: string; pid?: number }>;
  return db[name];
}

async function fakeTart(...args: string[]): Promise<string> {
  return (await execFileP(FAKE_TART, args)).stdout;
}

function spec(localName: string, extra: Partial<DriverVM> = {}): DriverVM {
  return {
    localName, uid: `uid-${localName}`, image: UBUNTU, imagePullPolicy: 'IfNotPresent',
    cpu: 2, memory: 4096, username: 'admin', password: 'admin', ...extra,
  };
}

/** VMs made by the driver (not yet running), as the test's starting point. */
async function prepared(...names: string[]) {
  for (const name of names) await driver.prepare(spec(name));
}

function readLine(sock: Duplex, ms = 5000): Promise<string> {
  return new Promise((res, rej) => {
    let got = '';
    const timer = setTimeout(() => rej(new Error(`timeout, got ${JSON.stringify(got)}`)), ms);
    sock.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (got.includes('\n')) {
        clearTimeout(timer);
        res(got);
      }
    });
    sock.once('error', rej);
  });
}

before(async () => {
  // One compile cache for every fake Tart of this file (each test's home is new).
  process.env.NODE_COMPILE_CACHE = await mkdtemp(join(tmpdir(), 'orchard-fake-tart-cache-'));
});

after(async () => {
  await rm(process.env.NODE_COMPILE_CACHE!, { recursive: true, force: true });
  delete process.env.NODE_COMPILE_CACHE;
});

beforeEach(async () => {
  work = await mkdtemp(join(tmpdir(), 'orchard-tart-test-'));
  tartHome = join(work, 'tart');
  stateDir = join(work, 'state');
  await mkdir(tartHome, { recursive: true });
  await writeFile(join(tartHome, 'registry.json'), JSON.stringify([
    { name: `${UBUNTU}:latest`, disk: 20, cpu: 4, memory: 8192 },
    { name: MACOS, disk: 50, cpu: 4, memory: 8192 },
  ]));
  sshPort = await freePort();
  // the fake reads these; `tart run` children inherit them from the driver's environment
  process.env.FAKE_TART_HOME = tartHome;
  process.env.FAKE_TART_SSH_PORT = String(sshPort);
  process.env.FAKE_TART_BOOT_MS = '300';
  drivers = [];
  driver = newDriver();
});

afterEach(async () => {
  // Never leave a fake `tart run` behind, whatever failed.
  for (const vm of await driver.list().catch(() => [])) await driver.remove(vm.localName).catch(() => {});
  try {
    for (const vm of Object.values(JSON.parse(readFileSync(join(tartHome, 'vms.json'), 'utf8')) as Record<string, { pid?: number }>)) {
      if (vm.pid) process.kill(vm.pid, 'SIGKILL');
    }
  } catch {
    // nothing left
  }
  await rm(work, { recursive: true, force: true });
});

test('prepare with IfNotPresent pulls an absent image, clones it and sets cpu, memory and disk', async () => {
  const progress: string[] = [];
  const c = await callsDuring(() => driver.prepare(spec('orchard-a-1', { diskSize: 30 }), (m) => progress.push(m)));
  assert.deepEqual(c[0], ['list', '--format', 'json']);
  assert.deepEqual(c.filter(notList), [
    ['pull', UBUNTU],
    ['clone', UBUNTU, 'orchard-a-1'],
    ['set', 'orchard-a-1', '--random-mac'],
    ['set', 'orchard-a-1', '--cpu', '2', '--memory', '4096', '--disk-size', '30'],
  ]);
  // tart's pull output reaches the progress callback line by line
  assert.ok(progress.includes('pulling manifest...'), progress.join(' | '));
  assert.ok(progress.includes('100%'), progress.join(' | '));
  assert.deepEqual(fakeVm('orchard-a-1'), { ...fakeVm('orchard-a-1'), cpu: 2, memory: 4096, disk: 30, from: `${UBUNTU}:latest` });
  assert.deepEqual(await driver.list(), [{ localName: 'orchard-a-1', uid: 'uid-orchard-a-1', running: false, image: UBUNTU }]);
});

test('prepare with IfNotPresent does not pull an image that is present', async () => {
  await fakeTart('pull', UBUNTU);
  const c = await callsDuring(() => driver.prepare(spec('orchard-b-2', { cpu: 1, memory: 2048 })));
  assert.deepEqual(c.filter(notList), [
    ['clone', UBUNTU, 'orchard-b-2'],
    ['set', 'orchard-b-2', '--random-mac'],
    ['set', 'orchard-b-2', '--cpu', '1', '--memory', '2048'],
  ]);
});

test('prepare with Always pulls even a present image; a smaller diskSize never shrinks the disk', async () => {
  await fakeTart('pull', MACOS);
  const progress: string[] = [];
  const c = await callsDuring(() => driver.prepare(
    spec('orchard-c-3', { image: MACOS, imagePullPolicy: 'Always', cpu: 4, memory: 8192, diskSize: 40 }), (m) => progress.push(m)));
  assert.deepEqual(c.filter(notList), [
    ['pull', MACOS],
    ['clone', MACOS, 'orchard-c-3'],
    ['set', 'orchard-c-3', '--random-mac'],
    ['set', 'orchard-c-3', '--cpu', '4', '--memory', '8192'],
  ]);
  assert.ok(progress.some((m) => /disk stays at 50 GB/.test(m)), progress.join(' | '));
  assert.equal(fakeVm('orchard-c-3')?.disk, 50);
});

test('start runs tart with softnet, nested and directory flags; waitReady, ip and dial reach the guest', async () => {
  const src = join(work, 'src');
  const cache = join(work, 'cache');
  await mkdir(src);
  await mkdir(cache);
  const vm = spec('orchard-a-1', {
    netSoftnet: true, netSoftnetAllow: ['10.0.0.0/8', '192.168.0.0/16'], netSoftnetBlock: ['0.0.0.0/0'], nested: true,
    hostDirs: [{ name: 'src', path: src }, { name: 'cache', path: cache, ro: true }],
  });
  await prepared('orchard-a-1', 'orchard-b-2');
  const c = await callsDuring(() => driver.start(vm));
  assert.deepEqual(c.filter(notList), [[
    'run', 'orchard-a-1', '--no-graphics', '--net-softnet', '--net-softnet-allow=10.0.0.0/8,192.168.0.0/16',
    '--net-softnet-block=0.0.0.0/0', '--nested', `--dir=src:${src}`, `--dir=cache:${cache}:ro`,
  ]]);
  assert.deepEqual(await driver.list(), [
    { localName: 'orchard-a-1', uid: 'uid-orchard-a-1', running: true, image: UBUNTU },
    { localName: 'orchard-b-2', uid: 'uid-orchard-b-2', running: false, image: UBUNTU },
  ]);
  // starting a running VM again is a no-op
  assert.deepEqual((await callsDuring(() => driver.start(vm))).filter(notList), []);

  const r = await callsDuring(() => driver.waitReady('orchard-a-1', AbortSignal.timeout(10_000)));
  assert.ok(r.some((x) => JSON.stringify(x) === JSON.stringify(['ip', 'orchard-a-1', '--wait', '2'])), JSON.stringify(r));
  assert.deepEqual(r.filter(notList).filter((x) => x[0] !== 'ip'), []);

  const i = await callsDuring(async () => assert.equal(await driver.ip('orchard-a-1'), '127.0.0.1'));
  assert.deepEqual(i, [['ip', 'orchard-a-1']]);

  const sock = await driver.dial('orchard-a-1', sshPort);
  try {
    assert.equal(await readLine(sock), 'SSH-2.0-fake\r\n');
  } finally {
    sock.destroy();
  }
  assert.ok(existsSync(driver.logPath('orchard-a-1')), 'tart run output goes to a log file in the state dir');
});

test('list ignores VMs that are not Orchard\'s and OCI images', async () => {
  await prepared('orchard-a-1', 'orchard-b-2');
  await fakeTart('clone', UBUNTU, 'my-dev-vm');
  await fakeTart('clone', UBUNTU, 'orchardish');
  const names = (await driver.list()).map((v) => v.localName);
  assert.deepEqual(names, ['orchard-a-1', 'orchard-b-2']);
});

test('a new driver instance adopts the running VM; stop ends it for both', async () => {
  await prepared('orchard-a-1');
  await driver.start(spec('orchard-a-1'));
  const second = newDriver();
  assert.deepEqual((await second.list()).find((v) => v.localName === 'orchard-a-1'),
    { localName: 'orchard-a-1', uid: 'uid-orchard-a-1', running: true, image: UBUNTU });
  assert.deepEqual((await callsDuring(() => second.start(spec('orchard-a-1')))).filter(notList), [], 'no second tart run');
  await second.waitReady('orchard-a-1');
  assert.equal(await second.ip('orchard-a-1'), '127.0.0.1');

  const ownExit = driver.waitExit('orchard-a-1'); // the `tart run` child exits
  const listsBefore = calls().filter((c) => c[0] === 'list').length;
  const adoptedExit = second.waitExit('orchard-a-1'); // `tart list` polling
  // It has seen the VM running (else it rightly answers 'not running') once its first poll is over:
  // a second poll starts only after the first one's answer was read.
  await waitFor('the adopting driver to poll tart list twice', () => calls().filter((c) => c[0] === 'list').length >= listsBefore + 2, 10_000, 20);
  const c = await callsDuring(() => driver.stop('orchard-a-1', 5000));
  assert.deepEqual(c.filter(notList), [['stop', 'orchard-a-1', '--timeout', '5']]);
  assert.deepEqual(await ownExit, { reason: 'stopped' });
  assert.deepEqual(await adoptedExit, { reason: 'the VM stopped' });
  assert.equal((await second.list()).find((v) => v.localName === 'orchard-a-1')?.running, false);
  assert.equal(fakeVm('orchard-a-1')?.pid, undefined);

  // idempotent: a stopped VM needs no tart stop
  assert.deepEqual((await callsDuring(() => driver.stop('orchard-a-1'))).filter(notList), []);
  assert.deepEqual(await second.waitExit('orchard-a-1'), { reason: 'not running' });
  await assert.rejects(driver.ip('orchard-a-1'), /no IP address found, is your VM running\?/);
});

test('preparing the same VM again keeps its disk', async () => {
  await prepared('orchard-a-1');
  const c = await callsDuring(() => driver.prepare(spec('orchard-a-1', { diskSize: 40 })));
  assert.deepEqual(c.filter(notList), [['set', 'orchard-a-1', '--cpu', '2', '--memory', '4096', '--disk-size', '40']]);
});

test('waitExit reports a guest that powers itself off; waitReady rejects when the VM dies or on abort', async () => {
  await prepared('orchard-b-2');
  process.env.FAKE_TART_RUN_EXIT_AFTER_MS = '1000';
  try {
    await driver.start(spec('orchard-b-2'));
  } finally {
    delete process.env.FAKE_TART_RUN_EXIT_AFTER_MS;
  }
  assert.deepEqual(await driver.waitExit('orchard-b-2'), { reason: 'the VM shut down' });

  process.env.FAKE_TART_BOOT_MS = '60000'; // never ready within the test
  try {
    await driver.start(spec('orchard-b-2'));
    await assert.rejects(driver.waitReady('orchard-b-2', AbortSignal.timeout(400)), { name: 'TimeoutError' });
    const waiting = driver.waitReady('orchard-b-2');
    setTimeout(() => void fakeTart('stop', 'orchard-b-2'), 300);
    await assert.rejects(waiting, /orchard-b-2 stopped running before the guest was ready/);
  } finally {
    process.env.FAKE_TART_BOOT_MS = '300';
  }
});

test('remove stops a running VM, then deletes it; idempotent', async () => {
  await prepared('orchard-a-1', 'orchard-b-2', 'orchard-c-3');
  await driver.start(spec('orchard-c-3'));
  const c = await callsDuring(() => driver.remove('orchard-c-3'));
  assert.deepEqual(c.filter(notList), [['stop', 'orchard-c-3', '--timeout', '0'], ['delete', 'orchard-c-3']]);
  const d = await callsDuring(() => driver.remove('orchard-b-2'));
  assert.deepEqual(d.filter(notList), [['delete', 'orchard-b-2']]);
  assert.deepEqual((await driver.list()).map((v) => v.localName), ['orchard-a-1']);
  assert.equal(existsSync(driver.logPath('orchard-c-3')), false);
  await driver.remove('orchard-c-3'); // gone already: no error
});

test('bridged networking: --net-bridged on tart run, the ARP resolver for tart ip', async () => {
  await driver.prepare(spec('orchard-e-6', { netBridged: 'en0', headless: false }));
  const c = await callsDuring(() => driver.start(spec('orchard-e-6', { netBridged: 'en0', headless: false })));
  assert.deepEqual(c.filter(notList), [['run', 'orchard-e-6', '--net-bridged=en0']]); // headless: false shows a window
  const r = await callsDuring(() => driver.waitReady('orchard-e-6'));
  assert.ok(r.some((x) => JSON.stringify(x) === JSON.stringify(['ip', 'orchard-e-6', '--wait', '2', '--resolver', 'arp'])), JSON.stringify(r));
  assert.deepEqual(await callsDuring(() => driver.ip('orchard-e-6')), [['ip', 'orchard-e-6', '--resolver', 'arp']]);
  await driver.remove('orchard-e-6');
});

test('errors from tart reject with tart\'s message', async () => {
  await prepared('orchard-a-1');
  // a local VM as the image: no pull, the clone fails
  await assert.rejects(driver.prepare(spec('orchard-d-4', { image: 'no-such-vm' })),
    /tart clone failed \(exit code 2\): the specified VM "no-such-vm" does not exist/);
  // a remote image the registry does not have: the pull fails
  await assert.rejects(driver.prepare(spec('orchard-d-4', { image: 'ghcr.io/cirruslabs/no-such-image:1' })),
    /tart pull failed \(exit code 1\): .*code: 404/);
  // tart run refuses the flags: start rejects with what it printed
  await assert.rejects(driver.start(spec('orchard-a-1', { netSoftnet: true, netBridged: 'en0' })),
    /--net-bridged, --net-softnet and --net-host are mutually exclusive/);
  await assert.rejects(driver.start(spec('orchard-nope-5')), /the specified VM "orchard-nope-5" does not exist/);
  assert.deepEqual(await driver.list(), [{ localName: 'orchard-a-1', uid: 'uid-orchard-a-1', running: false, image: UBUNTU }]);
  // a missing tart binary says so
  const missing = new TartDriver({ stateDir, tartBinary: join(work, 'no-tart') });
  await assert.rejects(missing.list(), /no-tart not found/);
});

test('suspend: tart run --suspendable, tart suspend; list says suspended (also to a new driver); resume restores the same boot with tart run', async () => {
  await prepared('orchard-s-1');
  const vm = spec('orchard-s-1', { suspendable: true });
  assert.deepEqual((await callsDuring(() => driver.start(vm))).filter(notList)[0], ['run', 'orchard-s-1', '--no-graphics', '--suspendable']);
  await driver.waitReady('orchard-s-1');
  const bootId = (fakeVm('orchard-s-1') as { bootId?: string }).bootId;
  assert.ok(bootId);

  const c = await callsDuring(() => driver.suspend('orchard-s-1'));
  assert.deepEqual(c.filter(notList), [['suspend', 'orchard-s-1']]);
  assert.deepEqual((await newDriver().list()).find((v) => v.localName === 'orchard-s-1'),
    { localName: 'orchard-s-1', uid: 'uid-orchard-s-1', running: false, suspended: true, image: UBUNTU }, 'a restarted worker sees it suspended');
  assert.equal(fakeVm('orchard-s-1')?.pid, undefined, 'tart run exited: the VM holds no CPU');
  // idempotent: no second tart suspend of a suspended VM
  assert.deepEqual((await callsDuring(() => driver.suspend('orchard-s-1'))).filter(notList), []);

  const second = newDriver();
  let resumed = false;
  const r = await callsDuring(async () => (resumed = await second.resume(vm)));
  assert.equal(resumed, true);
  assert.deepEqual(r.filter(notList), [['run', 'orchard-s-1', '--no-graphics', '--suspendable']]);
  await second.waitReady('orchard-s-1');
  assert.equal((fakeVm('orchard-s-1') as { bootId?: string }).bootId, bootId, 'restored, not booted again');
  assert.match(readFileSync(second.logPath('orchard-s-1'), 'utf8'), /restoring VM state from a snapshot/);
  assert.deepEqual((await second.list()).find((v) => v.localName === 'orchard-s-1')?.running, true);
  // A running VM is not suspended: resume does nothing.
  assert.deepEqual((await callsDuring(async () => assert.equal(await second.resume(vm), false))).filter(notList), []);
});

test('suspend of a VM not run --suspendable fails with tart\'s reason and leaves it stopped, not suspended', async () => {
  await prepared('orchard-s-2');
  await driver.start(spec('orchard-s-2'));
  await driver.waitReady('orchard-s-2');
  await assert.rejects(driver.suspend('orchard-s-2'), /did not suspend it \(it stopped instead\).*not configured to support save\/restore/s);
  const listed = (await driver.list()).find((v) => v.localName === 'orchard-s-2');
  assert.deepEqual([listed?.running, listed?.suspended], [false, undefined]);
  await assert.rejects(driver.suspend('orchard-s-2'), /tart suspend failed \(exit code 2\): VM "orchard-s-2" is not running/);
});
