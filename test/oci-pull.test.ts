// The worker's image cache against a real registry (Debian's docker-registry on loopback), with
// images that standard tools made (tar, gzip, sha256sum, and skopeo to upload them): what it pulls
// is byte for byte what was pushed, and every failure says what the registry answered and leaves no
// entry behind.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, linkSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { PullError } from '../src/worker/oci/errors.ts';
import { isImageReference, parseReference } from '../src/worker/oci/reference.ts';
import { formatPullProgress, type PullProgress } from '../src/worker/oci/progress.ts';
import { ROOT, tempDir, waitFor } from './helpers.ts';
import { ociLayout, qcow2WithData, skopeoPush, startRegistry, throttledProxy, type TestRegistry } from './registry.ts';

let registry: TestRegistry;
let work: string;
const hashOf = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');
const plain = (host: string) => (h: string) => (h === host ? { insecure: true } : undefined);

before(async () => {
  registry = await startRegistry();
  work = tempDir('orchard-oci-');
});
after(async () => {
  await registry.stop();
  rmSync(work, { recursive: true, force: true });
});

/** An image of one qcow2 disk (`mib` MiB of random data) pushed by skopeo as REPO:TAG; returns the disk. */
function pushDisk(repo: string, tag: string, mib = 2, gzip = true): string {
  const dir = tempDir('orchard-img-');
  const disk = qcow2WithData(dir, 'disk', mib);
  ociLayout(join(dir, 'layout'), [{ files: { 'disk/disk.qcow2': { copy: disk } }, gzip }], tag);
  skopeoPush(join(dir, 'layout'), tag, registry, repo);
  return disk;
}

const cacheIn = (store: string, opts: { maxBytes?: number } = {}) => new ImageCache({ storeDir: store, registries: plain(registry.host), ...opts });

test('references: a registry host makes a reference, a bare name is a local image', () => {
  assert.equal(isImageReference('debian-dev'), false);
  assert.equal(isImageReference('team/ubuntu'), false);
  assert.equal(isImageReference('registry.example:5000/team/ubuntu:24.04'), true);
  assert.equal(isImageReference('localhost/x'), true);
  assert.deepEqual(parseReference('registry.example:5000/team/ubuntu'), { registry: 'registry.example:5000', repository: 'team/ubuntu', tag: 'latest', digest: undefined });
  const d = 'sha256:' + 'a'.repeat(64);
  assert.deepEqual(parseReference(`ghcr.io/x/y@${d}`), { registry: 'ghcr.io', repository: 'x/y', tag: undefined, digest: d });
  assert.throws(() => parseReference('ghcr.io/X/y'), /not a repository name/);
  assert.throws(() => parseReference('ghcr.io/x/y@sha256:12'), /not a sha256 digest/);
  const p: PullProgress = { image: 'team/ubuntu:24.04', phase: 'downloading', done: 0.37 * 612 * 1024 * 1024, total: 612 * 1024 * 1024, bytesPerSecond: 110 * 1024 * 1024 };
  assert.equal(formatPullProgress(p), 'pulling team/ubuntu:24.04: 37 % of 612 MiB, 110 MiB/s, about 4 s left');
});

