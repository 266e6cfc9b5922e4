// The guest images the VM tests boot, built here from Debian packages (a minute on a fresh machine,
// cached after), and what test/cloud-init.test.ts takes for granted of its guest. Not a heavy file: it
// boots nothing, so the runner starts it first beside the first heavy file, and the build is off
// the heavy files' one-at-a-time path (scripts/run-tests.ts).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { buildDebianDev } from '../src/worker/images.ts';
import { buildCloudInitTestImage, tempDir, TEST_IMAGES } from './helpers.ts';

const run = promisify(execFile);

test('the cloud-init-test guest is a stock cloud image: Debian\'s cloud-init, no account with a password, SSH password logins off; so only a seed makes a login', async () => {
  await buildDebianDev(TEST_IMAGES);
  assert.match(await buildCloudInitTestImage(), /^result: (built|cached)$/);
  const raw = join(tempDir('orchard-guest-image-'), 'root.raw');
  await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', join(TEST_IMAGES, 'cloud-init-test', 'base.qcow2'), raw]);
  const read = async (path: string) => (await run('debugfs', ['-R', `cat ${path}`, raw], { maxBuffer: 1 << 20 })).stdout;
  const shadow = (await read('/etc/shadow')).trim().split('\n').map((l) => l.split(':'));
  assert.ok(shadow.length > 0 && shadow.every(([, hash]) => hash === '*' || hash.startsWith('!')), `no usable password:\n${shadow.map((f) => f.join(':')).join('\n')}`);
  const passwd = (await read('/etc/passwd')).trim().split('\n').map((l) => l.split(':'));
  assert.deepEqual(passwd.filter(([, , uid]) => Number(uid) >= 1000 && Number(uid) < 65534).map(([name]) => name), [], 'no login user yet');
  assert.match(await read('/etc/ssh/sshd_config'), /^PasswordAuthentication no$/m);
  assert.match(await read('/usr/lib/python3/dist-packages/cloudinit/version.py'), /__VERSION__/, 'cloud-init, as Debian packages it');
  assert.match(await read('/etc/cloud/cloud.cfg.d/90-orchard-test.cfg'), /^datasource_list: \[NoCloud, None\]$/m);
});
