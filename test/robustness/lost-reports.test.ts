// A worker's reports are not lost: a state report the controller refuses for now (the worker's role
// revoked, then given back) is sent again with back-off until it is taken, and a worker that
// reconnects reports again whatever state the controller lost meanwhile.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { pino } from 'pino';
import { startController } from '../../src/controller/controller.ts';
import { SyntheticDriver } from '../../src/worker/drivers/synthetic.ts';
import { startWorker } from '../../src/worker/run.ts';
import { ADMIN_TOKEN, clientOf, inProcessController, tempDir, waitFor } from '../helpers.ts';

const silent = pino({ level: 'silent' });

test('a state report refused while the worker lacks its role is retried until taken', async () => {
  const c = await inProcessController();
  const dir = tempDir('orchard-worker-');
  let worker;
  try {
    const sa = await c.admin.createServiceAccount({ name: 'wk', token: 'wk-token-0123456789', roles: ['compute:read', 'compute:write'] });
    const token = { serviceAccountName: 'wk', serviceAccountToken: 'wk-token-0123456789', certificate: c.ctl.certificate };
    worker = await startWorker({ url: c.ctl.url, token, name: 'w1', runtime: 'synthetic', labels: {}, dataDir: dir, driver: new SyntheticDriver({ bootDelayMs: 1500 }), logger: silent });
    await c.admin.createVM({ name: 'a', image: 'img' });
    await waitFor('a to boot', async () => (await c.admin.getVM('a')).status_message === 'booting', 10_000);
    // The role goes while the guest boots: the "running" report is refused (403)...
    await c.admin.updateServiceAccount({ ...sa, roles: ['compute:read'] });
    await new Promise((r) => setTimeout(r, 3000));
    assert.equal((await c.admin.getVM('a')).status, 'pending', 'the report cannot get through without the role');
    // ...and gets through once the role is back.
    await c.admin.updateServiceAccount({ ...sa, roles: ['compute:read', 'compute:write'] });
    await waitFor('a to show running', async () => (await c.admin.getVM('a')).status === 'running', 10_000, 100);
  } finally {
    await worker?.stop();
    await c.close();
    c.cleanup();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a reconnecting worker reports again the state its controller lost', async () => {
  const dataDir = tempDir();
  const dir = tempDir('orchard-worker-');
  const start = (listen: string) => startController({ dataDir, listen, bootstrapAdminToken: ADMIN_TOKEN, logger: silent });
  let ctl = await start('127.0.0.1:0');
  let worker;
  try {
    const admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    const token = { serviceAccountName: 'bootstrap-admin', serviceAccountToken: ADMIN_TOKEN, certificate: ctl.certificate };
    worker = await startWorker({ url: ctl.url, token, name: 'w1', runtime: 'synthetic', labels: {}, dataDir: dir, driver: new SyntheticDriver(), logger: silent });
    await admin.createVM({ name: 'b', image: 'img' });
    await waitFor('b to run', async () => (await admin.getVM('b')).status === 'running', 10_000);
    // The controller loses the report (say, its data was restored from before it), and restarts.
    await ctl.store.update('vms', 'b', (vm) => ({ ...vm, status: 'pending', status_message: 'booting' }));
    admin.close();
    await ctl.close();
    ctl = await start(`127.0.0.1:${ctl.port}`);
    const again = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    assert.equal((await again.getVM('b')).status, 'pending');
    await waitFor('the worker to report b running again', async () => (await again.getVM('b')).status === 'running', 10_000, 100);
    again.close();
  } finally {
    await worker?.stop();
    await ctl.close();
    rmSync(dataDir, { recursive: true, force: true });
    rmSync(dir, { recursive: true, force: true });
  }
});