test('skopeo pushes a gzip containerDisk, the cache pulls it byte for byte; a second tag of it shares the entry; IfNotPresent asks nobody', async () => {
  const disk = pushDisk('team/disk', 'v1');
  execFileSync('skopeo', ['copy', '--quiet', ...registry.skopeoArgs('src'), ...registry.skopeoArgs('dest'), `docker://${registry.host}/team/disk:v1`, `docker://${registry.host}/team/disk:other`]);
  const store = join(work, 'store1');
  const cache = cacheIn(store);
  const seen: string[] = [];
  const image = await cache.ensure(`${registry.host}/team/disk:v1`, { policy: 'IfNotPresent', progress: (p) => seen.push(formatPullProgress(p)) });
  assert.equal(image.kind, 'disk');
  assert.equal(image.name, `${registry.host}/team/disk:v1`);
  assert.equal(hashOf(image.disk), hashOf(disk), 'the pulled disk is the pushed one');
  assert.equal(cache.downloads, 1);
  assert.ok(seen.some((l) => /^pulled team\/disk:v1 \(/.test(l)), seen.join('\n'));
  const again = await cache.ensure(`${registry.host}/team/disk:other`, { policy: 'IfNotPresent' });
  assert.equal(again.dir, image.dir, 'two tags of one digest share one entry');
  assert.equal(cache.downloads, 1, 'nothing downloaded for the second tag');
  // IfNotPresent with the registry gone: the cache answers.
  const offline = new ImageCache({ storeDir: store, registries: () => ({ insecure: true }) });
  const before = await offline.ensure(`${registry.host}/team/disk:v1`, { policy: 'IfNotPresent' });
  assert.equal(before.dir, image.dir);
  const listed = await cache.list();
  assert.equal(listed.length, 1);
  assert.deepEqual(listed[0].references, [`${registry.host}/team/disk:other`, `${registry.host}/team/disk:v1`]);
  assert.match(listed[0].digest, /^sha256:[a-f0-9]{64}$/);
  assert.deepEqual(await cache.held(), [{ digest: listed[0].digest, references: listed[0].references }]);
  assert.deepEqual(readdirSync(join(store, '.oci', 'blobs')), [], 'layers are removed once unpacked');
  cache.close();
  offline.close();
});

test('multi-layer and uncompressed: whiteouts apply, a raw disk becomes qcow2, boot files make a kernel image', async () => {
  const dir = tempDir('orchard-img-');
  const raw = join(dir, 'disk.img');
  writeFileSync(raw, Buffer.concat([Buffer.alloc(1024 * 1024, 7), Buffer.from('orchard raw disk')]));
  const stale = qcow2WithData(dir, 'stale', 1);
  ociLayout(join(dir, 'layout'), [
    { files: { 'disk/stale.qcow2': { copy: stale }, 'boot/vmlinuz': Buffer.from('not really a kernel'), 'etc/ignored': Buffer.from('x') }, gzip: true },
    { files: { 'disk/.wh.stale.qcow2': Buffer.alloc(0), 'disk/disk.img': { copy: raw }, 'boot/initrd.img': Buffer.from('initrd'), 'boot/cmdline': Buffer.from('console=ttyS0 quiet\n') }, gzip: false },
  ], 'multi');
  skopeoPush(join(dir, 'layout'), 'multi', registry, 'team/multi');
  const cache = cacheIn(join(work, 'store2'));
  const image = await cache.ensure(`${registry.host}/team/multi:multi`, { policy: 'IfNotPresent' });
  assert.equal(image.kind, 'kernel');
  assert.equal(readFileSync(image.kernel!, 'utf8'), 'not really a kernel');
  assert.equal(readFileSync(image.initrd!, 'utf8'), 'initrd');
  assert.equal(image.cmdline, 'console=ttyS0 quiet');
  assert.equal(JSON.parse(execFileSync('qemu-img', ['info', '--output=json', image.disk], { encoding: 'utf8' })).format, 'qcow2');
  execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', raw, image.disk]);
  assert.equal(cache.downloads, 2);
  cache.close();
  rmSync(dir, { recursive: true, force: true });
});

test('failures name the registry answer and leave no entry: missing tag, corrupted blob, a disk with a backing file', async () => {
  const store = join(work, 'store3');
  const cache = cacheIn(store);
  await assert.rejects(cache.ensure(`${registry.host}/team/disk:nope`, { policy: 'IfNotPresent' }), (err: PullError) => {
    assert.equal(err.code, 'NOT_FOUND');
    assert.match(err.message, /has no manifest team\/disk:nope: 404 Not Found: manifest unknown/);
    return true;
  });
  // A blob changed in the registry's storage: served as it is, refused by its digest.
  const dir = tempDir('orchard-img-');
  const disk = qcow2WithData(dir, 'disk', 1);
  const { layerDigests } = ociLayout(join(dir, 'layout'), [{ files: { 'disk/disk.qcow2': { copy: disk } }, gzip: false }], 'bad');
  skopeoPush(join(dir, 'layout'), 'bad', registry, 'team/corrupt');
  const file = registry.blobFile(layerDigests[0]);
  const bytes = readFileSync(file);
  bytes[bytes.length - 2000] ^= 0xff;
  writeFileSync(file, bytes);
  await assert.rejects(cache.ensure(`${registry.host}/team/corrupt:bad`, { policy: 'IfNotPresent' }), (err: PullError) => {
    assert.equal(err.code, 'DIGEST_MISMATCH');
    assert.match(err.message, new RegExp(`blob ${layerDigests[0]} of team/corrupt from ${registry.host} has the wrong content`));
    return true;
  });
  // A qcow2 naming a host file as its backing file.
  const hostile = join(dir, 'hostile.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', '/etc/passwd', '-F', 'raw', hostile]);
  ociLayout(join(dir, 'layout2'), [{ files: { 'disk/disk.qcow2': { copy: hostile } }, gzip: true }], 'hostile');
  skopeoPush(join(dir, 'layout2'), 'hostile', registry, 'team/hostile');
  await assert.rejects(cache.ensure(`${registry.host}/team/hostile:hostile`, { policy: 'IfNotPresent' }), (err: PullError) => {
    assert.equal(err.code, 'BAD_IMAGE');
    assert.match(err.message, /\/disk\/disk.qcow2 has a backing file \(\/etc\/passwd\)/);
    return true;
  });
  for (const d of ['entries', 'blobs', 'partial', 'tmp', 'refs']) assert.deepEqual(readdirSync(join(store, '.oci', d)), [], `${d} is empty`);
  assert.deepEqual(await cache.list(), []);
  cache.close();
  rmSync(dir, { recursive: true, force: true });
});

