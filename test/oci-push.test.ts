// `orchard image push` publishes a local image in the containerDisk layout that other tools read
// (skopeo inspects and copies it out; the layer holds disk/disk.qcow2 and, for a kernel image, boot/),
// over TLS with htpasswd credentials from stdin; a worker's cache pulls it back to the same bytes, and
// `orchard image list` shows local and pulled images.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { importImage } from '../src/worker/images.ts';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { runCLI, tempDir } from './helpers.ts';
import { qcow2WithData, startRegistry, type TestRegistry } from './registry.ts';

let registry: TestRegistry;
let work: string;
const hashOf = (file: string) => createHash('sha256').update(readFileSync(file)).digest('hex');

before(async () => {
  registry = await startRegistry({ users: { pusher: 'pa55-word' } });
  work = tempDir('orchard-push-');
});
after(async () => {
  await registry.stop();
  rmSync(work, { recursive: true, force: true });
});

/** skopeo's view of REF: its manifest (raw) and its layer's file list after copying it out. */
function inspect(ref: string): { manifest: { mediaType: string; layers: { mediaType: string; digest: string }[] }; files: string[]; dir: string } {
  const args = ['--cert-dir', registry.certDir!, '--creds', 'pusher:pa55-word'];
  const manifest = JSON.parse(execFileSync('skopeo', ['inspect', '--raw', ...args, `docker://${ref}`], { encoding: 'utf8' }));
  const dir = tempDir('orchard-inspect-');
  execFileSync('skopeo', ['copy', '--quiet', '--src-cert-dir', registry.certDir!, '--src-creds', 'pusher:pa55-word', `docker://${ref}`, `oci:${join(dir, 'layout')}:x`]);
  const layer = join(dir, 'layout', 'blobs', 'sha256', manifest.layers[0].digest.slice(7));
  const files = execFileSync('tar', ['-tzf', layer], { encoding: 'utf8' }).trim().split('\n');
  mkdirSync(join(dir, 'root'));
  execFileSync('tar', ['-xzf', layer, '-C', join(dir, 'root')]);
  return { manifest, files, dir: join(dir, 'root') };
}

test('orchard image push of a disk image: skopeo sees one gzip OCI layer with disk/disk.qcow2; the cache pulls the same bytes; image list shows both', async () => {
  const dataDir = join(work, 'data1');
  const disk = qcow2WithData(work, 'push-disk', 2);
  await importImage(join(dataDir, 'images'), 'my-disk', disk);
  const ref = `${registry.host}/team/my-disk:1.0`;
  const pushed = await runCLI(['image', 'push', 'my-disk', ref, '--username', 'pusher', '--password-stdin', '--ca-file', join(registry.certDir!, 'ca.crt'), '--data-dir', dataDir], {}, 'pa55-word\n');
  assert.equal(pushed.code, 0, pushed.stderr);
  assert.match(pushed.stdout, /^sha256:[a-f0-9]{64}\n$/);
  assert.match(pushed.stderr, /pushed team\/my-disk:1\.0 \(/);
  assert.doesNotMatch(pushed.stderr, /pa55-word/);
  const seen = inspect(ref);
  assert.equal(seen.manifest.mediaType, 'application/vnd.oci.image.manifest.v1+json');
  assert.deepEqual(seen.manifest.layers.map((l) => l.mediaType), ['application/vnd.oci.image.layer.v1.tar+gzip']);
  assert.deepEqual(seen.files, ['disk/', 'disk/disk.qcow2']);
  assert.equal(hashOf(join(seen.dir, 'disk', 'disk.qcow2')), hashOf(disk));
  // A worker's cache (same data dir) pulls it back.
  const cache = new ImageCache({ storeDir: join(dataDir, 'images'), registries: () => ({ username: 'pusher', password: 'pa55-word', ca: registry.ca }) });
  const pulled = await cache.ensure(ref, { policy: 'IfNotPresent' });
  assert.equal(hashOf(pulled.disk), hashOf(disk));
  cache.close();
  const list = await runCLI(['image', 'list', '--data-dir', dataDir, '-o', 'json']);
  assert.equal(list.code, 0, list.stderr);
  const rows = JSON.parse(list.stdout) as { name: string; kind: string; digest?: string }[];
  assert.deepEqual(rows.map((r) => [r.name, r.kind, r.digest !== undefined]), [['my-disk', 'disk', false], [ref, 'disk', true]]);
  assert.equal(rows[1].digest, pushed.stdout.trim(), 'the digest listed is the one pushed');
  const tableOut = await runCLI(['image', 'list', '--data-dir', dataDir]);
  assert.match(tableOut.stdout, /NAME\s+KIND\s+SIZE\s+CREATED\s+DIGEST/);
  // Without the password the registry says no, and orchard says so.
  const denied = await runCLI(['image', 'push', 'my-disk', ref, '--ca-file', join(registry.certDir!, 'ca.crt'), '--data-dir', dataDir]);
  assert.notEqual(denied.code, 0);
  assert.match(denied.stderr, /401 Unauthorized.*no credentials are configured/);
  rmSync(seen.dir, { recursive: true, force: true });
});

test('a kernel image is pushed with its boot files and pulled back as a kernel image', async () => {
  const store = join(work, 'data2', 'images');
  const dir = join(store, 'tiny-kernel');
  mkdirSync(dir, { recursive: true });
  const disk = qcow2WithData(dir, 'disk', 1);
  execFileSync('mv', [disk, join(dir, 'base.qcow2')]);
  writeFileSync(join(dir, 'vmlinuz'), 'kernel bytes');
  writeFileSync(join(dir, 'initrd.img'), 'initrd bytes');
  writeFileSync(join(dir, 'cmdline'), 'console=ttyS0 panic=1\n');
  writeFileSync(join(dir, 'image.json'), JSON.stringify({ name: 'tiny-kernel', kind: 'kernel', created: new Date().toISOString() }));
  const ref = `${registry.host}/team/tiny-kernel:v1`;
  const pushed = await runCLI(['image', 'push', 'tiny-kernel', ref, '--username', 'pusher', '--password-stdin', '--ca-file', join(registry.certDir!, 'ca.crt'), '--data-dir', join(work, 'data2')], {}, 'pa55-word');
  assert.equal(pushed.code, 0, pushed.stderr);
  const seen = inspect(ref);
  assert.deepEqual(seen.files.sort(), ['boot/', 'boot/cmdline', 'boot/initrd.img', 'boot/vmlinuz', 'disk/', 'disk/disk.qcow2']);
  const cache = new ImageCache({ storeDir: join(work, 'other-worker'), registries: () => ({ username: 'pusher', password: 'pa55-word', ca: registry.ca }) });
  const pulled = await cache.ensure(ref, { policy: 'IfNotPresent' });
  assert.equal(pulled.kind, 'kernel');
  assert.equal(readFileSync(pulled.kernel!, 'utf8'), 'kernel bytes');
  assert.equal(pulled.cmdline, 'console=ttyS0 panic=1');
  assert.equal(hashOf(pulled.disk), hashOf(join(dir, 'base.qcow2')));
  assert.deepEqual(readdirSync(join(work, 'data2', 'images')).filter((f) => f.startsWith('.push')), [], 'the packing dir is gone');
  cache.close();
  rmSync(seen.dir, { recursive: true, force: true });
});
