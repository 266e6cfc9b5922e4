// A worker never destroys a VM because its controller suddenly does not know it: after the controller
// lost its data (here: an emptied database, started with --accept-damaged-database), the worker's VMs
// keep running and show as orphans, which an admin adopts (the VM is known again, not rebooted) or
// deletes (the worker removes it); a grace period is the only automatic way out. VMs the controller
// knows to be gone (deleted, moved) are still removed at once.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, rmSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { pino } from 'pino';
import { startController } from '../src/controller/controller.ts';
import { DamagedDatabaseError } from '../src/controller/store/integrity.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import { ADMIN_TOKEN, clientOf, heavyFile, qemuCluster, tempDir, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

const silent = pino({ level: 'silent' });

async function cluster(orphanGraceMs?: number) {
  const dataDir = tempDir();
  const start = (listen = '127.0.0.1:0', acceptDamagedDatabase = false) =>
    startController({ dataDir, listen, bootstrapAdminToken: ADMIN_TOKEN, logger: silent, acceptDamagedDatabase });
  const ctl = await start();
  const driver = new SyntheticDriver();
  const worker = new OrchardWorker({ client: clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN), name: 'w1', driver, dataDir: tempDir(), slots: 10, heartbeatMs: 500, orphanGraceMs, logger: silent });
  await worker.start();
  return { dataDir, start, ctl, driver, worker };
}

const running = async (driver: SyntheticDriver) => (await driver.list()).filter((l) => l.running).map((l) => l.localName).sort();

/** Stops the controller, empties its database and starts it again on the same port, accepting that. */
async function loseDatabase(c: Awaited<ReturnType<typeof cluster>>) {
  await c.ctl.close();
  truncateSync(join(c.dataDir, 'orchard.db'), 0);
  rmSync(join(c.dataDir, 'orchard.db-wal'), { force: true });
  await assert.rejects(c.start(`127.0.0.1:${c.ctl.port}`), DamagedDatabaseError, 'refused without --accept-damaged-database');
  return c.start(`127.0.0.1:${c.ctl.port}`, true);
}

test('after the controller loses its data, the worker keeps its VMs as orphans; an admin adopts one and deletes another', async () => {
  const c = await cluster();
  let ctl = c.ctl;
  let admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
  try {
    for (const name of ['keep', 'drop', 'gone']) await admin.createVM({ name, image: 'synthetic', cpu: 1, memory: 512 });
    await waitFor('3 VMs running', async () => (await admin.listVMs()).every((v) => v.status === 'running') || undefined, 10_000);
    // A VM the controller deletes is removed from its worker at once, as before.
    await admin.deleteVM('gone');
    await waitFor('"gone" removed', async () => !(await c.driver.list()).some((l) => l.localName.startsWith('orchard-gone-')) || undefined, 10_000);
    const before = await running(c.driver);
    assert.equal(before.length, 2);

    admin.close();
    ctl = await loseDatabase(c);
    admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    assert.deepEqual(await admin.listVMs(), [], 'the controller knows no VM now');
    const orphans = await waitFor('the orphans reported', async () => {
      const w = await admin.getWorker('w1').catch(() => undefined);
      return w?.orphans?.length === 2 ? w.orphans : undefined;
    }, 20_000, 100);
    assert.deepEqual(orphans.map((o) => o.localName).sort(), before);
    assert.ok(orphans.every((o) => o.running && o.image === 'synthetic' && o.since));
    assert.deepEqual(await running(c.driver), before, 'nothing was stopped or removed');

    // Adopt "keep": the controller knows it again, on the same worker, and it is not booted again.
    const keep = orphans.find((o) => o.name === 'keep')!;
    await admin.adoptOrphan('w1', keep.localName);
    const adopted = await waitFor('"keep" running again', async () => {
      const vm = await admin.getVM('keep').catch(() => undefined);
      return vm?.status === 'running' ? vm : undefined;
    }, 10_000);
    assert.equal(adopted.worker, 'w1');
    assert.equal(adopted.uid, keep.uid);
    const events = (await admin.listEvents('keep')).events.map((e) => e.payload);
    assert.ok(events.some((e) => /adopted by worker w1/.test(e)), events.join(' | '));
    assert.ok(!events.some((e) => /cloning image/.test(e)), 'not prepared or booted again');

    // Adopting "drop" while another VM has its name fails, and as a whole: the orphan is still there.
    const drop = orphans.find((o) => o.name === 'drop')!;
    await admin.createVM({ name: 'drop', image: 'synthetic', resources: { 'no-such-resource': 1 } }); // stays unplaced
    await assert.rejects(admin.adoptOrphan('w1', drop.localName), /already exists/);
    assert.deepEqual((await admin.getWorker('w1')).orphans?.map((o) => o.localName), [drop.localName]);
    assert.notEqual((await admin.getVM('drop')).uid, drop.uid);
    await admin.deleteVM('drop');

    // Delete "drop": the worker stops and removes it.
    await admin.deleteOrphan('w1', drop.localName);
    await waitFor('"drop" removed', async () => !(await c.driver.list()).some((l) => l.localName === drop.localName) || undefined, 10_000);
    await waitFor('no orphans left', async () => !(await admin.getWorker('w1')).orphans?.length || undefined, 10_000);
    assert.deepEqual(await running(c.driver), [keep.localName]);
  } finally {
    await c.worker.stop();
    admin.close();
    await ctl.close();
  }
});

