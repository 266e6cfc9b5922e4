// End to end with real processes and a real guest: a controller, a worker with the qemu driver, the
// debian-dev image. create → running (SSH answers) → startup script output in the events → kill -9
// the worker → a new worker process adopts the still-running VM → delete → no qemu, no disk left.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { encodeBootstrapToken } from '../src/api/bootstrap-token.ts';
import { OrchardClient } from '../src/client/client.ts';
import { buildDebianDev } from '../src/worker/images.ts';
import { ADMIN_TOKEN, heavyFile, ORCHARD_BIN, runCLI, spawnController, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs


/** PIDs of processes whose command line mentions `needle`. */
function processesWith(needle: string): number[] {
  const pids: number[] = [];
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    try {
      if (readFileSync(`/proc/${p}/cmdline`, 'utf8').includes(needle)) pids.push(Number(p));
    } catch {
      // gone
    }
  }
  return pids;
}

function startWorkerProcess(url: string, token: string, dataDir: string) {
  const proc = spawn(ORCHARD_BIN, ['worker', 'run', url, '--bootstrap-token', token, '--name', 'host-1', '--label', 'rack=a', '--runtime', 'qemu', '--data-dir', dataDir, '--slots', '2', '--no-warm-start'], {
    env: { ...process.env, ORCHARD_LOG_LEVEL: 'warn' },
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let log = '';
  proc.stderr!.on('data', (c: Buffer) => (log += c.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  return {
    log: () => log,
    kill: async (signal: NodeJS.Signals) => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      await exited;
    },
  };
}

test('qemu worker: create → running → startup script → worker kill -9 and adoption → delete leaves nothing', async () => {
  await buildDebianDev(TEST_IMAGES);
  const ctlDir = tempDir();
  const workerDir = tempDir('orchard-worker-');
  const home = tempDir('orchard-home-');
  mkdirSync(workerDir, { recursive: true });
  symlinkSync(TEST_IMAGES, join(workerDir, 'images'));
  const ctl = await spawnController(ctlDir);
  const certificate = readFileSync(join(ctlDir, 'controller.crt'), 'utf8');
  const admin = new OrchardClient({ url: ctl.url, certificate, serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN });
  let worker: ReturnType<typeof startWorkerProcess> | undefined;
  try {
    const sa = await admin.createServiceAccount({ name: 'worker', roles: ['compute:read', 'compute:write'] });
    const token = encodeBootstrapToken({ serviceAccountName: 'worker', serviceAccountToken: sa.token!, certificate });
    worker = startWorkerProcess(ctl.url, token, workerDir);
    await waitFor('the worker to register', async () => (await admin.listWorkers()).some((w) => w.name === 'host-1'), 20_000);
    const registered = await admin.getWorker('host-1');
    assert.equal(registered.runtime, 'qemu');
    assert.deepEqual(registered.labels, { rack: 'a' });
    assert.equal(registered.resources?.['org.cirruslabs.tart-vms'], 2);

    const t0 = Date.now();
    const created = await admin.createVM({
      name: 'web-1',
      image: 'debian-dev',
      cpu: 1,
      memory: 512,
      restart_policy: 'OnFailure',
      labels: { rack: 'a' },
      startup_script: { script_content: 'echo "hello from $(hostname) as $(whoami) with $GREETING"; exit 7', env: { GREETING: 'hi there' } },
    });
    const running = await waitFor('web-1 to run', async () => {
      const vm = await admin.getVM('web-1');
      assert.notEqual(vm.status, 'failed', vm.status_message);
      return vm.status === 'running' ? vm : undefined;
    }, 180_000, 100);
    const createToRunning = Date.now() - t0;
    console.log(`# create→running through the cluster: ${createToRunning} ms`);
    assert.equal(running.worker, 'host-1');
    assert.equal(running.localName, `orchard-web-1-${created.uid}-0`);
    const qemuPids = processesWith(running.localName!);
    assert.ok(existsSync(join(workerDir, 'vms', running.localName!, 'disk.qcow2')), "the VM's disk is in the worker's data dir");
    assert.equal(qemuPids.length, 1, 'one qemu process runs the VM');

    const events = await waitFor('the startup script to finish', async () => {
      const { events } = await admin.listEvents('web-1');
      return events.some((e) => /exited with code 7/.test(e.payload)) ? events : undefined;
    }, 60_000, 200);
    // The script's output in upstream's kind, one event per line (upstream's `orchard logs vm` shows only log_line events).
    const output = events.filter((e) => e.kind === 'log_line').map((e) => e.payload).join('\n');
    assert.match(output, /hello from \S+ as admin with hi there/);
    for (const step of ['scheduled on worker host-1', 'cold boot: warm starts are off on this worker', 'booting', 'running: the guest answers SSH']) {
      assert.ok(events.some((e) => e.payload.includes(step)), `event "${step}"`);
    }
    // The same through the CLI.
    await runCLI(['context', 'create', ctl.url, '--name', 'e2e', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], { ORCHARD_HOME: home });
    const logs = await runCLI(['logs', 'vm', 'web-1'], { ORCHARD_HOME: home });
    assert.equal(logs.code, 0, logs.stderr);
    assert.match(logs.stdout, /log_line: hello from/);

    // kill -9 the worker: the guest keeps running; a new worker process adopts it, no reboot.
    await worker.kill('SIGKILL');
    assert.deepEqual(processesWith(running.localName!), qemuPids, 'qemu survives the worker');
    worker = startWorkerProcess(ctl.url, token, workerDir);
    await waitFor('the adoption event', async () => (await admin.listEvents('web-1')).events.some((e) => e.payload.includes('adopted by worker host-1')), 30_000, 100);
    const adopted = await admin.getVM('web-1');
    assert.equal(adopted.status, 'running');
    assert.equal(adopted.restart_count, 0, 'adopted, not restarted');
    assert.deepEqual(processesWith(running.localName!), qemuPids, 'the same qemu process');

    // An image the worker does not have: the VM waits for it (pending, not failed), saying which image
    // and the exact command to add it on this worker (test/worker-images.test.ts: it boots once the image is there).
    await admin.createVM({ name: 'no-image', image: 'ubuntu-missing', cpu: 1, memory: 512 });
    const waiting = await waitFor('no-image to wait for its image', async () => {
      const vm = await admin.getVM('no-image');
      assert.notEqual(vm.status, 'failed', vm.status_message);
      return vm.status_message?.startsWith('image ubuntu-missing not found on worker host-1') ? vm : undefined;
    }, 30_000, 100);
    assert.equal(waiting.status, 'pending');
    assert.ok(waiting.status_message!.includes(`orchard image import ubuntu-missing FILE.qcow2 --data-dir ${workerDir}`), waiting.status_message);
    await admin.deleteVM('no-image');

    // Delete: the guest is stopped and its disk removed.
    await admin.deleteVM('web-1');
    await waitFor('the qemu process to go', () => processesWith(running.localName!).length === 0, 30_000, 100);
    await waitFor('the VM directory to go', () => !existsSync(join(workerDir, 'vms', running.localName!)), 10_000, 100);
  } finally {
    await worker?.kill('SIGTERM');
    admin.close();
    await ctl.kill('SIGTERM');
    for (const pid of processesWith(workerDir)) process.kill(pid, 'SIGKILL');
    rmSync(ctlDir, { recursive: true, force: true });
    rmSync(workerDir, { recursive: true, force: true });
    rmSync(home, { recursive: true, force: true });
  }
});
