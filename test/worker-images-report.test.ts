// The worker's side of images (#15 items 5, 6), with real workers (the synthetic driver, whose
// images "pull" with progress): registry credentials reach the driver, `orchard image pull` runs on
// the matching worker with its progress, the worker reports what it holds (after a pre-pull and after
// a VM's image came), and the scheduler places a VM on the worker that holds its image.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { startWorker } from '../src/worker/run.ts';
import { ADMIN_TOKEN, inProcessController, runCLI, tempDir, waitFor } from './helpers.ts';

const IMAGE = 'registry.test:5000/team/ubuntu:24.04';

test('a worker gets the registries, pre-pulls with progress, reports the images it holds, and gets the VMs of those images', async () => {
  const c = await inProcessController();
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const token = { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: c.ctl.certificate };
  const drivers = { a: new SyntheticDriver(), b: new SyntheticDriver({ pullMs: 2500 }) };
  const workers = [];
  try {
    for (const [name, driver] of Object.entries(drivers)) {
      workers.push(await startWorker({ url: c.ctl.url, token, name, runtime: 'synthetic', labels: { pool: name }, dataDir: tempDir('orchard-worker-'), driver, logger: pino({ level: 'silent' }) }));
    }
    await waitFor('both workers to declare what they understand', async () =>
      (await c.admin.listWorkers()).filter((w) => w.capabilities?.includes('pullImageAction') && w.capabilities.includes('registriesAction')).length === 2 || undefined);

    // Credentials set by an admin reach every worker's driver, in clear (and only there).
    await c.admin.createRegistry({ host: 'registry.test:5000', username: 'ci', password: 'pass-0f-the-registry' });
    for (const d of Object.values(drivers)) {
      await waitFor('the registry at the worker', () => d.registries.find((r) => r.host === 'registry.test:5000')?.password === 'pass-0f-the-registry' || undefined);
    }

    // A pre-pull on the workers of pool b: progress lines for b, then done; a is not asked.
    const created = await runCLI(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!], env);
    assert.equal(created.code, 0, created.stderr);
    const pulled = await runCLI(['image', 'pull', IMAGE, '--label', 'pool=b'], env);
    assert.equal(pulled.code, 0, pulled.stderr);
    const lines = pulled.stdout.split('\n').filter(Boolean);
    assert.ok(lines.filter((l) => /^b: pulling registry\.test:5000\/team\/ubuntu:24\.04: \d+ % of 100 MiB/.test(l)).length >= 2, pulled.stdout);
    assert.match(lines.at(-1)!, /^b: done: .*is here/, pulled.stdout);
    assert.ok(!pulled.stdout.includes('a:'), pulled.stdout);
    assert.deepEqual((await c.admin.getWorker('b')).images, [IMAGE]);
    assert.deepEqual((await c.admin.getWorker('a')).images ?? [], []);

    // Both workers fit equally (and a comes first): the VM goes where its image is, and says so.
    await c.admin.createVM({ name: 'near', image: IMAGE, cpu: 1, memory: 512 });
    const near = await waitFor('near to run', async () => {
      const vm = await c.admin.getVM('near');
      return vm.status === 'running' ? vm : undefined;
    });
    assert.equal(near.worker, 'b');
    const events = (await c.admin.listEvents('near')).events.map((e) => e.payload);
    assert.ok(events.includes(`scheduled on worker b; cloning image ${IMAGE} (already on this worker)`), events.join('\n'));

    // A VM of another image that lands on b makes b hold it: reported without being asked.
    await c.admin.createVM({ name: 'other', image: 'debian-dev', cpu: 1, memory: 512 });
    await waitFor('the other VM to run', async () => (await c.admin.getVM('other')).status === 'running' || undefined);
    const holder = (await c.admin.getVM('other')).worker!;
    await waitFor(`${holder} to report debian-dev`, async () => (await c.admin.getWorker(holder)).images?.includes('debian-dev') || undefined, 10_000);
  } finally {
    for (const w of workers) await w.stop();
    await c.close();
    c.cleanup();
  }
});
