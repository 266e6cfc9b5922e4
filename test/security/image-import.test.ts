// `orchard image import` must not turn host files into a guest's disk: a qcow2 that names another
// file (a backing file, an external data file) is refused and nothing reaches the image store; the
// qemu driver refuses such an image already in the store too.
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { imageDir, importImage, listImages } from '../../src/worker/images.ts';
import { QemuDriver } from '../../src/worker/drivers/qemu.ts';

const execFileP = promisify(execFile);
const work = await mkdtemp(join(tmpdir(), 'orchard-image-import-'));
after(() => rm(work, { recursive: true, force: true }));

const qemuImg = (...args: string[]) => execFileP('qemu-img', args);

/** The store's entries (hidden ones too: a half-done import must not stay behind). */
const storeEntries = (store: string) => (existsSync(store) ? readdirSync(store) : []);

test('image import refuses a qcow2 backed by a host file, or with an external data file, and adds nothing', async () => {
  const store = join(work, 'store');
  const backed = join(work, 'backed.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', '/etc/hostname', '-F', 'raw', backed);
  await assert.rejects(importImage(store, 'evil', backed),
    /cannot import evil: .*backed\.qcow2 has a backing file \(\/etc\/hostname\), which QEMU would read as part of the disk/);
  assert.deepEqual(storeEntries(store), []);

  // The same through a json: backing file name, and a backing file given relative to the image.
  const jsonBacked = join(work, 'json-backed.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-u', '-b', 'json:{"driver":"raw","file":{"driver":"file","filename":"/etc/hostname"}}', '-F', 'raw', jsonBacked, '1M');
  await assert.rejects(importImage(store, 'evil', jsonBacked), /has a backing file \(json:\{/);
  await writeFile(join(work, 'sibling.raw'), Buffer.alloc(1024 * 1024));
  const relBacked = join(work, 'rel-backed.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', 'sibling.raw', '-F', 'raw', relBacked);
  await assert.rejects(importImage(store, 'evil', relBacked), /has a backing file \(sibling\.raw\)/);

  const withDataFile = join(work, 'data-file.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${join(work, 'data.raw')}`, withDataFile, '16M');
  await assert.rejects(importImage(store, 'evil', withDataFile),
    /cannot import evil: .*data-file\.qcow2 keeps its data in an external data file \(.*data\.raw\)/);

  // A file name qemu-img would read as a protocol is a plain (missing) file here.
  await assert.rejects(importImage(store, 'evil', 'json:{"driver":"file","filename":"/etc/hostname"}'), /cannot import evil: cannot read/);
  const vmdk = join(work, 'disk.vmdk');
  await qemuImg('create', '-q', '-f', 'vmdk', vmdk, '16M');
  await assert.rejects(importImage(store, 'evil', vmdk), /disk\.vmdk is vmdk, not qcow2/);
  assert.deepEqual(storeEntries(store), []);

  // A self-contained qcow2 still imports.
  const plain = join(work, 'plain.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', plain, '64M');
  const imported = await importImage(store, 'good', plain);
  assert.equal(imported.name, 'good');
  assert.deepEqual((await listImages(store)).map((i) => i.name), ['good']);
  assert.deepEqual(storeEntries(store), [imageDir(store, 'good').split('/').pop()]);
});

test('the qemu driver refuses an image in the store that names another file', async () => {
  const store = join(work, 'old-store');
  // As an older version's import left it: the backed qcow2 copied as is into the store.
  const dir = imageDir(store, 'old');
  await mkdir(dir, { recursive: true });
  await qemuImg('create', '-q', '-f', 'qcow2', '-b', '/etc/hostname', '-F', 'raw', join(dir, 'base.qcow2'));
  await writeFile(join(dir, 'image.json'), JSON.stringify({ name: 'old', kind: 'disk', created: new Date().toISOString() }));
  const driver = new QemuDriver({ dataDir: join(work, 'data'), imagesDir: store, accel: 'tcg' });
  await assert.rejects(driver.prepare({
    localName: 'orchard-old', uid: 'u1', image: 'old', imagePullPolicy: 'IfNotPresent', cpu: 1, memory: 256, username: 'admin', password: 'admin',
  }), /image old: .*has a backing file \(\/etc\/hostname\)/);
  assert.ok(!existsSync(join(work, 'data', 'vms', 'orchard-old', 'disk.qcow2')));
});
