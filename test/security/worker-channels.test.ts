// Attacks on the worker side of the protocol, by accounts that are not the worker: a read-only
// account opening a worker's watch (it would receive every VM spec and port-forward request), another
// compute:write account claiming a port-forward session (sitting in the middle of a tunnel), taking
// over a live worker's record, reporting another worker's VM as failed, answering its IP requests.
// Each must fail; the worker's own account keeps working; one live watch per worker.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { WebSocket } from 'ws';
import { RESOURCE_TART_VMS, type VM } from '../../src/api/schemas.ts';
import { inProcessController, rawRequest, waitFor } from '../helpers.ts';
import { account, closed, upgrade, type Account, type Cluster } from './attack.ts';

describe('worker channels belong to the worker', () => {
  let c: Cluster;
  let worker: Account; // the worker's own service account (compute:read + compute:write, as upstream's)
  let reader: Account; // compute:read
  let writer: Account; // compute:write, another team's account
  let user: Account; // compute:connect: uses the VM
  let watch: WebSocket;
  const actions: Record<string, { session: string }>[] = [];
  /** The hand-made worker's watch: what the controller sends it is recorded. */
  const useWatch = (ws: WebSocket) => {
    watch = ws;
    ws.on('message', (m) => actions.push(JSON.parse(m.toString()) as Record<string, { session: string }>));
  };

  before(async () => {
    c = await inProcessController();
    worker = await account(c, 'worker-x', ['compute:read', 'compute:write']);
    reader = await account(c, 'reader', ['compute:read']);
    writer = await account(c, 'writer', ['compute:write']);
    user = await account(c, 'user', ['compute:read', 'compute:connect']);
    // A hand-made worker, so the test sees exactly what the controller sends it.
    await worker.client.registerWorker({ name: 'wx', machine_id: 'machine-x', resources: { [RESOURCE_TART_VMS]: 4 } });
    const opened = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wx', { auth: worker.auth });
    assert.equal(opened.status, 101, opened.body);
    useWatch(opened.ws!);
    await c.admin.createVM({ name: 'v1', image: 'synthetic', password: 'secret-of-v1' });
    await waitFor('v1 placed on wx', async () => (await c.admin.getVM('v1')).worker === 'wx' || undefined);
    await worker.client.updateVMState('v1', { status: 'running' });
  });
  after(async () => {
    watch?.close();
    await c.close();
    c.cleanup();
  });

  test("a read-only or another compute:write account cannot open the worker's watch (no VM specs, no port-forward requests)", async () => {
    for (const attacker of [reader, writer, user]) {
      const r = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wx', { auth: attacker.auth });
      assert.equal(r.status, 403, `${attacker.name}: ${r.status} ${r.body}`);
      assert.match((JSON.parse(r.body) as { message: string }).message, attacker.name === 'writer' ? /lacks the role "compute:read"/ : /worker "wx" belongs to service account "worker-x"/);
      assert.doesNotMatch(r.body, /secret-of-v1/);
    }
    assert.equal(watch.readyState, watch.OPEN, "the real worker's watch is untouched");
  });

  test('a port-forward session cannot be claimed by another account; the worker claims it and the tunnel works', async () => {
    const before = actions.length;
    const client = upgrade(c.ctl, '/v1/vms/v1/port-forward?port=22&wait=5', { auth: user.auth });
    const action = await waitFor('the portForwardAction', () => actions.slice(before).find((a) => a.portForwardAction)?.portForwardAction);
    assert.ok(action.session.length >= 40, `the session id is long and random: ${action.session}`);
    // The attacker knows the session id (the worst case): still refused, and the session stays the worker's.
    for (const attacker of [writer, reader]) {
      const r = await upgrade(c.ctl, `/v1/rpc/port-forward?session=${encodeURIComponent(action.session)}&workerName=wx`, { auth: attacker.auth });
      assert.equal(r.status, 403, `${attacker.name}: ${r.status} ${r.body}`);
    }
    const dial = await upgrade(c.ctl, `/v1/rpc/port-forward?session=${encodeURIComponent(action.session)}&workerName=wx`, { auth: worker.auth });
    assert.equal(dial.status, 101, dial.body);
    const tunnel = await client;
    assert.equal(tunnel.status, 101, tunnel.body);
    // Bytes from the user reach the worker's end and back (the worker echoes).
    dial.ws!.on('message', (m) => dial.ws!.send(m));
    const echoed = new Promise<string>((resolve) => tunnel.ws!.once('message', (m) => resolve(m.toString())));
    tunnel.ws!.send('hello through the tunnel');
    assert.equal(await echoed, 'hello through the tunnel');
    // Single use: the same session cannot be claimed again, even by the worker.
    const again = await upgrade(c.ctl, `/v1/rpc/port-forward?session=${encodeURIComponent(action.session)}&workerName=wx`, { auth: worker.auth });
    assert.equal(again.status, 404);
    tunnel.ws!.close();
  });

  test("an IP request is answered only by the worker's account", async () => {
    const before = actions.length;
    const asked = rawRequest(c.ctl, 'GET', '/v1/vms/v1/ip?wait=5', { auth: user.auth });
    const action = await waitFor('the resolveIPAction', () => actions.slice(before).find((a) => a.resolveIPAction)?.resolveIPAction);
    const forged = await rawRequest(c.ctl, 'POST', `/v1/rpc/resolve-ip?session=${encodeURIComponent(action.session)}`, { auth: writer.auth, body: JSON.stringify({ ip: '6.6.6.6' }) });
    assert.equal(forged.status, 403, forged.body);
    const real = await rawRequest(c.ctl, 'POST', `/v1/rpc/resolve-ip?session=${encodeURIComponent(action.session)}`, { auth: worker.auth, body: JSON.stringify({ ip: '10.0.2.15' }) });
    assert.equal(real.status, 200, real.body);
    const answer = await asked;
    assert.equal(answer.status, 200, answer.body);
    assert.deepEqual(answer.json, { ip: '10.0.2.15' });
  });

  test("another account cannot take over the worker's record (with or without a machine_id); an operator may pause it", async () => {
    const beforeRecord = await c.admin.getWorker('wx');
    for (const body of [{ name: 'wx' }, { name: 'wx', machine_id: 'machine-x' }, { name: 'wx', machine_id: 'evil', resources: { [RESOURCE_TART_VMS]: 1000 } }]) {
      const r = await rawRequest(c.ctl, 'POST', '/v1/workers', { auth: writer.auth, body: JSON.stringify(body) });
      assert.equal(r.status, 403, `${JSON.stringify(body)}: ${r.status} ${r.body}`);
    }
    const put = await rawRequest(c.ctl, 'PUT', '/v1/workers/wx', { auth: writer.auth, body: JSON.stringify({ name: 'wx', machine_id: 'evil', resources: { [RESOURCE_TART_VMS]: 1000 }, scheduling_paused: true }) });
    assert.equal(put.status, 200, put.body);
    const afterRecord = await c.admin.getWorker('wx');
    assert.equal(afterRecord.machine_id, 'machine-x');
    assert.deepEqual(afterRecord.resources, beforeRecord.resources);
    assert.equal(afterRecord.serviceAccount, 'worker-x');
    assert.equal(afterRecord.scheduling_paused, true, 'pausing is an operator action');
    assert.equal(afterRecord.last_seen, beforeRecord.last_seen, "another account's PUT is no sign of life");
    await c.admin.updateWorker({ name: 'wx', scheduling_paused: false });
  });

  test("another account cannot report the worker's VM as failed or add events to it", async () => {
    const state = await rawRequest(c.ctl, 'PUT', '/v1/vms/v1/state', { auth: writer.auth, body: JSON.stringify({ status: 'failed', status_message: 'forged' }) });
    assert.equal(state.status, 403, state.body);
    const events = await rawRequest(c.ctl, 'POST', '/v1/vms/v1/events', { auth: writer.auth, body: JSON.stringify([{ kind: 'x', timestamp: 1, payload: 'forged' }]) });
    assert.equal(events.status, 403, events.body);
    const vm = (await c.admin.getVM('v1')) as VM;
    assert.equal(vm.status, 'running');
    assert.ok(!(await c.admin.listEvents('v1')).events.some((e) => e.payload === 'forged'));
    // Its own worker's account can.
    assert.equal((await worker.client.updateVMState('v1', { status: 'running', status_message: 'fine' })).status_message, 'fine');
  });

  test('one live watch per worker: a new watch of the same worker replaces the old one', async () => {
    const second = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wx', { auth: worker.auth });
    assert.equal(second.status, 101);
    const old = await closed(watch);
    assert.equal(old.code, 1008);
    assert.match(old.reason, /replaced/);
    useWatch(second.ws!);
  });

  test('the role × endpoint matrix of the worker-side endpoints: the role and the worker account are both needed', async () => {
    const admin: Account = { name: 'bootstrap-admin', token: 'test-admin-token', auth: ['bootstrap-admin', 'test-admin-token'], client: c.admin };
    const cases: { who: Account; watch: number; forward: number; ip: number }[] = [
      { who: reader, watch: 403, forward: 403, ip: 403 },
      { who: writer, watch: 403, forward: 403, ip: 403 },
      { who: user, watch: 403, forward: 403, ip: 403 },
      { who: admin, watch: 403, forward: 403, ip: 403 },
      // The worker's own account reaches each one (the session ids below are unknown: 404 after the checks).
      { who: worker, watch: 101, forward: 404, ip: 404 },
    ];
    for (const k of cases) {
      const w = await upgrade(c.ctl, '/v1/rpc/watch?workerName=wx', { auth: k.who.auth });
      assert.equal(w.status, k.watch, `watch as ${k.who.name}: ${w.body}`);
      if (w.ws) useWatch(w.ws);
    }
    // Session checks need a live session: one port-forward and one IP request per caller.
    for (const k of cases) {
      const before = actions.length;
      const pf = upgrade(c.ctl, '/v1/vms/v1/port-forward?port=22&wait=5', { auth: user.auth });
      const fa = await waitFor('portForwardAction', () => actions.slice(before).find((a) => a.portForwardAction)?.portForwardAction);
      const r = await upgrade(c.ctl, `/v1/rpc/port-forward?session=${encodeURIComponent(fa.session)}&workerName=wx`, { auth: k.who.auth });
      assert.equal(r.status, k.who === worker ? 101 : k.forward, `port-forward dial-back as ${k.who.name}: ${r.body}`);
      if (r.ws) r.ws.close();
      else (await upgrade(c.ctl, `/v1/rpc/port-forward?session=${encodeURIComponent(fa.session)}&error=test`, { auth: worker.auth })).ws?.close();
      await pf.then((p) => p.ws?.close());
      const ipBefore = actions.length;
      const ip = rawRequest(c.ctl, 'GET', '/v1/vms/v1/ip?wait=5', { auth: user.auth });
      const ia = await waitFor('resolveIPAction', () => actions.slice(ipBefore).find((a) => a.resolveIPAction)?.resolveIPAction);
      const answer = await rawRequest(c.ctl, 'POST', `/v1/rpc/resolve-ip?session=${encodeURIComponent(ia.session)}`, { auth: k.who.auth, body: JSON.stringify({ ip: '10.0.2.15' }) });
      assert.equal(answer.status, k.who === worker ? 200 : k.ip, `resolve-ip as ${k.who.name}: ${answer.body}`);
      if (k.who !== worker) await rawRequest(c.ctl, 'POST', `/v1/rpc/resolve-ip?session=${encodeURIComponent(ia.session)}`, { auth: worker.auth, body: JSON.stringify({ error: 'test' }) });
      await ip;
    }
  });
});
