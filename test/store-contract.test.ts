// The store contract: what any Store implementation (src/controller/store/store.ts) must do, as one
// suite that takes a factory. Run here against the SQLite store; another backend (PostgreSQL) runs the
// same suite with its own factory. Each test gets a new, empty store.
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import type { Event, ServiceAccount, StoredRegistry, VM, Worker } from '../src/api/schemas.ts';
import { ConflictError, NotFoundError, type Change, type EventAppend, type Store } from '../src/controller/store/store.ts';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import { DEFAULT_LIMITS } from '../src/controller/limits.ts';
import { tempDir } from './helpers.ts';

export interface ContractOptions {
  /** How many events per VM the factory's stores keep (retention). */
  eventsPerVM: number;
}

const vm = (name: string, extra: Partial<VM> = {}): VM => ({ name, uid: `uid-${name}`, image: 'debian', status: 'pending', ...extra }) as VM;
const worker = (name: string, extra: Partial<Worker> = {}): Worker => ({ name, resources: {}, labels: {}, ...extra });
const account = (name: string): ServiceAccount => ({ name, token: `token-${name}`, roles: ['compute:read'] });
const registry = (name: string): StoredRegistry => ({ name, username: 'puller', password: `secret-${name}`, ca: '-----BEGIN CERTIFICATE-----\n...', createdAt: '2026-01-01T00:00:00Z' });
const event = (i: number): Event => ({ kind: 'log', timestamp: i, payload: `event ${i}` });

/** Every change the store publishes, as it publishes it. */
function record(store: Store): { changes: Change[]; stop: () => void } {
  const changes: Change[] = [];
  const stop = store.subscribe((c) => changes.push(c));
  return { changes, stop };
}

/** Lets the store commit what was written in this turn (group commit): one macrotask turn and then some. */
const settle = () => new Promise((r) => setTimeout(r, 20));

