// The worker protocol and our additions to it: the sync push carries the worker's VMs (no listing),
// a quick start is one state report that carries its events, a report about an earlier run of a VM
// is refused instead of overwriting the current run's state, a connected watch keeps a worker alive
// (no HTTP heartbeats, nor for an interval after it drops), and against a controller without these the
// worker speaks the upstream protocol.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { pino } from 'pino';
import { localNameOf, type VM } from '../src/api/schemas.ts';
import { SyntheticDriver } from '../src/worker/drivers/synthetic.ts';
import { OrchardWorker } from '../src/worker/worker.ts';
import type { OrchardClient } from '../src/client/client.ts';
import { ADMIN_TOKEN, clientOf, inProcessController, placeOn, rawRequest, tempDir, waitFor } from './helpers.ts';

/** Requests served so far for one method and route, from the controller's Prometheus metrics. */
async function served(c: Awaited<ReturnType<typeof inProcessController>>, method: string, route: string): Promise<number> {
  const res = await rawRequest(c.ctl, 'GET', '/metrics', { auth: ['bootstrap-admin', ADMIN_TOKEN] });
  let n = 0;
  for (const line of res.body.split('\n')) {
    if (line.startsWith('orchard_http_requests_total{') && line.includes(`method="${method}"`) && line.includes(`route="${route}"`)) n += Number(line.split(' ').pop());
  }
  return n;
}

/** Reports taken over the workers' watch WebSockets so far, of one kind and status. */
async function reportFrames(c: Awaited<ReturnType<typeof inProcessController>>, kind: string, status = 200): Promise<number> {
  const res = await rawRequest(c.ctl, 'GET', '/metrics', { auth: ['bootstrap-admin', ADMIN_TOKEN] });
  const line = res.body.split('\n').find((l) => l.startsWith(`orchard_worker_reports_total{kind="${kind}",status="${status}"}`));
  return line ? Number(line.split(' ').pop()) : 0;
}

/** A synthetic worker with `slots` slots, heartbeating every 100 ms when it heartbeats over HTTP at all. */
const syntheticWorker = (client: OrchardClient, name: string, slots: number) =>
  new OrchardWorker({ client, name, driver: new SyntheticDriver(), dataDir: tempDir(), slots, heartbeatMs: 100, logger: pino({ level: 'silent' }) });

test('a worker gets its VMs in the sync push and reports a quick start in one report with its events, over its watch: no HTTP request', async () => {
  const c = await inProcessController();
  const worker = syntheticWorker(clientOf(c.ctl, 'bootstrap-admin', ADMIN_TOKEN), 'w', 10);
  try {
    await worker.start();
    await waitFor('the worker connected', async () => (await c.admin.getWorker('w')).last_seen);
    const listsBefore = await served(c, 'GET', '/v1/vms');
    for (let i = 0; i < 8; i++) await c.admin.createVM({ name: `p${i}`, image: 'synthetic', cpu: 1, memory: 512 });
    for (let i = 0; i < 8; i++) await waitFor(`p${i} running`, async () => (await c.admin.getVM(`p${i}`)).status === 'running' || undefined, 10_000, 20);

    assert.equal(await served(c, 'GET', '/v1/vms'), listsBefore, 'the worker did not list its VMs: the pushes carried them');
    assert.equal(await served(c, 'POST', '/v1/vms/:name/events'), 0, 'events travel with the state reports');
    assert.equal(await served(c, 'PUT', '/v1/vms/:name/state'), 0, 'no state report over HTTP: they go up the watch');
    assert.equal(await reportFrames(c, 'vmState'), 8, 'one state report per VM, over the watch');
    assert.equal(await reportFrames(c, 'vmEvents'), 0, 'events travel with the state reports');
    const { events } = await c.admin.listEvents('p3');
    assert.deepEqual(
      events.map((e) => e.payload.replace(/ [\d.]+s after/, ' Ns after')),
      ['scheduled on worker w; cloning image synthetic', 'booting', 'running: the guest answers SSH Ns after the clone started'],
    );
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
  }
});

test("a state report about an earlier run of a VM is refused (409) and changes nothing; events ride along a report", async () => {
  const c = await inProcessController();
  try {
    await c.admin.createVM({ name: 'r', image: 'synthetic' });
    const vm = await placeOn(c.admin, 'w', 'r');
    const put = (body: object) => rawRequest(c.ctl, 'PUT', '/v1/vms/r/state', { auth: ['bootstrap-admin', ADMIN_TOKEN], body: JSON.stringify(body) });

    let res = await put({ status: 'running', localName: localNameOf(vm), events: [{ kind: 'lifecycle', timestamp: 1, payload: 'up' }] });
    assert.equal(res.status, 200, res.body);
    assert.equal((res.json as VM).status, 'running');
    assert.deepEqual((await c.admin.listEvents('r')).events.map((e) => e.payload), ['up']);

    const earlier = localNameOf({ ...vm, restart_count: 3 });
    res = await put({ status: 'failed', status_message: 'late', localName: earlier, events: [{ kind: 'lifecycle', timestamp: 2, payload: 'late' }] });
    assert.equal(res.status, 409);
    assert.match((res.json as { message: string }).message, /field "localName": .* is an earlier run of VM "r"/);
    const after = await c.admin.getVM('r');
    assert.deepEqual([after.status, after.localName], ['running', localNameOf(vm)]);
    assert.deepEqual((await c.admin.listEvents('r')).events.map((e) => e.payload), ['up'], 'the refused report added no events');

    res = await put({ events: [{ kind: 'x', timestamp: 'soon', payload: '' }] });
    assert.equal(res.status, 400);
    assert.match((res.json as { message: string }).message, /events\[0\]\.timestamp/);
  } finally {
    await c.close();
    c.cleanup();
  }
});

