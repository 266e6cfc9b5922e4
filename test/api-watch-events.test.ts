// Watches deliver every committed change in order; events page with X-Next-Cursor; metrics and
// the OpenAPI document are served.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import YAML from 'yaml';
import type { VM, WatchEvent } from '../src/api/schemas.ts';
import { inProcessController, placeOn, rawRequest } from './helpers.ts';

async function collect(iter: AsyncGenerator<WatchEvent<VM>>, until: (seen: WatchEvent<VM>[]) => boolean) {
  const seen: WatchEvent<VM>[] = [];
  for await (const e of iter) {
    seen.push(e);
    if (until(seen)) break;
  }
  return seen;
}

test('watch: snapshot, then every change in commit order, also under concurrent writes', async () => {
  const c = await inProcessController();
  try {
    await c.admin.createVM({ name: 'before', image: 'img' });
    const abort = new AbortController();
    const all = c.admin.watch<VM>('/v1/vms?watch=true', abort.signal);
    const first = await all.next();
    assert.deepEqual([first.value?.type, first.value?.object.name], ['ADDED', 'before']);

    // Sequential changes: exactly this sequence.
    // (cpu given: a VM that asks for none keeps none, and is assigned its worker's default when placed.)
    await c.admin.createVM({ name: 'a', image: 'img', cpu: 4 });
    await placeOn(c.admin, 'w', 'a', 2); // its worker's account reports its state ("before" takes the other slot)
    await c.admin.updateVM({ name: 'a', cpu: 2 });
    await c.admin.updateVMState('a', { status: 'running' });
    await c.admin.deleteVM('a');
    // Concurrent creates: each appears exactly once, in the order the controller committed them.
    const names = Array.from({ length: 100 }, (_, i) => `c-${i}`);
    const created = await Promise.all(names.map((name) => c.admin.createVM({ name, image: 'img' })));
    await c.admin.deleteVM('before');

    const seen = await collect(all, (s) => s.some((e) => e.type === 'DELETED' && e.object.name === 'before'));
    abort.abort();
    // (The scheduler also writes to these VMs — its status_message on why they are pending — so a
    // MODIFIED event that changes neither cpu nor status is left out here.)
    const ofA: [string, string, number | undefined, string | undefined][] = [];
    for (const e of seen.filter((e) => e.object.name === 'a')) {
      const prev = ofA.at(-1);
      if (e.type === 'MODIFIED' && prev && prev[2] === e.object.cpu && prev[3] === e.object.status) continue;
      ofA.push([e.type, e.object.name, e.object.cpu, e.object.status]);
    }
    assert.deepEqual(ofA, [
      ['ADDED', 'a', 4, 'pending'],
      ['MODIFIED', 'a', 2, 'pending'],
      ['MODIFIED', 'a', 2, 'running'],
      ['DELETED', 'a', 2, 'running'],
    ]);
    assert.ok(seen.findIndex((e) => e.object.name === 'a' && e.type === 'DELETED') < seen.findIndex((e) => e.object.name.startsWith('c-')), "a's deletion comes before the later creates");
    const added = seen.filter((e) => e.type === 'ADDED' && e.object.name.startsWith('c-'));
    assert.deepEqual(added.map((e) => e.object.name).sort(), [...names].sort());
    // The stream's order is the store's commit order: the list (by insertion) agrees with it.
    assert.deepEqual(added.map((e) => e.object.name), (await c.admin.listVMs()).map((v) => v.name));
    assert.equal(new Set(created.map((v) => v.uid)).size, names.length);
    assert.deepEqual([seen.at(-1)?.type, seen.at(-1)?.object.name], ['DELETED', 'before']);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('watch with filter=worker and watch of one VM see only their objects', async () => {
  const c = await inProcessController();
  try {
    await c.admin.registerWorker({ name: 'w1', machine_id: 'm1' });
    await c.admin.createVM({ name: 'x', image: 'img' });
    const abort = new AbortController();
    const byWorker = c.admin.watch<VM>('/v1/vms?watch=true&filter=worker%3Dw1', abort.signal);
    const one = c.admin.watch<VM>('/v1/vms/x?watch=true', abort.signal);
    assert.deepEqual((await one.next()).value?.object.name, 'x');
    await c.admin.createVM({ name: 'y', image: 'img' });
    await c.admin.updateVM({ name: 'x', memory: 1024 });
    // (The scheduler may also be writing x's status_message, before or after the snapshot.)
    const ofX = await collect(one, (s) => s.some((e) => e.object.memory === 1024));
    assert.deepEqual(ofX.map((e) => [e.type, e.object.name]), ofX.map(() => ['MODIFIED', 'x']), 'only x, never y');
    // No VM is on w1: the worker's watch must stay quiet until one is; end it and check.
    const quiet = collect(byWorker, () => true);
    await new Promise((r) => setTimeout(r, 200));
    abort.abort();
    assert.deepEqual(await quiet, []);
    // (Watching a VM that does not exist yet waits for its ADDED, as upstream's: test/conformance.)
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('events: appended in order, paged with limit/order/cursor and X-Next-Cursor, deleted with the VM', async () => {
  const c = await inProcessController();
  try {
    await c.admin.createVM({ name: 'e', image: 'img' });
    await placeOn(c.admin, 'w', 'e');
    const events = Array.from({ length: 25 }, (_, i) => ({ kind: 'log', timestamp: 1000 + i, payload: `line ${i}` }));
    await c.admin.appendEvents('e', events.slice(0, 10));
    await c.admin.appendEvents('e', events.slice(10));
    const pages: string[][] = [];
    let cursor: string | undefined;
    do {
      const page = await c.admin.listEvents('e', { limit: 10, cursor });
      pages.push(page.events.map((e) => e.payload));
      cursor = page.nextCursor;
    } while (cursor);
    assert.deepEqual(pages.map((p) => p.length), [10, 10, 5]);
    assert.deepEqual(pages.flat(), events.map((e) => e.payload));
    const newest = await c.admin.listEvents('e', { limit: 3, order: 'desc' });
    assert.deepEqual(newest.events.map((e) => e.payload), ['line 24', 'line 23', 'line 22']);
    const older = await c.admin.listEvents('e', { limit: 30, order: 'desc', cursor: newest.nextCursor });
    assert.equal(older.events[0].payload, 'line 21');
    assert.equal(older.nextCursor, undefined);
    // A new VM with the same name starts with no events.
    await c.admin.deleteVM('e');
    await c.admin.createVM({ name: 'e', image: 'img' });
    assert.deepEqual((await c.admin.listEvents('e')).events, []);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('metrics (Prometheus) and the OpenAPI document', async () => {
  const c = await inProcessController();
  try {
    await c.admin.createVM({ name: 'm2', image: 'img' });
    await placeOn(c.admin, 'w', 'm2', 1); // its worker's account reports its state; no room for m1
    await c.admin.createVM({ name: 'm1', image: 'img' });
    await c.admin.updateVMState('m2', { status: 'running' });
    await c.admin.registerWorker({ name: 'w', machine_id: 'x', resources: { 'org.cirruslabs.tart-vms': 1 } });
    const auth: [string, string] = ['bootstrap-admin', 'test-admin-token'];
    const metrics = await rawRequest(c.ctl, 'GET', '/metrics', { auth });
    assert.equal(metrics.status, 200);
    assert.match(String(metrics.headers['content-type']), /text\/plain/);
    assert.match(metrics.body, /^orchard_vms\{status="pending"\} 1$/m);
    assert.match(metrics.body, /^orchard_vms\{status="running"\} 1$/m);
    assert.match(metrics.body, /^orchard_workers\{state="online"\} 1$/m);
    assert.match(metrics.body, /^orchard_http_requests_total\{method="POST",route="\/v1\/vms",status="200"\} 2$/m);
    assert.match(metrics.body, /^orchard_http_request_duration_seconds_bucket\{le="0.01",method="POST",route="\/v1\/vms"\} \d+$/m);

    const yaml = await rawRequest(c.ctl, 'GET', '/v1/openapi.yaml', { auth });
    assert.equal(yaml.status, 200);
    const doc = YAML.parse(yaml.body) as { openapi: string; paths: Record<string, Record<string, { requestBody?: { content: Record<string, { schema: { properties: Record<string, unknown> } }> } }>> };
    assert.match(doc.openapi, /^3\./);
    for (const path of ['/v1/vms', '/v1/vms/{name}', '/v1/vms/{name}/state', '/v1/vms/{name}/events', '/v1/workers', '/v1/service-accounts', '/v1/cluster-settings', '/v1/controller/info']) {
      assert.ok(doc.paths[path], `OpenAPI documents ${path}`);
    }
    const vmSchema = doc.paths['/v1/vms'].post.requestBody!.content['application/json'].schema;
    for (const field of ['name', 'image', 'cpu', 'memory', 'startup_script', 'restart_policy', 'status_message']) assert.ok(field in vmSchema.properties, field);
    const json = await rawRequest(c.ctl, 'GET', '/v1/openapi.json', { auth });
    assert.deepEqual(Object.keys((json.json as typeof doc).paths).sort(), Object.keys(doc.paths).sort());
  } finally {
    await c.close();
    c.cleanup();
  }
});
