// Standbys on a real qemu worker (debian-dev, TCG; the suite's shared snapshot, so no template boots):
//  - once a VM has resumed a snapshot, the worker makes standbys of it (resumed, warmed up, paused),
//    here two (--warm-standby 2), one after the other;
//  - the next VM of that snapshot takes one: the same QEMU process, continued, with the VM's own
//    identity (hostname, host key, MAC, machine-id, user and password) before it is reported running;
//    it answers `orchard ssh` as its own user, and differs from the VM before it;
//  - the standby taken is replaced by a new one;
//  - the worker's stop ends its standby (VMs run on); started again, the worker makes a standby of the
//    snapshot last wanted before any VM asks, and the next VM takes it; a standby left by a worker
//    that did not end it (as a killed one would) is ended when the worker starts again.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { localNameOf, type VM } from '../src/api/schemas.ts';
import { buildDebianDev } from '../src/worker/images.ts';
import { qemuPidIn } from '../src/worker/drivers/qemu-process.ts';
import { ADMIN_TOKEN, alive, createdVM, heavyFile, inProcessController, linkTestSnapshots, qemuWorker, runCLI, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

test('qemu standby: the next VM of a snapshot takes a standby of the worker (the same QEMU, continued) with its own identity, answers orchard ssh; the standby is replaced; ended with the worker, and when left behind', async () => {
  await buildDebianDev(TEST_IMAGES);
  const c = await inProcessController();
  const workerDir = tempDir('orchard-standby-worker-');
  await linkTestSnapshots(workerDir);
  let w = await qemuWorker(c, 'standby-1', workerDir, { imagesDir: TEST_IMAGES, warmStart: true, standbys: 2 });
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const created = async (name: string, extra: Partial<VM> = {}) => {
    const r = await createdVM(c.admin, name, extra);
    return { ...r, dir: w.driver.vmDir(localNameOf(r.vm)) };
  };
  const ssh = async (name: string, command: string) => {
    const r = await runCLI(['ssh', 'vm', name, '-v', '--wait', '10', '--', command], env);
    assert.equal(r.code, 0, `${name}: ${command}: ${r.stderr}`);
    return { out: r.stdout.trim(), hostKey: /host key (\S+) (SHA256:\S+)/.exec(r.stderr)?.[2], user: /authenticated to .* as (\S+)/.exec(r.stderr)?.[1] };
  };
  /** The ready standbys once there are `n`, with their QEMUs' pids. */
  const standbys = (label: string, n: number) => waitFor(label, () => {
    const ready = w.driver.standbysReady().map((s) => ({ ...s, pid: qemuPidIn(s.dir) }));
    return ready.length === n && ready.every((s) => s.pid) ? ready as (typeof ready[number] & { pid: number })[] : undefined;
  }, 120_000, 50);
  try {
    const ctx = await runCLI(['context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!], env);
    assert.equal(ctx.code, 0, ctx.stderr);

    const a = await created('sb-a', { username: 'alice', password: 'a-secret' });
    assert.ok(a.events.some((e) => e.startsWith('warm start: resumed the snapshot')), a.events.join('\n'));
    const two = await standbys('two standbys once a VM resumed the snapshot', 2);
    assert.deepEqual(two.map((s) => s.snapshot), ['debian-dev@1cpu-512mib', 'debian-dev@1cpu-512mib']);
    const first = two[0]; // (the one the next VM takes: the oldest)

    const b = await created('sb-b', { username: 'bob', password: 'b-secret' });
    assert.ok(b.events.some((e) => /^warm start: took a standby resumed from the snapshot of image debian-dev, in .* own identity .* through the agent/.test(e)), b.events.join('\n'));
    assert.ok(!b.events.some((e) => e.startsWith('cold boot') || e.startsWith('warm start failed')), b.events.join('\n'));
    console.log(`create→running from a standby: ${b.seconds.toFixed(2)} s; ${b.events.find((e) => e.startsWith('warm start:'))}`);
    assert.equal(qemuPidIn(b.dir), first.pid, "sb-b runs in the standby's QEMU, its directory now the VM's");
    assert.equal(existsSync(first.dir), false);
    const seen = [];
    for (const [name, user] of [['sb-a', 'alice'], ['sb-b', 'bob']]) {
      const r = await ssh(name, 'hostname; cat /sys/class/net/eth0/address; cat /etc/machine-id; id -un');
      const [hostname, mac, machineId, whoami] = r.out.split('\n');
      assert.equal(r.user, user, "orchard ssh logged in with the VM's own username and password");
      assert.equal(whoami, user);
      assert.equal(hostname, name);
      const file = JSON.parse(readFileSync(join(name === 'sb-a' ? a.dir : b.dir, 'vm.json'), 'utf8')) as { mac: string; hostKeys: string[] };
      assert.equal(mac, file.mac);
      seen.push({ mac, machineId, hostKey: r.hostKey });
    }
    for (const k of ['mac', 'machineId', 'hostKey'] as const) assert.notEqual(seen[0][k], seen[1][k], `the two VMs differ in ${k}`);

    const next = await standbys('the standby taken to be replaced', 2);
    assert.equal(next.filter((s) => s.pid !== two[1].pid && s.pid !== first.pid).length, 1, 'a new standby in place of the one taken');

    // The worker's stop ends its standbys; its VMs run on.
    const vmPids = [qemuPidIn(a.dir), qemuPidIn(b.dir)];
    await w.worker.stop();
    for (const s of next) {
      assert.equal(alive(s.pid), false, "the worker's stop ended its standby");
      assert.equal(existsSync(s.dir), false);
    }
    assert.deepEqual([qemuPidIn(a.dir), qemuPidIn(b.dir)], vmPids, 'the VMs run on');

    // A standby whose worker did not end it (killed: here its driver's close skipped) is ended by the next start.
    // Started again, the worker makes a standby of the snapshot it last resumed, before any VM asks.
    w = await qemuWorker(c, 'standby-1', workerDir, { imagesDir: TEST_IMAGES, warmStart: true, standbys: 1 });
    const [atStart] = await standbys('a standby made at the start, of the snapshot last wanted', 1);
    assert.equal(atStart.snapshot, 'debian-dev@1cpu-512mib');
    await c.admin.deleteVM('sb-a');
    const c2 = await created('sb-c');
    assert.ok(c2.events.some((e) => e.startsWith('warm start: took a standby')), c2.events.join('\n'));
    assert.equal(qemuPidIn(c2.dir), atStart.pid, "sb-c runs in the standby made at the worker's start");
    const [left] = await standbys('a standby on the restarted worker', 1);
    w.driver.close = async () => {};
    await w.worker.stop();
    assert.ok(alive(left.pid), 'left running');
    w = await qemuWorker(c, 'standby-1', workerDir, { imagesDir: TEST_IMAGES, warmStart: true, standbys: 1 });
    await waitFor('the standby left behind to be ended', () => !alive(left.pid) && !existsSync(left.dir), 30_000, 50);
    assert.equal((await ssh('sb-c', 'hostname')).out, 'sb-c', 'the VMs run on');
  } finally {
    for (const vm of await c.admin.listVMs().catch(() => [])) await c.admin.deleteVM(vm.name).catch(() => {});
    await w.close();
    await c.close();
    c.cleanup();
  }
});
