// A full disk while pulling, on a real small file system: a 40 MiB tmpfs mounted as the image store.
// Mounting needs root; CI runs the suite as root, so a test run without root fails here (loudly, in
// `before`) rather than skipping. A pull that cannot fit fails with NO_SPACE and a message that
// names the image, the directory, what it needs and what is free; it leaves nothing behind, an image
// already cached on that store stays usable, and once there is room the pull succeeds. End to end, a
// real qemu worker fails only the VM whose image does not fit, with that message as its reason.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildDebianDev } from '../src/worker/images.ts';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { PullError } from '../src/worker/oci/errors.ts';
import { Registries } from '../src/worker/oci/registries.ts';
import { heavyFile, inProcessController, qemuWorker, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';
import { ociLayout, qcow2WithData, skopeoPush, startRegistry, throttledProxy, type TestRegistry } from './registry.ts';

await heavyFile(); // boots VMs

const MIB = 1024 * 1024;
let registry: TestRegistry;
let work: string;
/** the tmpfs: the image store of every cache in this file */
let store: string;
const hashOf = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

before(async () => {
  if (process.getuid?.() !== 0) throw new Error('this test mounts a tmpfs and needs root (CI runs the suite as root): run it as root');
  registry = await startRegistry();
  work = tempDir('orchard-full-');
  store = join(work, 'store');
  mkdirSync(store);
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=40m,mode=0700', 'orchard-test-full', store]);
});
after(async () => {
  // Lazily, so a file still open cannot keep the mount (and the test's memory) behind.
  if (store) execFileSync('umount', ['-l', store], { stdio: 'ignore' });
  await registry?.stop();
  if (work) rmSync(work, { recursive: true, force: true });
});

/** An image of one layer holding `file` as /disk/NAME, pushed as REPO:TAG. */
function pushFile(repo: string, tag: string, file: string, name = 'disk.qcow2', gzip = true): void {
  const dir = tempDir('orchard-img-');
  ociLayout(join(dir, 'layout'), [{ files: { [`disk/${name}`]: { copy: file } }, gzip }], tag);
  skopeoPush(join(dir, 'layout'), tag, registry, repo);
  rmSync(dir, { recursive: true, force: true });
}

const cacheOn = (host = registry.host) => new ImageCache({ storeDir: store, registries: (h) => (h === host ? { insecure: true } : undefined) });
const mib = (n: number) => `${(n / MIB).toFixed(1)} MiB`;
const freeNow = () => {
  const out = execFileSync('df', ['-B1', '--output=avail', store], { encoding: 'utf8' }).trim().split('\n').pop()!;
  return Number(out);
};

/** Nothing of a failed pull is left: no entry, blob, partial download, temp dir or ref beside what `keep` names. */
function assertClean(keepEntries: number) {
  const oci = join(store, '.oci');
  assert.equal(readdirSync(join(oci, 'entries')).length, keepEntries, 'entries');
  for (const d of ['blobs', 'partial', 'tmp']) assert.deepEqual(readdirSync(join(oci, d)), [], `${d} is empty`);
  assert.deepEqual(readdirSync(join(oci, 'refs')).filter((f) => f.endsWith('.tmp')), [], 'no half-written ref');
}

let small: { disk: string; ref: string; hash: string };

test('an image too big for the store fails up front with NO_SPACE: what, where, needed and free; the cached image stays usable', async () => {
  const dir = tempDir('orchard-img-');
  const smallDisk = qcow2WithData(dir, 'small', 2);
  pushFile('team/small', 'v1', smallDisk);
  small = { disk: smallDisk, ref: `${registry.host}/team/small:v1`, hash: hashOf(smallDisk) };
  const cache = cacheOn();
  const first = await cache.ensure(small.ref, { policy: 'IfNotPresent' });
  assert.equal(hashOf(first.disk), small.hash);
  pushFile('team/big', 'v1', qcow2WithData(dir, 'big', 48));
  const free = freeNow();
  await assert.rejects(cache.ensure(`${registry.host}/team/big:v1`, { policy: 'IfNotPresent' }), (err: PullError) => {
    assert.equal(err.code, 'NO_SPACE');
    assert.match(err.message, new RegExp(`^no space left on the device of ${store}/\\.oci while pulling ${registry.host}/team/big:v1: it needs about (\\d+\\.\\d) MiB`));
    const needed = Number(/needs about (\d+\.\d) MiB/.exec(err.message)![1]);
    assert.ok(needed >= 96, `it needs the 48 MiB layer and as much again to unpack it (${err.message})`);
    assert.match(err.message, new RegExp(`${mib(free).replace('.', '\\.')} free`));
    return true;
  });
  assertClean(1);
  const again = await cache.ensure(small.ref, { policy: 'IfNotPresent' });
  assert.equal(again.dir, first.dir);
  assert.equal(hashOf(again.disk), small.hash, 'the cached image is untouched');
  cache.close();
  rmSync(dir, { recursive: true, force: true });
});

test('a disk that fills while a layer downloads: NO_SPACE, no partial file left; with room again the pull succeeds', async () => {
  const dir = tempDir('orchard-img-');
  const disk = qcow2WithData(dir, 'medium', 12);
  pushFile('team/medium', 'v1', disk, 'disk.qcow2', false);
  // Slowly (8 MiB/s), so the disk can fill under the download.
  const proxy = await throttledProxy(registry.host, 8 * MIB);
  const cache = cacheOn(proxy.host);
  const ref = `${proxy.host}/team/medium:v1`;
  const pull = cache.ensure(ref, { policy: 'IfNotPresent' });
  const failed = assert.rejects(pull, (err: PullError) => {
    assert.equal(err.code, 'NO_SPACE', err.message);
    assert.match(err.message, new RegExp(`^no space left on the device of ${store}/\\.oci/partial while downloading ${ref} \\(blob sha256:[a-f0-9]{64}\\): it needs about \\d+\\.\\d MiB, \\d+\\.\\d MiB free$`));
    return true;
  });
  const partial = join(store, '.oci', 'partial');
  await waitFor('the download to start', () => readdirSync(partial).some((f) => statSync(join(partial, f)).size > 2 * MIB), 20_000, 10);
  // Something else on the host takes the room left.
  const filler = join(store, 'filler');
  try {
    writeFileSync(filler, Buffer.alloc(freeNow() - 256 * 1024));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
  }
  await failed;
  assertClean(1);
  rmSync(filler, { force: true });
  const image = await cache.ensure(ref, { policy: 'IfNotPresent' });
  assert.equal(hashOf(image.disk), hashOf(disk));
  assertClean(2);
  assert.equal(hashOf((await cache.ensure(small.ref, { policy: 'IfNotPresent' })).disk), small.hash, 'the first image is still there');
  cache.close();
  proxy.server.close();
  rmSync(dir, { recursive: true, force: true });
});

test('a layer that unpacks to more than the store holds (a sparse raw disk, gzip makes it tiny): NO_SPACE while unpacking, nothing left', async () => {
  const dir = tempDir('orchard-img-');
  const raw = join(dir, 'zeros.img');
  execFileSync('truncate', ['-s', '64M', raw]);
  pushFile('team/sparse', 'v1', raw, 'disk.img', true);
  const cache = cacheOn();
  await assert.rejects(cache.ensure(`${registry.host}/team/sparse:v1`, { policy: 'IfNotPresent' }), (err: PullError) => {
    assert.equal(err.code, 'NO_SPACE', err.message);
    assert.match(err.message, new RegExp(`^no space left on the device of ${store}/\\.oci while unpacking ${registry.host}/team/sparse:v1: .*64\\.0 MiB.* \\d+\\.\\d MiB free`));
    return true;
  });
  assertClean(2);
  assert.equal(hashOf((await cache.ensure(small.ref, { policy: 'IfNotPresent' })).disk), small.hash);
  cache.close();
  rmSync(dir, { recursive: true, force: true });
});

test('a qemu worker whose image cache is full fails that VM with the NO_SPACE message as its reason; a VM of a local image runs', async (t) => {
  await buildDebianDev(TEST_IMAGES);
  const workerDir = tempDir('orchard-worker-');
  const images = join(workerDir, 'images');
  mkdirSync(join(images, '.oci'), { recursive: true });
  symlinkSync(join(TEST_IMAGES, 'debian-dev'), join(images, 'debian-dev'));
  execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=40m,mode=0700', 'orchard-test-full', join(images, '.oci')]);
  const c = await inProcessController();
  const cache = new ImageCache({ storeDir: images, registries: new Registries({ insecure: [registry.host] }).lookup });
  const running: { worker?: Awaited<ReturnType<typeof qemuWorker>> } = {};
  t.after(async () => {
    for (const vm of ['too-big', 'fine']) await c.admin.deleteVM(vm).catch(() => {});
    await running.worker?.close();
    cache.close();
    await c.close();
    c.cleanup();
    execFileSync('umount', ['-l', join(images, '.oci')], { stdio: 'ignore' });
    rmSync(workerDir, { recursive: true, force: true });
  });
  // team/big:v1 (a 48 MiB disk) was pushed by the first test.
  const ref = `${registry.host}/team/big:v1`;
  running.worker = await qemuWorker(c, 'full-1', workerDir, { imageCache: cache, registries: new Registries({ insecure: [registry.host] }) });
  await c.admin.createVM({ name: 'too-big', image: ref, cpu: 1, memory: 512 });
  await c.admin.createVM({ name: 'fine', image: 'debian-dev', cpu: 1, memory: 512 });
  const failed = await waitFor('too-big to fail', async () => {
    const vm = await c.admin.getVM('too-big');
    return vm.status === 'failed' ? vm : undefined;
  }, 60_000, 100);
  const oci = join(images, '.oci');
  assert.match(failed.status_message ?? '', new RegExp(`^no space left on the device of ${oci} while pulling ${ref}: it needs about \\d+\\.\\d MiB \\(48\\.\\d MiB to download and at least 48\\.\\d MiB unpacked\\), \\d+\\.\\d MiB free$`));
  const events = (await c.admin.listEvents('too-big')).events.map((e) => e.payload);
  assert.ok(events.includes(`failed: ${failed.status_message}`), events.join('\n'));
  await waitFor('fine to run', async () => {
    const vm = await c.admin.getVM('fine');
    assert.notEqual(vm.status, 'failed', vm.status_message);
    return vm.status === 'running';
  }, 120_000, 200);
  for (const d of ['entries', 'blobs', 'partial', 'tmp']) assert.deepEqual(readdirSync(join(oci, d)), [], `${d} is empty`);
});
