// End to end: debian-dev pushed to a registry on loopback (TLS with a test CA, htpasswd) is pulled by a
// real qemu worker for a VM that names it by reference, with the credentials an admin set on the
// controller (sent to the worker, never logged by either), boots, and answers
// `orchard ssh vm NAME -- uname -a`; the VM's reason and events tell of the pull. With no SSH key (a
// push leaves it behind) the VM resumes the pulled image's warm-start snapshot all the same, made
// through the image's own agent; once the VM is gone, the cache evicts the image (the snapshot's
// link is no use of it) and the snapshot goes with it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { buildDebianDev, resolveImage } from '../src/worker/images.ts';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { pushImage } from '../src/worker/oci/push.ts';
import { Registries } from '../src/worker/oci/registries.ts';
import { ADMIN_TOKEN, heavyFile, inProcessController, qemuWorker, runCLI, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';
import { startRegistry, throttledProxy } from './registry.ts';

await heavyFile(); // boots VMs

const PASSWORD = 'pull-secret-4f2b9c';

test('a qemu worker pulls debian-dev from a registry with the controller\'s credentials, boots it, and orchard ssh runs uname -a in it', async (t) => {
  await buildDebianDev(TEST_IMAGES);
  const registry = await startRegistry({ users: { ci: PASSWORD } });
  await pushImage(await resolveImage(TEST_IMAGES, 'debian-dev'), `${registry.host}/orchard/debian-dev:e2e`, { username: 'ci', password: PASSWORD, ca: registry.ca });
  // Pulled over a slow link (8 MiB/s: the image is about 28 MiB), long enough for the pull's progress to show (at most a line a second).
  const proxy = await throttledProxy(registry.host, 8 * 1024 * 1024);
  const ref = `${proxy.host}/orchard/debian-dev:e2e`;
  // Every log line of the controller and the worker, at debug, to look for the password in.
  let logs = '';
  const logger = pino({ level: 'debug' }, { write: (line: string) => void (logs += line) });
  const c = await inProcessController({ logger });
  const workerDir = tempDir('orchard-worker-');
  // The worker knows nothing of the registry: its settings come from the controller.
  const registries = new Registries();
  // A bound of one byte: every image no VM uses goes at the next eviction (checked at the end).
  const cache = new ImageCache({ storeDir: join(workerDir, 'images'), registries: registries.lookup, maxBytes: 1 });
  const home = tempDir('orchard-home-');
  const running: { worker?: Awaited<ReturnType<typeof qemuWorker>> } = {};
  t.after(async () => {
    await c.admin.deleteVM('pulled').catch(() => {});
    await running.worker?.close();
    cache.close();
    await c.close();
    c.cleanup();
    proxy.server.close();
    await registry.stop();
    for (const d of [workerDir, home]) rmSync(d, { recursive: true, force: true });
  });
  await c.admin.createRegistry({ host: proxy.host, username: 'ci', password: PASSWORD, ca: registry.ca });
  running.worker = await qemuWorker(c, 'oci-1', workerDir, { imageCache: cache, registries, logger, warmStart: true });
  await c.admin.createVM({ name: 'pulled', image: ref, cpu: 1, memory: 512 });
  const reasons = new Set<string>();
  await waitFor('pulled to run', async () => {
    const vm = await c.admin.getVM('pulled');
    assert.notEqual(vm.status, 'failed', vm.status_message);
    reasons.add(vm.status_message ?? '');
    return vm.status === 'running';
  }, 180_000, 200);
  assert.equal(cache.downloads, 1);
  const progress = /^pulling orchard\/debian-dev:e2e: \d+ % of \d+ MiB, [\d.]+ MiB\/s, about \d+ s left$/;
  const events = (await c.admin.listEvents('pulled')).events.map((e) => e.payload);
  assert.ok(events.some((e) => progress.test(e)), events.join('\n'));
  assert.ok([...reasons].some((r) => progress.test(r)), `the pull's progress was the VM's reason: ${[...reasons].join(' | ')}`);
  // The worker reports what it holds: the reference, for the scheduler's locality.
  await waitFor('the worker to report the image', async () => (await c.admin.getWorker('oci-1')).images?.includes(ref) || undefined, 10_000);

  const env = { ORCHARD_HOME: home };
  const ctx = await runCLI(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], env);
  assert.equal(ctx.code, 0, ctx.stderr);
  const r = await runCLI(['ssh', 'vm', 'pulled', '--', 'uname -a'], env);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^Linux \S+ \S+/);

  // The credentials were used (the registry refuses anonymous pulls) and neither side logged them.
  assert.match(logs, /registry settings from the controller/, 'the run was logged');
  for (const secret of [PASSWORD, Buffer.from(`ci:${PASSWORD}`).toString('base64')]) assert.ok(!logs.includes(secret), 'a credential is in the logs');

  // A pulled image has no SSH key (a push leaves the image's private key behind), yet the VM
  // resumed a snapshot of it: the image's own agent, started at boot, gave it its identity.
  const driver = running.worker.driver;
  assert.equal((await cache.cached(ref))?.sshKey, undefined);
  assert.ok(events.some((e) => /^warm start: resumed the snapshot of image .* own identity [\d.]+s through the agent/.test(e)), events.join('\n'));
  assert.match((await runCLI(['ssh', 'vm', 'pulled', '--', 'hostname'], env)).stdout, /^pulled$/m);
  // The snapshot links the cached image's disk. While the VM runs, the image is in use: not evicted.
  const snapshot = driver.snapshotDir(ref, { cpu: 1, memory: 512 });
  const [held] = await cache.list();
  assert.equal(statSync(join(snapshot, 'base.qcow2')).ino, statSync(join(held.dir, 'base.qcow2')).ino);
  // (what was handed out is kept a few minutes for the VM that asked: pretend those are over)
  (cache as unknown as { handedOut: Map<string, number> }).handedOut.clear();
  assert.deepEqual(await cache.evict(), []);
  assert.ok(existsSync(snapshot));
  // Once the VM is deleted, the snapshot's link is no use of the image: the image is evicted, and
  // its snapshot goes with it (else it would keep the disk's space).
  await c.admin.deleteVM('pulled');
  await waitFor('the VM\'s files to be removed', async () => (await driver.list()).length === 0 || undefined, 60_000);
  // `orchard image snapshot` makes one ahead of time for a pulled image too (for another shape here).
  const made = await runCLI(['image', 'snapshot', ref, '--memory', '256', '--data-dir', workerDir], env);
  assert.equal(made.code, 0, made.stderr);
  assert.ok(existsSync(join(driver.snapshotDir(ref, { cpu: 1, memory: 256 }), 'snapshot.json')), made.stderr);
  // `orchard image list` shows them, with what they take on disk; the image is not in use.
  const listed = await runCLI(['image', 'list', '--data-dir', workerDir, '-o', 'json'], env);
  assert.equal(listed.code, 0, listed.stderr);
  const row = (JSON.parse(listed.stdout) as { name: string; inUse?: boolean; snapshots?: { cpu: number; memory: number; bytes: number }[] }[]).find((r) => r.name === ref);
  assert.deepEqual(row?.snapshots?.map((s) => [s.cpu, s.memory]), [[1, 256], [1, 512]], listed.stdout);
  assert.ok(row!.snapshots!.every((s) => s.bytes > 1024 * 1024), 'each holds at least its memory pages');
  assert.equal(row!.inUse, false);
  assert.match((await runCLI(['image', 'list', '--data-dir', workerDir], env)).stdout, /SNAPSHOTS\n.*1cpu-256mib 1cpu-512mib \([\d.]+ MiB\)/);
  assert.equal((await cache.list())[0].inUse, false, 'the snapshot\'s link is not a use');
  assert.deepEqual(await cache.evict(), [held.digest]);
  assert.equal(existsSync(held.dir), false, 'the image was evicted');
  assert.equal(existsSync(snapshot), false, 'its snapshots were removed with it');
  assert.deepEqual(readdirSync(join(workerDir, 'snapshots')), []);
});
