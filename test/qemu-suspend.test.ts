// powerState suspended on a real qemu worker (debian-dev guest, through the real CLI): suspend keeps
// the guest, resume continues it. A process started before the suspend runs after it with the same
// PID, the guest's boot_id is unchanged (no reboot), and while suspended QEMU says paused, uses no
// CPU, and the guest's clock stands still. Then the worker restarts while the VM is suspended: the new
// worker adopts it as suspended (not booted again, not failed), and resuming still continues it.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { localNameOf } from '../src/api/schemas.ts';
import { QmpClient } from '../src/worker/drivers/qmp.ts';
import { ADMIN_TOKEN, heavyFile, qemuCluster, qemuWorker, runCLI, tempDir, TEST_IMAGES } from './helpers.ts';

await heavyFile(); // boots VMs

/** CPU seconds (user + system) a process has used. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

test('qemu: suspend keeps the guest running where it was (same process, same boot), frees its CPU; a restarted worker adopts it suspended and resumes it', async () => {
  const t0 = Date.now();
  const q = await qemuCluster();
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const cli = (...args: string[]) => runCLI(args, env);
  let second: Awaited<ReturnType<typeof qemuWorker>> | undefined;
  try {
    const ctx = await cli('context', 'create', q.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', q.ctl.fingerprint!);
    assert.equal(ctx.code, 0, ctx.stderr);
    const vm = await q.runningVM('s', { suspendable: true });
    const localName = localNameOf(vm);
    const dir = q.driver.vmDir(localName);
    const qemuPid = Number(readFileSync(join(dir, 'qemu.pid'), 'utf8'));
    const guest = async (command: string) => {
      // (the command goes to the guest's shell as one string)
      const r = await cli('ssh', 'vm', 's', '--wait', '10', '--', command);
      assert.equal(r.code, 0, `${command}: ${r.stderr}`);
      return r.stdout.trim();
    };
    const qmpStatus = async () => {
      const qmp = await QmpClient.connect(join(dir, 'qmp.sock'));
      try {
        return ((await qmp.execute('query-status')) as { status: string }).status;
      } finally {
        qmp.close();
      }
    };
    /** The guest's uptime in seconds, and the host's clock when it was read. */
    const uptime = async () => ({ guest: Number((await guest('cat /proc/uptime')).split(/\s+/)[0]), host: Date.now() / 1000 });

    // A process started before the suspend, and the guest's identity of this boot.
    const pid = await guest('sleep 100000 >/dev/null 2>&1 </dev/null & echo $!');
    assert.match(pid, /^\d+$/);
    assert.match(await guest(`cat /proc/${pid}/cmdline | tr "\\0" " "`), /^sleep 100000$/, 'it runs');
    const bootId = await guest('cat /proc/sys/kernel/random/boot_id');
    const before = await uptime();

    const t1 = Date.now();
    const suspend = await cli('suspend', 'vm', 's');
    assert.equal(suspend.code, 0, suspend.stderr);
    const suspendSeconds = (Date.now() - t1) / 1000;
    let got = await q.admin.getVM('s');
    assert.equal(got.status, 'pending');
    assert.match(got.status_message!, /^suspended \(powerState suspended\): its memory and disk are kept/);
    assert.match((await cli('list', 'vms')).stdout, /^s\s.*\ssuspended\s/m);
    assert.equal(await qmpStatus(), 'paused', 'QEMU paused the vCPUs');
    assert.equal(Number(readFileSync(join(dir, 'qemu.pid'), 'utf8')), qemuPid, 'the same QEMU holds the guest');
    const cpu0 = cpuSeconds(qemuPid);
    await sleep(3000);
    const idle = cpuSeconds(qemuPid) - cpu0;
    assert.ok(idle < 0.1, `a suspended VM uses no CPU (QEMU used ${idle} s in 3 s)`);
    assert.deepEqual((await q.driver.list()).map((l) => [l.localName, l.running, l.suspended]), [[localName, true, true]]);

    // The worker restarts while the VM is suspended: the new one adopts it as it is.
    await q.worker.stop();
    second = await qemuWorker(q, q.workerName, q.workerDir, { imagesDir: TEST_IMAGES });
    await sleep(3000); // its first sync is long over
    got = await q.admin.getVM('s');
    assert.equal(got.status, 'pending', got.status_message);
    assert.match(got.status_message!, /^suspended/);
    assert.equal(await qmpStatus(), 'paused', 'still paused after the worker restart');
    assert.equal(Number(readFileSync(join(dir, 'qemu.pid'), 'utf8')), qemuPid);

    const t2 = Date.now();
    const start = await cli('start', 'vm', 's');
    assert.equal(start.code, 0, start.stderr);
    const resumeSeconds = (Date.now() - t2) / 1000;
    assert.equal((await q.admin.getVM('s')).status, 'running');
    assert.equal(await qmpStatus(), 'running');
    assert.match(await guest(`cat /proc/${pid}/cmdline | tr "\\0" " "`), /^sleep 100000$/, 'the process started before the suspend still runs');
    assert.equal(await guest('cat /proc/sys/kernel/random/boot_id'), bootId, 'the same boot: not rebooted');
    const after = await uptime();
    // The guest's clock stood still while it was suspended: its uptime grew by clearly less than the host's time.
    const hostGap = after.host - before.host;
    const guestGap = after.guest - before.guest;
    assert.ok(guestGap > 0 && guestGap < hostGap - 4, `guest uptime grew ${guestGap.toFixed(1)} s over ${hostGap.toFixed(1)} s of host time`);

    const events = (await q.admin.listEvents('s')).events.map((e) => e.payload);
    assert.equal(events.filter((e) => e === 'booting').length, 1, `booted once only:\n${events.join('\n')}`);
    assert.ok(events.includes('resumed: the VM continues where it was suspended'), events.join('\n'));
    assert.ok(!events.some((e) => /^failed/.test(e)), events.join('\n'));
    console.log(`suspend ${suspendSeconds.toFixed(1)} s, resume ${resumeSeconds.toFixed(1)} s (CLI round trips), guest clock +${guestGap.toFixed(1)} s over ${hostGap.toFixed(1)} s, whole test ${((Date.now() - t0) / 1000).toFixed(0)} s`);
  } finally {
    await second?.close();
    await q.close();
  }
});
