// A qemu worker and its images: a VM whose image the worker lacks waits for it (pending, with the
// reason and the exact command to add it) and boots as soon as the image appears; `debian-dev`
// is built on first use; the hints name the worker's --data-dir.
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildDebianDev, importImage, resolveImage } from '../src/worker/images.ts';
import { heavyFile, inProcessController, qemuWorker, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

type Cluster = Awaited<ReturnType<typeof inProcessController>>;

const events = async (c: Cluster, vm: string) => (await c.admin.listEvents(vm)).events.map((e) => `${e.kind}: ${e.payload}`);

/**
 * A controller and a qemu worker `name` that builds debian-dev when missing, its data dir readied
 * by `prepare` before it starts; after the test the VMs `vms`, the worker and the controller are gone.
 */
async function workerCluster(t: TestContext, name: string, vms: string[], prepare: (workerDir: string) => void = () => {}) {
  const c = await inProcessController();
  const workerDir = tempDir('orchard-worker-');
  prepare(workerDir);
  const w = await qemuWorker(c, name, workerDir, { slots: 2, buildMissingDebianDev: true });
  t.after(async () => {
    for (const vm of vms) await c.admin.deleteVM(vm).catch(() => {});
    await w.close();
    await c.close();
    c.cleanup();
    rmSync(workerDir, { recursive: true, force: true });
  });
  return { c, w, workerDir };
}

/** The VM once it waits, pending, for `image` on `worker` (a failed VM fails the test). */
const waitingForImage = (c: Cluster, vm: string, image: string, worker: string, timeoutMs: number) =>
  waitFor(`${vm} to wait for ${image}`, async () => {
    const v = await c.admin.getVM(vm);
    assert.notEqual(v.status, 'failed', v.status_message);
    return v.status_message?.startsWith(`image ${image} not found on worker ${worker}`) ? v : undefined;
  }, timeoutMs, 100);

test('the hint for a missing image names the worker data dir', async () => {
  const dataDir = tempDir('orchard-hint-');
  await assert.rejects(resolveImage(join(dataDir, 'images'), 'debian-dev'), (err: Error) => {
    assert.ok(err.message.endsWith(`run: orchard image build debian-dev --data-dir ${dataDir}`), err.message);
    return true;
  });
  await assert.rejects(resolveImage(join(dataDir, 'images'), 'ghcr.io/x/y:tag'), (err: Error) => {
    assert.ok(err.message.endsWith(`run: orchard image import ghcr.io/x/y:tag FILE.qcow2 --data-dir ${dataDir}`), err.message);
    return true;
  });
  rmSync(dataDir, { recursive: true, force: true });
});

test('a VM whose image is missing stays pending with the reason, and boots as soon as the image appears', async (t) => {
  const { c, w, workerDir } = await workerCluster(t, 'img-1', ['waiter']);
  await c.admin.createVM({ name: 'waiter', image: 'late-image', cpu: 1, memory: 256 });
  const pending = await waitingForImage(c, 'waiter', 'late-image', 'img-1', 20_000);
  assert.equal(pending.status, 'pending');
  assert.ok(pending.status_message!.includes(`orchard image import late-image FILE.qcow2 --data-dir ${workerDir}`), pending.status_message);
  assert.ok((await events(c, 'waiter')).some((e) => /retrying when the worker's images change/.test(e)));
  // It keeps waiting (a second attempt comes after 5 s): still pending, not failed.
  await new Promise((r) => setTimeout(r, 6000));
  const still = await c.admin.getVM('waiter');
  assert.equal(still.status, 'pending', still.status_message);

  // The image appears (another process imports it): the VM goes on at once, not after the back-off (10 s by now).
  const blank = join(tempDir('orchard-blank-'), 'blank.qcow2');
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', blank, '64M']);
  await importImage(join(workerDir, 'images'), 'late-image', blank);
  const t0 = Date.now();
  await waitFor('the VM to boot from the new image', async () => (await events(c, 'waiter')).includes('lifecycle: booting'), 20_000, 100);
  assert.ok(Date.now() - t0 < 5000, `took ${Date.now() - t0} ms after the import`);
  assert.ok((await events(c, 'waiter')).some((e) => /^lifecycle: image late-image is here now/.test(e)));
  await c.admin.deleteVM('waiter');
  await waitFor('the VM to be removed on the worker', async () => (await w.driver.list()).length === 0, 30_000, 200);
});

test('debian-dev is built on first use on a qemu worker that lacks it, with progress in the VM reasons and events', async (t) => {
  await buildDebianDev(TEST_IMAGES); // only so that the kernel package is in the cache below
  const { c, workerDir } = await workerCluster(t, 'img-2', ['first', 'second'], (dir) => {
    // The build's download cache (the kernel .deb) as a worker keeps it between builds; the image itself is not there.
    mkdirSync(join(dir, 'images', '.build'), { recursive: true });
    cpSync(join(TEST_IMAGES, '.build', 'debian-dev', 'cache'), join(dir, 'images', '.build', 'debian-dev', 'cache'), { recursive: true });
    assert.ok(!existsSync(join(dir, 'images', 'debian-dev')));
  });
  // Two VMs ask at once: one build, both wait for it.
  await c.admin.createVM({ name: 'first', image: 'debian-dev', cpu: 1, memory: 256 });
  await c.admin.createVM({ name: 'second', image: 'debian-dev', cpu: 1, memory: 256 });
  const reasons = new Set<string>();
  await waitFor('both VMs to have a disk', async () => {
    for (const name of ['first', 'second']) {
      const vm = await c.admin.getVM(name);
      if (vm.status === 'failed') throw new Error(`${name} failed: ${vm.status_message}`);
      reasons.add(vm.status_message ?? '');
    }
    const all = [...(await events(c, 'first')), ...(await events(c, 'second'))];
    return all.filter((e) => e === 'lifecycle: booting').length === 2;
  }, 240_000, 250);
  // While it lasts, the build's progress is the VMs' reason...
  assert.ok([...reasons].some((r) => r.startsWith('building image debian-dev: ')), [...reasons].join('\n'));
  // ...and each VM's events show it (at most one progress event a second, the last one always).
  for (const name of ['first', 'second']) {
    const log = (await events(c, name)).join('\n');
    assert.match(log, /progress: building image debian-dev: [^\n]+\n(.*\n)*lifecycle: booting/, log);
  }
  const image = await resolveImage(join(workerDir, 'images'), 'debian-dev');
  assert.equal(image.kind, 'kernel');
});

test('debian-dev that cannot be built: the VM waits with why and the exact command, and goes on once the cause is gone', async (t) => {
  await buildDebianDev(TEST_IMAGES);
  const { c, workerDir } = await workerCluster(t, 'img-3', ['third'], (dir) => {
    mkdirSync(join(dir, 'images'), { recursive: true });
    // A store the build cannot use: its build directory is a file (a broken disk, a stray copy...).
    writeFileSync(join(dir, 'images', '.build'), 'not a directory\n');
  });
  await c.admin.createVM({ name: 'third', image: 'debian-dev', cpu: 1, memory: 256 });
  const waiting = await waitingForImage(c, 'third', 'debian-dev', 'img-3', 30_000);
  assert.equal(waiting.status, 'pending');
  assert.match(waiting.status_message!, /this worker could not build it: .*\.build/);
  assert.ok(waiting.status_message!.endsWith(`build it as the worker's user with: orchard image build debian-dev --data-dir ${workerDir}`), waiting.status_message);
  // The cause goes (with the kernel package already in the cache): the worker notices and builds.
  rmSync(join(workerDir, 'images', '.build'));
  mkdirSync(join(workerDir, 'images', '.build'));
  cpSync(join(TEST_IMAGES, '.build', 'debian-dev', 'cache'), join(workerDir, 'images', '.build', 'debian-dev', 'cache'), { recursive: true });
  await waitFor('the VM to boot', async () => (await events(c, 'third')).includes('lifecycle: booting'), 120_000, 250);
});
