// README.md's "A real cluster", followed as written as far as it runs here without systemd: a
// controller (`orchard controller run`, its own data dir, the admin token from the environment as
// controller.env gives it), a client context made as step 3 writes it (it becomes the default), a
// service account and a bootstrap token for the workers, two qemu workers on their own data dirs
// (`orchard worker run … --bootstrap-token-stdin < bootstrap-token`), then "Using it": a VM on each
// worker by its label, list, ssh, delete. Every command the test runs is checked to be in the
// README word for word (with the test's URL, data dirs and fingerprint in place of the README's),
// so the two cannot drift apart. The workers use the suite's cached debian-dev image and its warm-start
// snapshot (their images and snapshots dirs link to them, as qemuCluster's do), so nothing is rebuilt.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildDebianDev } from '../src/worker/images.ts';
import { freePort, heavyFile, linkTestSnapshots, processesWith, ROOT, spawnController, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

const README = readFileSync(join(ROOT, 'README.md'), 'utf8');
const README_URL = 'https://controller.example.com:6120';

/** Asserts that `command` (as the README writes it) is in the README, then returns it with the real values. */
function fromReadme(command: string, real: Record<string, string> = {}): string {
  assert.ok(README.includes(command), `README.md does not have the command:\n${command}`);
  let out = command;
  for (const [readme, value] of Object.entries(real)) out = out.replaceAll(readme, value);
  return out;
}

test('README "A real cluster": a controller, two workers with their own data dirs, a VM on each, ssh, delete', { timeout: 240_000 }, async () => {
  await buildDebianDev(TEST_IMAGES); // the suite's image cache, shared by the workers below
  const work = tempDir('orchard-walk-');
  const home = join(work, 'home'); // the client's ~/.orchard
  // As /etc/orchard/controller.env makes it: openssl rand -base64 32.
  const adminToken = randomBytes(32).toString('base64');
  const env: Record<string, string> = {
    ...(process.env as Record<string, string>),
    PATH: `${join(ROOT, 'bin')}:${process.env.PATH}`,
    ORCHARD_HOME: home,
    ORCHARD_BOOTSTRAP_ADMIN_TOKEN: adminToken,
    ORCHARD_LOG_LEVEL: 'warn',
  };
  const sh = (command: string) =>
    new Promise<{ code: number; stdout: string; stderr: string }>((resolve, reject) => {
      const proc = spawn('bash', ['-c', command], { cwd: work, env, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      proc.stdout.on('data', (c: Buffer) => (stdout += c.toString()));
      proc.stderr.on('data', (c: Buffer) => (stderr += c.toString()));
      proc.on('error', reject);
      proc.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
    });
  const ok = async (command: string) => {
    const r = await sh(command);
    assert.equal(r.code, 0, `${command}\nexit ${r.code}\n${r.stderr}${r.stdout}`);
    return r;
  };
  // The laptop already has `orchard dev`'s context as its default (the quick start): after step 3 the
  // README's commands must go to the new controller, not there (nothing listens on this port).
  mkdirSync(home, { recursive: true, mode: 0o700 });
  writeFileSync(join(home, 'orchard.yml'), `default-context: dev\ncontexts:\n  dev:\n    url: https://127.0.0.1:${await freePort()}\n    serviceAccountName: bootstrap-admin\n    serviceAccountToken: dev-token\n`, { mode: 0o600 });
  const workers: { proc: ChildProcess; log: () => string; exited: Promise<void> }[] = [];
  const ctlDir = join(work, 'controller');
  // 2. The controller host (the unit's command line, on a free loopback port).
  const ctl = await spawnController(ctlDir, [], { ORCHARD_BOOTSTRAP_ADMIN_TOKEN: adminToken, ORCHARD_HOME: join(work, 'controller-home') });
  try {
    const t0 = Date.now();
    // "journalctl -u orchard-controller | grep SHA-256": the fingerprint, to check on the client.
    const fingerprint = /SHA-256 ([0-9A-F:]{95})/.exec(ctl.stderr())?.[1];
    assert.ok(fingerprint, ctl.stderr());

    // 3. A client: the context (non-interactive: --trust-fingerprint), a service account, a bootstrap token.
    const created = await ok(
      fromReadme(`orchard context create ${README_URL} --name prod \\\n  --service-account-name bootstrap-admin --service-account-token "$ORCHARD_BOOTSTRAP_ADMIN_TOKEN"`, { [README_URL]: ctl.url }) +
        ` --trust-fingerprint ${fingerprint}`,
    );
    assert.match(created.stdout + created.stderr, /prod/);
    const contexts = (await ok('orchard context list')).stdout;
    assert.match(contexts, /^prod\s+https:\/\/127\.0\.0\.1:\d+\s+bootstrap-admin\s+\*\s+yes\s*$/m, contexts);
    assert.match(contexts, /^dev\s+\S+\s+bootstrap-admin\s+-\s+no\s*$/m, contexts);
    await ok(fromReadme('orchard create service-account worker --roles compute:read --roles compute:write'));
    await ok(fromReadme('orchard get bootstrap-token worker > bootstrap-token'));
    assert.match(readFileSync(join(work, 'bootstrap-token'), 'utf8'), /^orchard-bootstrap-token-v0\./);

    // 4. Two worker hosts "by hand", each on its own data dir (as the unit gives each host one).
    for (const [name, rack] of [['host-1', 'a'], ['host-2', 'b']]) {
      const dataDir = join(work, name);
      mkdirSync(dataDir);
      symlinkSync(TEST_IMAGES, join(dataDir, 'images'));
      await linkTestSnapshots(dataDir); // (the suite's warm-start snapshot, as the image is)
      // The image: made on first use, or ahead of time as the README shows (here: up to date already).
      const built = await ok(fromReadme('orchard image build debian-dev --data-dir /var/lib/orchard/worker', { '/var/lib/orchard/worker': dataDir }));
      assert.match(built.stderr, /debian-dev is up to date/);
      const command = fromReadme(`orchard worker run ${README_URL} --bootstrap-token-stdin < bootstrap-token \\\n  --name host-1 --label rack=a`, {
        [README_URL]: ctl.url,
        'host-1': name,
        'rack=a': `rack=${rack}`,
      });
      assert.ok(README.includes('--data-dir DIR'), 'the README names --data-dir');
      const proc = spawn('bash', ['-c', `exec ${command} --data-dir ${dataDir}`], { cwd: work, env, stdio: ['ignore', 'ignore', 'pipe'] });
      let log = '';
      proc.stderr!.on('data', (c: Buffer) => (log += c.toString()));
      workers.push({ proc, log: () => log, exited: new Promise((r) => proc.once('exit', () => r())) });
    }
    const list = await waitFor('both workers to register', async () => {
      const r = await sh('orchard list workers');
      return /host-1/.test(r.stdout) && /host-2/.test(r.stdout) ? r.stdout : undefined;
    }, 30_000, 200).catch((err: Error) => {
      throw new Error(`${err.message}\n${workers.map((w) => w.log()).join('\n')}`);
    });
    assert.doesNotMatch(list, /offline/);

    // Using it: a VM on each worker, chosen by its label (two terminals at once).
    const createA = fromReadme('orchard create vm web-a --image debian-dev --cpu 1 --memory 512 --label rack=a --wait');
    const createB = fromReadme('orchard create vm web-b --image debian-dev --cpu 1 --memory 512 --label rack=b --wait');
    const [a, b] = await Promise.all([ok(createA), ok(createB)]);
    assert.match(a.stderr + a.stdout, /VM web-a running on worker host-1/);
    assert.match(b.stderr + b.stdout, /VM web-b running on worker host-2/);
    const vms = (await ok(fromReadme('orchard list vms'))).stdout;
    assert.match(vms, /^web-a\s+debian-dev\s+1\s+512\s+running\s+host-1\s+rack=a/m, vms);
    assert.match(vms, /^web-b\s+debian-dev\s+1\s+512\s+running\s+host-2\s+rack=b/m, vms);
    const ssh = await ok(fromReadme(`orchard ssh vm web-b -- 'echo hello from $(hostname) on $(uname -m)'`));
    // a warm start gives the guest the VM's name as its hostname (README, "Warm starts")
    assert.equal(ssh.stdout.trim(), 'hello from web-b on x86_64');
    // Each VM's disk is in its own worker's data dir.
    const localA = JSON.parse((await ok('orchard get vm web-a --output json')).stdout) as { localName: string };
    assert.ok(processesWith(join(work, 'host-1', 'vms', localA.localName)).length > 0, "web-a's qemu runs from host-1's data dir");
    await ok(fromReadme('orchard delete vm web-a'));
    await ok('orchard delete vm web-b');
    await waitFor('the VMs to be gone', async () => (await ok('orchard list vms')).stdout.trim().split('\n').length === 1, 30_000, 200);
    // (what runs on is each worker's standby: a QEMU for the next VM, README "Warm starts")
    const standby = (p: string) => { try { return readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('/vms/.standby-'); } catch { return false; } };
    await waitFor('their qemu processes to stop', () => processesWith(join(work, 'host-')).filter((p) => !workers.some((w) => String(w.proc.pid) === p) && !standby(p)).length === 0, 30_000, 200);
    console.log(`# walkthrough: ${((Date.now() - t0) / 1000).toFixed(1)} s from the controller's start to both VMs deleted`);
  } finally {
    for (const w of workers) if (w.proc.exitCode === null) w.proc.kill('SIGTERM');
    await Promise.all(workers.map((w) => w.exited));
    await ctl.kill('SIGTERM');
    for (const pid of processesWith(work)) process.kill(Number(pid), 'SIGKILL');
    rmSync(work, { recursive: true, force: true });
  }
});
