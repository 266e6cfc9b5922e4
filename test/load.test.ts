// The load harness at a small scale, as a correctness check: 50 synthetic workers × 500 VMs against a
// controller process that is killed (-9) and restarted in the middle. Every VM is placed exactly
// once, no worker is ever overbooked, nothing acknowledged is lost, and every VM runs on exactly one
// worker — the one the controller says.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { Cluster, closedLoop, Watcher } from '../bench/load-harness.ts';

const WORKERS = 50;
const SLOTS = 10;
const VMS = WORKERS * SLOTS;

test(`${WORKERS} workers × ${VMS} VMs, controller kill -9 and restart in the middle`, async () => {
  const cluster = new Cluster();
  const watchers: Watcher[] = [];
  try {
    await cluster.startController();
    await cluster.startWorkers(WORKERS, SLOTS);
    watchers.push(new Watcher(cluster.admin));
    const half = VMS / 2;
    await closedLoop(half, 16, (i) => cluster.admin.createVM({ name: `vm-${i}`, image: 'synthetic', cpu: 1, memory: 512 }));

    // kill -9 right after the last acknowledged create; restart on the same address. (The watch
    // is ended first: its stream would otherwise fail with the connection.)
    watchers[0].stop();
    await cluster.ctl.kill('SIGKILL');
    await cluster.startController(Number(new URL(cluster.ctl.url).port));
    assert.equal((await cluster.admin.listVMs()).length, half, 'every acknowledged create survived');
    const watcher = new Watcher(cluster.admin);
    watchers.push(watcher);
    await closedLoop(half, 16, (i) => cluster.admin.createVM({ name: `vm-${half + i}`, image: 'synthetic', cpu: 1, memory: 512 }));

    await watcher.until(() => watcher.runningAt.size === VMS, 60_000, 'all VMs running').catch(async (err: Error) => {
      const counts = new Map<string, number>();
      for (const vm of await cluster.admin.listVMs()) counts.set(`${vm.status}: ${vm.status_message}`, (counts.get(`${vm.status}: ${vm.status_message}`) ?? 0) + 1);
      throw new Error(`${err.message}; seen running ${watcher.runningAt.size}; states: ${JSON.stringify([...counts])}`);
    });
    const vms = await cluster.admin.listVMs();
    assert.equal(vms.length, VMS);
    assert.ok(vms.every((vm) => vm.status === 'running' && vm.worker), 'all running and placed');
    assert.ok(vms.every((vm) => (vm.restart_count ?? 0) === 0), 'no VM was failed and restarted by the controller restart');

    // Placed exactly once: no VM was ever seen on two workers, across both controllers.
    for (const vm of vms) {
      const seen = new Set([...watchers.flatMap((w) => [...(w.workersSeen.get(vm.name) ?? [])])]);
      assert.deepEqual([...seen], [vm.worker], `${vm.name} was seen on ${[...seen].join(', ')}`);
    }
    // Never overbooked (as seen live by the watches) and exactly full at the end.
    for (const w of watchers) for (const [worker, peak] of w.peak) assert.ok(peak <= SLOTS, `${worker} peaked at ${peak} VMs`);
    const perWorker = new Map<string, number>();
    for (const vm of vms) perWorker.set(vm.worker!, (perWorker.get(vm.worker!) ?? 0) + 1);
    assert.equal(perWorker.size, WORKERS);
    assert.ok([...perWorker.values()].every((n) => n === SLOTS));

    // Each VM runs on exactly one worker host, the one the controller assigned.
    const runsOn = new Map<string, string[]>();
    for (const [i, driver] of cluster.drivers.entries()) {
      for (const local of await driver.list()) {
        if (!local.running) continue;
        const name = vms.find((vm) => vm.uid === local.uid)?.name ?? `unknown ${local.localName}`;
        runsOn.set(name, [...(runsOn.get(name) ?? []), `load-${i}`]);
      }
    }
    for (const vm of vms) assert.deepEqual(runsOn.get(vm.name), [vm.worker], `${vm.name} runs on ${runsOn.get(vm.name)}`);
    assert.equal(runsOn.size, VMS, 'no unknown VM runs anywhere');
  } finally {
    for (const w of watchers) w.stop();
    await cluster.stop();
    rmSync(cluster.dataDir, { recursive: true, force: true });
  }
});
