// Spec changes reach a running VM: a new cpu/memory restarts it with the new spec, a change the host
// does not act on (labels) is only acknowledged, and powerState stops and starts it. In every case
// observedGeneration catches up with generation.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { localNameOf } from '../src/api/schemas.ts';
import { ADMIN_TOKEN, clientOf, inProcessController, tempDir, waitFor } from './helpers.ts';

test('generation, observedGeneration and powerState are honoured on a running VM', async () => {
  const c = await inProcessController();
  const driver = new SyntheticDriver();
  const worker = new OrchardWorker({ client: clientOf(c.ctl, 'bootstrap-admin', ADMIN_TOKEN), name: 'w', driver, dataDir: tempDir(), slots: 2, logger: pino({ level: 'silent' }) });
  await worker.start();
  const settled = (want: (vm: Awaited<ReturnType<typeof c.admin.getVM>>) => boolean, what: string) =>
    waitFor(what, async () => {
      const vm = await c.admin.getVM('s');
      return vm.observedGeneration === vm.generation && want(vm) ? vm : undefined;
    }, 10_000, 20);
  try {
    const created = await c.admin.createVM({ name: 's', image: 'synthetic', cpu: 1, memory: 512 });
    await settled((vm) => vm.status === 'running', 'running');
    const local = localNameOf(created);
    assert.deepEqual([driver.describe(local)?.vm.cpu, driver.describe(local)?.starts], [1, 1]);

    // New cpu and memory: the VM is restarted with them.
    await c.admin.updateVM({ name: 's', cpu: 2, memory: 1024 });
    let vm = await settled((v) => v.status === 'running' && driver.describe(local)?.starts === 2, 'restart with the new spec');
    assert.equal(vm.generation, 1);
    assert.deepEqual([driver.describe(local)?.vm.cpu, driver.describe(local)?.vm.memory, driver.describe(local)?.running], [2, 1024, true]);

    // Labels only: acknowledged, no restart.
    await c.admin.updateVM({ name: 's', labels: { team: 'ci' } });
    vm = await settled((v) => v.generation === 2, 'the labels generation acknowledged');
    assert.equal(vm.status, 'running');
    assert.equal(driver.describe(local)?.starts, 2);

    // powerState stopped: powered off, disk kept; running again: booted again.
    await c.admin.updateVM({ name: 's', powerState: 'stopped' });
    vm = await settled((v) => /stopped/.test(v.status_message ?? ''), 'stopped');
    assert.equal(vm.status, 'pending');
    assert.equal(driver.describe(local)?.running, false);
    assert.equal(vm.worker, 'w', 'a stopped VM keeps its worker');
    await c.admin.updateVM({ name: 's', powerState: 'running' });
    vm = await settled((v) => v.status === 'running', 'running again');
    assert.deepEqual([driver.describe(local)?.running, driver.describe(local)?.starts], [true, 3]);
    const events = (await c.admin.listEvents('s')).events.map((e) => e.payload);
    assert.ok(events.includes('stopping to apply a new spec'));
    assert.ok(events.includes('stopped (powerState stopped)'));
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
  }
});
