// The controller's disk filling up: a write is answered 507 with a message that names the cause (not
// 500), nothing half-done is kept, and the controller works again once space returns. Real: the data
// dir is a small tmpfs filled to the last byte.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, rmSync, rmdirSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { ApiError } from '../../src/client/client.ts';
import { inProcessController, tempDir } from '../helpers.ts';

function mountTmpfs(dir: string, size: string): boolean {
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** Writes a file until the file system says ENOSPC. */
function fill(file: string) {
  const fd = openSync(file, 'w');
  const chunk = Buffer.alloc(64 * 1024, 1);
  try {
    for (;;) writeSync(fd, chunk);
  } catch (err) {
    if ((err as { code?: string }).code !== 'ENOSPC') throw err;
  } finally {
    closeSync(fd);
  }
}

const mountDir = tempDir('orchard-full-');
const mounted = mountTmpfs(mountDir, '8m');

test('a full disk answers 507 naming the cause; the controller recovers when space returns', async () => {
  // Not skipped where it cannot run: CI runs the suite as root, and a test that did not run has not passed.
  assert.ok(mounted, 'cannot mount a tmpfs here: this test needs root (as CI runs the suite)');
  const dataDir = join(mountDir, 'controller');
  mkdirSync(dataDir);
  const c = await inProcessController({ dataDir });
  try {
    await c.admin.createVM({ name: 'before', image: 'img' });
    const filler = join(mountDir, 'filler');
    fill(filler);
    // Writes (with a startup script, so each needs new pages) until one finds no room.
    const script = 'echo x\n'.repeat(8 * 1024);
    let refused: ApiError | undefined;
    let refusedName = '';
    for (let i = 0; i < 200 && !refused; i++) {
      refusedName = `vm-${i}`;
      await c.admin.createVM({ name: refusedName, image: 'img', startup_script: { script_content: script } }).catch((err: unknown) => {
        if (!(err instanceof ApiError)) throw err;
        refused = err;
      });
    }
    assert.ok(refused, 'a write found the disk full');
    assert.equal(refused.status, 507, refused.message);
    assert.match(refused.message, /disk is full \((SQLITE_FULL|ENOSPC)/);
    // Reads still work; the refused VM was not created.
    const names = (await c.admin.listVMs()).map((v) => v.name);
    assert.ok(names.includes('before'));
    assert.ok(!names.includes(refusedName), `${refusedName} was refused, so it does not exist`);
    console.log(`# ${refusedName}: ${refused.status} ${refused.message}`);

    rmSync(filler);
    await c.admin.createVM({ name: 'after', image: 'img' });
    assert.equal((await c.admin.getVM('after')).name, 'after');
    await c.admin.deleteVM('before');
  } finally {
    await c.close();
  }
});

test.after(() => {
  if (mounted) execFileSync('umount', [mountDir]);
  rmdirSync(mountDir);
});