export function storeContract(name: string, factory: () => Promise<Store>, opts: ContractOptions) {
  const withStore = (title: string, fn: (store: Store) => Promise<void>) =>
    test(title, async () => {
      const store = await factory();
      try {
        await fn(store);
      } finally {
        store.close();
      }
    });

  describe(`store contract: ${name}`, () => {
    withStore('create, get, put, update, delete of each kind; a missing object is undefined, not an error', async (store) => {
      for (const [kind, make] of [
        ['vms', vm],
        ['workers', worker],
        ['serviceAccounts', account],
        ['registries', registry],
      ] as const) {
        assert.equal(await store.get(kind, 'a'), undefined);
        const a = make('a');
        assert.deepEqual(await store.create(kind, a as never), a);
        assert.deepEqual(await store.get(kind, 'a'), a);
        const updated = await store.update(kind, 'a', (cur) => ({ ...cur, labels: { x: '1' } }) as never);
        assert.deepEqual((updated as { labels?: object }).labels, { x: '1' });
        assert.deepEqual(await store.get(kind, 'a'), updated);
        const replaced = { ...make('a'), labels: { y: '2' } };
        await store.put(kind, replaced as never);
        assert.deepEqual(await store.get(kind, 'a'), replaced);
        const b = make('b');
        await store.put(kind, b as never); // put of a new name creates it
        assert.deepEqual(await store.get(kind, 'b'), b);
        assert.deepEqual(await store.delete(kind, 'a'), replaced);
        assert.equal(await store.get(kind, 'a'), undefined);
        assert.deepEqual(await store.list(kind), [b]);
      }
    });

    withStore('registry credentials: kept whole (the password too), in the feed as their own kind, their host names apart from other kinds', async (store) => {
      const { changes } = record(store);
      await store.create('workers', worker('ghcr.io'));
      await store.create('registries', registry('ghcr.io'));
      await assert.rejects(store.create('registries', registry('ghcr.io')), ConflictError);
      await store.update('registries', 'ghcr.io', (r) => ({ ...r, password: 'rotated' }));
      assert.equal((await store.get('registries', 'ghcr.io'))?.password, 'rotated');
      await store.delete('registries', 'ghcr.io');
      await settle();
      assert.deepEqual(
        changes.map((c) => [c.kind, c.type, c.object.name]),
        [
          ['workers', 'ADDED', 'ghcr.io'],
          ['registries', 'ADDED', 'ghcr.io'],
          ['registries', 'MODIFIED', 'ghcr.io'],
          ['registries', 'DELETED', 'ghcr.io'],
        ],
      );
      assert.deepEqual(await store.list('registries'), []);
      assert.equal((await store.list('workers')).length, 1, 'a worker of the same name is another object');
      await assert.rejects(store.delete('registries', 'ghcr.io'), /registry "ghcr.io" not found/);
    });

    withStore('conflicts and missing objects: create of a taken name, update and delete of a missing one', async (store) => {
      await store.create('vms', vm('a'));
      await assert.rejects(store.create('vms', vm('a', { image: 'other' })), ConflictError);
      assert.equal((await store.get('vms', 'a'))?.image, 'debian');
      await assert.rejects(
        store.update('vms', 'missing', (v) => v),
        NotFoundError,
      );
      await assert.rejects(store.delete('workers', 'missing'), NotFoundError);
      // The same name in another kind is another object.
      await store.create('workers', worker('a'));
      assert.equal((await store.list('workers')).length, 1);
    });

    withStore('update: returning the same object writes and publishes nothing; a throwing mutate changes nothing', async (store) => {
      await store.create('vms', vm('a'));
      await settle();
      const { changes } = record(store);
      const same = await store.update('vms', 'a', (v) => v);
      assert.equal(same.name, 'a');
      await assert.rejects(
        store.update('vms', 'a', () => {
          throw new Error('no');
        }),
        /no/,
      );
      await settle();
      assert.deepEqual(changes, []);
      assert.equal((await store.get('vms', 'a'))?.status, 'pending');
    });

    withStore('list and snapshot are in creation order (an update does not move an object); the worker filter', async (store) => {
      for (const n of ['c', 'a', 'b']) await store.create('vms', vm(n, { worker: n === 'b' ? 'w2' : 'w1' }));
      await store.update('vms', 'c', (v) => ({ ...v, status: 'running' }));
      assert.deepEqual((await store.list('vms')).map((v) => v.name), ['c', 'a', 'b']);
      assert.deepEqual((await store.snapshot('vms')).items.map((v) => v.name), ['c', 'a', 'b']);
      assert.deepEqual((await store.list('vms', { worker: 'w1' })).map((v) => v.name), ['c', 'a']);
      assert.deepEqual((await store.snapshot('vms', { worker: 'w2' })).items.map((v) => v.name), ['b']);
      // A VM moved to another worker is listed there.
      await store.update('vms', 'a', (v) => ({ ...v, worker: 'w2' }));
      assert.deepEqual((await store.list('vms', { worker: 'w2' })).map((v) => v.name), ['a', 'b']);
      assert.deepEqual(await store.countVMsByStatus(), { pending: 2, running: 1 });
    });

    withStore('subscribe: every committed change once, in commit order, with increasing revisions; after the writer’s promise', async (store) => {
      const { changes, stop } = record(store);
      await store.create('vms', vm('a'));
      assert.equal(changes.length, 1, 'the change is published by the time its write resolves');
      // Writes in one turn: all committed, published in the order they were made.
      await Promise.all([
        store.create('workers', worker('w')),
        store.update('vms', 'a', (v) => ({ ...v, status: 'running' })),
        store.create('serviceAccounts', account('sa')),
        store.create('vms', vm('a')).catch(() => undefined), // a conflict: no change
        store.delete('vms', 'a'),
      ]);
      await settle();
      assert.deepEqual(
        changes.map((c) => `${c.type} ${c.kind} ${c.object.name}`),
        ['ADDED vms a', 'ADDED workers w', 'MODIFIED vms a', 'ADDED serviceAccounts sa', 'DELETED vms a'],
      );
      assert.equal((changes[2].object as VM).status, 'running');
      assert.equal((changes[4].object as VM).status, 'running', 'a DELETED change carries the object as it was');
      for (let i = 1; i < changes.length; i++) assert.equal(changes[i].revision, changes[i - 1].revision + 1, 'each change one revision after the one before');
      stop();
      await store.create('vms', vm('b'));
      assert.equal(changes.length, 5, 'nothing after unsubscribing');
      // A failing listener affects neither the writer nor the other listeners.
      const { changes: others } = record(store);
      store.subscribe(() => {
        throw new Error('listener fails');
      });
      await store.create('vms', vm('c'));
      assert.equal(others.length, 1);
    });

    withStore('snapshot: the revision of the last change it reflects', async (store) => {
      const { changes } = record(store);
      const empty = await store.snapshot('vms');
      assert.deepEqual(empty.items, []);
      await store.create('vms', vm('a'));
      await store.create('workers', worker('w'));
      const s = await store.snapshot('vms');
      assert.deepEqual(s.items.map((v) => v.name), ['a']);
      assert.equal(s.revision, changes[changes.length - 1].revision, 'a snapshot reflects every change committed before it, of any kind');
      assert.ok(s.revision > empty.revision);
    });

    withStore('snapshot + subscribe hand-off: no change lost, none twice, whenever the snapshot is taken', async (store) => {
      // A watch subscribes, then takes a snapshot, then adds the changes after the snapshot's revision.
      // Snapshots are taken at every point of a stream of writes, committed or not yet committed.
      await store.create('vms', vm('v0'));
      const watches: { changes: Change[]; snapshot?: Promise<{ items: VM[]; revision: number }> }[] = [];
      const open = () => {
        const w: (typeof watches)[number] = { changes: [] };
        store.subscribe((c) => w.changes.push(c));
        w.snapshot = store.snapshot('vms');
        watches.push(w);
      };
      const writes: Promise<unknown>[] = [];
      for (let i = 1; i <= 20; i++) {
        open(); // before the write
        writes.push(store.create('vms', vm(`v${i}`)));
        open(); // after the write, before its commit
        writes.push(store.update('vms', `v${i - 1}`, (v) => ({ ...v, status: 'running' })));
        open();
        if (i % 5 === 0) {
          await Promise.all(writes); // and between commits
          open();
        }
      }
      await Promise.all(writes);
      await settle();
      const final = new Map((await store.list('vms')).map((v) => [v.name, v]));
      for (const [i, w] of watches.entries()) {
        const snapshot = await w.snapshot!;
        const seen = new Map(snapshot.items.map((v) => [v.name, v]));
        const added = new Set(snapshot.items.map((v) => v.name));
        for (const c of w.changes) {
          if (c.kind !== 'vms' || c.revision <= snapshot.revision) continue;
          const v = c.object as VM;
          if (c.type === 'ADDED') {
            assert.ok(!added.has(v.name), `watch ${i}: VM ${v.name} added twice (snapshot at revision ${snapshot.revision}, change at ${c.revision})`);
            added.add(v.name);
          }
          seen.set(v.name, v);
        }
        assert.deepEqual(seen, final, `watch ${i}: the snapshot and the changes after it make the final state`);
      }
    });

    withStore('reads see only committed writes', async (store) => {
      await store.create('vms', vm('a'));
      const writing = store.update('vms', 'a', (v) => ({ ...v, status: 'running' }));
      const creating = store.create('vms', vm('b'));
      // Not committed yet (nor published): reads give the state before.
      assert.equal((await store.get('vms', 'a'))?.status, 'pending');
      assert.equal(await store.get('vms', 'b'), undefined);
      assert.deepEqual((await store.list('vms')).map((v) => v.name), ['a']);
      await Promise.all([writing, creating]);
      assert.equal((await store.get('vms', 'a'))?.status, 'running');
      assert.deepEqual((await store.list('vms')).map((v) => v.name), ['a', 'b']);
    });

    withStore('transaction: its writes commit together, publish in order, and it reads its own writes', async (store) => {
      await store.create('vms', vm('a'));
      const { changes } = record(store);
      const result = await store.transaction((tx) => {
        const current = tx.get('vms', 'a')!;
        tx.update('vms', 'a', (v) => ({ ...v, status: 'running' }));
        assert.equal(tx.get('vms', 'a')?.status, 'running');
        tx.appendEvents(current.uid!, [event(1), event(2)]);
        tx.create('workers', worker('w'));
        tx.put('workers', { ...worker('w'), labels: { l: '1' } });
        tx.create('vms', vm('b'));
        tx.delete('vms', 'b');
        return 'done';
      });
      assert.equal(result, 'done');
      assert.deepEqual(
        changes.map((c) => `${c.type} ${c.kind} ${c.object.name}`),
        ['MODIFIED vms a', 'ADDED workers w', 'MODIFIED workers w', 'ADDED vms b', 'DELETED vms b'],
      );
      assert.equal((await store.get('vms', 'a'))?.status, 'running');
      assert.deepEqual((await store.listEvents('uid-a', { limit: 10, order: 'asc' })).events, [event(1), event(2)]);
      assert.deepEqual((await store.get('workers', 'w'))?.labels, { l: '1' });
    });

    withStore('transaction: all or nothing — a throwing fn changes nothing and publishes nothing', async (store) => {
      await store.create('vms', vm('a'));
      await store.create('workers', worker('w'));
      await store.appendEvents('uid-a', [event(1)]);
      const { changes } = record(store);
      const alongside = store.create('vms', vm('c')); // another write in the same commit window
      await assert.rejects(
        store.transaction((tx) => {
          tx.update('vms', 'a', (v) => ({ ...v, status: 'running' }));
          tx.appendEvents('uid-a', [event(2)]);
          tx.create('vms', vm('b'));
          tx.delete('workers', 'w');
          tx.release('w', 'uid-a');
          throw new Error('abort');
        }),
        /abort/,
      );
      // A failing step inside (a conflict) aborts it too, when fn lets the error through.
      await assert.rejects(
        store.transaction((tx) => {
          tx.update('vms', 'a', (v) => ({ ...v, status: 'failed' }));
          tx.create('workers', worker('w'));
        }),
        ConflictError,
      );
      await alongside;
      await settle();
      assert.deepEqual(
        changes.map((c) => `${c.type} ${c.kind} ${c.object.name}`),
        ['ADDED vms c'],
        'only the write outside the transactions',
      );
      assert.equal((await store.get('vms', 'a'))?.status, 'pending');
      assert.equal(await store.get('vms', 'b'), undefined);
      assert.ok(await store.get('workers', 'w'));
      assert.deepEqual((await store.listEvents('uid-a', { limit: 10, order: 'asc' })).events, [event(1)]);
      assert.equal((await store.releasedFrom('w', ['uid-a'])).size, 0);
      // And the store goes on: the next transaction commits, and the failed ones left no gap in the revisions.
      await store.transaction((tx) => tx.appendEvents('uid-a', [event(3)]));
      assert.deepEqual((await store.listEvents('uid-a', { limit: 10, order: 'asc' })).events, [event(1), event(3)]);
      await store.transaction((tx) => tx.create('vms', vm('d')));
      assert.deepEqual(
        changes.map((c) => `${c.type} ${c.kind} ${c.object.name}`),
        ['ADDED vms c', 'ADDED vms d'],
      );
      assert.equal(changes[1].revision, changes[0].revision + 1);
    });

    withStore('transaction: the store’s own writes inside it are refused, and so is an async function', async (store) => {
      await assert.rejects(
        store.transaction(() => store.create('vms', vm('inner'))),
        /inside a transaction/,
      );
      await assert.rejects(
        store.transaction(async (tx) => tx.create('vms', vm('async'))),
        /must not be async/,
      );
      await settle();
      assert.deepEqual(await store.list('vms'), []);
    });

    withStore('events: order, paging with cursors, newest cursor; deleting a VM deletes its events', async (store) => {
      await store.create('vms', vm('a'));
      await store.appendEvents('uid-a', [event(1), event(2), event(3)]);
      await store.appendEvents('uid-b', [event(100)]);
      await store.appendEvents('uid-a', [event(4), event(5)]);
      const p1 = await store.listEvents('uid-a', { limit: 2, order: 'asc' });
      assert.deepEqual(p1.events, [event(1), event(2)]);
      assert.ok(p1.nextCursor);
      const p2 = await store.listEvents('uid-a', { limit: 2, order: 'asc', cursor: p1.nextCursor });
      assert.deepEqual(p2.events, [event(3), event(4)]);
      const p3 = await store.listEvents('uid-a', { limit: 2, order: 'asc', cursor: p2.nextCursor });
      assert.deepEqual(p3.events, [event(5)]);
      assert.equal(p3.nextCursor, undefined);
      const all = await store.listEvents('uid-a', { limit: 10, order: 'asc' });
      assert.deepEqual(all.events.map((e) => e.timestamp), [1, 2, 3, 4, 5]);
      assert.equal(all.dropped, 0);
      const desc = await store.listEvents('uid-a', { limit: 3, order: 'desc' });
      assert.deepEqual(desc.events.map((e) => e.timestamp), [5, 4, 3]);
      const descNext = await store.listEvents('uid-a', { limit: 3, order: 'desc', cursor: desc.nextCursor });
      assert.deepEqual(descNext.events.map((e) => e.timestamp), [2, 1]);
      // The newest cursor: in ascending order, only what is appended later.
      await store.appendEvents('uid-a', [event(6)]);
      const later = await store.listEvents('uid-a', { limit: 10, order: 'asc', cursor: all.newestCursor });
      assert.deepEqual(later.events, [event(6)]);
      await store.delete('vms', 'a');
      assert.deepEqual((await store.listEvents('uid-a', { limit: 10, order: 'asc' })).events, []);
      assert.deepEqual((await store.listEvents('uid-b', { limit: 10, order: 'asc' })).events, [event(100)]);
    });

    withStore('events: retention keeps the newest, and counts and dates the cut', async (store) => {
      const keep = opts.eventsPerVM;
      const before = Date.now();
      await store.appendEvents('uid-a', Array.from({ length: keep + 3 }, (_, i) => event(i)));
      await store.appendEvents('uid-a', [event(keep + 3)]);
      const page = await store.listEvents('uid-a', { limit: keep + 10, order: 'asc' });
      assert.equal(page.events.length, keep);
      assert.deepEqual(page.events[0], event(4));
      assert.deepEqual(page.events[keep - 1], event(keep + 3));
      assert.equal(page.dropped, 4);
      assert.ok(page.droppedAt !== undefined && page.droppedAt >= before && page.droppedAt <= Date.now());
    });

    withStore('events: those of a failed transaction do not count toward retention', async (store) => {
      const keep = opts.eventsPerVM;
      await store.appendEvents('uid-a', Array.from({ length: keep - 1 }, (_, i) => event(i)));
      for (let i = 0; i < 3; i++) {
        await assert.rejects(
          store.transaction((tx) => {
            tx.appendEvents('uid-a', [event(100 + i), event(200 + i)]);
            throw new Error('abort');
          }),
          /abort/,
        );
      }
      await store.appendEvents('uid-a', [event(keep - 1)]);
      const page = await store.listEvents('uid-a', { limit: keep + 10, order: 'asc' });
      assert.deepEqual(page.events, Array.from({ length: keep }, (_, i) => event(i)));
      assert.equal(page.dropped, 0);
    });

    withStore('event feed: each committed append once, in commit order, with the ids listEvents gives, before the writer’s promise; none from a failed transaction', async (store) => {
      const appends: EventAppend[] = [];
      const stop = store.subscribeEvents((a) => appends.push(a));
      // Appends in one turn share a commit; one of them, in a transaction that throws, is not published.
      const writes = [
        store.appendEvents('uid-a', [event(1), event(2)]),
        store.transaction((tx) => {
          tx.appendEvents('uid-a', [event(99)]);
          throw new Error('abort');
        }).catch(() => 'aborted'),
        store.appendEvents('uid-b', [event(10)]),
        store.transaction((tx) => tx.appendEvents('uid-a', [event(3)])),
      ];
      const seenWhenAnswered = await writes[0].then(() => appends.length);
      assert.equal(seenWhenAnswered, 3, 'the commit’s appends are published before its writers are answered');
      assert.equal(await writes[1], 'aborted');
      await Promise.all(writes);
      await store.appendEvents('uid-a', [event(4)]);
      stop();
      await store.appendEvents('uid-a', [event(5)]);
      assert.deepEqual(appends.map((a) => [a.vmUID, a.events.map((e) => e.event.timestamp)]), [['uid-a', [1, 2]], ['uid-b', [10]], ['uid-a', [3]], ['uid-a', [4]]]);
      const page = await store.listEvents('uid-a', { limit: 10, order: 'asc' });
      assert.deepEqual(page.events.map((e) => e.timestamp), [1, 2, 3, 4, 5]);
      assert.deepEqual(appends.filter((a) => a.vmUID === 'uid-a').flatMap((a) => a.events.map((e) => e.id)), page.ids.slice(0, 4));
      assert.ok(page.ids.every((id, i) => i === 0 || id > page.ids[i - 1]), 'ids ascend');
      // An id is a cursor: from it, the events after that one.
      assert.deepEqual((await store.listEvents('uid-a', { limit: 10, order: 'asc', cursor: String(page.ids[2]) })).events.map((e) => e.timestamp), [4, 5]);
    });

    withStore('releases: a VM that leaves its worker is released from it; release by hand', async (store) => {
      await store.create('vms', vm('a', { worker: 'w1' }));
      await store.create('vms', vm('b', { worker: 'w1' }));
      assert.equal((await store.releasedFrom('w1', ['uid-a', 'uid-b'])).size, 0);
      await store.update('vms', 'a', (v) => ({ ...v, worker: 'w2' }));
      await store.delete('vms', 'b');
      await store.release('w3', 'uid-x');
      assert.deepEqual(await store.releasedFrom('w1', ['uid-a', 'uid-b', 'uid-c']), new Set(['uid-a', 'uid-b']));
      assert.deepEqual(await store.releasedFrom('w3', ['uid-x']), new Set(['uid-x']));
      assert.equal((await store.releasedFrom('w2', ['uid-a'])).size, 0);
      // Inside a transaction: its own releases too.
      await store.transaction((tx) => {
        assert.equal(tx.releasedFrom('w4', ['uid-y']).size, 0);
        tx.release('w4', 'uid-y');
        assert.deepEqual(tx.releasedFrom('w4', ['uid-y', 'uid-z']), new Set(['uid-y']));
      });
      assert.deepEqual(await store.releasedFrom('w4', ['uid-y']), new Set(['uid-y']));
    });

    withStore('cluster settings: empty at first, then as put', async (store) => {
      assert.deepEqual(await store.getClusterSettings(), {});
      const settings = { schedulerProfile: 'distribute-load' as const, hostDirPolicies: [{ pathPrefix: '/data', ro: true }] };
      assert.deepEqual(await store.putClusterSettings(settings), settings);
      assert.deepEqual(await store.getClusterSettings(), settings);
    });

    withStore('service accounts: a changed token is read at once', async (store) => {
      await store.create('serviceAccounts', account('sa'));
      assert.equal((await store.get('serviceAccounts', 'sa'))?.token, 'token-sa');
      await store.update('serviceAccounts', 'sa', (a) => ({ ...a, token: 'new' }));
      assert.equal((await store.get('serviceAccounts', 'sa'))?.token, 'new');
      // Read while a change is on its way: the committed token, then the new one once committed.
      const changing = store.update('serviceAccounts', 'sa', (a) => ({ ...a, token: 'newer' }));
      assert.equal((await store.get('serviceAccounts', 'sa'))?.token, 'new');
      await changing;
      assert.equal((await store.get('serviceAccounts', 'sa'))?.token, 'newer');
      await store.delete('serviceAccounts', 'sa');
      assert.equal(await store.get('serviceAccounts', 'sa'), undefined);
    });

    withStore("a change's JSON, when the store gives it, is its object's, as changed (readers show it instead of serialising again)", async (store) => {
      const { changes } = record(store);
      await store.create('vms', vm('a'));
      await store.update('vms', 'a', (v) => ({ ...v, status: 'running' }));
      await store.put('vms', vm('a', { status: 'failed' }));
      await store.put('vms', vm('b'));
      await store.transaction((tx) => tx.update('vms', 'b', (v) => ({ ...v, worker: 'w' })));
      await store.delete('vms', 'a');
      assert.equal(changes.length, 6);
      for (const c of changes) if (c.json !== undefined) assert.equal(c.json, JSON.stringify(c.object), `${c.type} ${c.object.name}`);
    });

    test('close: writes made before close are committed and published; later ones are refused', async () => {
      const store = await factory();
      const { changes } = record(store);
      const pending = store.create('vms', vm('a'));
      store.close();
      await pending;
      assert.equal(changes.length, 1);
      // Afterwards writes are refused (and publish nothing); closing again does no harm.
      await assert.rejects(store.create('vms', vm('b')));
      await assert.rejects(store.transaction((tx) => tx.create('vms', vm('c'))));
      assert.equal(changes.length, 1);
      store.close();
    });
  });
}

