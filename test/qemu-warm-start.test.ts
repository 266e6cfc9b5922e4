// Warm starts on a real qemu worker (debian-dev, TCG): VMs resume from the image's snapshot and come
// up with their own identity. One worker, one image store of its own (links to the shared debian-dev
// files, so the "rebuild" below changes nothing other tests use) and one snapshot serve every case:
//  - two VMs from the same snapshot, given their identity through the template's agent (no SSH
//    login), both answer `orchard ssh` as their own user with their own
//    password, and differ from each other and from the template in hostname (= their name), SSH host
//    key (as `orchard ssh -v` sees it), MAC and machine-id; the guest clock is the host's;
//  - their QEMUs map the snapshot's memory file private: what the guests write leaves it unchanged;
//  - a snapshot whose template agent did not start gives the VM its identity over an SSH login;
//  - another CPU count's snapshot, asked for twice at once, is made once while the other waits, and a
//    VM of that shape resumes it; past 4 shapes a VM cold-boots, saying why in its events; its
//    create→running time is the cold boot the warm starts are compared with (printed; asserted only warm < cold);
//  - a warm start that fails (a state file cut in half) cold-boots the VM, with the reason in its events;
//  - a rebuilt image (its files replaced) makes the next VM make a new snapshot instead of resuming
//    the old one, after ending the template a killed maker left running (its QEMU and its pasta);
//    a deleted image leaves no usable snapshot.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { copyFileSync, existsSync, linkSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { localNameOf, type VM } from '../src/api/schemas.ts';
import { removeImage, buildDebianDev } from '../src/worker/images.ts';
import { readSnapshotMeta } from '../src/worker/drivers/snapshots.ts';
import { SHAPES_PER_IMAGE } from '../src/worker/drivers/snapshot-maker.ts';
import { ADMIN_TOKEN, alive, createdVM, heavyFile, inProcessController, ORCHARD_BIN, pastaServing, qemuWorker, runCLI, tempDir, TEST_IMAGES, waitFor } from './helpers.ts';

await heavyFile(); // boots VMs

/** The shape of the test's VMs, and of the snapshot the first makes. */
const SHAPE = { cpu: 1, memory: 512 };

const fingerprint = (blob: Buffer) => 'SHA256:' + createHash('sha256').update(blob).digest('base64').replace(/=+$/, '');

