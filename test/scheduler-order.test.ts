// The scheduler's worker index (src/controller/worker-order.ts) against a plain reference: each pass
// must place every waiting VM where a scan of all the workers, sorted afresh, would (capacity, extra
// resources, labels, paused, offline and deleted workers, both profiles, locality), and fail the VMs
// of offline and deleted workers, through many rounds of changes the index has to follow; a round
// that only adds VMs has the pass look at those alone, and they too go where the scan says.
import { test, mock } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { pino } from 'pino';
import { RESOURCE_TART_VMS, type VM, type Worker } from '../src/api/schemas.ts';
import { requirements } from '../src/api/resources.ts';
import { newVM } from '../src/controller/domain/vms.ts';
import { ClusterView } from '../src/controller/view.ts';
import { Scheduler } from '../src/controller/scheduler.ts';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import { tempDir } from './helpers.ts';

const OFFLINE_MS = 60_000;
const GPU = 'example.com/gpu';

/** A small seeded generator (mulberry32): the same rounds on every run. */
function random(seed: number) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Where the reference puts each waiting VM: every worker checked and sorted again for each VM. */
function reference(view: ClusterView, online: (w: Worker) => boolean, distribute: boolean): Map<string, string | undefined> {
  const used = new Map([...view.usage].map(([w, u]) => [w, { ...u }]));
  const load = (w: Worker) => used.get(w.name)?.[RESOURCE_TART_VMS] ?? 0;
  const free = (w: Worker) => (w.resources?.[RESOURCE_TART_VMS] === undefined ? Infinity : w.resources[RESOURCE_TART_VMS] - load(w));
  const fits = (vm: VM, w: Worker) =>
    Object.entries(vm.labels ?? {}).every(([k, v]) => w.labels?.[k] === v) &&
    Object.entries(requirements(vm)).every(([k, v]) => (k === RESOURCE_TART_VMS && w.resources?.[k] === undefined) || (w.resources?.[k] ?? 0) - (used.get(w.name)?.[k] ?? 0) >= v);
  const placed = new Map<string, string | undefined>();
  for (const name of view.unplaced) {
    const vm = view.vms.get(name)!;
    const ok = [...view.workers.values()]
      .filter((w) => online(w) && !w.scheduling_paused && free(w) > 0 && fits(vm, w))
      .sort((a, b) => (load(a) !== load(b) ? (distribute ? load(a) - load(b) : load(b) - load(a)) : a.name < b.name ? -1 : 1));
    const best = ok.find((w) => load(w) === load(ok[0]) && w.images?.includes(vm.image!)) ?? ok[0];
    placed.set(name, best?.name);
    if (!best) continue;
    const u = used.get(best.name) ?? {};
    used.set(best.name, u);
    for (const [k, v] of Object.entries(requirements(vm))) u[k] = (u[k] ?? 0) + v;
  }
  return placed;
}

