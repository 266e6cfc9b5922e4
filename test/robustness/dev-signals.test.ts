// `orchard dev` leaves no VM process however it is stopped: Ctrl-C while its output goes through a
// pipe whose reader is gone too (EPIPE), the terminal closing (SIGHUP), SIGTERM. One data dir: each
// run boots the VM of the run before from its record.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { buildDebianDev } from '../../src/worker/images.ts';
import { devContext, freePort, heavyFile, linkTestSnapshots, ORCHARD_BIN, processesWith, runCLI, tempDir, TEST_IMAGES, waitFor } from '../helpers.ts';

await heavyFile(); // boots VMs


test('orchard dev stopped by EPIPE + SIGINT, SIGHUP or SIGTERM leaves no VM running', async () => {
  await buildDebianDev(TEST_IMAGES);
  const work = tempDir('orchard-dev-');
  const dataDir = join(work, '.dev-data');
  const env = { ORCHARD_HOME: join(work, 'home') };
  mkdirSync(dataDir, { recursive: true });
  symlinkSync(TEST_IMAGES, join(dataDir, 'images'));
  await linkTestSnapshots(join(dataDir, 'worker-1')); // (the suite's warm-start snapshot, as the image is)
  const port = await freePort();
  const qemus = () => processesWith(join(dataDir, 'worker-1'));
  try {
    for (const [i, how] of (['pipe closed, then SIGINT', 'SIGHUP', 'SIGTERM'] as const).entries()) {
      const proc = spawn(ORCHARD_BIN, ['dev', '--data-dir', dataDir, '--listen', `127.0.0.1:${port}`], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
      let err = '';
      proc.stderr.on('data', (c: Buffer) => (err += c.toString()));
      proc.stdout.resume();
      const exited = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
      try {
        await waitFor(`orchard dev to be ready (${how})`, () => /Ctrl-C stops everything/.test(err), 60_000, 100);
        if (i === 0) {
          const r = await runCLI(['create', 'vm', 'demo', '--image', 'debian-dev', '--cpu', '1', '--memory', '512'], env);
          assert.equal(r.code, 0, r.stderr);
        }
        await waitFor(`qemu to run (${how})`, () => qemus().length > 0, 60_000, 100);
        // Stopped once the worker has reported the VM running: its QEMU is fully the worker's then.
        const { vmRunning } = devContext(env.ORCHARD_HOME);
        await waitFor(`demo to be reported running (${how})`, () => vmRunning('demo'), 60_000, 200);
        if (how === 'pipe closed, then SIGINT') {
          // Ctrl-C on `orchard dev 2>&1 | tee log`: the reader dies with it.
          proc.stdout.destroy();
          proc.stderr.destroy();
          proc.kill('SIGINT');
        } else proc.kill(how);
        const code = await Promise.race([exited, new Promise<string>((r) => setTimeout(() => r('still running after 40 s'), 40_000).unref())]);
        assert.notEqual(code, 'still running after 40 s', `${how}: ${err}`);
        assert.deepEqual(qemus(), [], `${how}: no VM process is left (exit ${code})\n${err}`);
      } finally {
        if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
        await exited;
      }
    }
  } finally {
    for (const pid of qemus()) process.kill(Number(pid), 'SIGKILL');
    rmSync(work, { recursive: true, force: true });
  }
});
