// VM disks, VM directories and images on a worker are its own user's only (dirs 0700, files 0600),
// whatever the umask (0 here: everything would be created world-writable otherwise) and whatever
// mode an earlier version left on a directory.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { readdirSync, statSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { buildDebianDev, imageDir, importImage } from '../../src/worker/images.ts';
import { QemuDriver } from '../../src/worker/drivers/qemu.ts';
import { TartDriver } from '../../src/worker/drivers/tart.ts';
import type { DriverVM } from '../../src/worker/drivers/driver.ts';
import { heavyFile, TEST_IMAGES } from '../helpers.ts';

await heavyFile(); // boots VMs

const execFileP = promisify(execFile);
let work: string;
let umask: number;

before(async () => {
  umask = process.umask(0o000);
  work = await mkdtemp(join(tmpdir(), 'orchard-modes-'));
});
after(async () => {
  process.umask(umask);
  await rm(work, { recursive: true, force: true });
});

const mode = (path: string) => (statSync(path).mode & 0o777).toString(8);

/** `dir` is 0700 and every regular file directly in it 0600: the offenders, as "name mode". */
function notPrivate(dir: string): string[] {
  const out = mode(dir) === '700' ? [] : [`${dir} ${mode(dir)}`];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.isFile() && mode(join(dir, e.name)) !== '600') out.push(`${e.name} ${mode(join(dir, e.name))}`);
  }
  return out;
}

function spec(localName: string, image: string): DriverVM {
  return { localName, uid: `uid-${localName}`, image, imagePullPolicy: 'IfNotPresent', cpu: 1, memory: 256, username: 'admin', password: 'admin' };
}

test('images: the store, each image directory and its files are private', { timeout: 15 * 60_000 }, async () => {
  const store = join(work, 'images');
  const src = join(work, 'src.qcow2');
  await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', src, '64M']);
  const imported = await importImage(store, 'imported', src);
  assert.deepEqual(notPrivate(store), []);
  assert.deepEqual(notPrivate(imported.dir), []);

  const built = await buildDebianDev(TEST_IMAGES);
  assert.equal(mode(TEST_IMAGES), '700');
  assert.deepEqual(notPrivate(built.dir), []);
});

test('qemu driver: vms/, each VM directory and its disks are private, also where an earlier version left 0755', { timeout: 120_000 }, async () => {
  const dataDir = join(work, 'qemu');
  const store = join(work, 'qemu-images');
  const src = join(work, 'boot.qcow2');
  await execFileP('qemu-img', ['create', '-q', '-f', 'qcow2', src, '64M']);
  await importImage(store, 'disk-image', src);
  // An existing VM directory as an earlier version made it.
  await mkdir(join(dataDir, 'vms', 'orchard-old'), { recursive: true, mode: 0o755 });
  await writeFile(join(dataDir, 'vms', 'orchard-old', 'stale.log'), 'x', { mode: 0o644 });
  const driver = new QemuDriver({ dataDir, imagesDir: store, accel: 'tcg' });
  for (const name of ['orchard-new', 'orchard-old']) {
    await driver.prepare({ ...spec(name, 'disk-image'), diskSize: 1 });
    const dir = join(dataDir, 'vms', name);
    assert.equal(mode(join(dataDir, 'vms')), '700');
    assert.deepEqual(notPrivate(dir), [], name);
    for (const disk of ['disk.qcow2', 'base.qcow2']) assert.equal(mode(join(dir, disk)), '600', `${name} ${disk}`);
  }
  // The kernel image: its files are linked into the VM's directory.
  const kernelDriver = new QemuDriver({ dataDir, imagesDir: TEST_IMAGES, accel: 'tcg', warmStart: false });
  await kernelDriver.prepare(spec('orchard-kernel', 'debian-dev'));
  assert.deepEqual(notPrivate(join(dataDir, 'vms', 'orchard-kernel')), []);
  assert.deepEqual(notPrivate(imageDir(TEST_IMAGES, 'debian-dev')), []);
  for (const name of ['orchard-new', 'orchard-old', 'orchard-kernel']) await driver.remove(name);
});

test('tart driver: its state directory and files are private', { timeout: 60_000 }, async () => {
  const tartHome = join(work, 'tart-home');
  await mkdir(tartHome);
  await writeFile(join(tartHome, 'registry.json'), JSON.stringify([{ name: 'ghcr.io/cirruslabs/ubuntu:latest', disk: 20, cpu: 4, memory: 8192 }]));
  // A free port for the fake guest's SSH server.
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const sshPort = (srv.address() as net.AddressInfo).port;
  await new Promise<void>((r) => srv.close(() => r()));
  const env = { FAKE_TART_HOME: tartHome, FAKE_TART_SSH_PORT: String(sshPort), FAKE_TART_BOOT_MS: '100' };
  Object.assign(process.env, env);
  const stateDir = join(work, 'tart-state');
  const driver = new TartDriver({ stateDir, tartBinary: resolve(import.meta.dirname, '..', 'fixtures', 'fake-tart'), ipWaitSeconds: 2, pollIntervalMs: 200 });
  try {
    const vm = spec('orchard-tart', 'ghcr.io/cirruslabs/ubuntu:latest');
    await driver.prepare(vm);
    await driver.start(vm);
    assert.deepEqual(notPrivate(stateDir), []);
    assert.ok(readdirSync(stateDir).some((f) => f.endsWith('.json')) && readdirSync(stateDir).some((f) => f.endsWith('.log')));
    await driver.remove(vm.localName);
  } finally {
    for (const k of Object.keys(env)) delete process.env[k];
  }
});