test('TLS with a private CA and htpasswd users: the right password pulls, a wrong one is UNAUTHORIZED, an unknown CA is UNREACHABLE', async () => {
  const secure = await startRegistry({ users: { alice: 's3cret' } });
  try {
    const dir = tempDir('orchard-img-');
    const disk = qcow2WithData(dir, 'disk', 1);
    ociLayout(join(dir, 'layout'), [{ files: { 'disk/disk.qcow2': { copy: disk } }, gzip: true }], 'v1');
    skopeoPush(join(dir, 'layout'), 'v1', secure, 'private/disk');
    const ref = `${secure.host}/private/disk:v1`;
    const withPassword = (password: string, ca: string | undefined) => new ImageCache({ storeDir: join(dir, `store-${password}-${ca ? 'ca' : 'noca'}`), registries: (h) => (h === secure.host ? { username: 'alice', password, ca } : undefined) });
    const good = withPassword('s3cret', secure.ca);
    assert.equal(hashOf((await good.ensure(ref, { policy: 'IfNotPresent' })).disk), hashOf(disk));
    const bad = withPassword('n0pe-123', secure.ca);
    await assert.rejects(bad.ensure(ref, { policy: 'IfNotPresent' }), (err: PullError) => {
      assert.equal(err.code, 'UNAUTHORIZED');
      assert.match(err.message, /refused manifest private\/disk:v1: 401 Unauthorized: authentication required \(UNAUTHORIZED\); user alice was not accepted/);
      assert.doesNotMatch(err.message, /n0pe-123/, 'the password is not in the message');
      return true;
    });
    const anonymous = new ImageCache({ storeDir: join(dir, 'store-anon'), registries: () => ({ ca: secure.ca }) });
    await assert.rejects(anonymous.ensure(ref, { policy: 'IfNotPresent' }), /no credentials are configured/);
    const untrusted = withPassword('s3cret', undefined);
    await assert.rejects(untrusted.ensure(ref, { policy: 'IfNotPresent' }), (err: PullError) => {
      assert.equal(err.code, 'UNREACHABLE');
      assert.match(err.message, /--registry-ca-file/);
      return true;
    });
    for (const c of [good, bad, anonymous, untrusted]) c.close();
    rmSync(dir, { recursive: true, force: true });
  } finally {
    await secure.stop();
  }
});

test('four concurrent ensures of one new image download it once, and all four get progress', async () => {
  pushDisk('team/crowd', 'v1', 8);
  const cache = cacheIn(join(work, 'store4'));
  const lines: string[][] = [[], [], [], []];
  const images = await Promise.all(lines.map((l) => cache.ensure(`${registry.host}/team/crowd:v1`, { policy: 'IfNotPresent', progress: (p) => l.push(formatPullProgress(p)) })));
  assert.equal(cache.downloads, 1);
  assert.equal(new Set(images.map((i) => i.dir)).size, 1);
  for (const l of lines) assert.ok(l.some((x) => x.startsWith('pulled team/crowd:v1')), l.join('\n'));
  cache.close();
});

test('Always pulls only when the tag moved; IfNotPresent keeps what it has', async () => {
  const first = pushDisk('team/moving', 'v1');
  const store = join(work, 'store5');
  const cache = cacheIn(store);
  const ref = `${registry.host}/team/moving:v1`;
  assert.equal(hashOf((await cache.ensure(ref, { policy: 'Always' })).disk), hashOf(first));
  await cache.ensure(ref, { policy: 'Always' });
  assert.equal(cache.downloads, 1, 'Always with an unchanged digest downloads nothing');
  const second = pushDisk('team/moving', 'v1');
  assert.equal(hashOf((await cache.ensure(ref, { policy: 'IfNotPresent' })).disk), hashOf(first), 'IfNotPresent keeps the cached image');
  assert.equal(hashOf((await cache.ensure(ref, { policy: 'Always' })).disk), hashOf(second), 'Always pulls the moved tag');
  assert.equal(cache.downloads, 2);
  cache.close();
});

