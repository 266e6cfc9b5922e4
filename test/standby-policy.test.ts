// Which standbys a worker keeps (src/worker/drivers/standby.ts), with a host that makes them at once
// (no QEMU: what a standby is and how a VM takes one is test/qemu-standby.test.ts's):
//  - up to `max` in all, made one after the other, of the snapshot a VM last resumed;
//  - a snapshot newly wanted gets one, the least recently wanted snapshot's making room, and the
//    others keep theirs;
//  - a VM takes the oldest standby of its snapshot as it was made; a stale one (the snapshot made
//    again since) is removed, not taken;
//  - one whose QEMU ended (its agent's connection closed) is removed;
//  - none with max 0, and none made after close, which removes them all;
//  - the snapshots wanted are kept in a file: the next start makes their standbys (those still there).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { PassThrough } from 'node:stream';
import { pino } from 'pino';
import { Standbys, type StandbyHost } from '../src/worker/drivers/standby.ts';
import { tempDir, waitFor } from './helpers.ts';

function standbys(max: number, wantedFile = join(tempDir('orchard-standby-wanted-'), 'standbys.json')) {
  const created = new Map<string, string>(); // snapshot -> its `created`
  const made: string[] = [];
  const forgotten: string[] = [];
  const agents: PassThrough[] = [];
  const host: StandbyHost = {
    vmsDir: tempDir('orchard-standby-policy-'),
    log: pino({ level: 'silent' }),
    prepare: async (vm) => {
      const snapshot = `${vm.image}@${vm.cpu}cpu-${vm.memory}mib`;
      made.push(snapshot);
      return { snapshot, created: created.get(snapshot) ?? 'c1' };
    },
    start: async () => {},
    load: async () => {
      const agent = new PassThrough();
      agents.push(agent);
      return agent;
    },
    warmUp: async () => {},
    pause: async () => {},
    forget: (localName) => void forgotten.push(localName),
  };
  const s = new Standbys(host, max, wantedFile);
  const shape = (image: string, memory = 512) => ({ vm: { image, cpu: 1, memory }, snapshot: `${image}@1cpu-${memory}mib` });
  const ready = () => s.list().map((r) => r.snapshot);
  const settle = (want: string[]) => waitFor(`standbys ${want.join(', ')}`, () => JSON.stringify(ready()) === JSON.stringify(want) || undefined, 5000, 5);
  return { s, shape, ready, settle, made, forgotten, created, agents };
}

test('standbys: up to max in all, of the snapshot last resumed; a newly wanted snapshot gets one, the least recently wanted making room', async () => {
  const { s, shape, settle, made } = standbys(3);
  const a = shape('a');
  const b = shape('b');
  const c = shape('c');
  s.fill(a.vm, a.snapshot);
  await settle([a.snapshot, a.snapshot, a.snapshot]);
  assert.equal(made.length, 3, 'three made, one after the other, then no more');
  s.fill(b.vm, b.snapshot);
  await settle([a.snapshot, a.snapshot, b.snapshot]);
  s.fill(c.vm, c.snapshot);
  await settle([a.snapshot, b.snapshot, c.snapshot]);
  // a wanted again: its standby goes last in line, and b (now the least recently wanted) makes room for none (a has one)
  s.fill(a.vm, a.snapshot);
  await settle([b.snapshot, c.snapshot, a.snapshot]);
  assert.equal(made.length, 5);
  await s.close();
});

test('standbys: a VM takes the oldest of its snapshot; a stale one is removed, not taken; the one taken is replaced when its VM runs', async () => {
  const { s, shape, settle, ready, created } = standbys(2);
  const a = shape('a');
  s.fill(a.vm, a.snapshot);
  await settle([a.snapshot, a.snapshot]);
  const [oldest] = s.list();
  assert.equal(s.take('b@1cpu-512mib', 'c1'), undefined, 'none of another snapshot');
  const taken = s.take(a.snapshot, 'c1');
  assert.equal(taken?.dir, oldest.dir);
  s.taken(taken!.localName);
  assert.equal(s.dirOf(taken!.localName), undefined, "the taken standby's directory is the VM's now");
  assert.deepEqual(ready(), [a.snapshot]);
  s.fill(a.vm, a.snapshot); // (its VM runs)
  await settle([a.snapshot, a.snapshot]);
  // the snapshot made again: its standbys are stale
  created.set(a.snapshot, 'c2');
  assert.equal(s.take(a.snapshot, 'c2'), undefined, 'a standby of the old snapshot is not taken');
  assert.deepEqual(ready(), [], 'and is removed');
  await s.close();
});

test("standbys: one whose QEMU ended (its agent's connection closed) is removed; the next VM's resume makes another", async () => {
  const { s, shape, settle, made, agents, forgotten } = standbys(1);
  const a = shape('a');
  s.fill(a.vm, a.snapshot);
  await settle([a.snapshot]);
  agents[0].destroy();
  await waitFor('the dead standby removed', () => forgotten.length === 1 || undefined, 5000, 5);
  s.fill(a.vm, a.snapshot);
  await settle([a.snapshot]);
  assert.equal(made.length, 2);
  assert.equal(s.take(a.snapshot, 'c1')?.agent, agents[1]);
  await s.close();
});

test('standbys: none with max 0; none made after close, which removes those ready', async () => {
  const none = standbys(0);
  none.s.fill(none.shape('a').vm, none.shape('a').snapshot);
  await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(none.made, []);
  const { s, shape, settle, made, forgotten } = standbys(1);
  s.fill(shape('a').vm, shape('a').snapshot);
  await settle([shape('a').snapshot]);
  const before = forgotten.length;
  await s.close();
  assert.deepEqual(s.list(), []);
  assert.equal(forgotten.length, before + 1, 'the driver forgets the standby removed');
  s.fill(shape('b').vm, shape('b').snapshot);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(made.length, 1);
});

test('standbys: the snapshots wanted outlive the worker: the next start makes standbys of the last one still there', async () => {
  const file = join(tempDir('orchard-standby-wanted-'), 'standbys.json');
  const before = standbys(2, file);
  const [a, b, c] = [before.shape('a'), before.shape('b'), before.shape('c')];
  before.s.fill(a.vm, a.snapshot);
  await before.settle([a.snapshot, a.snapshot]);
  before.s.fill(b.vm, b.snapshot);
  await before.settle([a.snapshot, b.snapshot]);
  before.s.fill(c.vm, c.snapshot);
  await before.settle([b.snapshot, c.snapshot]);
  await before.s.close();

  // c's snapshot is gone meanwhile: b is the last wanted one still there
  const after = standbys(2, file);
  await after.s.restore(async (snapshot) => snapshot !== c.snapshot);
  await after.settle([b.snapshot, b.snapshot]);
  assert.deepEqual(after.made, [b.snapshot, b.snapshot], 'made as the vm before made them: image and shape kept');
  // and the order kept: a VM of a now makes a standby of a, b's older one making room
  after.s.fill(a.vm, a.snapshot);
  await after.settle([b.snapshot, a.snapshot]);
  await after.s.restore(async () => true); // (once per start)
  await after.s.close();

  // a file that is not what fill writes is ignored
  writeFileSync(file, '{"not": "a list"}');
  const garbled = standbys(2, file);
  await garbled.s.restore(async () => true);
  await new Promise((r) => setTimeout(r, 50));
  assert.deepEqual(garbled.ready(), []);
  await garbled.s.close();
});