test('a connected watch keeps a worker alive without HTTP heartbeats; a deleted worker registers again', async () => {
  const c = await inProcessController({ workerOfflineTimeoutMs: 1500 });
  const worker = syntheticWorker(clientOf(c.ctl, 'bootstrap-admin', ADMIN_TOKEN), 'live', 1);
  try {
    await worker.start();
    await waitFor('the watch connected', () => worker.connected || undefined);
    const beats = await served(c, 'PUT', '/v1/workers/:name');
    const seen = (await c.admin.getWorker('live')).last_seen!;
    await new Promise((r) => setTimeout(r, 1200));
    assert.equal(await served(c, 'PUT', '/v1/workers/:name'), beats, 'no heartbeat requests while the watch is connected');
    assert.ok(Date.parse((await c.admin.getWorker('live')).last_seen!) > Date.parse(seen), 'the controller refreshed last_seen');

    const created = (await c.admin.getWorker('live')).createdAt;
    await c.admin.deleteWorker('live');
    const back = await waitFor('registered again', async () => (await c.admin.listWorkers()).find((w) => w.name === 'live' && w.createdAt !== created), 10_000);
    assert.ok(back.last_seen);
    await waitFor('the watch connected again', () => worker.connected || undefined);
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
  }
});

test('against a controller without our capabilities the worker speaks the upstream protocol: events posted apart, HTTP heartbeats', async () => {
  const c = await inProcessController();
  const client = clientOf(c.ctl, 'bootstrap-admin', ADMIN_TOKEN);
  // What an upstream controller answers: no "vm-state-events", no "watch-liveness".
  client.info = async () => ({ version: 'upstream', commit: '', capabilities: ['vm-events', 'watch'] });
  const worker = syntheticWorker(client, 'old', 2);
  try {
    await worker.start();
    await c.admin.createVM({ name: 'u', image: 'synthetic', cpu: 1, memory: 512 });
    await waitFor('running', async () => (await c.admin.getVM('u')).status === 'running' || undefined, 10_000, 20);
    await waitFor('the events', async () => ((await c.admin.listEvents('u')).events.length >= 3 ? true : undefined), 5000);
    assert.ok((await served(c, 'POST', '/v1/vms/:name/events')) >= 1, 'events are posted on their own');
    assert.ok((await served(c, 'PUT', '/v1/vms/:name/state')) >= 1, 'state reports go by HTTP');
    assert.equal(await reportFrames(c, 'vmState'), 0, 'nothing up the watch');
    const beats = await served(c, 'PUT', '/v1/workers/:name');
    await waitFor('the worker to heartbeat over HTTP', async () => (await served(c, 'PUT', '/v1/workers/:name')) > beats || undefined, 5000, 50);
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
  }
});

test('a worker whose watch dropped heartbeats over HTTP only once it has been down a whole interval, then on every tick while it stays down', async () => {
  const c = await inProcessController();
  const HEARTBEAT_MS = 1000;
  await c.admin.createServiceAccount({ name: 'wk', token: 'wk-token-0123456789', roles: ['compute:read', 'compute:write'] });
  const client = clientOf(c.ctl, 'wk', 'wk-token-0123456789');
  const worker = new OrchardWorker({ client, name: 'drop', driver: new SyntheticDriver(), dataDir: tempDir(), slots: 1, heartbeatMs: HEARTBEAT_MS, logger: pino({ level: 'silent' }) });
  try {
    const started = performance.now();
    await worker.start();
    await waitFor('the watch connected', () => worker.connected || undefined);
    const beats = await served(c, 'PUT', '/v1/workers/:name');
    // Midway between two ticks of the worker's heartbeat (they follow its start, every interval).
    await new Promise((r) => setTimeout(r, started + 1.5 * HEARTBEAT_MS - performance.now()));
    // The account loses its roles: the controller ends the watch (its tunnel mux needs compute:write),
    // and refuses it again; the heartbeats are refused too, but each is counted as it arrives.
    await c.admin.updateServiceAccount({ name: 'wk', token: 'wk-token-0123456789', roles: [] });
    const dropped = performance.now();
    await waitFor('the watch dropped', () => !worker.connected || undefined, 5000, 5);
    // The tick half an interval after the drop sent a heartbeat before; now the next one does.
    await new Promise((r) => setTimeout(r, dropped + 0.9 * HEARTBEAT_MS - performance.now()));
    assert.equal(await served(c, 'PUT', '/v1/workers/:name'), beats, 'no heartbeat within an interval of the drop');
    assert.equal(worker.connected, false, 'the watch is still down');
    await waitFor('heartbeats again, the watch being down', async () => ((await served(c, 'PUT', '/v1/workers/:name')) >= beats + 2 ? true : undefined), 4 * HEARTBEAT_MS, 50);
  } finally {
    await worker.stop();
    await c.close();
    c.cleanup();
  }
});