test('LRU eviction to the size bound never removes an image a VM uses', async () => {
  const store = join(work, 'store6');
  for (const n of ['a', 'b', 'c']) pushDisk(`team/lru-${n}`, 'v1', 3);
  const cache = cacheIn(store, { maxBytes: 8 * 1024 * 1024 });
  const a = await cache.ensure(`${registry.host}/team/lru-a:v1`, { policy: 'IfNotPresent' });
  const b = await cache.ensure(`${registry.host}/team/lru-b:v1`, { policy: 'IfNotPresent' });
  // A VM on a (a hard link, as the qemu driver makes); b then becomes the least recently used one.
  const vmDisk = join(work, 'vm-a-base.qcow2');
  linkSync(a.disk, vmDisk);
  // What was handed out is kept a few minutes for the VM that asked: pretend those are over.
  (cache as unknown as { handedOut: Map<string, number> }).handedOut.clear();
  await new Promise((r) => setTimeout(r, 20));
  const c = await cache.ensure(`${registry.host}/team/lru-c:v1`, { policy: 'IfNotPresent' });
  assert.ok(existsSync(a.disk), 'the image in use stays');
  assert.ok(!existsSync(b.dir), 'the least recently used image not in use is evicted');
  assert.ok(existsSync(c.disk));
  assert.deepEqual((await cache.list()).map((i) => i.references[0]).sort(), [`${registry.host}/team/lru-a:v1`, `${registry.host}/team/lru-c:v1`]);
  rmSync(vmDisk);
  cache.close();
});

test('an image linked only by what follows it (a warm-start snapshot) is not in use: evicted, and the follower removed with it', async () => {
  const store = join(work, 'store6b');
  for (const n of ['a', 'b']) pushDisk(`team/follow-${n}`, 'v1', 3);
  const cache = cacheIn(store, { maxBytes: 5 * 1024 * 1024 });
  const a = await cache.ensure(`${registry.host}/team/follow-a:v1`, { policy: 'IfNotPresent' });
  // What the qemu driver does: a snapshot of a links its disk; the cache asks for those links, and
  // tells the driver when images went.
  const snapshotDisk = join(work, 'snapshot-a-base.qcow2');
  linkSync(a.disk, snapshotDisk);
  let released = 0;
  cache.followers = {
    links: async () => {
      const st = existsSync(snapshotDisk) ? statSync(snapshotDisk) : undefined;
      return new Map(st ? [[`${st.dev}:${st.ino}`, 1]] : []);
    },
    released: async () => {
      released++;
      if (!existsSync(a.dir)) rmSync(snapshotDisk, { force: true });
    },
  };
  assert.equal(statSync(a.disk).nlink, 2);
  assert.deepEqual((await cache.list()).map((i) => i.inUse), [false], "the snapshot's link is not a use");
  (cache as unknown as { handedOut: Map<string, number> }).handedOut.clear();
  await new Promise((r) => setTimeout(r, 20));
  await cache.ensure(`${registry.host}/team/follow-b:v1`, { policy: 'IfNotPresent' });
  assert.ok(!existsSync(a.dir), 'a, linked only by its snapshot, was evicted to make room for b');
  assert.equal(released, 1, 'the driver was told once');
  assert.ok(!existsSync(snapshotDisk), 'and removed the snapshot');
  // A VM's link still counts: b, in use, is not evicted however small the bound.
  const vmDisk = join(work, 'vm-b-base.qcow2');
  linkSync((await cache.list())[0].dir + '/base.qcow2', vmDisk);
  (cache as unknown as { handedOut: Map<string, number> }).handedOut.clear();
  assert.deepEqual(await cache.evict(10 * 1024 * 1024), []);
  rmSync(vmDisk);
  cache.close();
});