test('the worker index places as a scan of all workers would, through 30 rounds of changes (capacity, labels, paused, offline, deleted, profiles)', async (t) => {
  mock.timers.enable({ apis: ['Date'], now: Date.now() });
  t.after(() => mock.timers.reset());
  const dir = tempDir('orchard-order-');
  const store = new SQLiteStore(join(dir, 'orchard.db'));
  const view = new ClusterView(store);
  const connected = new Set<string>();
  const scheduler = new Scheduler(store, view, pino({ level: 'silent' }), { offlineTimeoutMs: OFFLINE_MS, isConnected: (w) => connected.has(w) });
  t.after(async () => {
    await scheduler.stop();
    view.close();
    store.close();
  });
  await view.loaded;
  const rnd = random(17);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(rnd() * xs.length)];
  const iso = (ms: number) => new Date(Date.now() + ms).toISOString();
  let nextWorker = 0;
  let nextVM = 0;
  const newWorker = () => {
    const name = `w-${nextWorker++}`;
    const resources: Record<string, number> = {};
    if (rnd() > 0.1) resources[RESOURCE_TART_VMS] = Math.floor(rnd() * 5); // some count no slots
    if (rnd() > 0.7) resources[GPU] = 1 + Math.floor(rnd() * 2);
    return store.create('workers', {
      name,
      resources,
      labels: { rack: pick(['a', 'b']) },
      scheduling_paused: rnd() < 0.15,
      images: rnd() < 0.3 ? ['img-1'] : [],
      last_seen: iso(0),
    } as Worker);
  };
  const connect = (name: string, up: boolean) => {
    if (up) connected.add(name);
    else connected.delete(name);
    scheduler.workerConnection(name);
  };
  for (let i = 0; i < 40; i++) connect((await newWorker()).name, rnd() < 0.8);
  let placedSoFar = 0;
  let failedOffline = 0;
  for (let round = 0; round < 30; round++) {
    // Changes the index must follow, committed before the pass.
    const writes: Promise<unknown>[] = [];
    const names = [...view.workers.keys()];
    // Every third round only adds VMs, at the same moment: nothing a waiting VM's fit depends on
    // changed, so the pass looks only at the new ones, and must place them as a full look would.
    const vmsOnly = round % 3 === 2;
    if (vmsOnly) await scheduler.pass(); // (its own look at the last round's placements)
    for (let i = 0; i < (vmsOnly ? 0 : 6); i++) {
      const name = pick(names);
      const what = rnd();
      if (what < 0.2) writes.push(store.update('workers', name, (w) => ({ ...w, scheduling_paused: !w.scheduling_paused })));
      else if (what < 0.35) writes.push(store.update('workers', name, (w) => ({ ...w, labels: { rack: pick(['a', 'b', 'c']) } })));
      else if (what < 0.5) writes.push(store.update('workers', name, (w) => ({ ...w, resources: { ...w.resources, [RESOURCE_TART_VMS]: Math.floor(rnd() * 6) } })));
      // Disconnected: seen long ago (offline once the time below passes) or just now (online for a while).
      else if (what < 0.65) {
        const seen = rnd() < 0.5 ? iso(-10 * OFFLINE_MS) : iso(OFFLINE_MS);
        writes.push(store.update('workers', name, (w) => ({ ...w, last_seen: seen })).then(() => connect(name, false)));
      } else if (what < 0.8) connect(name, true);
      else if (what < 0.85 && names.length > 20) writes.push(store.delete('workers', name));
      else writes.push(newWorker().then((w) => connect(w.name, rnd() < 0.7)));
    }
    const running = [...view.vms.values()].filter((v) => v.worker && v.status !== 'failed');
    for (let i = 0; i < (vmsOnly ? 0 : 3) && running.length; i++) writes.push(store.delete('vms', pick(running).name));
    for (let i = 0; i < 8; i++) {
      const resources = rnd() < 0.2 ? { [GPU]: 1 } : undefined;
      const labels = rnd() < 0.3 ? { rack: pick(['a', 'b']) } : undefined;
      writes.push(store.create('vms', newVM({ name: `vm-${nextVM++}`, image: pick(['img-1', 'img-2']), os: 'linux', resources, labels } as VM)));
    }
    if (round % 10 === 9 && !vmsOnly) {
      const s = await store.getClusterSettings();
      writes.push(store.putClusterSettings({ ...s, schedulerProfile: s.schedulerProfile === 'distribute-load' ? 'optimize-utilization' : 'distribute-load' }));
    }
    // (A change may meet a worker deleted in the same round: it is refused, as it would be by the API.)
    await Promise.all(writes.map((w) => w.catch(() => {})));
    // Time passes in a third of the rounds: in the others a pass knows what changed from the changes alone.
    if (round % 3 === 0) mock.timers.tick(2 * OFFLINE_MS);

    const now = Date.now();
    const online = (w: Worker) => connected.has(w.name) || now - Date.parse(w.last_seen!) <= OFFLINE_MS;
    const distribute = (await store.getClusterSettings()).schedulerProfile === 'distribute-load';
    const expected = reference(view, online, distribute);
    const shouldFail = [...view.vms.values()].filter((v) => v.worker && v.status !== 'failed' && (!view.workers.has(v.worker) || !online(view.workers.get(v.worker)!)));
    await scheduler.pass();
    for (const [name, worker] of expected) assert.equal(view.vms.get(name)?.worker, worker, `round ${round}: ${name}`);
    for (const vm of shouldFail) assert.equal(view.vms.get(vm.name)?.status, 'failed', `round ${round}: ${vm.name} on ${vm.worker} fails`);
    placedSoFar += [...expected.values()].filter(Boolean).length;
    failedOffline += shouldFail.length;
  }
  // The rounds covered the cases: many VMs placed, some left waiting, some failed with their worker.
  assert.ok(placedSoFar > 100, `placed ${placedSoFar}`);
  assert.ok(view.unplaced.size > 0, 'some VMs wait');
  assert.ok(failedOffline > 5, `failed ${failedOffline}`);
});