test('qemu warm start: VMs resumed from one snapshot answer orchard ssh with their own identity, faster than a cold boot; a VM of another shape gets a snapshot of its own; a rebuilt image gets a new snapshot', async (t) => {
  await buildDebianDev(TEST_IMAGES);
  // The worker's own store: hard links to the shared image's files (read, never changed in place).
  const store = tempDir('orchard-warm-images-');
  mkdirSync(join(store, 'debian-dev'));
  for (const f of readdirSync(join(TEST_IMAGES, 'debian-dev'))) {
    if (!f.endsWith('.deb')) linkSync(join(TEST_IMAGES, 'debian-dev', f), join(store, 'debian-dev', f));
  }
  const c = await inProcessController();
  const workerDir = tempDir('orchard-warm-worker-');
  let w = await qemuWorker(c, 'warm-1', workerDir, { imagesDir: store, warmStart: true });
  const env = { ORCHARD_HOME: tempDir('orchard-home-') };
  const cli = (...args: string[]) => runCLI(args, env);
  const created = (name: string, extra: Partial<VM> = {}) => createdVM(c.admin, name, extra);
  const ssh = async (name: string, command: string) => {
    const r = await cli('ssh', 'vm', name, '-v', '--wait', '10', '--', command);
    assert.equal(r.code, 0, `${name}: ${command}: ${r.stderr}`);
    const key = /host key (\S+) (SHA256:\S+)/.exec(r.stderr);
    return { out: r.stdout.trim(), hostKey: key?.[2], user: /authenticated to .* as (\S+)/.exec(r.stderr)?.[1] };
  };
  try {
    const ctx = await cli('context', 'create', c.ctl.url, '--name', 't', '--service-account-name', 'bootstrap-admin', '--service-account-token', ADMIN_TOKEN, '--trust-fingerprint', c.ctl.fingerprint!);
    assert.equal(ctx.code, 0, ctx.stderr);

    // The first VM makes the snapshot (the template boots once), then resumes it.
    const started = new Date().toISOString();
    const first = await created('warm-a', { username: 'alice', password: 'a-secret-1' });
    const meta = (await readSnapshotMeta(w.driver.snapshotDir('debian-dev', SHAPE)))!;
    assert.ok(meta && !meta.unusable && meta.created > started, `a usable snapshot, made for this VM: ${JSON.stringify(meta)}`);
    assert.equal(meta.agent, true, 'the template\'s identity agent was started before the save');
    const second = await created('warm-b', { username: 'bob', password: 'b-secret-2' });
    const template = new Set((meta.knownHosts ?? '').trim().split('\n').map((l) => fingerprint(Buffer.from(l.trim().split(/\s+/).at(-1)!, 'base64'))));
    for (const { events } of [first, second]) {
      assert.ok(events.some((e) => /^warm start: resumed the snapshot of image debian-dev in .* through the agent/.test(e)), `given its identity through the agent, with no SSH login:\n${events.join('\n')}`);
      assert.ok(!events.some((e) => e.startsWith('cold boot') || e.startsWith('warm start failed')), events.join('\n'));
    }
    console.log(`warm start (create→running through the cluster): ${second.seconds.toFixed(2)} s; ${second.events.find((e) => e.startsWith('warm start:'))}`);

    await t.test('two VMs from one snapshot: both answer orchard ssh as their own user; hostname, host key, MAC, machine-id differ from each other and from the template', async () => {
      assert.ok(template.size >= 2, 'the template\'s host keys are known');
      const seen: Record<string, string>[] = [];
      for (const [name, user] of [['warm-a', 'alice'], ['warm-b', 'bob']]) {
        const r = await ssh(name, 'hostname; cat /sys/class/net/eth0/address; cat /etc/machine-id; id -un; date +%s');
        const [hostname, mac, machineId, whoami, clock] = r.out.split('\n');
        assert.equal(r.user, user, 'orchard ssh logged in with the VM\'s own username and password');
        assert.equal(whoami, user);
        assert.equal(hostname, name, 'the hostname is the VM\'s name');
        assert.ok(r.hostKey && !template.has(r.hostKey), `${name} offers a new host key (${r.hostKey}), not the template's`);
        assert.notEqual(mac, meta.mac, 'not the template\'s MAC');
        assert.match(machineId, /^[0-9a-f]{32}$/);
        assert.ok(Math.abs(Number(clock) - Date.now() / 1000) < 30, `the guest's clock is the host's (guest ${clock})`);
        const file = JSON.parse(readFileSync(join(w.driver.vmDir(localNameOf((await c.admin.getVM(name)))), 'vm.json'), 'utf8')) as { mac: string };
        assert.equal(mac, file.mac, 'the MAC QEMU gives the NIC on a reboot too');
        seen.push({ hostname, mac, machineId, hostKey: r.hostKey });
      }
      for (const k of ['hostname', 'mac', 'machineId', 'hostKey']) assert.notEqual(seen[0][k], seen[1][k], `the two VMs differ in ${k}`);
    });

    await t.test("the VMs' memory is the snapshot's memory file mapped private: what they write never reaches it", async () => {
      const memoryFile = join(w.driver.snapshotDir('debian-dev', SHAPE), meta.memoryFile!);
      // (its modification time: a write through a shared mapping sets it; reading 512 MiB of holes to
      // compare contents takes seconds here)
      const written = () => { const st = statSync(memoryFile); return { mtime: st.mtimeMs, blocks: st.blocks }; };
      const before = written();
      for (const name of ['warm-a', 'warm-b']) {
        const { pid } = JSON.parse(readFileSync(join(w.driver.vmDir(localNameOf(await c.admin.getVM(name))), 'vm.json'), 'utf8')) as { pid: number };
        const mapping = readFileSync(`/proc/${pid}/maps`, 'utf8').split('\n').find((l) => l.includes(`/${meta.memoryFile} (deleted)`));
        assert.match(mapping ?? '', /^\S+ rw-p /, `${name}'s QEMU maps the memory file it was given (a link, unlinked once loaded) private:\n${mapping}`);
        // 8 MiB of the guest's memory written (a tmpfs file), not with zeros (the file's holes read as zeros)
        await ssh(name, 'head -c 8388608 /dev/urandom > /dev/shm/fill');
      }
      assert.deepEqual(written(), before, 'the snapshot\'s memory file is unchanged');
    });

    await t.test('a snapshot whose template agent did not start: the VM gets its identity over an SSH login instead, and answers orchard ssh as its own user', async () => {
      // What the snapshot maker writes when the agent cannot be started in the template (agent: false).
      const metaFile = join(w.driver.snapshotDir('debian-dev', SHAPE), 'snapshot.json');
      const saved = readFileSync(metaFile, 'utf8');
      writeFileSync(metaFile, JSON.stringify({ ...meta, agent: false }));
      try {
        const fallback = await created('warm-ssh', { username: 'carol', password: 'c-secret-3' });
        assert.ok(fallback.events.some((e) => /^warm start: resumed the snapshot of image debian-dev in .*, SSH [\d.]+s, own identity/.test(e)), `given its identity over SSH:\n${fallback.events.join('\n')}`);
        const r = await ssh('warm-ssh', 'hostname; id -un');
        assert.equal(r.user, 'carol');
        assert.deepEqual(r.out.split('\n'), ['warm-ssh', 'carol']);
        assert.ok(r.hostKey && !template.has(r.hostKey), `a new host key (${r.hostKey}), not the template's`);
      } finally {
        writeFileSync(metaFile, saved);
        await c.admin.deleteVM('warm-ssh').catch(() => {});
      }
    });

    await t.test(`another shape's snapshot, asked for twice at once, is made once while the other waits; a VM of that shape resumes it; past ${SHAPES_PER_IMAGE} shapes VMs cold-boot, with the reason in their events; a warm start beats that cold boot`, async () => {
      // Two asks in the same turn, as two VMs prepared together: before, both found none, both made
      // one, and the second's rename replaced the directory the first's VM was linking from (CI).
      const lines: string[][] = [[], []];
      const made = await Promise.all(lines.map((l) => w.driver.snapshot('debian-dev', { cpu: 2, memory: 512 }, (m) => l.push(m))));
      const said = lines.map((l) => l.join('\n')).join('\n\n');
      assert.equal(lines.filter((l) => l.includes('snapshot of image debian-dev: booting the template')).length, 1, `one template booted for the two:\n${said}`);
      assert.equal(lines.filter((l) => l.includes('waiting for the snapshot of image debian-dev being made on this worker')).length, 1, said);
      assert.equal(made[0].created, made[1].created, 'both got the same snapshot');
      const two = await created('shape-2', { cpu: 2 });
      assert.ok(two.events.some((e) => e.startsWith('warm start: resumed')), two.events.join('\n'));
      assert.equal((await ssh('shape-2', 'grep -c ^processor /proc/cpuinfo; hostname')).out, '2\nshape-2');
      assert.equal((await readSnapshotMeta(w.driver.snapshotDir('debian-dev', { cpu: 2, memory: 512 })))?.cpu, 2);
      assert.equal((await readSnapshotMeta(w.driver.snapshotDir('debian-dev', SHAPE)))?.created, meta.created, "the first shape's snapshot stays");
      await c.admin.deleteVM('shape-2');
      // Two more shapes' snapshots (their records, as if made): a fifth shape cold-boots.
      const more = [640, 768].map((memory) => w.driver.snapshotDir('debian-dev', { cpu: 1, memory }));
      for (const [i, dir] of more.entries()) {
        mkdirSync(dir);
        writeFileSync(join(dir, 'snapshot.json'), JSON.stringify({ ...meta, memory: 640 + i * 128 }));
      }
      try {
        const cold = await created('cold-c', { memory: 896 });
        assert.ok(cold.events.some((e) => e.startsWith('cold boot: image debian-dev has snapshots for 4 other shapes of VM on this worker, the most it keeps (1cpu-512mib, 1cpu-640mib, 1cpu-768mib, 2cpu-512mib); this VM asks for 1 CPU and 896 MiB')), cold.events.join('\n'));
        assert.equal((await ssh('cold-c', 'hostname')).out, 'orchard-vm', 'booted from the image as it is (no cloud-init in debian-dev)');
        console.log(`cold boot ${cold.seconds.toFixed(2)} s vs warm start ${second.seconds.toFixed(2)} s (${(cold.seconds / second.seconds).toFixed(1)}×)`);
        assert.ok(second.seconds < cold.seconds, `warm ${second.seconds} s < cold ${cold.seconds} s`);
        await c.admin.deleteVM('cold-c');
      } finally {
        for (const dir of more) rmSync(dir, { recursive: true, force: true });
      }
    });

    await t.test('a warm start that fails (a state QEMU cannot load) kills that QEMU and cold-boots the VM, saying why', async () => {
      const state = join(w.driver.snapshotDir('debian-dev', SHAPE), 'snapshot.state');
      const bytes = readFileSync(state);
      writeFileSync(`${state}.cut`, bytes.subarray(0, bytes.length >> 1));
      renameSync(`${state}.cut`, state);
      const broken = await created('warm-broken');
      assert.ok(broken.events.some((e) => /^warm start failed \(QEMU exited while loading the snapshot.*\): cold boot instead$/s.test(e)), broken.events.join('\n'));
      assert.equal((await ssh('warm-broken', 'hostname')).out, 'orchard-vm', 'booted from the image');
      await c.admin.deleteVM('warm-broken');
    });

    await t.test('a rebuilt image gets a new snapshot, and a template abandoned by a killed maker is ended first, its pasta too; the snapshot of a deleted image is removed when the worker starts again, and its VM runs on', async () => {
      // A maker killed while its template boots: `orchard image snapshot` on the worker's data dir,
      // from copies of the image's files (so it has no snapshot yet), killed once the template runs
      // with its network. Its QEMU and its pasta outlive it, detached like every VM's.
      mkdirSync(join(workerDir, 'images', 'debian-dev'), { recursive: true });
      for (const f of readdirSync(join(store, 'debian-dev'))) copyFileSync(join(store, 'debian-dev', f), join(workerDir, 'images', 'debian-dev', f));
      const maker = spawn(ORCHARD_BIN, ['image', 'snapshot', 'debian-dev', '--data-dir', workerDir], { stdio: 'ignore' });
      const snapshots = join(workerDir, 'snapshots');
      const abandoned = await waitFor("the killed maker's template to run with its network", () => {
        const dir = readdirSync(snapshots).find((e) => e.startsWith(`.make-debian-dev@1cpu-512mib-${maker.pid}-`));
        if (!dir || !existsSync(join(snapshots, dir, 'qemu.pid'))) return undefined;
        const qemu = Number(readFileSync(join(snapshots, dir, 'qemu.pid'), 'utf8'));
        const pasta = qemu ? pastaServing(qemu) : undefined;
        return pasta ? { dir: join(snapshots, dir), qemu, pasta } : undefined;
      }, 60_000, 50).finally(() => maker.kill('SIGKILL'));
      if (maker.exitCode === null && maker.signalCode === null) await once(maker, 'exit');
      assert.ok(alive(abandoned.qemu) && alive(abandoned.pasta), 'the template outlives its maker');

      // What a rebuild does to the store: new files in place of the old (VMs keep their links).
      const base = join(store, 'debian-dev', 'base.qcow2');
      copyFileSync(base, `${base}.new`);
      renameSync(`${base}.new`, base);
      const after = await created('warm-d');
      assert.equal(alive(abandoned.qemu), false, "the abandoned template's QEMU was killed");
      assert.equal(alive(abandoned.pasta), false, "the abandoned template's pasta was killed");
      assert.equal(existsSync(abandoned.dir), false, "the abandoned template's directory was removed");
      assert.ok(after.events.some((e) => e.startsWith('warm start: resumed')), after.events.join('\n'));
      const remade = (await readSnapshotMeta(w.driver.snapshotDir('debian-dev', SHAPE)))!;
      assert.notEqual(remade.created, meta.created);
      assert.equal((await ssh('warm-d', 'hostname')).out, 'warm-d');
      await removeImage(store, 'debian-dev');
      await assert.rejects(w.driver.snapshot('debian-dev', SHAPE), /image "debian-dev" is not on this worker/);
      // The worker started again removes the snapshot of the deleted image (it held the image's
      // disk); the VM resumed from it runs on, adopted: its files are links of its own.
      await w.worker.stop();
      w = await qemuWorker(c, 'warm-1', workerDir, { imagesDir: store, warmStart: true });
      // (renamed away, then removed)
      await waitFor('the snapshot of the deleted image to be removed', () => readdirSync(join(workerDir, 'snapshots')).length === 0 || undefined, 10_000);
      assert.equal((await ssh('warm-d', 'hostname')).out, 'warm-d');
    });
  } finally {
    for (const vm of await c.admin.listVMs().catch(() => [])) await c.admin.deleteVM(vm.name).catch(() => {});
    await w.close();
    await c.close();
    c.cleanup();
    for (const d of [store, workerDir, env.ORCHARD_HOME]) rmSync(d, { recursive: true, force: true });
  }
});
