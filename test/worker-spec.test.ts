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

type Cluster = Awaited<ReturnType<typeof inProcessController>>;
type VM = Awaited<ReturnType<Cluster['admin']['getVM']>>;

/** Waits until VM `name` has carried out its latest generation and `want` holds; resolves with it. */
const settledOn = (c: Cluster, name: string) => (want: (vm: VM) => boolean, what: string) =>
  waitFor(what, async () => {
    const vm = await c.admin.getVM(name);
    return vm.observedGeneration === vm.generation && want(vm) ? vm : undefined;
  }, 10_000, 20);

test('generation, observedGeneration and powerState are honoured on a running VM', async () => {
  const c = await inProcessController();
  const driver = new SyntheticDriver();
  const worker = new OrchardWorker({ client: clientOf(c.ctl, 'bootstrap-admin', ADMIN_TOKEN), name: 'w', driver, dataDir: tempDir(), slots: 2, logger: pino({ level: 'silent' }) });
  await worker.start();
  const settled = settledOn(c, 's');
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

// The worker's side of suspend, with a driver that keeps its VMs across worker processes (the
// synthetic one, shared): suspended is not a stop (no boot on resume), keeps the VM's slot, and a
// restarted worker adopts a suspended VM as suspended and can still resume it.
test('powerState suspended suspends through the driver, keeps the slot; running resumes it without a boot, also after a worker restart', async () => {
  const c = await inProcessController();
  const driver = new SyntheticDriver();
  const dataDir = tempDir();
  const newWorker = () => new OrchardWorker({ client: clientOf(c.ctl, 'bootstrap-admin', ADMIN_TOKEN), name: 'w', driver, dataDir, slots: 1, logger: pino({ level: 'silent' }) });
  let worker = newWorker();
  await worker.start();
  const settled = settledOn(c, 's');
  try {
    const created = await c.admin.createVM({ name: 's', image: 'synthetic', cpu: 1, memory: 512, suspendable: true });
    await settled((vm) => vm.status === 'running', 'running');
    const local = localNameOf(created);
    const suspendedHere = async () => (await driver.list()).find((l) => l.localName === local)?.suspended === true;

    await c.admin.updateVM({ name: 's', powerState: 'suspended' });
    let vm = await settled((v) => /^suspended/.test(v.status_message ?? ''), 'suspended');
    assert.equal(vm.status, 'pending', 'as for a stopped VM');
    assert.match(vm.status_message!, /memory and disk are kept/);
    assert.deepEqual(vm.conditions, [{ type: 'scheduled', state: 'true' }, { type: 'running', state: 'false' }]);
    assert.ok(await suspendedHere(), 'the driver suspended it');
    assert.deepEqual([driver.describe(local)?.running, driver.describe(local)?.starts], [true, 1], 'not stopped');
    // It keeps its slot: another VM does not fit on the one-slot worker.
    await c.admin.createVM({ name: 'other', image: 'synthetic' });
    await waitFor('other pending for want of a slot', async () => /VM slots/.test((await c.admin.getVM('other')).status_message ?? ''), 10_000, 20);
    await c.admin.deleteVM('other');

    // The worker restarts: the new one adopts the VM as suspended (neither stopped nor booted).
    await worker.stop();
    worker = newWorker();
    await worker.start();
    await waitFor('the new worker to sync', async () => (await c.admin.listEvents('s')).events.length > 0 && (await c.admin.getVM('s')).status_message?.startsWith('suspended'), 10_000, 50);
    await new Promise((r) => setTimeout(r, 500));
    assert.ok(await suspendedHere(), 'still suspended after the restart');
    assert.deepEqual([driver.describe(local)?.running, driver.describe(local)?.starts], [true, 1]);

    await c.admin.updateVM({ name: 's', powerState: 'running' });
    vm = await settled((v) => v.status === 'running', 'resumed');
    assert.equal(await suspendedHere(), false);
    assert.deepEqual([driver.describe(local)?.running, driver.describe(local)?.starts], [true, 1], 'resumed, not booted again');
    const events = (await c.admin.listEvents('s')).events.map((e) => e.payload);
    assert.ok(events.some((e) => /^suspended \(powerState suspended\) in /.test(e)), events.join('\n'));
    assert.ok(events.includes('resumed: the VM continues where it was suspended'), events.join('\n'));
    assert.ok(!events.includes('stopping to apply a new spec'));
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
  }
});
