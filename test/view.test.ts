// The in-memory view's JSON: each VM's as the store wrote it, and the whole list's bytes, which are
// reused until a VM changes and held weakly (a full collection frees them; they are made again).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { VM } from '../src/api/schemas.ts';
import { SQLiteStore } from '../src/controller/store/sqlite.ts';
import { ClusterView, requirements } from '../src/controller/view.ts';
import { tempDir } from './helpers.ts';

const vm = (name: string, extra: Partial<VM> = {}): VM => ({ name, uid: `uid-${name}`, image: 'debian', status: 'pending', ...extra }) as VM;

test("the view's JSON follows the VMs' changes; the list's bytes are reused, and freed by a full collection", async () => {
  const store = new SQLiteStore(join(tempDir(), 'orchard.db'));
  const view = new ClusterView(store);
  try {
    await view.loaded;
    await Promise.all([store.create('vms', vm('a')), store.create('vms', vm('b', { worker: 'w' }))]);
    const expected = () => JSON.stringify([...view.vms.values()]);
    assert.equal(view.vmsJSON('w'), JSON.stringify([view.vms.get('b')]));
    const list = view.allVMsJSON();
    assert.equal(list.toString(), expected());
    assert.equal(view.allVMsJSON(), list, 'no change: the same bytes');
    // A change whose JSON was in use (the worker's push made it) and one whose JSON was not.
    await store.update('vms', 'b', (v) => ({ ...v, status: 'running' }));
    await store.update('vms', 'a', (v) => ({ ...v, status: 'failed' }));
    assert.equal(view.vmsJSON('w'), JSON.stringify([view.vms.get('b')]));
    assert.equal(view.allVMsJSON().toString(), expected());
    // What each worker's VMs take, kept as they change: a state change leaves it, a change of resources does not.
    await store.update('vms', 'b', (v) => ({ ...v, resources: { gpu: 2 } }));
    await store.update('vms', 'b', (v) => ({ ...v, status_message: 'busy' }));
    assert.deepEqual(view.usage.get('w'), { ...requirements(view.vms.get('b')!) });
    assert.equal(view.usage.get('w')?.gpu, 2);
    // Held weakly: after a full collection (in a later turn, as WeakRefs are kept for the turn that read them) it is gone.
    const held = new WeakRef(view.allVMsJSON());
    await new Promise((r) => setImmediate(r));
    setFlagsFromString('--expose-gc');
    (runInNewContext('gc') as () => void)();
    assert.equal(held.deref(), undefined, 'the list was freed');
    assert.equal(view.allVMsJSON().toString(), expected(), 'and is made again');
  } finally {
    view.close();
    store.close();
  }
});

test('a view loaded from the store starts with each VM as stored, and redacts what its readers may not see', async () => {
  const path = join(tempDir(), 'orchard.db');
  const first = new SQLiteStore(path);
  await first.create('vms', vm('plain', { worker: 'w', labels: { team: 'ünïcode' } }));
  await first.create('vms', vm('secret', { worker: 'w', password: 'hunter2', startup_script: { script_content: 'echo', env: { TOKEN: 'x' } } }));
  const stored = JSON.stringify(await first.list('vms'));
  first.close();
  const store = new SQLiteStore(path);
  const view = new ClusterView(store);
  try {
    await view.loaded;
    // The JSON the store read is kept (no JSON.stringify of every VM for the first list or sync).
    assert.equal((view as unknown as { json: { all: Map<string, string> } }).json.all.size, 2);
    assert.equal(view.allVMsJSON().toString(), stored);
    assert.equal(view.vmsJSON('w'), stored);
    const none = JSON.parse(view.allVMsJSON('none').toString()) as VM[];
    assert.equal(none[1].password, undefined);
    assert.notEqual(none[1].startup_script?.env?.TOKEN, 'x');
  } finally {
    view.close();
    store.close();
  }
});
