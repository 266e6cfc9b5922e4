// End to end: debian-dev pushed to a registry on loopback (TLS with a test CA, htpasswd) is pulled by a
// real qemu worker for a VM that names it by reference, with the credentials an admin set on the
// controller (sent to the worker, never logged by either), boots, and answers
// `orchard ssh vm NAME -- uname -a`; the VM's reason and events tell of the pull.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
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
  const cache = new ImageCache({ storeDir: join(workerDir, 'images'), registries: registries.lookup });
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
  running.worker = await qemuWorker(c, 'oci-1', workerDir, { imageCache: cache, registries, logger });
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
});
