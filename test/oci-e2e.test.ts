// End to end: debian-dev pushed to a registry on loopback is pulled by a real qemu worker for a VM
// that names it by reference, boots, and answers `orchard ssh vm NAME -- uname -a`; the VM's events
// tell of the pull.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { buildDebianDev, resolveImage } from '../src/worker/images.ts';
import { ImageCache } from '../src/worker/oci/cache.ts';
import { pushImage } from '../src/worker/oci/push.ts';
import { ADMIN_TOKEN, inProcessController, qemuWorker, runCLI, TEST_IMAGES, tempDir, waitFor } from './helpers.ts';
import { startRegistry, throttledProxy } from './registry.ts';

test('a qemu worker pulls debian-dev from a registry, boots it, and orchard ssh runs uname -a in it', async (t) => {
  await buildDebianDev(TEST_IMAGES);
  const registry = await startRegistry();
  await pushImage(await resolveImage(TEST_IMAGES, 'debian-dev'), `${registry.host}/orchard/debian-dev:e2e`, { insecure: true });
  // Pulled over a slow link (32 MiB/s), long enough for the pull's progress to show in the events.
  const proxy = await throttledProxy(registry.host, 32 * 1024 * 1024);
  const ref = `${proxy.host}/orchard/debian-dev:e2e`;
  const c = await inProcessController();
  const workerDir = tempDir('orchard-worker-');
  const cache = new ImageCache({ storeDir: join(workerDir, 'images'), registries: (h) => (h === proxy.host ? { insecure: true } : undefined) });
  const w = await qemuWorker(c, 'oci-1', workerDir, { imageCache: cache });
  const home = tempDir('orchard-home-');
  t.after(async () => {
    await c.admin.deleteVM('pulled').catch(() => {});
    await w.close();
    cache.close();
    await c.close();
    c.cleanup();
    proxy.server.close();
    await registry.stop();
    for (const d of [workerDir, home]) rmSync(d, { recursive: true, force: true });
  });
  await c.admin.createVM({ name: 'pulled', image: ref, cpu: 1, memory: 512 });
  await waitFor('pulled to run', async () => {
    const vm = await c.admin.getVM('pulled');
    assert.notEqual(vm.status, 'failed', vm.status_message);
    return vm.status === 'running';
  }, 180_000, 200);
  assert.equal(cache.downloads, 1);
  const events = (await c.admin.listEvents('pulled')).events.map((e) => e.payload);
  assert.ok(events.some((e) => /^pulling orchard\/debian-dev:e2e: \d+ % of \d+ MiB, [\d.]+ MiB\/s, about \d+ s left$/.test(e)), events.join('\n'));
  const env = { ORCHARD_HOME: home };
  const ctx = await runCLI(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--yes'], env);
  assert.equal(ctx.code, 0, ctx.stderr);
  const r = await runCLI(['ssh', 'vm', 'pulled', '--', 'uname -a'], env);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^Linux \S+ \S+/);
});
