// Revocation: deleting an account, changing its token or removing the role something was opened with
// closes, within a second, everything it holds open — watch streams, port-forward tunnels, a worker's
// watch (exec sessions: test/exec.test.ts; SSH jump connections: test/ssh-jump.test.ts). What the
// account may still do stays open.
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import type { WebSocket } from 'ws';
import type { VM } from '../../src/api/schemas.ts';
import { inProcessController, waitFor } from '../helpers.ts';
import { account, closed, syntheticWorker, upgrade, type Account, type Cluster } from './attack.ts';

/** An NDJSON watch stream as `who`; `ended` settles when the controller ends it. */
async function watchStream(c: Cluster, who: Account) {
  const ac = new AbortController();
  const events = who.client.watch<VM>('/v1/vms?watch=true', ac.signal);
  await events.next(); // established (the snapshot's first VM)
  let endedAt = 0;
  const ended = (async () => {
    try {
      for await (const _ of events) void _;
    } catch {
      // cut off: what revocation does
    }
    endedAt = Date.now();
  })();
  return { ended, endedAt: () => endedAt, stop: () => ac.abort() };
}

async function tunnel(c: Cluster, who: Account): Promise<WebSocket> {
  const r = await upgrade(c.ctl, '/v1/vms/rv/port-forward?port=22&wait=10', { auth: who.auth });
  assert.equal(r.status, 101, r.body);
  // The tunnel works before the revocation (the synthetic VM echoes).
  const echo = new Promise<string>((resolve) => r.ws!.once('message', (m) => resolve(m.toString())));
  r.ws!.send('ping');
  assert.equal(await echo, 'ping');
  return r.ws!;
}

describe('revoking an account closes what it holds open', () => {
  let c: Cluster;
  let workerAccount: Account;
  let worker: ReturnType<typeof syntheticWorker>;

  before(async () => {
    c = await inProcessController();
    workerAccount = await account(c, 'wk', ['compute:read', 'compute:write']);
    worker = syntheticWorker(workerAccount.client, 'w1');
    await worker.start();
    await c.admin.createVM({ name: 'rv', image: 'synthetic', cpu: 1, memory: 512 });
    await waitFor('rv running', async () => (await c.admin.getVM('rv')).status === 'running' || undefined, 10_000);
  });
  after(async () => {
    await worker.stop();
    await c.close();
    c.cleanup();
  });

  test('deleted: its watch stream and its tunnel close within a second', async () => {
    const ops = await account(c, 'ops', ['compute:read', 'compute:connect']);
    const stream = await watchStream(c, ops);
    const ws = await tunnel(c, ops);
    const wsClosed = closed(ws);
    const t0 = Date.now();
    await c.admin.deleteServiceAccount('ops');
    const { code, at } = await wsClosed;
    await stream.ended;
    assert.equal(code, 1008);
    assert.ok(at - t0 < 1000, `tunnel closed after ${at - t0} ms`);
    assert.ok(stream.endedAt() - t0 < 1000, `watch stream ended after ${stream.endedAt() - t0} ms`);
    assert.equal((await c.admin.getVM('rv')).status, 'running', 'the VM itself is untouched');
  });

  test('a new token: everything opened with the old one closes', async () => {
    const ops = await account(c, 'ops2', ['compute:read', 'compute:connect']);
    const stream = await watchStream(c, ops);
    const wsClosed = closed(await tunnel(c, ops));
    const t0 = Date.now();
    await c.admin.updateServiceAccount({ name: 'ops2', roles: ['compute:read', 'compute:connect'], token: 'a-brand-new-token-of-ops2-0123456789' });
    const { at } = await wsClosed;
    await stream.ended;
    assert.ok(at - t0 < 1000 && stream.endedAt() - t0 < 1000);
  });

  test('a role removed: the tunnel (compute:connect) closes, the watch (compute:read) stays', async () => {
    const ops = await account(c, 'ops3', ['compute:read', 'compute:connect']);
    const stream = await watchStream(c, ops);
    const wsClosed = closed(await tunnel(c, ops));
    const t0 = Date.now();
    await c.admin.updateServiceAccount({ name: 'ops3', roles: ['compute:read'] });
    const { code, reason, at } = await wsClosed;
    assert.equal(code, 1008);
    assert.match(reason, /lost the role/);
    assert.ok(at - t0 < 1000);
    // The stream still delivers changes.
    const more = await Promise.race([stream.ended.then(() => 'ended'), new Promise((r) => setTimeout(() => r('open'), 300))]);
    assert.equal(more, 'open', 'the watch needs only compute:read, which the account still has');
    stream.stop();
  });

  test("a worker's account deleted: its watch closes at once (the worker is cut off)", async () => {
    const before = await upgrade(c.ctl, '/v1/rpc/watch?workerName=w1', { auth: workerAccount.auth });
    assert.equal(before.status, 101, 'the worker account may watch (it replaces the worker\'s own watch)');
    const wsClosed = closed(before.ws!);
    const t0 = Date.now();
    await c.admin.deleteServiceAccount('wk');
    const { code, at } = await wsClosed;
    assert.equal(code, 1008);
    assert.ok(at - t0 < 1000, `closed after ${at - t0} ms`);
    const again = await upgrade(c.ctl, '/v1/rpc/watch?workerName=w1', { auth: workerAccount.auth });
    assert.equal(again.status, 401);
  });
});