let dirs = 0;
const root = tempDir();
storeContract(
  'SQLite',
  async () => new SQLiteStore(join(root, `store-${++dirs}`, 'orchard.db'), { ...DEFAULT_LIMITS, eventsPerVM: 5 }),
  { eventsPerVM: 5 },
);

test('SQLite: data and revisions outlive the process (the revision is stored with the data)', async () => {
  const path = join(root, 'reopen', 'orchard.db');
  let store = new SQLiteStore(path);
  await store.create('vms', vm('a'));
  await store.create('workers', worker('w'));
  await store.appendEvents('uid-a', [event(1)]);
  const { revision } = await store.snapshot('vms');
  store.close();
  store = new SQLiteStore(path);
  try {
    const s = await store.snapshot('vms');
    assert.deepEqual(s.items, [vm('a')]);
    assert.equal(s.revision, revision);
    const { changes } = record(store);
    await store.update('vms', 'a', (v) => ({ ...v, status: 'running' }));
    assert.equal(changes[0].revision, revision + 1, 'revisions go on from where they were');
    assert.equal(changes[0].json, JSON.stringify(changes[0].object), 'a change carries the JSON the store wrote');
    assert.deepEqual((await store.listEvents('uid-a', { limit: 10, order: 'asc' })).events, [event(1)]);
  } finally {
    store.close();
  }
});