test('a pull killed with kill -9 half way leaves no entry; the next pull resumes the download and gets the right image', async () => {
  const disk = pushDisk('team/big', 'v1', 24, false);
  const store = join(work, 'store7');
  const proxy = await throttledProxy(registry.host, 8 * 1024 * 1024);
  const script = `
    import { ImageCache } from ${JSON.stringify(join(ROOT, 'src/worker/oci/cache.ts'))};
    const cache = new ImageCache({ storeDir: process.argv[1], registries: () => ({ insecure: true }) });
    await cache.ensure(process.argv[2], { policy: 'IfNotPresent' });
    console.log('finished');`;
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, store, `${proxy.host}/team/big:v1`], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.on('data', (c: Buffer) => (out += c.toString()));
  const partialDir = join(store, '.oci', 'partial');
  await waitFor('half of the layer downloaded', () => {
    const files = existsSync(partialDir) ? readdirSync(partialDir) : [];
    return files.some((f) => statSync(join(partialDir, f)).size > 8 * 1024 * 1024);
  }, 30_000, 20);
  child.kill('SIGKILL');
  await new Promise((r) => child.once('exit', r));
  proxy.server.close();
  assert.equal(out, '', 'the child was killed before it finished');
  assert.deepEqual(readdirSync(join(store, '.oci', 'entries')), [], 'no entry from the killed pull');
  const cache = cacheIn(store);
  const image = await cache.ensure(`${registry.host}/team/big:v1`, { policy: 'IfNotPresent' });
  assert.equal(hashOf(image.disk), hashOf(disk));
  assert.ok(cache.resumedBytes > 8 * 1024 * 1024, `the download resumed (${cache.resumedBytes} bytes kept)`);
  assert.deepEqual(readdirSync(partialDir), []);
  assert.deepEqual(readdirSync(join(store, '.oci', 'tmp')), [], 'the killed pull\'s temp files are gone');
  cache.close();
});

test('crash safety beyond kill -9: a pull fsyncs the blob, the entry\'s files and dir, and the ref before each rename that publishes them, and the parent after (strace)', async (t) => {
  pushDisk('team/durable', 'v1', 1);
  const dir = tempDir('orchard-fsync-');
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const store = join(dir, 'store');
  const script = `
    import { ImageCache } from ${JSON.stringify(join(ROOT, 'src/worker/oci/cache.ts'))};
    const cache = new ImageCache({ storeDir: process.argv[1], registries: () => ({ insecure: true }) });
    await cache.ensure(process.argv[2], { policy: 'IfNotPresent' });
    cache.close();`;
  const trace = join(dir, 'trace');
  // -y prints the path of each fsync's file descriptor; -f follows libuv's threads, which do the I/O.
  execFileSync('strace', ['-f', '-qq', '-y', '-e', 'trace=fsync,fdatasync,rename,renameat,renameat2', '-o', trace, process.execPath, '--input-type=module', '-e', script, store, `${registry.host}/team/durable:v1`]);
  const calls = readFileSync(trace, 'utf8').split('\n').flatMap((line) => {
    const sync = /(?:fsync|fdatasync)\(\d+<([^>]+)>\) = 0/.exec(line);
    if (sync) return [{ op: 'fsync', path: sync[1] }];
    const ren = /rename(?:at2?)?\((?:[^"]*)"([^"]+)", (?:[^"]*)"([^"]+)"/.exec(line);
    return ren && / = 0$/.test(line) ? [{ op: 'rename', path: ren[1], to: ren[2] }] : [];
  });
  const at = (op: string, test: (p: string, to?: string) => boolean) => {
    const i = calls.findIndex((c) => c.op === op && test(c.path, (c as { to?: string }).to));
    assert.ok(i >= 0, `no ${op} matching ${test.toString()} in:\n${calls.map((c) => JSON.stringify(c)).join('\n')}`);
    return i;
  };
  const oci = join(store, '.oci');
  const blob = at('rename', (p, to) => p.startsWith(`${oci}/partial/`) && to!.startsWith(`${oci}/blobs/`));
  assert.ok(at('fsync', (p) => p === calls[blob].path) < blob, 'the blob\'s bytes are synced before it gets its name');
  const publish = at('rename', (p, to) => p.startsWith(`${oci}/tmp/`) && to!.startsWith(`${oci}/entries/sha256-`));
  const tmp = calls[publish].path;
  for (const f of ['base.qcow2', 'image.json', 'oci.json', 'last-used']) assert.ok(at('fsync', (p) => p === join(tmp, f)) < publish, `${f} is synced before the entry is published`);
  assert.ok(at('fsync', (p) => p === tmp) < publish, 'the entry dir is synced before it is published');
  assert.ok(calls.slice(publish).some((c) => c.op === 'fsync' && c.path === `${oci}/entries`), 'entries/ is synced after the rename');
  const ref = at('rename', (p, to) => p.endsWith('.tmp') && to!.startsWith(`${oci}/refs/`));
  assert.ok(at('fsync', (p) => p === calls[ref].path) < ref, 'the ref is synced before its rename');
  assert.ok(calls.slice(ref).some((c) => c.op === 'fsync' && c.path === `${oci}/refs`), 'refs/ is synced after it');
});