test('an orphan nobody adopts or deletes is removed when its grace period ends, not before', async () => {
  const c = await cluster(3000);
  let ctl = c.ctl;
  let admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
  try {
    await admin.createVM({ name: 'lonely', image: 'synthetic', cpu: 1, memory: 512 });
    await waitFor('running', async () => (await admin.getVM('lonely')).status === 'running' || undefined, 10_000);
    admin.close();
    ctl = await loseDatabase(c);
    admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    await waitFor('the orphan reported', async () => (await admin.getWorker('w1').catch(() => undefined))?.orphans?.length || undefined, 20_000, 100);
    const reportedAt = Date.now();
    assert.equal((await running(c.driver)).length, 1, 'kept at first');
    await waitFor('the orphan removed', async () => (await c.driver.list()).length === 0 || undefined, 15_000, 100);
    assert.ok(Date.now() - reportedAt >= 2000, 'not before its grace period');
  } finally {
    await c.worker.stop();
    admin.close();
    await ctl.close();
  }
});

test('a real qemu VM and its disk survive a controller that lost its database, as an orphan', async () => {
  const q = await qemuCluster({ workerName: 'qemu-orphans' });
  let ctl: Awaited<ReturnType<typeof startController>> | undefined;
  let admin: ReturnType<typeof clientOf> | undefined;
  try {
    const vm = await q.runningVM('survivor');
    const localName = `orchard-survivor-${vm.uid}-0`;
    const disk = join(q.workerDir, 'vms', localName, 'disk.qcow2');
    assert.ok(existsSync(disk));
    const port = q.ctl.port;
    await q.ctl.close();
    truncateSync(join(q.dataDir, 'orchard.db'), 0);
    rmSync(join(q.dataDir, 'orchard.db-wal'), { force: true });
    ctl = await startController({ dataDir: q.dataDir, listen: `127.0.0.1:${port}`, bootstrapAdminToken: ADMIN_TOKEN, logger: silent, acceptDamagedDatabase: true });
    admin = clientOf(ctl, 'bootstrap-admin', ADMIN_TOKEN);
    const orphans = await waitFor('the orphan reported', async () => (await admin!.getWorker('qemu-orphans').catch(() => undefined))?.orphans, 30_000, 200);
    assert.deepEqual(orphans.map((o) => [o.localName, o.name, o.image, o.running]), [[localName, 'survivor', 'debian-dev', true]]);
    assert.ok((await q.driver.list()).find((l) => l.localName === localName)?.running, 'QEMU still runs');
    assert.ok(existsSync(disk), 'its disk is still there');
    // The guest still answers through the worker.
    const sock = await q.driver.dial(localName, 22);
    const banner = await new Promise<string>((resolve) => sock.once('data', (d: Buffer) => resolve(d.toString())));
    sock.destroy();
    assert.match(banner, /^SSH-/);
    await admin.deleteOrphan('qemu-orphans', localName);
    await waitFor('the orphan removed', async () => !existsSync(disk) || undefined, 30_000, 200);
  } finally {
    admin?.close();
    await ctl?.close();
    await q.close().catch(() => {});
  }
});
